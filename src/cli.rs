//! The command line: subcommands and exit codes.
//!
//! Exit codes (README "Exit codes"): 0 all done; 1 something stays queued (retried next
//! run, nothing lost); 2 bad command line; 70 internal error; 73 the state directory cannot
//! be used; 75 another kkm-bridge holds the state directory; 78 bad config.
//! `unpack`: 65 the input is not a package (EX_DATAERR), 66 it cannot be read (EX_NOINPUT).
//! `check`: 69 an endpoint cannot be reached (EX_UNAVAILABLE).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, EndpointConfig};
use crate::pump::Pump;
use crate::store::{Store, StoreError};

pub const EXIT_OK: u8 = 0;
pub const EXIT_QUEUED: u8 = 1;
pub const EXIT_DATAERR: u8 = 65;
pub const EXIT_NOINPUT: u8 = 66;
pub const EXIT_UNAVAILABLE: u8 = 69;
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
    /// Check the config and reach every endpoint once; one line per endpoint
    /// (0 all reachable, 69 an endpoint is not, 78 bad config).
    Check,
    /// The per-till view: last contact, last package each direction, queue, oldest waiting
    /// package. Reads the journal; works while `run` is running.
    Status {
        /// Print JSON (the same data as /status.json) for scripts.
        #[arg(long)]
        json: bool,
        /// Order of the till table.
        #[arg(long, value_enum, default_value_t = crate::status::Sort::Lag)]
        sort: crate::status::Sort,
        /// Only this link.
        #[arg(long)]
        link: Option<String>,
        /// Only these tills ("7", "1-20") or tills whose link, file names or error contain this text.
        #[arg(long, short = 'q')]
        filter: Option<String>,
    },
    /// What moved: one line per package with names, numbers, size and sha256.
    /// Reads the journal; works while `run` is running.
    Journal {
        /// Only this till.
        #[arg(long)]
        pos: Option<u32>,
        /// From this date or time on (2026-01-01 = UTC midnight, or RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Before this time; a bare date includes that whole day.
        #[arg(long)]
        until: Option<String>,
        /// Only this link.
        #[arg(long)]
        link: Option<String>,
        /// Only this kind.
        #[arg(long, value_parser = ["spr", "flr", "rep"])]
        kind: Option<String>,
        /// At most this many rows (the oldest first).
        #[arg(long)]
        limit: Option<u64>,
        /// Print one JSON array, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Write a commented starter config (refuses to overwrite without --force).
    Init {
        /// Where to write it (default: the --config path; "-" = stdout).
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the ReceiveData JSON a till would get for FILE (ZIP + base64, 1C style).
    Pack {
        file: PathBuf,
        /// packagetype: spr (price list) or flr (re-upload request).
        #[arg(long, default_value = "spr", value_parser = ["spr", "flr"])]
        kind: String,
        /// UID attribute (flr; a new one is made for flr when not given).
        #[arg(long)]
        uid: Option<String>,
    },
    /// Turn ReceiveData JSON or a SendData body (base64, wrapped or not, zipped or not)
    /// back into the file (exit 65 when the input is not a package).
    Unpack {
        /// The input ("-" or nothing = stdin).
        input: Option<PathBuf>,
        /// Where to write the file (default stdout).
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
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
    // A one-shot `sync` is I/O-bound on a few connections: one thread drives them all and
    // saves the cross-thread wake-up of a worker per socket event (about 5% of a 1,000
    // package FTP delivery, alternating A/B runs). The daemon serves HTTP too, on every
    // core. Blocking work (journal, files) goes to the blocking pool either way.
    let rt = match cli.command {
        Command::Sync { .. } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build();
    let rt = match rt {
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
            Command::Check => check(&cli.config).await,
            Command::Status {
                json,
                sort,
                link,
                filter,
            } => status(
                &cli.config,
                json,
                crate::status::View {
                    sort,
                    q: filter,
                    link,
                    page: 1,
                    per_page: None,
                },
            ),
            Command::Journal {
                pos,
                since,
                until,
                link,
                kind,
                limit,
                json,
            } => journal(&cli.config, pos, since, until, link, kind, limit, json),
            Command::Init { output, force } => {
                init(output.as_deref().unwrap_or(&cli.config), force)
            }
            Command::Pack { file, kind, uid } => pack(&file, &kind, uid),
            Command::Unpack { input, output } => unpack(input.as_deref(), output.as_deref()),
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
        let wait = settle + Duration::from_millis(50);
        tracing::info!(
            waiting_files = report.waiting,
            wait_ms = wait.as_millis() as u64,
            "looking again in {wait:?} at files not complete yet (still being written, or seen on FTP only once)"
        );
        tokio::time::sleep(wait).await;
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
    if let Err(e) = store.prune_if_due(config.retention) {
        tracing::warn!("pruning the journal failed: {e}");
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
    if let Some(admin) = &config.admin {
        match tokio::net::TcpListener::bind(admin.listen).await {
            Ok(l) => {
                let state = crate::status::AdminState {
                    config: config.clone(),
                    store: store.clone(),
                    live: Some(pump.live.clone()),
                };
                tracing::info!(listen = %admin.listen, "status page at http://{}/status", admin.listen);
                tokio::spawn(crate::status::serve_admin(
                    l,
                    state,
                    shutdown.clone().wait(),
                ));
            }
            Err(e) => {
                tracing::error!(listen = %admin.listen, "cannot listen for the status page: {e}")
            }
        }
    }
    {
        // Journal retention: prune_if_due does the work at most once an hour.
        let (store, retention) = (store.clone(), config.retention);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            while !stop.is_set() {
                let s = store.clone();
                if let Ok(Err(e)) =
                    tokio::task::spawn_blocking(move || s.prune_if_due(retention)).await
                {
                    tracing::warn!("journal pruning failed: {e}");
                }
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
        });
    }
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
/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn out(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|_| o.flush());
}

/// `kkm-bridge check`: config, then every endpoint once.
pub async fn check(config_path: &Path) -> u8 {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!(
        "ok   config {}: {} endpoint(s), {} link(s)",
        config.file.display(),
        config.endpoints.len(),
        config.links.len()
    );
    let lines = crate::check::check_all(&config).await;
    for l in &lines {
        println!("{l}");
    }
    if lines.iter().all(|l| l.ok) {
        EXIT_OK
    } else {
        EXIT_UNAVAILABLE
    }
}

/// Opens the journal read-only (no lock: works while `run` holds the store).
fn open_read_only(config: &Config) -> Result<Store, u8> {
    Store::open_read_only(&config.state_dir).map_err(|e| {
        eprintln!("kkm-bridge: {e}");
        EXIT_CANTCREAT
    })
}

/// `kkm-bridge status`.
pub fn status(config_path: &Path, json: bool, view: crate::status::View) -> u8 {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store = match open_read_only(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let snap = match crate::status::Snapshot::load(&store, &config, None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kkm-bridge: {e}");
            return EXIT_CANTCREAT;
        }
    };
    if json {
        let mut snap = snap;
        let keep: std::collections::HashSet<(String, u32)> = snap
            .select(&view)
            .0
            .into_iter()
            .map(|t| (t.link.clone(), t.pos))
            .collect();
        let order: Vec<(String, u32)> = snap
            .select(&view)
            .0
            .into_iter()
            .map(|t| (t.link.clone(), t.pos))
            .collect();
        let mut by_key: std::collections::HashMap<(String, u32), crate::status::TillStatus> = snap
            .tills
            .drain(..)
            .filter(|t| keep.contains(&(t.link.clone(), t.pos)))
            .map(|t| ((t.link.clone(), t.pos), t))
            .collect();
        snap.tills = order.iter().filter_map(|k| by_key.remove(k)).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&snap).unwrap_or_default()
        );
    } else {
        print!("{}", snap.render_text(&view));
    }
    EXIT_OK
}

/// `kkm-bridge journal`.
#[allow(clippy::too_many_arguments)]
pub fn journal(
    config_path: &Path,
    pos: Option<u32>,
    since: Option<String>,
    until: Option<String>,
    link: Option<String>,
    kind: Option<String>,
    limit: Option<u64>,
    json: bool,
) -> u8 {
    use crate::journal::{is_date_only, parse_time};
    let parse = |flag: &str, s: &Option<String>| -> Result<Option<i64>, u8> {
        match s {
            None => Ok(None),
            Some(s) => match parse_time(s) {
                Ok(ms) => Ok(Some(if flag == "--until" && is_date_only(s) {
                    ms + 86_400_000
                } else {
                    ms
                })),
                Err(e) => {
                    eprintln!("kkm-bridge: {flag}: {e}");
                    Err(2)
                }
            },
        }
    };
    let (since, until) = match (parse("--since", &since), parse("--until", &until)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(c), _) | (_, Err(c)) => return c,
    };
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store = match open_read_only(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let filter = crate::journal::Filter {
        pos,
        link,
        kind: kind.as_deref().and_then(crate::package::Kind::parse),
        since,
        until,
        limit,
    };
    let rows = match store.with_conn(|c| crate::journal::query(c, &filter)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kkm-bridge: {e}");
            return EXIT_CANTCREAT;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
    } else if rows.is_empty() {
        println!("no packages match");
    } else {
        print!("{}", crate::journal::render_text(&rows));
    }
    EXIT_OK
}

/// The commented starter config `init` writes.
pub const STARTER_CONFIG: &str = include_str!("../examples/starter.toml");

/// `kkm-bridge init`.
pub fn init(output: &Path, force: bool) -> u8 {
    if output.as_os_str() == "-" {
        out(STARTER_CONFIG);
        return EXIT_OK;
    }
    if output.exists() && !force {
        eprintln!(
            "kkm-bridge: {} exists; not overwritten (use --force, or --output another file)",
            output.display()
        );
        return EXIT_CANTCREAT;
    }
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("kkm-bridge: cannot create {}: {e}", dir.display());
            return EXIT_CANTCREAT;
        }
    }
    match std::fs::write(output, STARTER_CONFIG) {
        Ok(()) => {
            println!(
                "wrote {}; edit it, then run `kkm-bridge validate --config {0}` and `kkm-bridge check --config {0}`",
                output.display()
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("kkm-bridge: cannot write {}: {e}", output.display());
            EXIT_CANTCREAT
        }
    }
}

/// The ReceiveData reply for a package, attributes in the vendor's order.
#[derive(Debug, serde::Serialize)]
pub struct ReceiveDataJson {
    pub data: String,
    pub errcode: String,
    pub errmessage: String,
    pub packagetype: String,
    #[serde(rename = "UID", skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// `kkm-bridge pack FILE`.
pub fn pack(file: &Path, kind: &str, uid: Option<String>) -> u8 {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kkm-bridge: cannot read {}: {e}", file.display());
            return EXIT_NOINPUT;
        }
    };
    let entry = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("{kind}.txt"));
    let uid = match (kind, uid) {
        (_, Some(u)) => Some(u),
        ("flr", None) => Some(crate::endpoint::new_uid()),
        _ => None,
    };
    let reply = ReceiveDataJson {
        data: crate::package::encode_zip_base64(&bytes, &entry),
        errcode: "0".into(),
        errmessage: String::new(),
        packagetype: kind.into(),
        uid,
    };
    out(&format!(
        "{}\n",
        serde_json::to_string_pretty(&reply).expect("plain strings serialize")
    ));
    EXIT_OK
}

