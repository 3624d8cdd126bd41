//! `report`: pictures of an output's live state, as PNG files (the explained-variance
//! curve with the chosen k, the first two principal components coloured by label and by
//! cluster, images per label over the epochs) and the web page `serve` answers, written
//! as one self-contained file with its data inlined (map with t-SNE, the interactive
//! charts, the cluster × label table). No model runs here.

use crate::web::{self, MapPoint};
use anyhow::{Context, Result};
use fruits_dataflows::sink::OutputStore;
use fruits_dataflows::state::{load_committed, load_history, EpochSummary};
use fruits_dataflows::stats::PcaModel;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// The font every plot uses, embedded so reports look the same on any machine.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Distinct colours (Tableau 20, dark shades first): labels and clusters beyond 20 reuse them.
const PALETTE: [(u8, u8, u8); 20] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
];

fn colour(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// What the report was drawn from, and the files it wrote.
pub struct Report {
    /// The HTML page.
    pub html: PathBuf,
    /// The PNG files, beside the page.
    pub pngs: Vec<PathBuf>,
    /// Seconds the page's t-SNE took (None: too few points).
    pub tsne_seconds: Option<f64>,
}

/// Writes the PNGs beside `html` and the page itself.
pub fn report(store: &dyn OutputStore, html: &Path, variance_target: f64) -> Result<Report> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the embedded font is invalid"))?;
    let checkpoint = load_committed(store)?;
    let pca = checkpoint
        .models
        .pca
        .as_ref()
        .context("no PCA model yet: the output holds fewer than two images")?;
    // One pass over the live rows: a stable sample and the exact cluster x label table.
    let sample = web::scan(store, &checkpoint, pca, web::MAX_POINTS)?;
    let dir = html.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let k_clusters = checkpoint.models.kmeans.centroids.len();
    let pngs = vec![
        dir.join("variance.png"),
        dir.join("scatter.png"),
        dir.join("labels_over_time.png"),
    ];
    draw_variance(&pngs[0], pca, variance_target).context("drawing variance.png")?;
    draw_scatter(&pngs[1], &sample.points, &sample.labels, k_clusters)
        .context("drawing scatter.png")?;
    let history = load_history(store, &checkpoint)?;
    draw_history(&pngs[2], &history, &sample.labels).context("drawing labels_over_time.png")?;
    // The same page `serve` answers, with its data inlined: it works offline.
    let mut data = web::MapData::new(store, &checkpoint, pca, &sample, variance_target)?;
    data.compute_tsne(&sample);
    data.pngs = true;
    std::fs::write(html, web::page(Some(&data)))
        .with_context(|| format!("writing {}", html.display()))?;
    Ok(Report {
        html: html.to_path_buf(),
        pngs,
        tsne_seconds: data.tsne_seconds.filter(|_| data.tsne.is_some()),
    })
}

