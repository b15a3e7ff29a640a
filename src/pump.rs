//! The pump: moves packages source → store → sink for every link, per till, in order.
//!
//! One pass = recover what a crash interrupted, scan every polled source once, then hand
//! each link's queue to its push sink. `sync` runs one pass; the daemon runs passes when
//! something wakes it (a filesystem event, a poll timer, a till's report).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::config::Config;
use crate::endpoint::{self, Endpoint};
use crate::package::Direction;
use crate::store::Store;

/// What one pass did, summed over all endpoints and links.
#[derive(Debug, Default, Clone)]
pub struct PassReport {
    pub taken: u64,
    pub delivered: u64,
    /// Files seen at a source but not complete yet.
    pub waiting: u64,
    /// Packages that stay queued for a push sink (busy or failing).
    pub queued: u64,
    /// Errors, one line each, already logged.
    pub errors: Vec<String>,
    /// Dry run: what would be done.
    pub planned: Vec<String>,
}

impl PassReport {
    /// Nothing left to do for now.
    pub fn all_moved(&self) -> bool {
        self.queued == 0 && self.waiting == 0 && self.errors.is_empty()
    }
}

pub struct Pump {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub endpoints: BTreeMap<String, Arc<Endpoint>>,
    /// What the status page shows beyond the journal: reachability, last errors.
    pub live: Arc<crate::status::Live>,
}

impl Pump {
    pub fn new(config: Arc<Config>, store: Arc<Store>) -> anyhow::Result<Pump> {
        let endpoints = endpoint::build(&config)?;
        Ok(Pump::with_endpoints(config, store, endpoints))
    }

    pub fn with_endpoints(
        config: Arc<Config>,
        store: Arc<Store>,
        endpoints: Vec<Endpoint>,
    ) -> Pump {
        endpoint::wire_preloads(&endpoints);
        let live = crate::status::Live::new();
        for e in &endpoints {
            if let Endpoint::Http(h) = e {
                let _ = h.live.set(live.clone());
            }
        }
        Pump {
            config,
            store,
            endpoints: endpoints
                .into_iter()
                .map(|e| (e.name().to_string(), Arc::new(e)))
                .collect(),
            live,
        }
    }

    /// Scans one polled source and takes what is ready.
    pub async fn take_from(&self, ep: &Endpoint, dry_run: bool, report: &mut PassReport) {
        if !ep.is_polled_source() {
            return;
        }
        if !dry_run {
            if let Err(e) = ep.recover(&self.store).await {
                let msg = format!("endpoint {}: recovery failed: {e:#}", ep.name());
                tracing::error!("{msg}");
                report.errors.push(msg);
                return;
            }
        }
        match ep.take(&self.store, dry_run).await {
            Ok(r) => {
                report.taken += r.taken;
                report.waiting += r.waiting;
                if r.failed > 0 {
                    let msg = format!(
                        "endpoint {}: {} package(s) could not be taken",
                        ep.name(),
                        r.failed
                    );
                    self.live.endpoint_error(ep.name(), &msg);
                    report.errors.push(msg);
                } else if !dry_run {
                    self.live.endpoint_ok(ep.name());
                }
                report.planned.extend(r.planned);
            }
            Err(e) => {
                let msg = format!("endpoint {}: {e:#}", ep.name());
                tracing::error!("{msg}");
                self.live.endpoint_error(ep.name(), &msg);
                report.errors.push(msg);
            }
        }
    }

    /// Delivers one link's queue in one direction, if its sink is a push sink.
    pub async fn deliver_link(
        &self,
        link: &crate::config::LinkConfig,
        direction: Direction,
        dry_run: bool,
        report: &mut PassReport,
    ) {
        self.deliver_link_except(link, direction, dry_run, &HashSet::new(), report)
            .await;
    }

