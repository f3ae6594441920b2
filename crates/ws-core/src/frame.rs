//! Incremental RFC 6455 frame parser.
//!
//! Pure Rust, no nginx types. One [`Parser`] follows one direction of a tunnel. It is fed the
//! bytes that were really written, in whatever pieces the network produced, and reports frame
//! headers, payload chunks and frame ends. The header is accumulated in a fixed 14-byte buffer;
//! the payload is only counted down, never buffered.

/// Largest possible frame header: 2 + 8 (64-bit length) + 4 (mask key).
pub const MAX_HEADER_LEN: usize = 14;

/// A frame opcode (RFC 6455 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
    /// 0x3-0x7 and 0xB-0xF.
    Reserved(u8),
}

impl Opcode {
    pub fn from_u8(v: u8) -> Opcode {
        match v & 0x0f {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xa => Opcode::Pong,
            other => Opcode::Reserved(other),
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xa,
            Opcode::Reserved(v) => v,
        }
    }

    /// Control frames have the high bit of the opcode set.
    pub fn is_control(self) -> bool {
        self.as_u8() & 0x8 != 0
    }

    /// Data frames: text, binary and continuation.
    pub fn is_data(self) -> bool {
        matches!(self, Opcode::Continuation | Opcode::Text | Opcode::Binary)
    }

    /// The name used in log records; `None` for reserved opcodes (logged as numbers).
    pub fn name(self) -> Option<&'static str> {
        match self {
            Opcode::Continuation => Some("continuation"),
            Opcode::Text => Some("text"),
            Opcode::Binary => Some("binary"),
            Opcode::Close => Some("close"),
            Opcode::Ping => Some("ping"),
            Opcode::Pong => Some("pong"),
            Opcode::Reserved(_) => None,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub rsv1: bool,
    pub rsv2: bool,
    pub rsv3: bool,
    pub opcode: Opcode,
    /// The masking key, when the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
    /// Bytes the header took on the wire (2..=14).
    pub header_len: u8,
}

impl FrameHeader {
    /// The header of an unfragmented frame without reserved bits (`header_len` is left to
    /// [`encode_header`]).
    pub fn single(opcode: Opcode, mask: Option<[u8; 4]>, len: u64) -> FrameHeader {
        FrameHeader {
            fin: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode,
            mask,
            len,
            header_len: 0,
        }
    }

    /// Whether a parsed header encoded its payload length as RFC 6455 5.2 requires: in the
    /// fewest bytes that hold it, and a 64-bit length with its most significant bit 0.
    pub fn length_encoding_valid(&self) -> bool {
        let mask = if self.mask.is_some() { 4 } else { 0 };
        match self.header_len.saturating_sub(2 + mask) {
            2 => self.len >= 126,
            8 => self.len > u64::from(u16::MAX) && self.len >> 63 == 0,
            _ => true,
        }
    }
}

/// What a frame record reads of a whole frame: its first byte (FIN, RSV bits, opcode), its
/// mask bit and its payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameBrief {
    pub first: u8,
    pub masked: bool,
    pub len: u64,
}

/// What the parser reports while it is fed.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete header was read.
    Header(FrameHeader),
    /// A piece of the current frame's payload, as it is on the wire (still masked), starting at
    /// `offset` within the payload.
    Payload { offset: u64, data: &'a [u8] },
    /// The current frame ended (its last payload byte, or its header when the payload is empty).
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Payload,
}

/// Incremental parser for one direction.
#[derive(Debug, Clone)]
pub struct Parser {
    state: State,
    hdr: [u8; MAX_HEADER_LEN],
    hdr_have: usize,
    current: Option<FrameHeader>,
    /// Payload bytes of the current frame already seen.
    done: u64,
    /// The current frame ended: `End` is the next event.
    end_due: bool,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    pub fn new() -> Parser {
        Parser {
            state: State::Header,
            hdr: [0; MAX_HEADER_LEN],
            hdr_have: 0,
            current: None,
            done: 0,
            end_due: false,
        }
    }

    /// True when the next byte starts a new frame.
    pub fn at_boundary(&self) -> bool {
        self.state == State::Header && self.hdr_have == 0
    }

    /// The header of the frame whose payload is being read, if any.
    pub fn current(&self) -> Option<&FrameHeader> {
        match self.state {
            State::Payload => self.current.as_ref(),
            State::Header => None,
        }
    }

    /// The header most recently decoded, whatever the state: during its payload, and still after
    /// its end until the next header is complete.
    pub fn last_header(&self) -> Option<&FrameHeader> {
        self.current.as_ref()
    }

