//! Command-line interface. `-w/-n/-p/-h` are timely's own flags (so `-h` is the
//! hostfile and help is `--help` only).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// fruits-flow: embeddings, standardized PCA and online KMeans over a growing archive of
/// fruit photos (Fruits-360 layout: <root>/<Label>/<image>.jpg), as a streaming
/// timely/differential dataflow that never recomputes what it has already seen.
#[derive(Parser, Debug)]
#[command(
    name = "fruits-flow",
    version,
    disable_help_flag = true,
    disable_help_subcommand = true
)]
pub struct Cli {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help, global = true)]
    pub help: Option<bool>,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Ingest the archive: embed new images, update statistics, write outputs. Tails the
    /// source for new folders and images until Ctrl-C, or stops after one pass with --once.
    Run(RunArgs),
    /// Write one consistent table (CSV and optionally Parquet, to local files or s3://
    /// objects) from stored embeddings and the current models, without running the model.
    Export(ExportArgs),
    /// Print the state of an output: images, labels, errors, PCA and KMeans.
    Status(StatusArgs),
    /// Name the fruit in photos with the current models of an output: top labels with
    /// scores and the nearest cluster.
    Classify(ClassifyArgs),
    /// HTTP endpoint over an output's live models: GET / (the web page: map of the
    /// archive, charts, try a photo), POST /classify (a JPEG, PNG or WebP photo), GET /status,
    /// GET /metrics. Follows the running dataflow without restarts.
    Serve(ServeArgs),
    /// Draw the state of an output: explained variance, PC1×PC2 by label and by
    /// cluster, images per label over time (PNG), and the web page `serve` answers as one
    /// self-contained HTML file (t-SNE map, charts, cluster × label table).
    Report(ReportArgs),
    /// Rebuild every statistic from the stored embeddings (no model runs), check the
    /// moments against the streamed state, and write the rebuilt models to OUT/replay/.
    Replay(ReplayArgs),
}

/// Timely's cluster flags.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Worker threads per process.
    #[arg(short = 'w', long = "workers")]
    pub workers: Option<usize>,
    /// Number of processes in the cluster.
    #[arg(short = 'n', long = "processes", default_value_t = 1)]
    pub processes: usize,
    /// Index of this process (0..n-1).
    #[arg(short = 'p', long = "process", default_value_t = 0)]
    pub process: usize,
    /// Hostfile: one host:port per line, line i is process i (timely's -h).
    #[arg(short = 'h', long = "hostfile", conflicts_with = "cluster")]
    pub hostfile: Option<PathBuf>,
    /// cluster.toml: hosts and pipeline settings.
    #[arg(long = "cluster")]
    pub cluster: Option<PathBuf>,
    /// Log every link to another cluster process as it is made.
    #[arg(long)]
    pub report: bool,
}

/// Where S3 lives (all also settable in `[s3]` and by AWS_* variables).
#[derive(Args, Debug, Clone, Default)]
pub struct S3Args {
    /// Endpoint of an S3-compatible server (MinIO, Garage, Ceph); AWS_ENDPOINT_URL also works.
    #[arg(long = "s3-endpoint", value_name = "URL")]
    pub endpoint: Option<String>,
    /// Use path-style addressing (endpoint/bucket/key), as self-hosted servers need.
    #[arg(long = "s3-path-style")]
    pub path_style: bool,
}

impl S3Args {
    /// Applies the flags over the file's `[s3]` section.
    pub fn apply(&self, s3: &mut fruits_dataflows::io::S3Config) {
        if let Some(e) = &self.endpoint {
            s3.endpoint = Some(e.clone());
        }
        s3.path_style |= self.path_style;
    }
}

/// Arguments of `run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub s3: S3Args,
    /// Archive root: a directory or s3://bucket/prefix with one folder per label.
    #[arg(long, default_value = "tests/fixtures/fruits")]
    pub source: String,
    /// Output directory or s3://bucket/prefix (a restart on the same one resumes).
    #[arg(long, default_value = "out")]
    pub output: String,
    /// Ingest what is present, finish the statistics, write the outputs and exit.
    #[arg(long)]
    pub once: bool,
    /// Pipeline settings file (the stage sections of cluster.toml), when not using --cluster.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// ONNX model file (overrides [embed] model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Also serve POST /classify, GET /status and GET /metrics on this address
    /// (process 0 only), following the models as epochs commit.
    #[arg(long, value_name = "ADDR")]
    pub serve: Option<std::net::SocketAddr>,
}

/// Where an output is and how to reach it (for commands that read one).
#[derive(Args, Debug)]
pub struct OutputArgs {
    #[command(flatten)]
    pub s3: S3Args,
    /// Settings file ([s3], [pca], [kmeans], [classify] sections; cluster.toml works).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output of a run (directory or s3://bucket/prefix).
    #[arg(long, default_value = "out")]
    pub output: String,
}

/// Arguments of `classify`.
#[derive(Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Photos to classify: JPEG (EXIF orientation applied), PNG or WebP.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Labels to print per image (overrides [classify] top).
    #[arg(long)]
    pub top: Option<usize>,
    /// ONNX model file (default: the one the output was built with).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// ONNX model file (default: the one the output was built with).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Recompute the page's map at most every this many seconds (each recompute reads
    /// every live row once, then runs t-SNE on the sample).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub map_every: f64,
    /// Points on the page's map at most (a stable sample of the live images).
    #[arg(long, default_value_t = crate::web::MAX_POINTS)]
    pub map_points: usize,
}

/// Arguments of `report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    #[command(flatten)]
    pub out: OutputArgs,
    /// HTML page to write; the PNG files go beside it.
    #[arg(long, default_value = "report/index.html")]
    pub html: PathBuf,
}

/// Arguments of `replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub s3: S3Args,
    /// Settings file with an [s3] section.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output of a run (directory or s3://bucket/prefix).
    #[arg(long)]
    pub output: String,
    /// CSV to write, a local path or s3://bucket/key: path,label,cluster,pc1..pck.
    #[arg(long, value_name = "DEST")]
    pub csv: String,
    /// Parquet to write, a local path or s3://bucket/key: path,label,features,pca_features,cluster.
    #[arg(long, value_name = "DEST")]
    pub parquet: Option<String>,
}

/// Arguments of `status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub s3: S3Args,
    /// Settings file with an [s3] section.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output of a run (directory or s3://bucket/prefix).
    #[arg(long)]
    pub output: String,
    /// Print one JSON object (the default is a short human summary).
    #[arg(long)]
    pub json: bool,
}
