//! An FTP server (PROTOCOL.md §3): the `.$n` convention and the "FTP via 1C" single-file
//! mode, as the office side or the kassa side of a link.
//!
//! Reading: one `LIST -a` per pass; a file is complete when its size is the same in two
//! consecutive listings (FTP gives no reliable "closed" signal, and LIST times have minute
//! resolution), so a file is never taken on first sight: `sync` looks twice. Files are taken
//! per till and kind in numeric `.$n` order, never a higher number while a lower one is
//! still present; each is downloaded in binary mode into the spool, its byte count checked
//! against the listing, fsync'd and journaled, and only then DELE'd.
//!
//! Writing: one listing per pass; the next free `.$n` above the highest listed; upload to
//! `.kkm-bridge.<random>.tmp` (no reader matches a leading dot), check the transfer's final
//! reply and SIZE, journal the temp and final names, RNFR/RNTO, journal "delivered" — per
//! batch of one till's packages (`FtpEndpoint::deliver_batch`). A refused rename deletes
//! the temp file and leaves the package queued. Single-file mode writes only when the file
//! is absent or (spr) its line 2 is `@`. Up to `connections` sessions write at once, each
//! taking whole tills, so a till's packages are renamed into place in order.
//!
//! Connections: at most `connections` at a time, each logged in, `TYPE I`, in the directory
//! of the URL; every command and every transfer chunk has the `timeout`; a connection that
//! saw any error other than a plain negative reply is dropped, never reused. Failing to connect puts the endpoint in the
//! "unreachable" state with exponential backoff (1 s … 30 s); the state change is logged once
//! each way, and meanwhile passes report the endpoint as failing without touching anything.
//! A connection lost mid-operation is logged once and reconnected on the next use.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use suppaftp::tokio::AsyncRustlsConnector;
use suppaftp::types::FileType;
use suppaftp::FtpError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{DeliverReport, Role, Routes, TakeReport, WarnOnce};
use crate::config::FtpConfig;
use crate::failpoint::crash_point;
use crate::package::{is_temp_name, spr_marked_loaded, temp_name, Kind, NamePattern, Package};
use crate::store::Store;

/// The control connection: plain, or after `AUTH TLS` with protected data connections.
pub type AsyncFtpStream = suppaftp::tokio::AsyncRustlsFtpStream;

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const CHUNK: usize = 64 * 1024;
/// Uploads read spool files in chunks of this size.
const FILE_CHUNK: usize = 1 << 20;

/// Where to connect, from the endpoint's `url` (`ftp://user[:password]@host[:port]/dir`).
/// The directory is relative to the login directory, as in RFC 1738 and curl; write
/// `ftp://host/%2Fsrv/ftp` for an absolute one.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    password: String,
    pub dir: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

impl Target {
    /// Parses the URL; `secret` (password / password_env) wins over a password in the URL.
    pub fn parse(url: &str, secret: Option<&str>) -> Result<Target, String> {
        let rest = url
            .strip_prefix("ftp://")
            .ok_or_else(|| "must start with ftp://".to_string())?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, url_password) = match userinfo {
            None => ("anonymous".to_string(), None),
            Some(u) => match u.split_once(':') {
                Some((u, p)) => (percent_decode(u)?, Some(percent_decode(p)?)),
                None => (percent_decode(u)?, None),
            },
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| "unclosed '[' in the host".to_string())?;
            (h.to_string(), p.strip_prefix(':').unwrap_or(""))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p),
                None => (hostport.to_string(), ""),
            }
        };
        if host.is_empty() {
            return Err("has no host".into());
        }
        let port = if port.is_empty() {
            21
        } else {
            port.parse::<u16>()
                .map_err(|_| format!("port {port:?} is not a number 1-65535"))?
        };
        let dir = percent_decode(path.trim_end_matches('/'))?;
        let password = secret
            .map(str::to_string)
            .or(url_password)
            .unwrap_or_else(|| "anonymous@".to_string());
        Ok(Target {
            host,
            port,
            user,
            password,
            dir,
        })
    }

    /// The URL without the password, for logs and messages.
    pub fn display(&self) -> String {
        format!(
            "ftp://{}@{}:{}/{}",
            self.user, self.host, self.port, self.dir
        )
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// One file (or directory) in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    pub is_file: bool,
}

/// Parses one LIST line: POSIX `ls -l` style (vsftpd, pure-ftpd, proftpd, libunftp) or
/// DOS/IIS style. Returns None for lines that are neither (`total 12`).
pub fn parse_list_line(line: &str) -> Option<Entry> {
    let line = line.trim_end_matches(['\r', '\n']);
    let first = line.chars().next()?;
    if "-dlbcps".contains(first) && line.len() > 10 {
        // perms links owner group size month day time|year name
        let mut rest = line;
        let mut fields = Vec::with_capacity(8);
        for _ in 0..8 {
            rest = rest.trim_start_matches(' ');
            let end = rest.find(' ')?;
            fields.push(&rest[..end]);
            rest = &rest[end..];
        }
        // Exactly one separating space is consumed; a name may start with spaces only on
        // exotic servers, which we do not support.
        let name = rest.trim_start_matches(' ');
        let size = fields[4].parse().ok()?;
        if name.is_empty() {
            return None;
        }
        let name = if first == 'l' {
            name.split(" -> ").next().unwrap_or(name)
        } else {
            name
        };
        return Some(Entry {
            name: name.to_string(),
            size,
            is_file: first == '-',
        });
    }
    // 01-02-24  10:20AM       <DIR>          name   /   01-02-24  10:20AM   1234 name
    let mut it = line.split_whitespace();
    let date = it.next()?;
    let time = it.next()?;
    if !(date.contains('-') && time.contains(':')) {
        return None;
    }
    let third = it.next()?;
    let pos = line.find(third)? + third.len();
    let name = line[pos..].trim_start();
    if name.is_empty() {
        return None;
    }
    if third == "<DIR>" {
        return Some(Entry {
            name: name.into(),
            size: 0,
            is_file: false,
        });
    }
    Some(Entry {
        name: name.into(),
        size: third.replace(',', "").parse().ok()?,
        is_file: true,
    })
}

/// Why an FTP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FtpFail {
    /// Cannot connect or log in (or waiting out the backoff after that).
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("{what}: {source}")]
    Cmd { what: String, source: FtpError },
    #[error("{what}: no answer within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl From<crate::store::StoreError> for FtpFail {
    fn from(e: crate::store::StoreError) -> FtpFail {
        FtpFail::Other(e.into())
    }
}
impl From<std::io::Error> for FtpFail {
    fn from(e: std::io::Error) -> FtpFail {
        FtpFail::Other(e.into())
    }
}

impl FtpFail {
    /// The server or the network failed, as opposed to one file being refused.
    fn is_connection(&self) -> bool {
        match self {
            FtpFail::Unreachable(_) | FtpFail::Timeout { .. } => true,
            FtpFail::Cmd { source, .. } => match source {
                // vsftpd ends a session it cannot go on with by "500 OOPS: …" and
                // closes it (e.g. no passive port left to bind).
                FtpError::UnexpectedResponse(r) => {
                    matches!(r.status.code(), 421 | 425 | 426)
                        || String::from_utf8_lossy(&r.body).contains("OOPS")
                }
                FtpError::ConnectionError(_) | FtpError::BadResponse => true,
                _ => false,
            },
            FtpFail::Other(_) => false,
        }
    }

