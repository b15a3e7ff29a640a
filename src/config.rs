//! TOML → typed config. Every error names the file, the key and the reason, and the CLI
//! turns it into exit code 78 (EX_CONFIG).
//!
//! Relative paths are taken relative to the working directory the bridge runs in.
//! Secrets are `password = "..."` (warned about: clear text) or `password_env = "VAR"`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::package::{Direction, Kind, NamePattern};

/// A config that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub state_dir: PathBuf,
    pub endpoints: BTreeMap<String, EndpointConfig>,
    pub links: Vec<LinkConfig>,
    pub admin: Option<AdminConfig>,
    /// How long journal rows are kept (`retention`, default 90 days); `None` = forever
    /// (`retention = "0"`). Payloads are freed at delivery already; this prunes the audit
    /// trail of delivered packages. Undelivered packages are never pruned.
    pub retention: Option<Duration>,
    /// Things worth a warning at start (e.g. a password in clear text).
    pub warnings: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: PathBuf,
    #[serde(default)]
    endpoint: BTreeMap<String, EndpointConfig>,
    #[serde(default)]
    link: Vec<RawLink>,
    #[serde(default)]
    admin: Option<AdminConfig>,
    #[serde(default = "default_retention", deserialize_with = "de_duration")]
    retention: Duration,
}

/// 90 days of journal rows by default.
fn default_retention() -> Duration {
    Duration::from_secs(90 * 86_400)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    #[serde(default)]
    name: Option<String>,
    office: String,
    kassa: String,
    pos: String,
}

/// One link: an office-side endpoint, a kassa-side endpoint, and the tills it carries.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `name` if given, else "office→kassa".
    pub name: String,
    pub office: String,
    pub kassa: String,
    pub pos: PosSet,
}

