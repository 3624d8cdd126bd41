//! The published outputs derived from a checkpoint: the models as JSON (scaler, PCA,
//! KMeans), the error records as CSV, and the status object that `status --json` prints.

use super::OutputStore;
use crate::state::Checkpoint;
use anyhow::Result;
use serde_json::json;

/// The status object: images, labels, errors, PCA and KMeans summaries.
pub fn status(checkpoint: &Checkpoint) -> serde_json::Value {
    let models = &checkpoint.models;
    json!({
        "epoch": checkpoint.epoch,
        "source": checkpoint.source,
        "images": checkpoint.images(),
        "labels": checkpoint.label_counts(),
        "errors": checkpoint.errors,
        "errors_by_kind": checkpoint.errors_by_kind,
        // What made the embeddings (the run that started this output).
        "embedding": json!({
            "model": checkpoint.embed.model.display().to_string(),
            "input_size": checkpoint.embed.input_size,
            "engine": checkpoint.embed.backend,
        }),
        // Which epoch each model is at: the moments, label counts and KMeans move every
        // epoch; the PCA is refitted on [pca] refit_fraction, or catch_up_refit_fraction
        // while a backlog is queued (it covers pca.n images; changes_since_fit are not in it).
        "models_epoch": json!({
            "pca": models.pca.as_ref().map(|_| models.pca_epoch),
            "kmeans": checkpoint.epoch,
            "changes_since_fit": models.changes_since_fit,
        }),
        "pca": models.pca.as_ref().map(|p| json!({
            "k": p.k,
            "n": p.n,
            "explained_variance": p.explained_variance(),
            "explained_variance_ratio": p.explained_variance_ratio[..p.k],
        })),
        "kmeans": json!({
            "k": models.kmeans.centroids.len(),
            "counts": models.kmeans.weights.iter().map(|w| w.round() as i64).collect::<Vec<_>>(),
            "pending": models.kmeans.pending.len(),
        }),
    })
}

/// Writes `kmeans.json` under `prefix` and, when `pca_changed`, `scaler.json` and
/// `pca.json` (nothing before the first PCA). An unchanged PCA is not rewritten: at
/// k = 295 its text is ~10 MB, most of a trickle epoch's cost.
pub fn write_models(
    store: &dyn OutputStore,
    prefix: &str,
    epoch: crate::record::Epoch,
    models: &crate::stats::Models,
    pca_changed: bool,
) -> Result<()> {
    let Some(pca) = &models.pca else {
        return Ok(());
    };
    if pca_changed {
        write_pca(store, prefix, epoch, models, pca)?;
    }
    let kmeans = json!({
        "epoch": epoch,
        "k": models.kmeans.centroids.len(),
        "counts": models.kmeans.weights,
        "centroids": models.kmeans.centroids,
        "centroids_pca": models.kmeans.projected_centroids(pca),
    });
    store.put(
        &format!("{prefix}kmeans.json"),
        &serde_json::to_vec(&kmeans)?,
    )?;
    Ok(())
}

fn write_pca(
    store: &dyn OutputStore,
    prefix: &str,
    epoch: crate::record::Epoch,
    models: &crate::stats::Models,
    pca: &crate::stats::PcaModel,
) -> Result<()> {
    store.put(
        &format!("{prefix}scaler.json"),
        &serde_json::to_vec(&pca.scaler)?,
    )?;
    let doc = json!({
        "epoch": epoch,
        "fitted_epoch": models.pca_epoch,
        "n": pca.n,
        "k": pca.k,
        "explained_variance_ratio": pca.explained_variance_ratio,
        "eigenvalues": pca.eigenvalues,
        "components": pca.components,
    });
    store.put(&format!("{prefix}pca.json"), &serde_json::to_vec(&doc)?)
}

/// Writes `models/*.json` (`scaler.json` and `pca.json` only when `pca_changed`),
/// `status.json` and, when `errors_changed`, `errors.csv` for a committed checkpoint
/// whose error records are `errors`.
pub fn publish(
    store: &dyn OutputStore,
    checkpoint: &Checkpoint,
    errors: &std::collections::BTreeMap<crate::record::ImageKey, crate::record::ErrorRecord>,
    errors_changed: bool,
    pca_changed: bool,
) -> Result<()> {
    let models = &checkpoint.models;
    write_models(store, "models/", checkpoint.epoch, models, pca_changed)?;
    if errors_changed {
        write_errors(store, errors.values())?;
    }
    store.put(
        "status.json",
        &serde_json::to_vec_pretty(&status(checkpoint))?,
    )?;
    Ok(())
}

fn write_errors<'a>(
    store: &dyn OutputStore,
    errors: impl Iterator<Item = &'a crate::record::ErrorRecord>,
) -> Result<()> {
    let mut csv = csv::Writer::from_writer(Vec::new());
    csv.write_record(["key", "kind", "reason", "epoch"])?;
    for e in errors {
        csv.write_record([
            e.key.0.as_str(),
            e.kind.as_str(),
            e.reason.as_str(),
            &e.epoch.to_string(),
        ])?;
    }
    store.put("errors.csv", &csv.into_inner()?)?;
    Ok(())
}
