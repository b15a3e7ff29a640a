//! Status: the per-till view behind the `/status` page, `/metrics` and `kkm-bridge status`.
//!
//! One data structure, [`Snapshot`], is built from the journal (always) merged with
//! [`Live`] runtime facts (only inside the daemon: last contact of a till, endpoint
//! reachability, last errors, request latency). The terminal table, `--json`, the HTML page
//! and the Prometheus text are four renderings of the same snapshot, so they never
//! disagree.
//!
//! The admin listener (`[admin] listen`) serves the page and the metrics behind its own
//! HTTP Basic auth: [`router`] and [`serve_admin`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::config::{Config, EndpointConfig, PosSet};
use crate::journal::format_ms;
use crate::store::{now_ms, Store};

// ---------------------------------------------------------------------------------------
// Live: what only the running daemon knows.
// ---------------------------------------------------------------------------------------

/// Upper bounds (seconds) of the request-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Runtime facts shared by the endpoints of the daemon and read by the status page.
/// Endpoints call [`Live::endpoint_ok`] / [`Live::endpoint_error`] after talking to their
/// peer, [`Live::till_contact`] / [`Live::till_error`] when a till talks to them, and
/// [`Live::observe_request`] for every HTTP request they serve or make.
#[derive(Debug)]
pub struct Live {
    started_ms: i64,
    inner: Mutex<LiveInner>,
}

#[derive(Debug, Default)]
struct LiveInner {
    endpoints: BTreeMap<String, EndpointLive>,
    tills: HashMap<(String, u32), TillLive>,
    latency: BTreeMap<String, Histogram>,
    /// The highest moved counts reported so far, so the counters never go down (pruning).
    moved: BTreeMap<(String, String), (u64, u64)>,
}

/// What the daemon knows about one endpoint.
#[derive(Debug, Default, Clone, Serialize)]
pub struct EndpointLive {
    pub reachable: Option<bool>,
    pub last_ok_ms: Option<i64>,
    pub last_error: Option<(i64, String)>,
    pub errors: u64,
}

/// What the daemon knows about one till at one endpoint.
#[derive(Debug, Default, Clone)]
pub struct TillLive {
    pub last_contact_ms: Option<i64>,
    pub last_error: Option<(i64, String)>,
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            started_ms: now_ms(),
            inner: Mutex::default(),
        }
    }
}

