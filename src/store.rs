//! The durable store: an SQLite journal (WAL, `synchronous = FULL`) holding small payloads
//! inline, and a spool of payload files under `state_dir` for big ones.
//!
//! Commit points (ARCHITECTURE.md):
//! 1. **taken**: the payload is in its journal row (≤ [`INLINE_MAX`]) or in a spool file
//!    (fsync'd, directory fsync'd), and its journal row is committed. Only then is the source told (file deleted, DELE, errcode "0").
//!    `source_done` records that the source was told, so a crash in between is finished on
//!    the next start instead of taking the file twice.
//! 2. **delivering**: the sink's temp name and final name are committed before the rename,
//!    so a crash around the rename can be resolved by looking at the temp file.
//! 3. **delivered**: the sink has it; the payload (inline bytes or spool file) is freed.
//!
//! Sources and sinks that move many packages commit in batches (one transaction for many
//! rows), and journal "source done" and "delivered" as *lazy* commits, which recovery can
//! redo from what it finds at the endpoint; see `lazy_tx`.
//!
//! Small payloads are inline because a new file's fsync (and its directory's) costs ~9× a
//! WAL append; big ones are files so that they stream and the journal stays small. One process per `state_dir`: an exclusive lock on `state_dir/lock`.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::package::{Direction, Kind, Package};

mod group;
pub use group::{NewReport, ReportOutcome};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state_dir {dir}: another kkm-bridge process is using it{holder}; stop it first (a `run` daemon and a `sync` must not share a state_dir at the same time)")]
    Locked { dir: String, holder: String },
    #[error("state_dir {dir}: {what}: {source}")]
    Io {
        dir: String,
        what: String,
        source: io::Error,
    },
    #[error("journal {file}: {source}")]
    Sql {
        file: String,
        source: rusqlite::Error,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What a source says about a package it hands over.
#[derive(Debug, Clone)]
pub struct Taken<'a> {
    pub link: &'a str,
    pub pos: u32,
    pub kind: Kind,
    pub uid: Option<&'a str>,
    pub source_endpoint: &'a str,
    pub source_name: &'a str,
    pub source_seq: Option<i64>,
    pub sink_endpoint: &'a str,
}

/// Payloads up to this size are kept inline in the journal row: creating and fsyncing a
/// new file (and its directory) costs ~9× a WAL append for a 1 KiB package (measured by
/// `examples/bench_store.rs`, README "Where payloads live"). Bigger ones stream to files.
pub const INLINE_MAX: usize = 64 << 10;

/// A payload ready to be committed: inline bytes, or a spool file already fsync'd.
#[derive(Debug)]
pub struct Spooled {
    /// The spool file name (relative to spool/); empty for an inline payload.
    pub file_name: String,
    /// The spool file; empty for an inline payload.
    pub path: PathBuf,
    /// The bytes, when small enough to live in the journal row.
    pub inline: Option<Vec<u8>>,
    pub sha256: String,
    pub size: u64,
}

/// Where a writer's bytes are: in memory until they outgrow [`INLINE_MAX`], then in a new
/// spool file.
enum Sink {
    Memory(Vec<u8>),
    File {
        file: File,
        path: PathBuf,
        file_name: String,
        dir: PathBuf,
        /// Bytes handed to the disk's writeback so far (see [`WRITEBACK_STEP`]).
        written_back: u64,
    },
}

/// A big spool file is handed to the disk's writeback every this many bytes while it is
/// written, so that `finish`'s fsync waits for the last few MiB rather than for all of it.
/// 1 GiB SendData on the bench VM: the final fsync went from ~300 ms to ~2 ms, the whole
/// request from 2.16 to 2.0 s (mean of 4, noisy); on a disk slower than the copy it
/// saves the whole overlap.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts writing `len` bytes of `file` from `offset` to disk without waiting
/// (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`; elsewhere nothing: the fsync does it).
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; no memory is passed. A failure
        // only means the final fsync has more to do.
        let _ = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as _,
                len as _,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Writes a payload, hashing as it goes: small payloads stay in memory (to be committed
/// inline), big ones spill to a spool file.
pub struct SpoolWriter {
    sink: Sink,
    spool: PathBuf,
    /// None when the caller hashes the bytes itself, on another thread
    /// ([`SpoolWriter::unhashed`], [`SpoolWriter::finish_hashed`]).
    hasher: Option<Sha256>,
    size: u64,
    /// Set by [`SpoolWriter::finish`]; a writer dropped before (a failed copy, a full
    /// disk) removes its partial file, so failures do not fill the disk further.
    finished: bool,
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if let (false, Sink::File { path, .. }) = (self.finished, &self.sink) {
            let _ = fs::remove_file(path);
        }
    }
}

impl Write for SpoolWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Sink::Memory(mem) = &mut self.sink {
            if mem.len() + buf.len() <= INLINE_MAX {
                mem.extend_from_slice(buf);
                if let Some(h) = &mut self.hasher {
                    h.update(buf);
                }
                self.size += buf.len() as u64;
                return Ok(buf.len());
            }
            let spilled = std::mem::take(mem);
            self.sink = new_spool_file(&self.spool)?;
            if let Sink::File { file, .. } = &mut self.sink {
                file.write_all(&spilled)?;
            }
        }
        let Sink::File {
            file, written_back, ..
        } = &mut self.sink
        else {
            unreachable!("spilled above")
        };
        let n = file.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.size += n as u64;
        if self.size - *written_back >= WRITEBACK_STEP {
            start_writeback(file, *written_back, self.size - *written_back);
            *written_back = self.size;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Memory(_) => Ok(()),
            Sink::File { file, .. } => file.flush(),
        }
    }
}

/// A new, empty spool file in a random shard directory.
fn new_spool_file(spool: &Path) -> io::Result<Sink> {
    use rand::Rng;
    let r: u64 = rand::thread_rng().gen();
    let shard = format!("{:02x}", r >> 56);
    let dir = spool.join(&shard);
    fs::create_dir_all(&dir)?;
    let name = format!("{r:016x}.pkg");
    let path = dir.join(&name);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok(Sink::File {
        file,
        path,
        file_name: format!("{shard}/{name}"),
        dir,
        written_back: 0,
    })
}

impl SpoolWriter {
    /// Makes the payload durable: a spool file and its directory are fsync'd; an inline
    /// payload becomes durable with its journal row.
    pub fn finish(mut self) -> io::Result<Spooled> {
        let sha256 = match self.hasher.take() {
            Some(h) => hex::encode(h.finalize()),
            None => {
                return Err(io::Error::other(
                    "an unhashed spool writer is finished with finish_hashed",
                ))
            }
        };
        self.finish_inner(sha256)
    }

    /// A writer that does not hash: for a caller that hashes the same bytes on a thread of
    /// its own (the hash and the page-cache copy of a big download then run on two cores)
    /// and passes the result to [`SpoolWriter::finish_hashed`].
    pub fn unhashed(mut self) -> SpoolWriter {
        self.hasher = None;
        self
    }

    /// [`SpoolWriter::finish`] for an [`SpoolWriter::unhashed`] writer: `sha256` (hex) is
    /// the hash of exactly the bytes written.
    pub fn finish_hashed(self, sha256: String) -> io::Result<Spooled> {
        debug_assert!(self.hasher.is_none(), "finish_hashed on a hashing writer");
        self.finish_inner(sha256)
    }

    fn finish_inner(mut self, sha256: String) -> io::Result<Spooled> {
        let size = self.size;
        let spooled = match &mut self.sink {
            Sink::Memory(mem) => Spooled {
                file_name: String::new(),
                path: PathBuf::new(),
                inline: Some(std::mem::take(mem)),
                sha256,
                size,
            },
            Sink::File {
                file,
                path,
                file_name,
                dir,
                ..
            } => {
                file.sync_all()?;
                sync_dir(dir)?;
                Spooled {
                    file_name: std::mem::take(file_name),
                    path: std::mem::take(path),
                    inline: None,
                    sha256,
                    size,
                }
            }
        };
        self.finished = true;
        Ok(spooled)
    }