    /// [`Pump::deliver_link`] without the tills in `skip`. Returns the ids handed to the
    /// sink, or None when there is no push sink or the sink failed as a whole.
    async fn deliver_link_except(
        &self,
        link: &crate::config::LinkConfig,
        direction: Direction,
        dry_run: bool,
        skip: &HashSet<u32>,
        report: &mut PassReport,
    ) -> Option<Vec<i64>> {
        let sink_name = link.sink(direction);
        let sink = self.endpoints.get(sink_name)?;
        if !sink.is_push_sink() {
            return None;
        }
        if !dry_run {
            if let Err(e) = sink.recover(&self.store).await {
                let msg = format!("endpoint {sink_name}: recovery failed: {e:#}");
                tracing::error!("{msg}");
                report.errors.push(msg);
                return None;
            }
        }
        let mut queue = match self.store.queue(&link.name, direction) {
            Ok(q) => q,
            Err(e) => {
                report.errors.push(e.to_string());
                return None;
            }
        };
        if !skip.is_empty() {
            queue.retain(|p| !skip.contains(&p.pos));
        }
        let ids: Vec<i64> = queue.iter().map(|p| p.id).collect();
        let n = queue.len() as u64;
        match sink.deliver(&self.store, queue, dry_run).await {
            Ok(r) => {
                report.delivered += r.delivered;
                report.queued += r.busy + r.failed;
                if r.failed > 0 {
                    let msg = format!(
                        "link {}: {} package(s) could not be delivered to {sink_name}",
                        link.name, r.failed
                    );
                    self.live.endpoint_error(sink_name, &msg);
                    report.errors.push(msg);
                } else if r.delivered > 0 {
                    self.live.endpoint_ok(sink_name);
                }
                report.planned.extend(r.planned);
                Some(ids)
            }
            Err(e) => {
                report.queued += n;
                let msg = format!("link {} → {sink_name}: {e:#}", link.name);
                tracing::error!("{msg}");
                self.live.endpoint_error(sink_name, &msg);
                report.errors.push(msg);
                None
            }
        }
    }

    /// One full pass over every source and link.
    ///
    /// Deliveries start while the sources are still being taken: each delivery round
    /// hands every link's queue, as committed so far, to its sink, and another round
    /// follows whenever more was queued meanwhile. The last round starts after every
    /// source was scanned, so the pass ends with what one take-then-deliver pass would
    /// have delivered, only sooner (the take's hashing and fsyncs overlap the uploads, and
    /// an FTP sink logs in while the folder is still being read).
    ///
    /// - As in the daemon, an endpoint is never taken from and delivered to at the same
    ///   time (one lock per endpoint).
    /// - Rounds run one after the other and a till's packages are committed in order, so
    ///   each till's order is kept.
    /// - A till a round could not deliver (refused, busy, sink down) is left out of the
    ///   pass's later rounds, as it would be left until the next pass; a sink that failed
    ///   as a whole is left out for the rest of the pass.
    /// - A dry run plans the take, then the deliveries, without overlap.
    pub async fn pass(&self, dry_run: bool) -> PassReport {
        let mut report = PassReport::default();
        if dry_run {
            for ep in self.endpoints.values() {
                self.take_from(ep, true, &mut report).await;
            }
            for link in &self.config.links {
                for dir in [Direction::Down, Direction::Up] {
                    self.deliver_link(link, dir, true, &mut report).await;
                }
            }
            return report;
        }
        let locks: BTreeMap<&str, tokio::sync::Mutex<()>> = self
            .endpoints
            .keys()
            .map(|k| (k.as_str(), tokio::sync::Mutex::new(())))
            .collect();
        let mut queued = self.store.watch_queued();
        let (taken_all, mut takes_done) = tokio::sync::watch::channel(false);
        let takes = async {
            let mut r = PassReport::default();
            for ep in self.endpoints.values() {
                let _g = locks[ep.name()].lock().await;
                self.take_from(ep, false, &mut r).await;
            }
            taken_all.send_replace(true);
            r
        };
        let deliveries = async {
            let mut r = PassReport::default();
            let mut rounds = Rounds::default();
            loop {
                let last = *takes_done.borrow_and_update();
                queued.borrow_and_update();
                self.deliver_round(&locks, &mut rounds, &mut r).await;
                if last {
                    return r;
                }
                tokio::select! {
                    _ = queued.changed() => {}
                    _ = takes_done.changed() => {}
                }
            }
        };
        let (took, delivered) = tokio::join!(takes, deliveries);
        report.taken = took.taken;
        report.waiting = took.waiting;
        report.errors = took.errors;
        report.delivered = delivered.delivered;
        report.errors.extend(delivered.errors);
        // What stays queued for a push sink: what its rounds left out or could not deliver.
        for link in &self.config.links {
            for dir in [Direction::Down, Direction::Up] {
                let sink = link.sink(dir);
                if self.endpoints.get(sink).is_some_and(|e| e.is_push_sink()) {
                    report.queued += self
                        .store
                        .queue(&link.name, dir)
                        .map_or(0, |q| q.len() as u64);
                }
            }
        }
        report
    }

