//! The KKMTransfer wrapping (PROTOCOL.md §4) a piece at a time, for packages too big to
//! hold in memory: "stream big files, never hold more than a few packages in memory".
//!
//! Decoding (SendData bodies): a [`TextDecoder`] is fed the body as it arrives. A JSON
//! string wrapper, if the body is one, is unescaped; the text is base64-decoded (ASCII
//! whitespace and CRLF wrapping ignored, padding optional). A [`ReportSink`] takes the
//! bytes: into the store's spool writer, or, when they are a ZIP, into a [`Scratch`]
//! buffer that [`ReportSink::finish`] unpacks into the spool writer with the same bomb
//! limit. [`BodyDecoder`] is the two together. It accepts what the in-memory path
//! (`body_base64`, `package::decode_package_data`) accepts and yields the same bytes
//! (property-tested in tests/stream_codec.rs); only some error texts differ.
//!
//! Encoding (ReceiveData replies): [`encode_reply`] writes a whole reply to a file: the
//! payload zipped into a scratch file (the zip crate seeks back to fill in the header),
//! then base64 with a JSON-escaped CRLF every 64 characters between the JSON head and tail
//! the in-memory path serialises. [`ReplyCache`] encodes each package once (ahead of the
//! till's request, or on it) and hands out the file to stream.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use base64::{DecodeError, Engine as _};

use crate::package::{
    is_zip, temp_name, unzip_single, zip_entry_options, CodecError, UnzipError, STANDARD,
};
use crate::store::SpoolWriter;

/// The size of the pieces big packages move in: reads, writes, decoding steps, HTTP body
/// frames.
pub const CHUNK: usize = 256 << 10;

