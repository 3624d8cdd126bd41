//! `report` on a fixture run: the PNG files decode as images of the promised size, and
//! the HTML page shows them with the cluster × label table.

use crate::util::*;

#[test]
fn report_writes_valid_pngs_and_a_page_that_shows_them() {
    let out = tempfile::tempdir().unwrap();
    let config = out.path().join("pipeline.toml");
    // Several epochs, so "images per label over time" has a history to draw.
    std::fs::write(&config, "[source]\nepoch_size = 12\n").unwrap();
    run_once(
        &fixtures(),
        out.path(),
        &["--config", config.to_str().unwrap()],
    );
    let pages = tempfile::tempdir().unwrap();
    let html = pages.path().join("site/index.html");
    let result = bin()
        .args(["report", "--output", out.path().to_str().unwrap(), "--html"])
        .arg(&html)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );

    for (name, size) in [
        ("variance.png", (1000, 600)),
        ("scatter.png", (1800, 800)),
        ("labels_over_time.png", (1000, 600)),
    ] {
        let path = html.parent().unwrap().join(name);
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{name} is not a PNG"
        );
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .unwrap_or_else(|e| panic!("{name} does not decode: {e}"))
            .to_rgb8();
        assert_eq!(img.dimensions(), size, "{name}");
        // Something was drawn: many distinct colours, not a blank canvas.
        let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        colours.sort();
        colours.dedup();
        assert!(
            colours.len() > 20,
            "{name} has only {} colours",
            colours.len()
        );
    }

    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.trim_end().ends_with("</html>"));
    for needle in [
        "src=\"variance.png\"",
        "src=\"scatter.png\"",
        "src=\"labels_over_time.png\"",
        "<th>Apple Golden 1</th>",
        "<th>Strawberry 1</th>",
        "40 live images",
    ] {
        assert!(page.contains(needle), "page lacks {needle}");
    }
    // The table counts every image once: 10 cluster rows whose totals sum to 40.
    let totals: usize = page
        .lines()
        .filter(|l| l.starts_with("<tr><th>") && !l.contains("cluster \\ label"))
        .map(|l| {
            let cell = l.rsplit("<td>").next().unwrap();
            cell.trim_end_matches("</td></tr>")
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(totals, 40);
}
