//! Simulators of the two other parties, for trying the bridge without real tills or a real
//! «Торговое предприятие», and for the tests: a back office that publishes KKMTransfer with
//! a queue of spr/flr packages per till and records the reports it receives, and a till that
//! pulls packages by number and posts reports. `examples/backoffice-sim.rs` and
//! `examples/till-sim.rs` wrap them as programs.
//!
//! They are written from the vendor's description (PROTOCOL.md §4), independently of the
//! bridge's own HTTP service, so that tests do not check the bridge against itself.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;

use crate::package::{self, Kind};

/// One package a back office has for a till.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub kind: Kind,
    pub bytes: Vec<u8>,
    pub uid: Option<String>,
}

/// One report a back office received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedReport {
    pub pos: u32,
    pub number: i64,
    pub uid: Option<String>,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct BackOfficeState {
    queues: HashMap<u32, VecDeque<Outgoing>>,
    /// Per till: the number last served and whether a package was served under it.
    served: HashMap<u32, (i64, bool)>,
    acked: HashMap<u32, Vec<Outgoing>>,
    reports: Vec<ReceivedReport>,
    seen: HashSet<(u32, i64, String)>,
    requests: u64,
}

/// A back office publishing KKMTransfer (in memory).
#[derive(Clone, Default)]
pub struct BackOffice {
    state: Arc<Mutex<BackOfficeState>>,
    auth: Option<(String, String)>,
}

impl BackOffice {
    pub fn new(auth: Option<(String, String)>) -> BackOffice {
        BackOffice {
            state: Arc::default(),
            auth,
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, BackOfficeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a package for a till.
    pub fn queue(&self, pos: u32, kind: Kind, bytes: Vec<u8>, uid: Option<String>) {
        self.st()
            .queues
            .entry(pos)
            .or_default()
            .push_back(Outgoing { kind, bytes, uid });
    }

    /// The packages a till has acknowledged (by asking for the next number), in order.
    pub fn acked(&self, pos: u32) -> Vec<Outgoing> {
        self.st().acked.get(&pos).cloned().unwrap_or_default()
    }

    /// Packages not yet acknowledged by a till.
    pub fn pending(&self, pos: u32) -> usize {
        self.st().queues.get(&pos).map_or(0, VecDeque::len)
    }

    pub fn reports(&self) -> Vec<ReceivedReport> {
        self.st().reports.clone()
    }

    pub fn requests(&self) -> u64 {
        self.st().requests
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        use base64::Engine as _;
        let Some((login, password)) = &self.auth else {
            return true;
        };
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{login}:{password}"))
        );
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == expected)
    }

    /// The KKMTransfer routes under `prefix` (e.g. "/hs/KKMTransfer").
    pub fn router(&self, prefix: &str) -> Router {
        Router::new()
            .route(&format!("{prefix}/{{pos}}/{{n}}"), get(receive_data))
            .route(&format!("{prefix}/SendData/{{pos}}/{{n}}"), post(send_data))
            .route(
                &format!("{prefix}/SendData/{{pos}}/{{n}}/{{uid}}"),
                post(send_data_uid),
            )
            .with_state(self.clone())
    }

    /// Serves on a bound listener until the task is dropped.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        prefix: &str,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router(prefix)).await
    }
}

fn reply(v: serde_json::Value) -> Response {
    (
        [("content-type", "application/json; charset=utf-8")],
        v.to_string(),
    )
        .into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [("www-authenticate", "Basic realm=\"1C\"")],
        "",
    )
        .into_response()
}

async fn receive_data(
    State(bo): State<BackOffice>,
    headers: HeaderMap,
    Path((pos, n)): Path<(String, String)>,
) -> Response {
    if !bo.authorized(&headers) {
        return unauthorized();
    }
    let (Ok(pos), Ok(n)) = (pos.parse::<u32>(), n.parse::<i64>()) else {
        return reply(json!({"data": "", "errcode": "2", "errmessage": "bad request"}));
    };
    let mut st = bo.st();
    st.requests += 1;
    if let Some(&(served, had)) = st.served.get(&pos) {
        if n == served + 1 && had {
            if let Some(p) = st.queues.get_mut(&pos).and_then(VecDeque::pop_front) {
                st.acked.entry(pos).or_default().push(p);
            }
        }
    }
    let head = st.queues.get(&pos).and_then(|q| q.front()).cloned();
    st.served.insert(pos, (n, head.is_some()));
    match head {
        None => reply(
            json!({"data": "", "errcode": "3", "errmessage": "Не найдены данные для отправки"}),
        ),
        Some(p) => {
            let data = package::encode_zip_base64(&p.bytes, "v8_sim.txt");
            let mut v = json!({
                "data": data, "errcode": "0", "errmessage": "", "packagetype": p.kind.as_str()
            });
            if let Some(uid) = p.uid {
                v["UID"] = json!(uid);
            }
            reply(v)
        }
    }
}

