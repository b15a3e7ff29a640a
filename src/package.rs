//! The package model: what moves through the bridge, how its files are named, and the
//! KKMTransfer wrapping (ZIP + base64) of PROTOCOL.md §4.
//!
//! Bytes are sacred (PROTOCOL.md §1): nothing here rewrites a payload. The only
//! transformation is the HTTP wrapping, and it round-trips bit for bit.

use std::fmt;
use std::io::{Read, Write};
use std::path::PathBuf;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

/// What a package is (PROTOCOL.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// "справочник": goods, prices, users; back office → till.
    Spr,
    /// "запрос транзакций": asks a till to upload again; back office → till.
    Flr,
    /// "отчёт": the till's transactions; till → back office.
    Rep,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Spr, Kind::Flr, Kind::Rep];
    pub const DOWN: [Kind; 2] = [Kind::Spr, Kind::Flr];
    pub const UP: [Kind; 1] = [Kind::Rep];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Spr => "spr",
            Kind::Flr => "flr",
            Kind::Rep => "rep",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "spr" => Some(Kind::Spr),
            "flr" => Some(Kind::Flr),
            "rep" => Some(Kind::Rep),
            _ => None,
        }
    }

    /// Which way this kind flows.
    pub fn direction(self) -> Direction {
        match self {
            Kind::Spr | Kind::Flr => Direction::Down,
            Kind::Rep => Direction::Up,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Down = office → kassa (spr, flr); Up = kassa → office (rep).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Down,
    Up,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Down => "down",
            Direction::Up => "up",
        }
    }
    pub fn parse(s: &str) -> Option<Direction> {
        match s {
            "down" => Some(Direction::Down),
            "up" => Some(Direction::Up),
            _ => None,
        }
    }
    pub fn kinds(self) -> &'static [Kind] {
        match self {
            Direction::Down => &Kind::DOWN,
            Direction::Up => &Kind::UP,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One package in the durable store: one back-office document or one till upload.
/// The payload stays in the store (inline in the journal row, or a spool file); read it
/// with `Store::payload` / `Store::payload_bytes`.
#[derive(Debug, Clone)]
pub struct Package {
    /// Journal id; the order of ids is the order packages were taken from their source.
    pub id: i64,
    pub link: String,
    pub pos: u32,
    pub kind: Kind,
    /// The number the source gave it (`.$n`, HTTP package number), if any.
    pub source_seq: Option<i64>,
    pub source_name: String,
    pub uid: Option<String>,
    pub size: u64,
    pub sha256: String,
    /// The spool file holding the bytes (empty when they are inline in the journal).
    pub payload: PathBuf,
    /// The bytes are in the journal row; read them with `Store::payload`.
    pub inline: bool,
}

impl Package {
    /// "till 3, spr package 17 (POS3.spr.$2)" — for error messages and logs.
    pub fn describe(&self) -> String {
        format!(
            "link {}, till {}, {} package #{} ({})",
            self.link, self.pos, self.kind, self.id, self.source_name
        )
    }
}

// ---------------------------------------------------------------------------------------
// File names: patterns with {pos} and the `.$n` suffix (PROTOCOL.md §2, §3.1).
// ---------------------------------------------------------------------------------------

/// The prefix of every temp file the bridge writes where others read. No pattern may
/// start with a dot, so no reader ever matches it.
pub const TEMP_PREFIX: &str = ".kkm-bridge.";
pub const TEMP_SUFFIX: &str = ".tmp";

/// A temp name no reader matches: `.kkm-bridge.<random>.tmp`.
pub fn temp_name() -> String {
    use rand::Rng;
    let r: u64 = rand::thread_rng().gen();
    format!("{TEMP_PREFIX}{r:016x}{TEMP_SUFFIX}")
}

/// A random tag for the temps of one batch: `temp_name_tagged(tag, i)` names them
/// `.kkm-bridge.<tag>-<i>.tmp`, so that one glob lists them all.
pub fn temp_tag() -> String {
    use rand::Rng;
    let r: u64 = rand::thread_rng().gen();
    format!("{r:016x}")
}

pub fn temp_name_tagged(tag: &str, i: usize) -> String {
    format!("{TEMP_PREFIX}{tag}-{i}{TEMP_SUFFIX}")
}

pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
}

