//! The exchange directory (PROTOCOL.md §2): a local folder or a network share.
//!
//! Reading: one listing per pass; files are taken per till and kind in numeric `.$n` order,
//! only when complete (unchanged for `settle`), never a higher number while a lower one is
//! still waiting. A taken file is removed (or archived) only after it is durable in the
//! store.
//!
//! Writing: payload to `.kkm-bridge.<random>.tmp` in the same directory, fsync, journal the
//! temp and final names, rename, fsync the directory, journal "delivered" — in numbered
//! mode per batch of up to 256 packages (`DirEndpoint::deliver_numbered`). Numbered mode
//! takes the first number above the highest present; single-file mode writes one package
//! at a time, only when the till has consumed the previous file (absent, or line 2 is `@`).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use super::{DeliverReport, Role, Routes, TakeReport, WarnOnce};
use crate::config::{DirConfig, Names};
use crate::failpoint::crash_point;
use crate::package::{is_temp_name, spr_marked_loaded, temp_name, Kind, NamePattern, Package};
use crate::store::{sync_dir, Store, INLINE_MAX};

pub struct DirEndpoint {
    pub name: String,
    pub config: DirConfig,
    pub routes: Routes,
    patterns: Vec<(Kind, NamePattern)>,
    warned: WarnOnce,
    temps_cleaned: AtomicBool,
    /// Told (till, spool path, size) of each big file linked into the spool, before its
    /// hash: its sink may start uploading it ([`crate::endpoint::wire_preloads`]).
    pub preload: std::sync::OnceLock<Preloader>,
}

pub type Preloader = Box<dyn Fn(u32, &Path, u64) + Send + Sync>;

/// One file seen in a listing.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    size: u64,
    mtime: SystemTime,
}

/// Files taken per journal commit, at most...
const TAKE_BATCH_MAX: usize = 256;
/// ...and at most this many bytes of small (inline) payloads held in memory.
const TAKE_BATCH_BYTES: u64 = 8 << 20;

/// A file read into the spool, waiting for its batch's commit.
struct Prepared {
    c: Candidate,
    spooled: crate::store::Spooled,
    /// Size and mtime when it was read: the source is removed only if they still hold.
    len: u64,
    mtime: Option<SystemTime>,
}

/// One file that parsed as a package of this endpoint.
type Candidate = super::Candidate<Entry>;