/// A zipped body is unpacked from memory up to this size, from a scratch file beyond.
const SCRATCH_IN_MEMORY: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The body starts like a JSON string (`"`) but is not one.
    #[error("{0}")]
    Json(String),
    /// The text is not base64 (offsets count base64 characters, whitespace skipped, as
    /// `package::decode_base64` counts them).
    #[error("{0}")]
    Base64(DecodeError),
    /// The decoded bytes are a ZIP that is damaged, holds other than one file, or unpacks
    /// past the limit.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The store could not take the bytes (disk full, I/O error).
    #[error("{0}")]
    Io(#[from] io::Error),
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// JSON's own whitespace (serde_json accepts these around a value, nothing else).
fn json_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

#[derive(Debug, Clone, Copy)]
enum JsonState {
    /// Before the opening quote.
    Lead,
    /// Inside the string.
    Str,
    /// After a backslash.
    Escape,
    /// In a `\uXXXX` escape: hex digits still to come, value so far.
    Hex { left: u8, value: u32 },
    /// After the closing quote: only whitespace may follow.
    Trail,
}

/// Unescapes one JSON string value fed in pieces (the SendData body `"…\r\n…"`, the
/// `data` attribute of a ReceiveData reply).
#[derive(Debug)]
struct JsonString {
    state: JsonState,
    /// Bytes consumed before the current piece, for error positions.
    at: u64,
    /// A `\uD800`–`\uDBFF` escape waiting for the low surrogate that must follow it.
    high: Option<u32>,
    /// Continuation bytes still due in a UTF-8 sequence, and the range of the next one.
    utf8_left: u8,
    utf8_next: (u8, u8),
}

impl JsonString {
    fn new(state: JsonState) -> JsonString {
        JsonString {
            state,
            at: 0,
            high: None,
            utf8_left: 0,
            utf8_next: (0x80, 0xBF),
        }
    }

    /// One byte of a UTF-8 sequence (RFC 3629: no overlong forms, no surrogates, nothing
    /// past U+10FFFF).
    fn utf8(&mut self, b: u8) -> Result<(), ()> {
        if self.utf8_left > 0 {
            let (lo, hi) = self.utf8_next;
            if !(lo..=hi).contains(&b) {
                return Err(());
            }
            self.utf8_left -= 1;
            self.utf8_next = (0x80, 0xBF);
            return Ok(());
        }
        (self.utf8_left, self.utf8_next) = match b {
            0xC2..=0xDF => (1, (0x80, 0xBF)),
            0xE0 => (2, (0xA0, 0xBF)),
            0xE1..=0xEC | 0xEE..=0xEF => (2, (0x80, 0xBF)),
            0xED => (2, (0x80, 0x9F)),
            0xF0 => (3, (0x90, 0xBF)),
            0xF1..=0xF3 => (3, (0x80, 0xBF)),
            0xF4 => (3, (0x80, 0x8F)),
            _ => return Err(()),
        };
        Ok(())
    }

    fn err(&self, i: usize, what: &str) -> StreamError {
        StreamError::Json(format!("{what} at byte {}", self.at + i as u64))
    }

    /// Appends the unescaped characters of `input` to `out`. Returns how many bytes of
    /// `input` belong to the string (all of them, unless it closed inside `input` and
    /// `stop_at_end` is set).
    fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        stop_at_end: bool,
    ) -> Result<usize, StreamError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                JsonState::Str => {
                    if self.utf8_left > 0 || b >= 0x80 {
                        // UTF-8 is checked as serde_json checks it (base64 is ASCII, so this
                        // is never the fast path).
                        if self.high.is_some() {
                            return Err(self.err(i, "a lone leading surrogate in a \\u escape"));
                        }
                        self.utf8(b)
                            .map_err(|()| self.err(i, "invalid UTF-8 in the string"))?;
                        out.push(b);
                        i += 1;
                        continue;
                    }
                    let run = if self.high.is_some() {
                        0 // only the escape of the low surrogate may follow
                    } else {
                        input[i..]
                            .iter()
                            .position(|&b| b == b'"' || b == b'\\' || !(0x20..0x80).contains(&b))
                            .unwrap_or(input.len() - i)
                    };
                    out.extend_from_slice(&input[i..i + run]);
                    i += run;
                    match input.get(i) {
                        None => break,
                        Some(b'\\') => self.state = JsonState::Escape,
                        Some(_) if self.high.is_some() => {
                            return Err(self.err(i, "a lone leading surrogate in a \\u escape"))
                        }
                        Some(&b) if b >= 0x80 => continue,
                        Some(b'"') => {
                            self.state = JsonState::Trail;
                            if stop_at_end {
                                self.at += i as u64 + 1;
                                return Ok(i + 1);
                            }
                        }
                        Some(_) => return Err(self.err(i, "a control character inside the string")),
                    }
                }
                JsonState::Lead => match b {
                    b'"' => self.state = JsonState::Str,
                    b if json_ws(b) => {}
                    _ => return Err(self.err(i, "expected a string")),
                },
                JsonState::Escape => {
                    if self.high.is_some() && b != b'u' {
                        return Err(self.err(i, "a lone leading surrogate in a \\u escape"));
                    }
                    let c = match b {
                        b'"' | b'\\' | b'/' => b,
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'u' => {
                            self.state = JsonState::Hex { left: 4, value: 0 };
                            i += 1;
                            continue;
                        }
                        _ => return Err(self.err(i, "an invalid escape")),
                    };
                    out.push(c);
                    self.state = JsonState::Str;
                }
                JsonState::Hex { left, value } => {
                    let Some(d) = (b as char).to_digit(16) else {
                        return Err(self.err(i, "an invalid \\u escape"));
                    };
                    let value = value * 16 + d;
                    if left > 1 {
                        self.state = JsonState::Hex {
                            left: left - 1,
                            value,
                        };
                    } else {
                        // Surrogates pair up as serde_json requires; anything past ASCII is
                        // no base64 and is passed on for the decoder to refuse.
                        let c = match (self.high.take(), value) {
                            (None, 0xD800..=0xDBFF) => None,
                            (Some(h), 0xDC00..=0xDFFF) => {
                                char::from_u32(0x10000 + ((h - 0xD800) << 10) + (value - 0xDC00))
                            }
                            (None, 0xDC00..=0xDFFF) | (Some(_), _) => {
                                return Err(self.err(i, "a lone surrogate in a \\u escape"))
                            }
                            (None, v) => char::from_u32(v),
                        };
                        match c {
                            Some(c) => {
                                let mut utf8 = [0u8; 4];
                                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                            }
                            None => self.high = Some(value),
                        }
                        self.state = JsonState::Str;
                    }
                }
                JsonState::Trail => {
                    if !json_ws(b) {
                        return Err(self.err(i, "trailing characters after the string"));
                    }
                }
            }
            i += 1;
        }
        self.at += input.len() as u64;
        Ok(input.len())
    }

    fn finish(&self) -> Result<(), StreamError> {
        match self.state {
            JsonState::Trail => Ok(()),
            _ => Err(StreamError::Json(format!(
                "EOF while parsing a string at byte {}",
                self.at
            ))),
        }
    }
}

/// Moves a decode error's offsets from a piece to the whole text.
fn shift(e: DecodeError, by: u64) -> DecodeError {
    let by = by as usize;
    match e {
        DecodeError::InvalidByte(at, b) => DecodeError::InvalidByte(at + by, b),
        DecodeError::InvalidLastSymbol(at, b) => DecodeError::InvalidLastSymbol(at + by, b),
        DecodeError::InvalidLength(n) => DecodeError::InvalidLength(n + by),
        DecodeError::InvalidPadding => DecodeError::InvalidPadding,
    }
}

/// Where decoded bytes go, a piece at a time.
pub type Emit<'a> = dyn FnMut(&[u8]) -> Result<(), StreamError> + 'a;

/// Appends `text` without its ASCII whitespace to `out`. Every ASCII whitespace byte is at
/// most `b' '`, so runs of bytes above it (all of the base64 between line breaks) are
/// found 32 at a time and copied whole.
fn strip_whitespace(text: &[u8], out: &mut Vec<u8>) {
    const BLOCK: usize = 32;
    out.reserve(text.len());
    let mut i = 0;
    while i < text.len() {
        let start = i;
        while i + BLOCK <= text.len()
            && text[i..i + BLOCK]
                .iter()
                .fold(true, |all, &b| all & (b > b' '))
        {
            i += BLOCK;
        }
        while i < text.len() && text[i] > b' ' {
            i += 1;
        }
        out.extend_from_slice(&text[start..i]);
        while i < text.len() && text[i] <= b' ' {
            // Control bytes that are not whitespace stay, for the decoder to refuse.
            if !text[i].is_ascii_whitespace() {
                out.push(text[i]);
            }
            i += 1;
        }
    }
}

