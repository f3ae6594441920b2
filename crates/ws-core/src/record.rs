//! JSON log records (one object per line), built with serde from borrowed data.
//!
//! Pure Rust: the tunnel glue fills these structs and `log.rs` writes the bytes. Fields that do
//! not apply are `null`, never left out, except `rsv1`..`rsv3`, which appear only when set.

use base64::Engine as _;
use serde::{Serialize, Serializer};

use crate::frame::Opcode;

/// Which peer sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum From {
    Client,
    Upstream,
    Proxy,
}

impl From {
    pub fn as_str(self) -> &'static str {
        match self {
            From::Client => "client",
            From::Upstream => "upstream",
            From::Proxy => "proxy",
        }
    }
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    Normal,
    IdleTimeout,
    MaxLifetime,
    PingTimeout,
    Drain,
    TooBig,
    ProtocolError,
    RateLimited,
    ClientAbort,
    UpstreamAbort,
    UpstreamTimeout,
    Error,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Normal => "normal",
            End::IdleTimeout => "idle_timeout",
            End::MaxLifetime => "max_lifetime",
            End::PingTimeout => "ping_timeout",
            End::Drain => "drain",
            End::TooBig => "too_big",
            End::ProtocolError => "protocol_error",
            End::RateLimited => "rate_limited",
            End::ClientAbort => "client_abort",
            End::UpstreamAbort => "upstream_abort",
            End::UpstreamTimeout => "upstream_timeout",
            End::Error => "error",
        }
    }
}

/// An opcode as logged: its name, or the number for reserved ones.
#[derive(Debug, Clone, Copy)]
pub struct OpcodeField(pub Opcode);

impl Serialize for OpcodeField {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.name() {
            Some(name) => s.serialize_str(name),
            None => s.serialize_u8(self.0.as_u8()),
        }
    }
}

/// A captured payload: text as a JSON string (invalid UTF-8 replaced), binary as base64.
#[derive(Debug, Clone, Copy)]
pub struct PayloadField<'a> {
    pub text: bool,
    pub bytes: &'a [u8],
    /// The capture stopped before the payload's end: a multi-byte character cut in two at the
    /// end is dropped rather than shown as a replacement character.
    pub truncated: bool,
}

impl Serialize for PayloadField<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.text {
            s.serialize_str(&self.text_lossy())
        } else {
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(self.bytes))
        }
    }
}

impl PayloadField<'_> {
    /// A text payload as a string: invalid UTF-8 replaced, a character cut at the end dropped.
    fn text_lossy(&self) -> std::borrow::Cow<'_, str> {
        let mut bytes = self.bytes;
        if self.truncated {
            if let Err(e) = std::str::from_utf8(bytes) {
                if e.error_len().is_none() {
                    bytes = &bytes[..e.valid_up_to()];
                }
            }
        }
        String::from_utf8_lossy(bytes)
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Serialize)]
pub struct OpenRecord<'a> {
    pub time: &'a str,
    pub event: &'static str,
    pub conn: u64,
    pub request_id: Option<&'a str>,
    pub uri: &'a str,
    pub host: Option<&'a str>,
    pub client: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub route: Option<&'a str>,
    pub upstream_name: Option<&'a str>,
    pub subprotocol: Option<&'a str>,
    pub extensions: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct FrameRecord<'a> {
    pub time: &'a str,
    pub event: &'static str,
    pub conn: u64,
    pub request_id: Option<&'a str>,
    pub from: From,
    pub opcode: OpcodeField,
    pub fin: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub rsv1: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub rsv2: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub rsv3: bool,
    pub masked: bool,
    pub len: u64,
    pub payload: Option<PayloadField<'a>>,
    pub payload_truncated: Option<bool>,
    pub code: Option<u16>,
    pub reason: Option<&'a str>,
    /// `conn` and `request_id` rendered once for the tunnel: when set, the line copies it
    /// instead of rendering those two fields again (it must say the same).
    #[serde(skip)]
    pub ident: Option<&'a Ident>,
}