fn draw_variance(path: &Path, pca: &PcaModel, target: f64) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let shown = (pca.k * 3).clamp(10, pca.explained_variance_ratio.len());
    let mut cumulative = Vec::with_capacity(shown);
    let mut sum = 0.0;
    for r in &pca.explained_variance_ratio[..shown] {
        sum += r;
        cumulative.push(sum);
    }
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Explained variance (correlation PCA, n = {})", pca.n),
            ("sans-serif", 26),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..shown as f64 + 1.0, 0f64..1.02f64)?;
    chart
        .configure_mesh()
        .x_desc("number of principal components")
        .y_desc("explained variance")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 16))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            cumulative
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64 + 1.0, *v)),
            colour(0).stroke_width(3),
        ))?
        .label("cumulative")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour(0).stroke_width(3)));
    chart
        .draw_series(LineSeries::new(
            pca.explained_variance_ratio[..shown]
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64 + 1.0, *v)),
            colour(1).stroke_width(2),
        ))?
        .label("per component")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour(1).stroke_width(2)));
    let k = pca.k as f64;
    chart
        .draw_series(LineSeries::new(
            vec![(k, 0.0), (k, 1.02)],
            colour(3).stroke_width(2),
        ))?
        .label(format!(
            "chosen k = {} ({:.1} % of variance)",
            pca.k,
            pca.explained_variance() * 100.0
        ))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour(3).stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, target), (shown as f64 + 1.0, target)],
            colour(7).stroke_width(1),
        ))?
        .label(format!("target {:.0} %", target * 100.0))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour(7).stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn draw_scatter(
    path: &Path,
    points: &[MapPoint],
    labels: &[String],
    clusters: usize,
) -> Result<()> {
    let pc = |p: &MapPoint| {
        [
            p.features[0] as f64,
            p.features.get(1).copied().unwrap_or(0.0) as f64,
        ]
    };
    let root = BitMapBackend::new(path, (1800, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(900);
    let (mut lo, mut hi) = ([f64::INFINITY; 2], [f64::NEG_INFINITY; 2]);
    for p in points {
        let xy = pc(p);
        for a in 0..2 {
            lo[a] = lo[a].min(xy[a]);
            hi[a] = hi[a].max(xy[a]);
        }
    }
    let pad = |a: usize| ((hi[a] - lo[a]) * 0.05).max(1e-9);
    let x = lo[0] - pad(0)..hi[0] + pad(0);
    let y = lo[1] - pad(1)..hi[1] + pad(1);
    let by_label: Vec<(String, Vec<[f64; 2]>)> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            (
                l.clone(),
                points.iter().filter(|p| p.label == i).map(pc).collect(),
            )
        })
        .collect();
    let by_cluster: Vec<(String, Vec<[f64; 2]>)> = (0..clusters)
        .map(|c| {
            (
                format!("cluster {c}"),
                points
                    .iter()
                    .filter(|p| p.cluster == Some(c))
                    .map(pc)
                    .collect(),
            )
        })
        .collect();
    scatter_panel(
        &left,
        "PC1 × PC2, coloured by label",
        &by_label,
        x.clone(),
        y.clone(),
    )?;
    scatter_panel(
        &right,
        "PC1 × PC2, coloured by KMeans cluster",
        &by_cluster,
        x,
        y,
    )?;
    root.present()?;
    Ok(())
}

fn scatter_panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    groups: &[(String, Vec<[f64; 2]>)],
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc("PC1")
        .y_desc("PC2")
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 15))
        .draw()?;
    for (i, (name, pts)) in groups.iter().enumerate() {
        let c = colour(i);
        let series = chart.draw_series(
            pts.iter()
                .map(|p| Circle::new((p[0], p[1]), 3, c.mix(0.7).filled())),
        )?;
        // More than 20 groups would repeat colours: name only the first 20.
        if i < PALETTE.len() {
            series
                .label(format!("{name} ({})", pts.len()))
                .legend(move |(x, y)| Circle::new((x + 8, y), 5, c.filled()));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn draw_history(path: &Path, history: &[EpochSummary], labels: &[String]) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let last = history.last().map_or(1, |h| h.epoch).max(1) as f64;
    let first = history.first().map_or(0, |h| h.epoch) as f64;
    let top = history
        .iter()
        .flat_map(|h| h.labels.values())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption("Live images per label after each epoch", ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((first - 0.5)..(last + 0.5), 0f64..top * 1.08)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("images")
        .x_labels(((last - first) as usize + 1).min(20))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 16))
        .draw()?;
    for (i, label) in labels.iter().enumerate() {
        let c = colour(i);
        chart.draw_series(history.iter().map(|h| {
            Circle::new(
                (h.epoch as f64, *h.labels.get(label).unwrap_or(&0) as f64),
                3,
                c.filled(),
            )
        }))?;
        let series = chart.draw_series(LineSeries::new(
            history
                .iter()
                .map(|h| (h.epoch as f64, *h.labels.get(label).unwrap_or(&0) as f64)),
            c.stroke_width(2),
        ))?;
        if i < PALETTE.len() {
            series.label(label.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
            });
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
