//! The fruits-flow binary: parse the command line, load the config, run the command;
//! print the error chain and set the exit code on failure.

mod cli;
mod config;
mod export;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, RunArgs};
use fruits_dataflows::RunOptions;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run(args) => run(args),
        Command::Export(args) => {
            let s3 = s3_config(args.config.as_deref(), &args.s3)?;
            let n = export::export(&args.output, &s3, &args.csv, args.parquet.as_deref())?;
            eprintln!("Exported {n} rows to {}.", args.csv.display());
            Ok(())
        }
        Command::Status(args) => {
            let s3 = s3_config(args.config.as_deref(), &args.s3)?;
            let status = export::status_json(&args.output, &s3)?;
            if args.json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&status)?);
            }
            Ok(())
        }
    }
}

fn s3_config(
    path: Option<&std::path::Path>,
    flags: &cli::S3Args,
) -> Result<fruits_dataflows::io::S3Config> {
    let mut s3 = match path {
        Some(p) => config::load(p)?.pipeline.s3,
        None => Default::default(),
    };
    flags.apply(&mut s3);
    Ok(s3)
}

fn run(args: RunArgs) -> Result<()> {
    let file = match args.cluster.cluster.as_deref().or(args.config.as_deref()) {
        Some(path) => config::load(path)?,
        None => config::FileConfig::default(),
    };
    let mut pipeline = file.pipeline.clone();
    args.s3.apply(&mut pipeline.s3);
    if let Some(model) = &args.model {
        pipeline.embed.model = model.clone();
    }
    pipeline.validate()?;
    if !pipeline.embed.model.exists() {
        anyhow::bail!(
            "model file {} does not exist; create it with `{}` (see README, setup)",
            pipeline.embed.model.display(),
            fruits_dataflows::embed::EXPORT_COMMAND
        );
    }
    let timely = config::timely_config(&args.cluster, &file)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
        eprintln!("Stopping after the current epoch (Ctrl-C again to abort).");
    })
    .context("installing the Ctrl-C handler")?;
    let options = RunOptions {
        source: args.source,
        output: args.output,
        once: args.once,
        stop,
        pipeline,
    };
    let guards = timely::execute(timely, move |worker| {
        fruits_dataflows::run_worker(worker, &options)
            .map_err(|e| format!("worker {}: {e:#}", worker.index()))
    })
    .map_err(|e| anyhow::anyhow!("starting timely: {e}"))?;
    for result in guards.join() {
        result
            .map_err(|e| anyhow::anyhow!(e))?
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(())
}
