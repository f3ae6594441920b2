//! JSON log records (one object per line), built with serde from borrowed data.
//!
//! Pure Rust: the tunnel glue fills these structs and `log.rs` writes the bytes. Fields that do
//! not apply are `null`, never left out, except `rsv1`..`rsv3`, which appear only when set.

use base64::Engine as _;
use serde::{Serialize, Serializer};

use crate::frame::{FrameBrief, FrameHeader, Opcode};

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
    pub time: TimeText,
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
    pub time: TimeText,
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

    /// The time `msec` milliseconds into the same second as this one, made by
    /// `TimeText::new(sec, _)`: what `TimeText::new(sec, msec)` gives, with only the
    /// milliseconds written again in the usual case.
    #[inline]
    pub fn at_msec(mut self, sec: i64, msec: u32) -> TimeText {
        self.set_msec(sec, msec);
        self
    }

    /// [`TimeText::at_msec`] in place.
    #[inline]
    pub fn set_msec(&mut self, sec: i64, msec: u32) {
        if self.len != 24 {
            *self = TimeText::new(sec, msec);
            return;
        }
        let m = msec.min(999);
        self.buf[20] = b'0' + (m / 100) as u8;
        self.buf[21] = b'0' + (m / 10 % 10) as u8;
        self.buf[22] = b'0' + (m % 10) as u8;
    }

    #[inline]
    pub fn as_str(&self) -> &str {
        let b = &self.buf[..usize::from(self.len)];
        debug_assert!(b.is_ascii());
        // SAFETY: only ASCII is ever written into buf (digits, separators, or the ASCII text of
        // a formatted number); checking it per record cost more than formatting the time.
        unsafe { core::str::from_utf8_unchecked(b) }
    }
}

impl Serialize for TimeText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
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
/// connection number below 10^5), and each peer's frame record head (see
/// [`Ident::frame_head`]), in one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    /// `,"conn":…,"request_id":…`, then the client's frame head and the upstream's, each
    /// padded to [`HEAD_PAD`] bytes when it fits.
    bytes: Box<[u8]>,
    /// The length of `,"conn":…,"request_id":…`.
    fields: usize,
    /// The heads' lengths.
    heads: [usize; 2],
    /// Where the upstream's head starts.
    upstream: usize,
}

/// The room of a frame head: 112 bytes hold the longest with nginx's `$request_id` (a
/// 20-digit connection number), copied in seven fixed moves instead of a call to `memcpy`.
pub const HEAD_PAD: usize = 112;

/// A peer's frame head: its bytes, padded to [`HEAD_PAD`] when it fits.
#[derive(Debug, Clone, Copy)]
pub struct FrameHead<'a> {
    text: &'a [u8],
    len: usize,
}

impl Ident {
    pub fn new(conn: u64, request_id: Option<&str>) -> Ident {
        let mut fields = Vec::new();
        Json(&mut fields).conn_request_id(conn, request_id);
        let mut v = fields.clone();
        let (mut heads, mut upstream) = ([0; 2], 0);
        for (i, from) in [From::Client, From::Upstream].into_iter().enumerate() {
            let start = v.len();
            upstream = start;
            let mut j = Json(&mut v);
            j.raw("\",\"event\":\"frame\"");
            j.0.extend_from_slice(&fields);
            j.from(from);
            heads[i] = v.len() - start;
            if heads[i] <= HEAD_PAD {
                v.resize(start + HEAD_PAD, 0);
            }
        }
        Ident {
            bytes: v.into_boxed_slice(),
            fields: fields.len(),
            heads,
            upstream,
        }
    }

    /// `,"conn":…,"request_id":…`.
    #[inline(always)]
    fn fields(&self) -> &[u8] {
        &self.bytes[..self.fields]
    }

