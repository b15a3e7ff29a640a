//! The exchange methods, one module each, behind one enum.
//!
//! An endpoint plays one role in all its links: **office** (where spr/flr come from and
//! rep goes to) or **kassa** (where tills take spr/flr and leave rep). Two capabilities:
//! - a *polled source* is scanned by the pump ([`Endpoint::take`]): dir, ftp, http-client;
//! - a *push sink* is written by the pump ([`Endpoint::deliver`]): dir, ftp, http-client.
//!
//! The HTTP service for tills is neither: tills push reports into the store and pull
//! packages from it themselves, so the pump leaves it alone.

pub mod dir;
pub mod ftp;
pub mod http_client;
pub mod http_server;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::config::{Config, EndpointConfig, PosSet};
use crate::package::{Direction, Kind, NamePattern, Package};
use crate::store::Store;

/// Which side of its links an endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Office,
    Kassa,
}

impl Role {
    /// The kinds this endpoint is a source of.
    pub fn takes(self) -> &'static [Kind] {
        match self {
            Role::Office => &Kind::DOWN,
            Role::Kassa => &Kind::UP,
        }
    }
    /// The direction of the packages this endpoint receives.
    pub fn receives(self) -> Direction {
        match self {
            Role::Office => Direction::Up,
            Role::Kassa => Direction::Down,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Office => "office",
            Role::Kassa => "kassa",
        }
    }
}

/// The link that carries a till at an endpoint, and the endpoint on its other side.
#[derive(Debug, Clone)]
pub struct Route {
    pub link: String,
    pub peer: String,
    pub pos: PosSet,
}

/// All links an endpoint takes part in (their till sets never overlap).
#[derive(Debug, Clone)]
pub struct Routes {
    pub role: Role,
    pub links: Vec<Route>,
}

impl Route {
    /// Commit point 1 for a file taken by a file-based source (dir, ftp): the `.$n` number is
    /// the source number, and an flr gets a UID made by the bridge here, since a file
    /// carries none (PROTOCOL.md §4.1; journaled, served to HTTP tills).
    #[allow(clippy::too_many_arguments)]
    pub fn commit_file(
        &self,
        store: &Store,
        endpoint: &str,
        pos: u32,
        kind: Kind,
        name: &str,
        n: Option<u32>,
        spooled: crate::store::Spooled,
    ) -> crate::store::Result<i64> {
        let uid = (kind == Kind::Flr).then(new_uid);
        store.commit_taken(
            &crate::store::Taken {
                link: &self.link,
                pos,
                kind,
                uid: uid.as_deref(),
                source_endpoint: endpoint,
                source_name: name,
                source_seq: n.map(i64::from),
                sink_endpoint: &self.peer,
            },
            spooled,
        )
    }
}

impl Routes {
    pub fn route(&self, pos: u32) -> Option<&Route> {
        self.links.iter().find(|r| r.pos.contains(pos))
    }
}

/// What one scan of a source did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TakeReport {
    /// Packages committed to the store.
    pub taken: u64,
    /// Files present but not complete yet (still being written).
    pub waiting: u64,
    /// Files that could not be taken because of an error (logged).
    pub failed: u64,
    /// In dry-run mode: what would be taken.
    pub planned: Vec<String>,
}

/// What one delivery pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeliverReport {
    pub delivered: u64,
    /// Packages that stay queued because the destination is busy (unconsumed file).
    pub busy: u64,
    /// Packages that stay queued because of an error (logged).
    pub failed: u64,
    pub planned: Vec<String>,
}

/// Parses a file name as any kind's pattern: (kind, till, `.$n` number).
pub fn parse_name(
    patterns: &[(Kind, NamePattern)],
    numbered: bool,
    name: &str,
) -> Option<(Kind, u32, Option<u32>)> {
    patterns.iter().find_map(|(k, p)| {
        p.parse(name, numbered)
            .map(|parsed| (*k, parsed.pos, parsed.n))
    })
}

/// A listed file (of a folder or an FTP directory) that names a package to take.
#[derive(Debug, Clone)]
pub struct Candidate<E> {
    pub entry: E,
    pub kind: Kind,
    pub pos: u32,
    pub n: Option<u32>,
}

