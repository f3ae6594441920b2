//! Following permessage-deflate (RFC 7692) to read compressed messages, never to change them.
//!
//! [`negotiated`] reads the extension and its four parameters from the upstream's `101`; an
//! [`Inflater`] is one direction's raw-inflate state, created at the first compressed message
//! that needs it and sized by the window that direction's sender negotiated. It keeps the first
//! bytes of each message (the payload prefix), counts its inflated length, and stops as soon as
//! a size limit is passed: a decompression bomb is never inflated to its end.
//!
//! The backend is the system zlib through `flate2` (nginx already links it for gzip). Of the
//! backends measured (docs/compression.md), it is the one whose memory follows the negotiated
//! window: 7 KiB of state plus a window of `2^bits` bytes allocated at the first output,
//! where zlib-rs and miniz_oxide take 47 KiB and 43 KiB whatever the window.

use core::fmt;

use flate2::{Decompress, FlushDecompress, Status};

use crate::frame::unmask;

/// The extension name.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// What every compressed message ends with on the compressor's side; RFC 7692 7.2.1 removes
/// it on the wire and the receiver appends it again.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Inflated bytes are produced into a buffer on the stack of this size: only the prefix is
/// kept, so a tunnel holds no output buffer of its own.
const OUT_CHUNK: usize = 4096;
/// Masked input is unmasked through a stack buffer of this size.
const IN_CHUNK: usize = 1024;

/// How one sender compresses: its LZ77 window and whether it starts every message afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    /// Base-2 logarithm of the window (8..=15).
    pub window_bits: u8,
    /// The sender resets its compressor at every message (`*_no_context_takeover`).
    pub no_context_takeover: bool,
}

impl Default for Stream {
    fn default() -> Stream {
        Stream {
            window_bits: 15,
            no_context_takeover: false,
        }
    }
}

/// The extensions a `101` negotiated, as far as compression is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extensions {
    /// No extension: RSV1 means nothing.
    None,
    /// permessage-deflate alone: how the client and the server compress.
    Deflate { client: Stream, server: Stream },
    /// Another extension, several, or permessage-deflate with parameters the proxy does not
    /// understand: compressed messages cannot be read.
    Unsupported,
}

/// Reads the `Sec-WebSocket-Extensions` value(s) of a `101` (several header lines joined with
/// `,`).
pub fn negotiated(value: &str) -> Extensions {
    let mut found = None;
    for ext in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if found.is_some() {
            // Two extensions: how they are chained is theirs to know.
            return Extensions::Unsupported;
        }
        found = Some(ext);
    }
    let Some(ext) = found else {
        return Extensions::None;
    };
    let mut parts = ext.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|n| n.eq_ignore_ascii_case(PERMESSAGE_DEFLATE))
    {
        return Extensions::Unsupported;
    }
    let (mut client, mut server) = (Stream::default(), Stream::default());
    let mut seen = 0u8;
    for p in parts.filter(|p| !p.is_empty()) {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        let (bit, ok) = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => {
                server.no_context_takeover = true;
                (1, value.is_none())
            }
            "client_no_context_takeover" => {
                client.no_context_takeover = true;
                (2, value.is_none())
            }
            // A response must give the client's a value; without one, the client may use any.
            "server_max_window_bits" => (4, window_bits(value, &mut server.window_bits)),
            "client_max_window_bits" => (
                8,
                value.is_none_or(|_| window_bits(value, &mut client.window_bits)),
            ),
            _ => (0, false),
        };
        if !ok || seen & bit != 0 {
            return Extensions::Unsupported;
        }
        seen |= bit;
    }
    Extensions::Deflate { client, server }
}

/// Parses a window-bits value (8..=15, no leading zero) into `dst`.
fn window_bits(value: Option<&str>, dst: &mut u8) -> bool {
    match value.and_then(|v| v.parse::<u8>().ok().filter(|_| !v.starts_with('0'))) {
        Some(b @ 8..=15) => {
            *dst = b;
            true
        }
        _ => false,
    }
}

/// Why a compressed message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// The compressed data is not valid DEFLATE (RFC 7692: Close 1007).
    Corrupt,
    /// The negotiated extensions are not permessage-deflate alone.
    Unsupported,
    /// With context takeover, an earlier message of this direction failed: the window every
    /// later message refers to is unknown.
    StateLost,
}

impl InflateError {
    /// The text of the record's `inflate_error`.
    pub fn as_str(self) -> &'static str {
        match self {
            InflateError::Corrupt => "corrupt data",
            InflateError::Unsupported => "unsupported extension",
            InflateError::StateLost => "state lost after an earlier failure",
        }
    }
}

