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
use crate::store::{Store, Taken, INLINE_MAX};
use crate::stream_codec::{
    self, BodyStream, ChannelWriter, DecodedReply, ReplyDecoder, ReportSink, StreamError,
};

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
    /// Never read: a string `data` is decoded as it arrives (`ReplyDecoder`) and is not
    /// here; anything else in `data` but null makes the reply fail to parse, as before.
    #[allow(dead_code)]
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

    /// GETs a ReceiveData reply and decodes it as it arrives, on a blocking thread (the
    /// data goes straight to a spool file, so a package of any size takes little memory).
    async fn receive(
        &self,
        store: &Arc<Store>,
        url: &str,
        what: &str,
    ) -> anyhow::Result<DecodedReply> {
        let mut resp = self
            .request(reqwest::Method::GET, url)
            .send()
            .await
            .with_context(|| what.to_string())?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.chunk().await.ok().flatten().unwrap_or_default();
            anyhow::bail!(
                "{what}: HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            );
        }
        let sink = ReportSink::new(store.spool_writer()?, store.scratch_dir(), MAX_PACKAGE);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
        let worker = tokio::task::spawn_blocking(move || {
            let mut decoder = ReplyDecoder::new(sink);
            let mut head = Vec::new();
            while let Some(piece) = rx.blocking_recv() {
                let more = (200 - head.len()).min(piece.len());
                head.extend_from_slice(&piece[..more]);
                if let Err(e) = decoder.feed(&piece) {
                    return (head, Err(e));
                }
            }
            (head, decoder.finish())
        });
        let mut read = Ok(());
        loop {
            match resp.chunk().await {
                Ok(Some(piece)) => {
                    if tx.send(piece).await.is_err() {
                        break; // the decoder stopped; it says why
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    read = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let (head, decoded) = worker.await?;
        read.with_context(|| what.to_string())?;
        decoded.map_err(|e| {
            anyhow::anyhow!(
                "{what}: the reply is not KKMTransfer JSON ({e}): {}",
                String::from_utf8_lossy(&head)
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
        let decoded = self.receive(store, &url, &what).await?;
        let reply: Reply = serde_json::from_value(serde_json::Value::Object(decoded.fields))
            .map_err(|e| anyhow::anyhow!("{what}: the reply is not KKMTransfer JSON: {e}"))?;
        let code = reply.code();
        match code.as_str() {
            "3" => return Ok(Pulled::Nothing),
            "0" if decoded.data_chars == 0 => return Ok(Pulled::Nothing),
            "0" => {}
            _ => anyhow::bail!("{what}: errcode {code:?}: {}", reply.message()),
        }
        let kind = match reply.packagetype.as_deref().map(str::trim) {
            Some("spr") | None => Kind::Spr,
            Some("flr") => Kind::Flr,
            Some(other) => anyhow::bail!("{what}: unknown packagetype {other:?}"),
        };
        let unpacked = decoded.data.map_err(|e| {
            let e = match e {
                StreamError::Base64(e) => anyhow::anyhow!("data is not valid base64: {e}"),
                e => anyhow::Error::new(e),
            };
            e.context(format!("{what}: bad data"))
        })?;
        let uid = reply.uid.filter(|u| !u.trim().is_empty());
        let source_name = format!("{pos}/{n}");
        let (s, link, peer, name) = (
            store.clone(),
            link.to_string(),
            peer.to_string(),
            self.name.clone(),
        );
        let size = unpacked.len;
        let id = tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
            let spooled = unpacked.writer.finish()?;
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

    /// A report's SendData body and its length: base64 of the payload, or of its ZIP with
    /// `report_zip`. Small reports are encoded in memory; bigger ones are streamed, made on
    /// a blocking thread as the request sends them (a ZIP is made first, in a scratch file,
    /// so that the length is known).
    async fn report_body(
        &self,
        store: &Arc<Store>,
        pkg: &Package,
    ) -> std::io::Result<(reqwest::Body, u64)> {
        let (s, p) = (store.clone(), pkg.clone());
        let zip = self.config.report_zip;
        let entry = package::zip_entry_name(pkg.kind, pkg.pos, pkg.id);
        if pkg.inline || pkg.size <= INLINE_MAX as u64 {
            let body = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
                let bytes = s.payload_bytes(&p)?;
                Ok(if zip {
                    package::encode_zip_base64(&bytes, &entry)
                } else {
                    package::encode_plain_base64(&bytes)
                })
            })
            .await??;
            let length = body.len() as u64;
            return Ok((reqwest::Body::from(body), length));
        }
        type Source = Box<dyn std::io::Read + Send>;
        let (source, length) =
            tokio::task::spawn_blocking(move || -> std::io::Result<(Source, u64)> {
                let mut payload = s.payload(&p)?;
                if !zip {
                    return Ok((Box::new(payload), p.size));
                }
                let mut zipped = stream_codec::zip_to_scratch(
                    &mut payload,
                    p.size,
                    &entry,
                    Some(stream_codec::BIG_DEFLATE_LEVEL),
                    s.scratch_dir(),
                )?;
                let size = zipped.size()?;
                Ok((Box::new(zipped), size))
            })
            .await??;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut source = source;
            let mut w = ChannelWriter(tx.clone());
            if let Err(e) = stream_codec::write_base64_wrapped(&mut source, &mut w, b"") {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok((
            reqwest::Body::wrap_stream(BodyStream(rx)),
            length.div_ceil(3) * 4,
        ))
    }

    async fn send_one(&self, store: &Arc<Store>, pkg: &Package) -> anyhow::Result<()> {
        let (s, id, name, pos) = (store.clone(), pkg.id, self.name.clone(), pkg.pos);
        let n =
            tokio::task::spawn_blocking(move || s.begin_numbered_send(id, &name, pos)).await??;
        let (body, length) = self
            .report_body(store, pkg)
            .await
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
                    .header(reqwest::header::CONTENT_LENGTH, length)
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