impl LinkConfig {
    /// The endpoint that receives this link's packages going `direction`: the kassa side
    /// for price lists (down), the office side for reports (up).
    pub fn sink(&self, direction: Direction) -> &str {
        match direction {
            Direction::Down => &self.kassa,
            Direction::Up => &self.office,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum EndpointConfig {
    Dir(DirConfig),
    Http(HttpConfig),
    Ftp(FtpConfig),
    HttpClient(HttpClientConfig),
}

impl EndpointConfig {
    pub fn type_name(&self) -> &'static str {
        match self {
            EndpointConfig::Dir(_) => "dir",
            EndpointConfig::Http(_) => "http",
            EndpointConfig::Ftp(_) => "ftp",
            EndpointConfig::HttpClient(_) => "http-client",
        }
    }
}

/// The file-name patterns of an endpoint that speaks in files (dir, ftp).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Names {
    #[serde(default = "default_spr")]
    pub spr: String,
    #[serde(default = "default_flr")]
    pub flr: String,
    #[serde(default = "default_rep")]
    pub rep: String,
}

fn default_spr() -> String {
    "POS{pos}.spr".into()
}
fn default_flr() -> String {
    "POS{pos}.flr".into()
}
fn default_rep() -> String {
    "POS{pos}.rep".into()
}
fn yes() -> bool {
    true
}

impl Names {
    pub fn pattern(&self, kind: Kind) -> NamePattern {
        let s = match kind {
            Kind::Spr => &self.spr,
            Kind::Flr => &self.flr,
            Kind::Rep => &self.rep,
        };
        NamePattern::new(s).expect("patterns are checked when the config is loaded")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirConfig {
    pub path: PathBuf,
    #[serde(default = "yes")]
    pub numbered: bool,
    #[serde(default = "default_spr")]
    pub spr: String,
    #[serde(default = "default_flr")]
    pub flr: String,
    #[serde(default = "default_rep")]
    pub rep: String,
    #[serde(default = "default_settle", deserialize_with = "de_duration")]
    pub settle: Duration,
    #[serde(default)]
    pub archive: Option<PathBuf>,
    /// How often the daemon rescans even without filesystem events (network shares send none).
    #[serde(default = "default_rescan", deserialize_with = "de_duration")]
    pub rescan: Duration,
}

impl DirConfig {
    pub fn names(&self) -> Names {
        Names {
            spr: self.spr.clone(),
            flr: self.flr.clone(),
            rep: self.rep.clone(),
        }
    }
}

fn default_settle() -> Duration {
    Duration::from_secs(1)
}
fn default_rescan() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_auth")]
    pub auth: AuthMode,
    #[serde(default = "default_max_body", deserialize_with = "de_size")]
    pub max_body: u64,
    /// The longest a SendData body may take to arrive (slow-loris guard).
    #[serde(default = "default_body_timeout", deserialize_with = "de_duration")]
    pub body_timeout: Duration,
    #[serde(default)]
    pub user: Vec<UserConfig>,
    /// HTTPS: the server's certificate chain (PEM). Set together with `tls_key`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// HTTPS: the private key of `tls_cert` (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

fn default_prefix() -> String {
    "/hs/KKMTransfer".into()
}
fn default_auth() -> AuthMode {
    AuthMode::Basic
}
fn default_max_body() -> u64 {
    64 << 20
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Basic,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub login: String,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// `password` or the value of `password_env`, filled in when the config is loaded.
    #[serde(skip)]
    pub secret: Option<Secret>,
    pub pos: String,
    /// Filled in when the config is loaded.
    #[serde(skip)]
    pub pos_set: PosSet,
}

/// A password. Its Debug and Display never show it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}
impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FtpConfig {
    pub url: String,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// `password` or the value of `password_env`, filled in when the config is loaded.
    #[serde(skip)]
    pub secret: Option<Secret>,
    #[serde(default = "yes")]
    pub numbered: bool,
    #[serde(default = "default_spr")]
    pub spr: String,
    #[serde(default = "default_flr")]
    pub flr: String,
    #[serde(default = "default_rep")]
    pub rep: String,
    #[serde(default = "default_poll", deserialize_with = "de_duration")]
    pub poll: Duration,
    #[serde(default = "yes")]
    pub passive: bool,
    #[serde(default = "default_tls")]
    pub tls: String,
    /// FTPS: an extra trusted certificate (PEM): the server's own self-signed one, or the
    /// CA that signed it. The built-in webpki roots are trusted too.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// FTPS: accept any server certificate. A last resort; warned about at start.
    #[serde(default)]
    pub tls_insecure: bool,
    #[serde(default = "default_connections")]
    pub connections: u32,
    #[serde(default = "default_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
}

impl FtpConfig {
    pub fn names(&self) -> Names {
        Names {
            spr: self.spr.clone(),
            flr: self.flr.clone(),
            rep: self.rep.clone(),
        }
    }
}

fn default_poll() -> Duration {
    Duration::from_secs(2)
}
fn default_tls() -> String {
    "none".into()
}
fn default_connections() -> u32 {
    2
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpClientConfig {
    pub url: String,
    #[serde(default)]
    pub login: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// `password` or the value of `password_env`, filled in when the config is loaded.
    #[serde(skip)]
    pub secret: Option<Secret>,
    #[serde(default = "default_client_poll", deserialize_with = "de_duration")]
    pub poll: Duration,
    #[serde(default)]
    pub report_zip: bool,
    #[serde(default = "default_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
}

fn default_client_poll() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    #[serde(default)]
    pub login: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// `password` or the value of `password_env`, filled in when the config is loaded.
    #[serde(skip)]
    pub secret: Option<Secret>,
}

/// Resolves `password = "..."` or `password_env = "VAR"` (the variable's value).
fn resolve_secret(
    password: &Option<Secret>,
    password_env: &Option<String>,
) -> Result<Option<Secret>, String> {
    {
        match (password, password_env) {
            (Some(_), Some(_)) => Err("set either password or password_env, not both".into()),
            (Some(p), None) => Ok(Some(p.clone())),
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(Some(Secret(v))),
                Ok(_) => Err(format!("environment variable {var} is empty")),
                Err(_) => Err(format!("environment variable {var} is not set")),
            },
            (None, None) => Ok(None),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Till sets: "7", "1-20", "1,3,5-9".
// ---------------------------------------------------------------------------------------

/// A set of till numbers as sorted, merged inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PosSet {
    ranges: Vec<(u32, u32)>,
}

impl PosSet {
    pub fn parse(s: &str) -> Result<PosSet, String> {
        let mut ranges = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!(
                    "{s:?}: empty item; write e.g. \"7\", \"1-20\" or \"1,3,5-9\""
                ));
            }
            let num = |t: &str| -> Result<u32, String> {
                t.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("{s:?}: {t:?} is not a till number"))
            };
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let n = num(part)?;
                    (n, n)
                }
            };
            if a > b {
                return Err(format!("{s:?}: range {a}-{b} runs backwards"));
            }
            ranges.push((a, b));
        }
        ranges.sort();
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        Ok(PosSet { ranges: merged })
    }

    pub fn contains(&self, pos: u32) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= pos && pos <= b)
    }

    pub fn overlaps(&self, other: &PosSet) -> Option<u32> {
        for &(a, b) in &self.ranges {
            for &(c, d) in &other.ranges {
                if a <= d && c <= b {
                    return Some(a.max(c));
                }
            }
        }
        None
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|&(a, b)| a..=b)
    }

    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|&(a, b)| (b - a) as u64 + 1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