    /// The reply code, if the server answered with an unexpected one.
    fn code(&self) -> Option<u32> {
        match self {
            FtpFail::Cmd {
                source: FtpError::UnexpectedResponse(r),
                ..
            } => Some(r.status.code()),
            _ => None,
        }
    }
}

/// Reachability, with the backoff before the next connection attempt.
#[derive(Debug)]
struct Health {
    reachable: bool,
    delay: Duration,
    next_try: Option<Instant>,
}

struct Pool {
    permits: tokio::sync::Semaphore,
    idle: Mutex<Vec<AsyncFtpStream>>,
}

pub struct FtpEndpoint {
    pub name: String,
    pub config: FtpConfig,
    pub routes: Routes,
    pub target: Target,
    patterns: Vec<(Kind, NamePattern)>,
    warned: WarnOnce,
    temps_cleaned: AtomicBool,
    pool: Pool,
    health: Mutex<Health>,
    /// name → size from the previous listing (completeness: unchanged across two).
    seen: Mutex<HashMap<String, u64>>,
    /// Temp files an interrupted upload left; deleted on the next recover.
    orphans: Mutex<Vec<String>>,
    /// Whether the server understands `LIST -a` (shows dot files on vsftpd).
    list_a: AtomicBool,
    /// `tls = "explicit"`: the TLS client (one config, so sessions resume on the data
    /// connections, as vsftpd's `require_ssl_reuse` wants).
    tls: Option<tokio_rustls::TlsConnector>,
}

/// One checked-out connection slot. The connection goes back to the pool on drop unless
/// it was marked broken.
struct Session<'a> {
    ep: &'a FtpEndpoint,
    ftp: Option<AsyncFtpStream>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if let Some(ftp) = self.ftp.take() {
            lock(&self.ep.pool.idle).push(ftp);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs one FTP command on a session with the endpoint's timeout; a failure drops the
/// connection unless the server answered with a plain negative reply.
macro_rules! cmd {
    ($sess:expr, $what:expr, |$f:ident| $body:expr) => {{
        let after = $sess.ep.config.timeout;
        let $f = $sess.ftp().await?;
        let r = tokio::time::timeout(after, $body).await;
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => {
                let fail = FtpFail::Cmd {
                    what: $what,
                    source,
                };
                // A negative reply (4xx/5xx other than 421/425/426) ends the command with
                // the control connection in step: keep it. Dropping it here made every
                // `SIZE` of a free name (550) cost a new login (~40 ms on vsftpd).
                if fail.is_connection() || !fail.code().is_some_and(|c| c >= 400) {
                    $sess.broken();
                }
                Err(fail)
            }
            Err(_) => {
                $sess.broken();
                Err(FtpFail::Timeout { what: $what, after })
            }
        }
    }};
}