/// A polled source's listing, by till and kind: the files this endpoint takes, for tills
/// of its links. Names that match no pattern and tills in no link are left alone, with
/// one warning each.
pub fn group_candidates<E>(
    endpoint: &str,
    routes: &Routes,
    patterns: &[(Kind, NamePattern)],
    numbered: bool,
    warned: &WarnOnce,
    entries: impl IntoIterator<Item = E>,
    name: impl Fn(&E) -> &str,
) -> BTreeMap<(u32, Kind), Vec<Candidate<E>>> {
    let takes = routes.role.takes();
    let mut groups: BTreeMap<(u32, Kind), Vec<Candidate<E>>> = BTreeMap::new();
    for entry in entries {
        let file = name(&entry);
        if file.starts_with('.') {
            // Hidden: a writer's temp name by convention (ours too), never a package.
            continue;
        }
        let Some((kind, pos, n)) = parse_name(patterns, numbered, file) else {
            if warned.first(file) {
                tracing::warn!(%endpoint, %file, "left alone: the name matches no pattern of this endpoint (numbered = {numbered})");
            }
            continue;
        };
        if !takes.contains(&kind) {
            continue; // what this endpoint writes for the other side
        }
        if routes.route(pos).is_none() {
            if warned.first(file) {
                tracing::warn!(%endpoint, %file, till = pos, "left alone: till {pos} is in no link of this endpoint");
            }
            continue;
        }
        groups.entry((pos, kind)).or_default().push(Candidate {
            entry,
            kind,
            pos,
            n,
        });
    }
    groups
}

/// Logs a warning once per key (a file name that does not parse, an unknown till).
#[derive(Debug, Default)]
pub struct WarnOnce(Mutex<HashSet<String>>);

impl WarnOnce {
    pub fn first(&self, key: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string())
    }
    pub fn contains(&self, key: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }
    pub fn forget(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// Reachability of an endpoint, logged once per change (never once per poll).
#[derive(Debug)]
pub struct Health {
    name: String,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default, Clone)]
pub struct HealthState {
    /// None until the first attempt.
    pub reachable: Option<bool>,
    pub last_error: Option<String>,
}

impl Health {
    pub fn new(name: &str) -> Health {
        Health {
            name: name.to_string(),
            state: Mutex::new(HealthState::default()),
        }
    }

    pub fn ok(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.reachable == Some(false) {
            tracing::info!(endpoint = %self.name, "endpoint {} is reachable again", self.name);
        }
        s.reachable = Some(true);
    }

    pub fn failed(&self, error: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.reachable != Some(false) || s.last_error.as_deref() != Some(error) {
            if s.reachable != Some(false) {
                tracing::error!(endpoint = %self.name, "endpoint {} failed: {error}", self.name);
            } else {
                tracing::debug!(endpoint = %self.name, "endpoint {} still failing: {error}", self.name);
            }
        }
        s.reachable = Some(false);
        s.last_error = Some(error.to_string());
    }

