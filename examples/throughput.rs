//! Prints images/s of the decode+resize stage and of the tract embed stage alone (one
//! thread, batch 1, the default `conv_nhwc` transform) over a Fruits-360 folder:
//! `cargo run --release --example throughput -- ../shared/fruits360/Training [LIMIT [MODEL
//! [TRANSFORM]]]`.

// The same allocator as the fruits-flow binary, so figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use fruits_dataflows::decode::DecodeConfig;
use fruits_dataflows::embed::{Backend, EmbedConfig, Embedder};
use fruits_dataflows::source::{LocalDir, Source};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    fruits_dataflows::embed::no_transparent_huge_pages();
    let root = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fixtures/fruits".into());
    let limit: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let source = LocalDir::open(&root)?;
    let keys: Vec<_> = source
        .list()?
        .into_iter()
        .take(limit)
        .map(|o| o.key)
        .collect();
    let bytes: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| source.read(k))
        .collect::<Result<_, _>>()?;
    let config = EmbedConfig {
        model: std::env::args()
            .nth(3)
            .map_or(EmbedConfig::default().model, Into::into),
        transforms: std::env::args()
            .nth(4)
            .map_or(EmbedConfig::default().transforms, |t| vec![t]),
        backend: Backend::Tract,
        ..EmbedConfig::default()
    };
    let mut embedder = Embedder::load(&config, &DecodeConfig::default())?;

    let started = Instant::now();
    let tensors = bytes
        .iter()
        .map(|b| embedder.input_tensor(b))
        .collect::<Result<Vec<_>, _>>()?;
    let decode_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for t in &tensors {
        embedder.run_tensor(t)?;
    }
    let embed_s = started.elapsed().as_secs_f64();
    let n = bytes.len() as f64;
    println!("images: {}", bytes.len());
    println!("decode+resize: {:.1} images/s", n / decode_s);
    println!(
        "embed (tract, 1 thread, batch 1): {:.1} images/s",
        n / embed_s
    );
    Ok(())
}