impl fmt::Display for PosSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(a, b)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Durations ("500ms", "1s", "2m", "1h") and sizes ("64MiB", "10MB", "1024").
// ---------------------------------------------------------------------------------------

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. \"500ms\", \"1s\", \"2m\""))?;
    let secs = match unit.trim() {
        "ms" => v / 1000.0,
        "s" | "" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        "d" => v * 86_400.0,
        u => return Err(format!("{s:?}: unknown unit {u:?}; use ms, s, m, h or d")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. \"64MiB\""))?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?}; use B, KiB, MiB, GiB, KB, MB, GB"
            ))
        }
    };
    v.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(n),
        Raw::S(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

// ---------------------------------------------------------------------------------------
// Loading and checking.
// ---------------------------------------------------------------------------------------

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "-".into(),
            reason: format!("cannot read the config file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().map(|s| line_of(text, s.start));
            ConfigError {
                file: file.clone(),
                key: span
                    .map(|l| format!("line {l}"))
                    .unwrap_or_else(|| "-".into()),
                reason: e.message().trim().to_string(),
            }
        })?;
        let err = |key: String, reason: String| ConfigError {
            file: file.clone(),
            key,
            reason,
        };
        let mut warnings = Vec::new();
        let mut endpoints = raw.endpoint;

        for (name, ep) in endpoints.iter_mut() {
            let key = format!("endpoint.{name}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_alphanumeric() || "-_".contains(c))
            {
                return Err(err(
                    key,
                    "endpoint names use letters, digits, '-' and '_'".into(),
                ));
            }
            let names = match ep {
                EndpointConfig::Dir(d) => Some(d.names()),
                EndpointConfig::Ftp(f) => Some(f.names()),
                _ => None,
            };
            if let Some(names) = names {
                for (k, p) in [
                    ("spr", &names.spr),
                    ("flr", &names.flr),
                    ("rep", &names.rep),
                ] {
                    NamePattern::new(p).map_err(|r| err(format!("{key}.{k}"), r))?;
                }
                let pats = [&names.spr, &names.flr, &names.rep];
                if pats[0] == pats[1] || pats[1] == pats[2] || pats[0] == pats[2] {
                    return Err(err(key, "spr, flr and rep patterns must differ".into()));
                }
            }
            match ep {
                EndpointConfig::Dir(d) => {
                    if d.path.as_os_str().is_empty() {
                        return Err(err(format!("{key}.path"), "must not be empty".into()));
                    }
                    if d.archive.as_deref() == Some(d.path.as_path()) {
                        return Err(err(
                            format!("{key}.archive"),
                            "must differ from path".into(),
                        ));
                    }
                }
                EndpointConfig::Http(h) => {
                    if !h.prefix.starts_with('/') || h.prefix.ends_with('/') && h.prefix.len() > 1 {
                        return Err(err(
                            format!("{key}.prefix"),
                            format!("{:?} must start with '/' and not end with '/'", h.prefix),
                        ));
                    }
                    match (&h.tls_cert, &h.tls_key) {
                        (Some(_), None) => return Err(err(
                            format!("{key}.tls_key"),
                            "tls_cert is set: set tls_key too (the certificate's private key, PEM)"
                                .into(),
                        )),
                        (None, Some(_)) => {
                            return Err(err(
                                format!("{key}.tls_cert"),
                                "tls_key is set: set tls_cert too (the certificate, PEM)".into(),
                            ))
                        }
                        (Some(c), Some(k)) => {
                            check_readable(c).map_err(|r| err(format!("{key}.tls_cert"), r))?;
                            check_readable(k).map_err(|r| err(format!("{key}.tls_key"), r))?;
                        }
                        (None, None) => {}
                    }
                    if h.auth == AuthMode::Basic && h.user.is_empty() {
                        return Err(err(
                            format!("{key}.user"),
                            "auth = \"basic\" needs at least one [[endpoint.NAME.user]]; \
                             write auth = \"none\" to serve without a password"
                                .into(),
                        ));
                    }
                    for (i, u) in h.user.iter_mut().enumerate() {
                        let ukey = format!("{key}.user[{i}]");
                        u.pos_set =
                            PosSet::parse(&u.pos).map_err(|r| err(format!("{ukey}.pos"), r))?;
                        match resolve_secret(&u.password, &u.password_env) {
                            Ok(Some(sec)) => u.secret = Some(sec),
                            Ok(None) => {
                                return Err(err(ukey, "needs password or password_env".into()))
                            }
                            Err(r) => return Err(err(ukey, r)),
                        }
                        if u.password.is_some() {
                            warnings.push(format!(
                                "{file}: {ukey}.password is in clear text; prefer password_env"
                            ));
                        }
                    }
                }
                EndpointConfig::Ftp(f) => {
                    if !f.url.starts_with("ftp://") {
                        return Err(err(
                            format!("{key}.url"),
                            format!("{:?} must start with ftp://", f.url),
                        ));
                    }
                    if f.connections == 0 {
                        return Err(err(
                            format!("{key}.connections"),
                            "must be at least 1".into(),
                        ));
                    }
                    if !matches!(f.tls.as_str(), "none" | "explicit") {
                        return Err(err(
                            format!("{key}.tls"),
                            format!("{:?}: use \"none\" or \"explicit\"", f.tls),
                        ));
                    }
                    if f.tls == "none" {
                        if f.tls_ca.is_some() {
                            return Err(err(
                                format!("{key}.tls_ca"),
                                "only with tls = \"explicit\"".into(),
                            ));
                        }
                        if f.tls_insecure {
                            return Err(err(
                                format!("{key}.tls_insecure"),
                                "only with tls = \"explicit\"".into(),
                            ));
                        }
                    }
                    if let Some(ca) = &f.tls_ca {
                        if f.tls_insecure {
                            return Err(err(
                                format!("{key}.tls_insecure"),
                                "set either tls_ca or tls_insecure, not both".into(),
                            ));
                        }
                        check_readable(ca).map_err(|r| err(format!("{key}.tls_ca"), r))?;
                    }
                    if f.tls_insecure {
                        warnings.push(format!(
                            "{file}: {key}.tls_insecure = true: the FTP server's certificate is \
                             not checked, so whoever answers at that address gets the password \
                             and the packages; prefer tls_ca with the server's certificate"
                        ));
                    }
                    f.secret = resolve_secret(&f.password, &f.password_env)
                        .map_err(|r| err(key.clone(), r))?;
                    if f.password.is_some() {
                        warnings.push(format!(
                            "{file}: {key}.password is in clear text; prefer password_env"
                        ));
                    }
                }
                EndpointConfig::HttpClient(c) => {
                    if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
                        return Err(err(
                            format!("{key}.url"),
                            format!("{:?} must start with http:// or https://", c.url),
                        ));
                    }
                    c.secret = resolve_secret(&c.password, &c.password_env)
                        .map_err(|r| err(key.clone(), r))?;
                }
            }
        }

        let mut links: Vec<LinkConfig> = Vec::new();
        for (i, l) in raw.link.into_iter().enumerate() {
            let key = format!("link[{i}]");
            let pos = PosSet::parse(&l.pos).map_err(|r| err(format!("{key}.pos"), r))?;
            for (side, ep_name) in [("office", &l.office), ("kassa", &l.kassa)] {
                let Some(ep) = endpoints.get(ep_name) else {
                    return Err(err(
                        format!("{key}.{side}"),
                        format!("no endpoint named {ep_name:?} (define [endpoint.{ep_name}])"),
                    ));
                };
                let ok = !matches!(
                    (side, ep),
                    ("office", EndpointConfig::Http(_)) | ("kassa", EndpointConfig::HttpClient(_))
                );
                if !ok {
                    return Err(err(
                        format!("{key}.{side}"),
                        format!(
                            "endpoint {ep_name:?} of type {:?} cannot be the {side} side",
                            ep.type_name()
                        ),
                    ));
                }
            }
            if l.office == l.kassa {
                return Err(err(
                    key,
                    "office and kassa must be different endpoints".into(),
                ));
            }
            let name = l
                .name
                .unwrap_or_else(|| format!("{}-{}", l.office, l.kassa));
            if links.iter().any(|o| o.name == name) {
                return Err(err(
                    format!("{key}.name"),
                    format!("link name {name:?} is used twice"),
                ));
            }
            for (j, o) in links.iter().enumerate() {
                for (ep, side) in [(&l.office, "office"), (&l.kassa, "kassa")] {
                    let other_side = if &o.office == ep {
                        Some("office")
                    } else if &o.kassa == ep {
                        Some("kassa")
                    } else {
                        None
                    };
                    match other_side {
                        Some(os) if os != side => {
                            return Err(err(
                                format!("{key}.{side}"),
                                format!(
                                    "endpoint {ep:?} is the {os} side of link[{j}]; \
                                     an endpoint plays one role only"
                                ),
                            ))
                        }
                        Some(_) => {
                            if let Some(p) = pos.overlaps(&o.pos) {
                                return Err(err(
                                    format!("{key}.pos"),
                                    format!(
                                        "till {p} of endpoint {ep:?} is also in link[{j}]; \
                                         links must not overlap"
                                    ),
                                ));
                            }
                        }
                        None => {}
                    }
                }
            }
            links.push(LinkConfig {
                name,
                office: l.office,
                kassa: l.kassa,
                pos,
            });
        }
        if links.is_empty() {
            return Err(err("link".into(), "at least one [[link]] is needed".into()));
        }
        let mut admin = raw.admin;
        if let Some(a) = &mut admin {
            a.secret =
                resolve_secret(&a.password, &a.password_env).map_err(|r| err("admin".into(), r))?;
            if a.login.is_some() != a.secret.is_some() {
                return Err(err(
                    "admin".into(),
                    "set login together with password or password_env (or neither, for an \
                     admin listener without a password on a trusted address)"
                        .into(),
                ));
            }
            if a.password.is_some() {
                warnings.push(format!(
                    "{file}: admin.password is in clear text; prefer password_env"
                ));
            }
        }
        Ok(Config {
            file: path.to_path_buf(),
            state_dir: raw.state_dir,
            endpoints,
            links,
            admin,
            retention: (!raw.retention.is_zero()).then_some(raw.retention),
            warnings,
        })
    }
}

