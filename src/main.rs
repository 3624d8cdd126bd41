//! The fruits-flow binary: parse the command line, load the config, run the command;
//! print the error chain and set the exit code on failure.

mod classify;
mod cli;
mod config;
mod export;
mod report;
mod serve;
mod web;

// mimalloc keeps freed tensor buffers for reuse; glibc's malloc returned the large ones
// to the OS after every model run (mmap/munmap and page faults per image).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc 3 keeps freed memory for a second before returning it to the OS; the
/// statistics stage's transient d x d matrices (PCA, moment merges: tens of MB each)
/// then overlap in RSS. Ten milliseconds (mimalloc 2's default) still keeps buffers
/// freed and reallocated within a model run, and brought `run --once -w 2` from about
/// 490 MB to 430 MB at no measurable cost in time. An explicit `MIMALLOC_PURGE_DELAY`
/// wins.
///
/// `replay` is the exception: it decodes one Parquet file after another on every core,
/// and purging each file's buffers at once made it fault the same pages back in for every
/// file (a sixth of its time). It keeps them for 250 ms, with no purge sweep.
fn tune_allocator(command: &Command) {
    // `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (include/mimalloc.h).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    let (delay, sweep) = match command {
        Command::Replay(_) => (250, false),
        _ => (10, true),
    };
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads it at each purge.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, delay) };
    }
    if sweep {
        spawn_purge_sweep();
    }
}

