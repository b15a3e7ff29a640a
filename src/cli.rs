//! The command line: subcommands and exit codes.
//!
//! Exit codes (README "Exit codes"): 0 all done; 1 something stays queued (retried next
//! run, nothing lost); 2 bad command line; 70 internal error; 73 the state directory cannot
//! be used; 75 another kkm-bridge holds the state directory; 78 bad config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, EndpointConfig};
use crate::pump::Pump;
use crate::store::{Store, StoreError};

pub const EXIT_OK: u8 = 0;
pub const EXIT_QUEUED: u8 = 1;
pub const EXIT_SOFTWARE: u8 = 70;
pub const EXIT_CANTCREAT: u8 = 73;
pub const EXIT_TEMPFAIL: u8 = 75;
pub const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "kkm-bridge",
    version,
    about = "Bridges the exchange methods of «Кассир 5» (directory, FTP, HTTP KKMTransfer) with back offices"
)]
pub struct Cli {
    /// The config file.
    #[arg(
        long,
        short = 'c',
        global = true,
        default_value = "kkm-bridge.toml",
        env = "KKM_BRIDGE_CONFIG"
    )]
    pub config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One pass over every link: move everything that is ready, then exit
    /// (0 all moved, 1 something stays queued).
    Sync {
        /// Print what would be moved; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The daemon: serve HTTP endpoints to tills, watch directories, move packages as
    /// they come, until SIGINT/SIGTERM (then finish what is in flight and exit 0).
    Run,
    /// Check the config and exit (0 good, 78 bad).
    Validate,
}

pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Loads the config or reports why not.
pub fn load_config(path: &std::path::Path) -> Result<Config, u8> {
    match Config::load(path) {
        Ok(c) => {
            for w in &c.warnings {
                tracing::warn!("{w}");
            }
            Ok(c)
        }
        Err(e) => {
            eprintln!("kkm-bridge: config error: {e}");
            Err(EXIT_CONFIG)
        }
    }
}

/// Opens the store or reports why not.
pub fn open_store(config: &Config) -> Result<Arc<Store>, u8> {
    match Store::open(&config.state_dir) {
        Ok(s) => Ok(Arc::new(s)),
        Err(e @ StoreError::Locked { .. }) => {
            eprintln!("kkm-bridge: {e}");
            Err(EXIT_TEMPFAIL)
        }
        Err(e) => {
            eprintln!("kkm-bridge: {e}");
            Err(EXIT_CANTCREAT)
        }
    }
}

pub fn main_with(cli: Cli) -> ExitCode {
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kkm-bridge: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_SOFTWARE);
        }
    };
    let code = rt.block_on(async move {
        match cli.command {
            Command::Sync { dry_run } => sync(&cli.config, dry_run).await,
            Command::Run => run(&cli.config).await,
            Command::Validate => match load_config(&cli.config) {
                Ok(c) => {
                    println!(
                        "{}: ok ({} endpoint(s), {} link(s))",
                        c.file.display(),
                        c.endpoints.len(),
                        c.links.len()
                    );
                    EXIT_OK
                }
                Err(code) => code,
            },
        }
    });
    ExitCode::from(code)
}

/// `kkm-bridge sync`: one pass, waiting once for files still being written.
pub async fn sync(config_path: &std::path::Path, dry_run: bool) -> u8 {
    let config = match load_config(config_path) {
        Ok(c) => Arc::new(c),
        Err(code) => return code,
    };
    let store = match open_store(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let pump = match Pump::new(config.clone(), store.clone()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kkm-bridge: {e:#}");
            return EXIT_CONFIG;
        }
    };
    let progress = indicatif::ProgressBar::new_spinner();
    progress.set_message("sync: scanning sources");
    progress.enable_steady_tick(Duration::from_millis(120));
    let mut report = pump.pass(dry_run).await;
    if report.waiting > 0 && !dry_run {
        // Files still being written (or seen once on FTP): wait out the settle time / poll
        // interval once, then look again.
        let settle = config
            .endpoints
            .values()
            .filter_map(|e| match e {
                EndpointConfig::Dir(d) => Some(d.settle),
                // FTP takes a file when two listings show the same size: look again
                // after one poll interval.
                EndpointConfig::Ftp(f) => Some(f.poll),
                _ => None,
            })
            .max()
            .unwrap_or_default()
            .min(Duration::from_secs(30));
        progress.set_message(format!(
            "sync: {} file(s) still being written; waiting {:?}",
            report.waiting, settle
        ));
        tokio::time::sleep(settle + Duration::from_millis(50)).await;
        let again = pump.pass(false).await;
        report.taken += again.taken;
        report.delivered += again.delivered;
        report.waiting = again.waiting;
        report.queued = again.queued;
        report.errors = again.errors;
    }
    progress.finish_and_clear();
    if dry_run {
        for p in &report.planned {
            println!("would {p}");
        }
        if report.planned.is_empty() {
            println!("nothing to move");
        }
        return EXIT_OK;
    }
    let counts = store.counts(None).unwrap_or_default();
    tracing::info!(
        taken = report.taken,
        delivered = report.delivered,
        waiting_files = report.waiting,
        queued = report.queued,
        in_store = counts.queued,
        "sync done"
    );
    if report.all_moved() {
        EXIT_OK
    } else {
        if report.waiting > 0 {
            eprintln!(
                "kkm-bridge: {} file(s) are still being written; the next sync takes them",
                report.waiting
            );
        }
        if report.queued > 0 {
            eprintln!(
                "kkm-bridge: {} package(s) stay queued (destination busy or failing); they are kept and retried next run",
                report.queued
            );
        }
        EXIT_QUEUED
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `kkm-bridge run`: the daemon (see [`crate::watch`]).
pub async fn run(config_path: &std::path::Path) -> u8 {
    let config = match load_config(config_path) {
        Ok(c) => Arc::new(c),
        Err(code) => return code,
    };
    let store = match open_store(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    // A fresh install: the folders of directory endpoints may not exist yet.
    for (name, ec) in &config.endpoints {
        if let EndpointConfig::Dir(d) = ec {
            if !d.path.exists() {
                match std::fs::create_dir_all(&d.path) {
                    Ok(()) => {
                        tracing::warn!(endpoint = %name, path = %d.path.display(), "the folder did not exist; created it")
                    }
                    Err(e) => {
                        tracing::error!(endpoint = %name, path = %d.path.display(), "the folder does not exist and cannot be created: {e}")
                    }
                }
            }
        }
    }
    let pump = match Pump::new(config.clone(), store.clone()) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("kkm-bridge: {e:#}");
            return EXIT_CONFIG;
        }
    };
    let daemon = crate::watch::Daemon::new(pump.clone());
    let listeners = crate::watch::bind_http(&pump).await;
    let (stop_tx, shutdown) = crate::watch::Shutdown::new();
    tokio::spawn(async move {
        stop_signal().await;
        tracing::info!("stopping: finishing what is in flight");
        let _ = stop_tx.send(true);
    });
    tracing::info!(
        endpoints = pump.endpoints.len(),
        links = config.links.len(),
        state_dir = %config.state_dir.display(),
        "kkm-bridge running; stop with Ctrl-C or SIGTERM"
    );
    crate::watch::run(daemon, listeners, shutdown).await;
    tracing::info!("stopped");
    EXIT_OK
}
