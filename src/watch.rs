//! The daemon's wake-ups (`kkm-bridge run`): filesystem events, rescan timers, tills'
//! reports, and the shutdown signal.
//!
//! - One task per polled source. A directory is watched with notify; an event schedules a
//!   take once the file can be complete (the dir endpoint takes files whose mtime is at
//!   least `settle` old, so the take is scheduled `settle` after the event, and again
//!   `settle` later while files are still being written). A rescan every `rescan` is the
//!   safety net: events can be lost or overflow, and network shares send none.
//!   The fast path is a file renamed into place with `settle = "0s"`: it is taken as soon
//!   as the rename event arrives.
//! - One delivery task: delivers a link's queue to its push sink when a source took
//!   something for it or a till posted a report, and every few seconds for busy sinks.
//! - HTTP endpoints serve until shutdown; in-flight requests finish (graceful shutdown).
//! - Every operation on an endpoint holds that endpoint's lock, so a take and a delivery on
//!   the same directory never run their crash recovery under each other's feet.
//! - A bad endpoint (unreadable folder, port in use) is logged and the others go on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::endpoint::http_server::OnReport;
use crate::endpoint::Endpoint;
use crate::package::{is_temp_name, Direction};
use crate::pump::{PassReport, Pump};

/// Fires once when the daemon should stop.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }
    /// Completes when shutdown was requested (or the sender is gone).
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

/// How often queued packages for push sinks are retried without a wake-up.
const DELIVER_RETRY: Duration = Duration::from_secs(5);
/// The shortest wait before looking again at a file that was still being written.
const MIN_RETAKE: Duration = Duration::from_millis(20);
/// How often a polled source that is not a directory is scanned (until it has its own).
const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// The running daemon's shared parts.
pub struct Daemon {
    pub pump: Arc<Pump>,
    locks: BTreeMap<String, Arc<Mutex<()>>>,
    deliver_tx: mpsc::UnboundedSender<String>,
    deliver_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

impl Daemon {
    pub fn new(pump: Arc<Pump>) -> Arc<Daemon> {
        let locks = pump
            .endpoints
            .keys()
            .map(|k| (k.clone(), Arc::new(Mutex::new(()))))
            .collect();
        let (deliver_tx, deliver_rx) = mpsc::unbounded_channel();
        Arc::new(Daemon {
            pump,
            locks,
            deliver_tx,
            deliver_rx: std::sync::Mutex::new(Some(deliver_rx)),
        })
    }

    fn lock(&self, endpoint: &str) -> Arc<Mutex<()>> {
        self.locks
            .get(endpoint)
            .cloned()
            .unwrap_or_else(|| Arc::new(Mutex::new(())))
    }

    /// Asks the delivery task to deliver a link's queues now.
    pub fn wake_link(&self, link: &str) {
        let _ = self.deliver_tx.send(link.to_string());
    }

    /// For HTTP endpoints: a stored report wakes its link.
    pub fn on_report(self: &Arc<Self>) -> OnReport {
        let d = self.clone();
        Arc::new(move |link: &str| d.wake_link(link))
    }

    /// Takes from one source under its lock; wakes the links it took packages for.
    async fn take(&self, ep: &Endpoint) -> PassReport {
        let lock = self.lock(ep.name());
        let _g = lock.lock().await;
        let mut report = PassReport::default();
        self.pump.take_from(ep, false, &mut report).await;
        if report.taken > 0 {
            for r in &ep.routes().links {
                self.wake_link(&r.link);
            }
        }
        report
    }

    /// Delivers the queues of `links` (both directions) under each sink's lock.
    async fn deliver(&self, links: &BTreeSet<String>) {
        for link in self.pump.config.links.iter() {
            if !links.contains(&link.name) {
                continue;
            }
            for dir in [Direction::Down, Direction::Up] {
                let sink = link.sink(dir);
                if !self
                    .pump
                    .endpoints
                    .get(sink)
                    .is_some_and(|e| e.is_push_sink())
                {
                    continue;
                }
                let lock = self.lock(sink);
                let _g = lock.lock().await;
                let mut report = PassReport::default();
                self.pump.deliver_link(link, dir, false, &mut report).await;
            }
        }
    }