/// A file-name pattern such as `POS{pos}.spr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    prefix: String,
    suffix: String,
}

/// What a file name says once parsed against a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedName {
    pub pos: u32,
    /// The `.$n` number; `None` in single-file mode.
    pub n: Option<u32>,
}

impl NamePattern {
    /// Checks a pattern: exactly one `{pos}`, no path separators, no leading dot, no `$`.
    pub fn new(pattern: &str) -> Result<NamePattern, String> {
        let count = pattern.matches("{pos}").count();
        if count != 1 {
            return Err(format!(
                "pattern {pattern:?} must contain {{pos}} exactly once (found {count})"
            ));
        }
        if pattern.contains(['/', '\\', '\0']) || pattern.contains("..") {
            return Err(format!(
                "pattern {pattern:?} must be a plain file name (no '/', '\\' or '..')"
            ));
        }
        if pattern.starts_with('.') {
            return Err(format!(
                "pattern {pattern:?} must not start with '.' (reserved for temp files)"
            ));
        }
        if pattern.contains('$') {
            return Err(format!(
                "pattern {pattern:?} must not contain '$' (the .$n suffix is added by `numbered`)"
            ));
        }
        let (prefix, suffix) = pattern.split_once("{pos}").expect("counted above");
        if prefix.contains(['{', '}']) || suffix.contains(['{', '}']) {
            return Err(format!(
                "pattern {pattern:?} has an unknown placeholder; only {{pos}} is known"
            ));
        }
        if suffix.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            return Err(format!(
                "pattern {pattern:?}: {{pos}} must not be followed by a digit"
            ));
        }
        Ok(NamePattern {
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        })
    }

    /// The name for till `pos`, with `.$n` when `n` is given.
    pub fn render(&self, pos: u32, n: Option<u32>) -> String {
        match n {
            Some(n) => format!("{}{}{}.${}", self.prefix, pos, self.suffix, n),
            None => format!("{}{}{}", self.prefix, pos, self.suffix),
        }
    }

    /// Parses `name` in numbered mode (`POS1.spr.$3`) or single-file mode (`POS1.spr`).
    /// Numbers must be canonical (no sign, no leading zero) so that parse∘render is exact.
    pub fn parse(&self, name: &str, numbered: bool) -> Option<ParsedName> {
        let rest = name.strip_prefix(&self.prefix)?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let pos = parse_canonical(&rest[..digits])?;
        let rest = rest[digits..].strip_prefix(&self.suffix)?;
        if numbered {
            let n = parse_canonical(rest.strip_prefix(".$")?)?;
            if n == 0 {
                return None;
            }
            Some(ParsedName { pos, n: Some(n) })
        } else if rest.is_empty() {
            Some(ParsedName { pos, n: None })
        } else {
            None
        }
    }
}