impl Session<'_> {
    /// One step of a transfer (a data chunk, the final reply) under the timeout. Unlike a
    /// plain command's negative reply, any failure here leaves the connection in an
    /// unknown state, so it is dropped.
    async fn transfer_step<T>(
        &mut self,
        what: impl FnOnce() -> String,
        step: impl std::future::Future<Output = Result<T, FtpError>>,
    ) -> Result<T, FtpFail> {
        let after = self.ep.config.timeout;
        match tokio::time::timeout(after, step).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => {
                self.broken();
                Err(FtpFail::Cmd {
                    what: what(),
                    source,
                })
            }
            Err(_) => {
                self.broken();
                Err(FtpFail::Timeout {
                    what: what(),
                    after,
                })
            }
        }
    }

    async fn ftp(&mut self) -> Result<&mut AsyncFtpStream, FtpFail> {
        if self.ftp.is_none() {
            self.ftp = Some(self.ep.connect().await?);
        }
        Ok(self.ftp.as_mut().expect("set above"))
    }

    fn broken(&mut self) {
        self.ftp = None;
    }

    /// `LIST -a` of the directory (dot files included on vsftpd), parsed.
    async fn list(&mut self) -> Result<Vec<Entry>, FtpFail> {
        let lines = if self.ep.list_a.load(Ordering::Relaxed) {
            match cmd!(self, "LIST -a".to_string(), |f| f.list(Some("-a"))) {
                Ok(l) => l,
                Err(e) if e.code().is_some_and(|c| c >= 500) => {
                    self.ep.list_a.store(false, Ordering::Relaxed);
                    tracing::debug!(endpoint = %self.ep.name, "LIST -a refused ({e}); using LIST");
                    cmd!(self, "LIST".to_string(), |f| f.list(None))?
                }
                Err(e) => return Err(e),
            }
        } else {
            cmd!(self, "LIST".to_string(), |f| f.list(None))?
        };
        let mut out = Vec::new();
        for line in lines {
            match parse_list_line(&line) {
                Some(e) if e.name == "." || e.name == ".." => {}
                Some(e) => out.push(e),
                None => {
                    if !line.starts_with("total") && self.ep.warned.first(&format!("list:{line}")) {
                        tracing::warn!(endpoint = %self.ep.name, "cannot parse the listing line {line:?}");
                    }
                }
            }
        }
        Ok(out)
    }

    /// RETR into `w`; returns the byte count after the server's final reply.
    async fn retr_into(&mut self, name: &str, w: &mut impl std::io::Write) -> Result<u64, FtpFail> {
        let mut stream = cmd!(self, format!("RETR {name}"), |f| f.retr_as_stream(name))?;
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = self
                .transfer_step(|| format!("RETR {name} (after {total} bytes)"), async {
                    stream
                        .read(&mut buf)
                        .await
                        .map_err(FtpError::ConnectionError)
                })
                .await?;
            if n == 0 {
                break;
            }
            if let Err(e) = w.write_all(&buf[..n]) {
                self.broken();
                return Err(FtpFail::Other(
                    anyhow::Error::new(e).context("cannot write the spool"),
                ));
            }
            total += n as u64;
        }
        self.transfer_step(|| format!("RETR {name} (final reply)"), stream.finish())
            .await?;
        Ok(total)
    }

    /// RETR into `w` like [`Session::retr_into`], in three stages that overlap: this task
    /// reads chunks from the network, a blocking thread hashes them (sha256), another one
    /// writes them to `w`. For a big download the page-cache copy of the write and the hash
    /// are the two biggest costs (`perf`: ~1.9 and ~0.7 CPU-s per GiB on the bench VM); in
    /// one thread they add up, on two cores they overlap. Returns the byte count after the
    /// server's final reply, `w` back, and the sha256 (hex) of exactly the bytes written.
    async fn retr_pipelined<W: std::io::Write + Send + 'static>(
        &mut self,
        name: &str,
        w: W,
    ) -> Result<(u64, W, String), FtpFail> {
        let mut stream = cmd!(self, format!("RETR {name}"), |f| f.retr_as_stream(name))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(RETR_AHEAD);
        let (to_writer, writer_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(RETR_AHEAD);
        // Written buffers come back for the next chunks: no allocation per chunk.
        let (back, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(2 * RETR_AHEAD + 2);
        let hasher = tokio::task::spawn_blocking(move || hash_chunks(rx, to_writer));
        let writer = tokio::task::spawn_blocking(move || write_chunks(w, writer_rx, back));
        let mut total = 0u64;
        let mut read_fail = None;
        'chunks: loop {
            let mut buf = spare.try_recv().unwrap_or_default();
            buf.resize(FILE_CHUNK, 0);
            let mut n = 0;
            while n < buf.len() {
                let got = self
                    .transfer_step(
                        || format!("RETR {name} (after {} bytes)", total + n as u64),
                        async {
                            stream
                                .read(&mut buf[n..])
                                .await
                                .map_err(FtpError::ConnectionError)
                        },
                    )
                    .await;
                match got {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => {
                        read_fail = Some(e);
                        break 'chunks;
                    }
                }
            }
            if n == 0 {
                break;
            }
            buf.truncate(n);
            total += n as u64;
            if tx.send(buf).await.is_err() {
                break; // the writer failed: its error is reported below
            }
        }
        drop(tx);
        let sha256 = hasher
            .await
            .map_err(|e| FtpFail::Other(anyhow::anyhow!("download hasher: {e}")))?;
        let (w, written) = writer
            .await
            .map_err(|e| FtpFail::Other(anyhow::anyhow!("spool writer: {e}")))?;
        if let Some(e) = read_fail {
            return Err(e);
        }
        if let Err(e) = written {
            self.broken();
            return Err(FtpFail::Other(
                anyhow::Error::new(e).context("cannot write the spool"),
            ));
        }
        self.transfer_step(|| format!("RETR {name} (final reply)"), stream.finish())
            .await?;
        Ok((total, w, sha256))
    }

    /// STOR `name` from the package's payload; checks the final reply. An inline payload
    /// is one write; a spool file is read on the blocking pool, 1 MiB at a time and one
    /// chunk ahead, so that reading the disk and sending overlap.
    async fn stor(
        &mut self,
        name: &str,
        pkg: &Package,
        payload: crate::store::Payload,
    ) -> Result<u64, FtpFail> {
        let mut stream = cmd!(self, format!("STOR {name}"), |f| f.put_with_stream(name))?;
        let mut total = 0u64;
        match payload {
            crate::store::Payload::Inline(c) => {
                let bytes = c.into_inner();
                self.transfer_step(|| format!("STOR {name}"), async {
                    stream
                        .write_all(&bytes)
                        .await
                        .map_err(FtpError::ConnectionError)
                })
                .await?;
                total = bytes.len() as u64;
            }
            crate::store::Payload::File(f) => {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(2);
                // Sent buffers go back to the reader: no 1 MiB allocation (and zeroing)
                // per chunk.
                let (back, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
                tokio::task::spawn_blocking(move || read_chunks(f, tx, spare));
                while let Some(chunk) = rx.recv().await {
                    let chunk = match chunk {
                        Ok(c) => c,
                        Err(e) => {
                            self.broken();
                            return Err(FtpFail::Other(anyhow::Error::new(e).context(format!(
                                "cannot read the payload of {}",
                                pkg.describe()
                            ))));
                        }
                    };
                    self.transfer_step(|| format!("STOR {name} (after {total} bytes)"), async {
                        stream
                            .write_all(&chunk)
                            .await
                            .map_err(FtpError::ConnectionError)
                    })
                    .await?;
                    total += chunk.len() as u64;
                    let _ = back.try_send(chunk);
                }
            }
        }
        self.transfer_step(|| format!("STOR {name} (final reply)"), stream.finish())
            .await?;
        Ok(total)
    }

    /// SIZE: Some(size), None when the file is absent (550); Err for anything else.
    async fn size(&mut self, name: &str) -> Result<Option<u64>, FtpFail> {
        match cmd!(self, format!("SIZE {name}"), |f| f.size(name)) {
            Ok(n) => Ok(Some(n as u64)),
            Err(e) if e.code() == Some(550) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// RNFR/RNTO.
    async fn rename(&mut self, from: &str, to: &str) -> Result<(), FtpFail> {
        cmd!(self, format!("RNFR {from} / RNTO {to}"), |f| f
            .rename(from, to))
    }

    /// DELE; Ok(false) when the file is already gone (550).
    async fn dele(&mut self, name: &str) -> Result<bool, FtpFail> {
        match cmd!(self, format!("DELE {name}"), |f| f.rm(name)) {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some(550) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The TLS client of an endpoint with `tls = "explicit"`, None for plain FTP.
pub fn tls_connector(config: &FtpConfig) -> Result<Option<tokio_rustls::TlsConnector>, String> {
    if config.tls != "explicit" {
        return Ok(None);
    }
    let c = crate::tls::client_config(config.tls_ca.as_deref(), config.tls_insecure)
        .map_err(|e| format!("tls_ca: {e}"))?;
    Ok(Some(tokio_rustls::TlsConnector::from(c)))
}

/// Connects, secures the connection when `tls` is given (`AUTH TLS`, then `PBSZ 0` and
/// `PROT P`: data connections are encrypted too), logs in, sets binary type and enters the
/// directory.
pub async fn open(
    t: &Target,
    config: &FtpConfig,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<AsyncFtpStream> {
    use anyhow::Context as _;
    let addr = tokio::net::lookup_host((t.host.as_str(), t.port))
        .await
        .with_context(|| format!("cannot resolve {}", t.host))?
        .next()
        .with_context(|| format!("{} has no address", t.host))?;
    let mut ftp = AsyncFtpStream::connect_timeout(addr, config.timeout)
        .await
        .context("connect")?;
    if let Some(tls) = tls {
        crate::tls::server_name(&t.host).map_err(anyhow::Error::msg)?;
        ftp = ftp
            .into_secure(AsyncRustlsConnector::from(tls.clone()), &t.host)
            .await
            .map_err(|e| match e {
                FtpError::SecureError(why) => {
                    anyhow::anyhow!("TLS handshake failed: {why} ({})", tls_hint(&why, &t.host))
                }
                FtpError::UnexpectedResponse(r) => anyhow::anyhow!(
                    "AUTH TLS / PBSZ / PROT refused: {} (does the server offer explicit FTPS?)",
                    String::from_utf8_lossy(&r.body).trim()
                ),
                e => anyhow::Error::new(e).context("AUTH TLS"),
            })?;
    }
    if !config.passive {
        ftp = ftp.active_mode(config.timeout);
    }
    ftp.login(t.user.as_str(), t.password.as_str())
        .await
        .with_context(|| format!("login as {}", t.user))?;
    // Binary after every login: ASCII mode would turn LF into CRLF (bytes are sacred).
    ftp.transfer_type(FileType::Binary)
        .await
        .context("TYPE I")?;
    if !t.dir.is_empty() {
        ftp.cwd(t.dir.as_str())
            .await
            .with_context(|| format!("CWD {}", t.dir))?;
    }
    Ok(ftp)
}

/// What to do about a failed handshake, in words (rustls names the reason in its error).
fn tls_hint(why: &str, host: &str) -> String {
    if why.contains("UnknownIssuer") || why.contains("CaUsedAsEndEntity") {
        "the server's certificate is not trusted: set tls_ca to the server's own \
         (self-signed) certificate or to the CA that signed it"
            .into()
    } else if why.contains("NotValidForName") {
        format!(
            "the certificate is not made for {host:?}: set tls_ca to this very certificate \
             (trusted for any name) or use the name it was made for in url"
        )
    } else if why.contains("Expired") {
        "the server's certificate has expired (or this machine's clock is wrong)".into()
    } else {
        "tls = \"explicit\"; see tls_ca and tls_insecure".into()
    }
}

/// What one file parsed as.
type Candidate = super::Candidate<Entry>;

impl FtpEndpoint {
    pub fn new(name: &str, config: FtpConfig, routes: Routes) -> anyhow::Result<FtpEndpoint> {
        let tls = tls_connector(&config).map_err(|e| anyhow::anyhow!("endpoint {name:?}: {e}"))?;
        if config.tls_insecure {
            tracing::warn!(endpoint = %name, "tls_insecure = true: the certificate of the FTP server is not checked");
        }
        let target = Target::parse(&config.url, config.secret.as_ref().map(|s| s.expose()))
            .map_err(|e| anyhow::anyhow!("endpoint {name:?}: url: {e}"))?;
        let names = config.names();
        let patterns = Kind::ALL.iter().map(|&k| (k, names.pattern(k))).collect();
        let connections = config.connections.max(1) as usize;
        Ok(FtpEndpoint {
            name: name.to_string(),
            routes,
            target,
            patterns,
            warned: WarnOnce::default(),
            temps_cleaned: AtomicBool::new(false),
            pool: Pool {
                permits: tokio::sync::Semaphore::new(connections),
                idle: Mutex::new(Vec::new()),
            },
            health: Mutex::new(Health {
                reachable: true,
                delay: BACKOFF_FIRST,
                next_try: None,
            }),
            seen: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
            list_a: AtomicBool::new(true),
            tls,
            config,
        })
    }

    /// The poll interval, for the daemon's timer and `sync`'s second look.
    pub fn poll(&self) -> Duration {
        self.config.poll
    }

    pub fn role(&self) -> Role {
        self.routes.role
    }

    /// Whether the last connection attempt succeeded.
    pub fn is_reachable(&self) -> bool {
        lock(&self.health).reachable
    }

    fn pattern(&self, kind: Kind) -> &NamePattern {
        &self
            .patterns
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("every kind has a pattern")
            .1
    }

    fn parse(&self, name: &str) -> Option<(Kind, u32, Option<u32>)> {
        super::parse_name(&self.patterns, self.config.numbered, name)
    }

    // ------------------------------------------------------------ connections

    async fn session(&self) -> Session<'_> {
        let permit = self
            .pool
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        // An idle connection may have been closed by the server (idle timeout, restart):
        // check it with NOOP and silently drop it if it does not answer.
        let mut ftp = None;
        loop {
            let Some(mut idle) = lock(&self.pool.idle).pop() else {
                break;
            };
            if let Ok(Ok(())) = tokio::time::timeout(self.config.timeout, idle.noop()).await {
                ftp = Some(idle);
                break;
            }
        }
        Session {
            ep: self,
            ftp,
            _permit: permit,
        }
    }

    /// Records a connection-level failure: logs the change to unreachable once, backs off.
    fn down(&self, why: &str) {
        let mut h = lock(&self.health);
        if h.reachable {
            h.reachable = false;
            h.delay = BACKOFF_FIRST;
            tracing::warn!(endpoint = %self.name, "ftp {}: unreachable: {why} (retrying with backoff)", self.name);
        } else {
            h.delay = (h.delay * 2).min(BACKOFF_MAX);
        }
        h.next_try = Some(Instant::now() + h.delay);
        drop(h);
        lock(&self.pool.idle).clear();
    }

    /// A connection broke in the middle of an operation: log the change once, drop the
    /// idle connections, and reconnect on the next use without waiting (a failing
    /// reconnect starts the backoff).
    fn lost(&self, why: &str) {
        let mut h = lock(&self.health);
        if h.reachable {
            h.reachable = false;
            tracing::warn!(endpoint = %self.name, "ftp {}: connection lost: {why} (reconnecting)", self.name);
        }
        drop(h);
        lock(&self.pool.idle).clear();
    }

    fn up(&self) {
        let mut h = lock(&self.health);
        if !h.reachable {
            tracing::info!(endpoint = %self.name, "ftp {}: reachable again", self.name);
        }
        h.reachable = true;
        h.delay = BACKOFF_FIRST;
        h.next_try = None;
    }

    /// Connects, logs in, sets binary type and enters the directory.
    async fn connect(&self) -> Result<AsyncFtpStream, FtpFail> {
        if let Some(t) = lock(&self.health).next_try {
            let now = Instant::now();
            if t > now {
                return Err(FtpFail::Unreachable(format!(
                    "{} (next attempt in {:.1}s)",
                    self.target.display(),
                    (t - now).as_secs_f32()
                )));
            }
        }
        match tokio::time::timeout(self.config.timeout, self.login()).await {
            Ok(Ok(ftp)) => {
                self.up();
                Ok(ftp)
            }
            Ok(Err(e)) => {
                let msg = format!("{}: {e:#}", self.target.display());
                self.down(&msg);
                Err(FtpFail::Unreachable(msg))
            }
            Err(_) => {
                let msg = format!(
                    "{}: no answer within {:?}",
                    self.target.display(),
                    self.config.timeout
                );
                self.down(&msg);
                Err(FtpFail::Unreachable(msg))
            }
        }
    }

    async fn login(&self) -> anyhow::Result<AsyncFtpStream> {
        open(&self.target, &self.config, self.tls.as_ref()).await
    }

    /// Logs a failure: connection-level ones through the reachability state (once per
    /// change), others per file.
    fn report_fail(&self, e: &FtpFail, what: &str) {
        if e.is_connection() {
            if !matches!(e, FtpFail::Unreachable(_)) {
                self.lost(&format!("{what}: {e}"));
            }
        } else {
            tracing::error!(endpoint = %self.name, "{what}: {e}");
        }
    }

    // ------------------------------------------------------------ recovery

    /// Finishes what a crash or a dropped connection interrupted. Touches the server only
    /// when there is something to finish.
    pub async fn recover(&self, store: &Store) -> anyhow::Result<()> {
        let pending = store.source_pending(&self.name)?;
        let delivering = store.delivering(&self.name)?;
        let orphans: Vec<String> = lock(&self.orphans).clone();
        let clean = !self.temps_cleaned.load(Ordering::Relaxed);
        if pending.is_empty() && delivering.is_empty() && orphans.is_empty() && !clean {
            return Ok(());
        }
        let mut s = self.session().await;
        match self
            .recover_with(&mut s, store, pending, delivering, orphans, clean)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_connection() => {
                // Logged once by the reachability state; the next pass tries again.
                self.report_fail(&e, "recovery");
                Ok(())
            }
            Err(e) => Err(anyhow::anyhow!("endpoint {}: recovery: {e}", self.name)),
        }
    }

    async fn recover_with(
        &self,
        s: &mut Session<'_>,
        store: &Store,
        pending: Vec<crate::store::SourcePending>,
        delivering: Vec<crate::store::Delivering>,
        orphans: Vec<String>,
        clean: bool,
    ) -> Result<(), FtpFail> {
        let listing = if !pending.is_empty() || clean {
            s.list().await?
        } else {
            Vec::new()
        };
        let sizes: HashMap<&str, u64> = listing
            .iter()
            .filter(|e| e.is_file)
            .map(|e| (e.name.as_str(), e.size))
            .collect();
        // Sources whose DELE a crash may have interrupted: delete only the very same bytes
        // (the writer may have reused the name since).
        for p in pending {
            if sizes.get(p.source_name.as_str()) == Some(&p.size) {
                let mut bytes = Vec::new();
                s.retr_into(&p.source_name, &mut bytes).await?;
                if crate::package::sha256_hex(&bytes) == p.sha256 {
                    tracing::info!(endpoint = %self.name, file = %p.source_name, package = p.id, "removing a source file already taken before an interruption");
                    s.dele(&p.source_name).await?;
                }
            }
            store.mark_source_done(p.id)?;
        }
        // Uploads begun and not confirmed: SIZE tells whether the temp file is still there
        // (dot files may be hidden from listings).
        for d in delivering {
            match s.size(&d.sink_tmp).await? {
                Some(_) => {
                    // Journal first, then the temp (see deliver_one).
                    store.reset_to_taken(d.package.id)?;
                    if s.dele(&d.sink_tmp).await.is_err() {
                        lock(&self.orphans).push(d.sink_tmp.clone());
                    }
                    tracing::info!(endpoint = %self.name, package = d.package.id, "delivery interrupted before the rename; it will be written again");
                }
                None => {
                    store.mark_delivered(d.package.id, Some(&d.sink_name), None)?;
                    tracing::info!(endpoint = %self.name, package = d.package.id, file = %d.sink_name, "delivery finished before an interruption; journaled now");
                }
            }
        }
        for o in orphans {
            s.dele(&o).await?;
            lock(&self.orphans).retain(|x| x != &o);
        }
        if clean {
            let in_use = store.sink_temps_in_use(&self.name)?;
            for e in &listing {
                if e.is_file && is_temp_name(&e.name) && !in_use.contains(&e.name) {
                    tracing::info!(endpoint = %self.name, file = %e.name, "removing a temp file left by a crash");
                    s.dele(&e.name).await?;
                }
            }
            self.temps_cleaned.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    // ------------------------------------------------------------ reading

    pub async fn take(&self, store: &Store, dry_run: bool) -> anyhow::Result<TakeReport> {
        let mut report = TakeReport::default();
        let mut s = self.session().await;
        let listing = match s.list().await {
            Ok(l) => l,
            Err(e) if e.is_connection() => {
                self.report_fail(&e, "listing");
                report.failed += 1;
                return Ok(report);
            }
            Err(e) => anyhow::bail!("endpoint {}: {e}", self.name),
        };
        // Completeness: the size must be the same as in the previous listing.
        let previous = {
            let mut seen = lock(&self.seen);
            let now: HashMap<String, u64> = listing
                .iter()
                .filter(|e| e.is_file)
                .map(|e| (e.name.clone(), e.size))
                .collect();
            std::mem::replace(&mut *seen, now)
        };
        let groups = super::group_candidates(
            &self.name,
            &self.routes,
            &self.patterns,
            self.config.numbered,
            &self.warned,
            listing
                .into_iter()
                .filter(|e| e.is_file && !is_temp_name(&e.name) && !e.name.starts_with('.')),
            |e| e.name.as_str(),
        );
        'groups: for (_, mut files) in groups {
            files.sort_by_key(|c| c.n);
            for c in files {
                if previous.get(&c.entry.name) != Some(&c.entry.size) {
                    report.waiting += 1;
                    break; // never a higher number before a lower one
                }
                if dry_run {
                    let r = self.routes.route(c.pos).expect("routed above");
                    report.planned.push(format!(
                        "take {}/{} (till {}, {}, {} bytes) for link {} → {}",
                        self.name, c.entry.name, c.pos, c.kind, c.entry.size, r.link, r.peer
                    ));
                    continue;
                }
                match self.take_one(&mut s, store, &c).await {
                    Ok(true) => report.taken += 1,
                    Ok(false) => {
                        report.waiting += 1;
                        break;
                    }
                    Err(e) => {
                        self.report_fail(
                            &e,
                            &format!("cannot take {} (till {})", c.entry.name, c.pos),
                        );
                        report.failed += 1;
                        if e.is_connection() {
                            break 'groups;
                        }
                        break;
                    }
                }
            }
        }
        if let Err(e) = store.sync_lazy() {
            tracing::warn!(endpoint = %self.name, "{e}");
        }
        Ok(report)
    }

    /// Downloads one file into the spool, journals it, then DELEs it. Ok(false): it changed
    /// while we read it, or it is a single spr file already loaded.
    async fn take_one(
        &self,
        s: &mut Session<'_>,
        store: &Store,
        c: &Candidate,
    ) -> Result<bool, FtpFail> {
        let loaded_key = format!("loaded:{}:{}", c.entry.name, c.entry.size);
        let single_spr = c.kind == Kind::Spr && !self.config.numbered;
        if single_spr && self.warned.contains(&loaded_key) {
            return Ok(false);
        }
        let route = self.routes.route(c.pos).expect("candidates are routed");
        let head = HeadWriter {
            inner: store.spool_writer()?.unhashed(),
            head: Vec::new(),
        };
        // On an error the writer is dropped, which removes its partial spool file.
        let (got, HeadWriter { inner: w, head }, sha256) =
            s.retr_pipelined(&c.entry.name, head).await?;
        let spooled = tokio::task::spawn_blocking(move || w.finish_hashed(sha256))
            .await
            .map_err(|e| FtpFail::Other(anyhow::anyhow!("spool fsync: {e}")))?
            .map_err(|e| anyhow::Error::new(e).context("cannot fsync the spool"))?;
        if got != c.entry.size || spooled.size != c.entry.size {
            tracing::debug!(endpoint = %self.name, file = %c.entry.name, "size changed while downloading ({} listed, {got} read); next pass", c.entry.size);
            spooled.discard();
            lock(&self.seen).remove(&c.entry.name);
            return Ok(false);
        }
        if single_spr && spr_marked_loaded(&head) {
            spooled.discard();
            if self.warned.first(&loaded_key) {
                tracing::info!(endpoint = %self.name, file = %c.entry.name, "left alone: line 2 is '@' (already loaded)");
            }
            return Ok(false);
        }
        let size = spooled.size;
        let id = route.commit_file(
            store,
            &self.name,
            c.pos,
            c.kind,
            &c.entry.name,
            c.n,
            spooled,
        )?;
        tracing::info!(endpoint = %self.name, link = %route.link, till = c.pos, kind = %c.kind, package = id, bytes = size, "taken {}", c.entry.name);
        // The package is durable: now the server may forget the file. If DELE fails, the
        // source_pending row makes recover() finish it.
        s.dele(&c.entry.name).await?;
        // Lazy (made durable at the end of the pass): if a power cut loses it, recover()
        // finds the file gone, or compares its bytes, and marks it again.
        store.mark_source_done_batch(&[id])?;
        lock(&self.seen).remove(&c.entry.name);
        Ok(true)
    }

    // ------------------------------------------------------------ writing

    /// Writes a link's queue (ordered by till, then id; PROTOCOL.md §3.1).
    ///
    /// One listing, then up to `connections` sessions at once, each taking whole tills from
    /// one shared list: all packages of a till are written by one session, in order, so
    /// package k+1 of a till never gets its final name before package k. Per till, packages
    /// go in batches (`FtpEndpoint::deliver_batch`).
    pub async fn deliver(
        &self,
        store: &Arc<Store>,
        queue: Vec<Package>,
        dry_run: bool,
    ) -> anyhow::Result<DeliverReport> {
        let mut report = DeliverReport::default();
        if queue.is_empty() {
            return Ok(report);
        }
        let mut s = self.session().await;
        let listing = match s.list().await {
            Ok(l) => l,
            Err(e) if e.is_connection() => {
                self.report_fail(&e, "listing");
                report.failed += queue.len() as u64;
                return Ok(report);
            }
            Err(e) => anyhow::bail!("endpoint {}: {e}", self.name),
        };
        let mut names = Names::default();
        for e in listing {
            if let Some((kind, pos, Some(n))) = self.parse(&e.name) {
                let h = names.highest.entry((pos, kind)).or_insert(0);
                *h = (*h).max(n);
            }
            names.present.insert(e.name.clone(), e);
        }
        if dry_run {
            for pkg in queue {
                let (name, n) = self.final_name(&pkg, &names, None);
                report.planned.push(format!(
                    "deliver {} to {}/{}",
                    pkg.describe(),
                    self.name,
                    name
                ));
                if let Some(n) = n {
                    names.highest.insert((pkg.pos, pkg.kind), n);
                }
            }
            return Ok(report);
        }
        let mut tills: VecDeque<Vec<Package>> = VecDeque::new();
        for pkg in queue {
            match tills.back_mut() {
                Some(t) if t[0].pos == pkg.pos => t.push(pkg),
                _ => tills.push_back(vec![pkg]),
            }
        }
        let sessions = (self.config.connections.max(1) as usize).min(tills.len());
        let shared = Shared {
            tills: Mutex::new(tills),
            names: Mutex::new(names),
        };
        let mut first = Some(s);
        let workers: Vec<_> = (0..sessions)
            .map(|_| self.deliver_worker(first.take(), store, &shared))
            .collect();
        for r in futures_util::future::join_all(workers).await {
            report.delivered += r.delivered;
            report.busy += r.busy;
            report.failed += r.failed;
        }
        // Tills no session got to (every session lost its connection): next pass.
        report.failed += lock(&shared.tills)
            .iter()
            .map(|t| t.len() as u64)
            .sum::<u64>();
        let st = store.clone();
        match tokio::task::spawn_blocking(move || st.sync_lazy()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(endpoint = %self.name, "{e}"),
            Err(e) => tracing::warn!(endpoint = %self.name, "journal fsync: {e}"),
        }
        Ok(report)
    }

    /// One session's share of a delivery pass: whole tills from the shared list until it
    /// is empty, or until this session's connection fails (the other sessions go on).
    async fn deliver_worker(
        &self,
        first: Option<Session<'_>>,
        store: &Arc<Store>,
        shared: &Shared,
    ) -> DeliverReport {
        let mut report = DeliverReport::default();
        let mut s = match first {
            Some(s) => s,
            None => self.session().await,
        };
        loop {
            let Some(till) = lock(&shared.tills).pop_front() else {
                break;
            };
            if self
                .deliver_till(&mut s, store, till, &shared.names, &mut report)
                .await
            {
                break;
            }
        }
        report
    }

    /// The final name for `pkg`: numbered = the first number above the highest present
    /// (and above `above`, the last number planned for the same till and kind in this
    /// batch) that is not present; single-file = the name without suffix.
    fn final_name(
        &self,
        pkg: &Package,
        names: &Names,
        above: Option<u32>,
    ) -> (String, Option<u32>) {
        let pattern = self.pattern(pkg.kind);
        if self.config.numbered {
            let highest = names
                .highest
                .get(&(pkg.pos, pkg.kind))
                .copied()
                .unwrap_or(0);
            let mut n = highest.max(above.unwrap_or(0)) + 1;
            while names
                .present
                .contains_key(&pattern.render(pkg.pos, Some(n)))
            {
                n += 1;
            }
            (pattern.render(pkg.pos, Some(n)), Some(n))
        } else {
            (pattern.render(pkg.pos, None), None)
        }
    }

    /// Writes one till's packages in order, in batches, and stops at the first one that
    /// cannot be written now (the rest wait: order). Returns true when this session's
    /// connection failed.
    async fn deliver_till(
        &self,
        s: &mut Session<'_>,
        store: &Arc<Store>,
        pkgs: Vec<Package>,
        names: &Mutex<Names>,
        report: &mut DeliverReport,
    ) -> bool {
        let total = pkgs.len() as u64;
        let mut done = 0u64;
        let mut rest = pkgs.into_iter().peekable();
        while rest.peek().is_some() {
            let batch = if self.config.numbered {
                let names = lock(names);
                let mut batch: Vec<Planned> = Vec::new();
                let mut bytes = 0u64;
                while let Some(next) = rest.peek() {
                    if batch.len() >= BATCH_MAX
                        || (!batch.is_empty() && bytes + next.size > BATCH_BYTES)
                    {
                        break;
                    }
                    let pkg = rest.next().expect("peeked");
                    let above = batch
                        .iter()
                        .rev()
                        .find(|p| p.pkg.kind == pkg.kind)
                        .and_then(|p| p.n);
                    let (final_name, n) = self.final_name(&pkg, &names, above);
                    bytes += pkg.size;
                    batch.push(Planned { pkg, final_name, n });
                }
                batch
            } else {
                let pkg = rest.next().expect("peeked");
                let (final_name, _) = self.final_name(&pkg, &lock(names), None);
                let present = lock(names).present.get(&final_name).cloned();
                match self.single_file_free(s, &pkg, &final_name, present).await {
                    Ok(true) => vec![Planned {
                        pkg,
                        final_name,
                        n: None,
                    }],
                    Ok(false) => {
                        report.busy += total - done;
                        return false;
                    }
                    Err(e) => {
                        self.report_fail(&e, &format!("cannot deliver {}", pkg.describe()));
                        report.failed += 1;
                        report.busy += total - done - 1;
                        return e.is_connection();
                    }
                }
            };
            let outcome = self.deliver_batch(s, store, batch, names).await;
            done += outcome.delivered;
            report.delivered += outcome.delivered;
            if let Some((e, what)) = outcome.failed {
                self.report_fail(&e, &format!("cannot deliver {what}"));
                report.failed += 1;
                report.busy += total - done - 1;
                return e.is_connection();
            }
        }
        false
    }

    /// Single-file mode: the name is free when absent, or (spr) when the present file's
    /// line 2 says loaded. Never overwrite unconsumed data.
    async fn single_file_free(
        &self,
        s: &mut Session<'_>,
        pkg: &Package,
        name: &str,
        present: Option<Entry>,
    ) -> Result<bool, FtpFail> {
        let key = format!("busy:{name}");
        if let Some(e) = present {
            let free = if pkg.kind == Kind::Spr && e.is_file {
                let mut bytes = Vec::new();
                s.retr_into(name, &mut bytes).await?;
                spr_marked_loaded(&bytes)
            } else {
                false
            };
            if !free {
                if self.warned.first(&key) {
                    tracing::info!(endpoint = %self.name, file = %name, till = pkg.pos, package = pkg.id, "waiting: the till has not consumed {name} yet");
                }
                return Ok(false);
            }
        }
        self.warned.forget(&key);
        Ok(true)
    }

    /// Writes a batch of one till's packages (in order):
    /// 1. each is uploaded to its own temp name, its final reply and SIZE checked;
    /// 2. one durable journal commit records every temp and final name ("delivering");
    /// 3. RNFR/RNTO each in order; the first refusal stops the batch, and the rest are
    ///    reset to "taken" (durably, before their temps are removed);
    /// 4. one lazy journal commit records the renamed ones as delivered.
    ///
    /// A crash at any point leaves either temps no journal row names (removed on the next
    /// start; the packages are still "taken") or "delivering" rows, which recovery settles
    /// by the temp: gone = renamed = delivered, present = not renamed = written again. The
    /// renamed ones are always a prefix of the batch, so order holds across a crash too.
    async fn deliver_batch(
        &self,
        s: &mut Session<'_>,
        store: &Arc<Store>,
        batch: Vec<Planned>,
        names: &Mutex<Names>,
    ) -> BatchOutcome {
        let pkgs: Vec<Package> = batch.iter().map(|p| p.pkg.clone()).collect();
        let st = store.clone();
        let payloads = match tokio::task::spawn_blocking(move || {
            pkgs.iter().map(|p| st.payload(p)).collect::<Vec<_>>()
        })
        .await
        {
            Ok(p) => p,
            Err(e) => {
                return BatchOutcome::failed(
                    FtpFail::Other(anyhow::anyhow!("reading payloads: {e}")),
                    batch[0].pkg.describe(),
                )
            }
        };
        // 1. Upload.
        let mut uploaded: Vec<(Planned, String)> = Vec::with_capacity(batch.len());
        let mut upload_fail = None;
        for (p, payload) in batch.into_iter().zip(payloads) {
            let payload = match payload {
                Ok(payload) => payload,
                Err(e) => {
                    let what = p.pkg.describe();
                    upload_fail = Some((
                        FtpFail::Other(
                            anyhow::Error::new(e)
                                .context(format!("cannot read the payload of {what}")),
                        ),
                        what,
                    ));
                    break;
                }
            };
            let tmp = temp_name();
            match self.upload(s, &tmp, &p.pkg, payload).await {
                Ok(()) => uploaded.push((p, tmp)),
                Err(e) => {
                    upload_fail = Some((e, p.pkg.describe()));
                    break;
                }
            }
        }
        if uploaded.is_empty() {
            return BatchOutcome {
                delivered: 0,
                failed: upload_fail,
            };
        }
        // 2. Journal "delivering" (durable: it is what tells a crash after a rename apart).
        let rows: Vec<(i64, String, String)> = uploaded
            .iter()
            .map(|(p, tmp)| (p.pkg.id, p.final_name.clone(), tmp.clone()))
            .collect();
        if let Err(e) = blocking(store, move |st| st.mark_delivering_batch(&rows)).await {
            for (_, tmp) in &uploaded {
                if s.dele(tmp).await.is_err() {
                    lock(&self.orphans).push(tmp.clone());
                }
            }
            return BatchOutcome::failed(e, uploaded[0].0.pkg.describe());
        }
        crash_point("after-delivering");
        // 3. Rename, in order.
        let mut renamed = 0usize;
        let mut rename_fail = None;
        for (p, tmp) in &uploaded {
            let final_name = p.final_name.as_str();
            match s.rename(tmp, final_name).await {
                Ok(()) => {
                    renamed += 1;
                    crash_point("after-rename");
                }
                Err(e) if e.is_connection() => {
                    // Whether this rename happened is unknown: recover() decides by the
                    // temps of this one and of the rest, all journaled "delivering".
                    rename_fail = Some((e, p.pkg.describe()));
                    break;
                }
                Err(e) => {
                    // Refused (e.g. 553): this one and the rest wait for the next pass, and
                    // leave nothing behind. The journal is reset before the temps go: once a
                    // temp is gone, "delivering" would read as done after a crash.
                    let ids: Vec<i64> = uploaded[renamed..].iter().map(|(p, _)| p.pkg.id).collect();
                    match blocking(store, move |st| st.reset_to_taken_batch(&ids)).await {
                        Ok(()) => {
                            for (_, t) in &uploaded[renamed..] {
                                if let Err(e2) = s.dele(t).await {
                                    tracing::warn!(endpoint = %self.name, file = %t, "cannot delete the temp file after a refused rename (removed on a later pass): {e2}");
                                    lock(&self.orphans).push(t.clone());
                                }
                            }
                        }
                        Err(e3) => {
                            // Still "delivering" with their temps: recover() resets them.
                            tracing::error!(endpoint = %self.name, "{e3}");
                        }
                    }
                    rename_fail = Some((e, p.pkg.describe()));
                    break;
                }
            }
        }
        // 4. Journal "delivered" (lazy: recovery would find these temps gone).
        let done = &uploaded[..renamed];
        let rows: Vec<(i64, Option<String>, Option<i64>)> = done
            .iter()
            .map(|(p, _)| (p.pkg.id, Some(p.final_name.clone()), p.n.map(i64::from)))
            .collect();
        if let Err(e) = blocking(store, move |st| st.mark_delivered_batch(&rows)).await {
            // They are in place; recover() journals them on the next pass.
            tracing::error!(endpoint = %self.name, "{e}");
        }
        {
            let mut names = lock(names);
            for (p, _) in done {
                if let Some(n) = p.n {
                    names.highest.insert((p.pkg.pos, p.pkg.kind), n);
                }
                names.present.insert(
                    p.final_name.clone(),
                    Entry {
                        name: p.final_name.clone(),
                        size: p.pkg.size,
                        is_file: true,
                    },
                );
            }
        }
        for (p, _) in done {
            let pkg = &p.pkg;
            tracing::info!(endpoint = %self.name, link = %pkg.link, till = pkg.pos, kind = %pkg.kind, package = pkg.id, bytes = pkg.size, "delivered {}", p.final_name);
        }
        BatchOutcome {
            delivered: renamed as u64,
            failed: rename_fail.or(upload_fail),
        }
    }

    /// STOR to `tmp`, then checks it: our byte count, the final reply (in `stor`), and the
    /// server's SIZE of the temp. The SIZE check stays although the final reply already
    /// says "complete": a server that ignores `TYPE I` (line ends converted) or a data
    /// connection cut by a middlebox with a clean FIN both end in `226` with other bytes
    /// on the server, and a till must never load a truncated price list. It is one round
    /// trip per package. On failure the temp is removed now, or on a later pass.
    async fn upload(
        &self,
        s: &mut Session<'_>,
        tmp: &str,
        pkg: &Package,
        payload: crate::store::Payload,
    ) -> Result<(), FtpFail> {
        let sent = match s.stor(tmp, pkg, payload).await {
            Ok(n) => n,
            Err(e) => {
                // Delete the partial temp now if the connection still works, else later.
                if s.dele(tmp).await.is_err() {
                    lock(&self.orphans).push(tmp.to_string());
                }
                return Err(e);
            }
        };
        let check = if sent != pkg.size {
            Err(format!("sent {sent} bytes, the package has {}", pkg.size))
        } else {
            match s.size(tmp).await {
                Ok(Some(n)) if n == pkg.size => Ok(()),
                Ok(Some(n)) => Err(format!("the server has {n} bytes of {}", pkg.size)),
                Ok(None) => Err("the uploaded temp file is gone".into()),
                Err(e) if e.code().is_some_and(|c| (500..=504).contains(&c)) => {
                    tracing::debug!(endpoint = %self.name, "SIZE not supported ({e}); size check skipped");
                    Ok(())
                }
                Err(e) => return Err(e),
            }
        };
        if let Err(why) = check {
            if s.dele(tmp).await.is_err() {
                lock(&self.orphans).push(tmp.to_string());
            }
            return Err(FtpFail::Other(anyhow::anyhow!(
                "upload of {tmp} incomplete: {why}"
            )));
        }
        Ok(())
    }
}

/// At most this many packages per batch (one "delivering" commit each)...
const BATCH_MAX: usize = 32;
/// ...and at most this many bytes, unless one package alone is bigger: what a failure in
/// the middle of a batch has to upload again.
const BATCH_BYTES: u64 = 16 << 20;

/// The names on the server as one delivery pass knows them: the pass's listing plus what
/// the pass renamed into place.
#[derive(Default)]
struct Names {
    present: HashMap<String, Entry>,
    /// The highest `.$n` per till and kind.
    highest: HashMap<(u32, Kind), u32>,
}

/// What the sessions of one delivery pass share.
struct Shared {
    /// Tills not started yet, each with its queued packages in order.
    tills: Mutex<VecDeque<Vec<Package>>>,
    names: Mutex<Names>,
}

/// A package and the name it is to get.
struct Planned {
    pkg: Package,
    final_name: String,
    n: Option<u32>,
}

/// What a batch did: how many were delivered (a prefix of the batch), and the first
/// package that was not, with why.
struct BatchOutcome {
    delivered: u64,
    failed: Option<(FtpFail, String)>,
}

impl BatchOutcome {
    fn failed(e: FtpFail, what: String) -> BatchOutcome {
        BatchOutcome {
            delivered: 0,
            failed: Some((e, what)),
        }
    }
}

/// Runs a journal step on the blocking pool (a durable commit waits for an fsync; the
/// other sessions go on meanwhile).
async fn blocking(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> crate::store::Result<()> + Send + 'static,
) -> Result<(), FtpFail> {
    let st = store.clone();
    match tokio::task::spawn_blocking(move || f(&st)).await {
        Ok(r) => r.map_err(FtpFail::from),
        Err(e) => Err(FtpFail::Other(anyhow::anyhow!("journal step: {e}"))),
    }
}

/// Reads a spool file in chunks of [`FILE_CHUNK`] into `tx` (on the blocking pool), in
/// buffers the sender hands back through `spare` when it can; stops at the end, at an
/// error (sent on), or when the receiver is gone.
fn read_chunks(
    mut f: std::fs::File,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
) {
    use std::io::Read;
    loop {
        let mut buf = spare.try_recv().unwrap_or_default();
        buf.resize(FILE_CHUNK, 0);
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
        if n == 0 {
            return;
        }
        buf.truncate(n);
        if tx.blocking_send(Ok(buf)).is_err() {
            return;
        }
    }
}

/// Chunks of a download queued for the writer thread (each up to [`FILE_CHUNK`]).
const RETR_AHEAD: usize = 4;

/// The hashing stage of [`Session::retr_pipelined`] (on the blocking pool): hashes every
/// chunk, then passes it on to the writer. Ends when the reader is done, or when the writer
/// is gone (a write failed; its error is the one reported), which drops `rx` and so stops
/// the reader.
fn hash_chunks(
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    to_writer: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    while let Some(chunk) = rx.blocking_recv() {
        h.update(&chunk);
        if to_writer.send(chunk).is_err() {
            break;
        }
    }
    hex::encode(h.finalize())
}

/// The writing stage of [`Session::retr_pipelined`] (on the blocking pool): writes every
/// chunk to `w` and hands the buffer back; stops at the end or at the first write error
/// (the receiver is then dropped, which stops the hasher and then the reader).
fn write_chunks<W: std::io::Write>(
    mut w: W,
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    back: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> (W, std::io::Result<()>) {
    while let Ok(chunk) = rx.recv() {
        if let Err(e) = w.write_all(&chunk) {
            return (w, Err(e));
        }
        let _ = back.try_send(chunk);
    }
    (w, Ok(()))
}

/// Passes bytes through and keeps the first 512 (for the line-2 `@` check).
struct HeadWriter<W: std::io::Write> {
    inner: W,
    head: Vec<u8>,
}

impl<W: std::io::Write> std::io::Write for HeadWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let room = 512usize.saturating_sub(self.head.len());
        self.head.extend_from_slice(&buf[..n.min(room)]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts_and_no_password_in_display() {
        let t = Target::parse("ftp://kassa@127.0.0.1:2121/Files", Some("s3cret")).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.user.as_str(), t.dir.as_str()),
            ("127.0.0.1", 2121, "kassa", "Files")
        );
        assert_eq!(t.password, "s3cret");
        assert!(!format!("{t:?}").contains("s3cret"));
        let t = Target::parse("ftp://u:p%40ss@host/", None).unwrap();
        assert_eq!(
            (t.port, t.password.as_str(), t.dir.as_str()),
            (21, "p@ss", "")
        );
        let t = Target::parse("ftp://u:inurl@[::1]:21/a/b%20c", Some("env")).unwrap();
        assert_eq!(
            (t.host.as_str(), t.password.as_str(), t.dir.as_str()),
            ("::1", "env", "a/b c")
        );
        assert!(!t.display().contains("env") && !t.display().contains("inurl"));
        assert!(Target::parse("ftp://u@:21/x", None).is_err());
        assert!(Target::parse("ftp://u@h:99999/x", None).is_err());
    }

    #[test]
    fn list_lines_of_real_servers() {
        let vs = "-rw-r--r--    1 999      0               6 Nov 25 23:00 POS1.spr.$1";
        assert_eq!(
            parse_list_line(vs),
            Some(Entry {
                name: "POS1.spr.$1".into(),
                size: 6,
                is_file: true
            })
        );
        let dir = "drwxr-xr-x    2 999      995          4096 Nov 25 23:00 .";
        assert!(!parse_list_line(dir).unwrap().is_file);
        let year =
            "-rw-------   1 owner group  1234567 Jan  3  2023 .kkm-bridge.0123456789abcdef.tmp";
        let e = parse_list_line(year).unwrap();
        assert_eq!(
            (e.name.as_str(), e.size),
            (".kkm-bridge.0123456789abcdef.tmp", 1234567)
        );
        let dos = "01-02-24  10:20AM                 1,234 POS2.rep.$10";
        assert_eq!(parse_list_line(dos).unwrap().size, 1234);
        assert_eq!(parse_list_line(dos).unwrap().name, "POS2.rep.$10");
        let dosdir = "01-02-24  10:20AM       <DIR>          sub";
        assert!(!parse_list_line(dosdir).unwrap().is_file);
        assert_eq!(parse_list_line("total 12"), None);
    }
}
