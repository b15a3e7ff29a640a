//! Group commit for reports pushed by tills (SendData, PROTOCOL.md §4.2).
//!
//! A till gets errcode "0" only once its report is durable, i.e. after an fsync of the
//! journal. One transaction per report caps SendData at the disk's fsync rate; here the
//! reports that arrive while a commit is running wait for it and are then committed
//! together, in one transaction and one fsync (the classic leader/follower group commit):
//!
//! 1. a request queues its report in `pending`;
//! 2. it takes the `leader` lock; whoever holds it drains everything pending, commits it
//!    in one transaction and fills each report's slot before releasing the lock;
//! 3. so when a request gets the lock, either an earlier leader already answered its slot,
//!    or its report is still pending and it commits the batch itself.
//!
//! Nothing changes for durability: no slot is answered before its transaction committed,
//! and a crash before that loses only reports whose tills have not been answered (they
//! send them again, under the same number).

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

type Slot = Arc<Mutex<Option<Result<ReportOutcome, String>>>>;

#[derive(Default)]
pub(super) struct GroupCommit {
    pending: Mutex<Vec<(NewReport, Slot)>>,
    leader: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Journals a report durably (or recognises a repeat) together with the reports other
    /// tills push at the same moment. Blocks until its transaction has committed.
    pub fn commit_report(&self, report: NewReport) -> super::Result<ReportOutcome> {
        let slot: Slot = Arc::default();
        lock(&self.group.pending).push((report, slot.clone()));
        let _leader = lock(&self.group.leader);
        if let Some(r) = lock(&slot).take() {
            return r.map_err(|e| self.batch_error(e));
        }
        let batch = std::mem::take(&mut *lock(&self.group.pending));
        let results = self.commit_batch(&batch);
        let mut mine = None;
        for ((report, s), r) in batch.into_iter().zip(results) {
            // A repeat or a failed commit keeps no payload; a stored one is in its row.
            if !matches!(r, Ok(ReportOutcome::Stored { .. })) {
                report.spooled.discard();
            }
            if Arc::ptr_eq(&s, &slot) {
                mine = Some(r);
            } else {
                *lock(&s) = Some(r);
            }
        }
        mine.expect("the leader's own report is in the batch it drained")
            .map_err(|e| self.batch_error(e))
    }

    fn batch_error(&self, e: String) -> StoreError {
        StoreError::Io {
            dir: self.dir.display().to_string(),
            what: "cannot journal a report".into(),
            source: std::io::Error::other(e),
        }
    }

    /// One transaction for the whole batch: all reports are committed, or none.
    fn commit_batch(&self, batch: &[(NewReport, Slot)]) -> Vec<Result<ReportOutcome, String>> {
        let mut conn = self.conn();
        let r = (|| -> rusqlite::Result<Vec<ReportOutcome>> {
            let tx = conn.transaction()?;
            let mut out = Vec::with_capacity(batch.len());
            for (r, _) in batch {
                // Earlier reports of this batch are visible to these queries (same
                // transaction), so a repeat within one batch is recognised too.
                let repeat: Option<i64> = tx
                    .prepare_cached(
                        "SELECT id FROM package WHERE source_endpoint = ?1 AND pos = ?2
                         AND source_seq = ?3 AND sha256 = ?4 ORDER BY id DESC LIMIT 1",
                    )?
                    .query_row(
                        params![r.source_endpoint, r.pos, r.number, r.spooled.sha256],
                        |row| row.get(0),
                    )
                    .map(Some)
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(None),
                        e => Err(e),
                    })?;
                if let Some(id) = repeat {
                    out.push(ReportOutcome::Repeat { id });
                    continue;
                }
                let number_reused = tx
                    .prepare_cached(
                        "SELECT 1 FROM package WHERE source_endpoint = ?1 AND pos = ?2
                         AND source_seq = ?3 LIMIT 1",
                    )?
                    .exists(params![r.source_endpoint, r.pos, r.number])?;
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
                            outcomes.push(store.commit_report(r).unwrap());
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
        let o = store.commit_report(report(&store, 1, 1, b"other")).unwrap();
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
        let store = Store::open(dir.path()).unwrap();
        let big = vec![b'x'; super::super::INLINE_MAX + 1];
        let first = store.commit_report(report(&store, 1, 1, &big)).unwrap();
        assert!(matches!(first, ReportOutcome::Stored { .. }));
        let again = store.commit_report(report(&store, 1, 1, &big)).unwrap();
        assert!(matches!(again, ReportOutcome::Repeat { .. }));
        let files = walkdir::WalkDir::new(dir.path().join("spool"))
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .count();
        assert_eq!(files, 1, "only the stored report's spool file is left");
    }
}
