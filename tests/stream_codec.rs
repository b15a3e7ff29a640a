//! The streaming codec (`stream_codec`) against the in-memory one (`package`): for any
//! SendData body, cut into pieces anywhere, the streaming decoder accepts exactly what the
//! in-memory path accepts and yields the same bytes (and their sha256); the streaming
//! encoder writes the same reply bytes as the in-memory one.
//! `PROPTEST_CASES` overrides the number of cases (default 1,000 per property).

use std::sync::OnceLock;

use kkm_bridge::package::{
    decode_package_data, encode_plain_base64, encode_zip_base64, is_zip, sha256_hex,
    wrap_base64_crlf, zip_one,
};
use kkm_bridge::store::Store;
use kkm_bridge::stream_codec::{
    encode_reply, write_base64_wrapped, BodyDecoder, ReplyDecoder, ReportSink, CHUNK,
};
use proptest::prelude::*;

#[path = "support/props.rs"]
mod props;
#[path = "support/util.rs"]
mod util;
use props::{fixtures, mutate};
use util::noise;

/// A store of its own, for a test that checks its scratch directory.
fn fresh() -> (tempfile::TempDir, Store) {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    (d, s)
}

fn store() -> &'static Store {
    static STORE: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            let d = tempfile::tempdir().unwrap();
            let s = Store::open(d.path()).unwrap();
            (d, s)
        })
        .1
}

/// What SendData did with a body before it streamed (`body_base64`, then
/// `decode_package_data`).
fn in_memory(body: &[u8], max: u64) -> Result<Vec<u8>, String> {
    let text = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'"') => serde_json::from_slice::<String>(body)
            .map_err(|e| format!("json: {e}"))?
            .into_bytes(),
        _ => body.to_vec(),
    };
    decode_package_data(&text, max).map_err(|e| e.to_string())
}

/// `body` cut at `cuts` (taken modulo the length, in order; empty pieces included).
fn pieces<'a>(body: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    points.sort_unstable();
    points.push(body.len());
    let mut at = 0;
    points
        .into_iter()
        .map(|p| {
            let piece = &body[at..p];
            at = p;
            piece
        })
        .collect()
}

/// The streaming decoder fed `body` cut at `cuts` (taken modulo the length).
fn streamed(s: &Store, body: &[u8], cuts: &[usize], max: u64) -> Result<Vec<u8>, String> {
    let mut d = BodyDecoder::new(s.spool_writer().unwrap(), s.scratch_dir(), max);
    for piece in pieces(body, cuts) {
        d.feed(piece).map_err(|e| e.to_string())?;
    }
    let u = d.finish().map_err(|e| e.to_string())?;
    let (len, head) = (u.len, u.head.clone());
    let sp = u.writer.finish().unwrap();
    let bytes = match &sp.inline {
        Some(b) => b.clone(),
        None => std::fs::read(&sp.path).unwrap(),
    };
    assert_eq!(sp.sha256, sha256_hex(&bytes), "hashed while streaming");
    assert_eq!((sp.size, len), (bytes.len() as u64, bytes.len() as u64));
    assert_eq!(head, bytes[..bytes.len().min(4)]);
    sp.discard();
    Ok(bytes)
}

/// Both paths agree: the same bytes, or both refuse.
fn agree(body: &[u8], cuts: &[usize], max: u64) -> Result<Option<Vec<u8>>, TestCaseError> {
    let want = in_memory(body, max);
    let got = streamed(store(), body, cuts, max);
    match (&want, &got) {
        (Ok(w), Ok(g)) => {
            prop_assert!(w == g, "different bytes for {:?}", preview(body));
            Ok(Some(g.clone()))
        }
        (Err(_), Err(_)) => Ok(None),
        _ => Err(TestCaseError::fail(format!(
            "in memory {:?}, streamed {:?}, body {:?}",
            want.map(|b| b.len()),
            got.map(|b| b.len()),
            preview(body)
        ))),
    }
}

fn preview(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(120)]).into_owned();
    format!("{s}… ({} bytes)", b.len())
}

/// The shapes a till (or 1C) sends a report in.
fn wrap(bytes: &[u8], shape: u8) -> Vec<u8> {
    let plain = encode_plain_base64(bytes);
    match shape % 7 {
        0 => plain.into_bytes(),
        1 => wrap_base64_crlf(&plain).into_bytes(),
        2 => encode_zip_base64(bytes, "r.txt").into_bytes(),
        3 => serde_json::to_vec(&plain).unwrap(),
        // 1C escapes '/' in JSON strings.
        4 => serde_json::to_vec(&wrap_base64_crlf(&plain))
            .unwrap()
            .iter()
            .flat_map(|&b| if b == b'/' { b"\\/".to_vec() } else { vec![b] })
            .collect(),
        5 => format!(" \r\n\t{}\r\n ", wrap_base64_crlf(&plain)).into_bytes(),
        _ => {
            let mut v = b"\r\n ".to_vec();
            v.extend(serde_json::to_vec(&encode_zip_base64(bytes, "r.txt")).unwrap());
            v.extend_from_slice(b" \n");
            v
        }
    }
}