/// Base64 text fed in pieces. Whitespace is dropped; whole quads are decoded a chunk at a
/// time, always keeping the last 1–4 characters back, because only the final quad may
/// carry padding or a short length.
#[derive(Debug, Default)]
struct Base64Stream {
    pending: Vec<u8>,
    /// Characters decoded so far (whitespace not counted).
    done: u64,
    out: Vec<u8>,
}

impl Base64Stream {
    fn feed(&mut self, text: &[u8], emit: &mut Emit<'_>) -> Result<(), StreamError> {
        strip_whitespace(text, &mut self.pending);
        if self.pending.len() >= CHUNK {
            self.decode(emit, false)?;
        }
        Ok(())
    }

    fn decode(&mut self, emit: &mut Emit<'_>, last: bool) -> Result<(), StreamError> {
        let n = if last {
            self.pending.len()
        } else {
            (self.pending.len().saturating_sub(1)) / 4 * 4
        };
        let quads = &self.pending[..n];
        // Padding before the end: what comes before it decodes, then it is refused (the
        // whole-text decoder says the same: `=` is only allowed in the final quad).
        let padding = if last {
            None
        } else {
            memchr::memchr(b'=', quads)
        };
        let quads = match padding {
            Some(p) => &quads[..p / 4 * 4],
            None => quads,
        };
        let room = quads.len().div_ceil(4) * 3;
        if self.out.len() < room {
            self.out.resize(room, 0);
        }
        // Whole quads without padding (all but the last piece): the SIMD decoder, 3–4×
        // the speed of the scalar one on a 1 GiB report. Anything it refuses, and the
        // last piece (padding, trailing bits), goes to the scalar decoder, whose error
        // names the position.
        let fast = if last {
            None
        } else {
            base64_simd::STANDARD
                .decode(quads, base64_simd::Out::from_slice(&mut self.out[..room]))
                .ok()
                .map(|d| d.len())
        };
        let m = match fast {
            Some(m) => Ok(m),
            None => STANDARD.decode_slice(quads, &mut self.out),
        }
        .map_err(|e| match e {
            base64::DecodeSliceError::DecodeError(e) => StreamError::Base64(shift(e, self.done)),
            base64::DecodeSliceError::OutputSliceTooSmall => {
                unreachable!("the buffer holds 3 bytes per quad")
            }
        })?;
        emit(&self.out[..m])?;
        if let Some(p) = padding {
            return Err(StreamError::Base64(DecodeError::InvalidByte(
                self.done as usize + p,
                b'=',
            )));
        }
        self.done += n as u64;
        self.pending.drain(..n);
        Ok(())
    }
}

/// A spool writer that counts what it is given and keeps the first bytes (to refuse an
/// empty report or a ZIP inside the ZIP before anything is made durable).
struct Tracked {
    writer: SpoolWriter,
    len: u64,
    head: Vec<u8>,
}

impl Write for Tracked {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.writer.write(buf)?;
        if self.head.len() < HEAD {
            let take = (HEAD - self.head.len()).min(n);
            self.head.extend_from_slice(&buf[..take]);
        }
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

/// How many leading bytes are kept to sniff (a ZIP signature is 4).
const HEAD: usize = 4;

enum Dest {
    /// Not a ZIP: the decoded bytes are the report.
    Report,
    /// A ZIP: kept to be unpacked at the end (its directory is at its end).
    Zip(Scratch),
}

/// Where a package's decoded bytes go (a report from SendData, or a package the bridge
/// pulls as a till), decided by their first four bytes: the spool writer, or (a ZIP) a
/// [`Scratch`] buffer unpacked into the spool writer by [`ReportSink::finish`]. `max`
/// bounds the package (zip bombs).
pub struct ReportSink {
    /// The first decoded bytes, while there are fewer than four.
    sniff: Vec<u8>,
    dest: Option<Dest>,
    report: Tracked,
    scratch_dir: PathBuf,
    max: u64,
}

impl ReportSink {
    pub fn new(report: SpoolWriter, scratch_dir: &Path, max: u64) -> ReportSink {
        ReportSink {
            sniff: Vec::new(),
            dest: None,
            report: Tracked {
                writer: report,
                len: 0,
                head: Vec::new(),
            },
            scratch_dir: scratch_dir.to_path_buf(),
            max,
        }
    }

    /// The next decoded bytes.
    pub fn put(&mut self, buf: &[u8]) -> Result<(), StreamError> {
        if self.dest.is_some() {
            return self.put_decided(buf);
        }
        if self.sniff.len() + buf.len() < HEAD {
            self.sniff.extend_from_slice(buf);
            return Ok(());
        }
        let sniff = std::mem::take(&mut self.sniff);
        let zip = if sniff.is_empty() {
            is_zip(buf)
        } else {
            let mut first = sniff.clone();
            first.extend_from_slice(&buf[..HEAD - sniff.len()]);
            is_zip(&first)
        };
        self.dest = Some(if zip {
            Dest::Zip(Scratch::new(&self.scratch_dir))
        } else {
            Dest::Report
        });
        self.put_decided(&sniff)?;
        self.put_decided(buf)
    }

