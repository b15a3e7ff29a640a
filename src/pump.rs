//! The pump: moves packages source → store → sink for every link, per till, in order.
//!
//! One pass = recover what a crash interrupted, scan every polled source once, then hand
//! each link's queue to its push sink. `sync` runs one pass; the daemon runs passes when
//! something wakes it (a filesystem event, a poll timer, a till's report).

use std::collections::BTreeMap;
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
        let sink_name = match direction {
            Direction::Down => &link.kassa,
            Direction::Up => &link.office,
        };
        let Some(sink) = self.endpoints.get(sink_name) else {
            return;
        };
        if !sink.is_push_sink() {
            return;
        }
        if !dry_run {
            if let Err(e) = sink.recover(&self.store).await {
                let msg = format!("endpoint {sink_name}: recovery failed: {e:#}");
                tracing::error!("{msg}");
                report.errors.push(msg);
                return;
            }
        }
        let queue = match self.store.queue(&link.name, direction) {
            Ok(q) => q,
            Err(e) => {
                report.errors.push(e.to_string());
                return;
            }
        };
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
            }
            Err(e) => {
                report.queued += n;
                let msg = format!("link {} → {sink_name}: {e:#}", link.name);
                tracing::error!("{msg}");
                self.live.endpoint_error(sink_name, &msg);
                report.errors.push(msg);
            }
        }
    }

    /// One full pass over every source and link.
    pub async fn pass(&self, dry_run: bool) -> PassReport {
        let mut report = PassReport::default();
        for ep in self.endpoints.values() {
            self.take_from(ep, dry_run, &mut report).await;
        }
        for link in &self.config.links {
            for dir in [Direction::Down, Direction::Up] {
                self.deliver_link(link, dir, dry_run, &mut report).await;
            }
        }
        report
    }
}
