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
//! batch of up to 32 packages, which may span tills, pipelined so that the next batch is
//! uploaded while this one's journal commit is fsync'd (`FtpEndpoint::deliver_numbered`).
//! A refused rename deletes the temp file, leaves the package queued and stops its till
//! for the pass. Single-file mode writes only when the file is absent or (spr) its line 2
//! is `@`. Up to `connections` sessions write at once, each taking whole tills, so a
//! till's packages are renamed into place in order.
//!
//! Connections: at most `connections` at a time, each logged in, `TYPE I`, in the directory
//! of the URL; every command and every transfer chunk has the `timeout`; a connection that
//! saw any error other than a plain negative reply is dropped, never reused. Failing to connect puts the endpoint in the
//! "unreachable" state with exponential backoff (1 s … 30 s); the state change is logged once
//! each way, and meanwhile passes report the endpoint as failing without touching anything.
//! A connection lost mid-operation is logged once and reconnected on the next use.

use std::collections::{HashMap, HashSet, VecDeque};
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
use crate::package::{
    is_temp_name, spr_marked_loaded, temp_name_tagged, temp_tag, Kind, NamePattern, Package,
    TEMP_PREFIX, TEMP_SUFFIX,
};
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
    /// One per connection open, in a session or closing in the background.
    permits: Arc<tokio::sync::Semaphore>,
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
    /// Big spool files being uploaded ahead of their package's commit, by spool file
    /// name ([`FtpEndpoint::preload`]).
    preloads: Mutex<HashMap<String, Preload>>,
    /// Deliveries that found their bytes uploaded ahead.
    preloads_used: std::sync::atomic::AtomicU64,
    /// Whether the server understands `LIST -a` (shows dot files on vsftpd).
    list_a: AtomicBool,
    /// Whether `STAT <glob>` lists a batch's temps (vsftpd, ProFTPD); else SIZE each.
    stat_glob: AtomicBool,
    /// Whether RNFR and RNTO may go in one write (the server says it is vsftpd).
    pipeline_renames: AtomicBool,
    /// The server answered pipelined renames out of order: never pipelined again.
    out_of_order: AtomicBool,
    /// `tls = "explicit"`: the TLS client (one config, so sessions resume on the data
    /// connections, as vsftpd's `require_ssl_reuse` wants).
    tls: Option<tokio_rustls::TlsConnector>,
}

