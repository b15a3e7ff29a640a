//! The HTTP service KKMTransfer served to tills (PROTOCOL.md §4.1–§4.2), as «Торговое
//! предприятие» would serve it.
//!
//! This endpoint is neither polled nor pushed by the pump: tills pull their packages
//! (ReceiveData) straight from the store and push their reports (SendData) straight into
//! it. What it keeps per till is the `served` row of the journal: the package it served
//! last and the number it served it under. Asking for that number + 1 acknowledges it.
//!
//! Protocol-level errors are HTTP 200 with a JSON `errcode` (tills read the JSON);
//! authentication errors are 401/403. Every message names the till and the number.
//!
//! Replies of big packages (over `INLINE_MAX`) are encoded into files under
//! `state_dir/tmp` and streamed. A background encoder (`encode_ahead`) makes them when a
//! package is queued for a till, so that the till's first ReceiveData streams a ready file
//! instead of waiting seconds for deflate; see [`HttpServerEndpoint::encode_ahead_step`]
//! for its rules and bounds, and `stream_codec::ReplyCache` for why a half-written reply is
//! never served.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, RawPathParams, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Routes;
use crate::config::{AuthMode, HttpConfig, UserConfig};
use crate::package::{
    decode_base64, encode_zip_base64, zip_entry_name, Direction, Kind, Package, ZIP_LOCAL,
};
use crate::store::{NewReport, ReportOutcome, Spooled, Store, INLINE_MAX};
use crate::stream_codec::{self, ReplyCache, ReportSink, StreamError, TextDecoder};

/// errcode values (PROTOCOL.md §4.1, §4.2): strings, as in the vendor examples.
pub mod errcode {
    pub const OK: &str = "0";
    /// SendData: a package with this number (and this content) was already processed.
    pub const ALREADY: &str = "1";
    /// Any other error: bad input, unknown till, …
    pub const ERROR: &str = "2";
    /// ReceiveData: nothing to send.
    pub const NO_DATA: &str = "3";
}

/// The vendor's text for errcode "3".
pub const NO_DATA_MESSAGE: &str = "Не найдены данные для отправки";

/// Called with the link name after a report is stored, so that the daemon delivers it to
/// the office side promptly.
pub type OnReport = Arc<dyn Fn(&str) + Send + Sync>;

pub struct HttpServerEndpoint {
    pub name: String,
    pub config: HttpConfig,
    pub routes: Routes,
    /// Serialises the read-modify-write of the serving state (ReceiveData).
    serving: Mutex<()>,
    /// What ReceiveData last answered each till, to answer a repeated poll from memory.
    cache: Mutex<ServeCache>,
    /// The daemon's live view (last contact, request latency), when running under `run`.
    pub live: std::sync::OnceLock<Arc<crate::status::Live>>,
    /// `tls_cert` + `tls_key`: serve HTTPS.
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// ReceiveData replies of big packages, encoded once and streamed from a file.
    replies: ReplyCache,
    /// Wakes the background encoder of big replies (see
    /// [`HttpServerEndpoint::encode_ahead_step`]) when a till acknowledged a package, so
    /// that the one after it may enter the window.
    ahead_wake: tokio::sync::Notify,
    /// Packages whose background encoding failed; not tried again in the background (a
    /// till's request still encodes them, as it would without the encoder).
    ahead_failed: Mutex<HashSet<i64>>,
}

/// Encoding replies ahead: how many packages at the head of each till's queue have their
/// reply encoded before the till asks: the one it is served now or next, and the one after
/// it, so that the request that acknowledges the first finds the second ready.
const AHEAD_PER_TILL: usize = 2;

/// No reply is encoded ahead while the reply files in `state_dir/tmp`, plus the worst-case
/// size of the new one, would exceed this. Past it, replies are encoded on request as
/// before, and the encoder looks again when a till acknowledges a package or on its timer.
const AHEAD_DISK_MAX: u64 = 4 << 30;

/// The encoder looks at the queues without a wake-up this often (a safety net, and the
/// retry of a package left for the disk budget).
const AHEAD_RESCAN: Duration = Duration::from_secs(30);

/// At most one background encoding runs in the whole process (one encoder per HTTP
/// endpoint, one at a time over all of them): deflate is CPU-bound, and the machine also
/// serves tills and takes packages.
static AHEAD_GATE: Mutex<()> = Mutex::new(());

/// The frames a big reply is sent in: 1 MiB frames sent a 1.1 GB reply in 0.36 s,
/// 256 KiB frames in 0.5 s (each read is a hop to a blocking thread), nginx 0.34 s.
const REPLY_FRAME: usize = 1 << 20;

/// SendData bodies declaring at most this size decode to at most `INLINE_MAX` bytes, which
/// stay in memory: they are decoded on the request's task alone. The bytes of bigger (or
/// chunked) bodies go to a blocking thread, since writing their spool file can block.
const DECODE_ON_TASK_MAX: u64 = INLINE_MAX as u64 * 4 / 3;

/// What a till gets from ReceiveData.
#[derive(Debug, Serialize)]
struct ReceiveReply {
    data: String,
    errcode: &'static str,
    errmessage: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    packagetype: Option<&'static str>,
    #[serde(rename = "UID", skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
}

/// What a till gets from SendData (and any error reply).
#[derive(Debug, Serialize)]
struct SendReply {
    errcode: &'static str,
    errmessage: String,
}

