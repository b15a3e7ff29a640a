//! `kkm-bridge check`: reaches every configured endpoint once, before the shop opens.
//!
//! One line per endpoint, `ok` or `FAIL`, never a password. What is tried:
//! - `dir`: create a temp file (the bridge's own temp name, which no reader matches) in the
//!   directory and delete it; a missing directory is fine when it can be created.
//! - `http`: bind the listen address and release it at once (fails while `run` serves it);
//!   with `tls_cert`/`tls_key`, also load the certificate and key.
//! - `ftp`: a plain FTP dialogue over TCP: the 220 greeting, USER/PASS, TYPE I, CWD to the
//!   URL's path, PASV and NLST (the listing the bridge polls), QUIT. Nothing is written.
//!   With `tls = "explicit"` the bridge's own FTPS client does the same: AUTH TLS (the
//!   certificate checked as `run` checks it), PBSZ/PROT P, login, TYPE I, CWD, NLST over
//!   the protected data connection.
//! - `http-client`: TCP connect, then `HEAD` of the configured URL itself (never a
//!   ReceiveData/SendData path: a GET of `{url}/{pos}/{n}` could acknowledge a package at
//!   the back office). Any HTTP answer counts as reachable except 401/403 (login refused).
//!   For `https://` only the TCP connect is checked (no TLS stack in this build).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::{Config, EndpointConfig, FtpConfig, HttpClientConfig, Secret};

/// The result of checking one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub endpoint: String,
    /// "dir var/office", "ftp 127.0.0.1:2121", …
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

impl std::fmt::Display for CheckLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<4} {} ({}): {}",
            if self.ok { "ok" } else { "FAIL" },
            self.endpoint,
            self.what,
            self.detail
        )
    }
}

/// Checks every endpoint of the config, in name order.
pub async fn check_all(config: &Config) -> Vec<CheckLine> {
    let mut out = Vec::new();
    for (name, ep) in &config.endpoints {
        out.push(check_endpoint(name, ep).await);
    }
    out
}

pub async fn check_endpoint(name: &str, ep: &EndpointConfig) -> CheckLine {
    let (what, r) = match ep {
        EndpointConfig::Dir(d) => (
            format!("dir {}", d.path.display()),
            check_dir(&d.path).await,
        ),
        EndpointConfig::Http(h) => (
            format!(
                "{} {}",
                if h.tls_cert.is_some() {
                    "https"
                } else {
                    "http"
                },
                h.listen
            ),
            check_http(h).await,
        ),
        EndpointConfig::Ftp(f) if f.tls == "explicit" => match FtpUrl::parse(&f.url) {
            Ok(u) => (format!("ftps {}:{}", u.host, u.port), check_ftps(f).await),
            Err(e) => ("ftps".into(), Err(e)),
        },
        EndpointConfig::Ftp(f) => match FtpUrl::parse(&f.url) {
            Ok(u) => (format!("ftp {}:{}", u.host, u.port), check_ftp(f, &u).await),
            Err(e) => ("ftp".into(), Err(e)),
        },
        EndpointConfig::HttpClient(c) => match HttpUrl::parse(&c.url) {
            Ok(u) => (
                format!("http-client {}:{}", u.host, u.port),
                check_http_client(c, &u).await,
            ),
            Err(e) => ("http-client".into(), Err(e)),
        },
    };
    let (ok, detail) = match r {
        Ok(d) => (true, d),
        Err(e) => (false, e),
    };
    CheckLine {
        endpoint: name.to_string(),
        what,
        ok,
        detail,
    }
}