fn parse_canonical(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Line 2 of an spr file is `@` once a loader has loaded it (PROTOCOL.md §1.1, [peer]).
/// `head` is the start of the file; a BOM and CRLF or LF line ends are accepted.
pub fn spr_marked_loaded(head: &[u8]) -> bool {
    let mut lines = head.split(|&b| b == b'\n');
    let _first = lines.next();
    match lines.next() {
        Some(line) => {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            line.first() == Some(&b'@')
        }
        None => false,
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------------------
// The KKMTransfer wrapping (PROTOCOL.md §4.1): ZIP with one deflated entry, base64,
// CRLF every 64 characters. Decoders accept wrapped or not, zipped or not.
// ---------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("data is not valid base64: {0}")]
    Base64(String),
    #[error("ZIP archive is damaged: {0}")]
    Zip(String),
    #[error("ZIP archive must hold exactly one file, it holds {0}")]
    ZipEntries(usize),
    #[error("ZIP entry is not a file")]
    ZipNotAFile,
    #[error("unpacked data is larger than the limit of {0} bytes")]
    TooLarge(u64),
}

/// The signature a ZIP archive starts with (its first local file header).
pub const ZIP_LOCAL: &[u8] = b"PK\x03\x04";
const ZIP_EMPTY: &[u8] = b"PK\x05\x06";

/// The name of the single entry inside the ZIP the bridge serves. The vendor example uses
/// a 1C temp name (`v8_9969_15.txt`); the till reads the one file whatever its name.
/// [decision] kept here, in one place.
pub fn zip_entry_name(kind: Kind, pos: u32, id: i64) -> String {
    format!("{}_{}_{}.txt", kind.as_str(), pos, id)
}

/// Wraps `bytes` exactly as the vendor does: deflate ZIP with one entry, then base64 with
/// CRLF every 64 characters.
pub fn encode_zip_base64(bytes: &[u8], entry_name: &str) -> String {
    wrap_base64_crlf(&STANDARD.encode(zip_one(bytes, entry_name)))
}

/// Plain base64 of the bytes, no ZIP, no line breaks (the default report body of §4.3).
pub fn encode_plain_base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// A ZIP archive with one deflated entry.
pub fn zip_one(bytes: &[u8], entry_name: &str) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::with_capacity(bytes.len() / 2 + 128));
    {
        let mut w = zip::ZipWriter::new(&mut out);
        w.start_file(entry_name, zip_entry_options(bytes.len() as u64, None))
            .expect("writing a ZIP into memory cannot fail");
        w.write_all(bytes)
            .expect("writing a ZIP into memory cannot fail");
        w.finish().expect("writing a ZIP into memory cannot fail");
    }
    out.into_inner()
}

/// The options of the one entry the bridge zips: deflate at `level` (None: the zip crate's
/// default, 6), ZIP64 fields when the entry is 4 GiB or more.
pub(crate) fn zip_entry_options(size: u64, level: Option<i64>) -> zip::write::SimpleFileOptions {
    zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(level)
        .large_file(size >= u32::MAX as u64)
}

/// Inserts CRLF after every 64 characters (1C style), none at the end.
pub fn wrap_base64_crlf(b64: &str) -> String {
    let mut out = String::with_capacity(b64.len() + b64.len() / 32 + 2);
    for (i, chunk) in b64.as_bytes().chunks(64).enumerate() {
        if i > 0 {
            out.push_str("\r\n");
        }
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
    }
    out
}

/// The base64 engine of every decoder: standard alphabet, padding optional.
pub(crate) const STANDARD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes base64 text, ignoring ASCII whitespace (CRLF wrapping), padding optional.
pub fn decode_base64(text: &[u8]) -> Result<Vec<u8>, CodecError> {
    let clean: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    STANDARD
        .decode(&clean)
        .map_err(|e| CodecError::Base64(e.to_string()))
}

/// Whether decoded bytes are a ZIP archive, by their signature (an empty archive counts,
/// so that it is refused as one rather than stored as a report).
pub fn is_zip(head: &[u8]) -> bool {
    head.starts_with(ZIP_LOCAL) || head.starts_with(ZIP_EMPTY)
}

/// If `bytes` is a ZIP archive (by its signature), returns its single entry; otherwise the
/// bytes as they are. `max` bounds the unpacked size (zip bombs).
pub fn unzip_if_zipped(bytes: Vec<u8>, max: u64) -> Result<Vec<u8>, CodecError> {
    if !is_zip(&bytes) {
        if bytes.len() as u64 > max {
            return Err(CodecError::TooLarge(max));
        }
        return Ok(bytes);
    }
    let mut out = Vec::new();
    match unzip_single(std::io::Cursor::new(bytes), &mut out, max) {
        Ok(_) => Ok(out),
        Err(UnzipError::Codec(e)) => Err(e),
        Err(UnzipError::Write(e)) => Err(CodecError::Zip(e.to_string())),
    }
}