/// What the bridge as a till did with a ReceiveData reply before it streamed: the JSON
/// object, its string `data` decoded. (fields without a string data, data chars, bytes)
type ReplyParts = (
    serde_json::Map<String, serde_json::Value>,
    u64,
    Result<Vec<u8>, String>,
);

fn reply_in_memory(body: &[u8]) -> Result<ReplyParts, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(mut fields) = v else {
        return Err("not an object".into());
    };
    let data = match fields.get("data") {
        Some(serde_json::Value::String(d)) => {
            let d = d.clone();
            fields.remove("data");
            d
        }
        _ => String::new(),
    };
    let chars = data.bytes().filter(|b| !b.is_ascii_whitespace()).count() as u64;
    Ok((
        fields,
        chars,
        decode_package_data(data.as_bytes(), 1 << 20).map_err(|e| e.to_string()),
    ))
}

fn reply_streamed(body: &[u8], cuts: &[usize]) -> Result<ReplyParts, String> {
    let s = store();
    let mut d = ReplyDecoder::new(ReportSink::new(
        s.spool_writer().unwrap(),
        s.scratch_dir(),
        1 << 20,
    ));
    for piece in pieces(body, cuts) {
        d.feed(piece).map_err(|e| e.to_string())?;
    }
    let r = d.finish().map_err(|e| e.to_string())?;
    let data = r.data.map_err(|e| e.to_string()).map(|u| {
        let sp = u.writer.finish().unwrap();
        let bytes = match &sp.inline {
            Some(b) => b.clone(),
            None => std::fs::read(&sp.path).unwrap(),
        };
        sp.discard();
        bytes
    });
    Ok((r.fields, r.data_chars, data))
}

fn replies_agree(body: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
    let want = reply_in_memory(body);
    let got = reply_streamed(body, cuts);
    match (&want, &got) {
        (Ok((wf, wc, wd)), Ok((gf, gc, gd))) => {
            prop_assert_eq!(wf, gf, "fields of {}", preview(body));
            prop_assert_eq!(wc, gc);
            match (wd, gd) {
                (Ok(w), Ok(g)) => prop_assert!(w == g, "data of {}", preview(body)),
                (Err(_), Err(_)) => {}
                _ => {
                    return Err(TestCaseError::fail(format!(
                        "data: in memory {:?}, streamed {:?}, {}",
                        wd.as_ref().map(Vec::len),
                        gd.as_ref().map(Vec::len),
                        preview(body)
                    )))
                }
            }
            Ok(())
        }
        (Err(_), Err(_)) => Ok(()),
        _ => Err(TestCaseError::fail(format!(
            "in memory {:?}, streamed {:?}: {}",
            want.as_ref().map(|w| w.1),
            got.as_ref().map(|g| g.1),
            preview(body)
        ))),
    }
}

/// A reply as back offices write it: attributes in any order, compact or pretty, `/`
/// escaped or not, a `data` of the package (zipped or not) or none.
fn reply_text(bytes: &[u8], order: u8, style: u8, uid: bool) -> Vec<u8> {
    let data = match style % 3 {
        0 => encode_zip_base64(bytes, "v8_1.txt"),
        1 => encode_plain_base64(bytes),
        _ => wrap_base64_crlf(&encode_plain_base64(bytes)),
    };
    let mut attrs = vec![
        ("data", serde_json::json!(data)),
        ("errcode", serde_json::json!("0")),
        ("errmessage", serde_json::json!("")),
        ("packagetype", serde_json::json!("spr")),
    ];
    if uid {
        attrs.push(("UID", serde_json::json!("{0d2f-ü/\"x\"}")));
    }
    let n = attrs.len();
    attrs.rotate_left(order as usize % n);
    if order & 0x10 != 0 {
        attrs.push((
            "extra",
            serde_json::json!({"a": [1, 2.5e3, null, true], "b": "}],"}),
        ));
    }
    let sep = if style & 0x4 != 0 { ",\r\n  " } else { "," };
    let colon = if style & 0x8 != 0 { " : " } else { ":" };
    let mut out = String::from(if style & 0x4 != 0 { "{\r\n  " } else { "{" });
    for (i, (k, v)) in attrs.iter().enumerate() {
        if i > 0 {
            out.push_str(sep);
        }
        out.push_str(&serde_json::to_string(k).unwrap());
        out.push_str(colon);
        out.push_str(&serde_json::to_string(v).unwrap());
    }
    out.push_str(if style & 0x4 != 0 { "\r\n}\r\n" } else { "}" });
    if style & 0x20 != 0 {
        out = out.replace('/', "\\/");
    }
    out.into_bytes()
}