async fn send_data(
    State(bo): State<BackOffice>,
    headers: HeaderMap,
    Path((pos, n)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    store_report(bo, headers, pos, n, None, body)
}

async fn send_data_uid(
    State(bo): State<BackOffice>,
    headers: HeaderMap,
    Path((pos, n, uid)): Path<(String, String, String)>,
    body: axum::body::Bytes,
) -> Response {
    store_report(bo, headers, pos, n, Some(uid), body)
}

fn store_report(
    bo: BackOffice,
    headers: HeaderMap,
    pos: String,
    n: String,
    uid: Option<String>,
    body: axum::body::Bytes,
) -> Response {
    if !bo.authorized(&headers) {
        return unauthorized();
    }
    let (Ok(pos), Ok(n)) = (pos.parse::<u32>(), n.parse::<i64>()) else {
        return reply(json!({"errcode": "2", "errmessage": "bad request"}));
    };
    let bytes = match package::decode_package_data(&body, 1 << 30) {
        Ok(b) => b,
        Err(e) => return reply(json!({"errcode": "2", "errmessage": e.to_string()})),
    };
    let mut st = bo.st();
    st.requests += 1;
    if !st.seen.insert((pos, n, package::sha256_hex(&bytes))) {
        return reply(json!({"errcode": "1", "errmessage": "Пакет уже обработан"}));
    }
    st.reports.push(ReceivedReport {
        pos,
        number: n,
        uid,
        bytes,
    });
    reply(json!({"errcode": "0", "errmessage": ""}))
}

/// A package a till received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub number: i64,
    pub kind: String,
    pub uid: Option<String>,
    pub bytes: Vec<u8>,
}

/// A till calling KKMTransfer: keeps its package counter and its report counter.
pub struct Till {
    pub base: String,
    pub pos: u32,
    pub auth: Option<(String, String)>,
    /// The next package number to ask for.
    pub counter: i64,
    /// The next report number to send.
    pub report_counter: i64,
    client: reqwest::Client,
}

impl Till {
    pub fn new(base: &str, pos: u32, auth: Option<(String, String)>) -> Till {
        Till {
            base: base.trim_end_matches('/').to_string(),
            pos,
            auth,
            counter: 1,
            report_counter: 1,
            client: reqwest::Client::new(),
        }
    }

    /// "Reset my counter": as after a reinstall.
    pub fn reset_counter(&mut self) {
        self.counter = 1;
    }

    fn req(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some((l, p)) => rb.basic_auth(l, Some(p)),
            None => rb,
        }
    }

    /// Asks for the current number once; returns the JSON reply.
    pub async fn receive(&self, number: i64) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}/{}/{}", self.base, self.pos, number);
        let r = self.req(self.client.get(&url)).send().await?;
        anyhow::ensure!(r.status().is_success(), "GET {url}: HTTP {}", r.status());
        Ok(r.json().await?)
    }

    /// Pulls every package the server has, acknowledging each by asking for the next number,
    /// as «Кассир 5» does after a successful load.
    pub async fn pull_all(&mut self) -> anyhow::Result<Vec<Received>> {
        let mut out = Vec::new();
        loop {
            let v = self.receive(self.counter).await?;
            let code = v["errcode"].as_str().unwrap_or("");
            match code {
                "3" => return Ok(out),
                "0" => {
                    let data = v["data"].as_str().unwrap_or("");
                    if data.is_empty() {
                        return Ok(out);
                    }
                    let bytes = package::decode_package_data(data.as_bytes(), 1 << 30)?;
                    out.push(Received {
                        number: self.counter,
                        kind: v["packagetype"].as_str().unwrap_or("").to_string(),
                        uid: v["UID"].as_str().map(str::to_string),
                        bytes,
                    });
                    self.counter += 1;
                }
                other => anyhow::bail!("till {}: errcode {other}: {}", self.pos, v["errmessage"]),
            }
        }
    }

    /// Posts a report (plain base64 wrapped with CRLF, as 1C-style clients send it);
    /// returns the errcode.
    pub async fn send_report(&mut self, bytes: &[u8], uid: Option<&str>) -> anyhow::Result<String> {
        let n = self.report_counter;
        let code = self.send_report_numbered(bytes, uid, n).await?;
        if code == "0" || code == "1" {
            self.report_counter += 1;
        }
        Ok(code)
    }

    /// Posts a report under a given number.
    pub async fn send_report_numbered(
        &self,
        bytes: &[u8],
        uid: Option<&str>,
        number: i64,
    ) -> anyhow::Result<String> {
        let url = match uid {
            Some(u) => format!("{}/SendData/{}/{}/{}", self.base, self.pos, number, u),
            None => format!("{}/SendData/{}/{}", self.base, self.pos, number),
        };
        let body = package::wrap_base64_crlf(&package::encode_plain_base64(bytes));
        let r = self.req(self.client.post(&url)).body(body).send().await?;
        anyhow::ensure!(r.status().is_success(), "POST {url}: HTTP {}", r.status());
        let v: serde_json::Value = r.json().await?;
        Ok(v["errcode"].as_str().unwrap_or("").to_string())
    }
}