    pub fn get(&self) -> HealthState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A UID for an flr package that came without one (PROTOCOL.md §4.1: the till answers the
/// flr with a report that carries it).
pub fn new_uid() -> String {
    use rand::Rng;
    let b: [u8; 16] = rand::thread_rng().gen();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// One configured endpoint.
pub enum Endpoint {
    Dir(Arc<dir::DirEndpoint>),
    HttpClient(Arc<http_client::HttpClientEndpoint>),
    /// KKMTransfer served to tills by the daemon; not polled, not pushed: tills pull
    /// packages from the store and push reports into it themselves.
    Http(Arc<http_server::HttpServerEndpoint>),
    /// An FTP server: polled source and push sink.
    Ftp(Arc<ftp::FtpEndpoint>),
}

impl Endpoint {
    pub fn name(&self) -> &str {
        match self {
            Endpoint::Dir(d) => &d.name,
            Endpoint::HttpClient(c) => &c.name,
            Endpoint::Http(h) => &h.name,
            Endpoint::Ftp(f) => &f.name,
        }
    }

    pub fn routes(&self) -> &Routes {
        match self {
            Endpoint::Dir(d) => &d.routes,
            Endpoint::HttpClient(c) => &c.routes,
            Endpoint::Http(h) => &h.routes,
            Endpoint::Ftp(f) => &f.routes,
        }
    }

    pub fn is_push_sink(&self) -> bool {
        matches!(
            self,
            Endpoint::Dir(_) | Endpoint::HttpClient(_) | Endpoint::Ftp(_)
        )
    }

    pub fn is_polled_source(&self) -> bool {
        matches!(
            self,
            Endpoint::Dir(_) | Endpoint::HttpClient(_) | Endpoint::Ftp(_)
        )
    }

    /// How often the daemon should poll this endpoint, if it is polled on a timer (FTP,
    /// http-client). FTP takes a file only when two polls saw the same size.
    pub fn poll_interval(&self) -> Option<std::time::Duration> {
        match self {
            Endpoint::Ftp(f) => Some(f.poll()),
            Endpoint::HttpClient(c) => Some(c.config.poll),
            _ => None,
        }
    }

    /// Finishes what a crash interrupted: sources not yet told, sink writes not confirmed,
    /// temp files left behind. Idempotent; the pump calls it before every pass.
    pub async fn recover(&self, store: &Arc<Store>) -> anyhow::Result<()> {
        match self {
            Endpoint::Dir(d) => {
                let (d, s) = (d.clone(), store.clone());
                tokio::task::spawn_blocking(move || d.recover(&s)).await?
            }
            Endpoint::HttpClient(_) | Endpoint::Http(_) => Ok(()),
            Endpoint::Ftp(f) => f.recover(store).await,
        }
    }

    /// Scans the source once and takes every complete package into the store.
    pub async fn take(&self, store: &Arc<Store>, dry_run: bool) -> anyhow::Result<TakeReport> {
        match self {
            Endpoint::Dir(d) => {
                let (d, s) = (d.clone(), store.clone());
                tokio::task::spawn_blocking(move || d.take(&s, dry_run)).await?
            }
            Endpoint::HttpClient(c) => Ok(c.take(store, dry_run).await),
            Endpoint::Http(_) => Ok(TakeReport::default()),
            Endpoint::Ftp(f) => f.take(store, dry_run).await,
        }
    }

    /// Writes queued packages (of one link, one direction, ordered by till then id) to
    /// the sink, in order per till; a till whose package cannot be written now is skipped
    /// until the next pass.
    pub async fn deliver(
        &self,
        store: &Arc<Store>,
        queue: Vec<Package>,
        dry_run: bool,
    ) -> anyhow::Result<DeliverReport> {
        match self {
            Endpoint::Dir(d) => {
                let (d, s) = (d.clone(), store.clone());
                tokio::task::spawn_blocking(move || d.deliver(&s, queue, dry_run)).await?
            }
            Endpoint::HttpClient(c) => Ok(c.deliver(store, queue, dry_run).await),
            Endpoint::Http(_) => Ok(DeliverReport::default()),
            Endpoint::Ftp(f) => f.deliver(store, queue, dry_run).await,
        }
    }
}

/// Builds every endpoint of the config with its routes.
pub fn build(config: &Config) -> anyhow::Result<Vec<Endpoint>> {
    let mut out = Vec::new();
    for (name, ec) in &config.endpoints {
        let mut role = None;
        let mut links = Vec::new();
        for l in &config.links {
            if &l.office == name {
                role = Some(Role::Office);
                links.push(Route {
                    link: l.name.clone(),
                    peer: l.kassa.clone(),
                    pos: l.pos.clone(),
                });
            } else if &l.kassa == name {
                role = Some(Role::Kassa);
                links.push(Route {
                    link: l.name.clone(),
                    peer: l.office.clone(),
                    pos: l.pos.clone(),
                });
            }
        }
        let Some(role) = role else {
            tracing::warn!(endpoint = %name, "endpoint is in no [[link]]; it is not used");
            continue;
        };
        let routes = Routes { role, links };
        let ep = match ec {
            EndpointConfig::Dir(c) => {
                Endpoint::Dir(Arc::new(dir::DirEndpoint::new(name, c.clone(), routes)))
            }
            EndpointConfig::HttpClient(c) => Endpoint::HttpClient(Arc::new(
                http_client::HttpClientEndpoint::new(name, c.clone(), routes)?,
            )),
            EndpointConfig::Http(c) => Endpoint::Http(Arc::new(
                http_server::HttpServerEndpoint::new(name, c.clone(), routes)?,
            )),
            EndpointConfig::Ftp(c) => {
                Endpoint::Ftp(Arc::new(ftp::FtpEndpoint::new(name, c.clone(), routes)?))
            }
        };
        out.push(ep);
    }
    Ok(out)
}

/// Lets every folder endpoint hand the big files it takes to the FTP endpoints on the
/// other side of their links, which upload them while the take still hashes and fsyncs
/// them (`FtpEndpoint::preload`).
pub fn wire_preloads(endpoints: &[Endpoint]) {
    let ftp: HashMap<&str, &Arc<ftp::FtpEndpoint>> = endpoints
        .iter()
        .filter_map(|e| match e {
            Endpoint::Ftp(f) => Some((f.name.as_str(), f)),
            _ => None,
        })
        .collect();
    for e in endpoints {
        let Endpoint::Dir(d) = e else { continue };
        // The FTP peer of each link, by link name.
        let peers: HashMap<String, Arc<ftp::FtpEndpoint>> = d
            .routes
            .links
            .iter()
            .filter_map(|r| Some((r.link.clone(), Arc::clone(ftp.get(r.peer.as_str())?))))
            .collect();
        if peers.is_empty() {
            continue;
        }
        let routes = d.routes.clone();
        let _ = d.preload.set(Box::new(move |pos, spool, size| {
            if let Some(f) = routes.route(pos).and_then(|r| peers.get(&r.link)) {
                f.preload(spool, size);
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    /// The daemon spawns passes on the multi-threaded runtime: their futures must be Send.
    #[allow(dead_code)]
    fn endpoint_futures_are_send(e: &super::Endpoint, s: &std::sync::Arc<crate::store::Store>) {
        fn send<T: Send>(_: T) {}
        send(e.recover(s));
        send(e.take(s, false));
        send(e.deliver(s, Vec::new(), false));
    }
}