    /// What a peer's `frame` record has between its time and its `opcode`:
    /// `","event":"frame","conn":…,"request_id":…,"from":"client"` (the quote closes the
    /// time), copied in one piece where it took five; `None` for the proxy's frames.
    #[inline]
    pub fn frame_head(&self, from: From) -> Option<FrameHead<'_>> {
        let (text, len) = match from {
            From::Client => (self.bytes.get(self.fields..self.upstream)?, self.heads[0]),
            From::Upstream => (self.bytes.get(self.upstream..)?, self.heads[1]),
            From::Proxy => return None,
        };
        Some(FrameHead { text, len })
    }

    /// The bytes it holds (what it costs a tunnel, besides the allocation's overhead).
    pub fn size(&self) -> usize {
        self.bytes.len()
    }
}

impl FrameHead<'_> {
    /// The head's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.text[..self.len.min(self.text.len())]
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

    /// A length or count, as [`Json::num`] writes it. Below 10^8 (any frame a tunnel logs
    /// by the million) the eight digits are worked out side by side in one word (SWAR: a few
    /// multiplications whatever the length, where a loop took about 14 instructions a digit)
    /// and stored at once, the leading zeros shifted out.
    #[inline(always)]
    fn count(&mut self, n: u64) {
        if n >= 100_000_000 {
            self.num(n);
            return;
        }
        // Lanes in little-endian order, most significant first: two of four digits, four of
        // two, eight of one (each lane's quotient by a multiply and a shift, exact in range).
        let merged = (n / 10_000) | ((n % 10_000) << 32);
        let hundreds = ((merged * 10_486) >> 20) & 0x7f_0000_007f;
        let pairs = ((merged - 100 * hundreds) << 16) | hundreds;
        let tens = ((pairs * 103) >> 10) & 0x000f_000f_000f_000f;
        let digits = ((pairs - 10 * tens) << 8) | tens;
        let zeros = (digits.trailing_zeros() / 8).min(7);
        let word = (digits >> (8 * zeros)) | 0x3030_3030_3030_3030;
        let start = self.0.len();
        self.0.extend_from_slice(&word.to_le_bytes());
        self.0.truncate(start + 8 - zeros as usize);
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
        time: &TimeText,
        event: &str,
        ident: Option<&Ident>,
        conn: u64,
        request_id: Option<&str>,
        from: From,
    ) {
        self.time(time);
        self.raw("\"");
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
            Some(id) => self.0.extend_from_slice(id.fields()),
            None => self.conn_request_id(conn, request_id),
        }
        self.from(from);
    }

    /// `,"from":…`.
    #[inline(always)]
    fn from(&mut self, from: From) {
        match from {
            From::Client => self.raw(",\"from\":\"client\""),
            From::Upstream => self.raw(",\"from\":\"upstream\""),
            From::Proxy => self.raw(",\"from\":\"proxy\""),
        }
    }

    /// `{"time":"…` without the closing quote.
    #[inline(always)]
    fn time(&mut self, time: &TimeText) {
        self.raw("{\"time\":\"");
        // A time text is digits and separators: nothing to escape. It is 24 bytes but for
        // years a worker's clock never shows.
        match time.buf.first_chunk::<24>() {
            Some(t) if time.len == 24 => self.0.extend_from_slice(t),
            _ => self.raw(time.as_str()),
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
    #[inline(always)]
    fn base64(&mut self, bytes: &[u8]) {
        base64_into(self.0, bytes);
    }
}

/// Appends `bytes` in standard base64 with padding, as the `base64` crate's `STANDARD` engine
/// writes it (a property test compares the two). Where a frame record carries a payload this
/// is most of its cost: `base64-simd` encodes with SSSE3/AVX2 when the CPU has them (chosen
/// at run time), about a third of the `base64` crate's instructions for 64 bytes.
#[inline]
pub fn base64_into(out: &mut Vec<u8>, bytes: &[u8]) {
    base64_simd::STANDARD.encode_append(bytes, out);
}

/// `,"opcode":…,"fin":…,"masked":…,"len":` for a frame without RSV bits and with a named
/// opcode (nearly every frame), padded to one size so that it is copied in a few moves: one
/// piece where there were four.
struct FrameFlags {
    text: [[u8; FLAGS_PAD]; 24],
    len: [u8; 24],
}

const FLAGS_PAD: usize = 64;

static FRAME_FLAGS: FrameFlags = frame_flags();

const fn frame_flags() -> FrameFlags {
    const fn put(buf: &mut [u8; FLAGS_PAD], at: usize, s: &str) -> usize {
        let s = s.as_bytes();
        let mut i = 0;
        while i < s.len() {
            buf[at + i] = s[i];
            i += 1;
        }
        at + s.len()
    }
    const NAMES: [&str; 6] = ["continuation", "text", "binary", "close", "ping", "pong"];
    let mut t = FrameFlags {
        text: [[0; FLAGS_PAD]; 24],
        len: [0; 24],
    };
    let mut i = 0;
    while i < 24 {
        let b = &mut t.text[i];
        let mut at = put(b, 0, ",\"opcode\":\"");
        at = put(b, at, NAMES[i / 4]);
        at = put(b, at, "\",\"fin\":");
        at = put(b, at, if i & 2 != 0 { "true" } else { "false" });
        at = put(b, at, ",\"masked\":");
        at = put(b, at, if i & 1 != 0 { "true" } else { "false" });
        at = put(b, at, ",\"len\":");
        t.len[i] = at as u8;
        i += 1;
    }
    t
}

/// The row of [`FRAME_FLAGS`] for an opcode's four bits ([`NO_ROW`]: a reserved opcode).
const OPCODE_ROW: [u8; 16] = [
    0, 1, 2, NO_ROW, NO_ROW, NO_ROW, NO_ROW, NO_ROW, 3, 4, 5, NO_ROW, NO_ROW, NO_ROW, NO_ROW,
    NO_ROW,
];
const NO_ROW: u8 = 0xff;

impl Json<'_> {
    /// Entry `i` of [`FRAME_FLAGS`].
    #[inline(always)]
    fn flags_row(&mut self, i: usize) {
        let Some((text, len)) = FRAME_FLAGS.text.get(i).zip(FRAME_FLAGS.len.get(i)) else {
            return;
        };
        let start = self.0.len();
        self.0.extend_from_slice(text);
        self.0.truncate(start + usize::from(*len));
    }

    /// `,"opcode":…,"fin":…,` the RSV bits that are set, `"masked":…,"len":`.
    #[inline(always)]
    fn frame_flags(&mut self, opcode: Opcode, fin: bool, rsv: [bool; 3], masked: bool) {
        let op = match opcode {
            _ if rsv != [false; 3] => None,
            Opcode::Continuation => Some(0),
            Opcode::Text => Some(1),
            Opcode::Binary => Some(2),
            Opcode::Close => Some(3),
            Opcode::Ping => Some(4),
            Opcode::Pong => Some(5),
            Opcode::Reserved(_) => None,
        };
        if let Some(op) = op {
            self.flags_row(op * 4 + usize::from(fin) * 2 + usize::from(masked));
            return;
        }
        self.opcode(OpcodeField(opcode));
        self.flag(fin, ",\"fin\":true", ",\"fin\":false");
        for (set, key) in
            rsv.into_iter()
                .zip([",\"rsv1\":true", ",\"rsv2\":true", ",\"rsv3\":true"])
        {
            if set {
                self.raw(key);
            }
        }
        self.flag(masked, ",\"masked\":true", ",\"masked\":false");
        self.raw(",\"len\":");
    }
}