    fn put_decided(&mut self, buf: &[u8]) -> Result<(), StreamError> {
        match self.dest.as_mut().expect("decided") {
            Dest::Report => {
                if self.report.len + buf.len() as u64 > self.max {
                    return Err(CodecError::TooLarge(self.max).into());
                }
                self.report.write_all(buf)?;
            }
            // Its size is bounded by the body's (max_body).
            Dest::Zip(s) => s.write_all(buf)?,
        }
        Ok(())
    }

    /// Whether the bytes are a ZIP ([`ReportSink::finish`] unpacks it: blocking work).
    pub fn is_zip(&self) -> bool {
        matches!(self.dest, Some(Dest::Zip(_)))
    }

    /// All bytes are in: unpacks a ZIP (blocking: a big one takes seconds).
    pub fn finish(mut self) -> Result<Unpacked, StreamError> {
        match self.dest.take() {
            None => {
                let sniff = std::mem::take(&mut self.sniff);
                self.report.write_all(&sniff)?;
            }
            Some(Dest::Report) => {}
            Some(Dest::Zip(mut zip)) => {
                match unzip_single(zip.reader()?, &mut self.report, self.max) {
                    Ok(_) => {}
                    Err(UnzipError::Codec(e)) => return Err(e.into()),
                    Err(UnzipError::Write(e)) => return Err(e.into()),
                }
            }
        }
        Ok(Unpacked {
            writer: self.report.writer,
            len: self.report.len,
            head: self.report.head,
        })
    }
}

/// A decoded (and unpacked) package, not yet durable: check it, then
/// `writer.finish()` fsyncs it. Dropped, it leaves nothing behind.
pub struct Unpacked {
    pub writer: SpoolWriter,
    pub len: u64,
    /// The first bytes (up to 4).
    pub head: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
enum Form {
    /// Only whitespace so far.
    Undecided,
    /// Base64 text.
    Raw,
    /// A JSON string holding the base64 text.
    Json,
}

/// The text of a SendData body, fed in pieces, to bytes: the body is the base64 text
/// itself, or a JSON string holding it (decided by its first non-whitespace byte, as
/// `body_base64` decided).
pub struct TextDecoder {
    form: Form,
    /// The whitespace before the first byte is JSON whitespace.
    json_lead: bool,
    json: JsonString,
    text: Vec<u8>,
    b64: Base64Stream,
}

impl Default for TextDecoder {
    fn default() -> Self {
        TextDecoder::new()
    }
}

impl TextDecoder {
    pub fn new() -> TextDecoder {
        TextDecoder {
            form: Form::Undecided,
            json_lead: true,
            json: JsonString::new(JsonState::Lead),
            text: Vec::new(),
            b64: Base64Stream::default(),
        }
    }

    /// The next piece of the body; decoded bytes go to `emit` (a chunk at a time).
    pub fn feed(&mut self, piece: &[u8], emit: &mut Emit<'_>) -> Result<(), StreamError> {
        let mut piece = piece;
        if let Form::Undecided = self.form {
            let Some(i) = piece.iter().position(|b| !b.is_ascii_whitespace()) else {
                self.json_lead &= piece.iter().all(|&b| json_ws(b));
                return Ok(());
            };
            self.json_lead &= piece[..i].iter().all(|&b| json_ws(b));
            if piece[i] == b'"' {
                if !self.json_lead {
                    return Err(StreamError::Json(
                        "expected a string (a form feed before it)".into(),
                    ));
                }
                self.form = Form::Json;
            } else {
                self.form = Form::Raw;
            }
            piece = &piece[i..];
        }
        match self.form {
            Form::Json => {
                self.text.clear();
                self.json.feed(piece, &mut self.text, false)?;
                self.b64.feed(&self.text, emit)
            }
            _ => self.b64.feed(piece, emit),
        }
    }

    /// The body has ended: the rest of the bytes go to `emit`.
    pub fn finish(mut self, emit: &mut Emit<'_>) -> Result<(), StreamError> {
        if let Form::Json = self.form {
            self.json.finish()?;
        }
        self.b64.decode(emit, true)
    }
}

/// Decodes a SendData body fed in pieces into a report: a [`TextDecoder`] feeding a
/// [`ReportSink`]. (The HTTP service may run the two on different threads.)
pub struct BodyDecoder {
    text: TextDecoder,
    sink: ReportSink,
}

impl BodyDecoder {
    /// Decoded bytes go to `report` (a spool writer: memory while small, a spool file
    /// beyond); a ZIP is first kept in memory or a scratch file under `scratch_dir`.
    /// `max` bounds the report's size (zip bombs).
    pub fn new(report: SpoolWriter, scratch_dir: &Path, max: u64) -> BodyDecoder {
        BodyDecoder {
            text: TextDecoder::new(),
            sink: ReportSink::new(report, scratch_dir, max),
        }
    }

    /// The next piece of the body.
    pub fn feed(&mut self, piece: &[u8]) -> Result<(), StreamError> {
        let sink = &mut self.sink;
        self.text.feed(piece, &mut |b| sink.put(b))
    }

