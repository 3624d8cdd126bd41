//! Embeds one image with the default model and prints its ImageNet top-5 and embedding
//! summary: `cargo run --release --example embed_one -- IMAGE.jpg`.

use fruits_dataflows::decode::{decode, DecodeConfig};
use fruits_dataflows::embed::{EmbedConfig, Embedder};

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: embed_one IMAGE"))?;
    let mut embedder = Embedder::load_outputs(
        &EmbedConfig::default(),
        &DecodeConfig::default(),
        &["embedding", "logits"],
    )?;
    let image = decode(&std::fs::read(&path)?, &DecodeConfig::default())?;
    let mut tensor = Vec::new();
    embedder.preprocess().tensor_into(&image, &mut tensor);
    let outputs = embedder.run_tensor(&tensor)?;
    let (embedding, logits) = (&outputs[0], &outputs[1]);
    let mut classes: Vec<usize> = (0..logits.len()).collect();
    classes.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    println!(
        "{path}: {}x{} -> embedding of {} values, L2 norm {:.4}",
        image.width(),
        image.height(),
        embedding.len(),
        embedding.iter().map(|v| v * v).sum::<f32>().sqrt()
    );
    for c in &classes[..5] {
        println!("  ImageNet class {c:4}  logit {:.3}", logits[*c]);
    }
    Ok(())
}