    /// Bytes still missing before the current frame ends, when its header is known.
    pub fn remaining(&self) -> Option<u64> {
        self.current().map(|h| h.len - self.done)
    }

    /// Bytes that must pass before the current frame's end is known or reached: the rest of a
    /// partly read header (a lower bound), or the rest of the payload. `None` at a boundary.
    pub fn until_known(&self) -> Option<u64> {
        match self.state {
            State::Payload => self.remaining(),
            State::Header if self.hdr_have > 0 => {
                Some((header_len(&self.hdr[..self.hdr_have]) - self.hdr_have) as u64)
            }
            State::Header => None,
        }
    }

    /// At a frame boundary with the whole next frame in `data` (the usual case): takes it and
    /// returns its header and payload, leaving the parser as after that frame's
    /// [`Event::End`]. Otherwise takes nothing and returns `None`: use [`Parser::next_event`].
    #[inline(always)]
    pub fn whole_frame<'d>(&mut self, data: &mut &'d [u8]) -> Option<(FrameHeader, &'d [u8])> {
        if self.state != State::Header || self.hdr_have != 0 || self.end_due {
            return None;
        }
        let n = header_len(data);
        if data.len() < n {
            return None;
        }
        let h = decode_header(&data[..n]);
        let total = usize::try_from(h.len).ok()?.checked_add(n)?;
        if data.len() < total {
            return None;
        }
        let payload = &data[n..total];
        *data = &data[total..];
        self.current = None;
        Some((h, payload))
    }

    /// At a frame boundary, when `data` is exactly one whole frame: its brief, without
    /// decoding the rest of the header, and the parser unchanged. Then
    /// [`Parser::took_whole`] leaves it as [`Parser::whole_frame`] would have.
    #[inline(always)]
    pub fn exactly_one(&self, data: &[u8]) -> Option<FrameBrief> {
        if self.state != State::Header || self.hdr_have != 0 || self.end_due {
            return None;
        }
        let [first, second, ref rest @ ..] = *data else {
            return None;
        };
        let (len, ext) = match second & 0x7f {
            126 => (u64::from(u16::from_be_bytes(*rest.first_chunk::<2>()?)), 2),
            127 => (u64::from_be_bytes(*rest.first_chunk::<8>()?), 8),
            n => (u64::from(n), 0),
        };
        let masked = second & 0x80 != 0;
        let header: u64 = ext + if masked { 4 } else { 0 };
        if (rest.len() as u64).checked_sub(header) != Some(len) {
            return None;
        }
        Some(FrameBrief { first, masked, len })
    }

    /// The whole frame [`Parser::exactly_one`] saw was taken.
    #[inline(always)]
    pub fn took_whole(&mut self) {
        self.current = None;
    }

    /// Feeds `data` and calls `f` for every event, in stream order.
    pub fn feed<F: FnMut(Event<'_>)>(&mut self, mut data: &[u8], mut f: F) {
        while let Some(ev) = self.next_event(&mut data) {
            f(ev);
        }
    }

    /// The next event from `data`, advancing it past the bytes used; `None` when `data` is
    /// used up. Call until `None`: the same events as [`Parser::feed`], for callers that want
    /// them in a loop of their own rather than in a callback.
    #[inline(always)]
    pub fn next_event<'d>(&mut self, data: &mut &'d [u8]) -> Option<Event<'d>> {
        if self.end_due {
            self.end_due = false;
            return Some(Event::End);
        }
        loop {
            if data.is_empty() {
                return None;
            }
            match self.state {
                State::Header => {
                    let h = if self.hdr_have == 0 && data.len() >= header_len(data) {
                        // The whole header is in this buffer (the usual case): no copy.
                        let n = header_len(data);
                        let h = decode_header(&data[..n]);
                        *data = &data[n..];
                        h
                    } else {
                        let need = header_len(&self.hdr[..self.hdr_have]);
                        let take = (need - self.hdr_have).min(data.len());
                        self.hdr[self.hdr_have..self.hdr_have + take]
                            .copy_from_slice(&data[..take]);
                        self.hdr_have += take;
                        *data = &data[take..];
                        // The length bytes may have said the header is longer than we thought.
                        if self.hdr_have < header_len(&self.hdr[..self.hdr_have]) {
                            continue;
                        }
                        let h = decode_header(&self.hdr[..self.hdr_have]);
                        self.hdr_have = 0;
                        h
                    };
                    self.done = 0;
                    self.current = Some(h);
                    if h.len == 0 {
                        self.end_due = true;
                    } else {
                        self.state = State::Payload;
                    }
                    return Some(Event::Header(h));
                }
                State::Payload => {
                    let len = self.current.map_or(0, |h| h.len);
                    let left = len - self.done;
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    let offset = self.done;
                    self.done += take as u64;
                    let (payload, rest) = data.split_at(take);
                    *data = rest;
                    if self.done == len {
                        self.state = State::Header;
                        self.end_due = true;
                    }
                    return Some(Event::Payload {
                        offset,
                        data: payload,
                    });
                }
            }
        }
    }
}