    /// The body has ended: decodes the rest and unpacks a ZIP (blocking: a big ZIP takes
    /// seconds).
    pub fn finish(self) -> Result<Unpacked, StreamError> {
        let mut sink = self.sink;
        self.text.finish(&mut |b| sink.put(b))?;
        sink.finish()
    }

    pub fn into_parts(self) -> (TextDecoder, ReportSink) {
        (self.text, self.sink)
    }
}

// ---------------------------------------------------------------------------------------
// ReceiveData replies (the bridge as a till)
// ---------------------------------------------------------------------------------------

/// The attributes of a reply other than `data` are short; a longer one is refused.
const SMALL_VALUE_MAX: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjState {
    /// Before `{`.
    Start,
    /// After `{` or `,`: a key (or, after `{`, the end).
    Key {
        first: bool,
    },
    /// Inside a key.
    KeyText {
        escaped: bool,
    },
    Colon,
    /// Before a value.
    Value,
    /// Inside the `data` string.
    Data,
    /// Inside another value, kept raw.
    Raw,
    /// After a value: `,` or `}`.
    Next,
    /// After `}`: only whitespace.
    End,
}

/// What a ReceiveData reply held.
pub struct DecodedReply {
    /// Every attribute except a string `data`, as JSON values.
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// The base64 characters of the `data` string (0: none, or only whitespace).
    pub data_chars: u64,
    /// What they decoded to (checked by the caller only if the reply says there is data).
    pub data: Result<Unpacked, StreamError>,
}

/// A ReceiveData reply (a JSON object, attributes in any order) fed in pieces: the
/// `data` string is unescaped and decoded into a [`ReportSink`] as it arrives, the other
/// attributes are kept. It reads what `serde_json` reads into the reply struct, except
/// that a duplicate attribute is not refused (the last one counts).
pub struct ReplyDecoder {
    state: ObjState,
    at: u64,
    /// The current key or raw value, as JSON text.
    buf: Vec<u8>,
    key: String,
    depth: u32,
    in_string: bool,
    escaped: bool,
    fields: serde_json::Map<String, serde_json::Value>,
    data_json: JsonString,
    text: Vec<u8>,
    b64: Base64Stream,
    sink: ReportSink,
    data_error: Option<StreamError>,
}

impl ReplyDecoder {
    pub fn new(sink: ReportSink) -> ReplyDecoder {
        ReplyDecoder {
            state: ObjState::Start,
            at: 0,
            buf: Vec::new(),
            key: String::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            fields: serde_json::Map::new(),
            data_json: JsonString::new(JsonState::Str),
            text: Vec::new(),
            b64: Base64Stream::default(),
            sink,
            data_error: None,
        }
    }

    fn err(&self, i: usize, what: &str) -> StreamError {
        StreamError::Json(format!("{what} at byte {}", self.at + i as u64))
    }

    /// A raw value is complete: parse it and keep it.
    fn end_raw(&mut self, i: usize) -> Result<(), StreamError> {
        let v: serde_json::Value =
            serde_json::from_slice(&self.buf).map_err(|e| self.err(i, &e.to_string()))?;
        self.fields.insert(std::mem::take(&mut self.key), v);
        self.buf.clear();
        self.state = ObjState::Next;
        Ok(())
    }

    fn push_small(&mut self, b: u8, i: usize) -> Result<(), StreamError> {
        if self.buf.len() >= SMALL_VALUE_MAX {
            return Err(self.err(i, "an attribute longer than 64 KiB"));
        }
        self.buf.push(b);
        Ok(())
    }