/// The content type of every KKMTransfer reply.
const JSON_UTF8: HeaderValue = HeaderValue::from_static("application/json; charset=utf-8");

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).expect("replies always serialise");
    json_bytes_response(status, bytes.into())
}

fn receive_error(status: StatusCode, code: &'static str, msg: String) -> Response {
    json_response(
        status,
        &ReceiveReply {
            data: String::new(),
            errcode: code,
            errmessage: msg,
            packagetype: None,
            uid: None,
        },
    )
}

/// ReceiveData failed on our side (the journal, the spool): HTTP 500, errcode "2".
fn storage_error(c: &Checked) -> Response {
    receive_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        errcode::ERROR,
        format!(
            "ККМ {}, пакет {}: внутренняя ошибка хранилища",
            c.pos, c.number
        ),
    )
}

fn send_reply(status: StatusCode, code: &'static str, msg: String) -> Response {
    json_response(
        status,
        &SendReply {
            errcode: code,
            errmessage: msg,
        },
    )
}

/// Which reply shape an error takes.
#[derive(Clone, Copy)]
enum Method {
    Receive,
    Send,
}

impl Method {
    fn error(self, status: StatusCode, code: &'static str, msg: String) -> Box<Response> {
        Box::new(match self {
            Method::Receive => receive_error(status, code, msg),
            Method::Send => send_reply(status, code, msg),
        })
    }
}

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Compares the digests so that the time taken does not depend on where the passwords
/// differ.
fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (sha(given.as_bytes()), sha(expected.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Most ReceiveData requests repeat the previous one: a till polls and gets "no data", or
/// asks for the same number again until it has applied its package. The answers to those
/// are kept here, so that they cost no journal queries and no encoding. The journal stays
/// the truth: every change of a till's serving state goes through `next_for_till` (under
/// the `serving` lock), which updates this cache after the journal.
#[derive(Default)]
struct ServeCache {
    tills: HashMap<u32, CachedServe>,
    /// Sum of the cached reply sizes, kept under [`REPLY_CACHE_MAX`].
    reply_bytes: usize,
}

/// What the cache may hold in encoded replies, over all tills.
const REPLY_CACHE_MAX: usize = 32 << 20;

enum CachedServe {
    /// Nothing was queued for the till at this store generation
    /// ([`Store::down_generation`]).
    Empty { generation: u64 },
    /// `package` is being served under `number`; `reply` is its encoded reply (small
    /// packages, while the budget allows).
    Serving {
        number: i64,
        package: i64,
        reply: Option<axum::body::Bytes>,
    },
}

impl ServeCache {
    fn set(&mut self, pos: u32, entry: CachedServe) {
        if let Some(CachedServe::Serving {
            reply: Some(old), ..
        }) = self.tills.insert(pos, entry)
        {
            self.reply_bytes -= old.len();
        }
    }

    /// Keeps `reply` as package `package`'s reply for till `pos`, if that is still what
    /// the till is served and the budget allows.
    fn keep_reply(&mut self, pos: u32, package_id: i64, bytes: &axum::body::Bytes) {
        if self.reply_bytes + bytes.len() > REPLY_CACHE_MAX {
            return;
        }
        if let Some(CachedServe::Serving {
            package,
            reply: reply @ None,
            ..
        }) = self.tills.get_mut(&pos)
        {
            if *package == package_id {
                *reply = Some(bytes.clone());
                self.reply_bytes += bytes.len();
            }
        }
    }
}

fn json_bytes_response(status: StatusCode, bytes: axum::body::Bytes) -> Response {
    let mut r = (status, bytes).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, JSON_UTF8);
    r
}

/// The "no data" reply (errcode "3"), encoded once.
fn no_data_reply() -> axum::body::Bytes {
    static BYTES: std::sync::OnceLock<axum::body::Bytes> = std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| {
            serde_json::to_vec(&ReceiveReply {
                data: String::new(),
                errcode: errcode::NO_DATA,
                errmessage: NO_DATA_MESSAGE.into(),
                packagetype: None,
                uid: None,
            })
            .expect("replies always serialise")
            .into()
        })
        .clone()
}

/// The SendData "accepted" reply (errcode "0"), encoded once.
fn accepted_reply() -> axum::body::Bytes {
    static BYTES: std::sync::OnceLock<axum::body::Bytes> = std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| {
            serde_json::to_vec(&SendReply {
                errcode: errcode::OK,
                errmessage: String::new(),
            })
            .expect("replies always serialise")
            .into()
        })
        .clone()
}

/// The till request, checked up to the link that carries the till.
struct Checked {
    pos: u32,
    number: i64,
    link: String,
    office: String,
}