#[derive(Debug, Serialize)]
pub struct MessageRecord<'a> {
    pub time: &'a str,
    pub event: &'static str,
    pub conn: u64,
    pub request_id: Option<&'a str>,
    pub from: From,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub len: u64,
    pub frames: u64,
    pub compressed: bool,
    pub payload: Option<PayloadField<'a>>,
    pub payload_truncated: Option<bool>,
    /// Compressed messages: the uncompressed length, when inflated to the end.
    pub inflated_len: Option<u64>,
    /// Compressed messages that had to be inflated and could not be: why.
    pub inflate_error: Option<&'a str>,
    /// As in [`FrameRecord::ident`].
    #[serde(skip)]
    pub ident: Option<&'a Ident>,
}

/// Per-side totals in a `close` record.
#[derive(Debug, Serialize)]
pub struct SideRecord<'a> {
    pub frames: u64,
    pub messages: u64,
    pub bytes: u64,
    pub close_code: Option<u16>,
    pub close_reason: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct CloseRecord<'a> {
    pub time: &'a str,
    pub event: &'static str,
    pub conn: u64,
    pub request_id: Option<&'a str>,
    pub duration_ms: u64,
    pub client: SideRecord<'a>,
    pub upstream: SideRecord<'a>,
    pub closed_by: From,
    pub end: End,
    /// `$ws_limit_status` (null when no `ws_limit` applied).
    pub limit: Option<&'static str>,
}

/// A request the module refused (`ws_route`, `ws_allow_origin`, `ws_handshake`).
#[derive(Debug, Serialize)]
pub struct RejectRecord<'a> {
    pub time: &'a str,
    pub event: &'static str,
    pub conn: u64,
    pub request_id: Option<&'a str>,
    pub uri: &'a str,
    pub status: u16,
    pub reason: &'a str,
}

/// Formats seconds and milliseconds since the epoch as `2026-11-23T22:00:00.123Z`.
#[cfg(test)]
pub fn format_time(sec: i64, msec: u32) -> String {
    TimeText::new(sec, msec).as_str().to_owned()
}

/// A record time, RFC 3339 UTC with milliseconds (`2026-11-23T22:00:00.123Z`), built without
/// allocating: records share one per millisecond (see `LogFile::now_text`).
#[derive(Debug, Clone, Copy)]
pub struct TimeText {
    buf: [u8; 40],
    len: u8,
}

