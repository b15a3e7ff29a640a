//! Group commit for reports pushed by tills (SendData, PROTOCOL.md §4.2).
//!
//! A till gets errcode "0" only once its report is durable, i.e. after an fsync of the
//! journal. One transaction per report caps SendData at the disk's fsync rate; here the
//! reports are handed to one committer thread, which takes everything that arrived while
//! it was committing and commits it together, in one transaction and one fsync:
//!
//! 1. a request sends its report and a reply slot down a channel, and waits on the slot;
//! 2. the committer takes the first report waiting, then every other one already queued,
//!    commits them in one transaction and answers each slot after the commit;
//! 3. the busier the service, the bigger the batches, and the fewer fsyncs per report.
//!
//! Nothing changes for durability: no slot is answered before its transaction committed,
//! and a crash before that loses only reports whose tills have not been answered (they
//! send them again, under the same number). The committer holds only a weak reference to
//! the store, so dropping the store (its lock released) ends the thread.

use std::sync::{Arc, Mutex};

use rusqlite::params;

use super::{insert_taken, Spooled, Store, StoreError, Taken};
use crate::package::Kind;

/// A report a till pushed, spooled and ready to be journaled.
#[derive(Debug)]
pub struct NewReport {
    pub link: String,
    pub pos: u32,
    pub uid: Option<String>,
    pub source_endpoint: String,
    pub source_name: String,
    /// The till's package number.
    pub number: i64,
    /// The office endpoint it goes to.
    pub sink_endpoint: String,
    pub spooled: Spooled,
}

/// What became of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Journaled under this id (committed, durable). `number_reused`: the till had sent a
    /// different report under the same number before (counter reset?).
    Stored { id: i64, number_reused: bool },
    /// The same till, number and content was already journaled as this id: nothing stored.
    Repeat { id: i64 },
}

/// A report waiting for the committer, and where its outcome goes.
struct Job {
    report: NewReport,
    reply: tokio::sync::oneshot::Sender<Result<ReportOutcome, String>>,
}

/// The most reports one transaction takes (a bound on the time a batch holds the journal).
const MAX_BATCH: usize = 1024;

#[derive(Default)]
pub(super) struct GroupCommit {
    /// To the committer thread, started by the first report.
    queue: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Journals a report durably (or recognises a repeat) together with the reports other
    /// tills push at the same moment. Resolves once its transaction has committed.
    pub async fn commit_report(
        self: &Arc<Self>,
        report: NewReport,
    ) -> super::Result<ReportOutcome> {
        let rx = self.enqueue_report(report)?;
        match rx.await {
            Ok(r) => r.map_err(|e| self.batch_error(e)),
            Err(_) => Err(self.batch_error("the committer thread stopped".into())),
        }
    }

    /// [`Store::commit_report`] for a thread outside the async runtime.
    pub fn commit_report_blocking(
        self: &Arc<Self>,
        report: NewReport,
    ) -> super::Result<ReportOutcome> {
        let rx = self.enqueue_report(report)?;
        match rx.blocking_recv() {
            Ok(r) => r.map_err(|e| self.batch_error(e)),
            Err(_) => Err(self.batch_error("the committer thread stopped".into())),
        }
    }

    fn enqueue_report(
        self: &Arc<Self>,
        report: NewReport,
    ) -> super::Result<tokio::sync::oneshot::Receiver<Result<ReportOutcome, String>>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let mut queue = lock(&self.group.queue);
        if queue.is_none() {
            let (tx, jobs) = std::sync::mpsc::channel::<Job>();
            let store = Arc::downgrade(self);
            std::thread::Builder::new()
                .name("kkm-report-commit".into())
                .spawn(move || committer(store, jobs))
                .map_err(|e| self.io("cannot start the report committer thread", e))?;
            *queue = Some(tx);
        }
        let job = Job { report, reply };
        if let Err(std::sync::mpsc::SendError(job)) = queue.as_ref().expect("set above").send(job) {
            *queue = None;
            job.report.spooled.discard();
            return Err(self.batch_error("the committer thread stopped".into()));
        }
        Ok(rx)
    }

    fn batch_error(&self, e: String) -> StoreError {
        StoreError::Io {
            dir: self.dir.display().to_string(),
            what: "cannot journal a report".into(),
            source: std::io::Error::other(e),
        }
    }

    /// One transaction for the whole batch: all reports are committed, or none.
    fn commit_batch(&self, batch: &[Job]) -> Vec<Result<ReportOutcome, String>> {
        let mut conn = self.conn();
        let r = (|| -> rusqlite::Result<Vec<ReportOutcome>> {
            let tx = conn.transaction()?;
            let mut out = Vec::with_capacity(batch.len());
            for Job { report: r, .. } in batch {
                // Earlier reports of this batch are visible to this query (same
                // transaction), so a repeat within one batch is recognised too. One query
                // (on the package_source_seq index) answers both questions: the newest row
                // with this content, and whether the number was used at all.
                let (repeat, number_reused): (Option<i64>, bool) = tx
                    .prepare_cached(
                        "SELECT MAX(CASE WHEN sha256 = ?4 THEN id END), COUNT(*) > 0
                         FROM package WHERE source_endpoint = ?1 AND pos = ?2
                         AND source_seq = ?3",
                    )?
                    .query_row(
                        params![r.source_endpoint, r.pos, r.number, r.spooled.sha256],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )?;
                if let Some(id) = repeat {
                    out.push(ReportOutcome::Repeat { id });
                    continue;
                }
                let id = insert_taken(
                    &tx,
                    &Taken {
                        link: &r.link,
                        pos: r.pos,
                        kind: Kind::Rep,
                        uid: r.uid.as_deref(),
                        source_endpoint: &r.source_endpoint,
                        source_name: &r.source_name,
                        source_seq: Some(r.number),
                        sink_endpoint: &r.sink_endpoint,
                    },
                    &r.spooled,
                    true,
                )?;
                out.push(ReportOutcome::Stored { id, number_reused });
            }
            crate::failpoint::crash_point("report-batch-before-commit");
            tx.commit()?;
            Ok(out)
        })();
        match r {
            Ok(v) => v.into_iter().map(Ok).collect(),
            Err(e) => {
                let msg = e.to_string();
                batch.iter().map(|_| Err(msg.clone())).collect()
            }
        }
    }
}

