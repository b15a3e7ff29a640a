//! KKMTransfer over HTTPS (`tls_cert` + `tls_key`): a real socket, a certificate made by
//! rcgen, clients that trust it as a root.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kkm_bridge::config::Config;
use kkm_bridge::pump::Pump;
use kkm_bridge::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const P: &str = "/hs/KKMTransfer";

/// A self-signed certificate for 127.0.0.1 and localhost: (certificate, key) PEM files.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, ck.cert.pem()).unwrap();
    std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
    (c, k)
}

fn tls_keys(cert: &Path, key: &Path) -> String {
    format!("tls_cert = {cert:?}\ntls_key = {key:?}")
}

async fn https_bridge() -> (Bridge, tempfile::TempDir, PathBuf) {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path());
    let b = Bridge::start_with(&tls_keys(&cert, &key)).await;
    (b, certs, cert)
}

fn client(cert: &Path) -> reqwest::Client {
    let pem = std::fs::read(cert).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test]
async fn receive_and_send_data_work_over_https() {
    let (b, _certs, cert) = https_bridge().await;
    let spr = fixture("POS1.spr.cp1251");
    b.drop_office_file("POS1.spr.$1", &spr).await;
    let c = client(&cert);
    let base = format!("https://127.0.0.1:{}{P}", b.addr.port());
    let r = c
        .get(format!("{base}/1/1"))
        .basic_auth("kassa", Some("secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["errcode"], "0", "{j}");
    let data = j["data"].as_str().unwrap();
    let got = kkm_bridge::package::decode_package_data(data.as_bytes(), 1 << 30).unwrap();
    assert_eq!(got, spr, "bytes are sacred over HTTPS too");
    // The next number acknowledges it; nothing more to send.
    let j: serde_json::Value = c
        .get(format!("{base}/1/2"))
        .basic_auth("kassa", Some("secret"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(j["errcode"], "3", "{j}");
    // A report over HTTPS lands in the office folder.
    let rep = fixture("POS1.rep.utf8bom");
    let j: serde_json::Value = c
        .post(format!("{base}/SendData/1/1"))
        .basic_auth("kassa", Some("secret"))
        .body(b64_crlf(&rep))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(j["errcode"], "0", "{j}");
    // The report's file, not the temp it is written under first.
    let delivered = || -> Vec<String> {
        b.office_files()
            .into_iter()
            .filter(|f| !kkm_bridge::package::is_temp_name(f))
            .collect()
    };
    wait_until(Duration::from_secs(10), || !delivered().is_empty()).await;
    let name = &delivered()[0];
    assert_eq!(std::fs::read(b.office.join(name)).unwrap(), rep);
    // Wrong password: still 401 over HTTPS.
    let r = c
        .get(format!("{base}/1/3"))
        .basic_auth("kassa", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn plain_http_to_the_https_port_fails_cleanly_and_https_keeps_working() {
    let (b, _certs, cert) = https_bridge().await;
    // A till still set to http://: no HTTP reply, the connection just ends.
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    s.write_all(
        format!(
            "GET {P}/1/1 HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
            basic("kassa", "secret")
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the server ends the connection");
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1"),
        "no plain HTTP answer: {buf:?}"
    );
    // A client that does not trust the certificate is refused by itself.
    let untrusting = reqwest::Client::builder().build().unwrap();
    assert!(untrusting
        .get(format!("https://127.0.0.1:{}{P}/1/1", b.addr.port()))
        .send()
        .await
        .is_err());
    // And the service still answers.
    let r = client(&cert)
        .get(format!("https://127.0.0.1:{}{P}/1/1", b.addr.port()))
        .basic_auth("kassa", Some("secret"))
        .send()
        .await
        .unwrap();
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["errcode"], "3", "{j}");
}

#[tokio::test]
async fn in_flight_https_report_finishes_during_graceful_shutdown() {
    let (mut b, _certs, cert) = https_bridge().await;
    let rep = b64_crlf(&fixture("POS1.rep.utf8bom"));
    let head = format!(
        "POST {P}/SendData/1/1 HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: {}\r\n\r\n",
        basic("kassa", "secret"),
        rep.len()
    );
    let config = kkm_bridge::tls::client_config(Some(&cert), false).unwrap();
    let tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(config)
        .connect(kkm_bridge::tls::server_name("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&rep[..10]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = b.stop_signal().send(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&rep[10..]).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let r = parse_reply(&buf);
    assert_eq!(r.errcode(), "0", "{}", r.errmessage());
    b.stop().await;
    assert_eq!(b.journal().len(), 1);
    assert!(tokio::net::TcpStream::connect(b.addr).await.is_err());
}

#[test]
fn tls_cert_and_key_are_checked_at_start_naming_the_key_and_file() {
    let root = tempfile::tempdir().unwrap();
    let parse = |extra: &str| Config::parse(&config_text(root.path(), extra), Path::new("t.toml"));
    let e = parse("tls_cert = \"cert.pem\"").unwrap_err();
    assert_eq!(e.key, "endpoint.tills.tls_key");
    let e = parse("tls_key = \"key.pem\"").unwrap_err();
    assert_eq!(e.key, "endpoint.tills.tls_cert");
    let e = parse("tls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"")
        .unwrap_err();
    assert_eq!(e.key, "endpoint.tills.tls_cert");
    assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
    // Readable but not PEM: refused when the endpoint is built, naming the file.
    let (cert, _) = self_signed(root.path());
    let junk = root.path().join("junk.key");
    std::fs::write(&junk, "not a key").unwrap();
    let config = Arc::new(parse(&tls_keys(&cert, &junk)).unwrap());
    let store = Arc::new(Store::open(&config.state_dir).unwrap());
    let err = Pump::new(config, store).err().unwrap().to_string();
    assert!(
        err.contains("\"tills\"") && err.contains("tls_cert/tls_key") && err.contains("junk.key"),
        "{err}"
    );
}
