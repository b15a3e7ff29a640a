//! The bridge as a till (PROTOCOL.md §4.3): calls a back office's KKMTransfer service exactly
//! as «Кассир 5» does, for every till of its links.
//!
//! Pulling (spr/flr): `GET {url}/{POS}/{n}`; a package is committed to the store together with
//! the till's next number `n + 1` (one transaction), and only then is `n + 1` requested, which
//! is what acknowledges it to the back office. A crash in between re-requests `n`, which the
//! back office serves again; the store already has it under that number, so it is not taken
//! twice.
//!
//! Pushing (rep): `POST {url}/SendData/{POS}/{n}[/{UID}]` with the report as base64 (zipped
//! first with `report_zip = true`); the number is journaled before the request, so a retry
//! sends the same number; errcode "0" or "1" counts as delivered.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Deserialize;

use super::{DeliverReport, Health, Routes, TakeReport};
use crate::config::HttpClientConfig;
use crate::package::{self, Kind, Package};
use crate::store::{Store, Taken};

/// The largest package accepted from a back office (after unzipping).
const MAX_PACKAGE: u64 = 1 << 30;
/// Requests in flight at once toward one back office.
const PARALLEL: usize = 8;

pub struct HttpClientEndpoint {
    pub name: String,
    pub config: HttpClientConfig,
    pub routes: Routes,
    client: reqwest::Client,
    base: String,
    pub health: Health,
    backoff: Mutex<Backoff>,
}

#[derive(Debug)]
struct Backoff {
    until: Option<Instant>,
    delay: Duration,
}

/// The reply of ReceiveData and SendData (vendor attribute names).
#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    errcode: Option<serde_json::Value>,
    #[serde(default)]
    errmessage: Option<String>,
    #[serde(default)]
    packagetype: Option<String>,
    #[serde(default, rename = "UID")]
    uid: Option<String>,
}

impl Reply {
    /// errcode as text whether the back office sent a string (vendor) or a number.
    fn code(&self) -> String {
        match &self.errcode {
            Some(serde_json::Value::String(s)) => s.trim().to_string(),
            Some(v) => v.to_string(),
            None => String::new(),
        }
    }
    fn message(&self) -> &str {
        self.errmessage.as_deref().unwrap_or("")
    }
}

enum Pulled {
    Nothing,
    Taken,
}