/// The `frame` record of a peer's frame that is not a Close (no `code` or `reason`), written
/// straight from its header: byte for byte what [`FrameRecord::write_line`] writes for it (a
/// property test compares the two). The data path's way: building a [`FrameRecord`] and
/// reading it back cost about as much as writing the line.
#[inline]
pub fn frame_line(
    out: &mut Vec<u8>,
    time: &TimeText,
    ident: &Ident,
    from: From,
    h: &FrameHeader,
    payload: Option<PayloadField<'_>>,
) {
    let mut j = Json(out);
    j.head(time, "frame", Some(ident), 0, None, from);
    j.frame_flags(h.opcode, h.fin, [h.rsv1, h.rsv2, h.rsv3], h.mask.is_some());
    j.count(h.len);
    match payload {
        None => {
            j.raw(",\"payload\":null,\"payload_truncated\":null,\"code\":null,\"reason\":null}\n")
        }
        Some(p) => {
            j.payload(Some(p), Some(p.truncated));
            j.raw(",\"code\":null,\"reason\":null}\n");
        }
    }
}

/// The `frame` record of a peer's whole frame taken the short way
/// ([`Direction::whole_message`](crate::observe::Direction::whole_message)), written from the
/// frame's first byte, mask bit and length (and its payload prefix, when captured), with the
/// peer's head pre-rendered in `head` ([`Ident::frame_head`]): byte for byte what
/// [`frame_line`] writes for that frame (a property test compares the two).
#[inline(always)]
pub fn brief_frame_line(
    out: &mut Vec<u8>,
    time: &TimeText,
    head: FrameHead<'_>,
    b: FrameBrief,
    payload: Option<PayloadField<'_>>,
) {
    let mut j = Json(out);
    j.time(time);
    match <&[u8; HEAD_PAD]>::try_from(head.text) {
        Ok(padded) => {
            let start = j.0.len();
            j.0.extend_from_slice(padded);
            j.0.truncate(start + head.len);
        }
        Err(_) => j.0.extend_from_slice(head.as_bytes()),
    }
    let first = b.first;
    // Straight from the first byte for a named opcode without RSV bits (nearly every frame).
    let row = OPCODE_ROW[usize::from(first & 0x0f)];
    if first & 0x70 == 0 && row != NO_ROW {
        j.flags_row(usize::from(row) * 4 + usize::from(first >> 7) * 2 + usize::from(b.masked));
    } else {
        j.frame_flags(
            Opcode::from_u8(first),
            first & 0x80 != 0,
            [first & 0x40 != 0, first & 0x20 != 0, first & 0x10 != 0],
            b.masked,
        );
    }
    j.count(b.len);
    match payload {
        None => {
            j.raw(",\"payload\":null,\"payload_truncated\":null,\"code\":null,\"reason\":null}\n")
        }
        Some(p) => {
            j.raw(",\"payload\":\"");
            if p.text {
                j.text(p);
            } else {
                j.base64(p.bytes);
            }
            // `payload_truncated`, `code` and `reason` in one piece.
            if p.truncated {
                j.raw("\",\"payload_truncated\":true,\"code\":null,\"reason\":null}\n");
            } else {
                j.raw("\",\"payload_truncated\":false,\"code\":null,\"reason\":null}\n");
            }
        }
    }
}