/// Decodes the header at the start of `b`, or says how many bytes are needed for it.
pub fn peek_header(b: &[u8]) -> Result<FrameHeader, usize> {
    let need = header_len(b);
    if b.len() < need || b.len() < 2 {
        return Err(need.max(2));
    }
    Ok(decode_header(&b[..need]))
}

/// How long the header is, judging from the bytes seen so far (a lower bound until the second
/// byte is known).
fn header_len(seen: &[u8]) -> usize {
    if seen.len() < 2 {
        return 2;
    }
    let mask = if seen[1] & 0x80 != 0 { 4 } else { 0 };
    let ext = match seen[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + mask
}

#[inline(always)]
fn decode_header(b: &[u8]) -> FrameHeader {
    let len7 = b[1] & 0x7f;
    let (len, mut pos) = match len7 {
        126 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
        127 => {
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(l), 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if b[1] & 0x80 != 0 {
        let m = [b[pos], b[pos + 1], b[pos + 2], b[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    FrameHeader {
        fin: b[0] & 0x80 != 0,
        rsv1: b[0] & 0x40 != 0,
        rsv2: b[0] & 0x20 != 0,
        rsv3: b[0] & 0x10 != 0,
        opcode: Opcode::from_u8(b[0]),
        mask,
        len,
        header_len: pos as u8,
    }
}

/// Unmasks `data`, which starts at `offset` within a payload masked with `mask`, in place.
///
/// Sixteen, then eight bytes at a time: the key, turned to start at `offset`, repeats every
/// four bytes, so one word of it fits every aligned step (byte by byte it cost about 8 instructions a
/// byte, most of a captured payload's cost).
#[inline]
pub fn unmask(data: &mut [u8], mask: [u8; 4], offset: u64) {
    // Byte k of the word is mask[(offset + k) % 4].
    let key = u32::from_le_bytes(mask).rotate_right(8 * (offset % 4) as u32);
    let wide = u64::from(key) | u64::from(key) << 32;
    // Sixteen bytes at a time first: an element-wise XOR of fixed-size arrays, which the
    // compiler turns into one vector operation.
    let mut key16 = [0; 16];
    key16[..8].copy_from_slice(&wide.to_le_bytes());
    key16[8..].copy_from_slice(&wide.to_le_bytes());
    let mut chunks = data.chunks_exact_mut(16);
    for c in &mut chunks {
        for (b, k) in c.iter_mut().zip(key16) {
            *b ^= k;
        }
    }
    let mut chunks = chunks.into_remainder().chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_le_bytes(w) ^ wide).to_le_bytes());
    }
    for (b, k) in chunks.into_remainder().iter_mut().zip(wide.to_le_bytes()) {
        *b ^= k;
    }
}

/// Encodes a frame header (used by tests and by the proxy when it injects frames).
pub fn encode_header(h: &FrameHeader) -> ([u8; MAX_HEADER_LEN], usize) {
    let mut out = [0u8; MAX_HEADER_LEN];
    out[0] = (u8::from(h.fin) << 7)
        | (u8::from(h.rsv1) << 6)
        | (u8::from(h.rsv2) << 5)
        | (u8::from(h.rsv3) << 4)
        | h.opcode.as_u8();
    let mask_bit = if h.mask.is_some() { 0x80 } else { 0 };
    let mut pos = 2;
    if h.len < 126 {
        out[1] = mask_bit | h.len as u8;
    } else if h.len <= u64::from(u16::MAX) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(h.len as u16).to_be_bytes());
        pos = 4;
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&h.len.to_be_bytes());
        pos = 10;
    }
    if let Some(m) = h.mask {
        out[pos..pos + 4].copy_from_slice(&m);
        pos += 4;
    }
    (out, pos)
}