/// Decodes ReceiveData JSON or a SendData body into the file's bytes.
pub fn unpack_bytes(input: &[u8]) -> Result<Vec<u8>, String> {
    const MAX: u64 = 1 << 30;
    let text = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
    let first = text.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        let v: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let errcode = match &v["errcode"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => "0".into(),
        };
        let data = v["data"]
            .as_str()
            .ok_or("the JSON has no \"data\" string attribute")?;
        if data.trim().is_empty() {
            return Err(format!(
                "no package in this reply (errcode {errcode:?}: {})",
                v["errmessage"].as_str().unwrap_or("")
            ));
        }
        crate::package::decode_package_data(data.as_bytes(), MAX).map_err(|e| e.to_string())
    } else {
        if first.is_none() {
            return Err("the input is empty".into());
        }
        crate::package::decode_package_data(text, MAX).map_err(|e| e.to_string())
    }
}

/// `kkm-bridge unpack [FILE|-] [--output OUT]`.
pub fn unpack(input: Option<&Path>, output: Option<&Path>) -> u8 {
    use std::io::{Read, Write};
    let (name, read) = match input.filter(|p| p.as_os_str() != "-") {
        Some(p) => (p.display().to_string(), std::fs::read(p)),
        None => {
            let mut b = Vec::new();
            (
                "stdin".to_string(),
                std::io::stdin().read_to_end(&mut b).map(|_| b),
            )
        }
    };
    let input = match read {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kkm-bridge: cannot read {name}: {e}");
            return EXIT_NOINPUT;
        }
    };
    let bytes = match unpack_bytes(&input) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kkm-bridge: {name}: not a package: {e}");
            return EXIT_DATAERR;
        }
    };
    let r = match output.filter(|p| p.as_os_str() != "-") {
        Some(p) => std::fs::write(p, &bytes).map_err(|e| format!("{}: {e}", p.display())),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)
                .and_then(|_| out.flush())
                .map_err(|e| format!("stdout: {e}"))
        }
    };
    match r {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("kkm-bridge: cannot write {e}");
            EXIT_CANTCREAT
        }
    }
}