async fn check_dir(path: &Path) -> Result<String, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        // The nearest existing directory: the bridge creates a missing exchange directory.
        let mut probe_dir = path.clone();
        let mut missing = false;
        while !probe_dir.is_dir() {
            missing = true;
            if probe_dir.exists() {
                return Err(format!("{} is not a directory", probe_dir.display()));
            }
            match probe_dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => probe_dir = p.to_path_buf(),
                _ => {
                    probe_dir = std::path::PathBuf::from(".");
                    break;
                }
            }
        }
        let tmp = probe_dir.join(crate::package::temp_name());
        std::fs::write(&tmp, b"kkm-bridge check\n")
            .map_err(|e| format!("cannot write in {}: {e}", probe_dir.display()))?;
        std::fs::remove_file(&tmp)
            .map_err(|e| format!("wrote but cannot delete {}: {e}", tmp.display()))?;
        if missing {
            Ok(format!(
                "does not exist yet; {} is writable, so it will be created",
                probe_dir.display()
            ))
        } else {
            Ok("writable".into())
        }
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

async fn check_http(h: &crate::config::HttpConfig) -> Result<String, String> {
    let free = check_listen(h.listen).await?;
    match (&h.tls_cert, &h.tls_key) {
        (Some(cert), Some(key)) => {
            crate::tls::server_config(cert, key)?;
            Ok(format!("{free}; TLS certificate and key load"))
        }
        _ => Ok(free),
    }
}

/// FTPS with the endpoint's own client: the same handshake and trust as `run`.
async fn check_ftps(cfg: &FtpConfig) -> Result<String, String> {
    use crate::endpoint::ftp;
    let target = ftp::Target::parse(&cfg.url, cfg.secret.as_ref().map(|s| s.expose()))?;
    let tls = ftp::tls_connector(cfg)?;
    let limit = cfg.timeout.min(Duration::from_secs(30));
    let work = async {
        let mut f = ftp::open(&target, cfg, tls.as_ref())
            .await
            .map_err(|e| format!("{e:#}"))?;
        let entries = f
            .nlst(None)
            .await
            .map_err(|e| format!("TLS handshake and login ok, but the listing failed: {e}"))?
            .len();
        let _ = f.quit().await;
        Ok::<_, String>(entries)
    };
    let entries = timeout(limit * 4, work)
        .await
        .map_err(|_| format!("no answer within {}s", (limit * 4).as_secs()))??;
    Ok(format!(
        "TLS handshake ok{}, login as {} ok, binary mode, {entries} entr{} listed in /{} (protected data connection)",
        if cfg.tls_insecure { " (certificate NOT checked: tls_insecure)" } else { "" },
        target.user,
        if entries == 1 { "y" } else { "ies" },
        target.dir
    ))
}