impl DirEndpoint {
    pub fn new(name: &str, config: DirConfig, routes: Routes) -> DirEndpoint {
        let names: Names = config.names();
        let patterns = Kind::ALL.iter().map(|&k| (k, names.pattern(k))).collect();
        DirEndpoint {
            name: name.to_string(),
            config,
            routes,
            patterns,
            warned: WarnOnce::default(),
            temps_cleaned: AtomicBool::new(false),
            preload: std::sync::OnceLock::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.config.path.join(name)
    }

    fn pattern(&self, kind: Kind) -> &NamePattern {
        &self
            .patterns
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("every kind has a pattern")
            .1
    }

    fn list(&self) -> anyhow::Result<Vec<Entry>> {
        let dir = &self.config.path;
        let rd = fs::read_dir(dir)
            .with_context(|| format!("endpoint {}: cannot list {}", self.name, dir.display()))?;
        let mut out = Vec::new();
        for e in rd {
            let e = e.with_context(|| {
                format!("endpoint {}: cannot list {}", self.name, dir.display())
            })?;
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                let key = format!("non-utf8:{:?}", e.file_name());
                if self.warned.first(&key) {
                    tracing::warn!(endpoint = %self.name, file = ?e.file_name(), "left alone: the file name is not valid UTF-8");
                }
                continue;
            };
            out.push(Entry {
                name,
                size: meta.len(),
                mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        Ok(out)
    }

    /// Parses a name as any kind's pattern.
    fn parse(&self, name: &str) -> Option<(Kind, u32, Option<u32>)> {
        super::parse_name(&self.patterns, self.config.numbered, name)
    }

    fn is_complete(&self, e: &Entry) -> bool {
        match SystemTime::now().duration_since(e.mtime) {
            Ok(age) => age >= self.config.settle,
            // An mtime in the future (clock skew on a share): wait until it is in the past.
            Err(_) => false,
        }
    }

    // ---------------------------------------------------------------- recovery

    pub fn recover(&self, store: &Store) -> anyhow::Result<()> {
        let dir = &self.config.path;
        if !dir.exists() {
            fs::create_dir_all(dir).with_context(|| {
                format!("endpoint {}: cannot create {}", self.name, dir.display())
            })?;
            tracing::info!(endpoint = %self.name, path = %dir.display(), "created the exchange directory");
        }
        // Sources whose removal a crash may have interrupted.
        for p in store.source_pending(&self.name)? {
            let path = self.path(&p.source_name);
            let same = match fs::read(&path) {
                Ok(bytes) => crate::package::sha256_hex(&bytes) == p.sha256,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("endpoint {}: cannot read {}", self.name, path.display())
                    })
                }
            };
            if same {
                tracing::info!(endpoint = %self.name, file = %p.source_name, package = p.id, "removing a source file already taken before a crash");
                self.remove_source(&p.source_name, p.id)?;
            }
            store.mark_source_done(p.id)?;
        }
        // Sink writes begun and not confirmed.
        for d in store.delivering(&self.name)? {
            let tmp = self.path(&d.sink_tmp);
            if tmp.exists() {
                // The rename never happened: start this delivery again. The journal is
                // reset first: once the temp is gone, "delivering" would read as done.
                store.reset_to_taken(d.package.id)?;
                crash_point("recovery-between-reset-and-temp-removal");
                let _ = fs::remove_file(&tmp);
                tracing::info!(endpoint = %self.name, package = d.package.id, "delivery interrupted before the rename; it will be written again");
            } else {
                // The rename happened (the till may have consumed the file since).
                store.mark_delivered(d.package.id, Some(&d.sink_name), None)?;
                tracing::info!(endpoint = %self.name, package = d.package.id, file = %d.sink_name, "delivery finished before a crash; journaled now");
            }
        }
        // Temp files of ours that no journal row needs.
        if !self.temps_cleaned.swap(true, Ordering::Relaxed) {
            let in_use = store.sink_temps_in_use(&self.name)?;
            if let Ok(entries) = self.list() {
                for e in entries {
                    if is_temp_name(&e.name) && !in_use.contains(&e.name) {
                        tracing::info!(endpoint = %self.name, file = %e.name, "removing a temp file left by a crash");
                        let _ = fs::remove_file(self.path(&e.name));
                    }
                }
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- reading

    pub fn take(&self, store: &Store, dry_run: bool) -> anyhow::Result<TakeReport> {
        let mut report = TakeReport::default();
        let groups = super::group_candidates(
            &self.name,
            &self.routes,
            &self.patterns,
            self.config.numbered,
            &self.warned,
            self.list()?,
            |e| e.name.as_str(),
        );
        let mut batch: Vec<Prepared> = Vec::new();
        let mut inline_bytes = 0u64;
        for (_, mut files) in groups {
            files.sort_by_key(|c| c.n);
            for c in files {
                if !self.is_complete(&c.entry) {
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
                let key = format!("takefail:{}", c.entry.name);
                match self.prepare(store, &c) {
                    Ok(prepared) => {
                        if self.warned.contains(&key) {
                            self.warned.forget(&key);
                            tracing::info!(endpoint = %self.name, file = %c.entry.name, till = c.pos, "can take files again");
                        }
                        let Some(p) = prepared else {
                            report.waiting += 1;
                            break;
                        };
                        if p.spooled.inline.is_some() {
                            inline_bytes += p.spooled.size;
                        }
                        batch.push(p);
                        if batch.len() >= TAKE_BATCH_MAX || inline_bytes >= TAKE_BATCH_BYTES {
                            self.commit_batch(store, std::mem::take(&mut batch), &mut report);
                            inline_bytes = 0;
                        }
                    }
                    Err(e) => {
                        // Loud once per change of state (a full disk fails every pass);
                        // the file stays where it is.
                        if self.warned.first(&key) {
                            tracing::error!(endpoint = %self.name, file = %c.entry.name, till = c.pos, "cannot take (the file stays in place; retried every pass): {e:#}");
                        } else {
                            tracing::debug!(endpoint = %self.name, file = %c.entry.name, till = c.pos, "still cannot take: {e:#}");
                        }
                        report.failed += 1;
                        break;
                    }
                }
            }
        }
        self.commit_batch(store, batch, &mut report);
        store.sync_lazy()?;
        Ok(report)
    }

    /// Reads one file into the store's spool (not committed yet). Ok(None) when the file
    /// turned out to be still changing, or is an already-loaded single file.
    fn prepare(&self, store: &Store, c: &Candidate) -> anyhow::Result<Option<Prepared>> {
        let path = self.path(&c.entry.name);
        let mut file =
            File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let before = file.metadata()?;
        if c.kind == Kind::Spr && !self.config.numbered {
            let mut head = [0u8; 512];
            let n = read_up_to(&mut file, &mut head)?;
            if spr_marked_loaded(&head[..n]) {
                if self.warned.first(&format!("loaded:{}", c.entry.name)) {
                    tracing::info!(endpoint = %self.name, file = %c.entry.name, "left alone: line 2 is '@' (already loaded)");
                }
                return Ok(None);
            }
            self.warned.forget(&format!("loaded:{}", c.entry.name));
            file = File::open(&path)?;
        }
        // A big file is linked into the spool rather than copied (read once, for its
        // hash), when the spool is on the same filesystem.
        let linked = if before.len() > INLINE_MAX as u64 {
            store
                .spool_link(&path, |spool, size| {
                    if let Some(preload) = self.preload.get() {
                        preload(c.pos, spool, size);
                    }
                })
                .with_context(|| format!("cannot spool {}", path.display()))?
        } else {
            None
        };
        let spooled = match linked {
            Some(s) => s,
            None => {
                let mut w = store.spool_writer()?;
                copy_big(&mut file, &mut w, before.len())
                    .with_context(|| format!("cannot copy {} into the spool", path.display()))?;
                w.finish().context("cannot fsync the spool")?
            }
        };
        let after = fs::metadata(&path)?;
        if after.len() != before.len()
            || after.modified().ok() != before.modified().ok()
            || spooled.size != before.len()
        {
            spooled.discard();
            return Ok(None); // still being written; next pass
        }
        Ok(Some(Prepared {
            c: c.clone(),
            spooled,
            len: after.len(),
            mtime: after.modified().ok(),
        }))
    }

    /// Commits a batch of prepared files in one transaction (commit point 1, one fsync),
    /// then removes their sources (one directory fsync) and marks them done (a lazy
    /// commit: recovery compares a pending source with the journal's sha256 before it
    /// removes it).
    fn commit_batch(&self, store: &Store, batch: Vec<Prepared>, report: &mut TakeReport) {
        if batch.is_empty() {
            return;
        }
        crash_point("after-spool");
        let uids: Vec<Option<String>> = batch
            .iter()
            .map(|p| (p.c.kind == Kind::Flr).then(super::new_uid))
            .collect();
        let mut items = Vec::with_capacity(batch.len());
        let mut files = Vec::with_capacity(batch.len());
        for (p, uid) in batch.into_iter().zip(&uids) {
            let route = self.routes.route(p.c.pos).expect("candidates are routed");
            items.push((
                crate::store::Taken {
                    link: &route.link,
                    pos: p.c.pos,
                    kind: p.c.kind,
                    uid: uid.as_deref(),
                    source_endpoint: &self.name,
                    source_name: "",
                    source_seq: p.c.n.map(i64::from),
                    sink_endpoint: &route.peer,
                },
                p.spooled,
            ));
            files.push((p.c, p.len, p.mtime));
        }
        for ((t, _), (c, _, _)) in items.iter_mut().zip(&files) {
            t.source_name = &c.entry.name;
        }
        let ids = match store.commit_taken_batch(items) {
            Ok(ids) => ids,
            Err(e) => {
                let key = "takefail:journal";
                if self.warned.first(key) {
                    tracing::error!(endpoint = %self.name, "cannot take {} file(s) (they stay in place; retried every pass): {e}", files.len());
                }
                report.failed += files.len() as u64;
                return;
            }
        };
        self.warned.forget("takefail:journal");
        crash_point("after-taken");
        let mut done = Vec::with_capacity(ids.len());
        for (id, (c, len, mtime)) in ids.into_iter().zip(&files) {
            // debug: the one info line per package is "delivered" (README "Logs").
            tracing::debug!(endpoint = %self.name, till = c.pos, kind = %c.kind, package = id, bytes = len, "taken {}", c.entry.name);
            report.taken += 1;
            // Rewritten since we read it (a writer reusing the name at once): what we took
            // is the old content; the new one stays for the next pass.
            let path = self.path(&c.entry.name);
            if let Ok(m) = fs::metadata(&path) {
                if m.len() != *len || m.modified().ok() != *mtime {
                    tracing::info!(endpoint = %self.name, file = %c.entry.name, package = id, "changed after it was taken; the new content is left for the next pass");
                    done.push(id);
                    continue;
                }
            }
            match self.remove_source_unsynced(&c.entry.name, id) {
                Ok(()) => done.push(id),
                Err(e) => {
                    // source_pending: recover() finishes it.
                    tracing::error!(endpoint = %self.name, file = %c.entry.name, package = id, "taken, but cannot remove the source (retried): {e:#}");
                }
            }
        }
        if let Err(e) = self.sync_source_dirs() {
            tracing::error!(endpoint = %self.name, "cannot fsync after removing taken files (they are checked again on the next start): {e:#}");
            return;
        }
        crash_point("after-source-removed");
        if let Err(e) = store.mark_source_done_batch(&done) {
            tracing::error!(endpoint = %self.name, "{e}");
        }
    }

    /// Deletes a consumed file, or moves it to the archive directory, and fsyncs.
    fn remove_source(&self, name: &str, id: i64) -> anyhow::Result<()> {
        self.remove_source_unsynced(name, id)?;
        self.sync_source_dirs()
    }

    /// Deletes a consumed file, or moves it to the archive directory; the caller fsyncs
    /// the directories ([`DirEndpoint::sync_source_dirs`]).
    fn remove_source_unsynced(&self, name: &str, id: i64) -> anyhow::Result<()> {
        let path = self.path(name);
        match &self.config.archive {
            Some(archive) => {
                fs::create_dir_all(archive)
                    .with_context(|| format!("cannot create archive {}", archive.display()))?;
                let dest = archive.join(format!("{id:08}-{name}"));
                if fs::rename(&path, &dest).is_err() {
                    // Another device: copy durably, then delete.
                    copy_durably(&path, &dest)?;
                    fs::remove_file(&path)
                        .with_context(|| format!("cannot delete {}", path.display()))?;
                }
            }
            None => match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot delete {}", path.display()))
                }
            },
        }
        Ok(())
    }

    /// fsyncs the exchange directory (and the archive) after sources were removed.
    fn sync_source_dirs(&self) -> anyhow::Result<()> {
        if let Some(archive) = &self.config.archive {
            sync_dir(archive).ok();
        }
        sync_dir(&self.config.path)
            .with_context(|| format!("cannot fsync {}", self.config.path.display()))
    }

    // ---------------------------------------------------------------- writing

    pub fn deliver(
        &self,
        store: &Store,
        queue: Vec<Package>,
        dry_run: bool,
    ) -> anyhow::Result<DeliverReport> {
        let mut report = DeliverReport::default();
        if queue.is_empty() {
            return Ok(report);
        }
        let receives = self.routes.role.receives();
        // One listing: the highest `.$n` present per till and kind.
        let mut highest: HashMap<(u32, Kind), u32> = HashMap::new();
        for e in self.list()? {
            if let Some((kind, pos, Some(n))) = self.parse(&e.name) {
                let h = highest.entry((pos, kind)).or_insert(0);
                *h = (*h).max(n);
            }
        }
        if self.config.numbered && !dry_run {
            return self.deliver_numbered(store, queue, highest);
        }
        let mut blocked_pos: Option<u32> = None;
        for pkg in queue {
            debug_assert_eq!(pkg.kind.direction(), receives);
            if blocked_pos == Some(pkg.pos) {
                report.busy += 1;
                continue;
            }
            let final_name = if self.config.numbered {
                let n = highest.get(&(pkg.pos, pkg.kind)).copied().unwrap_or(0) + 1;
                self.pattern(pkg.kind).render(pkg.pos, Some(n))
            } else {
                self.pattern(pkg.kind).render(pkg.pos, None)
            };
            if dry_run {
                report.planned.push(format!(
                    "deliver {} to {}/{}",
                    pkg.describe(),
                    self.name,
                    final_name
                ));
                if let Some(n) = highest.get_mut(&(pkg.pos, pkg.kind)) {
                    *n += 1;
                } else {
                    highest.insert((pkg.pos, pkg.kind), 1);
                }
                continue;
            }
            match self.deliver_one(store, &pkg) {
                Ok(true) => report.delivered += 1,
                Ok(false) => {
                    report.busy += 1;
                    blocked_pos = Some(pkg.pos);
                }
                Err(e) => {
                    self.cannot_deliver(&pkg, &e);
                    report.failed += 1;
                    blocked_pos = Some(pkg.pos);
                }
            }
        }
        Ok(report)
    }

    /// Numbered mode, in batches of up to [`BATCH_MAX`] packages of any tills:
    /// 1. each is written to its own temp (fsync'd, or a hard link of its spool file);
    /// 2. one durable journal commit records every temp and final name ("delivering");
    /// 3. renamed in order, then one fsync of the directory;
    /// 4. one lazy journal commit records them delivered (recovery redoes it: a
    ///    "delivering" row whose temp is gone was renamed).
    ///
    /// About one fsync per package instead of four. A till whose package cannot be written
    /// or renamed is stopped for the pass: its later packages in the batch are not renamed
    /// (reset to "taken" before their temps go), so per till the renamed ones are a prefix,
    /// in a crash too; other tills go on.
    fn deliver_numbered(
        &self,
        store: &Store,
        queue: Vec<Package>,
        mut highest: HashMap<(u32, Kind), u32>,
    ) -> anyhow::Result<DeliverReport> {
        let mut report = DeliverReport::default();
        let mut stopped: HashSet<u32> = HashSet::new();
        let mut rest = queue.into_iter().peekable();
        while rest.peek().is_some() {
            // 1. Temps.
            let mut temps: Vec<Temp> = Vec::new();
            let mut bytes = 0u64;
            while let Some(pkg) = rest.next_if(|p| {
                temps.is_empty() || (temps.len() < BATCH_MAX && bytes + p.size <= BATCH_BYTES)
            }) {
                if stopped.contains(&pkg.pos) {
                    report.busy += 1;
                    continue;
                }
                let (final_name, n) = self.next_free_number(&pkg, &mut highest);
                let tmp_name = temp_name();
                let tmp = self.path(&tmp_name);
                bytes += pkg.size;
                match self.write_temp(store, &pkg, &tmp) {
                    Ok(()) => temps.push(Temp {
                        pkg,
                        final_name,
                        n,
                        tmp_name,
                    }),
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        self.cannot_deliver(&pkg, &e);
                        report.failed += 1;
                        stopped.insert(pkg.pos);
                    }
                }
            }
            if temps.is_empty() {
                continue;
            }
            // 2. "Delivering", durable: it is what tells a crash after a rename apart.
            let rows: Vec<(i64, String, String)> = temps
                .iter()
                .map(|t| (t.pkg.id, t.final_name.clone(), t.tmp_name.clone()))
                .collect();
            if let Err(e) = store.mark_delivering_batch(&rows) {
                let e = anyhow::Error::new(e);
                for t in &temps {
                    let _ = fs::remove_file(self.path(&t.tmp_name));
                    self.cannot_deliver(&t.pkg, &e);
                    report.failed += 1;
                    stopped.insert(t.pkg.pos);
                }
                continue;
            }
            crash_point("after-delivering");
            // 3. Rename, in order.
            let mut done: Vec<Temp> = Vec::with_capacity(temps.len());
            let mut reset: Vec<Temp> = Vec::new();
            for t in temps {
                if stopped.contains(&t.pkg.pos) {
                    report.busy += 1;
                    reset.push(t);
                    continue;
                }
                let (tmp, dest) = (self.path(&t.tmp_name), self.path(&t.final_name));
                match fs::rename(&tmp, &dest) {
                    Ok(()) => done.push(t),
                    Err(e) => {
                        let e = anyhow::Error::new(e).context(format!(
                            "cannot rename {} to {}",
                            tmp.display(),
                            dest.display()
                        ));
                        self.cannot_deliver(&t.pkg, &e);
                        report.failed += 1;
                        stopped.insert(t.pkg.pos);
                        reset.push(t);
                    }
                }
            }
            if !reset.is_empty() {
                // Journal first, then the temps (see recover()).
                let ids: Vec<i64> = reset.iter().map(|t| t.pkg.id).collect();
                match store.reset_to_taken_batch(&ids) {
                    Ok(()) => {
                        for t in &reset {
                            let _ = fs::remove_file(self.path(&t.tmp_name));
                        }
                    }
                    // Still "delivering" with their temps: recover() resets them.
                    Err(e) => tracing::error!(endpoint = %self.name, "{e}"),
                }
            }
            if done.is_empty() {
                continue;
            }
            sync_dir(&self.config.path)
                .with_context(|| format!("cannot fsync {}", self.config.path.display()))?;
            crash_point("after-rename");
            // 4. "Delivered", lazy.
            let rows: Vec<(i64, Option<String>, Option<i64>)> = done
                .iter()
                .map(|t| (t.pkg.id, Some(t.final_name.clone()), t.n.map(i64::from)))
                .collect();
            if let Err(e) = store.mark_delivered_batch(&rows) {
                // They are in place; recover() journals them on the next pass.
                tracing::error!(endpoint = %self.name, "{e}");
            }
            for t in &done {
                self.delivered(&t.pkg, &t.final_name);
            }
            report.delivered += done.len() as u64;
        }
        store.sync_lazy()?;
        Ok(report)
    }

    /// The next `.$n` for `pkg`: above the highest listed or planned, and never a number
    /// that is present (a writer may have added one since the listing).
    fn next_free_number(
        &self,
        pkg: &Package,
        highest: &mut HashMap<(u32, Kind), u32>,
    ) -> (String, Option<u32>) {
        let pattern = self.pattern(pkg.kind);
        let mut n = highest.get(&(pkg.pos, pkg.kind)).copied().unwrap_or(0) + 1;
        while self
            .path(&pattern.render(pkg.pos, Some(n)))
            .symlink_metadata()
            .is_ok()
        {
            n += 1;
        }
        highest.insert((pkg.pos, pkg.kind), n);
        (pattern.render(pkg.pos, Some(n)), Some(n))
    }

    /// Logs a package that cannot be delivered now (once, then at debug level).
    fn cannot_deliver(&self, pkg: &Package, e: &anyhow::Error) {
        let key = format!("deliverfail:{}", pkg.id);
        if self.warned.first(&key) {
            tracing::error!(endpoint = %self.name, till = pkg.pos, package = pkg.id, "cannot deliver {} (it stays queued; retried every pass): {e:#}", pkg.describe());
        } else {
            tracing::debug!(endpoint = %self.name, till = pkg.pos, package = pkg.id, "still cannot deliver {}: {e:#}", pkg.describe());
        }
    }

    /// Logs a delivered package.
    fn delivered(&self, pkg: &Package, final_name: &str) {
        let key = format!("deliverfail:{}", pkg.id);
        if self.warned.contains(&key) {
            self.warned.forget(&key);
            tracing::info!(endpoint = %self.name, till = pkg.pos, package = pkg.id, "can deliver again");
        }
        tracing::info!(endpoint = %self.name, link = %pkg.link, till = pkg.pos, kind = %pkg.kind, package = pkg.id, bytes = pkg.size, source = %pkg.source_name, sha256 = %pkg.sha256, "delivered {final_name}");
    }

    /// Writes one package in single-file mode. Ok(false): the destination is busy (the
    /// till has not consumed the previous file).
    fn deliver_one(&self, store: &Store, pkg: &Package) -> anyhow::Result<bool> {
        let final_name = self.pattern(pkg.kind).render(pkg.pos, None);
        if !self.single_file_free(&final_name, pkg.kind)? {
            let key = format!("busy:{final_name}");
            if self.warned.first(&key) {
                tracing::info!(endpoint = %self.name, file = %final_name, till = pkg.pos, package = pkg.id, "waiting: the till has not consumed {final_name} yet");
            }
            return Ok(false);
        }
        self.warned.forget(&format!("busy:{final_name}"));
        let tmp_name = temp_name();
        let tmp = self.path(&tmp_name);
        if let Err(e) = self.write_temp(store, pkg, &tmp) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        store.mark_delivering(pkg.id, &final_name, &tmp_name)?;
        crash_point("after-delivering");
        let dest = self.path(&final_name);
        if let Err(e) = fs::rename(&tmp, &dest) {
            // Journal first, then the temp (see recover()).
            store.reset_to_taken(pkg.id)?;
            let _ = fs::remove_file(&tmp);
            return Err(e)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()));
        }
        sync_dir(&self.config.path)
            .with_context(|| format!("cannot fsync {}", self.config.path.display()))?;
        crash_point("after-rename");
        store.mark_delivered(pkg.id, Some(&final_name), None)?;
        self.delivered(pkg, &final_name);
        Ok(true)
    }

    /// Single-file mode: the name is free when absent, or (spr) when line 2 says loaded.
    fn single_file_free(&self, name: &str, kind: Kind) -> anyhow::Result<bool> {
        let path = self.path(name);
        match File::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e).with_context(|| format!("cannot open {}", path.display())),
            Ok(mut f) => {
                if kind != Kind::Spr {
                    return Ok(false);
                }
                let mut head = [0u8; 512];
                let n = read_up_to(&mut f, &mut head)?;
                Ok(spr_marked_loaded(&head[..n]))
            }
        }
    }

    fn write_temp(&self, store: &Store, pkg: &Package, tmp: &Path) -> anyhow::Result<()> {
        // A big payload in a spool file on the same filesystem: the temp becomes a second
        // name of that file (no bytes copied; they were fsync'd when taken). The spool's
        // name goes when the package is journaled delivered, so from then on the folder
        // holds the only name. Elsewhere (another filesystem, a share without links): copy.
        if !pkg.inline && fs::hard_link(&pkg.payload, tmp).is_ok() {
            let len = fs::metadata(tmp)
                .with_context(|| format!("cannot stat {}", tmp.display()))?
                .len();
            anyhow::ensure!(
                len == pkg.size,
                "the payload of {} has {len} bytes, the journal says {}",
                pkg.describe(),
                pkg.size
            );
            return Ok(());
        }
        let mut src = store
            .payload(pkg)
            .with_context(|| format!("cannot read the payload of {}", pkg.describe()))?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let copied = io::copy(&mut src, &mut out)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        out.flush()?;
        out.sync_all()
            .with_context(|| format!("cannot fsync {}", tmp.display()))?;
        anyhow::ensure!(
            copied == pkg.size,
            "the payload of {} has {copied} bytes, the journal says {}",
            pkg.describe(),
            pkg.size
        );
        Ok(())
    }

    /// The settle time, for the daemon's wake-ups.
    pub fn settle(&self) -> Duration {
        self.config.settle
    }

    pub fn role(&self) -> Role {
        self.routes.role
    }
}

/// At most this many packages per delivery batch (one "delivering" commit each)...
const BATCH_MAX: usize = 256;
/// ...and at most this many bytes, unless one package alone is bigger.
const BATCH_BYTES: u64 = 64 << 20;

/// A package written to its temp, to be renamed to `final_name`.
struct Temp {
    pkg: Package,
    final_name: String,
    n: Option<u32>,
    tmp_name: String,
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Copies with a buffer of up to 1 MiB, sized to the file (io::copy's 8 KiB means 128
/// writes and hash updates per MiB of a big package).
fn copy_big(from: &mut File, to: &mut impl Write, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; (len as usize).clamp(8 << 10, 1 << 20)];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

fn copy_durably(from: &Path, to: &Path) -> anyhow::Result<()> {
    let mut src = File::open(from).with_context(|| format!("cannot open {}", from.display()))?;
    let mut dst = File::create(to).with_context(|| format!("cannot create {}", to.display()))?;
    io::copy(&mut src, &mut dst).with_context(|| format!("cannot write {}", to.display()))?;
    dst.sync_all()?;
    Ok(())
}