impl fmt::Display for InflateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for InflateError {}

/// A compressed message inflated past the size limit: nothing more of it is inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded;

/// What a message needs from inflation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    /// Keep this many leading bytes of the message (`ws_log_payload`).
    pub prefix: usize,
    /// Fail as soon as the message inflates to more than this many bytes (0: no limit).
    pub limit: u64,
}

/// How a compressed message inflated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inflated {
    /// The uncompressed length, when the message was inflated to its end.
    pub len: Option<u64>,
    pub error: Option<InflateError>,
}

/// The message being inflated.
#[derive(Debug, Default, Clone, Copy)]
struct Msg {
    /// Bytes inflated so far.
    out: u64,
    error: Option<InflateError>,
    /// The prefix is complete and nothing else needs the rest (no context takeover, no limit).
    skipping: bool,
    /// Inflated past the limit: abandoned.
    exceeded: bool,
    /// The DEFLATE stream ended in this message (a block with BFINAL): the rest is ignored and
    /// the next message starts a new stream.
    ended: bool,
}

/// One direction's raw-inflate state.
pub struct Inflater {
    stream: Stream,
    /// Created at the first compressed message that needs it.
    z: Option<Decompress>,
    /// The state must be reset before the next message.
    dirty: bool,
    /// Context takeover after a failure: later messages cannot be read.
    lost: bool,
    msg: Msg,
}

impl fmt::Debug for Inflater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inflater")
            .field("stream", &self.stream)
            .field("allocated", &self.z.is_some())
            .field("lost", &self.lost)
            .field("msg", &self.msg)
            .finish()
    }
}

impl Inflater {
    /// A direction whose sender compresses as `stream`; nothing is allocated yet.
    pub fn new(stream: Stream) -> Inflater {
        Inflater {
            stream,
            z: None,
            dirty: false,
            lost: false,
            msg: Msg::default(),
        }
    }

    /// Whether the inflate state has been created.
    pub fn allocated(&self) -> bool {
        self.z.is_some()
    }

    /// A compressed message starts.
    pub fn start(&mut self) {
        self.msg = Msg::default();
        if self.stream.no_context_takeover {
            // Every message stands alone: an earlier failure costs nothing now.
            self.lost = false;
            self.dirty |= self.z.is_some();
        }
        if self.lost {
            self.msg.error = Some(InflateError::StateLost);
        }
        if core::mem::take(&mut self.dirty) {
            if let Some(z) = self.z.as_mut() {
                z.reset(false);
            }
        }
    }

    /// Inflates `data`, the next compressed payload bytes of the message (masked with `mask`
    /// from payload `offset` on, if masked), keeping up to `need.prefix` bytes in `prefix`.
    pub fn feed(
        &mut self,
        data: &[u8],
        mask: Option<[u8; 4]>,
        offset: u64,
        need: Need,
        prefix: &mut Vec<u8>,
    ) -> Result<(), Exceeded> {
        let Some(m) = mask else {
            return self.inflate(data, need, prefix);
        };
        let mut buf = [0u8; IN_CHUNK];
        let mut off = offset;
        for chunk in data.chunks(IN_CHUNK) {
            if self.idle() {
                break;
            }
            let b = &mut buf[..chunk.len()];
            b.copy_from_slice(chunk);
            unmask(b, m, off);
            off += chunk.len() as u64;
            self.inflate(b, need, prefix)?;
        }
        Ok(())
    }

    /// The message's last payload byte has been fed: completes it and says how it went.
    pub fn finish(&mut self, need: Need, prefix: &mut Vec<u8>) -> Result<Inflated, Exceeded> {
        self.inflate(&TAIL, need, prefix)?;
        let m = self.msg;
        if m.exceeded {
            return Err(Exceeded);
        }
        if m.ended {
            self.dirty = true;
        }
        Ok(Inflated {
            len: (m.error.is_none() && !m.skipping).then_some(m.out),
            error: m.error,
        })
    }

    /// Nothing more of this message is inflated.
    fn idle(&self) -> bool {
        self.msg.error.is_some() || self.msg.skipping || self.msg.ended || self.msg.exceeded
    }

