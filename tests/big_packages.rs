//! Big packages through KKMTransfer (README "Guarantees": stream big files, never hold more
//! than a few packages in memory): a package over `INLINE_MAX` is served from a reply
//! encoded once into a file and streamed. Bytes stay exact, the vendor's reply shape stays.

mod common;

use common::*;

const P: &str = "/hs/KKMTransfer";

/// Deterministic bytes (xorshift), `n` of them: half binary noise (every byte value, which
/// deflate cannot shrink), half price-list text (which it can).
fn big_payload(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 64);
    v.extend_from_slice(b"##@@&&\r\n#\r\n");
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (x >> 60) < 8 {
            v.extend_from_slice(&x.to_le_bytes());
        } else {
            v.extend_from_slice(
                format!("{};товар {};{}.00;\r\n", x % 100_000, x % 977, x % 500).as_bytes(),
            );
        }
    }
    v.truncate(n);
    v
}

/// The `data` of a reply, as a till decodes it.
fn till_decodes(r: &Reply) -> Vec<u8> {
    data_bytes(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_package_is_served_from_a_file_in_the_vendor_shape_with_exact_bytes() {
    let b = Bridge::start().await;
    let spr = big_payload(1, 8 << 20);
    b.drop_office_file("POS1.spr.$1", &spr).await;
    let r = b.get(&format!("{P}/1/1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    // The attributes in the order the small path writes them, CRLF-wrapped base64 of a ZIP
    // with one deflated entry.
    assert!(r.body.starts_with(br#"{"data":""#));
    assert!(r
        .body
        .ends_with(br#"","errcode":"0","errmessage":"","packagetype":"spr"}"#));
    let j = r.json();
    let data = j["data"].as_str().unwrap();
    let lines: Vec<&str> = data.split("\r\n").collect();
    assert!(lines[..lines.len() - 1].iter().all(|l| l.len() == 64));
    assert!(lines.last().unwrap().len() <= 64);
    let zip = kkm_bridge::package::decode_base64(data.as_bytes()).unwrap();
    let mut a = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(
        a.by_index(0).unwrap().compression(),
        zip::CompressionMethod::Deflated
    );
    assert!(till_decodes(&r) == spr, "bytes are sacred");
    assert_eq!(b.scratch_files(), 1, "the encoded reply is kept");
    // Asked again: the same bytes, from the same file.
    let again = b.get(&format!("{P}/1/1")).await;
    assert!(again.body == r.body);
    assert_eq!(b.journal()[0].4, "taken");
    // The next number acknowledges it: the payload and its encoded reply are freed.
    let next = b.get(&format!("{P}/1/2")).await;
    assert_eq!(next.errcode(), "3");
    assert_eq!(b.journal()[0].4, "delivered");
    assert_eq!(b.scratch_files(), 0, "the reply file goes with the package");
    assert_eq!(b.spool_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_flr_carries_its_uid_and_concurrent_requests_share_one_encoding() {
    let b = Bridge::start().await;
    let flr = big_payload(2, 3 << 20);
    b.drop_office_file("POS4.flr.$1", &flr).await;
    let mut tills = Vec::new();
    for _ in 0..4 {
        let addr = b.addr;
        tills.push(tokio::spawn(async move {
            request(
                addr,
                "GET",
                &format!("{P}/4/7"),
                Some(("kassa", "secret")),
                b"",
            )
            .await
        }));
    }
    let mut bodies = Vec::new();
    for t in tills {
        bodies.push(t.await.unwrap());
    }
    let first = &bodies[0];
    assert!(
        bodies.iter().all(|r| r.body == first.body),
        "one reply for all"
    );
    let j = first.json();
    assert_eq!(j["packagetype"], "flr");
    let uid = j["UID"].as_str().expect("flr carries a UID");
    assert!(first.body.ends_with(
        format!(r#"","errcode":"0","errmessage":"","packagetype":"flr","UID":"{uid}"}}"#)
            .as_bytes()
    ));
    assert!(till_decodes(first) == flr);
    assert_eq!(b.scratch_files(), 1, "encoded once, no temp file left");
}
