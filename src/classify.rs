//! `classify`: names the fruit in photos with an output's current models (decode →
//! embed → scaler → PCA → classifier), printing the top labels and the nearest cluster.

use crate::cli::ClassifyArgs;
use anyhow::{Context, Result};
use fruits_dataflows::classify::{self, ClassifyConfig};
use fruits_dataflows::embed::Embedder;
use fruits_dataflows::io::S3Config;
use fruits_dataflows::sink;

/// Classifies every image of `args`; a bad image is reported and the rest go on.
/// Fails (after printing the others) when any image could not be classified.
pub fn run(args: &ClassifyArgs, s3: &S3Config, mut config: ClassifyConfig) -> Result<()> {
    if let Some(top) = args.top {
        config.top = top;
    }
    let store = sink::open(&args.out.output, s3)?;
    let (checkpoint, classifier) = classify::load(store.as_ref(), &config)?;
    let mut embed = checkpoint.embed.on_this_machine();
    if let Some(model) = &args.model {
        embed.model = model.clone();
    }
    let mut embedder = Embedder::load(&embed, &Default::default())
        .context("loading the model the output was built with (use --model to point at it)")?;
    let mut failed = 0;
    for path in &args.images {
        let result = std::fs::read(path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|bytes| {
                embedder
                    .embed_photo(&bytes)
                    .map_err(|e| format!("{}: {}", e.kind.as_str(), e.reason))
            });
        match result {
            Ok(embedding) => {
                let p = classifier.predict(&embedding.to_f64());
                if args.json {
                    let mut v = serde_json::to_value(&p)?;
                    v["image"] = path.display().to_string().into();
                    println!("{v}");
                } else {
                    let labels: Vec<String> = p
                        .labels
                        .iter()
                        .map(|l| format!("{} {:.3}", l.label, l.score))
                        .collect();
                    let cluster = p.cluster.map_or("-".into(), |c| c.to_string());
                    // An unknown photo still lists the nearest labels, after the answer.
                    let answer = if p.known {
                        String::new()
                    } else {
                        format!("{} (far from every label) | nearest: ", p.answer)
                    };
                    println!(
                        "{}: {answer}{} | cluster {cluster} | epoch {}",
                        path.display(),
                        labels.join(", "),
                        p.model_epoch
                    );
                }
            }
            Err(reason) => {
                failed += 1;
                eprintln!("error: {}: {reason}", path.display());
            }
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} images could not be classified",
        args.images.len()
    );
    Ok(())
}