impl TimeText {
    pub fn new(sec: i64, msec: u32) -> TimeText {
        let days = sec.div_euclid(86_400);
        let rem = sec.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        let mut t = TimeText {
            buf: [0; 40],
            len: 0,
        };
        if !(0..=9999).contains(&y) {
            // Years a worker's clock never shows: the slow, general way.
            let s = format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60,
                msec.min(999)
            );
            let n = s.len().min(t.buf.len());
            t.buf[..n].copy_from_slice(&s.as_bytes()[..n]);
            t.len = n as u8;
            return t;
        }
        let mut put = |at: usize, value: u32, digits: usize| {
            let mut v = value;
            for i in (0..digits).rev() {
                t.buf[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, y as u32, 4);
        put(5, m, 2);
        put(8, d, 2);
        put(11, rem / 3600, 2);
        put(14, rem % 3600 / 60, 2);
        put(17, rem % 60, 2);
        put(20, msec.min(999), 3);
        for (at, c) in [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
        ] {
            t.buf[at] = c;
        }
        t.buf[23] = b'Z';
        t.len = 24;
        t
    }

    pub fn as_str(&self) -> &str {
        let b = &self.buf[..usize::from(self.len)];
        debug_assert!(b.is_ascii());
        // SAFETY: only ASCII is ever written into buf (digits, separators, or the ASCII text of
        // a formatted number); checking it per record cost more than formatting the time.
        unsafe { core::str::from_utf8_unchecked(b) }
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A record as one line of JSON with its newline: what `LogFile` writes.
pub trait Line {
    fn write_line(&self, out: &mut Vec<u8>) -> serde_json::Result<()>;
}

/// Serializes `record` with serde as one line (with the trailing newline) into `out`.
pub fn serde_line<T: Serialize>(out: &mut Vec<u8>, record: &T) -> serde_json::Result<()> {
    serde_json::to_writer(&mut *out, record)?;
    out.push(b'\n');
    Ok(())
}

/// Records written once per tunnel or request go through serde.
macro_rules! serde_lines {
    ($($record:ident),*) => {
        $(impl Line for $record<'_> {
            fn write_line(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
                serde_line(out, self)
            }
        })*
    };
}
serde_lines!(OpenRecord, CloseRecord, RejectRecord);

// `frame` and `message` records are written by hand: they are on the tunnel's data path, and
// serde's generic path escapes every key and formats numbers through `fmt`, several times the
// cost of the rest of the record. The output is byte for byte what serde writes for the same
// struct (the `record` fuzz target and the tests below compare the two).
//
// What keeps them cheap: what is the same in every record of a tunnel (`conn`, `request_id`)
// is rendered once per tunnel ([`Ident`]); every other piece of text is a constant picked by a
// `match` (the copy of a constant is a few moves, the copy of a slice whose length the compiler
// does not know is a call to `memcpy`); numbers go through itoa; payloads are escaped or
// encoded in one pass straight into the line.

/// The part of a tunnel's `frame` and `message` records that never changes, rendered once per
/// tunnel: `,"conn":7,"request_id":"…"` (61 bytes with nginx's `$request_id` and a
/// connection number below 10^5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident(Box<[u8]>);

impl Ident {
    pub fn new(conn: u64, request_id: Option<&str>) -> Ident {
        let mut v = Vec::new();
        Json(&mut v).conn_request_id(conn, request_id);
        Ident(v.into_boxed_slice())
    }

    /// The bytes it holds (what it costs a tunnel, besides the allocation's overhead).
    pub fn size(&self) -> usize {
        self.0.len()
    }
}

/// Appends JSON values to a line.
struct Json<'o>(&'o mut Vec<u8>);

/// Whether serde_json would escape something in `b`: a control character, '"' or '\\'.
/// Eight bytes at a time (SWAR): the strings checked per record are short (a time is 24
/// bytes), too short for the compiler's vectorized loop, which would leave them to a
/// byte-by-byte tail.
fn needs_escape(b: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of some byte is set iff a byte of `w` is zero (or below `n`, in `below`):
    // exact for "is there such a byte", which is all that is asked.
    let zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH;
    let below = |w: u64, n: u64| w.wrapping_sub(ONES * n) & !w & HIGH;
    let word = |w: u64| {
        below(w, 0x20) | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')))
    };
    let mut chunks = b.chunks_exact(8);
    let mut found = 0;
    for c in &mut chunks {
        let mut a = [0; 8];
        a.copy_from_slice(c);
        found |= word(u64::from_le_bytes(a));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // The tail, padded with a byte that needs no escaping.
        let mut a = [b' '; 8];
        a[..rest.len()].copy_from_slice(rest);
        found |= word(u64::from_le_bytes(a));
    }
    found != 0
}

impl Json<'_> {
    /// A key (or other text known to need no escaping), as is. Inlined, so that a constant's
    /// copy is a few moves.
    #[inline(always)]
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    /// A string, quoted and escaped as serde_json does.
    fn str(&mut self, s: &str) {
        self.0.push(b'"');
        self.escaped(s.as_bytes());
        self.0.push(b'"');
    }