    /// The next piece of the reply.
    pub fn feed(&mut self, piece: &[u8]) -> Result<(), StreamError> {
        let mut i = 0;
        while i < piece.len() {
            let b = piece[i];
            match self.state {
                ObjState::Data => {
                    self.text.clear();
                    let n = self.data_json.feed(&piece[i..], &mut self.text, true)?;
                    if self.data_error.is_none() {
                        let sink = &mut self.sink;
                        if let Err(e) = self.b64.feed(&self.text, &mut |b| sink.put(b)) {
                            self.data_error = Some(e);
                        }
                    }
                    i += n;
                    if let JsonState::Trail = self.data_json.state {
                        if self.data_error.is_none() {
                            let sink = &mut self.sink;
                            if let Err(e) = self.b64.decode(&mut |b| sink.put(b), true) {
                                self.data_error = Some(e);
                            }
                        }
                        self.key.clear();
                        self.state = ObjState::Next;
                    }
                    continue;
                }
                ObjState::Start => match b {
                    b'{' => self.state = ObjState::Key { first: true },
                    b if json_ws(b) => {}
                    _ => return Err(self.err(i, "expected a JSON object")),
                },
                ObjState::Key { first } => match b {
                    b'"' => {
                        self.buf.clear();
                        self.buf.push(b);
                        self.state = ObjState::KeyText { escaped: false };
                    }
                    b'}' if first => self.state = ObjState::End,
                    b if json_ws(b) => {}
                    _ => return Err(self.err(i, "expected an attribute name")),
                },
                ObjState::KeyText { escaped } => {
                    self.push_small(b, i)?;
                    if escaped {
                        self.state = ObjState::KeyText { escaped: false };
                    } else if b == b'\\' {
                        self.state = ObjState::KeyText { escaped: true };
                    } else if b == b'"' {
                        self.key = serde_json::from_slice(&self.buf)
                            .map_err(|e| self.err(i, &e.to_string()))?;
                        self.buf.clear();
                        self.state = ObjState::Colon;
                    }
                }
                ObjState::Colon => match b {
                    b':' => self.state = ObjState::Value,
                    b if json_ws(b) => {}
                    _ => return Err(self.err(i, "expected ':'")),
                },
                ObjState::Value => {
                    if json_ws(b) {
                    } else if b == b'"' && self.key == "data" {
                        if self.data_chars() > 0 || self.data_json.at > 0 {
                            return Err(self.err(i, "a second data attribute"));
                        }
                        self.state = ObjState::Data;
                    } else {
                        self.buf.clear();
                        self.depth = 0;
                        self.in_string = false;
                        self.escaped = false;
                        self.state = ObjState::Raw;
                        continue; // the byte starts the value
                    }
                }
                ObjState::Raw => {
                    if self.in_string {
                        self.push_small(b, i)?;
                        if self.escaped {
                            self.escaped = false;
                        } else if b == b'\\' {
                            self.escaped = true;
                        } else if b == b'"' {
                            self.in_string = false;
                            if self.depth == 0 {
                                self.end_raw(i)?;
                            }
                        }
                    } else {
                        match b {
                            b'"' => {
                                self.in_string = true;
                                self.push_small(b, i)?;
                            }
                            b'{' | b'[' => {
                                self.depth += 1;
                                self.push_small(b, i)?;
                            }
                            b'}' | b']' if self.depth > 0 => {
                                self.depth -= 1;
                                self.push_small(b, i)?;
                                if self.depth == 0 {
                                    self.end_raw(i)?;
                                }
                            }
                            b',' | b'}' | b']' if self.depth == 0 => {
                                self.end_raw(i)?;
                                continue; // the byte ends the value and is read after it
                            }
                            b if json_ws(b) && self.depth == 0 => self.end_raw(i)?,
                            _ => self.push_small(b, i)?,
                        }
                    }
                }
                ObjState::Next => match b {
                    b',' => self.state = ObjState::Key { first: false },
                    b'}' => self.state = ObjState::End,
                    b if json_ws(b) => {}
                    _ => return Err(self.err(i, "expected ',' or '}'")),
                },
                ObjState::End => {
                    if !json_ws(b) {
                        return Err(self.err(i, "trailing characters after the object"));
                    }
                }
            }
            i += 1;
        }
        self.at += piece.len() as u64;
        Ok(())
    }

    fn data_chars(&self) -> u64 {
        self.b64.done + self.b64.pending.len() as u64
    }