/// A file the config names must be readable now (its content is checked where it is used).
fn check_readable(path: &Path) -> Result<(), String> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    const GOOD: &str = r#"
state_dir = "var/state"
[endpoint.office]
type = "dir"
path = "var/office"
[endpoint.shop1]
type = "dir"
path = "var/shop1"
numbered = false
settle = "250ms"
[[link]]
office = "office"
kassa = "shop1"
pos = "1-20"
"#;

    #[test]
    fn the_issue_example_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        let EndpointConfig::Dir(d) = &c.endpoints["office"] else {
            panic!()
        };
        assert!(d.numbered);
        assert_eq!(d.spr, "POS{pos}.spr");
        assert_eq!(d.settle, Duration::from_secs(1));
        let EndpointConfig::Dir(k) = &c.endpoints["shop1"] else {
            panic!()
        };
        assert!(!k.numbered);
        assert_eq!(k.settle, Duration::from_millis(250));
        assert_eq!(c.links[0].pos.len(), 20);
    }

    #[test]
    fn unknown_keys_are_refused_with_file_and_line() {
        let e = parse(&GOOD.replace("numbered = false", "numberd = false")).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("test.toml: line "), "{s}");
        assert!(s.contains("numberd"), "{s}");
        let e = parse(&format!("{GOOD}\nfoo = 1\n")).unwrap_err();
        assert!(e.to_string().contains("foo"), "{e}");
    }

    #[test]
    fn missing_endpoint_is_named() {
        let e = parse(&GOOD.replace("kassa = \"shop1\"", "kassa = \"shop2\"")).unwrap_err();
        assert_eq!(e.key, "link[0].kassa");
        assert!(e.reason.contains("shop2"));
    }

    #[test]
    fn overlapping_links_are_refused() {
        let s = format!("{GOOD}\n[[link]]\nname=\"b\"\noffice = \"office\"\nkassa = \"shop1\"\npos = \"20-30\"\n");
        let e = parse(&s).unwrap_err();
        assert_eq!(e.key, "link[1].pos");
        assert!(e.reason.contains("till 20"), "{e}");
    }

    #[test]
    fn bad_patterns_are_refused() {
        let e = parse(&GOOD.replace("numbered = false", "spr = \"POS.spr\"")).unwrap_err();
        assert_eq!(e.key, "endpoint.shop1.spr");
    }

    #[test]
    fn pos_sets() {
        let p = PosSet::parse("1,3,5-9").unwrap();
        assert_eq!(p.iter().collect::<Vec<_>>(), [1, 3, 5, 6, 7, 8, 9]);
        assert_eq!(p.to_string(), "1,3,5-9");
        assert!(PosSet::parse("9-5").is_err());
        assert!(PosSet::parse("a").is_err());
        assert!(PosSet::parse("1,,2").is_err());
        assert_eq!(PosSet::parse("1-3,2-5").unwrap().to_string(), "1-5");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("2 weeks").is_err());
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert!(parse_size("64XB").is_err());
    }

    #[test]
    fn secrets_come_from_the_environment_and_never_print() {
        let s = r#"
state_dir = "s"
[endpoint.o]
type = "dir"
path = "o"
[endpoint.tills]
type = "http"
listen = "127.0.0.1:0"
[[endpoint.tills.user]]
login = "kassa"
password_env = "KKM_TEST_UNSET_VAR_FOR_CONFIG"
pos = "1-2"
[[link]]
office = "o"
kassa = "tills"
pos = "1-2"
"#;
        let e = parse(s).unwrap_err();
        assert!(e.reason.contains("KKM_TEST_UNSET_VAR_FOR_CONFIG"), "{e}");
        let c = parse(&s.replace(
            "password_env = \"KKM_TEST_UNSET_VAR_FOR_CONFIG\"",
            "password = \"hunter2\"",
        ))
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.warnings.len(), 1);
    }

    #[test]
    fn retention_defaults_to_90_days_and_zero_keeps_forever() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.retention, Some(Duration::from_secs(90 * 86_400)));
        let c = parse(&format!("retention = \"30d\"\n{GOOD}")).unwrap();
        assert_eq!(c.retention, Some(Duration::from_secs(30 * 86_400)));
        let c = parse(&format!("retention = \"0\"\n{GOOD}")).unwrap();
        assert_eq!(c.retention, None);
        let e = parse(&format!("retention = \"30 days\"\n{GOOD}")).unwrap_err();
        assert!(
            e.to_string().contains("retention") || e.key.starts_with("line"),
            "{e}"
        );
    }

    #[test]
    fn admin_listener_with_password_env() {
        std::env::set_var("KKM_TEST_ADMIN_PW", "s3cret");
        let c = parse(&format!(
            "{GOOD}\n[admin]\nlisten = \"127.0.0.1:9180\"\nlogin = \"it\"\npassword_env = \"KKM_TEST_ADMIN_PW\"\n"
        ))
        .unwrap();
        let a = c.admin.unwrap();
        assert_eq!(a.listen.port(), 9180);
        assert_eq!(a.secret.unwrap().expose(), "s3cret");
        let e = parse(&format!(
            "{GOOD}\n[admin]\nlisten = \"127.0.0.1:9180\"\nlogin = \"it\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "admin");
        assert!(
            parse(&format!("{GOOD}\n[admin]\nlisten = \"127.0.0.1:9180\"\n"))
                .unwrap()
                .admin
                .is_some()
        );
    }
}