impl HttpServerEndpoint {
    /// Fails (naming the endpoint and the file) when `tls_cert`/`tls_key` do not load.
    pub fn new(
        name: &str,
        config: HttpConfig,
        routes: Routes,
    ) -> anyhow::Result<HttpServerEndpoint> {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(
                crate::tls::server_config(cert, key)
                    .map_err(|e| anyhow::anyhow!("endpoint {name:?}: tls_cert/tls_key: {e}"))?,
            ),
            _ => None,
        };
        Ok(HttpServerEndpoint {
            name: name.to_string(),
            config,
            routes,
            serving: Mutex::new(()),
            cache: Mutex::new(ServeCache::default()),
            live: std::sync::OnceLock::new(),
            tls,
            replies: ReplyCache::new(),
            ahead_wake: tokio::sync::Notify::new(),
            ahead_failed: Mutex::new(HashSet::new()),
        })
    }

    /// HTTP Basic: the user whose login and password match, or why not.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Option<&UserConfig>, Box<Response>> {
        if self.config.auth == AuthMode::None {
            return Ok(None);
        }
        let unauthorized = |why: &str| {
            let mut r = send_reply(
                StatusCode::UNAUTHORIZED,
                errcode::ERROR,
                format!("Требуется авторизация: {why}"),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"KKMTransfer\", charset=\"UTF-8\""),
            );
            Box::new(r)
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized("нет заголовка Authorization"));
        };
        let creds = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("basic").then_some(rest)
            })
            .and_then(|b64| decode_base64(b64.as_bytes()).ok())
            .and_then(|raw| String::from_utf8(raw).ok());
        let Some(creds) = creds else {
            return Err(unauthorized("неверный заголовок Authorization"));
        };
        let (login, password) = creds.split_once(':').unwrap_or((creds.as_str(), ""));
        let mut found = None;
        for u in &self.config.user {
            let secret = u.secret.as_ref().map(|s| s.expose()).unwrap_or("");
            // Compare every password so that an unknown login takes as long as a known one.
            let ok = same_secret(password, secret) && !secret.is_empty();
            if u.login == login && ok && found.is_none() {
                found = Some(u);
            }
        }
        match found {
            Some(u) => Ok(Some(u)),
            None => {
                tracing::warn!(endpoint = %self.name, login = %login, "refused: wrong login or password");
                Err(unauthorized("неверное имя пользователя или пароль"))
            }
        }
    }

    /// Authentication, the till and number, the user's tills, the link (in this order).
    fn check(
        &self,
        method: Method,
        headers: &HeaderMap,
        pos: &str,
        number: &str,
    ) -> Result<Checked, Box<Response>> {
        let user = self.authenticate(headers)?;
        // Digits only (a number may carry a minus, refused below with its own message):
        // `u32::from_str` alone would also take "+7".
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let parsed = if digits(pos) && digits(number.strip_prefix('-').unwrap_or(number)) {
            (pos.parse::<u32>().ok(), number.parse::<i64>().ok())
        } else {
            (None, None)
        };
        let (Some(pos_n), Some(number_n)) = parsed else {
            tracing::warn!(endpoint = %self.name, till = %pos, number = %number, "refused: till or package number is not a number");
            return Err(method.error(
                StatusCode::OK,
                errcode::ERROR,
                format!("ККМ {pos}, пакет {number}: номер ККМ и номер пакета должны быть целыми числами"),
            ));
        };
        if number_n < 0 {
            return Err(method.error(
                StatusCode::OK,
                errcode::ERROR,
                format!("ККМ {pos_n}, пакет {number_n}: номер пакета не может быть отрицательным"),
            ));
        }
        if let Some(u) = user {
            if !u.pos_set.contains(pos_n) {
                tracing::warn!(endpoint = %self.name, login = %u.login, till = pos_n, "refused: the login may not act for this till");
                return Err(method.error(
                    StatusCode::FORBIDDEN,
                    errcode::ERROR,
                    format!(
                        "ККМ {pos_n}, пакет {number_n}: пользователь {} не может работать за ККМ {pos_n} (разрешены ККМ {})",
                        u.login, u.pos_set
                    ),
                ));
            }
        }
        let Some(route) = self.routes.route(pos_n) else {
            tracing::warn!(endpoint = %self.name, till = pos_n, "refused: till is in no link of this endpoint");
            return Err(method.error(
                StatusCode::OK,
                errcode::ERROR,
                format!("ККМ {pos_n}, пакет {number_n}: ККМ {pos_n} не подключена ни к одной связи (link) сервиса {}", self.name),
            ));
        };
        Ok(Checked {
            pos: pos_n,
            number: number_n,
            link: route.link.clone(),
            office: route.peer.clone(),
        })
    }

    /// ReceiveData from memory, when the till asks what it asked last time (see
    /// [`ServeCache`]). `None`: the journal must be asked.
    fn cached_reply(&self, store: &Store, pos: u32, number: i64) -> Option<Response> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.tills.get(&pos)? {
            CachedServe::Empty { generation } if *generation == store.down_generation() => {
                Some(json_bytes_response(StatusCode::OK, no_data_reply()))
            }
            CachedServe::Serving {
                number: n,
                reply: Some(bytes),
                ..
            } if *n == number => Some(json_bytes_response(StatusCode::OK, bytes.clone())),
            _ => None,
        }
    }

    /// ReceiveData serving semantics (PROTOCOL.md §4.1). Returns the package served under
    /// `number`, if any, and records the answer in the cache.
    fn next_for_till(&self, store: &Store, c: &Checked) -> crate::store::Result<Option<Package>> {
        let _guard = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        // Read before looking: a package queued after this is seen by the next request.
        let generation = store.down_generation();
        let served = self.next_for_till_locked(store, c)?;
        let entry = match &served {
            None => CachedServe::Empty { generation },
            Some(p) => CachedServe::Serving {
                number: c.number,
                package: p.id,
                reply: None,
            },
        };
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(c.pos, entry);
        Ok(served)
    }

    fn next_for_till_locked(
        &self,
        store: &Store,
        c: &Checked,
    ) -> crate::store::Result<Option<Package>> {
        let (pos, number) = (c.pos, c.number);
        let current = store
            .served(&self.name, pos)?
            .and_then(|s| s.package_id.map(|id| (s.number, id)));
        let current = match current {
            Some((n, id)) if store.is_pending(id)? => Some((n, id)),
            _ => None,
        };
        match current {
            None => {
                // First request, or everything before was acknowledged: serve the head.
                let head = store.queue_head(&c.link, Direction::Down, pos, None)?;
                if let Some(p) = &head {
                    store.set_served(&self.name, pos, number, Some(p.id), false)?;
                }
                Ok(head)
            }
            Some((n, id)) if n == number => store.package(id),
            Some((n, id)) if n.checked_add(1) == Some(number) => {
                let next = store.ack_served(&self.name, &c.link, pos, id, n, number)?;
                tracing::info!(endpoint = %self.name, link = %c.link, till = pos, package = id, number = n, "delivered: the till asked for the next number");
                // The till's queue moved up: the package after `next` may be encoded ahead.
                self.ahead_wake.notify_one();
                Ok(next)
            }
            Some((n, id)) => {
                tracing::warn!(endpoint = %self.name, link = %c.link, till = pos, package = id, served_as = n, asked = number,
                    "the till asked for an unexpected number (counter reset or reinstall?); the unacknowledged package is served again under the new number");
                store.set_served(&self.name, pos, number, Some(id), true)?;
                store.package(id)
            }
        }
    }

    fn receive_blocking(&self, store: &Store, c: Checked) -> Response {
        let pkg = match self.next_for_till(store, &c) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(endpoint = %self.name, till = c.pos, number = c.number, "ReceiveData failed: {e}");
                return storage_error(&c);
            }
        };
        let Some(pkg) = pkg else {
            return json_bytes_response(StatusCode::OK, no_data_reply());
        };
        if !pkg.inline && pkg.size > INLINE_MAX as u64 {
            return self.receive_streamed(store, &c, &pkg);
        }
        let bytes = match store.payload_bytes(&pkg) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(endpoint = %self.name, till = c.pos, number = c.number, package = pkg.id, "cannot read the payload of {}: {e}", pkg.describe());
                return storage_error(&c);
            }
        };
        tracing::debug!(endpoint = %self.name, till = c.pos, number = c.number, package = pkg.id, kind = %pkg.kind, bytes = bytes.len(), "serving");
        let uid = if pkg.kind == Kind::Flr {
            pkg.uid.clone()
        } else {
            None
        };
        let reply: axum::body::Bytes = serde_json::to_vec(&ReceiveReply {
            data: encode_zip_base64(&bytes, &zip_entry_name(pkg.kind, pkg.pos, pkg.id)),
            errcode: errcode::OK,
            errmessage: String::new(),
            packagetype: Some(pkg.kind.as_str()),
            uid,
        })
        .expect("replies always serialise")
        .into();
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keep_reply(c.pos, pkg.id, &reply);
        json_bytes_response(StatusCode::OK, reply)
    }

    /// Writes the ReceiveData reply of a big package to `out`: the same JSON as
    /// `json_response` of a `ReceiveReply` (`stream_codec::encode_reply`), its payload read
    /// a piece at a time. With `stop`, the encoding fails as soon as `stop` is set.
    fn write_big_reply(
        store: &Store,
        pkg: &Package,
        stop: Option<&AtomicBool>,
        out: &mut dyn std::io::Write,
    ) -> std::io::Result<()> {
        const HEAD: &[u8] = br#"{"data":""#;
        let uid = if pkg.kind == Kind::Flr {
            pkg.uid.clone()
        } else {
            None
        };
        let whole = serde_json::to_vec(&ReceiveReply {
            data: String::new(),
            errcode: errcode::OK,
            errmessage: String::new(),
            packagetype: Some(pkg.kind.as_str()),
            uid,
        })
        .expect("replies always serialise");
        assert!(whole.starts_with(HEAD), "data is the first attribute");
        let tail = &whole[HEAD.len()..];
        let payload = store.payload(pkg)?;
        let never = AtomicBool::new(false);
        let mut payload = stream_codec::StopReader {
            inner: payload,
            stop: stop.unwrap_or(&never),
        };
        stream_codec::encode_reply(
            &mut payload,
            pkg.size,
            &zip_entry_name(pkg.kind, pkg.pos, pkg.id),
            Some(stream_codec::BIG_DEFLATE_LEVEL),
            HEAD,
            tail,
            store.scratch_dir(),
            out,
        )
    }

    /// ReceiveData of a package too big for memory: the reply is encoded once into a file
    /// and streamed from it. Usually the background encoder has made that file when the
    /// package was queued (see [`HttpServerEndpoint::encode_ahead_step`]); if it is encoding
    /// it right now, this request waits for it (the package exists, so "3", no data, would
    /// be false, and "2" would make the till log a failure); if nobody has, this request
    /// encodes it, as it did before the encoder existed.
    fn receive_streamed(&self, store: &Store, c: &Checked, pkg: &Package) -> Response {
        let path = store.reply_cache_path(pkg.id);
        let t0 = std::time::Instant::now();
        let opened = self.replies.open_or_encode(pkg.id, &path, |out| {
            Self::write_big_reply(store, pkg, None, out)
        });
        let (file, len) = match opened.and_then(|(f, encoded)| {
            let len = f.metadata()?.len();
            Ok((f, encoded, len))
        }) {
            Ok((file, encoded, len)) => {
                let waited_ms = t0.elapsed().as_millis() as u64;
                if encoded {
                    tracing::info!(endpoint = %self.name, till = c.pos, number = c.number, package = pkg.id, bytes = pkg.size, reply_bytes = len,
                        encode_ms = waited_ms, "encoded the reply of a big package on the request (served from a file until acknowledged)");
                    // Acknowledged while it was encoding: nothing would remove the file.
                    if !store.is_pending(pkg.id).unwrap_or(true) {
                        let _ = std::fs::remove_file(&path);
                    }
                } else if waited_ms >= 100 {
                    tracing::debug!(endpoint = %self.name, till = c.pos, number = c.number, package = pkg.id, waited_ms, "waited for the reply being encoded ahead");
                }
                (file, len)
            }
            Err(e) => {
                tracing::error!(endpoint = %self.name, till = c.pos, number = c.number, package = pkg.id, "cannot encode the reply of {}: {e}", pkg.describe());
                return storage_error(c);
            }
        };
        tracing::debug!(endpoint = %self.name, till = c.pos, number = c.number, package = pkg.id, kind = %pkg.kind, bytes = pkg.size, "serving from a file");
        let stream = tokio_util::io::ReaderStream::with_capacity(
            tokio::fs::File::from_std(file),
            REPLY_FRAME,
        );
        let mut r = Response::new(Body::from_stream(stream));
        r.headers_mut().insert(header::CONTENT_TYPE, JSON_UTF8);
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        r
    }

    /// One step of the background encoder: finds the first big package in the window
    /// ([`AHEAD_PER_TILL`] at the head of each till's queue, heads of all tills first) whose
    /// reply is neither encoded nor being encoded, and encodes it (blocking: seconds for a
    /// big package). Returns whether it encoded one (then the caller looks again at once:
    /// the queues may have moved meanwhile).
    ///
    /// - The journal stays the truth: the package comes from the journal, the reply file is
    ///   only a cache of it, written to a temp file and renamed when whole
    ///   ([`ReplyCache::encode_ahead`]), removed with the package's payload when the till
    ///   acknowledges it, and emptied with all of `state_dir/tmp` at every start.
    /// - A package a request is encoding (or the other way round) is never encoded twice:
    ///   both go through the same busy set.
    /// - Bounded: one background encoding at a time in the process ([`AHEAD_GATE`]), at
    ///   most [`AHEAD_PER_TILL`] packages per till, at most [`AHEAD_DISK_MAX`] of reply
    ///   files in `state_dir/tmp`, payloads read a piece at a time.
    fn encode_ahead_step(&self, store: &Store, stop: &AtomicBool) -> bool {
        let candidates = match store.big_pending(&self.name, AHEAD_PER_TILL) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(endpoint = %self.name, "cannot look for big packages to encode ahead: {e}");
                return false;
            }
        };
        for (pkg, place) in candidates {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            if pkg.inline || pkg.size <= INLINE_MAX as u64 {
                continue; // answered from memory
            }
            // Only the tills this endpoint serves for the package's link.
            if self.routes.route(pkg.pos).map(|r| r.link.as_str()) != Some(pkg.link.as_str()) {
                continue;
            }
            let path = store.reply_cache_path(pkg.id);
            if path.exists()
                || self.replies.is_busy(pkg.id)
                || self
                    .ahead_failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&pkg.id)
            {
                continue;
            }
            let used = reply_files_size(store.scratch_dir());
            let bound = stream_codec::reply_size_bound(pkg.size);
            if used + bound > AHEAD_DISK_MAX {
                tracing::debug!(endpoint = %self.name, till = pkg.pos, package = pkg.id, used, bound,
                    "not encoding ahead: the reply files would pass the disk budget; encoded on request if asked before");
                return false;
            }
            let _gate = AHEAD_GATE.lock().unwrap_or_else(|p| p.into_inner());
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            let t0 = std::time::Instant::now();
            let done = self.replies.encode_ahead(
                pkg.id,
                &path,
                |out| Self::write_big_reply(store, &pkg, Some(stop), out),
                || crate::failpoint::crash_point("reply-ahead-before-rename"),
            );
            match done {
                Ok(Some(len)) => {
                    tracing::info!(endpoint = %self.name, link = %pkg.link, till = pkg.pos, package = pkg.id, place, bytes = pkg.size, reply_bytes = len,
                        encode_ms = t0.elapsed().as_millis() as u64, "encoded the reply of a big package ahead of the till's request");
                    // Acknowledged while it was encoding: nothing would remove the file.
                    if !store.is_pending(pkg.id).unwrap_or(true) {
                        let _ = std::fs::remove_file(&path);
                    }
                    return true;
                }
                Ok(None) => {} // ready meanwhile, or a request is encoding it
                Err(_) if stop.load(Ordering::Relaxed) => return false,
                Err(e) => {
                    if store.is_pending(pkg.id).unwrap_or(true) {
                        tracing::warn!(endpoint = %self.name, till = pkg.pos, package = pkg.id,
                            "cannot encode the reply of {} ahead ({e}); it will be encoded when the till asks", pkg.describe());
                        self.ahead_failed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(pkg.id);
                    }
                    // else: acknowledged meanwhile, its spool file is gone; nothing to do.
                }
            }
        }
        false
    }

    /// The background encoder of big replies: runs [`Self::encode_ahead_step`] whenever
    /// something may have changed (a package queued towards the tills, a till's
    /// acknowledgement, every [`AHEAD_RESCAN`]) until `stop` is set.
    async fn encode_ahead(
        self: Arc<Self>,
        store: Arc<Store>,
        stop: Arc<AtomicBool>,
        stopped: Arc<tokio::sync::Notify>,
    ) {
        let mut queued = store.watch_down();
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let (ep, s, st) = (self.clone(), store.clone(), stop.clone());
            let more = tokio::task::spawn_blocking(move || ep.encode_ahead_step(&s, &st))
                .await
                .unwrap_or(false);
            if more {
                continue;
            }
            tokio::select! {
                r = queued.changed() => {
                    if r.is_err() {
                        tokio::time::sleep(AHEAD_RESCAN).await;
                    }
                }
                _ = self.ahead_wake.notified() => {}
                _ = stopped.notified() => {}
                _ = tokio::time::sleep(AHEAD_RESCAN) => {}
            }
        }
    }

    /// Stores a decoded, spooled report durably (group commit with the reports other tills
    /// push at the same moment), or says it is a repeat. Returns whether it was stored, and
    /// the reply.
    async fn store_report(
        &self,
        store: &Arc<Store>,
        c: &Checked,
        uid: Option<&str>,
        spooled: Spooled,
    ) -> Result<(bool, Response), crate::store::StoreError> {
        let (pos, number) = (c.pos, c.number);
        let bytes = spooled.size;
        let source_name = match uid {
            Some(u) => format!("SendData/{pos}/{number}/{u}"),
            None => format!("SendData/{pos}/{number}"),
        };
        let outcome = store
            .commit_report(NewReport {
                link: c.link.clone(),
                pos,
                uid: uid.map(str::to_string),
                source_endpoint: self.name.clone(),
                source_name,
                number,
                sink_endpoint: c.office.clone(),
                spooled,
            })
            .await?;
        match outcome {
            ReportOutcome::Repeat { id } => {
                tracing::info!(endpoint = %self.name, till = pos, number, package = id, "SendData repeated with the same content; nothing stored");
                Ok((
                    false,
                    send_reply(
                        StatusCode::OK,
                        errcode::ALREADY,
                        format!("ККМ {pos}, пакет {number}: пакет с этим номером уже обработан"),
                    ),
                ))
            }
            ReportOutcome::Stored { id, number_reused } => {
                if number_reused {
                    tracing::warn!(endpoint = %self.name, till = pos, number, package = id, "SendData: the same number with different content; stored as a new report (till counter reset?)");
                }
                tracing::info!(endpoint = %self.name, link = %c.link, till = pos, number, package = id, bytes, uid = ?uid, "report taken");
                Ok((true, json_bytes_response(StatusCode::OK, accepted_reply())))
            }
        }
    }

    /// Builds the router: `{prefix}/{POS}/{PackageNo}` and
    /// `{prefix}/SendData/{POS}/{PackageNo}[/{UID}]`.
    pub fn router(self: &Arc<Self>, store: Arc<Store>, on_report: OnReport) -> Router {
        let state = AppState {
            ep: self.clone(),
            store,
            on_report,
        };
        let inner = Router::new()
            .route("/{pos}/{number}", get(receive_data))
            .route("/SendData/{pos}/{number}", post(send_data))
            .route("/SendData/{pos}/{number}/{uid}", post(send_data))
            .fallback(not_found)
            .layer(DefaultBodyLimit::disable())
            .layer(axum::middleware::from_fn_with_state(self.clone(), observe))
            .with_state(state);
        let prefix = self.config.prefix.trim_end_matches('/');
        if prefix.is_empty() {
            inner
        } else {
            Router::new().nest(prefix, inner).fallback(not_found)
        }
    }

    /// Whether this endpoint serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves on `listener` (HTTPS when `tls_cert` is set) until `shutdown` completes;
    /// requests in flight finish first.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        store: Arc<Store>,
        on_report: OnReport,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        let app = self.router(store.clone(), on_report);
        // The background encoder of big replies lives as long as the service; it is
        // stopped (its encoding in progress abandoned, the temp file removed) and waited
        // for before this returns, so that nothing holds the store afterwards.
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::new(tokio::sync::Notify::new());
        let encoder = tokio::spawn(
            self.clone()
                .encode_ahead(store, stop.clone(), stopped.clone()),
        );
        let served = match &self.tls {
            None => {
                tracing::info!(endpoint = %self.name, %addr, prefix = %self.config.prefix, "serving KKMTransfer to tills (HTTP)");
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            Some(tls) => {
                tracing::info!(endpoint = %self.name, %addr, prefix = %self.config.prefix, "serving KKMTransfer to tills (HTTPS)");
                match crate::tls::TlsListener::new(listener, tls.clone(), self.name.clone()) {
                    Ok(listener) => {
                        axum::serve(listener, app)
                            .with_graceful_shutdown(shutdown)
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        stop.store(true, Ordering::Relaxed);
        stopped.notify_one();
        let _ = encoder.await;
        served
    }
}

/// The bytes of the encoded replies in `dir` (`reply-<id>.json`; temp files not counted).
fn reply_files_size(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("reply-"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Records each request in the live view: the till's last contact and the latency.
async fn observe(
    State(ep): State<Arc<HttpServerEndpoint>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(live) = ep.live.get().cloned() else {
        return next.run(req).await;
    };
    let t0 = std::time::Instant::now();
    let mut parts = req.uri().path().trim_start_matches('/').split('/');
    let first = parts.next().unwrap_or("");
    let pos = if first == "SendData" {
        parts.next()
    } else {
        Some(first)
    }
    .and_then(|p| p.parse::<u32>().ok());
    let resp = next.run(req).await;
    live.observe_request(&ep.name, t0.elapsed());
    if let Some(pos) = pos.filter(|&p| ep.routes.route(p).is_some()) {
        if resp.status().is_success() {
            live.till_contact(&ep.name, pos);
        }
    }
    resp
}

#[derive(Clone)]
struct AppState {
    ep: Arc<HttpServerEndpoint>,
    store: Arc<Store>,
    on_report: OnReport,
}

async fn not_found() -> Response {
    send_reply(
        StatusCode::NOT_FOUND,
        errcode::ERROR,
        "Неизвестный адрес: ожидается {prefix}/{ККМ}/{номер пакета} или {prefix}/SendData/{ККМ}/{номер пакета}[/{UID}]".into(),
    )
}

async fn receive_data(
    State(st): State<AppState>,
    Path((pos, number)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let c = match st.ep.check(Method::Receive, &headers, &pos, &number) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    if let Some(r) = st.ep.cached_reply(&st.store, c.pos, c.number) {
        return r;
    }
    let (ep, store) = (st.ep.clone(), st.store.clone());
    let (p, n) = (c.pos, c.number);
    match tokio::task::spawn_blocking(move || ep.receive_blocking(&store, c)).await {
        Ok(r) => r,
        Err(e) => receive_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            errcode::ERROR,
            format!("ККМ {p}, пакет {n}: внутренняя ошибка ({e})"),
        ),
    }
}

/// A UID as tills and 1C send it (a GUID, possibly in braces). Anything else (path
/// separators, control characters, kilobytes of text) is refused before it reaches the
/// journal.
fn valid_uid(u: &str) -> bool {
    (1..=64).contains(&u.len())
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'{' | b'}'))
}

/// Why a SendData body was not decoded.
enum BodyError {
    /// Refused with this message (after "ККМ n, пакет m: ").
    Refused(String),
    /// The store could not take it.
    Store(String),
}

impl From<StreamError> for BodyError {
    fn from(e: StreamError) -> BodyError {
        match e {
            StreamError::Json(e) => {
                BodyError::Refused(format!("тело запроса — неверная строка JSON ({e})"))
            }
            StreamError::Base64(e) => {
                BodyError::Refused(format!("данные не в формате base64 ({e})"))
            }
            StreamError::Codec(e) => BodyError::Refused(format!("неверный ZIP-архив ({e})")),
            StreamError::Io(e) => BodyError::Store(e.to_string()),
        }
    }
}

fn too_big(max: u64) -> BodyError {
    BodyError::Refused(format!("тело запроса больше max_body ({max} байт)"))
}

/// Reads the body frame by frame and decodes it into `sink`, stopping as soon as it
/// exceeds `max` bytes or `timeout` passes. The text is decoded here; the bytes go to
/// `sink` here too when `on_task` (small bodies, kept in memory), otherwise to a blocking
/// thread through a short queue (hashing and writing the spool file, which can block), so
/// that the two halves use two cores and the body never piles up in memory.
async fn read_body(
    body: Body,
    max: u64,
    timeout: std::time::Duration,
    mut sink: ReportSink,
    on_task: bool,
) -> Result<ReportSink, BodyError> {
    let timed_out = || {
        BodyError::Refused(format!(
            "тело запроса не пришло за body_timeout ({} с)",
            timeout.as_secs_f64()
        ))
    };
    let not_read = |e: axum::Error| BodyError::Refused(format!("тело запроса не прочитано ({e})"));
    let mut body = body;
    let mut text = TextDecoder::new();
    if on_task {
        let read = async {
            let mut raw = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.map_err(not_read)?.into_data() {
                    raw += data.len() as u64;
                    if raw > max {
                        return Err(too_big(max));
                    }
                    text.feed(&data, &mut |b| sink.put(b))?;
                }
            }
            text.finish(&mut |b| sink.put(b))?;
            Ok(sink)
        };
        return tokio::time::timeout(timeout, read)
            .await
            .unwrap_or_else(|_| Err(timed_out()));
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let worker = tokio::task::spawn_blocking(move || -> Result<ReportSink, StreamError> {
        while let Some(bytes) = rx.blocking_recv() {
            sink.put(&bytes)?;
        }
        Ok(sink)
    });
    let read = async {
        let mut raw = 0u64;
        let mut decoded: Vec<Vec<u8>> = Vec::new();
        fn keep(into: &mut Vec<Vec<u8>>) -> impl FnMut(&[u8]) -> Result<(), StreamError> + '_ {
            |b| {
                into.push(b.to_vec());
                Ok(())
            }
        }
        let mut ended = false;
        while !ended {
            match body.frame().await {
                None => {
                    let t = std::mem::take(&mut text);
                    t.finish(&mut keep(&mut decoded))?;
                    ended = true;
                }
                Some(frame) => {
                    if let Ok(data) = frame.map_err(not_read)?.into_data() {
                        raw += data.len() as u64;
                        if raw > max {
                            return Err(too_big(max));
                        }
                        text.feed(&data, &mut keep(&mut decoded))?;
                    }
                }
            }
            for bytes in decoded.drain(..) {
                if tx.send(bytes).await.is_err() {
                    // The sink stopped on an error; it says which below.
                    return Ok(());
                }
            }
        }
        Ok(())
    };
    let read = tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| Err(timed_out()));
    drop(tx);
    // Waited for even after a refusal, so that its files are gone before the reply.
    let sink = worker
        .await
        .map_err(|e| BodyError::Store(format!("the decoder failed: {e}")))?;
    read?;
    Ok(sink?)
}

/// What became of a decoded SendData body.
enum Outcome {
    Stored(bool, Response),
    Refused(String),
    Failed(String),
}

async fn send_data(
    State(st): State<AppState>,
    params: RawPathParams,
    req: axum::extract::Request,
) -> Response {
    // The parameters as borrowed strings and the headers by reference: `Path<HashMap>` and
    // `HeaderMap` extractors allocate a map (and clone every header) per request.
    let (mut pos, mut number, mut uid) = ("", "", None);
    for (k, v) in params.iter() {
        match k {
            "pos" => pos = v,
            "number" => number = v,
            "uid" => uid = Some(v),
            _ => {}
        }
    }
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let c = match st.ep.check(Method::Send, headers, pos, number) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let (pos, number) = (c.pos, c.number);
    if let Some(u) = &uid {
        if !valid_uid(u) {
            tracing::warn!(endpoint = %st.ep.name, till = pos, number, "SendData refused: malformed UID");
            return send_reply(
                StatusCode::OK,
                errcode::ERROR,
                format!("ККМ {pos}, пакет {number}: неверный UID (ожидаются до 64 символов: буквы, цифры, '-', '_', '{{', '}}')"),
            );
        }
    }
    let max = st.ep.config.max_body;
    let refuse = |msg: String| {
        tracing::warn!(endpoint = %st.ep.name, till = pos, number, "SendData refused: {msg}");
        send_reply(
            StatusCode::OK,
            errcode::ERROR,
            format!("ККМ {pos}, пакет {number}: {msg}"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return refuse(format!("тело запроса больше max_body ({max} байт)"));
    }
    let limit = st.ep.config.body_timeout;
    let internal = |e: &str| {
        tracing::error!(endpoint = %st.ep.name, till = pos, number, "SendData: cannot store the report: {e}");
        send_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            errcode::ERROR,
            format!("ККМ {pos}, пакет {number}: отчёт не сохранён, повторите позже (внутренняя ошибка хранилища)"),
        )
    };
    let sink = match st.store.spool_writer() {
        Ok(w) => ReportSink::new(w, st.store.scratch_dir(), max),
        Err(e) => return internal(&e.to_string()),
    };
    let on_task = declared.is_some_and(|n| n <= DECODE_ON_TASK_MAX);
    let sink = match read_body(body, max, limit, sink, on_task).await {
        Ok(d) => d,
        Err(BodyError::Refused(msg)) => return refuse(msg),
        Err(BodyError::Store(e)) => return internal(&e),
    };
    let link = c.link.clone();
    // Finishing the body: the unzip of a zipped one and the fsync of a spool file are
    // blocking work; a small plain report (the common case: inline, no fsync) is finished
    // right here.
    let cheap = on_task && !sink.is_zip();
    let finish = move || -> Result<Spooled, BodyError> {
        let unpacked = sink.finish().map_err(BodyError::from)?;
        if unpacked.len == 0 {
            return Err(BodyError::Refused(
                "пустой пакет (нет данных отчёта)".into(),
            ));
        }
        if unpacked.head.starts_with(ZIP_LOCAL) {
            // A report is text; a ZIP inside the ZIP is never one (and could be a bomb for
            // whoever unpacks it next).
            return Err(BodyError::Refused(
                "вложенный ZIP-архив: отчёт должен быть файлом, а не архивом".into(),
            ));
        }
        let t0 = std::time::Instant::now();
        let report = unpacked
            .writer
            .finish()
            .map_err(|e| BodyError::Store(e.to_string()))?;
        tracing::debug!(
            till = c.pos,
            number = c.number,
            bytes = report.size,
            fsync_ms = t0.elapsed().as_millis() as u64,
            "report spooled"
        );
        Ok(report)
    };
    let finished = if cheap {
        Ok(finish())
    } else {
        tokio::task::spawn_blocking(finish).await
    };
    let res = match finished {
        Ok(Ok(report)) => match st.ep.store_report(&st.store, &c, uid, report).await {
            Ok((stored, reply)) => Ok(Outcome::Stored(stored, reply)),
            Err(e) => Ok(Outcome::Failed(e.to_string())),
        },
        Ok(Err(BodyError::Refused(msg))) => Ok(Outcome::Refused(msg)),
        Ok(Err(BodyError::Store(e))) => Ok(Outcome::Failed(e)),
        Err(e) => Err(e),
    };
    match res {
        Ok(Outcome::Stored(stored, reply)) => {
            if stored {
                (st.on_report)(&link);
            }
            reply
        }
        Ok(Outcome::Refused(msg)) => refuse(msg),
        Ok(Outcome::Failed(e)) => internal(&e),
        Err(e) => send_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            errcode::ERROR,
            format!("ККМ {pos}, пакет {number}: внутренняя ошибка ({e})"),
        ),
    }
}