    /// The reply has ended: the attributes, and the data unpacked (blocking: a big ZIP takes
    /// seconds).
    pub fn finish(self) -> Result<DecodedReply, StreamError> {
        if self.state != ObjState::End {
            return Err(StreamError::Json(format!(
                "EOF while parsing an object at byte {}",
                self.at
            )));
        }
        let data_chars = self.data_chars();
        let data = match self.data_error {
            Some(e) => Err(e),
            None => self.sink.finish(),
        };
        Ok(DecodedReply {
            fields: self.fields,
            data_chars,
            data,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Scratch files
// ---------------------------------------------------------------------------------------

/// A file under the store's scratch directory, removed when dropped (so a failure leaves
/// nothing behind; a crash leaves it for `Store::open` to remove).
pub struct TempFile {
    file: Option<File>,
    path: PathBuf,
}

impl TempFile {
    pub fn create(dir: &Path) -> io::Result<TempFile> {
        fs::create_dir_all(dir)?;
        let path = dir.join(temp_name());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(TempFile {
            file: Some(file),
            path,
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("open until dropped")
    }

    pub fn size(&mut self) -> io::Result<u64> {
        Ok(self.file().metadata()?.len())
    }

    /// Renames it to `dest` and returns it open (read and write), at its start.
    pub fn persist(mut self, dest: &Path) -> io::Result<File> {
        fs::rename(&self.path, dest)?;
        let mut file = self.file.take().expect("open until dropped");
        file.seek(SeekFrom::Start(0))?;
        Ok(file)
    }
}

impl Read for TempFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file().read(buf)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            drop(f);
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Bytes kept to be read again: in memory while small, in a [`TempFile`] beyond.
pub struct Scratch {
    mem: Vec<u8>,
    file: Option<TempFile>,
    dir: PathBuf,
}

impl Scratch {
    pub fn new(dir: &Path) -> Scratch {
        Scratch {
            mem: Vec::new(),
            file: None,
            dir: dir.to_path_buf(),
        }
    }

    /// What was written, from its start.
    pub fn reader(&mut self) -> io::Result<ScratchReader<'_>> {
        match &mut self.file {
            None => Ok(ScratchReader::Mem(io::Cursor::new(&self.mem))),
            Some(t) => {
                let f = t.file();
                f.seek(SeekFrom::Start(0))?;
                Ok(ScratchReader::File(BufReader::with_capacity(CHUNK, f)))
            }
        }
    }
}

impl Write for Scratch {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.file.is_none() && self.mem.len() + buf.len() > SCRATCH_IN_MEMORY {
            let mut t = TempFile::create(&self.dir)?;
            t.file().write_all(&self.mem)?;
            self.mem = Vec::new();
            self.file = Some(t);
        }
        match &mut self.file {
            None => {
                self.mem.extend_from_slice(buf);
                Ok(buf.len())
            }
            Some(t) => t.file().write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub enum ScratchReader<'a> {
    Mem(io::Cursor<&'a Vec<u8>>),
    File(BufReader<&'a mut File>),
}

impl Read for ScratchReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ScratchReader::Mem(c) => c.read(buf),
            ScratchReader::File(f) => f.read(buf),
        }
    }
}

impl Seek for ScratchReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match self {
            ScratchReader::Mem(c) => c.seek(pos),
            ScratchReader::File(f) => f.seek(pos),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Copies `r` into `w` a [`CHUNK`] at a time; returns the bytes copied.
pub fn copy_chunked(r: &mut impl Read, w: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = read_full(r, &mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Writes the base64 of `r` to `w`, with `separator` after every 64 characters (none at
/// the end): `wrap_base64_crlf(STANDARD.encode(..))` a piece at a time.
pub fn write_base64_wrapped<W: Write + ?Sized>(
    r: &mut impl Read,
    w: &mut W,
    separator: &[u8],
) -> io::Result<()> {
    const LINE_BYTES: usize = 48; // 64 base64 characters
    const LINES: usize = 4096;
    let mut input = vec![0u8; LINE_BYTES * LINES];
    let mut encoded = vec![0u8; 64 * LINES];
    let mut out = Vec::with_capacity((64 + separator.len()) * LINES);
    let mut first = true;
    loop {
        // A full buffer is whole lines, so only the last piece can end a line early or
        // carry padding.
        let n = read_full(r, &mut input)?;
        if n == 0 {
            return Ok(());
        }
        let m = STANDARD
            .encode_slice(&input[..n], &mut encoded)
            .expect("the buffer fits 4/3 of the input");
        out.clear();
        for line in encoded[..m].chunks(64) {
            if !first {
                out.extend_from_slice(separator);
            }
            first = false;
            out.extend_from_slice(line);
        }
        w.write_all(&out)?;
        if n < input.len() {
            return Ok(());
        }
    }
}

/// The deflate level of big packages (replies of the HTTP service, zipped reports of the
/// bridge as a till). Level 1 deflates about 5× faster than the default 6 (a 1 GiB price
/// list: 9 s instead of 46 s on the bench machine) for a ZIP about 20% bigger (493
/// instead of 412 MiB).
pub const BIG_DEFLATE_LEVEL: i64 = 1;

/// Zips `size` bytes read from `payload` as one deflated entry named `entry_name` at
/// `level` into a scratch file under `scratch_dir` (the zip crate seeks back to write the
/// sizes and CRC into the entry's header, as it does for the in-memory ZIP). Returns it
/// positioned at its start.
pub fn zip_to_scratch(
    payload: &mut impl Read,
    size: u64,
    entry_name: &str,
    level: Option<i64>,
    scratch_dir: &Path,
) -> io::Result<TempFile> {
    let mut zipped = TempFile::create(scratch_dir)?;
    {
        let mut w = zip::ZipWriter::new(BufWriter::with_capacity(CHUNK, zipped.file()));
        w.start_file(entry_name, zip_entry_options(size, level))
            .map_err(io::Error::other)?;
        copy_chunked(payload, &mut w)?;
        w.finish()
            .map_err(io::Error::other)?
            .into_inner()
            .map_err(|e| e.into_error())?;
    }
    zipped.file().seek(SeekFrom::Start(0))?;
    Ok(zipped)
}

/// Writes a ReceiveData reply for a payload of `size` bytes read from `payload`: `head`
/// (`{"data":"`), the payload zipped as one deflated entry named `entry_name` at `level`
/// (None: the zip crate's default, as `encode_zip_base64`), in base64 with a JSON-escaped
/// CRLF every 64 characters, then `tail` (`","errcode":"0",…}`).
#[allow(clippy::too_many_arguments)]
pub fn encode_reply<W: Write + ?Sized>(
    payload: &mut impl Read,
    size: u64,
    entry_name: &str,
    level: Option<i64>,
    head: &[u8],
    tail: &[u8],
    scratch_dir: &Path,
    out: &mut W,
) -> io::Result<()> {
    let mut zipped = zip_to_scratch(payload, size, entry_name, level, scratch_dir)?;
    out.write_all(head)?;
    write_base64_wrapped(zipped.file(), out, b"\\r\\n")?;
    out.write_all(tail)?;
    out.flush()
}

/// A request body made on a blocking thread: what a [`ChannelWriter`] writes, as a stream
/// for `reqwest::Body::wrap_stream`.
pub struct BodyStream(pub tokio::sync::mpsc::Receiver<io::Result<bytes::Bytes>>);

impl futures_core::Stream for BodyStream {
    type Item = io::Result<bytes::Bytes>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// Writes into a [`BodyStream`] from a blocking thread; fails once the request is gone.
pub struct ChannelWriter(pub tokio::sync::mpsc::Sender<io::Result<bytes::Bytes>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Ok(bytes::Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the request has ended"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// ReceiveData replies of big packages, each encoded once into a file and served from it
/// (a till asks for the same number again until it has loaded the package, and a reply of
/// a 1 GiB package takes seconds to encode).
///
/// A reply is encoded either ahead of the till's request, in the background, once the
/// package is queued for the till ([`ReplyCache::encode_ahead`], driven by the HTTP
/// service's encoder), or on the request itself when it was not ready
/// ([`ReplyCache::open_or_encode`]). Both go through the same busy set, so a package is
/// never encoded twice at once: a request for a package being encoded waits for that
/// encoding, and the background encoder skips a package that is being encoded. Either way
/// the reply is written to a temp file in the same directory, flushed, and only then
/// renamed to its final name, so a reply file that exists is whole. A crash leaves at most
/// the temp file, and `Store::open` empties the directory at every start: nothing an
/// earlier process wrote (a temp, or a renamed file whose bytes a power cut lost) is ever
/// served. The journal stays the truth; these files are only a cache of it.
#[derive(Default)]
pub struct ReplyCache {
    /// Packages being encoded now.
    busy: Mutex<HashSet<i64>>,
    done: Condvar,
}

/// Clears a package's busy mark however its encoding ends.
struct BusyGuard<'a> {
    cache: &'a ReplyCache,
    id: i64,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.cache.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.remove(&self.id);
        self.cache.done.notify_all();
    }
}

/// What [`ReplyCache::claim`] found.
enum Claim<'a> {
    /// The reply file, open at its start.
    Ready(File),
    /// Another thread is encoding it (only when not waiting).
    Busy,
    /// Nobody has it: the caller encodes it, holding the busy mark.
    Encode(BusyGuard<'a>),
}

impl ReplyCache {
    pub fn new() -> ReplyCache {
        ReplyCache::default()
    }

    /// Whether package `id` is being encoded now.
    pub fn is_busy(&self, id: i64) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    fn claim(&self, id: i64, path: &Path, wait: bool) -> io::Result<Claim<'_>> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.contains(&id) {
            if !wait {
                return Ok(Claim::Busy);
            }
            busy = self.done.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        match File::open(path) {
            Ok(f) => return Ok(Claim::Ready(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        busy.insert(id);
        Ok(Claim::Encode(BusyGuard { cache: self, id }))
    }

    /// Writes the reply into a temp file next to `path`, then renames it to `path`;
    /// `before_rename` runs in between (a crash point of the tests).
    fn encode_into(
        path: &Path,
        encode: impl FnOnce(&mut dyn Write) -> io::Result<()>,
        before_rename: impl FnOnce(),
    ) -> io::Result<File> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = TempFile::create(dir)?;
        {
            let mut w = BufWriter::with_capacity(CHUNK, tmp.file());
            encode(&mut w)?;
            w.flush()?;
        }
        before_rename();
        tmp.persist(path)
    }

    /// The reply file of package `id` at `path`, open at its start: the one already there,
    /// or one `encode` writes now (temp file, then rename). A request for a package being
    /// encoded (by another request, or ahead by the background encoder) waits for that
    /// encoding instead of doing it again; if that one failed or was stopped, this one
    /// encodes. Returns whether this call encoded it.
    pub fn open_or_encode(
        &self,
        id: i64,
        path: &Path,
        encode: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<(File, bool)> {
        match self.claim(id, path, true)? {
            Claim::Ready(f) => Ok((f, false)),
            Claim::Busy => unreachable!("a waiting claim is never busy"),
            Claim::Encode(_guard) => Ok((Self::encode_into(path, encode, || {})?, true)),
        }
    }

    /// Encodes the reply of package `id` to `path` unless it is there already or being
    /// encoded now (then `Ok(None)`: nothing done, nothing waited for). Returns the size of
    /// the reply file written.
    pub fn encode_ahead(
        &self,
        id: i64,
        path: &Path,
        encode: impl FnOnce(&mut dyn Write) -> io::Result<()>,
        before_rename: impl FnOnce(),
    ) -> io::Result<Option<u64>> {
        match self.claim(id, path, false)? {
            Claim::Ready(_) | Claim::Busy => Ok(None),
            Claim::Encode(_guard) => {
                let f = Self::encode_into(path, encode, before_rename)?;
                Ok(Some(f.metadata()?.len()))
            }
        }
    }
}

/// A reader that fails once `stop` is set, so that a background encoding ends within one
/// read when the daemon shuts down (its temp file is removed as it fails).
pub struct StopReader<'a, R> {
    pub inner: R,
    pub stop: &'a std::sync::atomic::AtomicBool,
}

impl<R: Read> Read for StopReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            // Not `Interrupted`: `read_full` retries that one.
            return Err(io::Error::other("stopped: the daemon is shutting down"));
        }
        self.inner.read(buf)
    }
}

/// An upper bound of the reply file of a `size`-byte payload: a ZIP no bigger than the
/// payload plus deflate's stored-block overhead, in base64 with an escaped CRLF (4
/// characters) after every 64, plus the JSON around it.
pub fn reply_size_bound(size: u64) -> u64 {
    let zip = size + size / 1024 + 4096;
    let b64 = zip.div_ceil(3) * 4;
    b64 + b64 / 64 * 4 + 1024
}