    /// One delivery round: every link's queues, both directions, each under its sink's
    /// lock, without the tills and sinks that failed earlier in the pass. The sinks that
    /// are free go first; those still being taken from (an FTP download and its `DELE`,
    /// say) after them, so that they do not hold up the others: the report an FTP take
    /// just committed reaches the office folder while the server deletes its file.
    async fn deliver_round(
        &self,
        locks: &BTreeMap<&str, tokio::sync::Mutex<()>>,
        rounds: &mut Rounds,
        report: &mut PassReport,
    ) {
        let mut busy = Vec::new();
        for (i, link) in self.config.links.iter().enumerate() {
            for dir in [Direction::Down, Direction::Up] {
                if rounds.down.contains(&(i, dir)) {
                    continue;
                }
                match locks.get(link.sink(dir)).map(|l| l.try_lock()) {
                    Some(Ok(_g)) => self.deliver_in_round(i, link, dir, rounds, report).await,
                    Some(Err(_)) => busy.push((i, link, dir)),
                    None => {}
                }
            }
        }
        for (i, link, dir) in busy {
            let _g = locks[link.sink(dir)].lock().await;
            self.deliver_in_round(i, link, dir, rounds, report).await;
        }
    }

    /// One link's queue in one direction, in a delivery round (its sink's lock held).
    async fn deliver_in_round(
        &self,
        i: usize,
        link: &crate::config::LinkConfig,
        dir: Direction,
        rounds: &mut Rounds,
        report: &mut PassReport,
    ) {
        let skip = rounds.skip.entry((i, dir)).or_default();
        let mut round = PassReport::default();
        let handed = self
            .deliver_link_except(link, dir, false, skip, &mut round)
            .await;
        report.delivered += round.delivered;
        let failed = round.queued > 0 || !round.errors.is_empty();
        for e in round.errors {
            if !report.errors.contains(&e) {
                report.errors.push(e);
            }
        }
        match handed {
            Some(ids) if failed => {
                // Which of the packages handed over are still queued: their tills wait
                // for the next pass.
                let handed: HashSet<i64> = ids.into_iter().collect();
                if let Ok(q) = self.store.queue(&link.name, dir) {
                    skip.extend(q.iter().filter(|p| handed.contains(&p.id)).map(|p| p.pos));
                }
            }
            None if failed => {
                rounds.down.insert((i, dir));
            }
            _ => {}
        }
    }
}

/// What the delivery rounds of one pass learned, per (link index, direction).
#[derive(Default)]
struct Rounds {
    /// Tills left out of the pass's later rounds.
    skip: HashMap<(usize, Direction), HashSet<u32>>,
    /// Sinks that failed as a whole: left out of the pass's later rounds.
    down: HashSet<(usize, Direction)>,
}