    /// The spool file this writer has spilled to, if any.
    pub fn path(&self) -> Option<&Path> {
        match &self.sink {
            Sink::Memory(_) => None,
            Sink::File { path, .. } => Some(path),
        }
    }
}

impl Spooled {
    /// Throws away a payload that will not be committed.
    pub fn discard(self) {
        if self.inline.is_none() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A package's bytes, from the journal row or its spool file.
pub enum Payload {
    Inline(io::Cursor<Vec<u8>>),
    File(File),
}

impl Read for Payload {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Payload::Inline(c) => c.read(buf),
            Payload::File(f) => f.read(buf),
        }
    }
}

impl Payload {
    /// For async writers (FTP uploads).
    pub fn into_async(self) -> std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>> {
        match self {
            Payload::Inline(c) => Box::pin(c),
            Payload::File(f) => Box::pin(tokio::fs::File::from_std(f)),
        }
    }
}

/// A package whose sink write was begun: its temp and final names at the sink.
#[derive(Debug, Clone)]
pub struct Delivering {
    pub package: Package,
    pub sink_name: String,
    pub sink_tmp: String,
}

/// A taken package whose source may not have been told yet.
#[derive(Debug, Clone)]
pub struct SourcePending {
    pub id: i64,
    pub pos: u32,
    pub kind: Kind,
    pub source_name: String,
    pub sha256: String,
    pub size: u64,
}

/// What an HTTP endpoint last served to one till (PROTOCOL.md §4.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The number the till asked for.
    pub number: i64,
    /// The package served under it; `None` once acknowledged with nothing queued after it.
    pub package_id: Option<i64>,
    /// How many times the till asked for an unexpected number (counter reset, reinstall).
    pub resets: i64,
}

/// Counts for the end-of-run summary and the status view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub queued: u64,
    pub delivered: u64,
}

pub struct Store {
    dir: PathBuf,
    spool: PathBuf,
    /// Files derived from payloads, never the only copy of anything: ReceiveData replies
    /// of big packages (encoded once), ZIPs being unpacked. Emptied at open.
    scratch: PathBuf,
    db_file: String,
    conn: Mutex<Connection>,
    /// SendData reports waiting to be committed together (see `group.rs`).
    group: group::GroupCommit,
    /// Bumped after every commit that queues a package towards the tills, so that a
    /// cached "nothing for this till" (ReceiveData) knows when to look again.
    down_generation: std::sync::atomic::AtomicU64,
    /// The same generation, for tasks that wait for it to change (the HTTP service's
    /// background encoder of big replies, `watch_down`).
    down_watch: tokio::sync::watch::Sender<u64>,
    /// Changes after every commit that queues a package in either direction (`sync`
    /// delivers while its sources are still being taken, `watch_queued`).
    queued_watch: tokio::sync::watch::Sender<u64>,
    /// Set by a lazy commit (see [`Store::mark_delivered_batch`]): the WAL holds commits
    /// that are not fsync'd yet; [`Store::sync_lazy`] makes them durable.
    lazy_pending: std::sync::atomic::AtomicBool,
    /// The exclusive lock; `None` for a read-only store (`status`, `journal`).
    _lock: Option<File>,
}

const MIGRATIONS: &[&str] = &[
    // 1: the journal, one row per package.
    "CREATE TABLE package (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        link TEXT NOT NULL,
        pos INTEGER NOT NULL,
        direction TEXT NOT NULL,
        kind TEXT NOT NULL,
        uid TEXT,
        source_endpoint TEXT NOT NULL,
        source_name TEXT NOT NULL,
        source_seq INTEGER,
        source_done INTEGER NOT NULL DEFAULT 0,
        sink_endpoint TEXT NOT NULL,
        sink_name TEXT,
        sink_seq INTEGER,
        sink_tmp TEXT,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        spool TEXT,
        state TEXT NOT NULL,
        taken_at INTEGER NOT NULL,
        delivered_at INTEGER
    );
    CREATE INDEX package_queue ON package (link, direction, state, pos, id);
    CREATE INDEX package_source ON package (source_endpoint, source_done);
    CREATE INDEX package_source_seq ON package (source_endpoint, pos, source_seq);
    CREATE INDEX package_sink ON package (sink_endpoint, state);",
    // 2: what an HTTP endpoint last served to each till, under which number
    // (PROTOCOL.md §4.1). `package_id` NULL: the last package was acknowledged and nothing
    // was queued; `resets` counts requests with an unexpected number.
    "CREATE TABLE served (
        endpoint TEXT NOT NULL,
        pos INTEGER NOT NULL,
        number INTEGER NOT NULL,
        package_id INTEGER,
        resets INTEGER NOT NULL DEFAULT 0,
        served_at INTEGER NOT NULL,
        PRIMARY KEY (endpoint, pos)
    );",
    // 3: package counters of the bridge acting as a till (http-client): the next number
    // to request (dir 'receive') and the next report number to send (dir 'send').
    "CREATE TABLE client_counter (
        endpoint TEXT NOT NULL,
        pos INTEGER NOT NULL,
        dir TEXT NOT NULL,
        next INTEGER NOT NULL,
        PRIMARY KEY (endpoint, pos, dir)
    );",
    // 4: small payloads inline in the journal row (see INLINE_MAX).
    "ALTER TABLE package ADD COLUMN payload BLOB;",
    // 5: the undelivered packages that have a spool file (the big ones), per sink, so that
    // the HTTP service finds the replies it should encode ahead without scanning every
    // queued row (`Store::big_pending`). Partial: only those rows are in it.
    "CREATE INDEX package_big_pending ON package (sink_endpoint, pos, id)
        WHERE spool IS NOT NULL AND state != 'delivered';",
];

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Inserts the journal row of a taken package (state 'taken'). Every caller calls
/// [`Store::queued`] once its transaction has committed (not before: a ReceiveData poll
/// that read the generation first must not cache "no data" over a committed package).
fn insert_taken(
    c: &Connection,
    t: &Taken<'_>,
    spooled: &Spooled,
    source_done: bool,
) -> rusqlite::Result<i64> {
    // Cached: the report committer inserts thousands of rows a second (SendData); parsing
    // this statement anew for each was ~12% of the committer thread's user time (perf).
    c.prepare_cached(
        "INSERT INTO package (link, pos, direction, kind, uid, source_endpoint, source_name,
            source_seq, source_done, sink_endpoint, sha256, size, spool, payload, state, taken_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 'taken', ?15)",
    )?
    .execute(params![
        t.link,
        t.pos,
        t.kind.direction().as_str(),
        t.kind.as_str(),
        t.uid,
        t.source_endpoint,
        t.source_name,
        t.source_seq,
        source_done,
        t.sink_endpoint,
        spooled.sha256,
        spooled.size as i64,
        spooled.inline.is_none().then_some(&spooled.file_name),
        spooled.inline.as_deref(),
        now_ms(),
    ])?;
    Ok(c.last_insert_rowid())
}

/// Opens an existing file to read it and fsync it. Windows' `FlushFileBuffers` needs write
/// access (a read-only handle fails with "Access denied", os error 5), so there the file is
/// opened for writing too (nothing is written); elsewhere read-only is enough.
pub fn open_to_sync(path: &Path) -> io::Result<File> {
    #[cfg(windows)]
    {
        fs::OpenOptions::new().read(true).write(true).open(path)
    }
    #[cfg(not(windows))]
    {
        File::open(path)
    }
}

/// fsyncs a directory so that a rename or a new file in it survives a power cut.
/// (Windows cannot open directories for this; NTFS journals renames itself.)
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

