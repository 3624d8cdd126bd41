//! `report`: pictures of an output's live state, as PNG files and one HTML page that
//! shows them: the explained-variance curve with the chosen k, the first two principal
//! components coloured by label and by cluster, the cluster × label table, and images
//! per label over the epochs. No model runs here.

use anyhow::{Context, Result};
use fruits_dataflows::sink::OutputStore;
use fruits_dataflows::state::{
    for_each_live_file, load_committed, load_history, Archive, Checkpoint, EpochSummary,
};
use fruits_dataflows::stats::PcaModel;
use plotters::prelude::*;
use std::collections::BTreeMap;
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

/// One live image in PCA space.
struct Point {
    label: usize,
    cluster: Option<usize>,
    pc: [f64; 2],
}

/// What the report was drawn from, and the files it wrote.
pub struct Report {
    /// The HTML page.
    pub html: PathBuf,
    /// The PNG files, beside the page.
    pub pngs: Vec<PathBuf>,
}

/// Points plotted at most: a fixed-size sample keeps the report's memory and the PNG
/// readable whatever the archive's size.
const MAX_POINTS: usize = 20_000;

/// One streaming pass over the live rows (one embeddings file at a time): the exact
/// cluster x label table, and a sample of at most [`MAX_POINTS`] points chosen by a
/// stable hash of the key (the same sample on every run).
fn scan(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
    pca: &PcaModel,
    labels: &[String],
) -> Result<(Vec<Point>, BTreeMap<(usize, usize), usize>)> {
    let archive = Archive::load(store, checkpoint, |_| true)?;
    let stride = (checkpoint.images().max(0) as u64)
        .div_ceil(MAX_POINTS as u64)
        .max(1);
    let mut points = Vec::new();
    let mut table: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for_each_live_file(store, checkpoint, &archive, |rows| {
        let raw: Vec<Vec<f64>> = rows.iter().map(|(row, _)| row.embedding.to_f64()).collect();
        let projected = pca.project_many(&raw);
        let clusters = checkpoint.models.kmeans.assign_projected(&projected, pca);
        for (((row, _), p), cluster) in rows.iter().zip(&projected).zip(clusters) {
            let label = labels.binary_search(&row.label.0).unwrap_or(0);
            if let Some(c) = cluster {
                *table.entry((c, label)).or_default() += 1;
            }
            if points.len() < MAX_POINTS && row.key.bucket_hash() % stride == 0 {
                points.push(Point {
                    label,
                    cluster,
                    pc: [p[0], p.get(1).copied().unwrap_or(0.0)],
                });
            }
        }
        Ok(())
    })?;
    Ok((points, table))
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
    let labels: Vec<String> = checkpoint.labels.keys().cloned().collect();
    let (points, table) = scan(store, &checkpoint, pca, &labels)?;
    let dir = html.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let k_clusters = checkpoint.models.kmeans.centroids.len();
    let pngs = vec![
        dir.join("variance.png"),
        dir.join("scatter.png"),
        dir.join("labels_over_time.png"),
    ];
    draw_variance(&pngs[0], pca, variance_target).context("drawing variance.png")?;
    draw_scatter(&pngs[1], &points, &labels, k_clusters).context("drawing scatter.png")?;
    let history = load_history(store, &checkpoint)?;
    draw_history(&pngs[2], &history, &labels).context("drawing labels_over_time.png")?;
    let page = page(
        &checkpoint,
        pca,
        &labels,
        &table,
        k_clusters,
        variance_target,
    );
    std::fs::write(html, page).with_context(|| format!("writing {}", html.display()))?;
    Ok(Report {
        html: html.to_path_buf(),
        pngs,
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

fn draw_scatter(path: &Path, points: &[Point], labels: &[String], clusters: usize) -> Result<()> {
    let root = BitMapBackend::new(path, (1800, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(900);
    let (mut lo, mut hi) = ([f64::INFINITY; 2], [f64::NEG_INFINITY; 2]);
    for p in points {
        for a in 0..2 {
            lo[a] = lo[a].min(p.pc[a]);
            hi[a] = hi[a].max(p.pc[a]);
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
                points
                    .iter()
                    .filter(|p| p.label == i)
                    .map(|p| p.pc)
                    .collect(),
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
                    .map(|p| p.pc)
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

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(
    checkpoint: &Checkpoint,
    pca: &PcaModel,
    labels: &[String],
    table: &BTreeMap<(usize, usize), usize>,
    clusters: usize,
    target: f64,
) -> String {
    let mut rows = String::new();
    rows.push_str("<tr><th>cluster \\ label</th>");
    for l in labels {
        rows.push_str(&format!("<th>{}</th>", escape(l)));
    }
    rows.push_str("<th>total</th></tr>\n");
    for c in 0..clusters {
        let total: usize = (0..labels.len())
            .map(|l| table.get(&(c, l)).copied().unwrap_or(0))
            .sum();
        rows.push_str(&format!("<tr><th>{c}</th>"));
        for l in 0..labels.len() {
            let n = table.get(&(c, l)).copied().unwrap_or(0);
            // Shade by the share of the cluster, so a pure cluster reads at a glance.
            let share = if total > 0 {
                n as f64 / total as f64
            } else {
                0.0
            };
            rows.push_str(&format!(
                "<td style=\"background: rgba(31,119,180,{:.2})\">{}</td>",
                share * 0.8,
                if n > 0 { n.to_string() } else { String::new() }
            ));
        }
        rows.push_str(&format!("<td>{total}</td></tr>\n"));
    }
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fruits-flow report: epoch {epoch}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1900px}} img{{max-width:100%;border:1px solid #ccc;margin:0.5em 0}}
table{{border-collapse:collapse;font-size:14px}} td,th{{border:1px solid #bbb;padding:3px 7px;text-align:right}}</style></head>
<body>
<h1>fruits-flow report</h1>
<p>Source <code>{source}</code>, epoch {epoch}: {images} live images, {nlabels} labels, {errors} quarantined objects.
PCA on standardized embeddings (d = {d}): k = {k} components explain {explained:.1} % of the variance (target {target:.0} %).
KMeans: {clusters} clusters.</p>
<h2>Explained variance</h2>
<img src="variance.png" alt="explained variance curve with the chosen k marked">
<h2>First two principal components</h2>
<img src="scatter.png" alt="PC1 against PC2, coloured by label and by cluster">
<h2>Clusters × labels</h2>
<table>
{rows}</table>
<h2>Images per label over time</h2>
<img src="labels_over_time.png" alt="live images per label after each epoch">
</body></html>
"#,
        epoch = checkpoint.epoch,
        source = escape(&checkpoint.source),
        images = checkpoint.images(),
        nlabels = labels.len(),
        errors = checkpoint.errors,
        d = checkpoint.models.moments.dim,
        k = pca.k,
        explained = pca.explained_variance() * 100.0,
        target = target * 100.0,
    )
}