/// Parses a close frame's (unmasked) payload into its status code and reason.
pub fn parse_close_payload(p: &[u8]) -> (Option<u16>, Option<String>) {
    if p.len() < 2 {
        return (None, None);
    }
    let code = u16::from_be_bytes([p[0], p[1]]);
    let reason = if p.len() > 2 {
        Some(String::from_utf8_lossy(&p[2..]).into_owned())
    } else {
        None
    };
    (Some(code), reason)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds a complete frame with the given payload (masked when `mask` is set).
    pub fn build_frame(
        fin: bool,
        opcode: Opcode,
        mask: Option<[u8; 4]>,
        payload: &[u8],
        rsv1: bool,
    ) -> Vec<u8> {
        let h = FrameHeader {
            fin,
            rsv1,
            ..FrameHeader::single(opcode, mask, payload.len() as u64)
        };
        let (hdr, n) = encode_header(&h);
        let mut out = hdr[..n].to_vec();
        let mut p = payload.to_vec();
        if let Some(m) = mask {
            unmask(&mut p, m, 0);
        }
        out.extend_from_slice(&p);
        out
    }

    /// A frame header whose length takes `ext` extra bytes (0, 2 or 8) whatever it is: lets
    /// tests write non-minimal encodings.
    pub fn header_with_ext(
        fin: bool,
        opcode: Opcode,
        mask: Option<[u8; 4]>,
        len: u64,
        ext: usize,
    ) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode.as_u8()];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        match ext {
            0 => out.push(mask_bit | len as u8),
            2 => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        if let Some(m) = mask {
            out.extend_from_slice(&m);
        }
        out
    }

    #[test]
    fn length_encodings() {
        let cases = [
            (0, 0, true),
            (125, 0, true),
            (0, 2, false),
            (125, 2, false),
            (126, 2, true),
            (65535, 2, true),
            (65535, 8, false),
            (0, 8, false),
            (65536, 8, true),
            (1 << 62, 8, true),
            (1 << 63, 8, false),
            (u64::MAX, 8, false),
        ];
        for mask in [None, Some([1, 2, 3, 4])] {
            for (len, ext, ok) in cases {
                let b = header_with_ext(true, Opcode::Binary, mask, len, ext);
                let h = peek_header(&b).unwrap();
                assert_eq!(h.len, len);
                assert_eq!(
                    h.length_encoding_valid(),
                    ok,
                    "{len} in {ext} bytes, {mask:?}"
                );
            }
        }
        // What the proxy encodes itself is minimal.
        for len in [0, 125, 126, 65535, 65536, 1 << 40] {
            let (b, n) = encode_header(&FrameHeader::single(Opcode::Binary, None, len));
            assert!(peek_header(&b[..n]).unwrap().length_encoding_valid());
        }
    }

    /// What a parser saw: headers and unmasked payloads, frame by frame.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Seen {
        frames: Vec<(FrameHeader, Vec<u8>)>,
        open: Option<(FrameHeader, Vec<u8>)>,
    }

    fn feed_all(chunks: &[&[u8]]) -> Vec<(FrameHeader, Vec<u8>)> {
        let mut p = Parser::new();
        let mut seen = Seen::default();
        for c in chunks {
            p.feed(c, |ev| match ev {
                Event::Header(h) => seen.open = Some((h, Vec::new())),
                Event::Payload { offset, data } => {
                    let (h, buf) = seen.open.as_mut().expect("payload before header");
                    assert_eq!(offset, buf.len() as u64);
                    let mut d = data.to_vec();
                    if let Some(m) = h.mask {
                        unmask(&mut d, m, offset);
                    }
                    buf.extend_from_slice(&d);
                }
                Event::End => {
                    let f = seen.open.take().expect("end before header");
                    seen.frames.push(f);
                }
            });
        }
        seen.frames
    }

    fn sample_stream() -> (Vec<u8>, usize) {
        let mut s = Vec::new();
        s.extend(build_frame(true, Opcode::Text, None, b"hello", false));
        s.extend(build_frame(
            false,
            Opcode::Binary,
            Some([1, 2, 3, 4]),
            &[7u8; 300],
            false,
        ));
        s.extend(build_frame(
            true,
            Opcode::Ping,
            Some([9, 8, 7, 6]),
            b"",
            false,
        ));
        s.extend(build_frame(
            true,
            Opcode::Continuation,
            None,
            &[5u8; 70000],
            false,
        ));
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        s.extend(build_frame(
            true,
            Opcode::Close,
            Some([0xaa, 0xbb, 0xcc, 0xdd]),
            &close,
            false,
        ));
        (s, 5)
    }

    #[test]
    fn whole_stream() {
        let (s, n) = sample_stream();
        let frames = feed_all(&[&s]);
        assert_eq!(frames.len(), n);
        assert_eq!(frames[0].0.opcode, Opcode::Text);
        assert_eq!(frames[0].1, b"hello");
        assert_eq!(frames[1].0.len, 300);
        assert_eq!(frames[1].0.header_len, 8);
        assert!(!frames[1].0.fin);
        assert_eq!(frames[1].1, vec![7u8; 300]);
        assert_eq!(frames[2].0.opcode, Opcode::Ping);
        assert_eq!(frames[2].0.len, 0);
        assert_eq!(frames[3].0.len, 70000);
        assert_eq!(frames[3].0.header_len, 10);
        assert_eq!(
            parse_close_payload(&frames[4].1),
            (Some(1000), Some("bye".to_string()))
        );
    }

    #[test]
    fn split_at_every_byte() {
        let (s, _) = sample_stream();
        let whole = feed_all(&[&s]);
        // Every two-way split, and one byte at a time.
        for cut in 0..=s.len() {
            let (a, b) = s.split_at(cut);
            assert_eq!(feed_all(&[a, b]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(feed_all(&bytes), whole);
    }

    #[test]
    fn lengths_7_16_64() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload = vec![0x41u8; len];
            let f = build_frame(true, Opcode::Binary, Some([1, 1, 1, 1]), &payload, false);
            let frames = feed_all(&[&f]);
            assert_eq!(frames.len(), 1);
            assert_eq!(frames[0].0.len, len as u64);
            assert_eq!(frames[0].1, payload);
        }
        // A 64-bit length far beyond memory: only counted.
        let h = FrameHeader::single(Opcode::Binary, None, 1 << 40);
        let (hdr, n) = encode_header(&h);
        let mut p = Parser::new();
        let mut got = None;
        p.feed(&hdr[..n], |ev| {
            if let Event::Header(h) = ev {
                got = Some(h.len)
            }
        });
        assert_eq!(got, Some(1 << 40));
        assert_eq!(p.remaining(), Some(1 << 40));
        p.feed(&[0u8; 1000], |_| {});
        assert_eq!(p.remaining(), Some((1 << 40) - 1000));
        assert!(!p.at_boundary());
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close_payload(b""), (None, None));
        assert_eq!(parse_close_payload(&[0x03, 0xe8]), (Some(1000), None));
        assert_eq!(
            parse_close_payload(&[0x03, 0xe9, b'x', 0xff]),
            (Some(1001), Some("x\u{fffd}".to_string()))
        );
    }

    #[test]
    fn reserved_opcodes_and_rsv() {
        let f = build_frame(true, Opcode::Reserved(0x3), None, b"ab", true);
        let frames = feed_all(&[&f]);
        assert_eq!(frames[0].0.opcode, Opcode::Reserved(3));
        assert!(frames[0].0.rsv1);
        assert_eq!(Opcode::Reserved(3).name(), None);
        assert!(Opcode::Reserved(0xb).is_control());
    }

    pub(crate) fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<bool>(),
            prop_oneof![
                Just(Opcode::Text),
                Just(Opcode::Binary),
                Just(Opcode::Continuation),
                Just(Opcode::Ping),
                Just(Opcode::Pong),
                Just(Opcode::Close),
                (3u8..8).prop_map(Opcode::Reserved),
            ],
            proptest::option::of(any::<[u8; 4]>()),
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..130),
                proptest::collection::vec(any::<u8>(), 120..70_000),
            ],
            any::<bool>(),
        )
            .prop_map(|(fin, op, mask, payload, rsv1)| build_frame(fin, op, mask, &payload, rsv1))
    }

    /// RFC 6455 5.3 as written: byte i of the payload is XORed with key byte i mod 4.
    fn unmask_bytewise(data: &mut [u8], mask: [u8; 4], offset: u64) {
        for (i, b) in data.iter_mut().enumerate() {
            *b ^= mask[((offset + i as u64) % 4) as usize];
        }
    }

    proptest! {
        #[test]
        fn unmask_matches_bytewise(
            data in proptest::collection::vec(any::<u8>(), 0..80),
            mask in any::<[u8; 4]>(),
            offset in any::<u64>(),
        ) {
            let (mut fast, mut slow) = (data.clone(), data);
            unmask(&mut fast, mask, offset);
            unmask_bytewise(&mut slow, mask, offset);
            prop_assert_eq!(fast, slow);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_split_gives_same_frames(
            frames in proptest::collection::vec(arb_frame(), 1..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let stream: Vec<u8> = frames.concat();
            let whole = feed_all(&[&stream]);
            prop_assert_eq!(whole.len(), frames.len());
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for p in points {
                chunks.push(&stream[last..p]);
                last = p;
            }
            chunks.push(&stream[last..]);
            prop_assert_eq!(feed_all(&chunks), whole);
        }
    }
}