async fn check_listen(addr: std::net::SocketAddr) -> Result<String, String> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            drop(l);
            Ok("listen address is free".into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(format!(
            "address in use (is `kkm-bridge run` already running, or another service?): {e}"
        )),
        Err(e) => Err(format!("cannot listen: {e}")),
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

async fn connect(host: &str, port: u16, limit: Duration) -> Result<TcpStream, String> {
    match timeout(limit, TcpStream::connect((host, port))).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
            _ => format!("cannot connect: {e}"),
        }),
        Err(_) => Err(format!("no answer within {}s", limit.as_secs())),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `ftp://[user[:password]@]host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FtpUrl {
    pub user: Option<String>,
    pub password: Option<String>,
    pub host: String,
    pub port: u16,
    pub path: String,
}

fn split_authority(rest: &str) -> (Option<String>, Option<String>, &str, &str) {
    let (auth, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (user, pass, hostport) = match auth.rsplit_once('@') {
        Some((ui, hp)) => match ui.split_once(':') {
            Some((u, p)) => (Some(percent_decode(u)), Some(percent_decode(p)), hp),
            None => (Some(percent_decode(ui)), None, hp),
        },
        None => (None, None, auth),
    };
    (user, pass, hostport, path)
}

fn host_port(hp: &str, default: u16) -> Result<(String, u16), String> {
    // [v6]:port, host:port, host
    if let Some(rest) = hp.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("bad IPv6 address in URL")?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
            None => default,
        };
        return Ok((h.to_string(), port));
    }
    match hp.rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_string(),
            p.parse().map_err(|_| format!("bad port {p:?}"))?,
        )),
        None if hp.is_empty() => Err("no host in URL".into()),
        None => Ok((hp.to_string(), default)),
    }
}

impl FtpUrl {
    pub fn parse(url: &str) -> Result<FtpUrl, String> {
        let rest = url
            .strip_prefix("ftp://")
            .ok_or("URL must start with ftp://")?;
        let (user, password, hp, path) = split_authority(rest);
        let (host, port) = host_port(hp, 21)?;
        Ok(FtpUrl {
            user,
            password,
            host,
            port,
            path: percent_decode(path),
        })
    }
}

/// Reads one FTP reply (multi-line aware): its code and last line.
async fn ftp_reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<(u16, String), String> {
    let mut first_code: Option<String> = None;
    loop {
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .await
            .map_err(|e| format!("connection lost: {e}"))?;
        if n == 0 {
            return Err("server closed the connection".into());
        }
        let line = line.trim_end().to_string();
        if line.len() < 3 || !line.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
            if first_code.is_some() {
                continue; // body of a multi-line reply
            }
            return Err(format!("not an FTP server (said {line:?})"));
        }
        let code = &line[..3];
        let sep = line.as_bytes().get(3).copied();
        match &first_code {
            None if sep == Some(b'-') => first_code = Some(code.to_string()),
            Some(c) if c != code || sep != Some(b' ') => continue,
            _ => {
                let code_n = code.parse().unwrap_or(0);
                return Ok((code_n, line));
            }
        }
    }
}

async fn check_ftp(cfg: &FtpConfig, url: &FtpUrl) -> Result<String, String> {
    let limit = cfg.timeout.min(Duration::from_secs(30));
    timeout(limit * 4, ftp_dialogue(cfg, url, limit))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", (limit * 4).as_secs())))
}

async fn ftp_dialogue(cfg: &FtpConfig, url: &FtpUrl, limit: Duration) -> Result<String, String> {
    let stream = connect(&url.host, url.port, limit.min(CONNECT_TIMEOUT)).await?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    macro_rules! cmd {
        ($line:expr, $shown:expr) => {{
            wr.write_all(format!("{}\r\n", $line).as_bytes())
                .await
                .map_err(|e| format!("{}: connection lost: {e}", $shown))?;
            let (code, text) = timeout(limit, ftp_reply(&mut rd))
                .await
                .map_err(|_| format!("{}: no reply within {}s", $shown, limit.as_secs()))??;
            (code, text)
        }};
    }
    let (code, text) = timeout(limit, ftp_reply(&mut rd))
        .await
        .map_err(|_| "no greeting".to_string())??;
    if code != 220 {
        return Err(format!("greeting: {text}"));
    }
    let user = url.user.clone().unwrap_or_else(|| "anonymous".into());
    let password: Option<Secret> = cfg
        .secret
        .clone()
        .or_else(|| url.password.clone().map(Secret::new));
    let (code, text) = cmd!(format!("USER {user}"), "USER");
    let code = if code == 331 {
        let pass = password
            .as_ref()
            .map(|p| p.expose().to_string())
            .unwrap_or_default();
        let (c, t) = cmd!(format!("PASS {pass}"), "PASS");
        if c != 230 && c != 202 {
            return Err(format!("login as {user} refused: {t}"));
        }
        c
    } else {
        code
    };
    if code != 230 && code != 202 {
        return Err(format!("login as {user} refused: {text}"));
    }
    let (code, text) = cmd!("TYPE I", "TYPE I");
    if code != 200 {
        return Err(format!("TYPE I refused: {text}"));
    }
    let dir = url.path.trim_start_matches('/');
    if !dir.is_empty() {
        let (code, text) = cmd!(format!("CWD {dir}"), "CWD");
        if code != 250 {
            return Err(format!("cannot change to {dir}: {text}"));
        }
    }
    let (code, text) = cmd!("PASV", "PASV");
    if code != 227 {
        return Err(format!("PASV refused: {text}"));
    }
    let nums: Vec<u16> = text
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .skip(1)
        .filter_map(|s| s.parse::<u16>().ok())
        .collect();
    if nums.len() < 6 {
        return Err(format!("cannot read the PASV reply: {text}"));
    }
    let n = &nums[nums.len() - 6..];
    let data_port = n[4] * 256 + n[5];
    // Connect to the control host (servers behind NAT announce private addresses).
    let mut data = connect(&url.host, data_port, limit.min(CONNECT_TIMEOUT))
        .await
        .map_err(|e| format!("passive data connection: {e}"))?;
    let (code, text) = cmd!("NLST", "NLST");
    if code != 150 && code != 125 {
        return Err(format!("listing refused: {text}"));
    }
    let mut listing = Vec::new();
    timeout(limit, data.read_to_end(&mut listing))
        .await
        .map_err(|_| "listing did not finish".to_string())?
        .map_err(|e| format!("listing: {e}"))?;
    let (code, text) = timeout(limit, ftp_reply(&mut rd))
        .await
        .map_err(|_| "no reply after the listing".to_string())??;
    if code != 226 && code != 250 {
        return Err(format!("listing failed: {text}"));
    }
    let entries = String::from_utf8_lossy(&listing)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    let _ = wr.write_all(b"QUIT\r\n").await;
    Ok(format!(
        "login as {user} ok, binary mode, {entries} entr{} listed in /{dir}",
        if entries == 1 { "y" } else { "ies" }
    ))
}

/// `http(s)://[user@]host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err("URL must start with http:// or https://".into());
        };
        let (_, _, hp, path) = split_authority(rest);
        let (host, port) = host_port(hp, if tls { 443 } else { 80 })?;
        Ok(HttpUrl {
            tls,
            host,
            port,
            path: if path.is_empty() {
                "/".into()
            } else {
                path.into()
            },
        })
    }
}