/// Bytes that make JSON and base64 edge cases likely.
const TRICKY: &[u8] = b"QUJDa+/=\"\\\r\n \t\x0cunrtbf0A9PK\x03\x04\x00\xff{}";

proptest! {
    #![proptest_config(props::config(1000))]

    #[test]
    fn every_shape_of_any_bytes_decodes_the_same_at_any_cuts(
        bytes in prop::collection::vec(any::<u8>(), 0..3000),
        shape in any::<u8>(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let body = wrap(&bytes, shape);
        let got = agree(&body, &cuts, 1 << 20)?;
        if !is_zip(&bytes) {
            prop_assert_eq!(got, Some(bytes));
        }
    }

    #[test]
    fn mutated_bodies_are_refused_or_decoded_alike(
        which in any::<prop::sample::Index>(),
        shape in any::<u8>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let fx = fixtures();
        let body = mutate(wrap(&fx[which.index(fx.len())], shape), &edits);
        agree(&body, &cuts, 1 << 16)?;
    }

    #[test]
    fn tricky_bodies_are_refused_or_decoded_alike(
        body in prop::collection::vec(prop::sample::select(TRICKY), 0..80),
        quoted in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let body = if quoted {
            let mut v = b"\"".to_vec();
            v.extend(body);
            v.push(b'"');
            v
        } else {
            body
        };
        agree(&body, &cuts, 1 << 16)?;
    }

    #[test]
    fn arbitrary_bodies_are_refused_or_decoded_alike(
        body in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(any::<usize>(), 0..4),
    ) {
        agree(&body, &cuts, 1 << 16)?;
    }

    #[test]
    fn replies_in_any_shape_decode_the_same_at_any_cuts(
        bytes in prop::collection::vec(any::<u8>(), 0..3000),
        order in any::<u8>(),
        style in any::<u8>(),
        uid in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let body = reply_text(&bytes, order, style, uid);
        replies_agree(&body, &cuts)?;
        let (_, _, data) = reply_streamed(&body, &cuts).unwrap();
        if !is_zip(&bytes) || style % 3 == 0 {
            prop_assert_eq!(data.unwrap(), bytes);
        }
    }

    #[test]
    fn mutated_replies_are_refused_or_decoded_alike(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        order in any::<u8>(),
        style in any::<u8>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let body = mutate(reply_text(&bytes, order, style, true), &edits);
        replies_agree(&body, &cuts)?;
    }

    #[test]
    fn the_wrapped_base64_writer_matches_wrap_base64_crlf(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut out = Vec::new();
        write_base64_wrapped(&mut &bytes[..], &mut out, b"\r\n").unwrap();
        prop_assert_eq!(out, wrap_base64_crlf(&encode_plain_base64(&bytes)).into_bytes());
    }
}

/// Around the decoder's chunk boundary (base64 is decoded a `CHUNK` of characters at a
/// time): sizes, padding and bad characters just before, at and after it.
#[test]
fn chunk_boundaries_decode_and_refuse_alike() {
    let mut n = 0;
    // Base64 of k bytes is CHUNK characters; k - 2 and k - 1 end in padding there.
    let k = CHUNK / 4 * 3;
    for size in [k - 2, k - 1, k, k + 1, k + 2, k + 4] {
        let bytes = noise(size as u64, size);
        let plain = encode_plain_base64(&bytes).into_bytes();
        for cuts in [
            vec![],
            vec![CHUNK - 1],
            vec![CHUNK, CHUNK + 1],
            vec![7, CHUNK + 2],
            vec![CHUNK - 4],
        ] {
            assert_eq!(agree(&plain, &cuts, 1 << 30).unwrap(), Some(bytes.clone()));
        }
        for cuts in [vec![], vec![CHUNK + 1]] {
            for at in [CHUNK - 2, CHUNK - 1, CHUNK, CHUNK + 2] {
                for bad in [b'=', b'!', b'\n'] {
                    let mut body = plain.clone();
                    body.insert(at.min(body.len()), bad);
                    agree(&body, &cuts, 1 << 30).unwrap();
                    n += 1;
                }
                let mut padded = plain.clone();
                padded.truncate(at.min(padded.len()));
                padded.extend_from_slice(b"==");
                agree(&padded, &cuts, 1 << 30).unwrap();
                n += 1;
            }
        }
        let wrapped = wrap_base64_crlf(&encode_plain_base64(&bytes)).into_bytes();
        assert_eq!(
            agree(&wrapped, &[CHUNK + 3], 1 << 30).unwrap(),
            Some(bytes.clone())
        );
        let json = serde_json::to_vec(&wrap_base64_crlf(&encode_plain_base64(&bytes))).unwrap();
        assert_eq!(agree(&json, &[CHUNK], 1 << 30).unwrap(), Some(bytes));
    }
    assert!(n >= 100);
}

/// A big zipped body unpacks through a scratch file; one past the limit is refused and
/// leaves no file behind.
#[test]
fn a_big_zip_unpacks_from_a_scratch_file_and_a_bomb_is_refused() {
    let (_d, s) = fresh();
    let bytes = noise(7, 3 << 20);
    let body = encode_zip_base64(&bytes, "big.txt").into_bytes();
    assert_eq!(
        agree(&body, &[1, 1 << 20], 4 << 20).unwrap(),
        Some(bytes.clone())
    );
    assert_eq!(streamed(&s, &body, &[5], 4 << 20).unwrap(), bytes);
    let bomb = encode_plain_base64(&zip_one(&vec![0u8; 8 << 20], "bomb.txt")).into_bytes();
    let e = streamed(&s, &bomb, &[], 4 << 20).unwrap_err();
    assert!(e.contains("larger than the limit"), "{e}");
    let big_bomb = noise(9, 1 << 20)
        .into_iter()
        .chain(std::iter::repeat_n(0, 8 << 20))
        .collect::<Vec<u8>>();
    let body = encode_zip_base64(&big_bomb, "b.txt").into_bytes();
    assert!(body.len() > 1 << 20, "the ZIP spills to a scratch file");
    assert!(streamed(&s, &body, &[], 4 << 20).is_err());
    assert_eq!(
        std::fs::read_dir(s.scratch_dir()).unwrap().count(),
        0,
        "no scratch file left"
    );
}

/// The reply file holds the same bytes the in-memory path serialises (at the same deflate
/// level), around the encoder's 48-byte-line buffer boundary too.
#[test]
fn the_reply_encoder_writes_what_the_in_memory_path_serialises() {
    let (_d, s) = fresh();
    const HEAD: &[u8] = br#"{"data":""#;
    const TAIL: &[u8] = br#"","errcode":"0","errmessage":"","packagetype":"spr"}"#;
    for size in [
        0,
        1,
        47,
        48,
        49,
        1000,
        48 * 4096 - 1,
        48 * 4096,
        48 * 4096 + 1,
        3 << 20,
    ] {
        let bytes = noise(size as u64 + 1, size);
        let mut file = Vec::new();
        encode_reply(
            &mut &bytes[..],
            size as u64,
            "spr_1_7.txt",
            None,
            HEAD,
            TAIL,
            s.scratch_dir(),
            &mut file,
        )
        .unwrap();
        let data = encode_zip_base64(&bytes, "spr_1_7.txt");
        let mut want = serde_json::to_vec(&serde_json::json!({ "data": data })).unwrap();
        want.pop();
        want.extend_from_slice(&TAIL[1..]);
        assert!(
            file == want,
            "size {size}: differs from the in-memory reply"
        );
        // And at the fast level of big replies, the till still gets the exact bytes.
        let mut fast = Vec::new();
        encode_reply(
            &mut &bytes[..],
            size as u64,
            "spr_1_7.txt",
            Some(1),
            HEAD,
            TAIL,
            s.scratch_dir(),
            &mut fast,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&fast).unwrap();
        let got = decode_package_data(v["data"].as_str().unwrap().as_bytes(), 1 << 30).unwrap();
        assert!(got == bytes, "size {size}: level 1 round trip");
    }
    assert_eq!(
        std::fs::read_dir(s.scratch_dir()).unwrap().count(),
        0,
        "the scratch ZIP is removed"
    );
}

/// A JSON string body that serde_json refuses (bad UTF-8, a lone surrogate) is refused as
/// JSON, not later as base64.
#[test]
fn json_bodies_are_refused_where_serde_json_refuses_them() {
    for body in [
        &b"\"QUJD\xff\""[..],
        b"\"QU\xc3\"",
        b"\"QUJD\xed\xa0\x80\"",
        b"\"QUJD\\ud800\"",
        b"\"\\udc00QUJD\"",
        b"\"\\ud800\\u0041\"",
    ] {
        let e = streamed(store(), body, &[], 1 << 20).unwrap_err();
        assert!(e.contains("surrogate") || e.contains("UTF-8"), "{e}");
        let e = in_memory(body, 1 << 20).unwrap_err();
        assert!(e.starts_with("json:"), "{e}");
    }
    // Paired surrogates and valid UTF-8 are JSON; they are just not base64.
    for body in [&b"\"QUJD\\ud83d\\ude00\""[..], "\"QUJDё\"".as_bytes()] {
        let e = streamed(store(), body, &[], 1 << 20).unwrap_err();
        assert!(e.contains("symbol"), "{e}");
    }
}