impl HttpClientEndpoint {
    pub fn new(name: &str, config: HttpClientConfig, routes: Routes) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(PARALLEL)
            .build()
            .context("cannot build the HTTP client")?;
        let base = config.url.trim_end_matches('/').to_string();
        Ok(HttpClientEndpoint {
            name: name.to_string(),
            config,
            routes,
            client,
            base,
            health: Health::new(name),
            backoff: Mutex::new(Backoff {
                until: None,
                delay: Duration::ZERO,
            }),
        })
    }

    fn backing_off(&self) -> bool {
        let b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        b.until.is_some_and(|u| Instant::now() < u)
    }

    fn note(&self, ok: bool, what: &str) {
        let mut b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            b.until = None;
            b.delay = Duration::ZERO;
            self.health.ok();
        } else {
            b.delay = (b.delay * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
            b.until = Some(Instant::now() + b.delay);
            self.health.failed(what);
        }
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let rb = self.client.request(method, url);
        match &self.config.login {
            Some(login) => rb.basic_auth(
                login,
                self.config.secret.as_ref().map(|s| s.expose().to_string()),
            ),
            None => rb,
        }
    }

    async fn call(&self, rb: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Reply> {
        let resp = rb.send().await.with_context(|| what.to_string())?;
        let status = resp.status();
        let body = resp.bytes().await.with_context(|| what.to_string())?;
        if !status.is_success() {
            anyhow::bail!(
                "{what}: HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            );
        }
        serde_json::from_slice::<Reply>(&body).with_context(|| {
            format!(
                "{what}: the reply is not KKMTransfer JSON: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )
        })
    }

    // ---------------------------------------------------------------- pulling

    /// Pulls every till of every link until the back office has nothing more.
    pub async fn take(self: &Arc<Self>, store: &Arc<Store>, dry_run: bool) -> TakeReport {
        let mut report = TakeReport::default();
        if self.backing_off() {
            report.failed += 1;
            return report;
        }
        if dry_run {
            report.planned.push(format!(
                "ask {} for packages of tills {}",
                self.name,
                self.routes
                    .links
                    .iter()
                    .map(|r| r.pos.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ));
            return report;
        }
        let sem = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
        let mut set = tokio::task::JoinSet::new();
        for route in &self.routes.links {
            for pos in route.pos.iter() {
                let (me, store, sem) = (self.clone(), store.clone(), sem.clone());
                let (link, peer) = (route.link.clone(), route.peer.clone());
                set.spawn(async move {
                    let _permit = sem.acquire_owned().await;
                    me.pull_till(&store, &link, &peer, pos).await
                });
            }
        }
        let mut first_error = None;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(n)) => report.taken += n,
                Ok(Err(e)) => {
                    report.failed += 1;
                    first_error.get_or_insert(format!("{e:#}"));
                }
                Err(e) => {
                    report.failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        match first_error {
            None => self.note(true, ""),
            Some(e) => self.note(false, &e),
        }
        report
    }

    async fn pull_till(
        &self,
        store: &Arc<Store>,
        link: &str,
        peer: &str,
        pos: u32,
    ) -> anyhow::Result<u64> {
        let mut taken = 0;
        loop {
            let s = store.clone();
            let name = self.name.clone();
            let n = tokio::task::spawn_blocking(move || s.client_counter(&name, pos, "receive"))
                .await??;
            match self.pull_one(store, link, peer, pos, n).await? {
                Pulled::Nothing => return Ok(taken),
                Pulled::Taken => taken += 1,
            }
        }
    }

    async fn pull_one(
        &self,
        store: &Arc<Store>,
        link: &str,
        peer: &str,
        pos: u32,
        n: i64,
    ) -> anyhow::Result<Pulled> {
        let url = format!("{}/{}/{}", self.base, pos, n);
        let what = format!("{}: till {pos}, package {n}: GET {url}", self.name);
        let reply = self
            .call(self.request(reqwest::Method::GET, &url), &what)
            .await?;
        let code = reply.code();
        let data = reply.data.as_deref().unwrap_or("");
        match code.as_str() {
            "3" => return Ok(Pulled::Nothing),
            "0" if data.trim().is_empty() => return Ok(Pulled::Nothing),
            "0" => {}
            _ => anyhow::bail!("{what}: errcode {code:?}: {}", reply.message()),
        }
        let kind = match reply.packagetype.as_deref().map(str::trim) {
            Some("spr") | None => Kind::Spr,
            Some("flr") => Kind::Flr,
            Some(other) => anyhow::bail!("{what}: unknown packagetype {other:?}"),
        };
        let bytes = package::decode_package_data(data.as_bytes(), MAX_PACKAGE)
            .with_context(|| format!("{what}: bad data"))?;
        let uid = reply.uid.filter(|u| !u.trim().is_empty());
        let source_name = format!("{pos}/{n}");
        let (s, link, peer, name) = (
            store.clone(),
            link.to_string(),
            peer.to_string(),
            self.name.clone(),
        );
        let size = bytes.len();
        let id = tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
            let spooled = s.spool_bytes(&bytes)?;
            Ok(s.commit_taken_counted(
                &Taken {
                    link: &link,
                    pos,
                    kind,
                    uid: uid.as_deref(),
                    source_endpoint: &name,
                    source_name: &source_name,
                    source_seq: Some(n),
                    sink_endpoint: &peer,
                },
                spooled,
                n + 1,
            )?)
        })
        .await??;
        crate::failpoint::crash_point("after-taken");
        tracing::info!(endpoint = %self.name, till = pos, kind = %kind, package = id, bytes = size, "taken package number {n}");
        Ok(Pulled::Taken)
    }

    // ---------------------------------------------------------------- pushing reports

    pub async fn deliver(
        &self,
        store: &Arc<Store>,
        queue: Vec<Package>,
        dry_run: bool,
    ) -> DeliverReport {
        let mut report = DeliverReport::default();
        if queue.is_empty() {
            return report;
        }
        if self.backing_off() {
            report.failed += queue.len() as u64;
            return report;
        }
        let mut blocked: Option<u32> = None;
        let mut error = None;
        for pkg in queue {
            if blocked == Some(pkg.pos) {
                report.failed += 1;
                continue;
            }
            if dry_run {
                report.planned.push(format!(
                    "send {} to {} (SendData)",
                    pkg.describe(),
                    self.name
                ));
                continue;
            }
            match self.send_one(store, &pkg).await {
                Ok(()) => report.delivered += 1,
                Err(e) => {
                    tracing::debug!("{e:#}");
                    error.get_or_insert(format!("{e:#}"));
                    report.failed += 1;
                    blocked = Some(pkg.pos);
                }
            }
        }
        if !dry_run {
            match error {
                None => self.note(true, ""),
                Some(e) => self.note(false, &e),
            }
        }
        report
    }

    async fn send_one(&self, store: &Arc<Store>, pkg: &Package) -> anyhow::Result<()> {
        let (s, id, name, pos) = (store.clone(), pkg.id, self.name.clone(), pkg.pos);
        let n =
            tokio::task::spawn_blocking(move || s.begin_numbered_send(id, &name, pos)).await??;
        let (s, p) = (store.clone(), pkg.clone());
        let zip = self.config.report_zip;
        let entry = package::zip_entry_name(pkg.kind, pkg.pos, pkg.id);
        let body = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            let bytes = s.payload_bytes(&p)?;
            Ok(if zip {
                package::encode_zip_base64(&bytes, &entry)
            } else {
                package::encode_plain_base64(&bytes)
            })
        })
        .await?
        .with_context(|| format!("cannot read the payload of {}", pkg.describe()))?;
        let url = match &pkg.uid {
            Some(uid) => format!("{}/SendData/{}/{}/{}", self.base, pkg.pos, n, uid),
            None => format!("{}/SendData/{}/{}", self.base, pkg.pos, n),
        };
        let what = format!(
            "{}: till {}, report number {n} ({}): POST {url}",
            self.name,
            pkg.pos,
            pkg.describe()
        );
        crate::failpoint::crash_point("after-delivering");
        let reply = self
            .call(
                self.request(reqwest::Method::POST, &url)
                    .header("Content-Type", "text/plain; charset=utf-8")
                    .body(body),
                &what,
            )
            .await?;
        let code = reply.code();
        match code.as_str() {
            "0" | "1" => {
                let (s, sink_name) = (store.clone(), format!("SendData/{}/{n}", pkg.pos));
                tokio::task::spawn_blocking(move || {
                    s.mark_delivered(id, Some(&sink_name), Some(n))
                })
                .await??;
                tracing::info!(endpoint = %self.name, link = %pkg.link, till = pkg.pos, package = pkg.id, bytes = pkg.size, errcode = %code, "delivered report number {n}");
                Ok(())
            }
            _ => anyhow::bail!("{what}: errcode {code:?}: {}", reply.message()),
        }
    }
}