impl Store {
    /// Opens (creating if needed) the store under `state_dir` and takes its lock.
    pub fn open(state_dir: &Path) -> Result<Store> {
        let dir_s = state_dir.display().to_string();
        let io_err = |what: &str, source: io::Error| StoreError::Io {
            dir: dir_s.clone(),
            what: what.to_string(),
            source,
        };
        fs::create_dir_all(state_dir).map_err(|e| io_err("cannot create it", e))?;
        let lock_path = state_dir.join("lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| io_err("cannot open the lock file", e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(StoreError::Locked {
                    dir: dir_s,
                    holder: if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {holder})")
                    },
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock it", e)),
        }
        lock.set_len(0).ok();
        let _ = write!(lock, "{}", std::process::id());
        let _ = lock.flush();

        let spool = state_dir.join("spool");
        fs::create_dir_all(&spool).map_err(|e| io_err("cannot create spool/", e))?;
        // Whatever a previous process left there (a reply cache, a half-written temp file)
        // is derived from the store and can be made again.
        let scratch = state_dir.join("tmp");
        match fs::remove_dir_all(&scratch) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("cannot empty tmp/", e))
            }
            _ => {}
        }
        fs::create_dir_all(&scratch).map_err(|e| io_err("cannot create tmp/", e))?;
        let db_path = state_dir.join("journal.sqlite");
        let db_file = db_path.display().to_string();
        let sql = |source| StoreError::Sql {
            file: db_file.clone(),
            source,
        };
        let conn = Connection::open(&db_path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql)?;
        // Every pending migration in one transaction: a new store costs one commit (one
        // fsync) instead of one per migration, and a crash leaves the old version whole.
        if (version as usize) < MIGRATIONS.len() {
            let mut batch = String::from("BEGIN;");
            for m in MIGRATIONS.iter().skip(version as usize) {
                batch.push_str(m);
                batch.push(';');
            }
            batch.push_str(&format!(
                "PRAGMA user_version = {}; COMMIT;",
                MIGRATIONS.len()
            ));
            conn.execute_batch(&batch).map_err(sql)?;
        }
        let store = Store {
            dir: state_dir.to_path_buf(),
            spool,
            scratch,
            db_file,
            conn: Mutex::new(conn),
            group: Default::default(),
            down_generation: Default::default(),
            down_watch: tokio::sync::watch::Sender::new(0),
            queued_watch: tokio::sync::watch::Sender::new(0),
            lazy_pending: std::sync::atomic::AtomicBool::new(false),
            _lock: Some(lock),
        };
        store.remove_orphan_spool_files()?;
        Ok(store)
    }

    /// Opens the journal for reading only, without the lock, so that `status` and
    /// `journal` work while a `run` daemon or a `sync` holds the store (WAL lets readers
    /// read while the writer writes). A state_dir that has no journal yet reads as empty.
    pub fn open_read_only(state_dir: &Path) -> Result<Store> {
        use rusqlite::OpenFlags;
        let db_path = state_dir.join("journal.sqlite");
        let db_file = db_path.display().to_string();
        let sql = |source| StoreError::Sql {
            file: db_file.clone(),
            source,
        };
        let conn = if db_path.exists() {
            let conn = Connection::open_with_flags(
                &db_path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(sql)?;
            conn.busy_timeout(std::time::Duration::from_secs(10))
                .map_err(sql)?;
            let version: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(sql)?;
            if version == 0 {
                // Created but not migrated yet: nothing has moved.
                Self::empty_journal().map_err(sql)?
            } else {
                conn
            }
        } else {
            Self::empty_journal().map_err(sql)?
        };
        Ok(Store {
            dir: state_dir.to_path_buf(),
            spool: state_dir.join("spool"),
            scratch: state_dir.join("tmp"),
            db_file,
            conn: Mutex::new(conn),
            group: Default::default(),
            down_generation: Default::default(),
            down_watch: tokio::sync::watch::Sender::new(0),
            queued_watch: tokio::sync::watch::Sender::new(0),
            lazy_pending: std::sync::atomic::AtomicBool::new(false),
            _lock: None,
        })
    }

    /// An in-memory journal with the current schema and no rows.
    fn empty_journal() -> rusqlite::Result<Connection> {
        let conn = Connection::open_in_memory()?;
        for m in MIGRATIONS {
            conn.execute_batch(m)?;
        }
        Ok(conn)
    }

    /// Deletes journal rows of packages delivered before `now - older_than`, keeping the
    /// newest delivered row of every (link, till, direction) so that the status view still knows the
    /// last package. Undelivered packages are never pruned. Returns the rows deleted.
    pub fn prune(&self, older_than: std::time::Duration) -> Result<u64> {
        let cutoff = now_ms() - older_than.as_millis().min(i64::MAX as u128) as i64;
        let n = self
            .conn()
            .execute(
                "DELETE FROM package WHERE state = 'delivered' AND delivered_at < ?1
                 AND id NOT IN (SELECT MAX(id) FROM package WHERE state = 'delivered'
                                GROUP BY link, pos, direction)",
                params![cutoff],
            )
            .map_err(|e| self.sql(e))?;
        Ok(n as u64)
    }

    /// Runs [`Store::prune`] if the last prune (recorded in `state_dir/last-prune`) is more
    /// than an hour old, so that `sync` from cron and the daemon prune at most once an hour.
    pub fn prune_if_due(&self, retention: Option<std::time::Duration>) -> Result<Option<u64>> {
        let Some(retention) = retention else {
            return Ok(None);
        };
        if self._lock.is_none() {
            return Ok(None);
        }
        let marker = self.dir.join("last-prune");
        let due = match fs::metadata(&marker).and_then(|m| m.modified()) {
            Ok(t) => t.elapsed().map(|e| e.as_secs() >= 3600).unwrap_or(true),
            Err(_) => true,
        };
        if !due {
            return Ok(None);
        }
        let n = self.prune(retention)?;
        fs::write(&marker, now_ms().to_string())
            .map_err(|e| self.io("cannot write last-prune", e))?;
        if n > 0 {
            tracing::info!(rows = n, "pruned journal rows older than the retention");
        }
        Ok(Some(n))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where derived files go (see the `scratch` field); on the spool's file system.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    /// The ReceiveData reply of package `id`, once encoded (`stream_codec::ReplyCache`).
    /// Removed with the package's payload.
    pub fn reply_cache_path(&self, id: i64) -> PathBuf {
        self.scratch.join(format!("reply-{id}.json"))
    }

    /// Frees a package's payload file and what was derived from it.
    fn free_payload_file(&self, id: i64, spool: &str) {
        let _ = fs::remove_file(self.spool.join(spool));
        let _ = fs::remove_file(self.reply_cache_path(id));
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sql {
            file: self.db_file.clone(),
            source,
        }
    }

    fn io(&self, what: impl Into<String>, source: io::Error) -> StoreError {
        StoreError::Io {
            dir: self.dir.display().to_string(),
            what: what.into(),
            source,
        }
    }

    /// Spool files not referenced by any journal row were written by a process that died
    /// before committing them: their source still has the data, so they go.
    fn remove_orphan_spool_files(&self) -> Result<()> {
        let referenced: HashSet<String> = {
            let conn = self.conn();
            let mut st = conn
                .prepare("SELECT spool FROM package WHERE spool IS NOT NULL")
                .map_err(|e| self.sql(e))?;
            let rows = st
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(|e| self.sql(e))?;
            rows.collect::<std::result::Result<_, _>>()
                .map_err(|e| self.sql(e))?
        };
        for entry in walkdir::WalkDir::new(&self.spool).min_depth(2).max_depth(2) {
            let entry = entry.map_err(|e| self.io("cannot scan spool/", e.into()))?;
            if !entry.file_type().is_file() {
                continue;
            }
            let rel = entry
                .path()
                .strip_prefix(&self.spool)
                .expect("walkdir stays under its root")
                .to_string_lossy()
                .replace('\\', "/");
            if !referenced.contains(&rel) {
                tracing::info!(file = %entry.path().display(), "removing a spool file no journal row references (left by a crash)");
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// A writer for a new payload (in memory while small, else a new spool file).
    pub fn spool_writer(&self) -> Result<SpoolWriter> {
        Ok(SpoolWriter {
            sink: Sink::Memory(Vec::new()),
            spool: self.spool.clone(),
            hasher: Some(Sha256::new()),
            size: 0,
            finished: false,
        })
    }

    /// Spools a big file of a local source without copying its bytes: a hard link in the
    /// spool (same filesystem only), its sha256 read once, the file and the spool directory
    /// fsync'd (the fsync runs while the hash is computed). `Ok(None)` when no link can be
    /// made here (another filesystem, a filesystem without links, not allowed): copy it.
    ///
    /// `linked` is told the spool path and size once the link exists, before the hash (an
    /// FTP sink starts uploading it then: `FtpEndpoint::preload`).
    ///
    /// The source's name is removed only after the commit, like a copy's; from then on the
    /// spool link is the file's only name. What a link does not protect against, and a
    /// copy would: a writer that still holds the file open and writes into it after it
    /// was taken. The caller's size and mtime check before and after, and the settle
    /// time, are the guard, as for a copy.
    pub fn spool_link(
        &self,
        src: &Path,
        linked: impl FnOnce(&Path, u64),
    ) -> io::Result<Option<Spooled>> {
        use rand::Rng;
        let r: u64 = rand::thread_rng().gen();
        let shard = format!("{:02x}", r >> 56);
        let dir = self.spool.join(&shard);
        fs::create_dir_all(&dir)?;
        let name = format!("{r:016x}.pkg");
        let path = dir.join(&name);
        if let Err(e) = fs::hard_link(src, &path) {
            tracing::debug!(file = %src.display(), "no hard link into the spool ({e}); copying");
            return Ok(None);
        }
        let spooled = (|| -> io::Result<Spooled> {
            let f = open_to_sync(&path)?;
            linked(&path, f.metadata()?.len());
            let syncer = {
                let f = f.try_clone()?;
                std::thread::spawn(move || f.sync_all())
            };
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            let mut rd = &f;
            loop {
                let n = match rd.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            syncer
                .join()
                .map_err(|_| io::Error::other("the fsync thread panicked"))??;
            sync_dir(&dir)?;
            Ok(Spooled {
                file_name: format!("{shard}/{name}"),
                path: path.clone(),
                inline: None,
                sha256: hex::encode(hasher.finalize()),
                size,
            })
        })();
        match spooled {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Spools bytes already in memory (HTTP bodies, back-office packages).
    pub fn spool_bytes(&self, bytes: &[u8]) -> Result<Spooled> {
        let mut w = self.spool_writer()?;
        w.write_all(bytes)
            .and_then(|_| w.finish())
            .map_err(|e| self.io("cannot write a spool file", e))
    }

    /// Opens a package's bytes (inline in the journal, or its spool file).
    pub fn payload(&self, pkg: &Package) -> io::Result<Payload> {
        if pkg.inline {
            let blob: Option<Vec<u8>> = self
                .conn()
                .query_row(
                    "SELECT payload FROM package WHERE id = ?1",
                    params![pkg.id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(io::Error::other)?
                .flatten();
            let blob = blob.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("package #{} has no payload in the journal", pkg.id),
                )
            })?;
            Ok(Payload::Inline(io::Cursor::new(blob)))
        } else {
            File::open(&pkg.payload).map(Payload::File)
        }
    }

    /// A package's bytes in memory (small packages, and the HTTP service until it streams).
    pub fn payload_bytes(&self, pkg: &Package) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(pkg.size as usize);
        self.payload(pkg)?.read_to_end(&mut out)?;
        Ok(out)
    }

    /// A package of `kind` was just committed: a till's cached "nothing for you" may be
    /// stale now.
    fn queued(&self, kind: Kind) {
        self.queued_watch.send_modify(|g| *g += 1);
        if kind.direction() == Direction::Down {
            let g = self
                .down_generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.down_watch.send_replace(g + 1);
        }
    }

    /// Changes after every commit that queues a package towards the tills. Read it before
    /// looking for a till's next package; if it is unchanged later, nothing was queued in
    /// between.
    pub fn down_generation(&self) -> u64 {
        self.down_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Changes (to [`Store::down_generation`]) after every commit that queues a package
    /// towards the tills.
    pub fn watch_down(&self) -> tokio::sync::watch::Receiver<u64> {
        self.down_watch.subscribe()
    }

    /// Changes after every commit that queues a package, in either direction.
    pub fn watch_queued(&self) -> tokio::sync::watch::Receiver<u64> {
        self.queued_watch.subscribe()
    }

    /// Commit point 1: the package is in the store. Returns its journal id.
    pub fn commit_taken(&self, t: &Taken<'_>, spooled: Spooled) -> Result<i64> {
        self.commit_taken_inner(t, spooled, false)
    }

    /// Commit point 1 for a source that is told by the reply itself (SendData: the till
    /// gets "0" only after this returns, and a retry is deduplicated): the row is written
    /// with `source_done` set, so one transaction (one fsync) does it.
    pub fn commit_taken_source_done(&self, t: &Taken<'_>, spooled: Spooled) -> Result<i64> {
        self.commit_taken_inner(t, spooled, true)
    }

    fn commit_taken_inner(
        &self,
        t: &Taken<'_>,
        spooled: Spooled,
        source_done: bool,
    ) -> Result<i64> {
        let conn = self.conn();
        match insert_taken(&conn, t, &spooled, source_done) {
            Ok(id) => {
                self.queued(t.kind);
                Ok(id)
            }
            Err(e) => {
                drop(conn);
                spooled.discard();
                Err(self.sql(e))
            }
        }
    }

    /// Commit point 1 for a numbered source (the bridge acting as a till): the package row
    /// and the till's next package number are committed in one transaction, so a crash can
    /// neither lose the package nor request it again under a new number.
    pub fn commit_taken_counted(
        &self,
        t: &Taken<'_>,
        spooled: Spooled,
        next_number: i64,
    ) -> Result<i64> {
        let mut conn = self.conn();
        let r = (|| -> rusqlite::Result<i64> {
            let tx = conn.transaction()?;
            let id = insert_taken(&tx, t, &spooled, true)?;
            tx.execute(
                "INSERT INTO client_counter (endpoint, pos, dir, next) VALUES (?1, ?2, 'receive', ?3)
                 ON CONFLICT (endpoint, pos, dir) DO UPDATE SET next = excluded.next",
                params![t.source_endpoint, t.pos, next_number],
            )?;
            tx.commit()?;
            Ok(id)
        })();
        match r {
            Ok(id) => {
                self.queued(t.kind);
                Ok(id)
            }
            Err(e) => {
                drop(conn);
                spooled.discard();
                Err(self.sql(e))
            }
        }
    }

    /// The next package number the bridge, acting as till `pos`, asks `endpoint` for.
    pub fn client_counter(&self, endpoint: &str, pos: u32, dir: &str) -> Result<i64> {
        Ok(self
            .conn()
            .query_row(
                "SELECT next FROM client_counter WHERE endpoint = ?1 AND pos = ?2 AND dir = ?3",
                params![endpoint, pos, dir],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))?
            .unwrap_or(1))
    }

    /// Sets a till's counter (the "reset my counter" case, or an operator's fix).
    pub fn set_client_counter(&self, endpoint: &str, pos: u32, dir: &str, next: i64) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO client_counter (endpoint, pos, dir, next) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (endpoint, pos, dir) DO UPDATE SET next = excluded.next",
                params![endpoint, pos, dir, next],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Commit point 2 for a numbered sink (SendData): gives package `id` its report number,
    /// once. A package already being sent keeps its number, so a retry after a crash sends
    /// the same number again and the back office answers "already processed".
    pub fn begin_numbered_send(&self, id: i64, endpoint: &str, pos: u32) -> Result<i64> {
        let mut conn = self.conn();
        let r = (|| -> rusqlite::Result<i64> {
            let tx = conn.transaction()?;
            let (state, seq): (String, Option<i64>) = tx.query_row(
                "SELECT state, sink_seq FROM package WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if let (true, Some(n)) = (state == "delivering", seq) {
                return Ok(n);
            }
            let n: i64 = tx
                .query_row(
                    "SELECT next FROM client_counter WHERE endpoint = ?1 AND pos = ?2 AND dir = 'send'",
                    params![endpoint, pos],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(1);
            tx.execute(
                "INSERT INTO client_counter (endpoint, pos, dir, next) VALUES (?1, ?2, 'send', ?3)
                 ON CONFLICT (endpoint, pos, dir) DO UPDATE SET next = excluded.next",
                params![endpoint, pos, n + 1],
            )?;
            tx.execute(
                "UPDATE package SET state = 'delivering', sink_seq = ?2, sink_name = ?3 WHERE id = ?1",
                params![id, n, format!("SendData/{pos}/{n}")],
            )?;
            tx.commit()?;
            Ok(n)
        })();
        r.map_err(|e| self.sql(e))
    }

    /// The source was told (file deleted or archived, DELE done, till answered).
    pub fn mark_source_done(&self, id: i64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE package SET source_done = 1 WHERE id = ?1",
                params![id],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Packages taken from `endpoint` whose source removal may not have happened.
    pub fn source_pending(&self, endpoint: &str) -> Result<Vec<SourcePending>> {
        let conn = self.conn();
        let mut st = conn
            .prepare(
                "SELECT id, pos, kind, source_name, sha256, size FROM package
                 WHERE source_endpoint = ?1 AND source_done = 0 ORDER BY id",
            )
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map(params![endpoint], |r| {
                Ok(SourcePending {
                    id: r.get(0)?,
                    pos: r.get(1)?,
                    kind: Kind::parse(&r.get::<_, String>(2)?).unwrap_or(Kind::Spr),
                    source_name: r.get(3)?,
                    sha256: r.get(4)?,
                    size: r.get::<_, i64>(5)? as u64,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.sql(e))
    }

    fn package_from_row(&self, r: &rusqlite::Row<'_>) -> rusqlite::Result<Package> {
        let spool: Option<String> = r.get(9)?;
        Ok(Package {
            id: r.get(0)?,
            link: r.get(1)?,
            pos: r.get(2)?,
            kind: Kind::parse(&r.get::<_, String>(3)?).unwrap_or(Kind::Spr),
            source_seq: r.get(4)?,
            source_name: r.get(5)?,
            uid: r.get(6)?,
            size: r.get::<_, i64>(7)? as u64,
            sha256: r.get(8)?,
            payload: spool.map(|s| self.spool.join(s)).unwrap_or_default(),
            inline: r.get(10)?,
        })
    }

    const PACKAGE_COLS: &'static str =
        "id, link, pos, kind, source_seq, source_name, uid, size, sha256, spool, payload IS NOT NULL";

    /// Every package of a link and direction not yet delivered, by till, in order.
    pub fn queue(&self, link: &str, direction: Direction) -> Result<Vec<Package>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {} FROM package WHERE link = ?1 AND direction = ?2
                 AND state != 'delivered' ORDER BY pos, id",
                Self::PACKAGE_COLS
            ))
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map(params![link, direction.as_str()], |r| {
                self.package_from_row(r)
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.sql(e))
    }

    /// The first undelivered package of one till (what a pull sink serves next).
    pub fn queue_head(
        &self,
        link: &str,
        direction: Direction,
        pos: u32,
        after_id: Option<i64>,
    ) -> Result<Option<Package>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {} FROM package WHERE link = ?1 AND direction = ?2 AND pos = ?3
                 AND state != 'delivered' AND id > ?4 ORDER BY id LIMIT 1",
                Self::PACKAGE_COLS
            ))
            .map_err(|e| self.sql(e))?;
        st.query_row(
            params![link, direction.as_str(), pos, after_id.unwrap_or(0)],
            |r| self.package_from_row(r),
        )
        .optional()
        .map_err(|e| self.sql(e))
    }

    /// The undelivered down packages to `sink_endpoint` that have a spool file (the big
    /// ones) and are among the first `lookahead` undelivered packages of their till, with
    /// their place in the till's queue (0 = the head: the package the till is served now or
    /// next), heads first, then by id.
    pub fn big_pending(
        &self,
        sink_endpoint: &str,
        lookahead: usize,
    ) -> Result<Vec<(Package, usize)>> {
        let conn = self.conn();
        let big = {
            // The terms of the partial index package_big_pending, so that it is used.
            let mut st = conn
                .prepare_cached(&format!(
                    "SELECT {} FROM package WHERE sink_endpoint = ?1
                     AND spool IS NOT NULL AND state != 'delivered' AND direction = 'down'
                     ORDER BY pos, id",
                    Self::PACKAGE_COLS
                ))
                .map_err(|e| self.sql(e))?;
            let rows = st
                .query_map(params![sink_endpoint], |r| self.package_from_row(r))
                .map_err(|e| self.sql(e))?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| self.sql(e))?
        };
        let mut rank = conn
            .prepare_cached(
                "SELECT COUNT(*) FROM (SELECT 1 FROM package WHERE link = ?1 AND direction = 'down'
                   AND state IN ('taken', 'delivering') AND pos = ?2 AND id < ?3 LIMIT ?4)",
            )
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for p in big {
            let before: i64 = rank
                .query_row(params![p.link, p.pos, p.id, lookahead as i64], |r| r.get(0))
                .map_err(|e| self.sql(e))?;
            if (before as usize) < lookahead {
                out.push((p, before as usize));
            }
        }
        out.sort_by_key(|(p, r)| (*r, p.id));
        Ok(out)
    }

    /// One package by id.
    pub fn package(&self, id: i64) -> Result<Option<Package>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {} FROM package WHERE id = ?1",
                Self::PACKAGE_COLS
            ))
            .map_err(|e| self.sql(e))?;
        st.query_row(params![id], |r| self.package_from_row(r))
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// Commit point 2: the sink write is begun under `sink_tmp`, to become `sink_name`.
    pub fn mark_delivering(&self, id: i64, sink_name: &str, sink_tmp: &str) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE package SET state = 'delivering', sink_name = ?2, sink_tmp = ?3
                 WHERE id = ?1",
                params![id, sink_name, sink_tmp],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// A begun sink write did not happen (temp file still there, or the rename failed):
    /// the package is queued again.
    pub fn reset_to_taken(&self, id: i64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE package SET state = 'taken', sink_name = NULL, sink_tmp = NULL
                 WHERE id = ?1 AND state = 'delivering'",
                params![id],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Packages to `sink_endpoint` whose write was begun and not confirmed.
    pub fn delivering(&self, sink_endpoint: &str) -> Result<Vec<Delivering>> {
        let conn = self.conn();
        let mut st = conn
            .prepare(&format!(
                "SELECT {}, sink_name, sink_tmp FROM package
                 WHERE sink_endpoint = ?1 AND state = 'delivering' ORDER BY id",
                Self::PACKAGE_COLS
            ))
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map(params![sink_endpoint], |r| {
                Ok(Delivering {
                    package: self.package_from_row(r)?,
                    sink_name: r.get(11)?,
                    sink_tmp: r.get(12)?,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.sql(e))
    }

    /// Commit point 3: the sink has it. The spool file is freed.
    pub fn mark_delivered(
        &self,
        id: i64,
        sink_name: Option<&str>,
        sink_seq: Option<i64>,
    ) -> Result<()> {
        let spool: Option<String> = {
            let conn = self.conn();
            let spool = conn
                .query_row(
                    "SELECT spool FROM package WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.sql(e))?
                .flatten();
            conn.execute(
                "UPDATE package SET state = 'delivered', delivered_at = ?2,
                   sink_name = COALESCE(?3, sink_name), sink_seq = COALESCE(?4, sink_seq),
                   sink_tmp = NULL, spool = NULL, payload = NULL
                 WHERE id = ?1",
                params![id, now_ms(), sink_name, sink_seq],
            )
            .map_err(|e| self.sql(e))?;
            spool
        };
        if let Some(s) = spool {
            self.free_payload_file(id, &s);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- batches
    //
    // A delivery pass commits per batch of packages instead of per package: one durable
    // commit for "taken" (a batch of files from one folder scan), one for "delivering" (a
    // batch of one till's temps uploaded), and *lazy* commits for the two steps that
    // recovery can finish by looking at the endpoint: "source done" (recovery compares the
    // source file with the journal's sha256) and "delivered" (recovery looks for the temp:
    // gone = renamed). See `lazy_tx`.

    /// Runs `f` in one transaction committed without an fsync (`synchronous = NORMAL` for
    /// this transaction only), for the steps recovery can redo from what it finds at the
    /// endpoint (a source already removed, a sink temp already renamed). The WAL is
    /// append-only, so such a commit is ordered before every later one: a crash of the
    /// process keeps it (it is in the page cache), and a power cut keeps it or loses it
    /// together with nothing but later commits. The next durable commit, or
    /// [`Store::sync_lazy`], makes it durable.
    fn lazy_tx<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut conn = self.conn();
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| self.sql(e))?;
        let r = (|| {
            let tx = conn.transaction()?;
            let v = f(&tx)?;
            tx.commit()?;
            Ok(v)
        })();
        let back = conn.pragma_update(None, "synchronous", "FULL");
        let v = r.map_err(|e| self.sql(e))?;
        back.map_err(|e| self.sql(e))?;
        self.lazy_pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(v)
    }

    /// Makes the lazy commits durable: one fsync of the WAL file (a no-op when there are
    /// none). Called at the end of every take and delivery pass, so a lazy step is durable
    /// by the time the pass reports it.
    pub fn sync_lazy(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if !self.lazy_pending.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let wal = self.dir.join("journal.sqlite-wal");
        let r = match open_to_sync(&wal) {
            Ok(f) => f.sync_data(),
            // No WAL file: a checkpoint has already made everything durable.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        r.map_err(|e| {
            self.lazy_pending.store(true, Ordering::SeqCst);
            self.io("cannot fsync the journal's WAL", e)
        })
    }

    /// Commit point 1 for many packages in one transaction (one fsync). All or none: on an
    /// error every payload is discarded and nothing is committed.
    pub fn commit_taken_batch(&self, items: Vec<(Taken<'_>, Spooled)>) -> Result<Vec<i64>> {
        let r = {
            let mut conn = self.conn();
            (|| -> rusqlite::Result<Vec<i64>> {
                let tx = conn.transaction()?;
                let mut ids = Vec::with_capacity(items.len());
                for (t, sp) in &items {
                    ids.push(insert_taken(&tx, t, sp, false)?);
                }
                tx.commit()?;
                Ok(ids)
            })()
        };
        match r {
            Ok(ids) => {
                // One notice for the batch; a down one if any package goes down.
                if let Some((t, _)) = items
                    .iter()
                    .find(|(t, _)| t.kind.direction() == Direction::Down)
                    .or(items.first())
                {
                    self.queued(t.kind);
                }
                Ok(ids)
            }
            Err(e) => {
                for (_, sp) in items {
                    sp.discard();
                }
                Err(self.sql(e))
            }
        }
    }

    /// The sources of these packages were told (files removed, DELE done). A lazy commit:
    /// if a power cut loses it, recovery finds the source gone (or compares its sha256)
    /// and marks it again.
    pub fn mark_source_done_batch(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.lazy_tx(|tx| {
            let mut st = tx.prepare_cached("UPDATE package SET source_done = 1 WHERE id = ?1")?;
            for id in ids {
                st.execute(params![id])?;
            }
            Ok(())
        })
    }

    /// Commit point 2 for a batch (one durable transaction): each package's sink write is
    /// begun under its temp name, to become its final name. (id, final name, temp name).
    pub fn mark_delivering_batch(&self, rows: &[(i64, String, String)]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "UPDATE package SET state = 'delivering', sink_name = ?2, sink_tmp = ?3
                     WHERE id = ?1",
                )?;
                for (id, name, tmp) in rows {
                    st.execute(params![id, name, tmp])?;
                }
            }
            tx.commit()
        })()
        .map_err(|e| self.sql(e))
    }

    /// [`Store::reset_to_taken`] for several packages in one durable transaction (it must
    /// be durable before their temps are removed: once a temp is gone, "delivering" reads
    /// as done).
    pub fn reset_to_taken_batch(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "UPDATE package SET state = 'taken', sink_name = NULL, sink_tmp = NULL
                     WHERE id = ?1 AND state = 'delivering'",
                )?;
                for id in ids {
                    st.execute(params![id])?;
                }
            }
            tx.commit()
        })()
        .map_err(|e| self.sql(e))
    }

    /// Commit point 3 for a batch, as a lazy commit: every package here was renamed into
    /// place after a durable "delivering" with its temp name, so if a power cut loses this
    /// commit, recovery finds the temp gone and journals it delivered again. The spool
    /// files are freed after the commit. (id, final name, `.$n`).
    pub fn mark_delivered_batch(&self, rows: &[(i64, Option<String>, Option<i64>)]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let spools = self.lazy_tx(|tx| {
            let mut spools = Vec::new();
            let mut get = tx.prepare_cached("SELECT spool FROM package WHERE id = ?1")?;
            let mut set = tx.prepare_cached(
                "UPDATE package SET state = 'delivered', delivered_at = ?2,
                   sink_name = COALESCE(?3, sink_name), sink_seq = COALESCE(?4, sink_seq),
                   sink_tmp = NULL, spool = NULL, payload = NULL
                 WHERE id = ?1",
            )?;
            for (id, name, seq) in rows {
                if let Some(Some(s)) = get
                    .query_row(params![id], |r| r.get::<_, Option<String>>(0))
                    .optional()?
                {
                    spools.push(s);
                }
                set.execute(params![id, now, name, seq])?;
            }
            Ok(spools)
        })?;
        for s in spools {
            let _ = fs::remove_file(self.spool.join(s));
        }
        Ok(())
    }

    /// Temp names at `sink_endpoint` that a begun delivery still needs.
    pub fn sink_temps_in_use(&self, sink_endpoint: &str) -> Result<HashSet<String>> {
        Ok(self
            .delivering(sink_endpoint)?
            .into_iter()
            .map(|d| d.sink_tmp)
            .collect())
    }

    /// A package already taken from this source under this till and number with this
    /// content (SendData dedup).
    pub fn find_by_source(
        &self,
        source_endpoint: &str,
        pos: u32,
        source_seq: i64,
        sha256: &str,
    ) -> Result<Option<i64>> {
        self.conn()
            .query_row(
                "SELECT id FROM package WHERE source_endpoint = ?1 AND pos = ?2
                 AND source_seq = ?3 AND sha256 = ?4 ORDER BY id DESC LIMIT 1",
                params![source_endpoint, pos, source_seq, sha256],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// A package already taken from this source under this till and number, whatever its
    /// content (SendData: same number, new content).
    pub fn source_seq_seen(
        &self,
        source_endpoint: &str,
        pos: u32,
        source_seq: i64,
    ) -> Result<bool> {
        self.conn()
            .query_row(
                "SELECT 1 FROM package WHERE source_endpoint = ?1 AND pos = ?2
                 AND source_seq = ?3 LIMIT 1",
                params![source_endpoint, pos, source_seq],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(|e| self.sql(e))
    }

    /// What `endpoint` last served to till `pos`.
    pub fn served(&self, endpoint: &str, pos: u32) -> Result<Option<Served>> {
        self.conn()
            .query_row(
                "SELECT number, package_id, resets FROM served WHERE endpoint = ?1 AND pos = ?2",
                params![endpoint, pos],
                |r| {
                    Ok(Served {
                        number: r.get(0)?,
                        package_id: r.get(1)?,
                        resets: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// Records that `package_id` is served to till `pos` under `number`, without
    /// acknowledging anything. `reset`: the till asked for an unexpected number (counted).
    pub fn set_served(
        &self,
        endpoint: &str,
        pos: u32,
        number: i64,
        package_id: Option<i64>,
        reset: bool,
    ) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO served (endpoint, pos, number, package_id, resets, served_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (endpoint, pos) DO UPDATE SET number = excluded.number,
                   package_id = excluded.package_id, resets = resets + excluded.resets,
                   served_at = excluded.served_at",
                params![endpoint, pos, number, package_id, reset as i64, now_ms()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// The till asked for the number after `acked_number`: in one transaction, package
    /// `acked_id` becomes delivered (`sink_seq = acked_number`) and the next queued package
    /// of (`link`, till `pos`, down) is recorded as served under `number`. Returns that
    /// package (None: nothing queued). The acknowledged package's spool file is freed after
    /// the commit.
    pub fn ack_served(
        &self,
        endpoint: &str,
        link: &str,
        pos: u32,
        acked_id: i64,
        acked_number: i64,
        number: i64,
    ) -> Result<Option<Package>> {
        let (spool, next) = {
            let mut conn = self.conn();
            let tx = conn.transaction().map_err(|e| self.sql(e))?;
            let spool: Option<String> = tx
                .query_row(
                    "SELECT spool FROM package WHERE id = ?1",
                    params![acked_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.sql(e))?
                .flatten();
            tx.execute(
                "UPDATE package SET state = 'delivered', delivered_at = ?2, sink_seq = ?3,
                   sink_tmp = NULL, spool = NULL, payload = NULL
                 WHERE id = ?1 AND state != 'delivered'",
                params![acked_id, now_ms(), acked_number],
            )
            .map_err(|e| self.sql(e))?;
            let next = tx
                .query_row(
                    &format!(
                        "SELECT {} FROM package WHERE link = ?1 AND direction = 'down'
                         AND pos = ?2 AND state != 'delivered' ORDER BY id LIMIT 1",
                        Self::PACKAGE_COLS
                    ),
                    params![link, pos],
                    |r| self.package_from_row(r),
                )
                .optional()
                .map_err(|e| self.sql(e))?;
            tx.execute(
                "INSERT INTO served (endpoint, pos, number, package_id, resets, served_at)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5)
                 ON CONFLICT (endpoint, pos) DO UPDATE SET number = excluded.number,
                   package_id = excluded.package_id, served_at = excluded.served_at",
                params![endpoint, pos, number, next.as_ref().map(|p| p.id), now_ms()],
            )
            .map_err(|e| self.sql(e))?;
            tx.commit().map_err(|e| self.sql(e))?;
            (spool, next)
        };
        if let Some(s) = spool {
            self.free_payload_file(acked_id, &s);
        }
        Ok(next)
    }

    /// Whether a package is still waiting for its sink (not delivered).
    pub fn is_pending(&self, id: i64) -> Result<bool> {
        self.conn()
            .query_row(
                "SELECT state != 'delivered' FROM package WHERE id = ?1",
                params![id],
                |r| r.get::<_, bool>(0),
            )
            .optional()
            .map(|o| o.unwrap_or(false))
            .map_err(|e| self.sql(e))
    }

    /// Queued and delivered counts, for one link or all.
    pub fn counts(&self, link: Option<&str>) -> Result<Counts> {
        let conn = self.conn();
        let (q, d): (i64, i64) = conn
            .query_row(
                "SELECT COALESCE(SUM(state != 'delivered'), 0), COALESCE(SUM(state = 'delivered'), 0)
                 FROM package WHERE ?1 IS NULL OR link = ?1",
                params![link],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.sql(e))?;
        Ok(Counts {
            queued: q as u64,
            delivered: d as u64,
        })
    }

    /// Runs a read-only query for reports (`status`, `journal`).
    pub fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        f(&self.conn()).map_err(|e| self.sql(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken<'a>(pos: u32, name: &'a str) -> Taken<'a> {
        Taken {
            link: "l",
            pos,
            kind: Kind::Spr,
            uid: None,
            source_endpoint: "office",
            source_name: name,
            source_seq: Some(1),
            sink_endpoint: "shop",
        }
    }

    #[test]
    fn a_second_process_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let _a = Store::open(d.path()).unwrap();
        let e = Store::open(d.path()).err().unwrap();
        assert!(matches!(e, StoreError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("another kkm-bridge process"));
    }

    /// A payload that does not fit inline: it goes to a spool file.
    fn big(tag: u8) -> Vec<u8> {
        vec![tag; INLINE_MAX + 1]
    }

    #[test]
    fn taken_then_delivered_frees_the_spool() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let sp = s.spool_bytes(&big(b'h')).unwrap();
        assert_eq!(sp.sha256, crate::package::sha256_hex(&big(b'h')));
        let path = sp.path.clone();
        assert!(path.exists());
        let id = s.commit_taken(&taken(1, "POS1.spr.$1"), sp).unwrap();
        let q = s.queue("l", Direction::Down).unwrap();
        assert_eq!(q.len(), 1);
        assert!(!q[0].inline);
        assert_eq!(s.payload_bytes(&q[0]).unwrap(), big(b'h'));
        assert_eq!(s.source_pending("office").unwrap().len(), 1);
        s.mark_source_done(id).unwrap();
        assert!(s.source_pending("office").unwrap().is_empty());
        s.mark_delivering(id, "POS1.spr.$1", ".kkm-bridge.x.tmp")
            .unwrap();
        assert_eq!(s.delivering("shop").unwrap().len(), 1);
        s.mark_delivered(id, None, Some(1)).unwrap();
        assert!(!path.exists());
        assert!(s.queue("l", Direction::Down).unwrap().is_empty());
        assert_eq!(
            s.counts(None).unwrap(),
            Counts {
                queued: 0,
                delivered: 1
            }
        );
    }

    #[test]
    fn big_pending_lists_the_big_packages_in_each_tills_window_heads_first() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut down = s.watch_down();
        let commit = |pos: u32, bytes: &[u8]| {
            s.commit_taken(&taken(pos, "x"), s.spool_bytes(bytes).unwrap())
                .unwrap()
        };
        // Till 1: big, small, big, big. Till 2: small, big, big.
        let a = commit(1, &big(1));
        let _small = commit(1, b"small");
        let c = commit(1, &big(3));
        let _d = commit(1, &big(4));
        let _small2 = commit(2, b"small");
        let f = commit(2, &big(6));
        let _g = commit(2, &big(7));
        assert!(down.has_changed().unwrap(), "queued packages are signalled");
        let pending = || -> Vec<(i64, usize)> {
            s.big_pending("shop", 2)
                .unwrap()
                .iter()
                .map(|(p, place)| (p.id, *place))
                .collect()
        };
        let got = pending();
        assert_eq!(got, vec![(a, 0), (f, 1)]);
        assert!(s.big_pending("other", 2).unwrap().is_empty());
        // Till 1's head delivered: its next big one is now at place 1.
        s.mark_delivered(a, None, Some(1)).unwrap();
        let got = pending();
        assert_eq!(got, vec![(c, 1), (f, 1)]);
        down.mark_unchanged();
        s.mark_delivered(c, None, Some(2)).unwrap();
        assert!(
            !down.has_changed().unwrap(),
            "only queued packages are signalled"
        );
    }

    #[test]
    fn small_payloads_live_in_the_journal_and_big_ones_in_files() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let small = vec![7u8; INLINE_MAX];
        let sp = s.spool_bytes(&small).unwrap();
        assert!(sp.inline.is_some() && sp.file_name.is_empty());
        let a = s.commit_taken(&taken(1, "a"), sp).unwrap();
        // A writer that grows past the limit spills to a file, keeping every byte.
        let mut w = s.spool_writer().unwrap();
        w.write_all(&small).unwrap();
        assert!(w.path().is_none());
        w.write_all(b"one more").unwrap();
        assert!(w.path().is_some_and(Path::exists));
        let sp = w.finish().unwrap();
        assert!(sp.inline.is_none());
        let mut want = small.clone();
        want.extend_from_slice(b"one more");
        assert_eq!(sp.sha256, crate::package::sha256_hex(&want));
        let b = s.commit_taken(&taken(1, "b"), sp).unwrap();
        let pa = s.package(a).unwrap().unwrap();
        let pb = s.package(b).unwrap().unwrap();
        assert!(pa.inline && !pb.inline);
        assert_eq!(s.payload_bytes(&pa).unwrap(), small);
        assert_eq!(s.payload_bytes(&pb).unwrap(), want);
        // Delivered: the inline bytes are freed with the row's payload.
        s.mark_delivered(a, None, None).unwrap();
        let freed: Option<Vec<u8>> = s
            .with_conn(|c| {
                c.query_row("SELECT payload FROM package WHERE id = ?1", [a], |r| {
                    r.get(0)
                })
            })
            .unwrap();
        assert_eq!(freed, None);
        let walk = walkdir::WalkDir::new(d.path().join("spool"))
            .min_depth(2)
            .into_iter()
            .count();
        assert_eq!(walk, 1, "only the big payload has a spool file");
    }

    #[test]
    fn a_spool_writer_dropped_before_finish_leaves_no_file() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut w = s.spool_writer().unwrap();
        w.write_all(&big(b'x')).unwrap();
        let path = w.path().unwrap().to_path_buf();
        assert!(path.exists());
        drop(w); // the copy failed (disk full, source gone)
        assert!(!path.exists(), "the partial spool file is removed at once");
        let sp = s.spool_bytes(&big(b'y')).unwrap();
        assert!(sp.path.exists(), "a finished one stays");
    }

    #[test]
    fn orphan_spool_files_are_removed_at_open() {
        let d = tempfile::tempdir().unwrap();
        let (orphan, kept) = {
            let s = Store::open(d.path()).unwrap();
            let orphan = s.spool_bytes(&big(b'o')).unwrap().path;
            let sp = s.spool_bytes(&big(b'k')).unwrap();
            let kept = sp.path.clone();
            s.commit_taken(&taken(1, "a"), sp).unwrap();
            (orphan, kept)
        };
        let _s = Store::open(d.path()).unwrap();
        assert!(!orphan.exists());
        assert!(kept.exists());
    }

    #[test]
    fn derived_files_go_with_their_payload_and_all_at_open() {
        let d = tempfile::tempdir().unwrap();
        let (kept, tmp) = {
            let s = Store::open(d.path()).unwrap();
            let mut ids = Vec::new();
            for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
                let sp = s.spool_bytes(&big(b'a' + i as u8)).unwrap();
                ids.push(s.commit_taken(&taken(1, name), sp).unwrap());
            }
            for &id in &ids {
                fs::write(s.reply_cache_path(id), b"{}").unwrap();
            }
            let tmp = s.scratch_dir().join(".kkm-bridge.0000000000000000.tmp");
            fs::write(&tmp, b"half a reply").unwrap();
            s.mark_delivered(ids[0], None, None).unwrap();
            assert!(!s.reply_cache_path(ids[0]).exists(), "delivered: freed");
            s.set_served("shop", 1, 5, Some(ids[1]), false).unwrap();
            s.ack_served("shop", "l", 1, ids[1], 5, 6).unwrap();
            assert!(!s.reply_cache_path(ids[1]).exists(), "acknowledged: freed");
            assert!(s.reply_cache_path(ids[2]).exists(), "still queued: kept");
            (s.reply_cache_path(ids[2]), tmp)
        };
        let s = Store::open(d.path()).unwrap();
        assert!(
            !kept.exists() && !tmp.exists(),
            "derived, made again on demand"
        );
        assert_eq!(fs::read_dir(s.scratch_dir()).unwrap().count(), 0);
    }

    #[test]
    fn queue_is_ordered_per_till() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        for (pos, name) in [(2, "a"), (1, "b"), (2, "c"), (1, "d")] {
            let sp = s.spool_bytes(name.as_bytes()).unwrap();
            s.commit_taken(&taken(pos, name), sp).unwrap();
        }
        let q: Vec<_> = s
            .queue("l", Direction::Down)
            .unwrap()
            .into_iter()
            .map(|p| (p.pos, p.source_name))
            .collect();
        assert_eq!(
            q,
            [
                (1, "b".into()),
                (1, "d".into()),
                (2, "a".into()),
                (2, "c".into())
            ]
        );
        let head = s
            .queue_head("l", Direction::Down, 2, None)
            .unwrap()
            .unwrap();
        assert_eq!(head.source_name, "a");
        let next = s
            .queue_head("l", Direction::Down, 2, Some(head.id))
            .unwrap()
            .unwrap();
        assert_eq!(next.source_name, "c");
    }

    #[test]
    fn ack_served_delivers_and_serves_the_next_in_one_step() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut ids = Vec::new();
        let mut paths = Vec::new();
        for name in ["a", "b"] {
            let sp = s.spool_bytes(name.as_bytes()).unwrap();
            paths.push(sp.path.clone());
            ids.push(s.commit_taken(&taken(1, name), sp).unwrap());
        }
        assert_eq!(s.served("shop", 1).unwrap(), None);
        s.set_served("shop", 1, 7, Some(ids[0]), false).unwrap();
        s.set_served("shop", 1, 3, Some(ids[0]), true).unwrap();
        assert_eq!(
            s.served("shop", 1).unwrap(),
            Some(Served {
                number: 3,
                package_id: Some(ids[0]),
                resets: 1
            })
        );
        let next = s.ack_served("shop", "l", 1, ids[0], 3, 4).unwrap().unwrap();
        assert_eq!(next.id, ids[1]);
        assert!(!s.is_pending(ids[0]).unwrap());
        assert!(!paths[0].exists(), "the acknowledged payload is freed");
        let seq: i64 = s
            .with_conn(|c| {
                c.query_row(
                    "SELECT sink_seq FROM package WHERE id = ?1",
                    [ids[0]],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(seq, 3);
        assert_eq!(
            s.served("shop", 1).unwrap().unwrap().package_id,
            Some(ids[1])
        );
        assert!(s
            .ack_served("shop", "l", 1, ids[1], 4, 5)
            .unwrap()
            .is_none());
        let row = s.served("shop", 1).unwrap().unwrap();
        assert_eq!((row.number, row.package_id, row.resets), (5, None, 1));
    }

    #[test]
    fn a_read_only_store_reads_while_the_writer_holds_the_lock() {
        let d = tempfile::tempdir().unwrap();
        let empty = Store::open_read_only(d.path()).unwrap();
        assert_eq!(empty.counts(None).unwrap(), Counts::default());
        let w = Store::open(d.path()).unwrap();
        let sp = w.spool_bytes(b"x").unwrap();
        w.commit_taken(&taken(1, "a"), sp).unwrap();
        let r = Store::open_read_only(d.path()).unwrap();
        assert_eq!(r.counts(None).unwrap().queued, 1);
        let sp = w.spool_bytes(b"y").unwrap();
        w.commit_taken(&taken(2, "b"), sp).unwrap();
        assert_eq!(r.counts(None).unwrap().queued, 2);
        // Still locked for writers.
        assert!(matches!(
            Store::open(d.path()).err().unwrap(),
            StoreError::Locked { .. }
        ));
    }

    #[test]
    fn prune_deletes_old_delivered_rows_but_keeps_the_last_per_till() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut ids = Vec::new();
        for name in ["a", "b", "c"] {
            let sp = s.spool_bytes(name.as_bytes()).unwrap();
            ids.push(s.commit_taken(&taken(1, name), sp).unwrap());
        }
        s.mark_delivered(ids[0], None, None).unwrap();
        s.mark_delivered(ids[1], None, None).unwrap();
        // Nothing is old enough yet.
        assert_eq!(s.prune(std::time::Duration::from_secs(3600)).unwrap(), 0);
        s.with_conn(|c| c.execute("UPDATE package SET delivered_at = 1", []))
            .unwrap();
        // a is old and not the newest row of till 1; c is undelivered.
        assert_eq!(s.prune(std::time::Duration::from_secs(3600)).unwrap(), 1);
        assert!(s.package(ids[0]).unwrap().is_none());
        assert!(s.package(ids[1]).unwrap().is_some());
        assert!(s.package(ids[2]).unwrap().is_some());
        assert_eq!(s.counts(None).unwrap().queued, 1);
        assert_eq!(s.prune_if_due(None).unwrap(), None);
        assert!(s
            .prune_if_due(Some(std::time::Duration::from_secs(1)))
            .unwrap()
            .is_some());
        assert_eq!(
            s.prune_if_due(Some(std::time::Duration::from_secs(1)))
                .unwrap(),
            None
        );
    }
}