/// Why [`unzip_single`] failed: the archive, or the writer it unpacks into.
#[derive(Debug)]
pub enum UnzipError {
    Codec(CodecError),
    Write(std::io::Error),
}

/// Unpacks the single file of a ZIP archive into `out`, refusing archives that hold
/// anything else and entries that unpack past `max` bytes (zip bombs; the declared size can
/// lie, so the bytes are counted). Returns the unpacked size. The one unzip of the bridge,
/// for bodies in memory and in scratch files alike.
pub fn unzip_single<R: Read + std::io::Seek, W: Write>(
    archive: R,
    out: &mut W,
    max: u64,
) -> Result<u64, UnzipError> {
    let zip_err = |e: &dyn fmt::Display| UnzipError::Codec(CodecError::Zip(e.to_string()));
    let mut archive = zip::ZipArchive::new(archive).map_err(|e| zip_err(&e))?;
    if archive.len() != 1 {
        return Err(UnzipError::Codec(CodecError::ZipEntries(archive.len())));
    }
    let mut entry = archive.by_index(0).map_err(|e| zip_err(&e))?;
    if !entry.is_file() {
        return Err(UnzipError::Codec(CodecError::ZipNotAFile));
    }
    if entry.size() > max {
        return Err(UnzipError::Codec(CodecError::TooLarge(max)));
    }
    let mut buf = vec![0u8; entry.size().clamp(8 << 10, 256 << 10) as usize];
    let mut total = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(zip_err(&e)),
        };
        total += n as u64;
        if total > max {
            return Err(UnzipError::Codec(CodecError::TooLarge(max)));
        }
        out.write_all(&buf[..n]).map_err(UnzipError::Write)?;
    }
}