    /// `b` with what serde_json escapes escaped the way it does (`\"`, `\\`, the short forms
    /// of `\b \t \n \f \r`, `\u00xx` for other control characters), nothing else.
    fn escaped(&mut self, b: &[u8]) {
        // Times, names, ids and most payloads need no escaping.
        if !needs_escape(b) {
            self.0.extend_from_slice(b);
            return;
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut start = 0;
        for (i, &c) in b.iter().enumerate() {
            let short: &[u8] = match c {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                0x08 => b"\\b",
                0x09 => b"\\t",
                0x0a => b"\\n",
                0x0c => b"\\f",
                0x0d => b"\\r",
                0x00..=0x1f => &[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(c >> 4)],
                    HEX[usize::from(c & 0xf)],
                ],
                _ => continue,
            };
            self.0.extend_from_slice(&b[start..i]);
            self.0.extend_from_slice(short);
            start = i + 1;
        }
        self.0.extend_from_slice(&b[start..]);
    }

    fn num<I: itoa::Integer>(&mut self, n: I) {
        self.0
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.raw("null"),
        }
    }

    fn opt_bool(&mut self, b: Option<bool>) {
        match b {
            Some(true) => self.raw("true"),
            Some(false) => self.raw("false"),
            None => self.raw("null"),
        }
    }

    /// `,"conn":..,"request_id":..`: what [`Ident`] holds.
    fn conn_request_id(&mut self, conn: u64, request_id: Option<&str>) {
        self.raw(",\"conn\":");
        self.num(conn);
        self.raw(",\"request_id\":");
        self.opt_str(request_id);
    }

    /// `{"time":..,"event":..,"conn":..,"request_id":..,"from":..`: how data path records start.
    #[inline(always)]
    fn head(
        &mut self,
        time: &str,
        event: &str,
        ident: Option<&Ident>,
        conn: u64,
        request_id: Option<&str>,
        from: From,
    ) {
        self.raw("{\"time\":");
        self.str(time);
        // The events of the data path are constants; anything else is escaped like a string.
        match event {
            "frame" => self.raw(",\"event\":\"frame\""),
            "message" => self.raw(",\"event\":\"message\""),
            _ => {
                self.raw(",\"event\":");
                self.str(event);
            }
        }
        match ident {
            Some(id) => self.0.extend_from_slice(&id.0),
            None => self.conn_request_id(conn, request_id),
        }
        match from {
            From::Client => self.raw(",\"from\":\"client\""),
            From::Upstream => self.raw(",\"from\":\"upstream\""),
            From::Proxy => self.raw(",\"from\":\"proxy\""),
        }
    }

    /// `name` with a comma and its key: `,"fin":true`.
    #[inline(always)]
    fn flag(&mut self, set: bool, yes: &str, no: &str) {
        if set {
            self.raw(yes);
        } else {
            self.raw(no);
        }
    }

    fn opcode(&mut self, op: OpcodeField) {
        match op.0 {
            Opcode::Continuation => self.raw(",\"opcode\":\"continuation\""),
            Opcode::Text => self.raw(",\"opcode\":\"text\""),
            Opcode::Binary => self.raw(",\"opcode\":\"binary\""),
            Opcode::Close => self.raw(",\"opcode\":\"close\""),
            Opcode::Ping => self.raw(",\"opcode\":\"ping\""),
            Opcode::Pong => self.raw(",\"opcode\":\"pong\""),
            Opcode::Reserved(n) => {
                self.raw(",\"opcode\":");
                self.num(n);
            }
        }
    }

    /// `,"payload":..,"payload_truncated":..`.
    fn payload(&mut self, p: Option<PayloadField<'_>>, truncated: Option<bool>) {
        match p {
            None => self.raw(",\"payload\":null"),
            Some(p) => {
                self.raw(",\"payload\":\"");
                if p.text {
                    self.text(p);
                } else {
                    self.base64(p.bytes);
                }
                self.raw("\"");
            }
        }
        self.raw(",\"payload_truncated\":");
        self.opt_bool(truncated);
    }

    /// A text payload, as [`PayloadField::text_lossy`] has it, escaped, without the copy.
    fn text(&mut self, p: PayloadField<'_>) {
        let bytes = p.bytes;
        match core::str::from_utf8(bytes) {
            Ok(_) => self.escaped(bytes),
            // A character cut in two by the end of the capture is dropped.
            Err(e) if p.truncated && e.error_len().is_none() => {
                self.escaped(&bytes[..e.valid_up_to()]);
            }
            // What String::from_utf8_lossy does: each invalid sequence becomes U+FFFD.
            Err(_) => {
                for chunk in bytes.utf8_chunks() {
                    self.escaped(chunk.valid().as_bytes());
                    if !chunk.invalid().is_empty() {
                        self.raw("\u{fffd}");
                    }
                }
            }
        }
    }

    /// Standard base64 with padding (no escaping needed), encoded straight into the line.
    fn base64(&mut self, bytes: &[u8]) {
        base64_into(self.0, bytes);
    }
}