/// The committer thread: one transaction for everything queued, then the answers.
fn committer(store: std::sync::Weak<Store>, jobs: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let Some(store) = store.upgrade() else {
            for j in batch {
                j.report.spooled.discard();
            }
            return;
        };
        let results = store.commit_batch(&batch);
        // Let go of the store before anyone hears back: a caller that drops its store
        // next must find the lock released.
        drop(store);
        for (job, r) in batch.into_iter().zip(results) {
            // A repeat or a failed commit keeps no payload; a stored one is in its row.
            if !matches!(r, Ok(ReportOutcome::Stored { .. })) {
                job.report.spooled.discard();
            }
            // A till that hung up gets nothing; the report stays committed (it will send
            // it again and get "1").
            let _ = job.reply.send(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn report(store: &Store, pos: u32, number: i64, body: &[u8]) -> NewReport {
        let mut w = store.spool_writer().unwrap();
        w.write_all(body).unwrap();
        NewReport {
            link: "l".into(),
            pos,
            uid: None,
            source_endpoint: "tills".into(),
            source_name: format!("SendData/{pos}/{number}"),
            number,
            sink_endpoint: "office".into(),
            spooled: w.finish().unwrap(),
        }
    }

    #[test]
    fn concurrent_reports_are_stored_once_and_repeats_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        // 8 threads × 50 reports, every report sent twice (a till retrying).
        let handles: Vec<_> = (0..8u32)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut outcomes = Vec::new();
                    for n in 1..=50i64 {
                        let body = format!("report {t}/{n}").into_bytes();
                        for _ in 0..2 {
                            let r = report(&store, t + 1, n, &body);
                            outcomes.push(store.commit_report_blocking(r).unwrap());
                        }
                    }
                    outcomes
                })
            })
            .collect();
        let mut stored = 0;
        let mut repeats = 0;
        for h in handles {
            for o in h.join().unwrap() {
                match o {
                    ReportOutcome::Stored { number_reused, .. } => {
                        assert!(!number_reused);
                        stored += 1
                    }
                    ReportOutcome::Repeat { .. } => repeats += 1,
                }
            }
        }
        assert_eq!((stored, repeats), (400, 400));
        let rows: i64 = store
            .with_conn(|c| c.query_row("SELECT COUNT(*) FROM package", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(rows, 400);
        // The same number with new content is stored and flagged.
        let o = store
            .commit_report_blocking(report(&store, 1, 1, b"other"))
            .unwrap();
        assert!(matches!(
            o,
            ReportOutcome::Stored {
                number_reused: true,
                ..
            }
        ));
    }

    #[test]
    fn a_repeat_leaves_no_spool_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let big = vec![b'x'; super::super::INLINE_MAX + 1];
        let first = store
            .commit_report_blocking(report(&store, 1, 1, &big))
            .unwrap();
        assert!(matches!(first, ReportOutcome::Stored { .. }));
        let again = store
            .commit_report_blocking(report(&store, 1, 1, &big))
            .unwrap();
        assert!(matches!(again, ReportOutcome::Repeat { .. }));
        let files = walkdir::WalkDir::new(dir.path().join("spool"))
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .count();
        assert_eq!(files, 1, "only the stored report's spool file is left");
    }

    #[test]
    fn dropping_the_store_ends_the_committer_and_releases_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        for n in 1..=3 {
            let store = Arc::new(Store::open(dir.path()).unwrap());
            let o = store
                .commit_report_blocking(report(&store, 1, n, b"r"))
                .unwrap();
            assert!(matches!(o, ReportOutcome::Stored { .. }));
        }
    }
}