    /// The delivery task: wake-ups from sources and tills, plus a periodic retry.
    async fn deliver_loop(self: Arc<Self>, shutdown: Shutdown) {
        let Some(mut rx) = self
            .deliver_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let all: BTreeSet<String> = self
            .pump
            .config
            .links
            .iter()
            .map(|l| l.name.clone())
            .collect();
        let mut retry = tokio::time::interval(DELIVER_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = shutdown.clone().wait();
        tokio::pin!(stop);
        loop {
            let mut links = BTreeSet::new();
            tokio::select! {
                _ = &mut stop => break,
                l = rx.recv() => match l {
                    Some(l) => { links.insert(l); }
                    None => break,
                },
                _ = retry.tick() => links = all.clone(),
            }
            while let Ok(l) = rx.try_recv() {
                links.insert(l);
            }
            self.deliver(&links).await;
        }
        // Whatever was woken before the stop is delivered before we go.
        let mut links = BTreeSet::new();
        while let Ok(l) = rx.try_recv() {
            links.insert(l);
        }
        if !links.is_empty() {
            self.deliver(&links).await;
        }
    }

    /// The task of one polled source.
    async fn source_loop(self: Arc<Self>, ep: Arc<Endpoint>, shutdown: Shutdown) {
        let (settle, rescan) = match &*ep {
            Endpoint::Dir(d) => (d.config.settle, d.config.rescan),
            other => (
                Duration::ZERO,
                other.poll_interval().unwrap_or(DEFAULT_POLL),
            ),
        };
        let rescan = rescan.max(Duration::from_millis(10));
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<()>();
        // Keep the watcher alive for the life of the task.
        let _watcher = match &*ep {
            Endpoint::Dir(d) => watch_dir(&d.name, &d.config.path, ev_tx),
            _ => None,
        };
        let mut next_take: Option<Instant> = Some(Instant::now());
        let mut next_rescan = Instant::now() + rescan;
        let mut events_alive = true;
        let stop = shutdown.clone().wait();
        tokio::pin!(stop);
        loop {
            let due = next_take.unwrap_or(next_rescan).min(next_rescan);
            tokio::select! {
                _ = &mut stop => break,
                ev = ev_rx.recv(), if events_alive => {
                    if ev.is_none() {
                        // The watcher is gone; rescans go on.
                        events_alive = false;
                        continue;
                    }
                    while ev_rx.try_recv().is_ok() {}
                    // A file consumed here (a till took its single file, the office took a
                    // report) may free the name the next package waits for: deliver now
                    // rather than on the retry timer.
                    if ep.is_push_sink() {
                        for r in &ep.routes().links {
                            self.wake_link(&r.link);
                        }
                    }
                    let at = Instant::now() + settle;
                    next_take = Some(next_take.map_or(at, |t| t.min(at)));
                }
                _ = tokio::time::sleep_until(due) => {
                    let now = Instant::now();
                    if now >= next_rescan {
                        next_rescan = now + rescan;
                    }
                    next_take = None;
                    let report = self.take(&ep).await;
                    if report.waiting > 0 {
                        next_take = Some(Instant::now() + settle.max(MIN_RETAKE));
                    }
                }
            }
        }
    }
}

/// Watches a directory; every relevant event sends a wake-up. None when the platform or
/// the folder refuses (the rescan timer still runs).
fn watch_dir(
    name: &str,
    path: &std::path::Path,
    tx: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let handler = move |res: notify::Result<notify::Event>| match res {
        Ok(ev) => {
            let relevant = match ev.kind {
                EventKind::Access(_) => false,
                _ => !ev.paths.iter().all(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(is_temp_name)
                }),
            };
            if relevant {
                let _ = tx.send(());
            }
        }
        // Overflow or a watcher error: look anyway.
        Err(_) => {
            let _ = tx.send(());
        }
    };
    let mut w = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(endpoint = %name, "cannot watch for filesystem events ({e}); rescanning on the timer only");
            return None;
        }
    };
    if let Err(e) = w.watch(path, RecursiveMode::NonRecursive) {
        tracing::warn!(endpoint = %name, path = %path.display(), "cannot watch for filesystem events ({e}); rescanning on the timer only");
        return None;
    }
    Some(w)
}

/// Binds every HTTP endpoint's `listen` address. An endpoint whose address cannot be bound
/// is logged and left out.
pub async fn bind_http(pump: &Pump) -> Vec<(Arc<Endpoint>, tokio::net::TcpListener)> {
    let mut out = Vec::new();
    for ep in pump.endpoints.values() {
        if let Endpoint::Http(h) = &**ep {
            match tokio::net::TcpListener::bind(h.config.listen).await {
                Ok(l) => out.push((ep.clone(), l)),
                Err(e) => {
                    tracing::error!(endpoint = %h.name, listen = %h.config.listen, "cannot listen: {e}; this endpoint is not served")
                }
            }
        }
    }
    out
}

/// Runs the daemon until `shutdown` fires: HTTP endpoints on the given listeners, one task
/// per polled source, the delivery task. Returns when everything has stopped.
pub async fn run(
    daemon: Arc<Daemon>,
    listeners: Vec<(Arc<Endpoint>, tokio::net::TcpListener)>,
    shutdown: Shutdown,
) {
    let mut tasks = JoinSet::new();
    for (ep, listener) in listeners {
        let Endpoint::Http(h) = &*ep else { continue };
        let h = h.clone();
        let store = daemon.pump.store.clone();
        let on_report = daemon.on_report();
        let stop = shutdown.clone().wait();
        tasks.spawn(async move {
            let name = h.name.clone();
            if let Err(e) = h.serve(listener, store, on_report, stop).await {
                tracing::error!(endpoint = %name, "HTTP server stopped: {e}");
            }
        });
    }
    for ep in daemon.pump.endpoints.values() {
        if ep.is_polled_source() {
            tasks.spawn(daemon.clone().source_loop(ep.clone(), shutdown.clone()));
        }
    }
    tasks.spawn(daemon.clone().deliver_loop(shutdown.clone()));
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            if e.is_panic() {
                tracing::error!("a daemon task panicked: {e}");
            }
        }
    }
}