/// The base64 alphabet (RFC 4648, standard).
const BASE64_DIGITS: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The two base64 digits of every 12-bit value, the first in the low byte (8 KiB).
static BASE64_PAIRS: [u16; 4096] = base64_pairs();

const fn base64_pairs() -> [u16; 4096] {
    let mut t = [0u16; 4096];
    let mut i = 0;
    while i < 4096 {
        t[i] = BASE64_DIGITS[i >> 6] as u16 | (BASE64_DIGITS[i & 63] as u16) << 8;
        i += 1;
    }
    t
}

/// Appends `bytes` in standard base64 with padding, as the `base64` crate's `STANDARD` engine
/// writes it (a property test compares the two). Two digits per table look-up, eight digits
/// per store: the crate took about 570 instructions for a 64-byte payload, this about 430.
pub fn base64_into(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(bytes.len().div_ceil(3) * 4);
    let pair = |v: u64| u64::from(BASE64_PAIRS[(v & 0xfff) as usize]);
    let mut src = bytes;
    // Six bytes to eight digits, read with one eight-byte load while eight bytes remain.
    while let Some(&[a, b, c, d, e, f, g, h]) = src.first_chunk::<8>() {
        let v = u64::from_be_bytes([a, b, c, d, e, f, g, h]) >> 16;
        let digits = pair(v >> 36) | pair(v >> 24) << 16 | pair(v >> 12) << 32 | pair(v) << 48;
        out.extend_from_slice(&digits.to_le_bytes());
        src = &src[6..];
    }
    while let Some(&[a, b, c]) = src.first_chunk::<3>() {
        let v = u64::from(a) << 16 | u64::from(b) << 8 | u64::from(c);
        let digits = (pair(v >> 12) | pair(v) << 16) as u32;
        out.extend_from_slice(&digits.to_le_bytes());
        src = &src[3..];
    }
    let digit = |v: u64| BASE64_DIGITS[(v & 63) as usize];
    match *src {
        [a] => {
            let v = u64::from(a) << 16;
            out.extend_from_slice(&[digit(v >> 18), digit(v >> 12), b'=', b'=']);
        }
        [a, b] => {
            let v = u64::from(a) << 16 | u64::from(b) << 8;
            out.extend_from_slice(&[digit(v >> 18), digit(v >> 12), digit(v >> 6), b'=']);
        }
        _ => {}
    }
}