/// Decodes a `data` attribute or a SendData body: base64 (wrapped or not) of the file or of
/// a ZIP holding it.
pub fn decode_package_data(text: &[u8], max: u64) -> Result<Vec<u8>, CodecError> {
    unzip_if_zipped(decode_base64(text)?, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn vendor_receive_spr_json_decodes_to_the_exact_file() {
        let json: serde_json::Value = serde_json::from_slice(&fixture("receive-spr.json")).unwrap();
        let data = json["data"].as_str().unwrap();
        let zip = decode_base64(data.as_bytes()).unwrap();
        assert_eq!(zip, fixture("receive-spr.zip"));
        let file = decode_package_data(data.as_bytes(), 1 << 20).unwrap();
        assert_eq!(file, fixture("v8_9969_15.txt"));
        assert_eq!(file.len(), 20);
        assert_eq!(json["packagetype"], "spr");
        assert_eq!(json["errcode"], "0");
    }

    #[test]
    fn vendor_data_is_wrapped_like_ours() {
        let json: serde_json::Value = serde_json::from_slice(&fixture("receive-spr.json")).unwrap();
        let data = json["data"].as_str().unwrap();
        let rewrapped = wrap_base64_crlf(&data.replace("\r\n", ""));
        assert_eq!(rewrapped, data);
    }

    #[test]
    fn every_fixture_round_trips_bit_for_bit() {
        for name in [
            "POS1.rep.cp1251",
            "POS1.rep.utf8bom",
            "POS1.spr.cp1251",
            "POS1.spr.utf8bom",
            "v8_9969_15.txt",
            "receive-spr.zip",
        ] {
            let bytes = fixture(name);
            let wrapped = encode_zip_base64(&bytes, "x.txt");
            assert!(wrapped
                .lines()
                .all(|l| l.trim_end_matches('\r').len() <= 64));
            assert!(!wrapped.ends_with('\n'));
            let back = decode_package_data(wrapped.as_bytes(), 1 << 20).unwrap();
            assert_eq!(back, bytes, "{name} zipped");
            let plain = encode_plain_base64(&bytes);
            if !bytes.starts_with(ZIP_LOCAL) {
                assert_eq!(
                    decode_package_data(plain.as_bytes(), 1 << 20).unwrap(),
                    bytes,
                    "{name} plain"
                );
            }
        }
    }

    #[test]
    fn encoded_zip_has_one_deflated_entry() {
        let bytes = fixture("POS1.spr.utf8bom");
        let zip = zip_one(&bytes, "spr_1_1.txt");
        let mut a = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
        assert_eq!(a.len(), 1);
        let e = a.by_index(0).unwrap();
        assert_eq!(e.name(), "spr_1_1.txt");
        assert_eq!(e.compression(), zip::CompressionMethod::Deflated);
    }

    #[test]
    fn bad_input_is_refused_clearly() {
        assert!(matches!(
            decode_package_data(b"not base64!!", 100),
            Err(CodecError::Base64(_))
        ));
        let two = {
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
        assert_eq!(unzip_if_zipped(two, 100), Err(CodecError::ZipEntries(2)));
        let big = zip_one(&vec![b'a'; 10_000], "a");
        assert_eq!(unzip_if_zipped(big, 100), Err(CodecError::TooLarge(100)));
        let broken = b"PK\x03\x04garbage".to_vec();
        assert!(matches!(
            unzip_if_zipped(broken, 100),
            Err(CodecError::Zip(_))
        ));
    }

    #[test]
    fn numbered_names_parse_and_sort_numerically() {
        let p = NamePattern::new("POS{pos}.spr").unwrap();
        assert_eq!(
            p.parse("POS1.spr.$10", true),
            Some(ParsedName {
                pos: 1,
                n: Some(10)
            })
        );
        assert_eq!(
            p.parse("POS12.spr", false),
            Some(ParsedName { pos: 12, n: None })
        );
        for bad in [
            "POS1.spr",
            "POS1.spr.$",
            "POS1.spr.$0",
            "POS1.spr.$01",
            "POS01.spr.$1",
            "POS.spr.$1",
            "POS1.spr.$1.tmp",
            "POS1.rep.$1",
            "xPOS1.spr.$1",
            "POS-1.spr.$1",
            "POS1.spr.$99999999999",
        ] {
            assert_eq!(p.parse(bad, true), None, "{bad}");
        }
        assert_eq!(p.parse("POS1.spr.$1", false), None);
        let mut names = vec!["POS1.spr.$10", "POS1.spr.$9", "POS1.spr.$1", "POS1.spr.$2"];
        names.sort_by_key(|n| p.parse(n, true).unwrap().n);
        assert_eq!(
            names,
            ["POS1.spr.$1", "POS1.spr.$2", "POS1.spr.$9", "POS1.spr.$10"]
        );
        assert_eq!(p.render(7, Some(3)), "POS7.spr.$3");
        assert_eq!(p.render(7, None), "POS7.spr");
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "POS.spr",
            "{pos}{pos}",
            "../{pos}",
            "a/{pos}",
            ".{pos}",
            "{pos}1",
            "P{x}{pos}",
            "{pos}.$",
        ] {
            assert!(NamePattern::new(bad).is_err(), "{bad}");
        }
        assert!(NamePattern::new("{pos}").is_ok());
        assert!(NamePattern::new("Files_{pos}.txt").is_ok());
    }

    #[test]
    fn loaded_flag_on_line_two() {
        assert!(spr_marked_loaded(b"##@@&&\r\n@\r\n1;2;"));
        assert!(spr_marked_loaded(b"\xEF\xBB\xBF##@@&&$$$RPL\n@\n"));
        assert!(!spr_marked_loaded(b"##@@&&\r\n#\r\n"));
        assert!(!spr_marked_loaded(b"##@@&&"));
        assert!(!spr_marked_loaded(&fixture("POS1.spr.cp1251")));
    }

    #[test]
    fn temp_names_never_match_patterns() {
        let t = temp_name();
        assert!(is_temp_name(&t));
        let p = NamePattern::new("{pos}").unwrap();
        assert_eq!(p.parse(&t, true), None);
        assert_eq!(p.parse(&t, false), None);
    }
}
