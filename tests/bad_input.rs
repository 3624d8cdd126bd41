//! The bad-input corpus: each file is recorded with its name and reason, the run
//! succeeds, and every good image is still ingested.

use crate::util::*;

#[test]
fn bad_inputs_are_recorded_and_nothing_else_is_lost() {
    let source = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let good = copy_fixtures(source.path(), 0..3);
    let bad_dir = root().join("tests/fixtures/bad");
    let label = source.path().join("Banana 1");
    for name in [
        "cmyk.jpg",
        "grayscale.jpg",
        "png_named.png",
        "png_disguised.jpg",
        "truncated.jpg",
        "zero.jpg",
        "text.jpg",
        "huge_20000x20000.jpg",
    ] {
        std::fs::copy(bad_dir.join(name), label.join(format!("bad_{name}"))).unwrap();
    }
    // Outside any label folder.
    std::fs::copy(
        fixtures().join("Banana 1/0_100.jpg"),
        source.path().join("loose.jpg"),
    )
    .unwrap();

    run_once(source.path(), out.path(), &[]);
    let s = status(out.path());
    assert_eq!(s["images"], good as i64, "every good image ingested");
    assert_eq!(s["errors"], 9);
    let errors = std::fs::read_to_string(out.path().join("errors.csv")).unwrap();
    let expect = [
        ("Banana 1/bad_cmyk.jpg", "color_space"),
        ("Banana 1/bad_grayscale.jpg", "color_space"),
        ("Banana 1/bad_png_named.png", "unsupported_format"),
        ("Banana 1/bad_png_disguised.jpg", "unsupported_format"),
        ("Banana 1/bad_truncated.jpg", "corrupt"),
        ("Banana 1/bad_zero.jpg", "empty"),
        ("Banana 1/bad_text.jpg", "not_an_image"),
        ("Banana 1/bad_huge_20000x20000.jpg", "too_large"),
        ("loose.jpg", "layout"),
    ];
    for (key, kind) in expect {
        let line = errors
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} not recorded:\n{errors}"));
        assert!(line.contains(kind), "{key}: expected {kind}, got {line}");
    }
    // A second run neither retries nor double-counts them.
    run_once(source.path(), out.path(), &[]);
    assert_eq!(status(out.path())["errors"], 9);
    assert_eq!(status(out.path())["images"], good as i64);
}