/// mimalloc runs a delayed purge only when some later page is freed, and it visits a
/// quarter of the arenas each time, so freed memory can stay resident for the rest of a
/// run: three of four 250k-image `run --once` stepped from ~300 MB to 508-516 MB and never
/// came back down, while the live heap (heaptrack) grew smoothly, and purging at once
/// (`MIMALLOC_PURGE_DELAY=0`) peaked at 365 MB but ran 5 % slower. A forced collect once
/// a second purges every arena's expired ranges (mimalloc's arena purge is process-wide;
/// this thread's own heap is empty), keeping the 10 ms delay's speed inside a model run.
fn spawn_purge_sweep() {
    let spawned = std::thread::Builder::new()
        .name("allocator purge".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            // SAFETY: mi_collect takes no pointers; it is safe from any thread.
            unsafe { libmimalloc_sys::mi_collect(true) };
        });
    // Before the log subscriber exists, so straight to stderr.
    if let Err(e) = spawned {
        eprintln!("warning: no allocator purge thread ({e}); memory may stay resident longer");
    }
}

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, RunArgs};
use fruits_dataflows::RunOptions;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn main() {
    let cli = Cli::parse();
    tune_allocator(&cli.command);
    fruits_dataflows::embed::no_transparent_huge_pages();
    fruits_dataflows::embed::return_freed_native_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
            eprintln!("Exported {n} rows to {}.", args.csv);
            Ok(())
        }
        Command::Classify(args) => {
            let (s3, pipeline) = settings(&args.out)?;
            classify::run(&args, &s3, pipeline.classify)
        }
        Command::Serve(args) => {
            let (s3, pipeline) = settings(&args.out)?;
            let mut options = serve_options(
                &args.out.output,
                s3,
                args.listen,
                pipeline,
                args.model.clone(),
            );
            options.map.every = std::time::Duration::from_secs_f64(args.map_every.max(0.0));
            options.map.points = args.map_points.max(1);
            serve::serve(options, Arc::new(AtomicBool::new(false)))
        }
        Command::Report(args) => {
            let (s3, pipeline) = settings(&args.out)?;
            let store = fruits_dataflows::sink::open(&args.out.output, &s3)?;
            let report = report::report(store.as_ref(), &args.html, pipeline.pca.variance)?;
            for png in &report.pngs {
                eprintln!("Wrote {}.", png.display());
            }
            if let Some(seconds) = report.tsne_seconds {
                eprintln!("t-SNE of the map: {seconds:.1} s.");
            }
            eprintln!("Wrote {}.", report.html.display());
            Ok(())
        }
        Command::Replay(args) => {
            let (s3, pipeline) = settings(&args.out)?;
            replay(&args.out.output, &s3, &pipeline)
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

/// The pipeline settings of a command that reads an output (from `path`, or the
/// defaults), with the S3 flags applied.
fn pipeline_settings(
    path: Option<&std::path::Path>,
    flags: &cli::S3Args,
) -> Result<fruits_dataflows::PipelineConfig> {
    let mut pipeline = match path {
        Some(p) => config::load(p)?.pipeline,
        None => Default::default(),
    };
    flags.apply(&mut pipeline.s3);
    Ok(pipeline)
}

fn s3_config(
    path: Option<&std::path::Path>,
    flags: &cli::S3Args,
) -> Result<fruits_dataflows::io::S3Config> {
    Ok(pipeline_settings(path, flags)?.s3)
}

/// [`pipeline_settings`] for the commands that take [`cli::OutputArgs`].
fn settings(
    out: &cli::OutputArgs,
) -> Result<(
    fruits_dataflows::io::S3Config,
    fruits_dataflows::PipelineConfig,
)> {
    let pipeline = pipeline_settings(out.config.as_deref(), &out.s3)?;
    Ok((pipeline.s3.clone(), pipeline))
}

fn serve_options(
    output: &str,
    s3: fruits_dataflows::io::S3Config,
    listen: std::net::SocketAddr,
    pipeline: fruits_dataflows::PipelineConfig,
    model: Option<std::path::PathBuf>,
) -> serve::ServeOptions {
    serve::ServeOptions {
        output: output.to_string(),
        map: web::MapOptions::new(pipeline.pca.variance, s3.clone()),
        s3,
        listen,
        classify: pipeline.classify,
        model,
        max_body: 10 << 20,
        concurrency: 2,
        timeout: std::time::Duration::from_secs(30),
        reload_every: std::time::Duration::from_secs(1),
    }
}

fn replay(
    output: &str,
    s3: &fruits_dataflows::io::S3Config,
    pipeline: &fruits_dataflows::PipelineConfig,
) -> Result<()> {
    let store = fruits_dataflows::sink::open(output, s3)?;
    let started = std::time::Instant::now();
    let r = fruits_dataflows::replay::replay(store.as_ref(), &pipeline.pca, &pipeline.kmeans)?;
    let total = started.elapsed().as_secs_f64();
    let n = r.images as f64;
    println!("images: {}", r.images);
    println!(
        "read stored embeddings: {:.3} s ({:.0} images/s)",
        r.read_s,
        n / r.read_s.max(1e-9)
    );
    println!(
        "exact moments: {:.3} s ({:.0} images/s)",
        r.moments_s,
        n / r.moments_s.max(1e-9)
    );
    println!("PCA fit (eigendecomposition, fixed cost): {:.3} s", r.pca_s);
    println!(
        "KMeans fit: {:.3} s ({})",
        r.kmeans_s,
        if r.single_pass {
            "folded in the same pass, under the PCA of the streamed moments, which the rebuilt ones equal"
        } else {
            "a second pass, under the refitted PCA"
        }
    );
    println!(
        "total: {:.3} s ({:.0} images/s)",
        total,
        n / total.max(1e-9)
    );
    let verdict = |identical: bool| if identical { "yes, bit for bit" } else { "NO" };
    println!(
        "moments equal to the streamed state: {}",
        verdict(r.moments_identical)
    );
    println!(
        "per-label statistics ({} labels) equal to the streamed state: {}",
        r.labels.len(),
        verdict(r.labels_identical)
    );
    if let Some(pca) = &r.models.pca {
        println!(
            "PCA: k = {} ({:.2} % variance)",
            pca.k,
            pca.explained_variance() * 100.0
        );
        fruits_dataflows::sink::models::write_models(
            store.as_ref(),
            "replay/models/",
            r.checkpoint.epoch,
            &r.models,
            true,
        )?;
        println!(
            "wrote {}/replay/models/{{scaler,pca,kmeans}}.json",
            store.location()
        );
    }
    anyhow::ensure!(
        r.moments_identical,
        "the rebuilt moments differ from the streamed state"
    );
    anyhow::ensure!(
        r.labels_identical,
        "the rebuilt per-label statistics differ from the streamed state"
    );
    Ok(())
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
    if pipeline.embed.backend == fruits_dataflows::embed::Backend::Onnxruntime
        && !cfg!(feature = "onnxruntime")
    {
        anyhow::bail!(
            "[embed] backend = \"onnxruntime\" needs a build with the onnxruntime feature: \
             cargo build --release --features onnxruntime"
        );
    }
    if !pipeline.embed.model.exists() {
        anyhow::bail!(
            "model file {} does not exist; create it with `{}` (see README, setup)",
            pipeline.embed.model.display(),
            fruits_dataflows::embed::EXPORT_COMMAND
        );
    }
    let timely = config::timely_config(&args.cluster, &file)?;
    let cluster = if args.cluster.processes > 1 {
        let cluster = fruits_dataflows::liveness::Cluster {
            hosts: config::addresses(&args.cluster, &file)?,
            process: args.cluster.process,
            command: std::env::args().collect::<Vec<_>>().join(" "),
        };
        fruits_dataflows::liveness::install_panic_hook(cluster.clone());
        Some(cluster)
    } else {
        None
    };
    let liveness = cluster.clone().map(|cluster| {
        let timeout = file.cluster.liveness_timeout_s.unwrap_or(60).max(1);
        fruits_dataflows::liveness::Watch::new(cluster, std::time::Duration::from_secs(timeout))
    });
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
        single_process: args.cluster.processes == 1,
        workers: config::workers(&args.cluster, &file),
        liveness,
    };
    if let Some(listen) = args.serve.filter(|_| args.cluster.process == 0) {
        let endpoint = serve_options(
            &options.output,
            options.pipeline.s3.clone(),
            listen,
            options.pipeline.clone(),
            args.model.clone(),
        );
        // The endpoint lives as long as the run: the process exit ends it.
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::Builder::new()
            .name("serve".into())
            .spawn(move || {
                if let Err(e) = serve::serve(endpoint, stop) {
                    tracing::error!(stage = "serve", error = %format!("{e:#}"), "The HTTP endpoint stopped.");
                }
            })
            .context("starting the HTTP endpoint")?;
    }
    let summary = (args.once && args.cluster.process == 0)
        .then(|| (options.output.clone(), options.pipeline.s3.clone()));
    let work = move |worker: &mut timely::worker::Worker| {
        fruits_dataflows::run_worker(worker, &options)
            .map_err(|e| format!("worker {}: {e:#}", worker.index()))
    };
    let guards = match (&cluster, timely.communication) {
        // The processes link up themselves, so that a missing one is named (startup.rs).
        (
            Some(cluster),
            timely::CommunicationConfig::Cluster {
                threads, report, ..
            },
        ) => fruits_dataflows::startup::execute(
            cluster,
            threads,
            file.cluster.connect_timeout(),
            report,
            timely.worker,
            work,
        )?,
        (_, communication) => timely::execute(
            timely::Config {
                communication,
                worker: timely.worker,
            },
            work,
        )
        .map_err(|e| anyhow::anyhow!("starting timely: {e}"))?,
    };
    for result in guards.join() {
        result
            .map_err(|e| anyhow::anyhow!(e))?
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    if let Some((output, s3)) = summary {
        print_summary(&output, &s3)?;
    }
    Ok(())
}

/// What `run --once` leaves a new user with: what is in the output and what to run next.
fn print_summary(output: &str, s3: &fruits_dataflows::io::S3Config) -> Result<()> {
    let store = fruits_dataflows::sink::open(output, s3)?;
    let c = fruits_dataflows::state::load_committed(store.as_ref())?;
    let pca = c
        .models
        .pca
        .as_ref()
        .map_or("no PCA yet (fewer than two images)".to_string(), |p| {
            format!(
                "PCA k = {} ({:.1} % of the variance)",
                p.k,
                100.0 * p.explained_variance()
            )
        });
    println!(
        "\nDone: {} images in {} labels, {} errors{}; epoch {}.",
        c.images(),
        c.labels.values().filter(|s| s.n > 0).count(),
        c.errors,
        if c.errors > 0 {
            format!(" (see {output}/errors.csv)")
        } else {
            String::new()
        },
        c.epoch
    );
    println!(
        "{pca}; KMeans k = {}; embeddings by {} at {}x{} ({:?}).",
        c.models.kmeans.centroids.len(),
        c.embed.model.display(),
        c.embed.input_size,
        c.embed.input_size,
        c.embed.backend
    );
    println!("Outputs in {output}: embeddings/ (Parquet), models/, status.json, errors.csv.");
    println!("Next:");
    let bin = "target/release/fruits-flow";
    println!("  {bin} classify --output {output} PHOTO.jpg        # name a fruit");
    println!(
        "  {bin} serve --output {output} --listen 127.0.0.1:8080   # web page, POST /classify"
    );
    println!("  {bin} report --output {output} --html report/index.html");
    Ok(())
}