    fn inflate(
        &mut self,
        mut input: &[u8],
        need: Need,
        prefix: &mut Vec<u8>,
    ) -> Result<(), Exceeded> {
        if self.idle() || input.is_empty() {
            return Ok(());
        }
        // zlib inflates any window up to its own size; flate2 takes 9..=15 (RFC 7692 allows 8).
        let bits = self.stream.window_bits.clamp(9, 15);
        let z = self
            .z
            .get_or_insert_with(|| Decompress::new_with_window_bits(false, bits));
        let mut out = [0u8; OUT_CHUNK];
        loop {
            let (in0, out0) = (z.total_in(), z.total_out());
            let status = z.decompress(input, &mut out, FlushDecompress::None);
            let used = usize::try_from(z.total_in() - in0).unwrap_or(input.len());
            let made = usize::try_from(z.total_out() - out0)
                .unwrap_or(0)
                .min(OUT_CHUNK);
            input = input.get(used..).unwrap_or_default();
            let room = need.prefix.saturating_sub(prefix.len());
            prefix.extend_from_slice(&out[..made.min(room)]);
            self.msg.out += made as u64;
            if need.limit > 0 && self.msg.out > need.limit {
                // The rest of the message is never inflated; the window is left mid-message.
                self.msg.exceeded = true;
                self.lost = !self.stream.no_context_takeover;
                self.dirty = true;
                return Err(Exceeded);
            }
            match status {
                Err(_) => {
                    self.msg.error = Some(InflateError::Corrupt);
                    self.lost = !self.stream.no_context_takeover;
                    self.dirty = true;
                    return Ok(());
                }
                Ok(Status::StreamEnd) => {
                    self.msg.ended = true;
                    return Ok(());
                }
                Ok(_) => {}
            }
            if self.stream.no_context_takeover && need.limit == 0 && prefix.len() >= need.prefix {
                // Nothing later depends on this message's window, and nothing needs its length.
                self.msg.skipping = true;
                return Ok(());
            }
            if (input.is_empty() && made < OUT_CHUNK) || (used == 0 && made == 0) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};
    use proptest::prelude::*;

    /// A permessage-deflate sender: messages compressed with a sync flush, the tail removed.
    pub(crate) struct Sender {
        c: Compress,
        no_context_takeover: bool,
        bits: u8,
    }

    impl Sender {
        pub(crate) fn new(s: Stream) -> Sender {
            let bits = s.window_bits.max(9);
            Sender {
                c: Compress::new_with_window_bits(Compression::default(), false, bits),
                no_context_takeover: s.no_context_takeover,
                bits,
            }
        }

        pub(crate) fn message(&mut self, data: &[u8]) -> Vec<u8> {
            if self.no_context_takeover {
                self.c = Compress::new_with_window_bits(Compression::default(), false, self.bits);
            }
            let mut out = Vec::with_capacity(data.len() + 64);
            let mut input = data;
            loop {
                out.reserve(1024);
                let before = (self.c.total_in(), out.len());
                let status = self
                    .c
                    .compress_vec(input, &mut out, FlushCompress::Sync)
                    .unwrap();
                input = &input[(self.c.total_in() - before.0) as usize..];
                if status == flate2::Status::BufError && out.len() == before.1 && input.is_empty() {
                    // zlib writes nothing for a second sync flush without new input: the
                    // empty message is an empty stored block (its last four bytes the tail).
                    out.extend_from_slice(&[0x00, 0x00, 0x00, 0xff, 0xff]);
                    break;
                }
                if input.is_empty() && out.ends_with(&TAIL) && out.len() < out.capacity() {
                    break;
                }
            }
            out.truncate(out.len() - 4);
            out
        }
    }

    fn run(
        inf: &mut Inflater,
        wire: &[u8],
        need: Need,
        cuts: &[usize],
    ) -> (Vec<u8>, Result<Inflated, Exceeded>) {
        let mut prefix = Vec::new();
        inf.start();
        let mut last = 0;
        for &c in cuts.iter().chain(core::iter::once(&wire.len())) {
            let c = c.clamp(last, wire.len());
            if let Err(e) = inf.feed(&wire[last..c], None, 0, need, &mut prefix) {
                return (prefix, Err(e));
            }
            last = c;
        }
        let r = inf.finish(need, &mut prefix);
        (prefix, r)
    }

    fn text(i: usize, len: usize) -> Vec<u8> {
        let mut s = String::new();
        while s.len() < len {
            s += &format!("{{\"seq\":{i},\"msg\":\"hello {}\"}}", i * 7919 % 1000);
        }
        s.truncate(len);
        s.into_bytes()
    }

    #[test]
    fn parameters_from_the_101() {
        assert_eq!(negotiated(""), Extensions::None);
        assert_eq!(negotiated(" , "), Extensions::None);
        let d = |client, server| Extensions::Deflate { client, server };
        let s = |window_bits, no_context_takeover| Stream {
            window_bits,
            no_context_takeover,
        };
        assert_eq!(
            negotiated("permessage-deflate"),
            d(Stream::default(), Stream::default())
        );
        assert_eq!(
            negotiated(
                "Permessage-Deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=9; client_max_window_bits=\"12\""
            ),
            d(s(12, true), s(9, true))
        );
        assert_eq!(
            negotiated("permessage-deflate;client_max_window_bits"),
            d(Stream::default(), Stream::default())
        );
        for bad in [
            "x-webkit-deflate-frame",
            "permessage-deflate, x-foo",
            "permessage-deflate, permessage-deflate",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; foo",
        ] {
            assert_eq!(negotiated(bad), Extensions::Unsupported, "{bad}");
        }
    }

    #[test]
    fn messages_with_context_takeover_at_every_window() {
        for bits in 8..=15 {
            let s = Stream {
                window_bits: bits,
                no_context_takeover: false,
            };
            let mut tx = Sender::new(s);
            let mut rx = Inflater::new(s);
            assert!(!rx.allocated());
            for i in 0..20 {
                let m = text(i, 300 + i * 97);
                let wire = tx.message(&m);
                let need = Need {
                    prefix: 100,
                    limit: 0,
                };
                let (p, r) = run(&mut rx, &wire, need, &[wire.len() / 3, wire.len() / 2]);
                assert_eq!(p, &m[..100], "bits {bits} message {i}");
                assert_eq!(
                    r,
                    Ok(Inflated {
                        len: Some(m.len() as u64),
                        error: None
                    })
                );
            }
            assert!(rx.allocated());
        }
    }

    #[test]
    fn without_context_takeover_stops_after_the_prefix() {
        let s = Stream {
            window_bits: 10,
            no_context_takeover: true,
        };
        let mut tx = Sender::new(s);
        let mut rx = Inflater::new(s);
        for i in 0..5 {
            let m = text(i, 5000);
            let wire = tx.message(&m);
            let (p, r) = run(
                &mut rx,
                &wire,
                Need {
                    prefix: 64,
                    limit: 0,
                },
                &[],
            );
            assert_eq!(p, &m[..64]);
            assert_eq!(
                r,
                Ok(Inflated::default()),
                "no length: not inflated to the end"
            );
            // With a limit, the whole message is inflated and its length known.
            let wire = tx.message(&m);
            let need = Need {
                prefix: 64,
                limit: 1 << 20,
            };
            let (p, r) = run(&mut rx, &wire, need, &[7]);
            assert_eq!(p, &m[..64]);
            assert_eq!(r.unwrap().len, Some(5000));
        }
    }

    #[test]
    fn masked_input_is_unmasked() {
        let s = Stream::default();
        let m = text(3, 4000);
        let mut wire = Sender::new(s).message(&m);
        let key = [0x12, 0x34, 0x56, 0x78];
        unmask(&mut wire, key, 0);
        let mut rx = Inflater::new(s);
        rx.start();
        let mut p = Vec::new();
        let need = Need {
            prefix: 4000,
            limit: 0,
        };
        let cut = 3;
        rx.feed(&wire[..cut], Some(key), 0, need, &mut p).unwrap();
        rx.feed(&wire[cut..], Some(key), cut as u64, need, &mut p)
            .unwrap();
        assert_eq!(rx.finish(need, &mut p).unwrap().len, Some(4000));
        assert_eq!(p, m);
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let s = Stream::default();
        let zeros = vec![0u8; 1 << 20];
        let wire = Sender::new(s).message(&zeros);
        assert!(wire.len() < 1100, "{} bytes on the wire", wire.len());
        let mut rx = Inflater::new(s);
        let need = Need {
            prefix: 16,
            limit: 64 << 10,
        };
        let (p, r) = run(&mut rx, &wire, need, &[]);
        assert_eq!(r, Err(Exceeded));
        assert_eq!(p, [0; 16]);
        // Stopped within one output chunk of the limit, not at the end.
        assert!(rx.msg.out <= (64 << 10) + OUT_CHUNK as u64);
        // The window is now unknown: later messages say so.
        let (_, r) = run(&mut rx, &wire[..10], Need::default(), &[]);
        assert_eq!(r.unwrap().error, Some(InflateError::StateLost));
    }

    #[test]
    fn corrupt_data_and_lost_state() {
        let s = Stream::default();
        let mut tx = Sender::new(s);
        let mut rx = Inflater::new(s);
        let need = Need {
            prefix: 10,
            limit: 0,
        };
        let good = tx.message(b"hello hello hello");
        // Reserved block type 3: invalid.
        let (_, r) = run(&mut rx, &[0xff, 0xff, 0xff], need, &[]);
        assert_eq!(r.unwrap().error, Some(InflateError::Corrupt));
        let (p, r) = run(&mut rx, &good, need, &[]);
        assert!(p.is_empty());
        assert_eq!(r.unwrap().error, Some(InflateError::StateLost));

        // Without context takeover every message starts afresh.
        let s = Stream {
            window_bits: 15,
            no_context_takeover: true,
        };
        let mut tx = Sender::new(s);
        let mut rx = Inflater::new(s);
        let (_, r) = run(&mut rx, &[0xff, 0xff, 0xff], need, &[]);
        assert_eq!(r.unwrap().error, Some(InflateError::Corrupt));
        let (p, r) = run(&mut rx, &tx.message(b"hello hello hello"), need, &[]);
        assert_eq!(p, b"hello hell");
        assert_eq!(r.unwrap().error, None);
    }

    #[test]
    fn a_final_block_ends_the_stream() {
        // A sender that ends each message with BFINAL (RFC 7692 7.2.3.3) and starts anew.
        let mut rx = Inflater::new(Stream::default());
        for i in 0..3 {
            let m = text(i, 200);
            let mut c = Compress::new(Compression::default(), false);
            let mut wire = Vec::with_capacity(1024);
            c.compress_vec(&m, &mut wire, FlushCompress::Finish)
                .unwrap();
            let need = Need {
                prefix: 300,
                limit: 0,
            };
            let (p, r) = run(&mut rx, &wire, need, &[]);
            assert_eq!(p, m);
            assert_eq!(r.unwrap().len, Some(200));
        }
    }

    #[test]
    fn empty_message() {
        let s = Stream::default();
        let wire = Sender::new(s).message(b"");
        let mut rx = Inflater::new(s);
        let (p, r) = run(
            &mut rx,
            &wire,
            Need {
                prefix: 8,
                limit: 1,
            },
            &[],
        );
        assert!(p.is_empty());
        assert_eq!(r.unwrap().len, Some(0));
    }

    /// An empty message after another one with context takeover: zlib refuses a second sync
    /// flush with no new input (Z_BUF_ERROR, nothing written), so the sender writes the empty
    /// stored block itself. (The sender once looped forever here: every_split_same_result hung
    /// whenever it drew an empty message after a non-empty one.)
    #[test]
    fn empty_message_after_another() {
        for nct in [false, true] {
            let s = Stream {
                window_bits: 15,
                no_context_takeover: nct,
            };
            let mut tx = Sender::new(s);
            let mut rx = Inflater::new(s);
            let need = Need {
                prefix: 16,
                limit: 1 << 20,
            };
            for m in [&b"hello"[..], b"", b"", b"again"] {
                let wire = tx.message(m);
                let (p, r) = run(&mut rx, &wire, need, &[]);
                assert_eq!(&p[..], m);
                assert_eq!(
                    r,
                    Ok(Inflated {
                        len: Some(m.len() as u64),
                        error: None
                    })
                );
            }
        }
    }

    proptest! {
        /// Any split of any sequence of messages inflates to the same prefixes and lengths.
        #[test]
        fn every_split_same_result(
            msgs in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..3000), 1..6),
            cuts in proptest::collection::vec(0usize..4000, 0..6),
            bits in 9u8..=15, nct in any::<bool>(), prefix in 0usize..200,
        ) {
            let s = Stream { window_bits: bits, no_context_takeover: nct };
            let mut tx = Sender::new(s);
            let mut rx = Inflater::new(s);
            let mut cuts = cuts;
            cuts.sort_unstable();
            let need = Need { prefix: prefix.max(1), limit: 1 << 30 };
            for m in &msgs {
                let wire = tx.message(m);
                let (p, r) = run(&mut rx, &wire, need, &cuts);
                prop_assert_eq!(&p[..], &m[..m.len().min(need.prefix)]);
                prop_assert_eq!(r, Ok(Inflated { len: Some(m.len() as u64), error: None }));
            }
        }

        /// Arbitrary bytes never panic and never inflate past the limit.
        #[test]
        fn garbage_is_contained(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(0usize..2000, 0..4),
        ) {
            let mut rx = Inflater::new(Stream::default());
            let need = Need { prefix: 32, limit: 10_000 };
            let mut cuts = cuts;
            cuts.sort_unstable();
            let (p, _) = run(&mut rx, &data, need, &cuts);
            prop_assert!(p.len() <= 32);
            prop_assert!(rx.msg.out <= 10_000 + OUT_CHUNK as u64);
        }
    }
}
