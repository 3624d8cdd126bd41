//! cluster.toml: the hosts of the cluster and the pipeline's stage settings, loaded into
//! one typed config; and the translation of timely's flags into a timely::Config.

use crate::cli::ClusterArgs;
use anyhow::{Context, Result};
use fruits_dataflows::PipelineConfig;
use serde::Deserialize;
use std::path::Path;

/// `[cluster]`: where the processes run.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// `host:port` of each process, in process order.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Default worker threads per process (-w overrides).
    pub workers: Option<usize>,
    /// Seconds a process may go unheard before the others give up on it (stopped,
    /// hung or unreachable) and exit for a restart. Default 60.
    pub liveness_timeout_s: Option<u64>,
    /// Seconds a starting process waits for every other one to be linked before it names
    /// the missing ones and exits for a restart. Default 60; 0 waits forever.
    pub connect_timeout_s: Option<u64>,
}

impl ClusterSection {
    /// How long a starting process waits for the others (None: forever).
    pub fn connect_timeout(&self) -> Option<std::time::Duration> {
        match self.connect_timeout_s.unwrap_or(60) {
            0 => None,
            s => Some(std::time::Duration::from_secs(s)),
        }
    }
}

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Hosts.
    #[serde(default)]
    pub cluster: ClusterSection,
    /// Stage settings.
    #[serde(flatten)]
    pub pipeline: PipelineConfig,
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config: FileConfig =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    config
        .pipeline
        .validate()
        .with_context(|| format!("in {}", path.display()))?;
    Ok(config)
}

/// Worker threads per process: `-w`, else `[cluster] workers`, else 1.
pub fn workers(args: &ClusterArgs, file: &FileConfig) -> usize {
    args.workers.or(file.cluster.workers).unwrap_or(1).max(1)
}

/// Builds timely's configuration from the flags, the hostfile or cluster.toml.
pub fn timely_config(args: &ClusterArgs, file: &FileConfig) -> Result<timely::Config> {
    let workers = workers(args, file);
    anyhow::ensure!(
        args.process < args.processes,
        "-p {} must be below -n {}",
        args.process,
        args.processes
    );
    let communication = if args.processes > 1 {
        let addresses = addresses(args, file)?;
        timely::CommunicationConfig::Cluster {
            threads: workers,
            process: args.process,
            addresses,
            report: args.report,
            zerocopy: false,
        }
    } else if workers > 1 {
        timely::CommunicationConfig::Process(workers)
    } else {
        timely::CommunicationConfig::Thread
    };
    Ok(timely::Config {
        communication,
        worker: timely::WorkerConfig::default(),
    })
}

/// The `host:port` of every process: from the hostfile, cluster.toml, or localhost.
pub fn addresses(args: &ClusterArgs, file: &FileConfig) -> Result<Vec<String>> {
    {
        let addresses = if let Some(hostfile) = &args.hostfile {
            let text = std::fs::read_to_string(hostfile)
                .with_context(|| format!("reading hostfile {}", hostfile.display()))?;
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        } else if !file.cluster.hosts.is_empty() {
            file.cluster.hosts.clone()
        } else {
            (0..args.processes)
                .map(|i| format!("localhost:{}", 2101 + i))
                .collect::<Vec<_>>()
        };
        anyhow::ensure!(
            addresses.len() >= args.processes,
            "{} processes need {} host addresses, found {}",
            args.processes,
            args.processes,
            addresses.len()
        );
        Ok(addresses[..args.processes].to_vec())
    }
}