impl Line for FrameRecord<'_> {
    fn write_line(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let mut j = Json(out);
        j.head(
            &self.time,
            self.event,
            self.ident,
            self.conn,
            self.request_id,
            self.from,
        );
        j.frame_flags(
            self.opcode.0,
            self.fin,
            [self.rsv1, self.rsv2, self.rsv3],
            self.masked,
        );
        j.count(self.len);
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
            &self.time,
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
        j.count(self.len);
        j.raw(",\"frames\":");
        j.count(self.frames);
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

    /// Every count below 10^7, and every length of digits up to 10^8 and beyond, as itoa
    /// writes it.
    #[test]
    fn count_is_itoa() {
        let check = |n: u64| {
            let mut out = Vec::new();
            Json(&mut out).count(n);
            assert_eq!(out, itoa::Buffer::new().format(n).as_bytes(), "{n}");
        };
        (0..10_000_000).for_each(check);
        for p in 7..19 {
            let b = 10u64.pow(p);
            [b - 1, b, b + 1, 9 * b, 9 * b + 7]
                .into_iter()
                .for_each(check);
        }
        check(u64::MAX);
    }

    #[test]
    fn ident_is_the_rendered_fields() {
        let id = Ident::new(12345, Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(
            id.fields(),
            b",\"conn\":12345,\"request_id\":\"0123456789abcdef0123456789abcdef\""
        );
        assert_eq!(
            id.frame_head(From::Upstream).unwrap().as_bytes(),
            b"\",\"event\":\"frame\",\"conn\":12345,\"request_id\":\"0123456789abcdef\
              0123456789abcdef\",\"from\":\"upstream\""
        );
        assert_eq!(id.size(), 61 + 2 * HEAD_PAD);
        // The longest with nginx's `$request_id` still fits the padded room.
        let id = Ident::new(u64::MAX, Some("0123456789abcdef0123456789abcdef"));
        let head = id.frame_head(From::Upstream).unwrap();
        assert_eq!((head.len, head.text.len()), (111, HEAD_PAD));
        assert_eq!(
            Ident::new(0, None).fields(),
            b",\"conn\":0,\"request_id\":null"
        );
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
            time: TimeText::new(1_795_471_200, 123),
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

    /// Times around now, and the far years that take `TimeText`'s general way.
    fn arb_time() -> impl Strategy<Value = (i64, u32)> {
        (
            prop_oneof![
                1_700_000_000i64..2_000_000_000,
                -100_000_000_000i64..300_000_000_000
            ],
            0u32..1200,
        )
    }

    /// Lengths and counts: small ones (the fast digits) and any.
    fn arb_count() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..1000, 0u64..200_000_000, any::<u64>()]
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
            let want = base64::engine::general_purpose::STANDARD.encode(&bytes);
            let mut out = b"x".to_vec();
            base64_into(&mut out, &bytes);
            prop_assert_eq!(&out[1..], want.as_bytes());
        }

        #[test]
        fn time_text_at_msec_is_new((sec, msec) in arb_time(), other in 0u32..1200) {
            let t = TimeText::new(sec, other).at_msec(sec, msec);
            let want = TimeText::new(sec, msec);
            prop_assert_eq!(t.as_str(), want.as_str());
        }

        #[test]
        fn time_text_needs_no_escaping((sec, msec) in arb_time()) {
            prop_assert!(!needs_escape(TimeText::new(sec, msec).as_str().as_bytes()));
        }

        #[test]
        fn time_text_matches_fmt(sec in -100_000_000_000i64..300_000_000_000, msec in 0u32..1200) {
            let t = TimeText::new(sec, msec);
            prop_assert_eq!(t.as_str(), reference_time(sec, msec));
        }

        #[test]
        fn frame_line_matches_serde(
            (sec, msec) in arb_time(), conn in any::<u64>(),
            request_id in proptest::option::of(".{0,20}"),
            from in 0u8..3, opcode in any::<u8>(), flags in any::<u8>(), len in arb_count(),
            payload in arb_payload(), code in proptest::option::of(any::<u16>()),
            reason in proptest::option::of(".{0,20}"),
        ) {
            let p = payload.as_ref().map(|(text, bytes, truncated)| PayloadField {
                text: *text, bytes, truncated: *truncated,
            });
            let r = FrameRecord {
                time: TimeText::new(sec, msec),
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
        fn frame_line_matches_the_record(
            (sec, msec) in arb_time(), conn in any::<u64>(),
            request_id in proptest::option::of(".{0,20}"), from in 0u8..3, opcode in any::<u8>(),
            flags in any::<u8>(), len in arb_count(), mask in any::<[u8; 4]>(),
            payload in arb_payload(),
        ) {
            let h = FrameHeader {
                fin: flags & 1 != 0,
                rsv1: flags & 2 != 0,
                rsv2: flags & 4 != 0,
                rsv3: flags & 8 != 0,
                opcode: Opcode::from_u8(opcode & 0x0f),
                mask: (flags & 16 != 0).then_some(mask),
                len,
                header_len: 2,
            };
            let p = payload.as_ref().map(|(text, bytes, truncated)| PayloadField {
                text: *text, bytes, truncated: *truncated,
            });
            let time = TimeText::new(sec, msec);
            let from = [From::Client, From::Upstream, From::Proxy][usize::from(from)];
            let r = FrameRecord {
                time,
                event: "frame",
                conn,
                request_id: request_id.as_deref(),
                from,
                opcode: OpcodeField(h.opcode),
                fin: h.fin,
                rsv1: h.rsv1,
                rsv2: h.rsv2,
                rsv3: h.rsv3,
                masked: h.mask.is_some(),
                len,
                payload: p,
                payload_truncated: p.map(|p| p.truncated),
                code: None,
                reason: None,
                ident: None,
            };
            let mut slow = Vec::new();
            serde_line(&mut slow, &r).unwrap();
            let mut record = Vec::new();
            r.write_line(&mut record).unwrap();
            prop_assert_eq!(&record, &slow);
            let ident = Ident::new(conn, request_id.as_deref());
            let mut fast = b"x".to_vec();
            frame_line(&mut fast, &time, &ident, from, &h, p);
            prop_assert_eq!(String::from_utf8(fast[1..].to_vec()).unwrap(), String::from_utf8(slow).unwrap());
        }

        /// A whole frame's line from its brief and its peer's pre-rendered head is the line
        /// `frame_line` writes from its header (itself compared with serde above), whatever
        /// the first byte (reserved opcodes and RSV bits included) and length.
        #[test]
        fn brief_frame_line_is_frame_line(
            (sec, msec) in arb_time(), conn in any::<u64>(),
            request_id in proptest::option::of(".{0,20}"), upstream in any::<bool>(),
            first in any::<u8>(), masked in any::<bool>(), len in arb_count(),
            payload in arb_payload(),
        ) {
            let p = payload.as_ref().map(|(text, bytes, truncated)| PayloadField {
                text: *text, bytes, truncated: *truncated,
            });
            let h = FrameHeader {
                fin: first & 0x80 != 0,
                rsv1: first & 0x40 != 0,
                rsv2: first & 0x20 != 0,
                rsv3: first & 0x10 != 0,
                opcode: Opcode::from_u8(first),
                mask: masked.then_some([1, 2, 3, 4]),
                len,
                header_len: 2,
            };
            let time = TimeText::new(sec, msec);
            let from = if upstream { From::Upstream } else { From::Client };
            let ident = Ident::new(conn, request_id.as_deref());
            let mut general = b"x".to_vec();
            frame_line(&mut general, &time, &ident, from, &h, p);
            let mut brief = b"x".to_vec();
            let head = ident.frame_head(from).unwrap();
            brief_frame_line(&mut brief, &time, head, FrameBrief { first, masked, len }, p);
            prop_assert_eq!(String::from_utf8(brief).unwrap(), String::from_utf8(general).unwrap());
        }

        #[test]
        fn message_line_matches_serde(
            (sec, msec) in arb_time(), conn in any::<u64>(),
            request_id in proptest::option::of(".{0,20}"),
            text in any::<bool>(), len in arb_count(), frames in arb_count(),
            compressed in any::<bool>(), payload in arb_payload(),
            inflated_len in proptest::option::of(any::<u64>()),
            inflate_error in proptest::option::of(".{0,20}"),
        ) {
            let p = payload.as_ref().map(|(text, bytes, truncated)| PayloadField {
                text: *text, bytes, truncated: *truncated,
            });
            let m = MessageRecord {
                time: TimeText::new(sec, msec),
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