impl Line for FrameRecord<'_> {
    fn write_line(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let mut j = Json(out);
        j.head(
            self.time,
            self.event,
            self.ident,
            self.conn,
            self.request_id,
            self.from,
        );
        j.opcode(self.opcode);
        j.flag(self.fin, ",\"fin\":true", ",\"fin\":false");
        if self.rsv1 {
            j.raw(",\"rsv1\":true");
        }
        if self.rsv2 {
            j.raw(",\"rsv2\":true");
        }
        if self.rsv3 {
            j.raw(",\"rsv3\":true");
        }
        j.flag(self.masked, ",\"masked\":true", ",\"masked\":false");
        j.raw(",\"len\":");
        j.num(self.len);
        if self.payload.is_none()
            && self.payload_truncated.is_none()
            && self.code.is_none()
            && self.reason.is_none()
        {
            // Most frames: a data frame without a captured payload.
            j.raw(",\"payload\":null,\"payload_truncated\":null,\"code\":null,\"reason\":null}\n");
            return Ok(());
        }
        j.payload(self.payload, self.payload_truncated);
        j.raw(",\"code\":");
        match self.code {
            Some(c) => j.num(c),
            None => j.raw("null"),
        }
        j.raw(",\"reason\":");
        j.opt_str(self.reason);
        j.raw("}\n");
        Ok(())
    }
}