async fn check_http_client(cfg: &HttpClientConfig, url: &HttpUrl) -> Result<String, String> {
    let limit = cfg.timeout.min(Duration::from_secs(30));
    let mut s = connect(&url.host, url.port, limit.min(CONNECT_TIMEOUT)).await?;
    if url.tls {
        return Ok("TCP connect ok (TLS and login not checked by `check`)".into());
    }
    let mut req = format!(
        "HEAD {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kkm-bridge-check\r\nConnection: close\r\n",
        url.path, url.host
    );
    if let (Some(login), Some(secret)) = (&cfg.login, &cfg.secret) {
        use base64::Engine;
        let cred = base64::engine::general_purpose::STANDARD
            .encode(format!("{login}:{}", secret.expose()));
        req.push_str(&format!("Authorization: Basic {cred}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("request: {e}"))?;
    let mut rd = BufReader::new(s);
    let mut status = String::new();
    timeout(limit, rd.read_line(&mut status))
        .await
        .map_err(|_| format!("no answer within {}s", limit.as_secs()))?
        .map_err(|e| format!("no answer: {e}"))?;
    let status = status.trim();
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {status:?}"))?;
    match code {
        401 | 403 => Err(format!("login refused: {status}")),
        _ => Ok(format!("answers: {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ftp_urls() {
        let u = FtpUrl::parse("ftp://kassa:p%40ss@10.0.0.5:2121/Files").unwrap();
        assert_eq!(u.user.as_deref(), Some("kassa"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!((u.host.as_str(), u.port), ("10.0.0.5", 2121));
        assert_eq!(u.path, "/Files");
        let u = FtpUrl::parse("ftp://host").unwrap();
        assert_eq!((u.port, u.path.as_str(), u.user), (21, "", None));
        assert!(FtpUrl::parse("ftp://h:x/").is_err());
    }

    #[test]
    fn http_urls() {
        let u = HttpUrl::parse("http://1c.local/trade/hs/KKMTransfer").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("1c.local", 80));
        assert_eq!(u.path, "/trade/hs/KKMTransfer");
        assert_eq!(HttpUrl::parse("https://h:8443").unwrap().port, 8443);
    }

    #[test]
    fn a_line_never_shows_a_password() {
        let l = CheckLine {
            endpoint: "shopftp".into(),
            what: "ftp 127.0.0.1:2121".into(),
            ok: false,
            detail: "connection refused".into(),
        };
        assert_eq!(
            l.to_string(),
            "FAIL shopftp (ftp 127.0.0.1:2121): connection refused"
        );
    }
}