impl Live {
    pub fn new() -> Arc<Live> {
        Arc::new(Live::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LiveInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoint talked to its peer (or listened) successfully.
    pub fn endpoint_ok(&self, endpoint: &str) {
        let mut g = self.lock();
        let e = g.endpoints.entry(endpoint.to_string()).or_default();
        e.reachable = Some(true);
        e.last_ok_ms = Some(now_ms());
    }

    /// The endpoint failed (unreachable peer, refused login, I/O error).
    pub fn endpoint_error(&self, endpoint: &str, message: impl std::fmt::Display) {
        let mut g = self.lock();
        let e = g.endpoints.entry(endpoint.to_string()).or_default();
        e.reachable = Some(false);
        e.last_error = Some((now_ms(), message.to_string()));
        e.errors += 1;
    }

    /// A till talked to the endpoint (a request, a file it left or took).
    pub fn till_contact(&self, endpoint: &str, pos: u32) {
        let mut g = self.lock();
        g.tills
            .entry((endpoint.to_string(), pos))
            .or_default()
            .last_contact_ms = Some(now_ms());
    }

    /// Something went wrong for one till (a refused report, a bad number).
    pub fn till_error(&self, endpoint: &str, pos: u32, message: impl std::fmt::Display) {
        let mut g = self.lock();
        g.tills
            .entry((endpoint.to_string(), pos))
            .or_default()
            .last_error = Some((now_ms(), message.to_string()));
    }

    /// One request served or made by `endpoint` took `took`.
    pub fn observe_request(&self, endpoint: &str, took: Duration) {
        let secs = took.as_secs_f64();
        let mut g = self.lock();
        let h = g.latency.entry(endpoint.to_string()).or_default();
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    pub fn endpoint(&self, endpoint: &str) -> Option<EndpointLive> {
        self.lock().endpoints.get(endpoint).cloned()
    }
}

// ---------------------------------------------------------------------------------------
// The snapshot.
// ---------------------------------------------------------------------------------------

/// Above this many tills in a link's `pos` set, only tills seen in the journal are listed.
const MAX_LISTED_TILLS_PER_LINK: u64 = 50_000;

/// Everything the status views show, at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub generated_at: String,
    pub generated_at_ms: i64,
    /// Whether runtime facts of a running daemon are merged in (else: journal only).
    pub live: bool,
    pub summary: Summary,
    pub endpoints: Vec<EndpointStatus>,
    pub links: Vec<LinkStatus>,
    pub tills: Vec<TillStatus>,
    /// Packages and bytes delivered since the daemon started, per (link, direction).
    #[serde(skip)]
    pub moved: Vec<(String, String, u64, u64)>,
    #[serde(skip)]
    latency: Vec<(String, Histogram)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub tills: u64,
    pub tills_waiting: u64,
    pub queued: u64,
    pub oldest_age_s: Option<u64>,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub role: String,
    /// Path, URL or listen address; never a password.
    pub target: String,
    /// `None`: not known (no daemon running, or not contacted yet).
    pub reachable: Option<bool>,
    pub last_ok: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub name: String,
    pub office: String,
    pub kassa: String,
    pub pos: String,
    pub down: LinkDir,
    pub up: LinkDir,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkDir {
    /// Delivered packages still in the journal (see `retention`).
    pub delivered: u64,
    pub delivered_bytes: u64,
    pub queued: u64,
    pub queued_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TillStatus {
    pub link: String,
    pub pos: u32,
    pub last_contact: Option<String>,
    pub last_contact_ms: Option<i64>,
    /// "live" (the daemon saw the till) or "journal" (the till's last report).
    pub last_contact_source: Option<&'static str>,
    /// Packages office → till (spr, flr).
    pub down: DirStatus,
    /// Packages till → office (rep).
    pub up: DirStatus,
    pub last_error: Option<String>,
    /// Age in seconds of the oldest package waiting in either direction.
    pub lag_s: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DirStatus {
    pub queued: u64,
    pub oldest_age_s: Option<u64>,
    pub oldest_taken_at: Option<String>,
    pub last: Option<LastPackage>,
}

/// The last delivered package of a till in one direction.
#[derive(Debug, Clone, Serialize)]
pub struct LastPackage {
    pub id: i64,
    pub kind: String,
    /// The name at the sink (or at the source when the sink has no names).
    pub name: String,
    /// The package number at the sink (`.$n`, PackageNo), else at the source.
    pub number: Option<i64>,
    pub delivered_at: String,
    pub delivered_at_ms: i64,
    pub size: u64,
}

fn endpoint_target(ep: &EndpointConfig) -> String {
    fn strip_password(url: &str) -> String {
        // ftp://user:pass@host → ftp://user@host
        if let Some((scheme, rest)) = url.split_once("://") {
            let (auth_host, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            if let Some((userinfo, host)) = auth_host.rsplit_once('@') {
                let user = userinfo.split(':').next().unwrap_or("");
                return format!("{scheme}://{user}@{host}{path}");
            }
        }
        url.to_string()
    }
    match ep {
        EndpointConfig::Dir(d) => d.path.display().to_string(),
        EndpointConfig::Ftp(f) => strip_password(&f.url),
        EndpointConfig::Http(h) => format!("{}{}", h.listen, h.prefix),
        EndpointConfig::HttpClient(c) => strip_password(&c.url),
    }
}

fn age_s(now: i64, then: i64) -> u64 {
    ((now - then).max(0) / 1000) as u64
}

impl Snapshot {
    /// Builds the snapshot from the journal, merged with `live` when given.
    pub fn load(
        store: &Store,
        config: &Config,
        live: Option<&Live>,
    ) -> crate::store::Result<Snapshot> {
        let now = now_ms();
        struct Queued {
            n: u64,
            oldest: i64,
        }
        let (queued, last, totals, last_rep, moved) = store.with_conn(|c| {
            let mut queued: HashMap<(String, u32, String), Queued> = HashMap::new();
            let mut st = c.prepare(
                "SELECT link, pos, direction, COUNT(*), MIN(taken_at) FROM package
                 WHERE state != 'delivered' GROUP BY link, pos, direction",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                queued.insert(
                    (r.get(0)?, r.get(1)?, r.get(2)?),
                    Queued {
                        n: r.get::<_, i64>(3)? as u64,
                        oldest: r.get(4)?,
                    },
                );
            }
            let mut last: HashMap<(String, u32, String), LastPackage> = HashMap::new();
            let mut st = c.prepare(
                "SELECT p.link, p.pos, p.direction, p.id, p.kind,
                        COALESCE(p.sink_name, p.source_name), COALESCE(p.sink_seq, p.source_seq),
                        p.delivered_at, p.size
                 FROM package p JOIN (SELECT MAX(id) AS id FROM package WHERE state = 'delivered'
                                      GROUP BY link, direction, pos) m ON p.id = m.id",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let at: i64 = r.get::<_, Option<i64>>(7)?.unwrap_or(0);
                last.insert(
                    (r.get(0)?, r.get(1)?, r.get(2)?),
                    LastPackage {
                        id: r.get(3)?,
                        kind: r.get(4)?,
                        name: r.get(5)?,
                        number: r.get(6)?,
                        delivered_at: format_ms(at),
                        delivered_at_ms: at,
                        size: r.get::<_, i64>(8)? as u64,
                    },
                );
            }
            // A till's last report taken is the journal's idea of its last contact.
            let mut last_rep: HashMap<(String, u32), i64> = HashMap::new();
            let mut st = c.prepare(
                "SELECT link, pos, MAX(taken_at) FROM package WHERE direction = 'up'
                 GROUP BY link, pos",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                last_rep.insert((r.get(0)?, r.get(1)?), r.get(2)?);
            }
            let mut totals: HashMap<(String, String), LinkDir> = HashMap::new();
            let mut st = c.prepare(
                "SELECT link, direction, state = 'delivered', COUNT(*), COALESCE(SUM(size), 0)
                 FROM package GROUP BY 1, 2, 3",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let t = totals.entry((r.get(0)?, r.get(1)?)).or_default();
                let (n, b) = (r.get::<_, i64>(3)? as u64, r.get::<_, i64>(4)? as u64);
                if r.get::<_, bool>(2)? {
                    t.delivered += n;
                    t.delivered_bytes += b;
                } else {
                    t.queued += n;
                    t.queued_bytes += b;
                }
            }
            let mut moved = Vec::new();
            if let Some(l) = live {
                let mut st = c.prepare(
                    "SELECT link, direction, COUNT(*), COALESCE(SUM(size), 0) FROM package
                     WHERE state = 'delivered' AND delivered_at >= ?1 GROUP BY 1, 2",
                )?;
                let mut rows = st.query([l.started_ms])?;
                while let Some(r) = rows.next()? {
                    moved.push((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)? as u64,
                        r.get::<_, i64>(3)? as u64,
                    ));
                }
            }
            Ok((queued, last, totals, last_rep, moved))
        })?;

        let live_inner = live.map(|l| l.lock());
        let role_of = |name: &str| -> &'static str {
            if config.links.iter().any(|l| l.office == name) {
                "office"
            } else if config.links.iter().any(|l| l.kassa == name) {
                "kassa"
            } else {
                "unused"
            }
        };
        let mut summary = Summary::default();
        let endpoints: Vec<EndpointStatus> = config
            .endpoints
            .iter()
            .map(|(name, ep)| {
                let l = live_inner
                    .as_ref()
                    .and_then(|g| g.endpoints.get(name).cloned())
                    .unwrap_or_default();
                summary.errors += l.errors;
                EndpointStatus {
                    name: name.clone(),
                    kind: ep.type_name().to_string(),
                    role: role_of(name).to_string(),
                    target: endpoint_target(ep),
                    reachable: l.reachable,
                    last_ok: l.last_ok_ms.map(format_ms),
                    last_error_at: l.last_error.as_ref().map(|e| format_ms(e.0)),
                    last_error: l.last_error.map(|e| e.1),
                    errors: l.errors,
                }
            })
            .collect();

        let mut links = Vec::new();
        let mut tills: BTreeMap<(String, u32), TillStatus> = BTreeMap::new();
        let blank = |link: &str, pos: u32| TillStatus {
            link: link.to_string(),
            pos,
            last_contact: None,
            last_contact_ms: None,
            last_contact_source: None,
            down: DirStatus::default(),
            up: DirStatus::default(),
            last_error: None,
            lag_s: None,
        };
        for l in &config.links {
            let get = |d: &str| {
                totals
                    .get(&(l.name.clone(), d.to_string()))
                    .cloned()
                    .unwrap_or_default()
            };
            links.push(LinkStatus {
                name: l.name.clone(),
                office: l.office.clone(),
                kassa: l.kassa.clone(),
                pos: l.pos.to_string(),
                down: get("down"),
                up: get("up"),
            });
            if l.pos.len() <= MAX_LISTED_TILLS_PER_LINK {
                for p in l.pos.iter() {
                    tills.insert((l.name.clone(), p), blank(&l.name, p));
                }
            }
        }
        // Tills seen in the journal (also those of links no longer configured).
        for (link, pos, _) in queued.keys().chain(last.keys()) {
            tills
                .entry((link.clone(), *pos))
                .or_insert_with(|| blank(link, *pos));
        }
        for ((link, pos), t) in tills.iter_mut() {
            for (dir, ds) in [("down", &mut t.down), ("up", &mut t.up)] {
                let key = (link.clone(), *pos, dir.to_string());
                if let Some(q) = queued.get(&key) {
                    ds.queued = q.n;
                    ds.oldest_age_s = Some(age_s(now, q.oldest));
                    ds.oldest_taken_at = Some(format_ms(q.oldest));
                }
                ds.last = last.get(&key).cloned();
            }
            if let Some(ms) = last_rep.get(&(link.clone(), *pos)) {
                t.last_contact_ms = Some(*ms);
                t.last_contact_source = Some("journal");
            }
            if let (Some(g), Some(lc)) = (
                live_inner.as_ref(),
                config.links.iter().find(|l| &l.name == link),
            ) {
                for ep in [&lc.office, &lc.kassa] {
                    if let Some(tl) = g.tills.get(&(ep.clone(), *pos)) {
                        if let Some(c) = tl.last_contact_ms {
                            if t.last_contact_ms.is_none_or(|x| c >= x) {
                                t.last_contact_ms = Some(c);
                                t.last_contact_source = Some("live");
                            }
                        }
                        if let Some((_, e)) = &tl.last_error {
                            t.last_error = Some(format!("{ep}: {e}"));
                        }
                    }
                }
            }
            t.last_contact = t.last_contact_ms.map(format_ms);
            t.lag_s = t.down.oldest_age_s.max(t.up.oldest_age_s);
            summary.tills += 1;
            let q = t.down.queued + t.up.queued;
            if q > 0 {
                summary.tills_waiting += 1;
                summary.queued += q;
            }
            summary.oldest_age_s = summary.oldest_age_s.max(t.lag_s);
        }

        let mut moved_out = Vec::new();
        let mut latency = Vec::new();
        drop(live_inner);
        if let Some(l) = live {
            let mut g = l.lock();
            for (link, dir, n, b) in moved {
                let floor = g.moved.entry((link.clone(), dir.clone())).or_default();
                floor.0 = floor.0.max(n);
                floor.1 = floor.1.max(b);
            }
            moved_out = g
                .moved
                .iter()
                .map(|((l, d), (n, b))| (l.clone(), d.clone(), *n, *b))
                .collect();
            latency = g
                .latency
                .iter()
                .map(|(k, h)| (k.clone(), h.clone()))
                .collect();
        }
        Ok(Snapshot {
            generated_at: format_ms(now),
            generated_at_ms: now,
            live: live.is_some(),
            summary,
            endpoints,
            links,
            tills: tills.into_values().collect(),
            moved: moved_out,
            latency,
        })
    }

    /// The tills a view shows, in its order, and how many match before paging.
    pub fn select(&self, view: &View) -> (Vec<&TillStatus>, usize) {
        let q = view.q.as_deref().map(str::trim).filter(|s| !s.is_empty());
        let pos_filter = q.and_then(|q| PosSet::parse(q).ok());
        let needle = q.map(str::to_lowercase);
        let mut v: Vec<&TillStatus> = self
            .tills
            .iter()
            .filter(|t| {
                view.link
                    .as_deref()
                    .is_none_or(|l| l.is_empty() || t.link == l)
            })
            .filter(|t| match (&pos_filter, &needle) {
                (Some(p), _) => p.contains(t.pos),
                (None, Some(n)) => {
                    let hay = [
                        Some(t.link.as_str()),
                        t.last_error.as_deref(),
                        t.down.last.as_ref().map(|l| l.name.as_str()),
                        t.up.last.as_ref().map(|l| l.name.as_str()),
                    ];
                    hay.iter()
                        .flatten()
                        .any(|s| s.to_lowercase().contains(n.as_str()))
                }
                (None, None) => true,
            })
            .collect();
        match view.sort {
            Sort::Pos => v.sort_by(|a, b| (&a.link, a.pos).cmp(&(&b.link, b.pos))),
            Sort::Lag => v.sort_by(|a, b| {
                b.lag_s
                    .cmp(&a.lag_s)
                    .then((b.down.queued + b.up.queued).cmp(&(a.down.queued + a.up.queued)))
                    .then(b.last_error.is_some().cmp(&a.last_error.is_some()))
                    .then((&a.link, a.pos).cmp(&(&b.link, b.pos)))
            }),
            Sort::Queue => v.sort_by(|a, b| {
                (b.down.queued + b.up.queued)
                    .cmp(&(a.down.queued + a.up.queued))
                    .then(b.lag_s.cmp(&a.lag_s))
                    .then((&a.link, a.pos).cmp(&(&b.link, b.pos)))
            }),
            Sort::Contact => v.sort_by(|a, b| {
                // Never-seen first, then the longest silent.
                a.last_contact_ms
                    .cmp(&b.last_contact_ms)
                    .then((&a.link, a.pos).cmp(&(&b.link, b.pos)))
            }),
        }
        let total = v.len();
        if let Some(per) = view.per_page {
            let start = view.page.saturating_sub(1).saturating_mul(per);
            v = v.into_iter().skip(start).take(per).collect();
        }
        (v, total)
    }
}

/// How the till table is cut: sort, filter, page.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub sort: Sort,
    /// A till set ("7", "1-20") or text found in the link, file names or the last error.
    pub q: Option<String>,
    pub link: Option<String>,
    /// 1-based.
    pub page: usize,
    /// `None`: everything.
    pub per_page: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Sort {
    /// The oldest waiting package first.
    #[default]
    Lag,
    /// By link and till number.
    Pos,
    /// The longest queue first.
    Queue,
    /// The longest silent till first.
    Contact,
}

impl Sort {
    pub fn parse(s: &str) -> Option<Sort> {
        Some(match s {
            "lag" => Sort::Lag,
            "pos" => Sort::Pos,
            "queue" => Sort::Queue,
            "contact" => Sort::Contact,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Sort::Lag => "lag",
            Sort::Pos => "pos",
            Sort::Queue => "queue",
            Sort::Contact => "contact",
        }
    }
}

/// "45s", "3m05s", "2h03m", "4d02h".
pub fn human_age(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn last_cell(l: &Option<LastPackage>, now: i64) -> String {
    match l {
        Some(l) => format!(
            "{}{} ({} ago)",
            l.name,
            l.number.map(|n| format!(" #{n}")).unwrap_or_default(),
            human_age(age_s(now, l.delivered_at_ms))
        ),
        None => "-".into(),
    }
}

// ---------------------------------------------------------------------------------------
// Terminal rendering.
// ---------------------------------------------------------------------------------------

/// A plain aligned text table (columns padded to their widest cell).
pub struct TextTable {
    rows: Vec<Vec<String>>,
}

impl TextTable {
    pub fn new(headers: &[&str]) -> TextTable {
        TextTable {
            rows: vec![headers.iter().map(|s| s.to_string()).collect()],
        }
    }
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    pub fn render(&self) -> String {
        let n = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..n)
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                line.push_str(c);
                if i + 1 < r.len() {
                    line.extend(std::iter::repeat_n(' ', widths[i] - c.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

impl Snapshot {
    /// The terminal view of `kkm-bridge status`.
    pub fn render_text(&self, view: &View) -> String {
        let now = self.generated_at_ms;
        let s = &self.summary;
        let mut out = format!(
            "kkm-bridge status at {} — {} till(s), {} waiting with {} package(s), oldest {}\n",
            self.generated_at,
            s.tills,
            s.tills_waiting,
            s.queued,
            s.oldest_age_s.map(human_age).unwrap_or_else(|| "-".into()),
        );
        if !self.live {
            out.push_str(
                "(from the journal; reachability and last errors are known to the running \
                 daemon's /status page; `kkm-bridge check` tests every endpoint now)\n",
            );
        }
        out.push_str("\nENDPOINTS\n");
        let mut t = TextTable::new(&["name", "type", "role", "target", "reachable", "last error"]);
        for e in &self.endpoints {
            t.row(vec![
                e.name.clone(),
                e.kind.clone(),
                e.role.clone(),
                e.target.clone(),
                match e.reachable {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "?".into(),
                },
                e.last_error.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&t.render());
        out.push_str("\nLINKS\n");
        let mut t = TextTable::new(&[
            "link",
            "office → kassa",
            "tills",
            "↓ delivered",
            "↓ queued",
            "↑ delivered",
            "↑ queued",
        ]);
        for l in &self.links {
            t.row(vec![
                l.name.clone(),
                format!("{} → {}", l.office, l.kassa),
                l.pos.clone(),
                l.down.delivered.to_string(),
                l.down.queued.to_string(),
                l.up.delivered.to_string(),
                l.up.queued.to_string(),
            ]);
        }
        out.push_str(&t.render());
        let (rows, total) = self.select(view);
        out.push_str(&format!(
            "\nTILLS (sorted by {}; {} shown)\n",
            view.sort.as_str(),
            total
        ));
        let mut t = TextTable::new(&[
            "link",
            "till",
            "last contact",
            "↓ last package",
            "↓ queue",
            "↓ oldest",
            "↑ last package",
            "↑ queue",
            "↑ oldest",
            "last error",
        ]);
        let age = |a: Option<u64>| a.map(human_age).unwrap_or_else(|| "-".into());
        for r in rows {
            t.row(vec![
                r.link.clone(),
                r.pos.to_string(),
                r.last_contact_ms
                    .map(|c| format!("{} ago", human_age(age_s(now, c))))
                    .unwrap_or_else(|| "never".into()),
                last_cell(&r.down.last, now),
                r.down.queued.to_string(),
                age(r.down.oldest_age_s),
                last_cell(&r.up.last, now),
                r.up.queued.to_string(),
                age(r.up.oldest_age_s),
                r.last_error.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&t.render());
        out
    }
}

// ---------------------------------------------------------------------------------------
// HTML.
// ---------------------------------------------------------------------------------------

/// Escapes text for HTML element content and double-quoted attributes.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query-string value.
fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Rows per page of the till table.
pub const PAGE_SIZE: usize = 200;

const CSS: &str = "body{font:14px/1.35 system-ui,sans-serif;margin:1em;color:#222}\
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.2em 0 .4em}\
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}\
th{background:#eee;position:sticky;top:0}td.n{text-align:right}tr.wait td{background:#fff6d8}\
tr.late td{background:#ffe0dc}tr.err td.e{color:#b00}.ok{color:#070}.bad{color:#b00;font-weight:bold}\
.meta{color:#555}form{margin:.4em 0}nav a{margin-right:.6em}";

impl Snapshot {
    /// The `/status` page: server-rendered, refreshes itself every 5 s, no JavaScript.
    pub fn render_html(&self, view: &View) -> String {
        let now = self.generated_at_ms;
        let e = html_escape;
        let s = &self.summary;
        let mut h = String::with_capacity(64 * 1024);
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"5\">\
             <meta name=\"viewport\" content=\"width=device-width\">\
             <title>kkm-bridge status</title><style>{CSS}</style></head><body>\
             <h1>kkm-bridge status</h1>\
             <p class=\"meta\" id=\"summary\" data-tills=\"{}\" data-waiting=\"{}\" data-queued=\"{}\">\
             {} · <b>{}</b> till(s) · <b>{}</b> waiting with <b>{}</b> package(s) · oldest <b>{}</b> · {}</p>",
            s.tills,
            s.tills_waiting,
            s.queued,
            e(&self.generated_at),
            s.tills,
            s.tills_waiting,
            s.queued,
            s.oldest_age_s.map(human_age).unwrap_or_else(|| "-".into()),
            if self.live {
                "live data of the running daemon"
            } else {
                "journal only"
            },
        );

        h.push_str("<h2>Endpoints</h2><table id=\"endpoints\"><thead><tr><th>name</th><th>type</th><th>role</th><th>target</th><th>reachable</th><th>last ok</th><th>last error</th><th>errors</th></tr></thead><tbody>");
        for ep in &self.endpoints {
            let reach = match ep.reachable {
                Some(true) => "<span class=\"ok\">yes</span>",
                Some(false) => "<span class=\"bad\">NO</span>",
                None => "?",
            };
            let _ = write!(
                h,
                "<tr data-endpoint=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"e\">{}{}</td><td class=\"n\">{}</td></tr>",
                e(&ep.name),
                e(&ep.name),
                e(&ep.kind),
                e(&ep.role),
                e(&ep.target),
                reach,
                e(ep.last_ok.as_deref().unwrap_or("-")),
                ep.last_error_at.as_deref().map(|t| format!("{} ", e(t))).unwrap_or_default(),
                e(ep.last_error.as_deref().unwrap_or("-")),
                ep.errors,
            );
        }
        h.push_str("</tbody></table>");

        h.push_str("<h2>Links</h2><table id=\"links\"><thead><tr><th>link</th><th>office → kassa</th><th>tills</th><th>↓ delivered</th><th>↓ queued</th><th>↑ delivered</th><th>↑ queued</th></tr></thead><tbody>");
        for l in &self.links {
            let _ = write!(
                h,
                "<tr data-link=\"{}\"><td><a href=\"?link={}\">{}</a></td><td>{} → {}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                e(&l.name),
                e(&url_encode(&l.name)),
                e(&l.name),
                e(&l.office),
                e(&l.kassa),
                e(&l.pos),
                l.down.delivered,
                l.down.queued,
                l.up.delivered,
                l.up.queued,
            );
        }
        h.push_str("</tbody></table>");

        // Filter form: plain GET, works without JavaScript.
        let q = view.q.clone().unwrap_or_default();
        let link = view.link.clone().unwrap_or_default();
        let _ = write!(
            h,
            "<h2>Tills</h2><form method=\"get\" action=\"/status\">\
             <label>till or text <input name=\"q\" value=\"{}\" size=\"16\" placeholder=\"7, 1-20, POS7…\"></label> \
             <label>link <select name=\"link\"><option value=\"\">all</option>",
            e(&q)
        );
        for l in &self.links {
            let _ = write!(
                h,
                "<option value=\"{}\"{}>{}</option>",
                e(&l.name),
                if l.name == link { " selected" } else { "" },
                e(&l.name)
            );
        }
        h.push_str("</select></label> <label>sort <select name=\"sort\">");
        for (v, label) in [
            (Sort::Lag, "oldest waiting first"),
            (Sort::Queue, "longest queue first"),
            (Sort::Contact, "longest silent first"),
            (Sort::Pos, "link and till"),
        ] {
            let _ = write!(
                h,
                "<option value=\"{}\"{}>{}</option>",
                v.as_str(),
                if v == view.sort { " selected" } else { "" },
                label
            );
        }
        h.push_str("</select></label> <button type=\"submit\">show</button></form>");

        let (rows, total) = self.select(view);
        let per = view.per_page.unwrap_or(total.max(1));
        let pages = total.div_ceil(per).max(1);
        let page = view.page.clamp(1, pages);
        let link_to = |sort: Sort, page: usize| {
            let mut u = format!("/status?sort={}", sort.as_str());
            if !q.is_empty() {
                u.push_str(&format!("&q={}", url_encode(&q)));
            }
            if !link.is_empty() {
                u.push_str(&format!("&link={}", url_encode(&link)));
            }
            if page > 1 {
                u.push_str(&format!("&page={page}"));
            }
            e(&u)
        };
        let first = if total == 0 { 0 } else { (page - 1) * per + 1 };
        let _ = write!(
            h,
            "<p class=\"meta\" id=\"shown\" data-total=\"{total}\">{first}–{} of {total} till(s), page {page} of {pages}</p>",
            if rows.is_empty() { 0 } else { first + rows.len() - 1 },
        );
        if pages > 1 {
            h.push_str("<nav>");
            if page > 1 {
                let _ = write!(
                    h,
                    "<a href=\"{}\">« previous</a>",
                    link_to(view.sort, page - 1)
                );
            }
            if page < pages {
                let _ = write!(h, "<a href=\"{}\">next »</a>", link_to(view.sort, page + 1));
            }
            h.push_str("</nav>");
        }
        let th = |label: &str, sort: Option<Sort>| match sort {
            Some(s) if s == view.sort => format!("<th>{label} ▼</th>"),
            Some(s) => format!("<th><a href=\"{}\">{label}</a></th>", link_to(s, 1)),
            None => format!("<th>{label}</th>"),
        };
        h.push_str("<table id=\"tills\"><thead><tr>");
        for (label, sort) in [
            ("link", None),
            ("till", Some(Sort::Pos)),
            ("last contact", Some(Sort::Contact)),
            ("↓ last package (spr/flr)", None),
            ("↓ queue", Some(Sort::Queue)),
            ("↓ oldest", Some(Sort::Lag)),
            ("↑ last package (rep)", None),
            ("↑ queue", None),
            ("↑ oldest", None),
            ("last error", None),
        ] {
            h.push_str(&th(label, sort));
        }
        h.push_str("</tr></thead><tbody>");
        let age = |a: Option<u64>| a.map(human_age).unwrap_or_else(|| "-".into());
        for t in rows {
            let class = match t.lag_s {
                Some(l) if l >= 600 => "late",
                Some(_) => "wait",
                None => "",
            };
            let class = if t.last_error.is_some() {
                format!("{class} err")
            } else {
                class.to_string()
            };
            let seq = |l: &Option<LastPackage>| {
                l.as_ref()
                    .and_then(|l| l.number)
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            };
            let _ = write!(
                h,
                "<tr class=\"{}\" data-link=\"{}\" data-pos=\"{}\" data-down-queued=\"{}\" data-up-queued=\"{}\" data-down-last=\"{}\" data-up-last=\"{}\">\
                 <td>{}</td><td class=\"n\">{}</td><td title=\"{}\">{}</td><td title=\"{}\">{}</td><td class=\"n\">{}</td><td>{}</td><td title=\"{}\">{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"e\">{}</td></tr>",
                class.trim(),
                e(&t.link),
                t.pos,
                t.down.queued,
                t.up.queued,
                seq(&t.down.last),
                seq(&t.up.last),
                e(&t.link),
                t.pos,
                e(t.last_contact.as_deref().unwrap_or("")),
                t.last_contact_ms
                    .map(|c| format!("{} ago", human_age(age_s(now, c))))
                    .unwrap_or_else(|| "never".into()),
                e(t.down.last.as_ref().map(|l| l.delivered_at.as_str()).unwrap_or("")),
                e(&last_cell(&t.down.last, now)),
                t.down.queued,
                age(t.down.oldest_age_s),
                e(t.up.last.as_ref().map(|l| l.delivered_at.as_str()).unwrap_or("")),
                e(&last_cell(&t.up.last, now)),
                t.up.queued,
                age(t.up.oldest_age_s),
                e(t.last_error.as_deref().unwrap_or("")),
            );
        }
        h.push_str("</tbody></table>");
        h.push_str("<p class=\"meta\">Refreshes every 5 s. Machine-readable: <a href=\"/metrics\">/metrics</a>, <a href=\"/status.json\">/status.json</a>.</p></body></html>\n");
        h
    }
}

// ---------------------------------------------------------------------------------------
// Prometheus text format.
// ---------------------------------------------------------------------------------------

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Snapshot {
    /// `/metrics` in the Prometheus text exposition format (version 0.0.4).
    pub fn render_metrics(&self) -> String {
        let mut m = String::with_capacity(16 * 1024);
        let head = |m: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut m,
            "kkm_bridge_packages_moved_total",
            "counter",
            "Packages delivered since the daemon started, per link and direction.",
        );
        for (l, d, n, _) in &self.moved {
            let _ = writeln!(
                m,
                "kkm_bridge_packages_moved_total{{link=\"{}\",direction=\"{}\"}} {n}",
                label(l),
                label(d)
            );
        }
        head(
            &mut m,
            "kkm_bridge_bytes_moved_total",
            "counter",
            "Payload bytes delivered since the daemon started, per link and direction.",
        );
        for (l, d, _, b) in &self.moved {
            let _ = writeln!(
                m,
                "kkm_bridge_bytes_moved_total{{link=\"{}\",direction=\"{}\"}} {b}",
                label(l),
                label(d)
            );
        }
        head(
            &mut m,
            "kkm_bridge_journal_packages",
            "gauge",
            "Packages in the journal per link, direction and state (delivered rows are pruned after `retention`).",
        );
        for l in &self.links {
            for (d, ld) in [("down", &l.down), ("up", &l.up)] {
                let _ = writeln!(
                    m,
                    "kkm_bridge_journal_packages{{link=\"{0}\",direction=\"{d}\",state=\"delivered\"}} {1}\n\
                     kkm_bridge_journal_packages{{link=\"{0}\",direction=\"{d}\",state=\"queued\"}} {2}",
                    label(&l.name),
                    ld.delivered,
                    ld.queued
                );
            }
        }
        head(
            &mut m,
            "kkm_bridge_endpoint_errors_total",
            "counter",
            "Errors per endpoint since the daemon started.",
        );
        for e in &self.endpoints {
            let _ = writeln!(
                m,
                "kkm_bridge_endpoint_errors_total{{endpoint=\"{}\"}} {}",
                label(&e.name),
                e.errors
            );
        }
        head(
            &mut m,
            "kkm_bridge_endpoint_up",
            "gauge",
            "1 if the endpoint's last contact with its peer worked, 0 if it failed (absent: not known yet).",
        );
        for e in &self.endpoints {
            if let Some(r) = e.reachable {
                let _ = writeln!(
                    m,
                    "kkm_bridge_endpoint_up{{endpoint=\"{}\"}} {}",
                    label(&e.name),
                    r as u8
                );
            }
        }
        head(
            &mut m,
            "kkm_bridge_queue_depth",
            "gauge",
            "Packages waiting per till and direction.",
        );
        for t in &self.tills {
            for (d, ds) in [("down", &t.down), ("up", &t.up)] {
                let _ = writeln!(
                    m,
                    "kkm_bridge_queue_depth{{link=\"{}\",pos=\"{}\",direction=\"{d}\"}} {}",
                    label(&t.link),
                    t.pos,
                    ds.queued
                );
            }
        }
        head(
            &mut m,
            "kkm_bridge_oldest_package_age_seconds",
            "gauge",
            "Age of the oldest waiting package per till and direction (absent: nothing waits).",
        );
        for t in &self.tills {
            for (d, ds) in [("down", &t.down), ("up", &t.up)] {
                if let Some(a) = ds.oldest_age_s {
                    let _ = writeln!(
                        m,
                        "kkm_bridge_oldest_package_age_seconds{{link=\"{}\",pos=\"{}\",direction=\"{d}\"}} {a}",
                        label(&t.link),
                        t.pos
                    );
                }
            }
        }
        head(
            &mut m,
            "kkm_bridge_request_duration_seconds",
            "histogram",
            "Latency of HTTP requests served to tills or made to back offices, per endpoint.",
        );
        for (ep, hist) in &self.latency {
            let ep = label(ep);
            for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    m,
                    "kkm_bridge_request_duration_seconds_bucket{{endpoint=\"{ep}\",le=\"{b}\"}} {}",
                    hist.counts[i]
                );
            }
            let _ = writeln!(
                m,
                "kkm_bridge_request_duration_seconds_bucket{{endpoint=\"{ep}\",le=\"+Inf\"}} {0}\n\
                 kkm_bridge_request_duration_seconds_sum{{endpoint=\"{ep}\"}} {1}\n\
                 kkm_bridge_request_duration_seconds_count{{endpoint=\"{ep}\"}} {0}",
                hist.count, hist.sum
            );
        }
        m
    }
}

// ---------------------------------------------------------------------------------------
// The admin listener.
// ---------------------------------------------------------------------------------------

/// What the admin router needs. `store` may be the daemon's store or a read-only one.
#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub live: Option<Arc<Live>>,
}

#[derive(Debug, Default, Deserialize)]
struct ViewQuery {
    sort: Option<String>,
    q: Option<String>,
    link: Option<String>,
    page: Option<String>,
}

impl ViewQuery {
    fn view(self) -> View {
        View {
            sort: self
                .sort
                .as_deref()
                .and_then(Sort::parse)
                .unwrap_or_default(),
            q: self.q.filter(|s| !s.trim().is_empty()),
            link: self.link.filter(|s| !s.is_empty()),
            page: self.page.and_then(|p| p.parse().ok()).unwrap_or(1).max(1),
            per_page: Some(PAGE_SIZE),
        }
    }
}

async fn snapshot(state: &AdminState) -> Result<Snapshot, Response> {
    let st = state.clone();
    let r = tokio::task::spawn_blocking(move || {
        Snapshot::load(&st.store, &st.config, st.live.as_deref())
    })
    .await;
    match r {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            tracing::error!("status: {e}");
            Err((StatusCode::INTERNAL_SERVER_ERROR, format!("journal: {e}\n")).into_response())
        }
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()),
    }
}

async fn status_page(State(state): State<AdminState>, Query(query): Query<ViewQuery>) -> Response {
    let view = query.view();
    match snapshot(&state).await {
        Ok(s) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            s.render_html(&view),
        )
            .into_response(),
        Err(r) => r,
    }
}

async fn status_json(State(state): State<AdminState>) -> Response {
    match snapshot(&state).await {
        Ok(s) => (
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            serde_json::to_string_pretty(&s).unwrap_or_default(),
        )
            .into_response(),
        Err(r) => r,
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match snapshot(&state).await {
        Ok(s) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            s.render_metrics(),
        )
            .into_response(),
        Err(r) => r,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn basic_auth(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let Some(admin) = &state.config.admin else {
        return next.run(req).await;
    };
    let (Some(login), Some(secret)) = (&admin.login, &admin.secret) else {
        return next.run(req).await;
    };
    use base64::Engine;
    let expected =
        base64::engine::general_purpose::STANDARD.encode(format!("{login}:{}", secret.expose()));
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .is_some_and(|v| constant_time_eq(v.trim().as_bytes(), expected.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        let mut r = (StatusCode::UNAUTHORIZED, "login required\n").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"kkm-bridge admin\", charset=\"UTF-8\""),
        );
        r
    }
}

/// `/status` (HTML), `/status.json`, `/metrics`; `/` redirects to `/status`. Behind Basic
/// auth when `[admin] login` and a password are set.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/status") }))
        .route("/status", get(status_page))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            basic_auth,
        ))
        .with_state(state)
}

/// Serves the admin router on `listener` until `shutdown` completes.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_everything_users_can_name() {
        assert_eq!(
            html_escape("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(url_encode("a b&c"), "a%20b%26c");
    }

    #[test]
    fn ages_read_like_a_clock() {
        assert_eq!(human_age(5), "5s");
        assert_eq!(human_age(185), "3m05s");
        assert_eq!(human_age(7380), "2h03m");
        assert_eq!(human_age(3 * 86_400 + 7200), "3d02h");
    }

    #[test]
    fn passwords_are_stripped_from_targets() {
        let ep: EndpointConfig =
            toml::from_str("type = \"ftp\"\nurl = \"ftp://kassa:hunter2@10.0.0.5:21/Files\"")
                .unwrap();
        assert_eq!(endpoint_target(&ep), "ftp://kassa@10.0.0.5:21/Files");
    }

    #[test]
    fn latency_histogram_is_cumulative() {
        let l = Live::new();
        l.observe_request("tills", Duration::from_millis(3));
        l.observe_request("tills", Duration::from_millis(300));
        let g = l.lock();
        let h = &g.latency["tills"];
        assert_eq!(h.count, 2);
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[LATENCY_BUCKETS.len() - 1], 2);
    }
}