impl Line for MessageRecord<'_> {
    fn write_line(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let mut j = Json(out);
        j.head(
            self.time,
            self.event,
            self.ident,
            self.conn,
            self.request_id,
            self.from,
        );
        match self.kind {
            "text" => j.raw(",\"type\":\"text\""),
            "binary" => j.raw(",\"type\":\"binary\""),
            kind => {
                j.raw(",\"type\":");
                j.str(kind);
            }
        }
        j.raw(",\"len\":");
        j.num(self.len);
        j.raw(",\"frames\":");
        j.num(self.frames);
        j.flag(
            self.compressed,
            ",\"compressed\":true",
            ",\"compressed\":false",
        );
        j.payload(self.payload, self.payload_truncated);
        j.raw(",\"inflated_len\":");
        match self.inflated_len {
            Some(n) => j.num(n),
            None => j.raw("null"),
        }
        j.raw(",\"inflate_error\":");
        j.opt_str(self.inflate_error);
        j.raw("}\n");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    #[test]
    fn escape_check_every_length_and_position() {
        for len in 0..50 {
            let plain: Vec<u8> = (0..len).map(|i| b' ' + (i % 95) as u8).collect();
            let plain: Vec<u8> = plain
                .into_iter()
                .map(|b| if b == b'"' || b == b'\\' { b'a' } else { b })
                .collect();
            assert!(!needs_escape(&plain), "{len}");
            let mut high = plain.clone();
            high.extend_from_slice("é\u{7f}".as_bytes());
            assert!(!needs_escape(&high), "{len} high");
            for pos in 0..len {
                for bad in [0x00, 0x1f, b'"', b'\\'] {
                    let mut b = plain.clone();
                    b[pos] = bad;
                    assert!(needs_escape(&b), "{len} {pos} {bad}");
                }
            }
        }
    }

    #[test]
    fn escapes_like_serde() {
        let all: String = (0u8..0x80)
            .map(char::from)
            .chain("é\u{2028}😀".chars())
            .collect();
        for s in [all.as_str(), "", "plain", "\"", "a\\b\u{1}"] {
            let mut out = Vec::new();
            Json(&mut out).str(s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn ident_is_the_rendered_fields() {
        let id = Ident::new(12345, Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(
            &*id.0,
            b",\"conn\":12345,\"request_id\":\"0123456789abcdef0123456789abcdef\""
        );
        assert_eq!(id.size(), 61);
        assert_eq!(&*Ident::new(0, None).0, b",\"conn\":0,\"request_id\":null");
    }

    #[test]
    fn time_format() {
        assert_eq!(format_time(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(format_time(1_795_471_200, 123), "2026-11-23T22:00:00.123Z");
        assert_eq!(format_time(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
    }

    fn frame(payload: Option<PayloadField<'_>>, rsv1: bool) -> Value {
        let r = FrameRecord {
            time: "t",
            event: "frame",
            conn: 7,
            request_id: Some("abc"),
            from: From::Client,
            opcode: OpcodeField(Opcode::Text),
            fin: true,
            rsv1,
            rsv2: false,
            rsv3: false,
            masked: true,
            len: 5,
            payload,
            payload_truncated: payload.map(|p| p.truncated),
            code: None,
            reason: None,
            ident: None,
        };
        let mut out = Vec::new();
        r.write_line(&mut out).unwrap();
        let mut by_serde = Vec::new();
        serde_line(&mut by_serde, &r).unwrap();
        assert_eq!(out, by_serde);
        let ident = Ident::new(7, Some("abc"));
        let mut with_ident = Vec::new();
        FrameRecord {
            ident: Some(&ident),
            ..r
        }
        .write_line(&mut with_ident)
        .unwrap();
        assert_eq!(with_ident, by_serde);
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn frame_record_fields() {
        let v = frame(None, false);
        assert_eq!(v["event"], "frame");
        assert_eq!(v["from"], "client");
        assert_eq!(v["opcode"], "text");
        assert!(v.get("rsv1").is_none());
        assert!(v["payload"].is_null());
        assert!(v.as_object().unwrap().contains_key("code"));
        let v = frame(
            Some(PayloadField {
                text: true,
                bytes: b"h\xc3",
                truncated: true,
            }),
            true,
        );
        assert_eq!(v["rsv1"], true);
        assert_eq!(v["payload"], "h");
        assert_eq!(v["payload_truncated"], true);
    }

    #[test]
    fn payload_encodings() {
        let bin = PayloadField {
            text: false,
            bytes: &[0, 255, 1],
            truncated: false,
        };
        assert_eq!(serde_json::to_string(&bin).unwrap(), "\"AP8B\"");
        let bad = PayloadField {
            text: true,
            bytes: b"a\xffb\"",
            truncated: false,
        };
        assert_eq!(serde_json::to_string(&bad).unwrap(), "\"a\u{fffd}b\\\"\"");
        assert_eq!(
            serde_json::to_string(&OpcodeField(Opcode::Reserved(11))).unwrap(),
            "11"
        );
    }

    #[test]
    fn reject_record_shape() {
        let r = RejectRecord {
            time: "t",
            event: "reject",
            conn: 3,
            request_id: None,
            uri: "/chat",
            status: 403,
            reason: "origin",
        };
        let v: Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["event"], "reject");
        assert_eq!(v["status"], 403);
        assert_eq!(v["reason"], "origin");
        assert_eq!(v["uri"], "/chat");
        assert!(v.as_object().unwrap().contains_key("request_id"));
    }

    #[test]
    fn close_record_shape() {
        let r = CloseRecord {
            time: "t",
            event: "close",
            conn: 1,
            request_id: None,
            duration_ms: 1500,
            client: SideRecord {
                frames: 3,
                messages: 2,
                bytes: 10,
                close_code: Some(1000),
                close_reason: Some("bye"),
            },
            upstream: SideRecord {
                frames: 1,
                messages: 0,
                bytes: 2,
                close_code: None,
                close_reason: None,
            },
            closed_by: From::Client,
            end: End::ClientAbort,
            limit: None,
        };
        let v: Value = serde_json::to_value(&r).unwrap();
        assert!(v.as_object().unwrap().contains_key("limit"));
        assert!(v["limit"].is_null());
        assert_eq!(v["end"], "client_abort");
        assert_eq!(v["closed_by"], "client");
        assert_eq!(v["client"]["close_code"], 1000);
        assert!(v["upstream"]["close_reason"].is_null());
        assert!(v["request_id"].is_null());
        assert_eq!(End::UpstreamTimeout.as_str(), "upstream_timeout");
    }

    /// The general way of formatting a time, which `TimeText` must match.
    fn reference_time(sec: i64, msec: u32) -> String {
        let (y, m, d) = civil_from_days(sec.div_euclid(86_400));
        let rem = sec.rem_euclid(86_400);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            msec.min(999)
        )
    }

    fn arb_payload() -> impl Strategy<Value = Option<(bool, Vec<u8>, bool)>> {
        proptest::option::of((
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..80),
            any::<bool>(),
        ))
    }

    proptest! {
        #[test]
        fn base64_matches_the_crate(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut out = b"x".to_vec();
            base64_into(&mut out, &bytes);
            let want = base64::engine::general_purpose::STANDARD.encode(&bytes);
            prop_assert_eq!(&out[1..], want.as_bytes());
        }

        #[test]
        fn time_text_matches_fmt(sec in -100_000_000_000i64..300_000_000_000, msec in 0u32..1200) {
            let t = TimeText::new(sec, msec);
            prop_assert_eq!(t.as_str(), reference_time(sec, msec));
        }

        #[test]
        fn frame_line_matches_serde(
            time in ".{0,30}", conn in any::<u64>(), request_id in proptest::option::of(".{0,20}"),
            from in 0u8..3, opcode in any::<u8>(), flags in any::<u8>(), len in any::<u64>(),
            payload in arb_payload(), code in proptest::option::of(any::<u16>()),
            reason in proptest::option::of(".{0,20}"),
        ) {
            let p = payload.as_ref().map(|(text, bytes, truncated)| PayloadField {
                text: *text, bytes, truncated: *truncated,
            });
            let r = FrameRecord {
                time: &time,
                event: "frame",
                conn,
                request_id: request_id.as_deref(),
                from: [From::Client, From::Upstream, From::Proxy][usize::from(from)],
                opcode: OpcodeField(Opcode::from_u8(opcode & 0x0f)),
                fin: flags & 1 != 0,
                rsv1: flags & 2 != 0,
                rsv2: flags & 4 != 0,
                rsv3: flags & 8 != 0,
                masked: flags & 16 != 0,
                len,
                payload: p,
                payload_truncated: p.map(|p| p.truncated),
                code,
                reason: reason.as_deref(),
                ident: None,
            };
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            r.write_line(&mut fast).unwrap();
            serde_line(&mut slow, &r).unwrap();
            let slow = String::from_utf8(slow).unwrap();
            prop_assert_eq!(String::from_utf8(fast).unwrap(), slow.clone());
            let ident = Ident::new(conn, request_id.as_deref());
            let mut pre = Vec::new();
            FrameRecord { ident: Some(&ident), ..r }.write_line(&mut pre).unwrap();
            prop_assert_eq!(String::from_utf8(pre).unwrap(), slow);
        }

        #[test]
        fn message_line_matches_serde(
            time in ".{0,30}", conn in any::<u64>(), request_id in proptest::option::of(".{0,20}"),
            text in any::<bool>(), len in any::<u64>(), frames in any::<u64>(),
            compressed in any::<bool>(), payload in arb_payload(),
            inflated_len in proptest::option::of(any::<u64>()),
            inflate_error in proptest::option::of(".{0,20}"),
        ) {
            let p = payload.as_ref().map(|(text, bytes, truncated)| PayloadField {
                text: *text, bytes, truncated: *truncated,
            });
            let m = MessageRecord {
                time: &time,
                event: "message",
                conn,
                request_id: request_id.as_deref(),
                from: From::Upstream,
                kind: if text { "text" } else { "binary" },
                len,
                frames,
                compressed,
                payload: p,
                payload_truncated: p.map(|p| p.truncated),
                inflated_len,
                inflate_error: inflate_error.as_deref(),
                ident: None,
            };
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            m.write_line(&mut fast).unwrap();
            serde_line(&mut slow, &m).unwrap();
            let slow = String::from_utf8(slow).unwrap();
            prop_assert_eq!(String::from_utf8(fast).unwrap(), slow.clone());
            let ident = Ident::new(conn, request_id.as_deref());
            let mut pre = Vec::new();
            MessageRecord { ident: Some(&ident), ..m }.write_line(&mut pre).unwrap();
            prop_assert_eq!(String::from_utf8(pre).unwrap(), slow);
        }
    }
}
