//! KKMTransfer as a till sees it (PROTOCOL.md §4.1–§4.2): raw HTTP/1.1 over TCP, the
//! vendor's JSON shapes, base64 wrapped with CRLF.

mod common;

use std::time::Duration;

use common::*;
use kkm_bridge::package::{encode_plain_base64, encode_zip_base64, zip_one};
use tokio::io::AsyncWriteExt;

const P: &str = "/hs/KKMTransfer";

#[tokio::test]
async fn till_with_nothing_queued_gets_the_vendor_no_data_reply() {
    let b = Bridge::start().await;
    let r = b.get(&format!("{P}/1/1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let vendor: serde_json::Value =
        serde_json::from_slice(&fixture("receive-nodata.json")).unwrap();
    assert_eq!(r.json(), vendor);
}

#[tokio::test]
async fn till_requests_same_number_twice_gets_same_package() {
    let b = Bridge::start().await;
    let spr = fixture("POS1.spr.cp1251");
    b.drop_office_file("POS1.spr.$1", &spr).await;
    let first = b.get(&format!("{P}/1/1")).await;
    assert_eq!(first.errcode(), "0");
    let j = first.json();
    assert_eq!(j["packagetype"], "spr");
    assert_eq!(j["errmessage"], "");
    assert!(j.get("UID").is_none(), "spr has no UID: {j}");
    let data = j["data"].as_str().unwrap();
    assert!(data.contains("\r\n"), "vendor-style CRLF wrapping");
    assert!(data.split("\r\n").all(|l| l.len() <= 64));
    assert_eq!(data_bytes(&first), spr, "bytes are sacred");
    let again = b.get(&format!("{P}/1/1")).await;
    assert_eq!(again.json(), j);
    // Nothing acknowledged yet.
    assert_eq!(b.journal()[0].4, "taken");
}

#[tokio::test]
async fn till_asking_number_plus_one_acknowledges_and_gets_the_next_package() {
    let b = Bridge::start().await;
    let a = fixture("POS1.spr.cp1251");
    let c = fixture("POS1.spr.utf8bom");
    b.drop_office_file("POS3.spr.$1", &a).await;
    b.drop_office_file("POS3.spr.$2", &c).await;
    assert_eq!(b.spool_files(), 2);
    assert_eq!(data_bytes(&b.get(&format!("{P}/3/41")).await), a);
    let next = b.get(&format!("{P}/3/42")).await;
    assert_eq!(data_bytes(&next), c);
    let j = b.journal();
    assert_eq!(j[0].4, "delivered");
    assert_eq!(j[1].4, "taken");
    assert_eq!(
        b.spool_files(),
        1,
        "the acknowledged package left the spool"
    );
    let sink_seq: i64 = b
        .store
        .with_conn(|c| {
            c.query_row("SELECT sink_seq FROM package WHERE id = 1", [], |r| {
                r.get(0)
            })
        })
        .unwrap();
    assert_eq!(sink_seq, 41);
    let none = b.get(&format!("{P}/3/43")).await;
    assert_eq!(none.errcode(), "3");
    assert_eq!(none.json()["data"], "");
    assert_eq!(b.journal()[1].4, "delivered");
    assert_eq!(b.spool_files(), 0);
    // Asking for 43 again, then a new package arrives: served under 43.
    assert_eq!(b.get(&format!("{P}/3/43")).await.errcode(), "3");
    b.drop_office_file("POS3.spr.$3", &a).await;
    assert_eq!(data_bytes(&b.get(&format!("{P}/3/43")).await), a);
}

#[tokio::test]
async fn till_asking_an_unexpected_number_gets_the_unacknowledged_package_again() {
    let b = Bridge::start().await;
    let a = fixture("POS1.spr.cp1251");
    let c = fixture("POS1.spr.utf8bom");
    b.drop_office_file("POS2.spr.$1", &a).await;
    b.drop_office_file("POS2.spr.$2", &c).await;
    assert_eq!(data_bytes(&b.get(&format!("{P}/2/5")).await), a);
    // Counter reset (till reinstalled): not an acknowledgement.
    assert_eq!(data_bytes(&b.get(&format!("{P}/2/1")).await), a);
    assert_eq!(b.journal()[0].4, "taken");
    let served = b.store.served("tills", 2).unwrap().unwrap();
    assert_eq!(served.number, 1);
    assert_eq!(served.resets, 1, "counted");
    // Now 2 acknowledges it under its new number.
    assert_eq!(data_bytes(&b.get(&format!("{P}/2/2")).await), c);
    assert_eq!(b.journal()[0].4, "delivered");
}

#[tokio::test]
async fn flr_is_served_with_a_uid_and_the_answering_report_carries_it() {
    let mut b = Bridge::start().await;
    b.drop_office_file("POS4.flr.$1", b"flr-request\r\n").await;
    let r = b.get(&format!("{P}/4/1")).await;
    let j = r.json();
    assert_eq!(j["packagetype"], "flr");
    let uid = j["UID"].as_str().expect("flr carries a UID").to_string();
    assert_eq!(b.journal()[0].3.as_deref(), Some(uid.as_str()));
    assert_eq!(data_bytes(&r), b"flr-request\r\n");
    let rep = fixture("POS1.rep.utf8bom");
    let s = b
        .post(&format!("{P}/SendData/4/1/{uid}"), &b64_crlf(&rep))
        .await;
    assert_eq!(
        s.json(),
        serde_json::json!({"errcode": "0", "errmessage": ""})
    );
    let j = b.journal();
    assert_eq!(j[1].0, "rep");
    assert_eq!(
        j[1].3.as_deref(),
        Some(uid.as_str()),
        "journaled with its UID"
    );
    wait_until(Duration::from_secs(10), || {
        b.office.join("POS4.rep.$1").exists()
    })
    .await;
    assert_eq!(std::fs::read(b.office.join("POS4.rep.$1")).unwrap(), rep);
    b.stop().await;
}

#[tokio::test]
async fn till_sends_a_zipped_report_wrapped_with_crlf_and_the_file_appears_with_exact_bytes() {
    let b = Bridge::start().await;
    let rep = fixture("POS1.rep.cp1251");
    let body = encode_zip_base64(&rep, "v8_1.txt");
    assert!(body.contains("\r\n"));
    let r = b.post(&format!("{P}/SendData/1/1"), body.as_bytes()).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(r.errcode(), "0", "{}", r.errmessage());
    wait_until(Duration::from_secs(10), || {
        b.office.join("POS1.rep.$1").exists()
    })
    .await;
    assert_eq!(std::fs::read(b.office.join("POS1.rep.$1")).unwrap(), rep);
}

#[tokio::test]
async fn report_as_a_json_string_body_is_accepted() {
    let b = Bridge::start().await;
    let rep = fixture("POS1.rep.utf8bom");
    let body = serde_json::to_vec(&encode_plain_base64(&rep)).unwrap();
    let r = b.post(&format!("{P}/SendData/1/1"), &body).await;
    assert_eq!(r.errcode(), "0", "{}", r.errmessage());
    wait_until(Duration::from_secs(10), || {
        b.office.join("POS1.rep.$1").exists()
    })
    .await;
    assert_eq!(std::fs::read(b.office.join("POS1.rep.$1")).unwrap(), rep);
}

#[tokio::test]
async fn same_report_sent_twice_gets_1_and_is_stored_once() {
    let b = Bridge::start().await;
    let rep = fixture("POS1.rep.utf8bom");
    let r = b.post(&format!("{P}/SendData/5/9"), &b64_crlf(&rep)).await;
    assert_eq!(r.errcode(), "0");
    // The same content, differently wrapped, is the same report.
    let again = b
        .post(
            &format!("{P}/SendData/5/9"),
            encode_plain_base64(&rep).as_bytes(),
        )
        .await;
    assert_eq!(again.errcode(), "1");
    assert!(
        again.errmessage().contains("ККМ 5, пакет 9"),
        "{}",
        again.errmessage()
    );
    assert_eq!(b.journal().len(), 1, "nothing stored twice");
}

#[tokio::test]
async fn same_number_with_new_content_is_stored_as_a_new_report() {
    let b = Bridge::start().await;
    let r1 = fixture("POS1.rep.utf8bom");
    let r2 = fixture("POS1.rep.cp1251");
    assert_eq!(
        b.post(&format!("{P}/SendData/6/1"), &b64_crlf(&r1))
            .await
            .errcode(),
        "0"
    );
    assert_eq!(
        b.post(&format!("{P}/SendData/6/1"), &b64_crlf(&r2))
            .await
            .errcode(),
        "0"
    );
    assert_eq!(b.journal().len(), 2);
    wait_until(Duration::from_secs(10), || {
        b.office.join("POS6.rep.$2").exists()
    })
    .await;
    assert_eq!(std::fs::read(b.office.join("POS6.rep.$1")).unwrap(), r1);
    assert_eq!(std::fs::read(b.office.join("POS6.rep.$2")).unwrap(), r2);
}

#[tokio::test]
async fn missing_or_wrong_credentials_get_401_with_www_authenticate() {
    let b = Bridge::start().await;
    for auth in [None, Some(("kassa", "wrong")), Some(("nobody", "secret"))] {
        for (method, path) in [
            ("GET", format!("{P}/1/1")),
            ("POST", format!("{P}/SendData/1/1")),
        ] {
            let r = request(b.addr, method, &path, auth, b"QUJD").await;
            assert_eq!(r.status, 401, "{method} {auth:?}");
            assert!(
                r.header("www-authenticate").unwrap().starts_with("Basic"),
                "{:?}",
                r.headers
            );
        }
    }
    // Garbage in the header is a 401 too, not a crash.
    let raw = format!(
        "GET {P}/1/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Basic %%%\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_request(b.addr, raw.as_bytes()).await.status, 401);
    assert!(b.journal().is_empty());
}

#[tokio::test]
async fn login_acting_for_a_till_outside_its_range_gets_403_with_json_errcode() {
    let b = Bridge::start().await;
    let r = request(
        b.addr,
        "GET",
        &format!("{P}/3/1"),
        Some(("kassa7", "p7")),
        b"",
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.errcode(), "2");
    assert!(r.errmessage().contains("ККМ 3"), "{}", r.errmessage());
    let rep = b64_crlf(b"1;2;3;\r\n");
    let r = request(
        b.addr,
        "POST",
        &format!("{P}/SendData/3/1"),
        Some(("kassa7", "p7")),
        &rep,
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.errcode(), "2");
    // Its own till is fine.
    let r = request(
        b.addr,
        "POST",
        &format!("{P}/SendData/7/1"),
        Some(("kassa7", "p7")),
        &rep,
    )
    .await;
    assert_eq!(r.errcode(), "0");
    assert_eq!(b.journal().len(), 1);
}

#[tokio::test]
async fn till_in_no_link_gets_errcode_2_naming_the_till() {
    let b = Bridge::start().await;
    let r = b.get(&format!("{P}/15/1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.errcode(), "2");
    assert!(r.errmessage().contains("ККМ 15"), "{}", r.errmessage());
    let r = b.post(&format!("{P}/SendData/15/3"), &b64_crlf(b"x")).await;
    assert_eq!(r.errcode(), "2");
    assert!(
        r.errmessage().contains("ККМ 15, пакет 3"),
        "{}",
        r.errmessage()
    );
    assert!(b.journal().is_empty());
}

#[tokio::test]
async fn non_numeric_till_or_number_gets_errcode_2() {
    let b = Bridge::start().await;
    for path in [
        format!("{P}/abc/1"),
        format!("{P}/1/x"),
        format!("{P}/1/-1"),
        format!("{P}/99999999999/1"),
    ] {
        let r = b.get(&path).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.errcode(), "2", "{path}");
    }
    let r = b.post(&format!("{P}/SendData/x/1"), &b64_crlf(b"x")).await;
    assert_eq!(r.errcode(), "2");
    assert!(
        r.errmessage().contains("ККМ x, пакет 1"),
        "{}",
        r.errmessage()
    );
    assert!(b.journal().is_empty());
}

#[tokio::test]
async fn malformed_base64_gets_errcode_2_and_nothing_is_stored() {
    let b = Bridge::start().await;
    for body in [
        &b"not base64 at all!!"[..],
        b"\"unterminated json",
        b"",
        b"\r\n",
    ] {
        let r = b.post(&format!("{P}/SendData/1/7"), body).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.errcode(), "2", "{body:?}");
        assert!(
            r.errmessage().starts_with("ККМ 1, пакет 7: "),
            "{}",
            r.errmessage()
        );
    }
    let r = b.post(&format!("{P}/SendData/1/7"), b"!!!!").await;
    assert!(r.errmessage().contains("base64"), "{}", r.errmessage());
    assert!(b.journal().is_empty());
    assert_eq!(b.spool_files(), 0, "nothing partial stored");
}

#[tokio::test]
async fn zip_that_is_not_one_sane_entry_gets_errcode_2() {
    let b = Bridge::start().await;
    let two = {
        use std::io::Write;
        let mut out = std::io::Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut out);
        let o = zip::write::SimpleFileOptions::default();
        w.start_file("a", o).unwrap();
        w.write_all(b"a").unwrap();
        w.start_file("b", o).unwrap();
        w.write_all(b"b").unwrap();
        w.finish().unwrap();
        out.into_inner()
    };
    let mut broken = zip_one(b"hello", "x.txt");
    broken.truncate(20);
    // A zip bomb: small body, unpacks past max_body (64 KiB).
    let bomb = zip_one(&vec![b'0'; 1 << 20], "bomb.txt");
    assert!(bomb.len() < 64 << 10);
    for (what, zip) in [("two entries", two), ("truncated", broken), ("bomb", bomb)] {
        let r = b.post(&format!("{P}/SendData/2/8"), &b64_crlf(&zip)).await;
        assert_eq!(r.errcode(), "2", "{what}");
        assert!(
            r.errmessage().contains("ККМ 2, пакет 8"),
            "{what}: {}",
            r.errmessage()
        );
    }
    assert!(b.journal().is_empty());
    assert_eq!(b.spool_files(), 0);
}

#[tokio::test]
async fn body_over_max_body_is_refused_from_its_content_length() {
    let b = Bridge::start().await;
    // Only the head is sent: the refusal cannot depend on reading the body.
    let raw = format!(
        "POST {P}/SendData/1/2 HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: 1000000000\r\n\r\n",
        basic("kassa", "secret")
    );
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let r = read_reply(&mut s).await;
    assert_eq!(r.errcode(), "2");
    assert!(
        r.errmessage().contains("ККМ 1, пакет 2"),
        "{}",
        r.errmessage()
    );
    assert!(r.errmessage().contains("max_body"), "{}", r.errmessage());
    assert!(b.journal().is_empty());
}

#[tokio::test]
async fn chunked_body_over_max_body_is_refused_while_streaming() {
    let b = Bridge::start().await;
    let raw = format!(
        "POST {P}/SendData/1/3 HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        basic("kassa", "secret")
    );
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    // 80 KiB of valid base64 in 8 KiB chunks, and the body never ends: the bridge must
    // answer without waiting for the end.
    let chunk = vec![b'A'; 8192];
    for _ in 0..10 {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(&chunk).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    let r = read_reply(&mut s).await;
    assert_eq!(r.errcode(), "2");
    assert!(
        r.errmessage().contains("ККМ 1, пакет 3"),
        "{}",
        r.errmessage()
    );
    assert!(r.errmessage().contains("max_body"), "{}", r.errmessage());
    assert!(b.journal().is_empty());
    assert_eq!(b.spool_files(), 0);
}

#[tokio::test]
async fn a_1c_style_prefix_works_and_auth_none_needs_no_password() {
    let b = Bridge::start_with("prefix = \"/trade/hs/KKMTransfer\"\nauth = \"none\"").await;
    let r = request(b.addr, "GET", "/trade/hs/KKMTransfer/1/1", None, b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.errcode(), "3");
    let r = request(b.addr, "GET", "/hs/KKMTransfer/1/1", None, b"").await;
    assert_eq!(r.status, 404);
    let r = request(
        b.addr,
        "POST",
        "/trade/hs/KKMTransfer/SendData/1/1",
        None,
        &b64_crlf(b"1;2;\r\n"),
    )
    .await;
    assert_eq!(r.errcode(), "0");
}

#[tokio::test]
async fn the_vendor_sample_package_round_trips_to_the_till() {
    // The file inside the vendor's own ReceiveData example, served by us, decodes to the
    // same bytes.
    let b = Bridge::start().await;
    let file = fixture("v8_9969_15.txt");
    b.drop_office_file("POS1.spr.$1", &file).await;
    let r = b.get(&format!("{P}/1/1")).await;
    assert_eq!(data_bytes(&r), file);
    let vendor: serde_json::Value = serde_json::from_slice(&fixture("receive-spr.json")).unwrap();
    let ours = r.json();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&ours),
        keys(&vendor),
        "same attributes as the vendor's reply"
    );
}

#[tokio::test]
async fn in_flight_report_finishes_during_graceful_shutdown() {
    let mut b = Bridge::start().await;
    let rep = b64_crlf(&fixture("POS1.rep.utf8bom"));
    let head = format!(
        "POST {P}/SendData/1/1 HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: {}\r\n\r\n",
        basic("kassa", "secret"),
        rep.len()
    );
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&rep[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = b.stop_signal().send(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&rep[10..]).await.unwrap();
    let r = read_reply(&mut s).await;
    assert_eq!(r.errcode(), "0", "{}", r.errmessage());
    b.stop().await;
    assert_eq!(b.journal().len(), 1);
    // New connections are refused once stopped.
    assert!(tokio::net::TcpStream::connect(b.addr).await.is_err());
}

/// Repeated polls are answered from memory (`ServeCache`); the cache must never answer
/// with something the journal would not: a package queued while a till keeps getting
/// "no data", an acknowledged package, or a package served under another number.
#[tokio::test]
async fn answers_from_memory_follow_the_journal() {
    let b = Bridge::start().await;
    // "No data", again and again (the second and later ones come from memory)...
    for _ in 0..3 {
        assert_eq!(b.get(&format!("{P}/2/7")).await.errcode(), "3");
    }
    // ...until a package is queued: the very next poll gets it.
    let a = fixture("POS1.spr.cp1251");
    let c = fixture("POS1.spr.utf8bom");
    b.drop_office_file("POS2.spr.$1", &a).await;
    assert_eq!(data_bytes(&b.get(&format!("{P}/2/7")).await), a);
    // The same number again: the same package (from memory), nothing acknowledged.
    for _ in 0..3 {
        assert_eq!(data_bytes(&b.get(&format!("{P}/2/7")).await), a);
    }
    assert_eq!(b.journal()[0].4, "taken");
    // Another till's poll does not disturb till 2's answer.
    assert_eq!(b.get(&format!("{P}/3/7")).await.errcode(), "3");
    // Number + 1 acknowledges; the next package queued meanwhile is served after it.
    b.drop_office_file("POS2.spr.$2", &c).await;
    assert_eq!(data_bytes(&b.get(&format!("{P}/2/8")).await), c);
    assert_eq!(b.journal()[0].4, "delivered");
    // The old number now is an unexpected one: the unacknowledged package again, not a.
    assert_eq!(data_bytes(&b.get(&format!("{P}/2/7")).await), c);
    assert_eq!(data_bytes(&b.get(&format!("{P}/2/7")).await), c);
    // And acknowledged: "no data", from then on.
    assert_eq!(b.get(&format!("{P}/2/8")).await.errcode(), "3");
    assert_eq!(b.journal()[1].4, "delivered");
    assert_eq!(b.get(&format!("{P}/2/8")).await.errcode(), "3");
}