/// One checked-out connection slot. The connection goes back to the pool on drop unless
/// it was marked broken.
struct Session<'a> {
    ep: &'a FtpEndpoint,
    ftp: Option<AsyncFtpStream>,
    /// The slot this session's connection holds (given away by [`Session::retire`]).
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
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
    /// One step of a transfer (a data chunk, the final reply, a wave of pipelined renames)
    /// under the timeout. Unlike a plain command's negative reply, any failure here leaves
    /// the connection in an unknown state, so it is dropped.
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

    /// Leaves this session's connection to end in the background and goes on with
    /// another one, for after a big upload. vsftpd truncates each file it receives, and on
    /// ext4 its `close()` after the `226` then writes the whole file back (`strace`: 0.48 s
    /// for 1 GiB), answering nothing on the control connection meanwhile; the size check
    /// and the rename need not wait for that on another connection. Only when a slot is
    /// free (so never with `connections = 1`) and an idle connection or a new login is
    /// there at once; otherwise (a server that allows fewer logins, say) this one is kept
    /// and waited for, as before. `QUIT` is sent by a task that keeps the old slot until
    /// the server answers, so no more than `connections` are ever open.
    async fn retire(&mut self) {
        let Ok(permit) = self.ep.pool.permits.clone().try_acquire_owned() else {
            return;
        };
        let other = match self.ep.idle().await {
            Some(c) => c,
            None => match tokio::time::timeout(self.ep.config.timeout, self.ep.login()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::debug!(endpoint = %self.ep.name, "no second connection after a big upload ({e:#}); waiting on this one");
                    return;
                }
                Err(_) => return,
            },
        };
        self.close_in_background();
        self.ftp = Some(other);
        self.permit = Some(permit);
    }

    /// Sends `QUIT` from a task that keeps this session's slot until the server answers;
    /// the session is left without a connection and a slot.
    fn close_in_background(&mut self) {
        let (old, permit) = (self.ftp.take(), self.permit.take());
        let after = self.ep.config.timeout;
        tokio::spawn(async move {
            if let Some(mut old) = old {
                let _ = tokio::time::timeout(after, old.quit()).await;
            }
            drop(permit);
        });
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
        what: &str,
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
                            return Err(FtpFail::Other(
                                anyhow::Error::new(e)
                                    .context(format!("cannot read the payload of {what}")),
                            ));
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

    /// `STAT <glob>`: the matching entries, listed on the control connection (no data
    /// connection). Lines that are not listing lines are skipped.
    async fn stat_glob(&mut self, pattern: &str) -> Result<Vec<Entry>, FtpFail> {
        use suppaftp::Status;
        let r = cmd!(self, format!("STAT {pattern}"), |f| f.custom_command(
            format!("STAT {pattern}"),
            // Not 211 (System): suppaftp would end the reply at its first line. A server
            // answering 211 costs one reconnect, then SIZE is used.
            &[Status::File, Status::Directory]
        ))?;
        let text = String::from_utf8_lossy(&r.body);
        Ok(text
            .lines()
            .filter(|l| !(l.len() >= 4 && l.as_bytes()[..3].iter().all(u8::is_ascii_digit)))
            .filter_map(|l| parse_list_line(l.trim()))
            .filter(|e| e.is_file)
            .collect())
    }

    /// RNFR/RNTO. On a plain connection to vsftpd both go in one write, so the pair costs
    /// one round trip instead of two (`rename_pipelined`); elsewhere one after the other.
    async fn rename(&mut self, from: &str, to: &str) -> Result<(), FtpFail> {
        if self.pipelines_renames() && line_safe(from) && line_safe(to) {
            let out_of_order = &self.ep.out_of_order;
            cmd!(self, format!("RNFR {from} / RNTO {to}"), |f| {
                rename_pipelined(f, from, to, out_of_order)
            })
        } else {
            cmd!(self, format!("RNFR {from} / RNTO {to}"), |f| f
                .rename(from, to))
        }
    }

    /// Whether RNFR+RNTO may be written ahead of their replies on this session.
    fn pipelines_renames(&self) -> bool {
        self.ep.tls.is_none()
            && self.ep.pipeline_renames.load(Ordering::Relaxed)
            && !self.ep.out_of_order.load(Ordering::Relaxed)
    }

    /// Renames of different tills: in one write where [`Session::pipelines_renames`]
    /// (`rename_wave_pipelined`), else one pair after the other. One result per pair, in
    /// order, a refused pair leaving the connection in step; the results end early, with
    /// that error last, at a connection-level failure. A pipelined wave that fails so (the
    /// connection, or replies out of order) gives one error for its first pair: the session
    /// is dropped, and which of the wave's renames happened is for recovery to tell by the
    /// temps.
    async fn rename_wave(&mut self, pairs: &[(&str, &str)]) -> Vec<Result<(), FtpFail>> {
        let mut out = Vec::with_capacity(pairs.len());
        if !self.pipelines_renames() || !pairs.iter().all(|(a, b)| line_safe(a) && line_safe(b)) {
            for (from, to) in pairs {
                let r = self.rename(from, to).await;
                let lost = r.as_ref().is_err_and(|e| e.is_connection());
                out.push(r);
                if lost {
                    break;
                }
            }
            return out;
        }
        if let Err(e) = self.ftp().await {
            out.push(Err(e));
            return out;
        }
        let mut f = self.ftp.take().expect("connected above");
        let ep = self.ep;
        match self
            .transfer_step(
                || format!("{} pipelined RNFR/RNTO pairs", pairs.len()),
                rename_wave_pipelined(&mut f, pairs, &ep.out_of_order),
            )
            .await
        {
            Ok(results) => {
                self.ftp = Some(f);
                out.extend(results.into_iter().zip(pairs).map(|(r, (from, to))| {
                    r.map_err(|source| FtpFail::Cmd {
                        what: format!("RNFR {from} / RNTO {to}"),
                        source,
                    })
                }));
            }
            Err(e) => out.push(Err(e)),
        }
        out
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

/// RNFR and RNTO in one write on a plain control connection, then both replies in order.
/// The RNTO needs nothing from the RNFR's reply: if the RNFR fails, the server answers the
/// RNTO with 503 (no RNFR pending), both replies are read, and the connection stays in
/// step. suppaftp has no pipelining, so the two lines are written to its control socket
/// directly (`get_ref`); this is safe because suppaftp writes commands unbuffered and
/// reads replies through its own buffer, which the next `read_response_in` uses.
///
/// A server that answers the RNTO before the RNFR (the RNTO's slot holds the 350) gets
/// the pair again one after the other, and no more pipelining (`out_of_order`).
async fn rename_pipelined(
    f: &mut AsyncFtpStream,
    from: &str,
    to: &str,
    out_of_order: &AtomicBool,
) -> Result<(), FtpError> {
    write_raw(f, &format!("RNFR {from}\r\nRNTO {to}\r\n")).await?;
    match read_pair_replies(f, out_of_order).await? {
        PairReply::Done(r) => r,
        PairReply::OutOfOrder => f.rename(from, to).await,
    }
}

/// The replies to one pipelined RNFR/RNTO pair.
enum PairReply {
    /// In step: the pair's outcome (a refusal keeps the connection usable).
    Done(Result<(), FtpError>),
    /// The RNTO's slot held the RNFR's 350: the server answers out of order. The endpoint
    /// is marked (`out_of_order`) and never pipelines again.
    OutOfOrder,
}

/// Reads the two replies of a pipelined RNFR/RNTO pair; Err for a broken connection.
async fn read_pair_replies(
    f: &mut AsyncFtpStream,
    out_of_order: &AtomicBool,
) -> Result<PairReply, FtpError> {
    use suppaftp::Status;
    let rnfr = f.read_response_in(&[Status::RequestFilePending]).await;
    if let Err(FtpError::ConnectionError(e)) = rnfr {
        return Err(FtpError::ConnectionError(e));
    }
    // Some servers (e.g. bftpd) answer RNTO with 200 instead of 250.
    let rnto = f
        .read_response_in(&[Status::RequestedFileActionOk, Status::CommandOk])
        .await;
    match rnto {
        Err(FtpError::ConnectionError(e)) => Err(FtpError::ConnectionError(e)),
        Err(FtpError::UnexpectedResponse(r)) if r.status == Status::RequestFilePending => {
            tracing::warn!("the FTP server answered a pipelined RNTO before its RNFR; renaming one command at a time from now on");
            out_of_order.store(true, Ordering::Relaxed);
            Ok(PairReply::OutOfOrder)
        }
        rnto => Ok(PairReply::Done(rnfr.and(rnto).map(|_| ()))),
    }
}

/// A name that can go on a command line written by hand (no CR, LF or NUL).
fn line_safe(name: &str) -> bool {
    !name.contains(['\r', '\n', '\0'])
}

/// Writes command lines to suppaftp's plain control socket, bypassing it (no pipelining
/// in suppaftp; it writes its own commands unbuffered, so nothing is interleaved).
async fn write_raw(f: &mut AsyncFtpStream, lines: &str) -> Result<(), FtpError> {
    let sock = f.get_ref().await;
    let mut rest = lines.as_bytes();
    while !rest.is_empty() {
        sock.writable().await.map_err(FtpError::ConnectionError)?;
        match sock.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(FtpError::ConnectionError(e)),
        }
    }
    Ok(())
}

/// Several RNFR/RNTO pairs in one write, then two replies per pair, in order. Each pair
/// is a different till's, so one refused pair says nothing about the others (within a
/// till, renames stay one at a time: a refused one must stop the till's later ones).
/// Err for a broken connection, and for a reply out of order (an RNTO's slot holding a
/// 350): pipelining is switched off for the endpoint.
async fn rename_wave_pipelined(
    f: &mut AsyncFtpStream,
    pairs: &[(&str, &str)],
    out_of_order: &AtomicBool,
) -> Result<Vec<Result<(), FtpError>>, FtpError> {
    let mut lines = String::new();
    for (from, to) in pairs {
        lines.push_str(&format!("RNFR {from}\r\nRNTO {to}\r\n"));
    }
    write_raw(f, &lines).await?;
    let mut out = Vec::with_capacity(pairs.len());
    for _ in pairs {
        match read_pair_replies(f, out_of_order).await? {
            PairReply::Done(r) => out.push(r),
            PairReply::OutOfOrder => {
                return Err(FtpError::ConnectionError(std::io::Error::other(
                    "replies to pipelined renames out of order",
                )))
            }
        }
    }
    Ok(out)
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
                permits: Arc::new(tokio::sync::Semaphore::new(connections)),
                idle: Mutex::new(Vec::new()),
            },
            health: Mutex::new(Health {
                reachable: true,
                delay: BACKOFF_FIRST,
                next_try: None,
            }),
            seen: Mutex::new(HashMap::new()),
            preloads: Mutex::new(HashMap::new()),
            preloads_used: std::sync::atomic::AtomicU64::new(0),
            orphans: Mutex::new(Vec::new()),
            list_a: AtomicBool::new(true),
            stat_glob: AtomicBool::new(true),
            pipeline_renames: AtomicBool::new(false),
            out_of_order: AtomicBool::new(false),
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
        let permit = self.permit().await;
        self.session_with(permit).await
    }

    async fn session_with(&self, permit: tokio::sync::OwnedSemaphorePermit) -> Session<'_> {
        Session {
            ep: self,
            ftp: self.idle().await,
            permit: Some(permit),
        }
    }

    async fn permit(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.pool
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// An idle connection that still answers. One may have been closed by the server
    /// (idle timeout, restart): it is checked with NOOP and silently dropped if it does not
    /// answer.
    async fn idle(&self) -> Option<AsyncFtpStream> {
        loop {
            let mut idle = lock(&self.pool.idle).pop()?;
            if let Ok(Ok(())) = tokio::time::timeout(self.config.timeout, idle.noop()).await {
                return Some(idle);
            }
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
                // Pipelined renames only where they are known to work: vsftpd answers
                // commands in order. libunftp, for one, answers an RNTO sent right behind
                // its RNFR before the RNFR, and a server that handles a session's commands
                // concurrently could pair an RNTO with the wrong RNFR of a wave.
                let vsftpd = ftp.get_welcome_msg().is_some_and(|m| m.contains("vsFTPd"));
                self.pipeline_renames.store(vsftpd, Ordering::Relaxed);
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

    // ------------------------------------------------------------ uploads ahead

    /// Starts uploading a big file that a folder's take has just linked into the spool
    /// (`spool`, `size` bytes), to a temp name, while the take still hashes and fsyncs it:
    /// once the package is committed, its delivery finds the bytes on the server and only
    /// checks the size and renames (`FtpEndpoint::preloaded`).
    ///
    /// Nothing gets its final name before the package is committed and journaled as
    /// "delivering", as for any upload: a crash leaves only a temp, which the next start
    /// removes (no journal row names it); a take that does not commit (an error, or the
    /// file changed meanwhile) leaves the spool file gone, and the next recovery removes
    /// the temp. The spool link is the very file the take hashes, and the take's size and
    /// mtime check before and after covers both reads.
    ///
    /// Only in numbered mode, and only with a connection slot free right now: the upload
    /// holds a slot of its own from the start, so a delivery waiting for it never waits
    /// for a slot it holds itself.
    pub fn preload(self: &Arc<Self>, spool: &std::path::Path, size: u64) {
        if !self.config.numbered || size < BIG_UPLOAD {
            return;
        }
        let (Some(key), Ok(rt)) = (spool_key(spool), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let Ok(permit) = self.pool.permits.clone().try_acquire_owned() else {
            return;
        };
        let tag = temp_tag();
        let tmp = temp_name_tagged(&tag, 0);
        let (ep, path, name) = (self.clone(), spool.to_path_buf(), tmp.clone());
        let task = rt.spawn(async move { ep.upload_ahead(permit, &path, &name).await });
        tracing::debug!(endpoint = %self.name, spool = %spool.display(), "uploading {tmp} ahead of the commit");
        let path = spool.to_path_buf();
        lock(&self.preloads).insert(
            key,
            Preload {
                path,
                tag,
                tmp,
                task,
            },
        );
    }

    /// (uploads ahead not consumed yet, deliveries that used one so far).
    pub fn uploads_ahead(&self) -> (usize, u64) {
        (
            lock(&self.preloads).len(),
            self.preloads_used.load(Ordering::Relaxed),
        )
    }

    async fn upload_ahead(
        &self,
        permit: tokio::sync::OwnedSemaphorePermit,
        path: &std::path::Path,
        tmp: &str,
    ) -> Result<u64, FtpFail> {
        let file = std::fs::File::open(path).map_err(|e| {
            FtpFail::Other(anyhow::Error::new(e).context(format!("cannot open {}", path.display())))
        })?;
        let mut s = self.session_with(permit).await;
        let what = format!("the spool file {}", path.display());
        match s.stor(tmp, &what, crate::store::Payload::File(file)).await {
            Ok(sent) => {
                // The server may take a while to close the file (see `Session::retire`):
                // the delivery goes on its own connection meanwhile.
                s.close_in_background();
                Ok(sent)
            }
            Err(e) => {
                if s.dele(tmp).await.is_err() {
                    lock(&self.orphans).push(tmp.to_string());
                }
                Err(e)
            }
        }
    }

    /// The upload ahead of a batch's only package, once it is done and had all its bytes:
    /// (tag, temp). None when there was none, or it failed (it is then uploaded now).
    async fn preloaded(&self, batch: &[Planned]) -> Option<(String, String)> {
        let [one] = batch else {
            return None;
        };
        if one.pkg.inline {
            return None;
        }
        let key = spool_key(&one.pkg.payload)?;
        let p = lock(&self.preloads).remove(&key)?;
        let what = one.pkg.describe();
        match p.task.await {
            Ok(Ok(sent)) if sent == one.pkg.size => {
                self.preloads_used.fetch_add(1, Ordering::Relaxed);
                Some((p.tag, p.tmp))
            }
            Ok(Ok(sent)) => {
                tracing::warn!(endpoint = %self.name, "the upload ahead of {what} sent {sent} bytes, the package has {}; uploading it again", one.pkg.size);
                lock(&self.orphans).push(p.tmp);
                None
            }
            Ok(Err(e)) => {
                tracing::debug!(endpoint = %self.name, "the upload ahead of {what} failed ({e}); uploading it now");
                None
            }
            Err(e) => {
                tracing::debug!(endpoint = %self.name, "the upload ahead of {what}: {e}; uploading it now");
                lock(&self.orphans).push(p.tmp);
                None
            }
        }
    }

    /// Uploads ahead whose take did not commit (their spool file is gone): their temps
    /// become orphans, removed by this recovery.
    async fn sweep_preloads(&self) {
        let gone: Vec<Preload> = {
            let mut preloads = lock(&self.preloads);
            let keys: Vec<String> = preloads
                .iter()
                .filter(|(_, p)| p.task.is_finished() && !p.path.exists())
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| preloads.remove(k)).collect()
        };
        for p in gone {
            if let Ok(Ok(_)) = p.task.await {
                lock(&self.orphans).push(p.tmp);
            }
        }
    }

    // ------------------------------------------------------------ recovery

    /// Finishes what a crash or a dropped connection interrupted. Touches the server only
    /// when there is something to finish.
    pub async fn recover(&self, store: &Store) -> anyhow::Result<()> {
        self.sweep_preloads().await;
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
            let mut in_use = store.sink_temps_in_use(&self.name)?;
            in_use.extend(lock(&self.preloads).values().map(|p| p.tmp.clone()));
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
            listing.into_iter().filter(|e| e.is_file),
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
    /// go in batches (`FtpEndpoint::deliver_numbered`).
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

    /// One session's share of a delivery pass: tills from the shared list until it is
    /// empty, or until this session's connection fails (the other sessions go on).
    async fn deliver_worker(
        &self,
        first: Option<Session<'_>>,
        store: &Arc<Store>,
        shared: &Shared,
    ) -> DeliverReport {
        let mut s = match first {
            Some(s) => s,
            None => self.session().await,
        };
        if self.config.numbered {
            self.deliver_numbered(&mut s, store, shared).await
        } else {
            self.deliver_single_files(&mut s, store, shared).await
        }
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

    /// Numbered mode: batches of up to [`BATCH_MAX`] packages, filled from whole tills
    /// taken from the shared list in turn (a batch may span tills; a till is only ever
    /// written by one session, in order), pipelined so that the journal's fsync hides
    /// behind the network:
    ///
    /// 1. batch k+1 is uploaded to its temps (invisible to tills) while batch k's
    ///    "delivering" commit is fsync'd on the blocking pool;
    /// 2. then batch k is renamed into place, in order (`FtpEndpoint::rename_batch`);
    /// 3. then one journal step records batch k delivered (lazy) and batch k+1 delivering
    ///    (durable).
    ///
    /// A till that fails is stopped for this pass: its packages after the failing one are
    /// neither renamed nor uploaded (the refused ones are reset to "taken" first, the
    /// uploaded ones not yet journaled just lose their temps), so per till the renamed
    /// packages are always a prefix, in a crash too (recovery settles each "delivering"
    /// row by its temp, and removes temps no row names).
    async fn deliver_numbered(
        &self,
        s: &mut Session<'_>,
        store: &Arc<Store>,
        shared: &Shared,
    ) -> DeliverReport {
        let mut report = DeliverReport::default();
        let mut plan = Planner::default();
        // Batch k: uploaded, its "delivering" commit running.
        let mut pending: Option<(Vec<Uploaded>, JournalStep)> = None;
        let mut next = self.plan_batch(&mut plan, shared);
        let mut next_payloads = read_payloads(store, &next);
        loop {
            // 1. Upload batch k+1.
            let batch = std::mem::take(&mut next);
            let payloads = match next_payloads.await {
                Ok(p) => p,
                Err(e) => {
                    // The blocking pool is gone (shutting down): leave all to the next pass.
                    tracing::warn!(endpoint = %self.name, "reading payloads: {e}");
                    report.failed += batch.len() as u64 + plan.rest();
                    if let Some((ups, step)) = pending.take() {
                        let _ = step.wait().await;
                        report.failed += ups.len() as u64;
                    }
                    break;
                }
            };
            let up = self
                .upload_all(s, batch, payloads, &mut plan.stopped, &mut report)
                .await;
            // Plan batch k+2 and read its payloads while batch k is renamed.
            let conn_lost = up.conn_lost;
            if !conn_lost {
                next = self.plan_batch(&mut plan, shared);
            }
            next_payloads = read_payloads(store, &next);
            // 2. Rename batch k once its "delivering" commit is durable.
            let mut done = Vec::new();
            let mut lost = conn_lost;
            if let Some((ups, step)) = pending.take() {
                match step.wait().await {
                    Ok(()) => {
                        crash_point("after-delivering");
                        if lost {
                            // Renamed or not, recovery settles them by their temps.
                            report.failed += ups.len() as u64;
                        } else {
                            let r = self
                                .rename_batch(s, store, ups, &mut plan.stopped, &mut report)
                                .await;
                            lost = r.conn_lost;
                            done = r.done;
                        }
                    }
                    Err(e) => {
                        self.journal_failed(s, &e, &ups, &mut report).await;
                        // The journal cannot be written: nothing more this pass.
                        lost = true;
                    }
                }
            }
            // Batch k+1 loses what belongs to a till stopped since it was uploaded.
            let mut uploaded = Vec::with_capacity(up.ok.len());
            for u in up.ok {
                if lost || plan.stopped.contains(&u.planned.pkg.pos) {
                    report.busy += 1;
                    self.drop_temp(s, &u.tmp, lost).await;
                } else {
                    uploaded.push(u);
                }
            }
            // 3. Batch k delivered (lazy), batch k+1 delivering (durable), one step.
            let step = journal_step(store, &done, &uploaded);
            self.delivered(&shared.names, &done, &mut report);
            if lost {
                let _ = step.wait().await;
                report.failed += next.len() as u64 + plan.rest();
                next.clear();
                break;
            }
            if uploaded.is_empty() {
                if let Err(e) = step.wait().await {
                    tracing::error!(endpoint = %self.name, "{e}");
                }
                if next.is_empty() {
                    break;
                }
            } else {
                pending = Some((uploaded, step));
            }
        }
        // Tills stopped for this pass: what they still had queued.
        report.busy += plan.skipped;
        report
    }

    /// The next batch for this session: packages of its current till, then of further
    /// tills from the shared list while the batch has room (taking a further till only
    /// while the list has one for every session, so that sessions stay busy at the end).
    fn plan_batch(&self, plan: &mut Planner, shared: &Shared) -> Vec<Planned> {
        let names = lock(&shared.names);
        let sessions = self.config.connections.max(1) as usize;
        let mut batch: Vec<Planned> = Vec::new();
        let mut bytes = 0u64;
        loop {
            if plan.till.is_empty() {
                let mut tills = lock(&shared.tills);
                if !batch.is_empty() && tills.len() < sessions {
                    break;
                }
                match tills.pop_front() {
                    Some(t) => plan.till = t.into(),
                    None => break,
                }
            }
            let Some(next) = plan.till.front() else {
                continue;
            };
            if plan.stopped.contains(&next.pos) {
                plan.skipped += plan.till.len() as u64;
                plan.till.clear();
                continue;
            }
            if batch.len() >= BATCH_MAX || (!batch.is_empty() && bytes + next.size > BATCH_BYTES) {
                break;
            }
            let pkg = plan.till.pop_front().expect("peeked");
            let key = (pkg.pos, pkg.kind);
            let (final_name, n) = self.final_name(&pkg, &names, plan.highest.get(&key).copied());
            if let Some(n) = n {
                plan.highest.insert(key, n);
            }
            bytes += pkg.size;
            batch.push(Planned { pkg, final_name, n });
        }
        batch
    }

    /// Single-file mode: one package at a time, each till in order; the next package of a
    /// till is written only once the till has consumed the previous one.
    async fn deliver_single_files(
        &self,
        s: &mut Session<'_>,
        store: &Arc<Store>,
        shared: &Shared,
    ) -> DeliverReport {
        let mut report = DeliverReport::default();
        'tills: loop {
            let Some(till) = lock(&shared.tills).pop_front() else {
                break;
            };
            let mut rest = till.into_iter();
            while let Some(pkg) = rest.next() {
                let (final_name, _) = self.final_name(&pkg, &lock(&shared.names), None);
                let present = lock(&shared.names).present.get(&final_name).cloned();
                let wrote = match self.single_file_free(s, &pkg, &final_name, present).await {
                    Ok(true) => {
                        let planned = Planned {
                            pkg,
                            final_name,
                            n: None,
                        };
                        self.write_one(s, store, planned, &shared.names, &mut report)
                            .await
                    }
                    Ok(false) => {
                        report.busy += 1;
                        Wrote::Stopped
                    }
                    Err(e) => {
                        self.report_fail(&e, &format!("cannot deliver {}", pkg.describe()));
                        report.failed += 1;
                        if e.is_connection() {
                            Wrote::ConnLost
                        } else {
                            Wrote::Stopped
                        }
                    }
                };
                match wrote {
                    Wrote::Delivered => {}
                    Wrote::Stopped => {
                        report.busy += rest.len() as u64;
                        continue 'tills;
                    }
                    Wrote::ConnLost => {
                        report.busy += rest.len() as u64;
                        break 'tills;
                    }
                }
            }
        }
        report
    }

    /// Writes one package (single-file mode): upload to a temp, "delivering" (durable),
    /// rename, "delivered" (lazy).
    async fn write_one(
        &self,
        s: &mut Session<'_>,
        store: &Arc<Store>,
        planned: Planned,
        names: &Mutex<Names>,
        report: &mut DeliverReport,
    ) -> Wrote {
        let payloads = match read_payloads(store, std::slice::from_ref(&planned)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(endpoint = %self.name, "reading payloads: {e}");
                report.failed += 1;
                return Wrote::Stopped;
            }
        };
        let mut stopped = HashSet::new();
        let up = self
            .upload_all(s, vec![planned], payloads, &mut stopped, report)
            .await;
        if up.conn_lost {
            return Wrote::ConnLost;
        }
        if up.ok.is_empty() {
            return Wrote::Stopped;
        }
        if let Err(e) = journal_step(store, &[], &up.ok).wait().await {
            self.journal_failed(s, &e, &up.ok, report).await;
            return Wrote::Stopped;
        }
        crash_point("after-delivering");
        let r = self
            .rename_batch(s, store, up.ok, &mut stopped, report)
            .await;
        if let Err(e) = journal_step(store, &r.done, &[]).wait().await {
            // They are in place; recover() journals them on the next pass.
            tracing::error!(endpoint = %self.name, "{e}");
        }
        self.delivered(names, &r.done, report);
        if r.conn_lost {
            Wrote::ConnLost
        } else if r.done.is_empty() {
            Wrote::Stopped
        } else {
            Wrote::Delivered
        }
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

    /// Uploads a batch in order, each package to its own temp name (`FtpEndpoint::upload`).
    /// A package of a stopped till is skipped; a failed upload is reported and stops its
    /// till; a lost connection stops the batch (what it uploaded is for the caller to drop).
    async fn upload_all(
        &self,
        s: &mut Session<'_>,
        batch: Vec<Planned>,
        payloads: Vec<std::io::Result<crate::store::Payload>>,
        stopped: &mut HashSet<u32>,
        report: &mut DeliverReport,
    ) -> UploadOutcome {
        let mut ok = Vec::with_capacity(batch.len());
        let mut ahead = match batch.first() {
            Some(p) if !stopped.contains(&p.pkg.pos) => self.preloaded(&batch).await,
            _ => None,
        };
        let tag = ahead.as_ref().map_or_else(temp_tag, |(tag, _)| tag.clone());
        let mut it = batch.into_iter().zip(payloads).enumerate();
        while let Some((i, (planned, payload))) = it.next() {
            if stopped.contains(&planned.pkg.pos) {
                report.busy += 1;
                continue;
            }
            let what = planned.pkg.describe();
            let r = match (payload, ahead.take()) {
                (Ok(_), Some((_, tmp))) => Ok(tmp), // uploaded ahead of its commit
                (Ok(payload), None) => {
                    let tmp = temp_name_tagged(&tag, i);
                    self.upload(s, &tmp, &planned.pkg, payload)
                        .await
                        .map(|()| tmp)
                }
                (Err(e), unused) => {
                    if let Some((_, tmp)) = unused {
                        lock(&self.orphans).push(tmp);
                    }
                    Err(FtpFail::Other(
                        anyhow::Error::new(e).context(format!("cannot read the payload of {what}")),
                    ))
                }
            };
            match r {
                Ok(tmp) => ok.push(Uploaded { planned, tmp }),
                Err(e) => {
                    self.report_fail(&e, &format!("cannot deliver {what}"));
                    report.failed += 1;
                    stopped.insert(planned.pkg.pos);
                    if e.is_connection() {
                        report.busy += it.len() as u64;
                        for u in ok.drain(..) {
                            report.busy += 1;
                            self.drop_temp(s, &u.tmp, true).await;
                        }
                        return UploadOutcome {
                            ok,
                            conn_lost: true,
                        };
                    }
                }
            }
        }
        self.check_sizes(s, &tag, ok, stopped, report).await
    }

    /// Checks the server's size of every temp of a batch against its package: one
    /// `STAT .kkm-bridge.<tag>-*.tmp` for all (a listing on the control connection), SIZE
    /// for any it does not show. The check stays although each upload's final reply
    /// already said "complete": a server that ignores `TYPE I` (line ends converted) or a
    /// data connection cut by a middlebox with a clean FIN both end in `226` with other
    /// bytes on the server, and a till must never load a truncated price list. A temp of
    /// the wrong size is removed and stops its till, like a failed upload.
    async fn check_sizes(
        &self,
        s: &mut Session<'_>,
        tag: &str,
        ups: Vec<Uploaded>,
        stopped: &mut HashSet<u32>,
        report: &mut DeliverReport,
    ) -> UploadOutcome {
        let mut sizes: HashMap<String, u64> = HashMap::new();
        let stat = ups.len() > 1 && self.stat_glob.load(Ordering::Relaxed);
        if stat {
            match s
                .stat_glob(&format!("{TEMP_PREFIX}{tag}-*{TEMP_SUFFIX}"))
                .await
            {
                Ok(entries) => {
                    sizes.extend(entries.into_iter().map(|e| (e.name, e.size)));
                }
                Err(e) if e.is_connection() => return self.lost_batch(s, e, ups, report).await,
                Err(e) => {
                    tracing::debug!(endpoint = %self.name, "STAT refused ({e}); SIZE of each temp instead");
                    self.stat_glob.store(false, Ordering::Relaxed);
                }
            }
        }
        let listed = sizes.len();
        let mut ok = Vec::with_capacity(ups.len());
        let mut it = ups.into_iter();
        while let Some(u) = it.next() {
            if stopped.contains(&u.planned.pkg.pos) {
                report.busy += 1;
                self.drop_temp(s, &u.tmp, false).await;
                continue;
            }
            let want = u.planned.pkg.size;
            let have = match sizes.get(&u.tmp) {
                Some(n) => Some(*n),
                None => match s.size(&u.tmp).await {
                    Ok(n) => n,
                    Err(e) if e.code().is_some_and(|c| (500..=504).contains(&c)) => {
                        tracing::debug!(endpoint = %self.name, "SIZE not supported ({e}); size check skipped");
                        Some(want)
                    }
                    Err(e) if e.is_connection() => {
                        let mut rest = vec![u];
                        rest.append(&mut ok);
                        rest.extend(it);
                        return self.lost_batch(s, e, rest, report).await;
                    }
                    Err(e) => {
                        self.upload_failed(s, e, &u, stopped, report).await;
                        continue;
                    }
                },
            };
            match have {
                Some(n) if n == want => ok.push(u),
                other => {
                    let why = match other {
                        Some(n) => format!("the server has {n} bytes of {want}"),
                        None => "the uploaded temp file is gone".to_string(),
                    };
                    let e =
                        FtpFail::Other(anyhow::anyhow!("upload of {} incomplete: {why}", u.tmp));
                    self.upload_failed(s, e, &u, stopped, report).await;
                }
            }
        }
        if stat && listed == 0 && !ok.is_empty() {
            // SIZE found what STAT did not show: this server does not list that way.
            tracing::debug!(endpoint = %self.name, "STAT does not list the temps; SIZE of each temp instead");
            self.stat_glob.store(false, Ordering::Relaxed);
        }
        UploadOutcome {
            ok,
            conn_lost: false,
        }
    }

    /// A temp that failed its check: reported, removed, and its till stopped for the pass.
    async fn upload_failed(
        &self,
        s: &mut Session<'_>,
        e: FtpFail,
        u: &Uploaded,
        stopped: &mut HashSet<u32>,
        report: &mut DeliverReport,
    ) {
        self.report_fail(&e, &format!("cannot deliver {}", u.planned.pkg.describe()));
        report.failed += 1;
        stopped.insert(u.planned.pkg.pos);
        self.drop_temp(s, &u.tmp, false).await;
    }

    /// The connection was lost while a batch's temps were checked: the batch is not
    /// journaled, its temps are removed on the next recovery.
    async fn lost_batch(
        &self,
        s: &mut Session<'_>,
        e: FtpFail,
        ups: Vec<Uploaded>,
        report: &mut DeliverReport,
    ) -> UploadOutcome {
        if let Some(u) = ups.first() {
            self.report_fail(&e, &format!("cannot deliver {}", u.planned.pkg.describe()));
        }
        report.failed += 1;
        report.busy += ups.len().saturating_sub(1) as u64;
        for u in &ups {
            self.drop_temp(s, &u.tmp, true).await;
        }
        UploadOutcome {
            ok: Vec::new(),
            conn_lost: true,
        }
    }

    /// Renames a batch whose "delivering" commit is durable into place, each till's
    /// packages in order, in waves: each wave renames the next package of every till of
    /// the batch not stopped ([`Session::rename_wave`]: on vsftpd all pairs in one write,
    /// so 32 packages of 4 tills cost about 8 round trips instead of 32; elsewhere one pair
    /// after the other). A till's next package waits for the next wave, after its previous
    /// rename was answered.
    ///
    /// A refused rename (e.g. 553) stops its till: that package and the till's later ones
    /// in the batch are reset to "taken" (durably, before their temps go: once a temp is
    /// gone, "delivering" would read as done after a crash). A lost connection stops the
    /// batch; which of its renames happened is for recovery to tell by the temps, as for
    /// the rest, all journaled "delivering".
    async fn rename_batch(
        &self,
        s: &mut Session<'_>,
        store: &Arc<Store>,
        ups: Vec<Uploaded>,
        stopped: &mut HashSet<u32>,
        report: &mut DeliverReport,
    ) -> RenameOutcome {
        let mut done = Vec::with_capacity(ups.len());
        let mut reset: Vec<Uploaded> = Vec::new();
        let mut queue: Vec<Uploaded> = ups;
        while !queue.is_empty() {
            let mut wave: Vec<Uploaded> = Vec::new();
            let mut later: Vec<Uploaded> = Vec::new();
            let mut in_wave = HashSet::new();
            for u in queue.drain(..) {
                let pos = u.planned.pkg.pos;
                if stopped.contains(&pos) {
                    report.busy += 1;
                    reset.push(u);
                } else if in_wave.insert(pos) {
                    wave.push(u);
                } else {
                    later.push(u);
                }
            }
            queue = later;
            if wave.is_empty() {
                continue;
            }
            let pairs: Vec<(&str, &str)> = wave
                .iter()
                .map(|u| (u.tmp.as_str(), u.planned.final_name.as_str()))
                .collect();
            let results = s.rename_wave(&pairs).await;
            let mut wave = wave.into_iter();
            for r in results {
                let u = wave.next().expect("one result per pair at most");
                match r {
                    Ok(()) => {
                        crash_point("after-rename");
                        done.push(u);
                    }
                    Err(e) => {
                        self.report_fail(
                            &e,
                            &format!("cannot deliver {}", u.planned.pkg.describe()),
                        );
                        report.failed += 1;
                        if e.is_connection() {
                            // (`reset` were counted as they were set aside.)
                            report.busy += (wave.len() + queue.len()) as u64;
                            return RenameOutcome {
                                done,
                                conn_lost: true,
                            };
                        }
                        stopped.insert(u.planned.pkg.pos);
                        reset.push(u);
                    }
                }
            }
        }
        self.reset_refused(s, store, reset).await;
        RenameOutcome {
            done,
            conn_lost: false,
        }
    }

    /// Packages whose rename was refused, or whose till stopped before them: back to
    /// "taken" durably, then their temps go (once a temp is gone, "delivering" would read
    /// as done after a crash).
    async fn reset_refused(&self, s: &mut Session<'_>, store: &Arc<Store>, reset: Vec<Uploaded>) {
        if reset.is_empty() {
            return;
        }
        let ids: Vec<i64> = reset.iter().map(|u| u.planned.pkg.id).collect();
        let st = store.clone();
        match tokio::task::spawn_blocking(move || st.reset_to_taken_batch(&ids)).await {
            Ok(Ok(())) => {
                for u in &reset {
                    self.drop_temp(s, &u.tmp, false).await;
                }
            }
            // Still "delivering" with their temps: recover() resets them.
            Ok(Err(e)) => tracing::error!(endpoint = %self.name, "{e}"),
            Err(e) => tracing::error!(endpoint = %self.name, "journal step: {e}"),
        }
    }

    /// A batch whose "delivering" commit failed: its packages stay "taken", their temps go.
    async fn journal_failed(
        &self,
        s: &mut Session<'_>,
        e: &FtpFail,
        ups: &[Uploaded],
        report: &mut DeliverReport,
    ) {
        if let Some(u) = ups.first() {
            self.report_fail(e, &format!("cannot deliver {}", u.planned.pkg.describe()));
        }
        report.failed += 1;
        report.busy += ups.len().saturating_sub(1) as u64;
        for u in ups {
            self.drop_temp(s, &u.tmp, false).await;
        }
    }

    /// Removes a temp no journal row names: now, or on the next recovery when the
    /// connection is lost or the DELE fails.
    async fn drop_temp(&self, s: &mut Session<'_>, tmp: &str, lost: bool) {
        if lost || s.dele(tmp).await.is_err() {
            lock(&self.orphans).push(tmp.to_string());
        }
    }

    /// Packages renamed into place (and journaled delivered, lazily): the pass's names and
    /// the log.
    fn delivered(&self, names: &Mutex<Names>, done: &[Uploaded], report: &mut DeliverReport) {
        report.delivered += done.len() as u64;
        let mut names = lock(names);
        for u in done {
            let p = &u.planned;
            if let Some(n) = p.n {
                let h = names.highest.entry((p.pkg.pos, p.pkg.kind)).or_insert(0);
                *h = (*h).max(n);
            }
            names.present.insert(
                p.final_name.clone(),
                Entry {
                    name: p.final_name.clone(),
                    size: p.pkg.size,
                    is_file: true,
                },
            );
            let pkg = &p.pkg;
            tracing::info!(endpoint = %self.name, link = %pkg.link, till = pkg.pos, kind = %pkg.kind, package = pkg.id, bytes = pkg.size, "delivered {}", p.final_name);
        }
    }

    /// STOR to `tmp` and checks our byte count and the final reply (in `stor`); the
    /// server's size of the temp is checked per batch (`FtpEndpoint::check_sizes`). On
    /// failure the temp is removed now, or on a later pass.
    async fn upload(
        &self,
        s: &mut Session<'_>,
        tmp: &str,
        pkg: &Package,
        payload: crate::store::Payload,
    ) -> Result<(), FtpFail> {
        let sent = match s.stor(tmp, &pkg.describe(), payload).await {
            Ok(n) => n,
            Err(e) => {
                // Delete the partial temp now if the connection still works, else later.
                if s.dele(tmp).await.is_err() {
                    lock(&self.orphans).push(tmp.to_string());
                }
                return Err(e);
            }
        };
        if sent != pkg.size {
            if s.dele(tmp).await.is_err() {
                lock(&self.orphans).push(tmp.to_string());
            }
            return Err(FtpFail::Other(anyhow::anyhow!(
                "upload of {tmp} incomplete: sent {sent} bytes, the package has {}",
                pkg.size
            )));
        }
        if sent >= BIG_UPLOAD {
            s.retire().await;
        }
        Ok(())
    }
}

/// An upload at least this big leaves its connection to close in the background
/// ([`Session::retire`]): the wait it saves grows with the size (about 0.45 ms per MiB on
/// vsftpd/ext4), a new login costs a few ms. A folder's file this big is uploaded ahead
/// of its commit ([`FtpEndpoint::preload`]).
const BIG_UPLOAD: u64 = 32 << 20;

/// An upload started ahead of its package's commit.
struct Preload {
    /// The spool file it reads (gone: the take did not commit it).
    path: std::path::PathBuf,
    tag: String,
    tmp: String,
    /// The bytes sent, once the server confirmed the transfer.
    task: tokio::task::JoinHandle<Result<u64, FtpFail>>,
}

/// The key of a spool file among the preloads: its file name (random, unique in the
/// spool).
fn spool_key(path: &std::path::Path) -> Option<String> {
    Some(path.file_name()?.to_str()?.to_string())
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

/// A package uploaded to its temp name.
struct Uploaded {
    planned: Planned,
    tmp: String,
}

struct UploadOutcome {
    /// Uploaded, in order.
    ok: Vec<Uploaded>,
    conn_lost: bool,
}

struct RenameOutcome {
    /// Renamed into place, in order.
    done: Vec<Uploaded>,
    conn_lost: bool,
}

/// How writing one package (single-file mode) ended.
enum Wrote {
    Delivered,
    /// Not written now (reported); the till's later packages wait for the next pass.
    Stopped,
    ConnLost,
}

/// A session's planning state in numbered mode.
#[derive(Default)]
struct Planner {
    /// The rest of the till being planned, in order.
    till: VecDeque<Package>,
    /// The last `.$n` planned per till and kind: the next is planned above it.
    highest: HashMap<(u32, Kind), u32>,
    /// Tills stopped for this pass by a failure.
    stopped: HashSet<u32>,
    /// Packages of stopped tills that were never planned.
    skipped: u64,
}

impl Planner {
    /// Packages of the current till not planned yet.
    fn rest(&self) -> u64 {
        self.till.len() as u64
    }
}

/// A journal step running on the blocking pool (a durable commit waits for an fsync; the
/// session goes on meanwhile).
struct JournalStep(tokio::task::JoinHandle<crate::store::Result<()>>);

impl JournalStep {
    async fn wait(self) -> Result<(), FtpFail> {
        match self.0.await {
            Ok(r) => r.map_err(FtpFail::from),
            Err(e) => Err(FtpFail::Other(anyhow::anyhow!("journal step: {e}"))),
        }
    }
}

/// One journal step for the pipeline: `done` delivered (a lazy commit: each was renamed
/// after a durable "delivering" with its temp, so recovery can redo it), then
/// `delivering` begun (durable: it is what tells a crash after a rename apart).
fn journal_step(store: &Arc<Store>, done: &[Uploaded], delivering: &[Uploaded]) -> JournalStep {
    let delivered: Vec<(i64, Option<String>, Option<i64>)> = done
        .iter()
        .map(|u| {
            let p = &u.planned;
            (p.pkg.id, Some(p.final_name.clone()), p.n.map(i64::from))
        })
        .collect();
    let rows: Vec<(i64, String, String)> = delivering
        .iter()
        .map(|u| {
            (
                u.planned.pkg.id,
                u.planned.final_name.clone(),
                u.tmp.clone(),
            )
        })
        .collect();
    let st = store.clone();
    JournalStep(tokio::task::spawn_blocking(move || {
        if let Err(e) = st.mark_delivered_batch(&delivered) {
            // They are in place; recover() journals them on the next pass.
            tracing::error!("{e}");
        }
        st.mark_delivering_batch(&rows)
    }))
}

/// Reads the payloads of a batch on the blocking pool (inline ones from the journal, big
/// ones as open spool files).
fn read_payloads(
    store: &Arc<Store>,
    batch: &[Planned],
) -> tokio::task::JoinHandle<Vec<std::io::Result<crate::store::Payload>>> {
    let pkgs: Vec<Package> = batch.iter().map(|p| p.pkg.clone()).collect();
    let st = store.clone();
    tokio::task::spawn_blocking(move || pkgs.iter().map(|p| st.payload(p)).collect())
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
