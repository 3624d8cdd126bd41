//! `report` on a fixture run: the PNG files decode as images of the promised size, and
//! the HTML page is the served page with its data inlined (map, table, history).

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

    // The page is the one `serve` answers, with its data inlined: it works offline.
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.trim_end().ends_with("</html>"));
    for needle in ["variance.png", "scatter.png", "labels_over_time.png"] {
        assert!(page.contains(needle), "page lacks {needle}");
    }
    // Nothing loads from elsewhere (the one URL is SVG's namespace name).
    let rest = page.replace("http://www.w3.org/2000/svg", "");
    assert!(
        !rest.contains("http://") && !rest.contains("https://"),
        "the page loads something from elsewhere"
    );
    let inlined = page
        .split("window.__DATA = ")
        .nth(1)
        .and_then(|rest| rest.split(";</script>").next())
        .expect("inlined data");
    let data: serde_json::Value = serde_json::from_str(&inlined.replace("<\\/", "</")).unwrap();
    assert_eq!(data["images"], 40);
    assert_eq!(data["pngs"], true);
    assert_eq!(
        data["labels"],
        serde_json::json!(["Apple Golden 1", "Banana 1", "Kiwi 1", "Strawberry 1"])
    );
    // Every live image is on the map (40 < the sample size), in both projections.
    assert_eq!(data["keys"].as_array().unwrap().len(), 40);
    assert_eq!(data["pc"]["xy"].as_array().unwrap().len(), 80);
    assert_eq!(data["tsne"]["xy"].as_array().unwrap().len(), 80);
    // The table counts every image once.
    let totals: u64 = data["table"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[2].as_u64().unwrap())
        .sum();
    assert_eq!(totals, 40);
    // Several epochs of history, ending at 10 images per label.
    let history = &data["history"];
    assert!(history["epochs"].as_array().unwrap().len() >= 3);
    for row in history["counts"].as_array().unwrap() {
        assert_eq!(row.as_array().unwrap().last().unwrap(), 10);
    }
}
