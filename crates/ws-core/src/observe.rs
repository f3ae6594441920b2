//! What one direction of a tunnel carried: frames assembled into messages, counters, captured
//! payload prefixes and the Close frame a side sent.
//!
//! Pure Rust on top of [`crate::frame`]; the nginx glue in `tunnel.rs` feeds it the bytes a
//! `send` really wrote and turns what it reports into log records.

use crate::frame::{
    parse_close_payload, peek_header, unmask, Event, FrameBrief, FrameHeader, Opcode, Parser,
};
use crate::inflate::{Exceeded, InflateError, Inflated, Inflater, Need, Stream};

/// Control frames carry at most 125 payload bytes; a longer Close is kept only up to this.
const CONTROL_MAX: usize = 125;

/// What to capture while observing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capture {
    /// Payload prefix to keep for each data frame and message (`ws_log_payload`).
    pub payload: usize,
    /// A compression extension was negotiated: RSV1 on a first frame means "compressed".
    pub deflate: bool,
    /// Whether and how compressed messages are inflated.
    pub inflate: Inflate,
    /// What nothing reads, left out.
    pub unread: Unread,
}

impl Capture {
    /// The payload prefix kept for each data frame.
    #[inline(always)]
    fn frame_prefix(&self) -> usize {
        if self.unread.frame_payload {
            0
        } else {
            self.payload
        }
    }

    /// The payload prefix kept (or inflated) for each message.
    #[inline(always)]
    fn message_prefix(&self) -> usize {
        if self.unread.message_payload {
            0
        } else {
            self.payload
        }
    }
}

/// What no record or metric reads, so that observing skips it (by default nothing is skipped).
/// The counters, the Close frames and the inflation a limit needs stay the same either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unread {
    /// Frames' payload prefixes (no `frame` records are written).
    pub frame_payload: bool,
    /// Messages' payload prefixes (no `message` records are written).
    pub message_payload: bool,
    /// Completed messages are counted but not reported.
    pub messages: bool,
}

/// Inflation of this direction's compressed messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Inflate {
    /// Nothing needs the uncompressed bytes: compressed messages are only flagged.
    #[default]
    Off,
    /// permessage-deflate: the sender compresses as `stream`; a message inflating to more
    /// than `limit` bytes (0: no limit) is a [`Verdict::TooBig`].
    On { stream: Stream, limit: u64 },
    /// Something needs the bytes, but the negotiated extensions cannot be followed.
    Unsupported,
}

impl Inflate {
    /// The inflated-size limit (0: none).
    pub fn limit(self) -> u64 {
        match self {
            Inflate::On { limit, .. } => limit,
            _ => 0,
        }
    }
}

/// What inflation found that the proxy may act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A message inflated past the limit.
    TooBig,
    /// A message's compressed data is invalid.
    Corrupt,
}

/// A data message in progress or just completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `Text` or `Binary`.
    pub kind: Opcode,
    pub len: u64,
    pub frames: u64,
    pub compressed: bool,
    /// Unmasked payload prefix, when captured; for a compressed message, of its uncompressed
    /// bytes when `inflated`.
    pub payload: Vec<u8>,
    pub truncated: bool,
    /// A compressed message whose uncompressed prefix is in `payload`.
    pub inflated: bool,
    /// The uncompressed length, when the message was inflated to its end.
    pub inflated_len: Option<u64>,
    /// Why a compressed message that had to be inflated could not be.
    pub inflate_error: Option<InflateError>,
}

/// The data message in progress: a [`Message`] without its payload, which is kept apart.
#[derive(Debug, Clone, Copy)]
struct InProgress {
    kind: Opcode,
    len: u64,
    frames: u64,
    compressed: bool,
    truncated: bool,
}

/// A frame that has completely passed.
#[derive(Debug)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    /// For data frames, the type of the message it belongs to (for continuations: the first
    /// frame's type), when known.
    pub message_kind: Option<Opcode>,
    /// Unmasked payload prefix, when captured (uncompressed data frames only).
    pub payload: Option<&'a [u8]>,
    pub truncated: bool,
    /// Close frames: status code and reason.
    pub close_code: Option<u16>,
    pub close_reason: Option<String>,
}

/// A whole frame taken by [`Direction::whole_message`]: what a frame record reads of it.
#[derive(Debug, Clone, Copy)]
pub struct Whole<'a> {
    pub brief: FrameBrief,
    /// The unmasked payload prefix and whether the payload was longer, when captured.
    pub payload: Option<(&'a [u8], bool)>,
}

/// Reported by [`Direction::feed`], in stream order: a frame, then the message it completed.
#[derive(Debug)]
pub enum Observed<'a> {
    Frame(Frame<'a>),
    Message(&'a Message),
}

/// One direction of a tunnel.
#[derive(Debug, Default)]
pub struct Direction {
    parser: Parser,
    /// Completed frames.
    pub frames: u64,
    /// Completed data messages.
    pub messages: u64,
    /// Payload bytes of all frames (including a partly passed one).
    pub bytes: u64,
    /// Whether this side sent a Close frame, and the first one's code.
    pub close_sent: bool,
    pub close_code: Option<u16>,
    /// Completed data frames (text, binary, continuation).
    pub data_frames: u64,
    /// Data messages begun: Text and Binary frame headers seen (a rate limit's count).
    pub starts: u64,
    msg: Option<InProgress>,
    /// Payload bytes counted against the message size limit; see [`Direction::counted`].
    counted: u64,
    /// The last data frame did not have FIN: a message is unfinished.
    unfinished: bool,
    /// Allocated when a Close frame or a captured payload first passes.
    kept: Option<Box<Kept>>,
    /// Allocated at the first compressed message that must be inflated.
    deflate: Option<Box<Deflate>>,
}

/// A direction's inflation of compressed messages.
#[derive(Debug)]
struct Deflate {
    inf: Inflater,
    /// The frame about to pass (or passing) was inflated before it was forwarded
    /// ([`Direction::inflate_ahead`]): its bytes are not inflated again.
    ahead: bool,
    /// The message's outcome, when its last frame was inflated ahead.
    done: Option<Result<Inflated, Exceeded>>,
    /// The message in progress inflated past the limit: nothing more of it is inflated.
    exceeded: bool,
    /// Not yet taken by [`Direction::take_verdict`].
    verdict: Option<Verdict>,
}

/// The bytes a direction keeps of the frame passing (payload prefix, Close payload) and the
/// first Close reason: most tunnels carry neither a Close until their end nor `ws_log_payload`,
/// so this is allocated on first use.
#[derive(Debug, Default)]
struct Kept {
    frame: Vec<u8>,
    frame_truncated: bool,
    /// The message's payload prefix (its buffer is reused from message to message).
    message: Vec<u8>,
    close_payload: Vec<u8>,
    close_reason: Option<String>,
}

impl Direction {
    pub fn new() -> Direction {
        Direction::default()
    }

    /// True when the next byte of this direction starts a new frame.
    pub fn at_boundary(&self) -> bool {
        self.parser.at_boundary()
    }

    /// The data message in progress, if a fragmented one has started: its type and length so far.
    pub fn message_in_progress(&self) -> Option<(Opcode, u64)> {
        self.msg.as_ref().map(|m| (m.kind, m.len))
    }

    /// At a boundary, the size the data frame `h` adds to, for the message size limit.
    ///
    /// Well-formed framing gives the message's size so far. Broken framing (possible with
    /// `ws_protocol_check off`) cannot walk around the limit: whatever a lenient receiver makes
    /// of it, its messages are runs of data frames between two message starts, and the count
    /// covers each run whole. The count goes back to 0 only at a Text or Binary frame that
    /// follows a finished message (the last data frame had FIN) or opens the direction. A
    /// Text or Binary frame inside an unfinished message carries that message's count on, and
    /// a Continuation with no message before it carries on the count of the message before it
    /// (0 at the start).
    pub fn counted(&self, h: &FrameHeader) -> u64 {
        match h.opcode {
            Opcode::Text | Opcode::Binary if !self.unfinished => 0,
            _ => self.counted,
        }
    }

    /// Whether a data frame's payload is passing right now.
    pub fn in_data_frame(&self) -> bool {
        self.parser.current().is_some_and(|h| h.opcode.is_data())
    }

    /// The reason in this side's first Close frame.
    pub fn close_reason(&self) -> Option<&str> {
        self.kept.as_deref()?.close_reason.as_deref()
    }

    /// See [`Parser::until_known`](crate::frame::Parser::until_known).
    pub fn until_known(&self) -> Option<u64> {
        self.parser.until_known()
    }

    /// Feeds bytes that were written, calling `f` for each completed frame and message.
    pub fn feed<F: FnMut(Observed<'_>)>(&mut self, data: &[u8], cap: Capture, f: F) {
        self.run::<true, true, F>(data, cap, f);
    }

    /// Feeds bytes that were written for the totals and the Close frames only: the same
    /// counters as [`Direction::feed`], no frames or messages reported, nothing captured.
    /// Inlined: its one caller is the send wrapper of every passive tunnel, in another crate.
    #[inline]
    pub fn count(&mut self, data: &[u8]) {
        self.run::<false, true, _>(data, Capture::default(), |_| {});
    }

    /// `SHORT`: whole messages of one frame take [`Direction::single_message`] where it
    /// applies (always but in the tests that compare the two ways).
    #[inline(always)]
    fn run<const REPORT: bool, const SHORT: bool, F: FnMut(Observed<'_>)>(
        &mut self,
        data: &[u8],
        cap: Capture,
        mut f: F,
    ) {
        let mut data = data;
        loop {
            // Whole frames in one step; frames split across writes event by event.
            if let Some((h, payload)) = self.parser.whole_frame(&mut data) {
                if SHORT && self.single_message(&h, payload.len() as u64, cap, REPORT) {
                    if REPORT {
                        f(Observed::Frame(Frame {
                            header: h,
                            message_kind: Some(h.opcode),
                            payload: None,
                            truncated: false,
                            close_code: None,
                            close_reason: None,
                        }));
                    }
                } else {
                    self.header(&h, cap);
                    if !payload.is_empty() {
                        self.payload(&h, 0, payload, cap);
                    }
                    self.end::<REPORT, F>(h, cap, &mut f);
                }
                if data.is_empty() {
                    // Nothing is due after a whole frame: no need to ask the parser.
                    return;
                }
                continue;
            }
            let Some(ev) = self.parser.next_event(&mut data) else {
                return;
            };
            match ev {
                Event::Header(h) => self.header(&h, cap),
                Event::Payload { offset, data } => {
                    // The parser's header is the one this payload belongs to.
                    if let Some(&h) = self.parser.last_header() {
                        self.payload(&h, offset, data, cap);
                    }
                }
                Event::End => {
                    if let Some(&h) = self.parser.last_header() {
                        self.end::<REPORT, F>(h, cap, &mut f);
                    }
                }
            }
        }
    }

    /// The short way for the usual frame: a whole Text or Binary message of one frame, of
    /// `n` payload bytes, uncompressed, in a direction that keeps nothing (no Close seen,
    /// nothing captured or inflated) and reports no messages. When all that holds, changes
    /// the counters as [`Direction::header`], [`Direction::payload`] and [`Direction::end`]
    /// would (a property test compares the two ways' state and reports) and returns true;
    /// the caller reports the frame. Otherwise changes nothing and returns false.
    #[inline(always)]
    fn single_message(&mut self, h: &FrameHeader, n: u64, cap: Capture, report: bool) -> bool {
        if !(h.fin
            && matches!(h.opcode, Opcode::Text | Opcode::Binary)
            && !(cap.deflate && h.rsv1)
            && self.kept.is_none()
            && self.deflate.is_none()
            && cap.frame_prefix() == 0
            && cap.message_prefix() == 0
            && (!report || cap.unread.messages))
        {
            return false;
        }
        self.single_counts(n);
        true
    }

    /// What a whole single-frame Text or Binary message of `n` payload bytes does to the
    /// counters.
    #[inline(always)]
    fn single_counts(&mut self, n: u64) {
        self.starts += 1;
        // As `counted` has it for a Text or Binary frame.
        self.counted = if self.unfinished { self.counted } else { 0 } + n;
        self.bytes += n;
        self.frames += 1;
        self.data_frames += 1;
        self.messages += 1;
        self.unfinished = false;
        self.msg = None;
    }

    /// The shortest way, for a write that is exactly one frame which [`Direction::run`]'s
    /// short way would take, or would take but for a frame payload capture (a whole, FIN,
    /// uncompressed Text or Binary message in a direction that inflates nothing and reports
    /// no messages): counts it as [`Direction::feed`] (`report`) or [`Direction::count`]
    /// would, keeps its payload prefix when `feed` would, and returns what `feed` would
    /// report of it, without decoding or keeping its whole header. Otherwise changes nothing
    /// and returns `None`: feed or count the bytes. (A property test compares this with
    /// `feed` and `count`.)
    #[inline(always)]
    pub fn whole_message<'a>(
        &'a mut self,
        data: &'a [u8],
        cap: Capture,
        report: bool,
    ) -> Option<Whole<'a>> {
        if self.deflate.is_some() || cap.message_prefix() != 0 || (report && !cap.unread.messages) {
            return None;
        }
        let b = self.parser.exactly_one(data)?;
        // FIN, Text or Binary, and not compressed.
        let op = b.first & 0x8f;
        if !(op == 0x81 || op == 0x82) || (cap.deflate && b.first & 0x40 != 0) {
            return None;
        }
        self.parser.took_whole();
        self.single_counts(b.len);
        // What `header` clears of the frame before.
        if let Some(k) = self.kept.as_deref_mut() {
            k.frame.clear();
            k.frame_truncated = false;
            k.close_payload.clear();
            k.message.clear();
        }
        let prefix = if report { cap.frame_prefix() } else { 0 };
        if prefix == 0 {
            return Some(Whole {
                brief: b,
                payload: None,
            });
        }
        // The payload ends the write; its masking key, if any, is just before it.
        let at = data.len() - b.len as usize;
        let payload = &data[at..];
        let truncated = payload.len() > prefix;
        let prefix = &payload[..prefix.min(payload.len())];
        let mask = data.get(at.wrapping_sub(4)..at);
        let (true, Some(&[m0, m1, m2, m3]), false) = (b.masked, mask, prefix.is_empty()) else {
            // Unmasked (or empty): the prefix is read where it is. The general way would copy
            // it into `kept.frame`, which nothing reads after this report (the next header
            // clears it).
            return Some(Whole {
                brief: b,
                payload: Some((prefix, truncated)),
            });
        };
        let k = match &mut self.kept {
            Some(k) => k,
            none => none.insert(Box::default()),
        };
        k.frame.extend_from_slice(prefix);
        unmask(&mut k.frame, [m0, m1, m2, m3], 0);
        k.frame_truncated = truncated;
        Some(Whole {
            brief: b,
            payload: Some((&k.frame, truncated)),
        })
    }

    /// A frame starts.
    #[inline(always)]
    fn header(&mut self, h: &FrameHeader, cap: Capture) {
        if let Some(k) = self.kept.as_deref_mut() {
            k.frame.clear();
            k.frame_truncated = false;
            k.close_payload.clear();
        }
        match h.opcode {
            Opcode::Text | Opcode::Binary => {
                self.starts += 1;
                self.counted = self.counted(h);
                let compressed = cap.deflate && h.rsv1;
                self.msg = Some(InProgress {
                    kind: h.opcode,
                    len: 0,
                    frames: 0,
                    compressed,
                    truncated: false,
                });
                if self.deflate.as_deref().is_some_and(|d| d.ahead) {
                    // Started, and its prefix kept, when the frame was inflated ahead.
                    return;
                }
                if let Some(k) = self.kept.as_deref_mut() {
                    k.message.clear();
                }
                if compressed {
                    if let Inflate::On { stream, .. } = cap.inflate {
                        let d = self.deflate_mut(stream);
                        d.exceeded = false;
                        d.inf.start();
                    }
                }
            }
            // A continuation without a start is counted as a frame, with no message.
            _ => {}
        }
    }

    /// `data`, at `offset` in the payload of the frame `h`, passed.
    #[inline(always)]
    fn payload(&mut self, h: &FrameHeader, offset: u64, data: &[u8], cap: Capture) {
        self.bytes += data.len() as u64;
        if h.opcode == Opcode::Close {
            let k = self.kept.get_or_insert_with(Box::default);
            let room = CONTROL_MAX.saturating_sub(k.close_payload.len());
            keep(&mut k.close_payload, data, room, h.mask, offset);
            return;
        }
        if !h.opcode.is_data() {
            return;
        }
        self.counted += data.len() as u64;
        let Some(m) = self.msg.as_mut() else { return };
        m.len += data.len() as u64;
        if m.compressed {
            if let (Inflate::On { limit, .. }, Some(d)) = (cap.inflate, self.deflate.as_deref_mut())
            {
                if !d.ahead && !d.exceeded {
                    let k = self.kept.get_or_insert_with(Box::default);
                    let need = Need {
                        prefix: cap.message_prefix(),
                        limit,
                    };
                    if d.inf
                        .feed(data, h.mask, offset, need, &mut k.message)
                        .is_err()
                    {
                        d.exceeded = true;
                        d.verdict = Some(Verdict::TooBig);
                    }
                }
            }
            return;
        }
        let (frame, message) = (cap.frame_prefix(), cap.message_prefix());
        if frame == 0 && message == 0 {
            return;
        }
        let k = self.kept.get_or_insert_with(Box::default);
        if frame > 0 {
            let room = frame.saturating_sub(k.frame.len());
            if data.len() > room {
                k.frame_truncated = true;
            }
            keep(&mut k.frame, data, room, h.mask, offset);
        }
        if message > 0 {
            let room = message.saturating_sub(k.message.len());
            if data.len() > room {
                m.truncated = true;
            }
            keep(&mut k.message, data, room, h.mask, offset);
        }
    }

    /// The frame `h` ended: it is reported, then the message it completed (with `REPORT`).
    #[inline(always)]
    fn end<const REPORT: bool, F: FnMut(Observed<'_>)>(
        &mut self,
        h: FrameHeader,
        cap: Capture,
        f: &mut F,
    ) {
        self.frames += 1;
        if h.opcode.is_data() {
            self.data_frames += 1;
            self.unfinished = !h.fin;
        }
        let (mut close_code, mut close_reason) = (None, None);
        if h.opcode == Opcode::Close {
            let k = self.kept.get_or_insert_with(Box::default);
            let (code, reason) = parse_close_payload(&k.close_payload);
            if !self.close_sent {
                self.close_sent = true;
                self.close_code = code;
                k.close_reason.clone_from(&reason);
            }
            (close_code, close_reason) = (code, reason);
        }
        let mut finished = false;
        let mut message_kind = None;
        let mut captured = false;
        if h.opcode.is_data() {
            if let Some(m) = self.msg.as_mut() {
                m.frames += 1;
                message_kind = Some(m.kind);
                captured = cap.frame_prefix() > 0 && !m.compressed;
                finished = h.fin;
            }
        }
        if REPORT {
            let k = self.kept.as_deref();
            f(Observed::Frame(Frame {
                header: h,
                message_kind,
                payload: captured.then(|| k.map_or(&[][..], |k| k.frame.as_slice())),
                truncated: captured && k.is_some_and(|k| k.frame_truncated),
                close_code,
                close_reason,
            }));
        }
        let inflated = if h.opcode.is_data() {
            self.inflate_end(finished, cap)
        } else {
            None
        };
        if !finished {
            return;
        }
        self.messages += 1;
        let Some(p) = self.msg.take() else { return };
        if !REPORT || cap.unread.messages {
            return;
        }
        // Lend the kept prefix to the message, then take the buffer back.
        let payload = self
            .kept
            .as_deref_mut()
            .map(|k| core::mem::take(&mut k.message))
            .unwrap_or_default();
        let mut m = Message {
            kind: p.kind,
            len: p.len,
            frames: p.frames,
            compressed: p.compressed,
            payload,
            truncated: p.truncated,
            inflated: false,
            inflated_len: None,
            inflate_error: None,
        };
        if p.compressed {
            match (cap.inflate, inflated) {
                (Inflate::Unsupported, _) => m.inflate_error = Some(InflateError::Unsupported),
                (_, Some(Ok(i))) => {
                    m.inflated = i.error.is_none() && cap.message_prefix() > 0;
                    m.inflated_len = i.len;
                    m.inflate_error = i.error;
                    m.truncated = i.len.map_or(m.payload.len() >= cap.message_prefix(), |l| {
                        l > m.payload.len() as u64
                    });
                }
                // Past the limit: the tunnel closes; the prefix is what was inflated.
                (_, Some(Err(Exceeded))) => {
                    m.inflated = cap.message_prefix() > 0;
                    m.truncated = true;
                }
                _ => {}
            }
            if !m.inflated {
                m.payload.clear();
            }
        }
        f(Observed::Message(&m));
        if let Some(k) = self.kept.as_deref_mut() {
            k.message = m.payload;
            k.message.clear();
        }
    }
}

impl Direction {
    fn deflate_mut(&mut self, stream: Stream) -> &mut Deflate {
        self.deflate.get_or_insert_with(|| {
            Box::new(Deflate {
                inf: Inflater::new(stream),
                ahead: false,
                done: None,
                exceeded: false,
                verdict: None,
            })
        })
    }

    /// A data frame ended: the message's inflation completes when `finished`.
    fn inflate_end(&mut self, finished: bool, cap: Capture) -> Option<Result<Inflated, Exceeded>> {
        let Inflate::On { limit, .. } = cap.inflate else {
            return None;
        };
        let d = self.deflate.as_deref_mut()?;
        let ahead = core::mem::take(&mut d.ahead);
        if !finished || !self.msg.is_some_and(|m| m.compressed) {
            return None;
        }
        if ahead {
            return d.done.take();
        }
        if d.exceeded {
            return Some(Err(Exceeded));
        }
        let k = self.kept.get_or_insert_with(Box::default);
        let need = Need {
            prefix: cap.message_prefix(),
            limit,
        };
        let r = d.inf.finish(need, &mut k.message);
        d.verdict = match r {
            Err(Exceeded) => Some(Verdict::TooBig),
            Ok(Inflated {
                error: Some(InflateError::Corrupt),
                ..
            }) => Some(Verdict::Corrupt),
            Ok(_) => d.verdict,
        };
        Some(r)
    }

    /// Whether the data frame `h`, next at this boundary, belongs to a compressed message that
    /// this direction inflates.
    pub fn inflates(&self, h: &FrameHeader, cap: Capture) -> bool {
        matches!(cap.inflate, Inflate::On { .. }) && self.compressed(h, cap)
    }

    /// Whether the data frame `h`, next at this boundary, belongs to a compressed message.
    pub fn compressed(&self, h: &FrameHeader, cap: Capture) -> bool {
        match h.opcode {
            Opcode::Text | Opcode::Binary => cap.deflate && h.rsv1,
            Opcode::Continuation => self.msg.is_some_and(|m| m.compressed),
            _ => false,
        }
    }

    /// Inflates the whole frame `frame` (header and payload), next at this boundary, before it
    /// is forwarded, so that the proxy can judge it first; when it passes, its bytes are not
    /// inflated again. Returns what the proxy may act on.
    pub fn inflate_ahead(&mut self, frame: &[u8], cap: Capture) -> Option<Verdict> {
        let Ok(h) = peek_header(frame) else {
            return None;
        };
        let Inflate::On { stream, limit } = cap.inflate else {
            return None;
        };
        if !self.inflates(&h, cap) || self.deflate.as_deref().is_some_and(|d| d.ahead) {
            // Not inflated here, or already (a write of it that must be retried).
            return None;
        }
        let start = h.opcode != Opcode::Continuation;
        let hlen = usize::from(h.header_len);
        let end = usize::try_from(h.len)
            .ok()
            .and_then(|l| l.checked_add(hlen))
            .filter(|&e| e <= frame.len())?;
        let need = Need {
            prefix: cap.message_prefix(),
            limit,
        };
        let k = self.kept.get_or_insert_with(Box::default);
        if start {
            k.message.clear();
        }
        let d = self.deflate.get_or_insert_with(|| {
            Box::new(Deflate {
                inf: Inflater::new(stream),
                ahead: false,
                done: None,
                exceeded: false,
                verdict: None,
            })
        });
        if start {
            d.exceeded = false;
            d.inf.start();
        }
        d.ahead = true;
        d.done = None;
        if d.exceeded {
            d.done = h.fin.then_some(Err(Exceeded));
            return None;
        }
        let mut r = d
            .inf
            .feed(&frame[hlen..end], h.mask, 0, need, &mut k.message)
            .map(|()| Inflated::default());
        if h.fin && r.is_ok() {
            r = d.inf.finish(need, &mut k.message);
        }
        let v = match r {
            Err(Exceeded) => {
                d.exceeded = true;
                Some(Verdict::TooBig)
            }
            Ok(Inflated {
                error: Some(InflateError::Corrupt),
                ..
            }) => Some(Verdict::Corrupt),
            Ok(_) => None,
        };
        if h.fin {
            d.done = Some(r);
        }
        v
    }

    /// What inflation found since the last call, for the proxy to act on.
    pub fn take_verdict(&mut self) -> Option<Verdict> {
        self.deflate.as_deref_mut()?.verdict.take()
    }

    /// Whether this direction holds an inflate state.
    pub fn inflating(&self) -> bool {
        self.deflate.as_deref().is_some_and(|d| d.inf.allocated())
    }
}

/// Appends at most `room` bytes of `data` to `dst`, unmasked.
fn keep(dst: &mut Vec<u8>, data: &[u8], room: usize, mask: Option<[u8; 4]>, offset: u64) {
    let n = room.min(data.len());
    if n == 0 {
        return;
    }
    let start = dst.len();
    dst.extend_from_slice(&data[..n]);
    if let Some(m) = mask {
        unmask(&mut dst[start..], m, offset);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::frame::tests::build_frame;

    #[derive(Debug, PartialEq, Eq, Clone)]
    enum Rec {
        Frame {
            op: Opcode,
            len: u64,
            kind: Option<Opcode>,
            payload: Option<Vec<u8>>,
            truncated: bool,
            code: Option<u16>,
            reason: Option<String>,
        },
        Message(Message),
    }

    fn run(chunks: &[&[u8]], cap: Capture) -> (Vec<Rec>, Direction) {
        let mut d = Direction::new();
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, cap, |o| match o {
                Observed::Frame(f) => out.push(Rec::Frame {
                    op: f.header.opcode,
                    len: f.header.len,
                    kind: f.message_kind,
                    payload: f.payload.map(<[u8]>::to_vec),
                    truncated: f.truncated,
                    code: f.close_code,
                    reason: f.close_reason.clone(),
                }),
                Observed::Message(m) => out.push(Rec::Message(m.clone())),
            });
        }
        (out, d)
    }

    fn fragmented() -> Vec<u8> {
        let m = Some([3, 1, 4, 1]);
        let mut s = Vec::new();
        s.extend(build_frame(false, Opcode::Text, m, b"hel", false));
        s.extend(build_frame(true, Opcode::Ping, m, b"p", false));
        s.extend(build_frame(false, Opcode::Continuation, m, b"lo w", false));
        s.extend(build_frame(true, Opcode::Continuation, m, b"orld", false));
        s.extend(build_frame(true, Opcode::Binary, m, &[1, 2, 3], false));
        let mut close = 4000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"done");
        s.extend(build_frame(true, Opcode::Close, m, &close, false));
        s
    }

    #[test]
    fn messages_with_interleaved_control_frames() {
        let s = fragmented();
        let cap = Capture {
            payload: 5,
            ..Capture::default()
        };
        let (recs, d) = run(&[&s], cap);
        assert_eq!(d.frames, 6);
        assert_eq!(d.messages, 2);
        assert_eq!(d.bytes, 3 + 1 + 4 + 4 + 3 + 6);
        assert_eq!(d.close_code, Some(4000));
        assert_eq!(d.close_reason(), Some("done"));
        let msgs: Vec<_> = recs
            .iter()
            .filter_map(|r| match r {
                Rec::Message(m) => Some(m.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(msgs[0].kind, Opcode::Text);
        assert_eq!(msgs[0].len, 11);
        assert_eq!(msgs[0].frames, 3);
        assert_eq!(msgs[0].payload, b"hello");
        assert!(msgs[0].truncated);
        assert_eq!(msgs[1].payload, vec![1, 2, 3]);
        assert!(!msgs[1].truncated);
        // The ping frame in the middle has no message kind and no payload capture.
        assert_eq!(
            recs[1],
            Rec::Frame {
                op: Opcode::Ping,
                len: 1,
                kind: None,
                payload: None,
                truncated: false,
                code: None,
                reason: None
            }
        );
        // Continuation frames carry their message's kind.
        assert!(matches!(
            &recs[2],
            Rec::Frame { op: Opcode::Continuation, kind: Some(Opcode::Text), payload: Some(p), truncated: false, .. } if p == b"lo w"
        ));
        // The message record follows the frame that completed it.
        assert!(matches!(
            recs[3],
            Rec::Frame {
                op: Opcode::Continuation,
                ..
            }
        ));
        assert!(matches!(recs[4], Rec::Message(_)));
    }

    #[test]
    fn every_split_gives_same_records() {
        let s = fragmented();
        let cap = Capture {
            payload: 3,
            ..Capture::default()
        };
        let (whole, _) = run(&[&s], cap);
        for cut in 0..=s.len() {
            let (a, b) = s.split_at(cut);
            assert_eq!(run(&[a, b], cap).0, whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(run(&bytes, cap).0, whole);
    }

    #[test]
    fn counting_gives_the_same_totals_at_every_split() {
        let s = fragmented();
        let totals = |d: &Direction| {
            (
                d.frames,
                d.messages,
                d.bytes,
                d.data_frames,
                d.close_sent,
                d.close_code,
                d.close_reason().map(str::to_owned),
            )
        };
        let (_, fed) = run(&[&s], Capture::default());
        for cut in 0..=s.len() {
            let (a, b) = s.split_at(cut);
            let mut d = Direction::new();
            d.count(a);
            d.count(b);
            assert_eq!(totals(&d), totals(&fed), "cut at {cut}");
        }
        assert_eq!(
            totals(&fed),
            (6, 2, 21, 4, true, Some(4000), Some("done".into()))
        );
    }

    /// A capture without inflate from property-test bits: 1 deflate, 2 frame payload unread,
    /// 4 messages unread, `message_bit` message payload unread.
    fn capture_from_bits(payload: usize, flags: u8, message_bit: u8) -> Capture {
        Capture {
            payload,
            deflate: flags & 1 != 0,
            inflate: Inflate::Off,
            unread: Unread {
                frame_payload: flags & 2 != 0,
                message_payload: flags & message_bit != 0,
                messages: flags & 4 != 0,
            },
        }
    }

    proptest::proptest! {
        /// The short way for whole single-frame messages leaves a direction exactly as the
        /// general way does and reports the same, counting or feeding, whatever the frames,
        /// the capture and the splits.
        #[test]
        fn short_way_is_the_general_way(
            frames in proptest::collection::vec(crate::frame::tests::arb_frame(), 1..8),
            cuts in proptest::collection::vec(
                proptest::prelude::any::<proptest::sample::Index>(), 0..6),
            payload in 0usize..3, flags in 0u8..8,
        ) {
            let stream: Vec<u8> = frames.concat();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.sort_unstable();
            let cap = capture_from_bits(payload, flags, 2);
            let (mut short, mut general) = (Direction::new(), Direction::new());
            let (mut counted, mut counted_general) = (Direction::new(), Direction::new());
            let (mut seen, mut seen_general) = (Vec::new(), Vec::new());
            let mut last = 0;
            for p in points.into_iter().chain([stream.len()]) {
                let part = &stream[last..p];
                short.run::<true, true, _>(part, cap, |o| seen.push(format!("{o:?}")));
                general.run::<true, false, _>(part, cap, |o| seen_general.push(format!("{o:?}")));
                counted.count(part);
                counted_general.run::<false, false, _>(part, Capture::default(), |_| {});
                last = p;
            }
            proptest::prop_assert_eq!(seen, seen_general);
            proptest::prop_assert_eq!(format!("{short:?}"), format!("{general:?}"));
            proptest::prop_assert_eq!(format!("{counted:?}"), format!("{counted_general:?}"));
        }
    }

    /// A whole Text or Binary message of one frame (the writes `whole_message` takes), or any
    /// frame.
    fn arb_write() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (
                any::<bool>(),
                proptest::option::of(any::<[u8; 4]>()),
                proptest::collection::vec(any::<u8>(), 0..300),
                any::<bool>(),
            )
                .prop_map(|(text, mask, payload, rsv1)| {
                    let op = if text { Opcode::Text } else { Opcode::Binary };
                    crate::frame::tests::build_frame(true, op, mask, &payload, rsv1)
                }),
            1 => crate::frame::tests::arb_frame(),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
        /// A write that `whole_message` takes leaves a direction exactly as `feed` (or `count`)
        /// does and reports what `feed` reports for it; one it does not take is left alone.
        /// Whatever came before (frames split anywhere), whatever the frame, its RSV bits,
        /// the capture, and writes that are not exactly one frame.
        #[test]
        fn whole_message_is_the_general_way(
            before in proptest::collection::vec(arb_write(), 0..4),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            frame in arb_write(),
            rsv in proptest::prop_oneof![proptest::strategy::Just(0u8), 0u8..8],
            edge in proptest::prop_oneof![2 => proptest::strategy::Just(0u8), 1 => 0u8..3],
            payload in proptest::prop_oneof![0usize..3, 100usize..200],
            // Half the time a frame payload capture with nothing else read.
            flags in proptest::prop_oneof![proptest::strategy::Just(4u8 | 8), 0u8..16],
            report in proptest::prelude::any::<bool>(),
        ) {
            let before: Vec<u8> = before.concat();
            let mut write = frame;
            write[0] ^= rsv << 4;
            match edge {
                1 => { write.pop(); }
                2 => write.push(0x81),
                _ => {}
            }
            let cap = capture_from_bits(payload, flags, 8);
            let cap = if report { cap } else { Capture::default() };
            let at = cut.index(before.len() + 1);
            let (mut fast, mut general) = (Direction::new(), Direction::new());
            for d in [&mut fast, &mut general] {
                for part in [&before[..at], &before[at..]] {
                    if report {
                        d.feed(part, cap, |_| {});
                    } else {
                        d.count(part);
                    }
                }
            }
            let untouched = format!("{fast:?}");
            let mut seen = Vec::new();
            if report {
                general.feed(&write, cap, |o| seen.push(format!("{o:?}")));
            } else {
                general.count(&write);
            }
            let whole = fast.whole_message(&write, cap, report).map(|w| {
                (w.brief, w.payload.map(|(p, t)| (p.to_vec(), t)))
            });
            // A frame's kept payload prefix is read by its report only: the next header
            // clears it, and a kept buffer holding nothing is as good as none.
            if whole.is_some() {
                for d in [&mut fast, &mut general] {
                    if let Some(k) = d.kept.as_deref_mut() {
                        k.frame.clear();
                        k.frame_truncated = false;
                        if k.message.is_empty()
                            && k.close_payload.is_empty()
                            && k.close_reason.is_none()
                        {
                            d.kept = None;
                        }
                    }
                }
            }
            let reported = whole.map(|(brief, payload)| {
                let h = crate::frame::peek_header(&write).unwrap();
                let frame = Frame {
                    header: h,
                    message_kind: Some(h.opcode),
                    payload: payload.as_ref().map(|(p, _)| p.as_slice()),
                    truncated: payload.as_ref().is_some_and(|(_, t)| *t),
                    close_code: None,
                    close_reason: None,
                };
                (brief, h, format!("{:?}", Observed::Frame(frame)))
            });
            match reported {
                Some((b, h, frame)) => {
                    proptest::prop_assert_eq!(format!("{fast:?}"), format!("{general:?}"));
                    if report {
                        proptest::prop_assert_eq!(b.first, write[0]);
                        proptest::prop_assert_eq!(b.masked, h.mask.is_some());
                        proptest::prop_assert_eq!(b.len, h.len);
                        proptest::prop_assert_eq!(seen, vec![frame]);
                    }
                }
                None => proptest::prop_assert_eq!(format!("{fast:?}"), untouched),
            }
        }
    }

    /// Leaving out what nothing reads changes nothing else: the same counters, the same
    /// frames (without the unread payloads), the same messages or none, at every split.
    #[test]
    fn unread_parts_are_left_out_and_nothing_else() {
        let s = fragmented();
        let full = Capture {
            payload: 3,
            ..Capture::default()
        };
        let (whole, d) = run(&[&s], full);
        let totals = |d: &Direction| {
            let (f, m, b, c) = (d.frames, d.messages, d.bytes, d.close_code);
            (f, m, b, c, d.close_reason().map(str::to_owned))
        };
        for bits in 0..8u8 {
            let unread = Unread {
                frame_payload: bits & 1 != 0,
                message_payload: bits & 2 != 0,
                messages: bits & 4 != 0,
            };
            let cap = Capture { unread, ..full };
            let want: Vec<Rec> = whole
                .iter()
                .filter(|r| !(unread.messages && matches!(r, Rec::Message(_))))
                .cloned()
                .map(|r| match r {
                    Rec::Frame {
                        op,
                        len,
                        kind,
                        code,
                        reason,
                        ..
                    } if unread.frame_payload => Rec::Frame {
                        op,
                        len,
                        kind,
                        payload: None,
                        truncated: false,
                        code,
                        reason,
                    },
                    Rec::Message(mut m) if unread.message_payload => {
                        m.payload.clear();
                        m.truncated = false;
                        Rec::Message(m)
                    }
                    r => r,
                })
                .collect();
            for cut in 0..=s.len() {
                let (a, b) = s.split_at(cut);
                let (got, dd) = run(&[a, b], cap);
                assert_eq!(got, want, "{unread:?} cut at {cut}");
                assert_eq!(totals(&dd), totals(&d));
            }
        }
    }

    #[test]
    fn compressed_messages_are_flagged_not_captured() {
        let s = build_frame(true, Opcode::Text, None, b"\x01\x02", true);
        let cap = Capture {
            payload: 16,
            deflate: true,
            inflate: Inflate::Off,
            unread: Unread::default(),
        };
        let (recs, _) = run(&[&s], cap);
        match &recs[1] {
            Rec::Message(m) => {
                assert!(m.compressed);
                assert!(m.payload.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&recs[0], Rec::Frame { payload: None, .. }));
    }

    #[test]
    fn close_without_code_and_orphan_continuation() {
        let mut s = build_frame(true, Opcode::Continuation, None, b"x", false);
        s.extend(build_frame(true, Opcode::Close, None, b"", false));
        let (recs, d) = run(&[&s], Capture::default());
        assert_eq!(d.frames, 2);
        assert_eq!(d.messages, 0);
        assert!(d.close_sent);
        assert_eq!(d.close_code, None);
        assert!(matches!(
            recs[1],
            Rec::Frame {
                op: Opcode::Close,
                code: None,
                ..
            }
        ));
    }

    /// A compressed message `m` as `frames` frames from a sender compressing as `stream`.
    pub(crate) fn compressed_frames(
        tx: &mut crate::inflate::tests::Sender,
        m: &[u8],
        kind: Opcode,
        frames: usize,
        mask: Option<[u8; 4]>,
    ) -> Vec<u8> {
        let wire = tx.message(m);
        let n = frames.max(1);
        let size = wire.len().div_ceil(n).max(1);
        let mut out = Vec::new();
        let chunks: Vec<&[u8]> = if wire.is_empty() {
            vec![&[]]
        } else {
            wire.chunks(size).collect()
        };
        for (i, c) in chunks.iter().enumerate() {
            let op = if i == 0 { kind } else { Opcode::Continuation };
            out.extend(build_frame(i + 1 == chunks.len(), op, mask, c, i == 0));
        }
        out
    }

    fn inflating(payload: usize, stream: Stream, limit: u64) -> Capture {
        Capture {
            payload,
            deflate: true,
            inflate: Inflate::On { stream, limit },
            unread: Unread::default(),
        }
    }

    fn messages(recs: &[Rec]) -> Vec<Message> {
        recs.iter()
            .filter_map(|r| match r {
                Rec::Message(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn compressed_messages_are_inflated_at_every_split() {
        use crate::inflate::tests::Sender;
        let stream = Stream {
            window_bits: 11,
            no_context_takeover: false,
        };
        let mut tx = Sender::new(stream);
        let mask = Some([9, 8, 7, 6]);
        let texts: Vec<Vec<u8>> = (0..4)
            .map(|i| format!("message {i} ").repeat(20 + i * 30).into_bytes())
            .collect();
        let mut s = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            s.extend(compressed_frames(&mut tx, t, Opcode::Text, 1 + i, mask));
            s.extend(build_frame(true, Opcode::Ping, mask, b"x", false));
        }
        let cap = inflating(50, stream, 0);
        let (whole, d) = run(&[&s], cap);
        assert!(d.inflating());
        let msgs = messages(&whole);
        assert_eq!(msgs.len(), 4);
        for (m, t) in msgs.iter().zip(&texts) {
            assert!(m.compressed && m.inflated);
            assert_eq!(m.payload, &t[..50]);
            assert_eq!(m.inflated_len, Some(t.len() as u64));
            assert_eq!(m.inflate_error, None);
            assert!(m.truncated);
            assert!(m.len < t.len() as u64, "len is the wire length");
        }
        // Frame records of compressed frames carry no payload.
        assert!(whole.iter().all(|r| !matches!(
            r,
            Rec::Frame {
                op: Opcode::Text | Opcode::Continuation,
                payload: Some(_),
                ..
            }
        )));
        for cut in 0..=s.len() {
            let (a, b) = s.split_at(cut);
            assert_eq!(run(&[a, b], cap).0, whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(run(&bytes, cap).0, whole);
    }

    #[test]
    fn inflation_off_or_unsupported() {
        use crate::inflate::tests::Sender;
        let mut tx = Sender::new(Stream::default());
        let s = compressed_frames(&mut tx, b"hello hello", Opcode::Binary, 2, None);
        let cap = Capture {
            payload: 16,
            deflate: true,
            inflate: Inflate::Off,
            unread: Unread::default(),
        };
        let (recs, d) = run(&[&s], cap);
        assert!(
            !d.inflating(),
            "nothing allocated when nothing needs inflating"
        );
        let m = &messages(&recs)[0];
        assert!(m.compressed && !m.inflated && m.payload.is_empty());
        assert_eq!((m.inflated_len, m.inflate_error), (None, None));
        let cap = Capture {
            inflate: Inflate::Unsupported,
            ..cap
        };
        let (recs, d) = run(&[&s], cap);
        assert!(!d.inflating());
        let m = &messages(&recs)[0];
        assert!(m.payload.is_empty());
        assert_eq!(m.inflate_error, Some(InflateError::Unsupported));
    }

    #[test]
    fn corrupt_message_then_lost_state() {
        use crate::inflate::tests::Sender;
        let stream = Stream::default();
        let mut tx = Sender::new(stream);
        let mut s = build_frame(true, Opcode::Text, None, &[0xff, 0xff, 0xff], true);
        s.extend(compressed_frames(&mut tx, b"fine", Opcode::Text, 1, None));
        // An uncompressed message in between is captured as usual.
        s.extend(build_frame(true, Opcode::Text, None, b"plain", false));
        let cap = inflating(8, stream, 0);
        let (recs, mut d) = run(&[&s], cap);
        let msgs = messages(&recs);
        assert_eq!(msgs[0].inflate_error, Some(InflateError::Corrupt));
        assert!(msgs[0].payload.is_empty());
        assert_eq!(msgs[1].inflate_error, Some(InflateError::StateLost));
        assert_eq!(msgs[2].payload, b"plain");
        assert!(!msgs[2].compressed);
        assert_eq!(msgs[2].inflate_error, None);
        assert_eq!(d.take_verdict(), Some(Verdict::Corrupt));
    }

    #[test]
    fn inflated_ahead_is_not_inflated_again() {
        use crate::inflate::tests::Sender;
        let stream = Stream::default();
        let mut tx = Sender::new(stream);
        let t = b"abcabcabcabcabcabc".repeat(10);
        let s = compressed_frames(&mut tx, &t, Opcode::Text, 3, None);
        let cap = inflating(400, stream, 1 << 20);
        let mut d = Direction::new();
        let mut out = Vec::new();
        let mut rest = &s[..];
        while !rest.is_empty() {
            let h = peek_header(rest).unwrap();
            let n = usize::from(h.header_len) + h.len as usize;
            assert_eq!(d.inflate_ahead(&rest[..n], cap), None);
            // A retried write judges the frame again: nothing happens twice.
            assert_eq!(d.inflate_ahead(&rest[..n], cap), None);
            d.feed(&rest[..n], cap, |o| {
                if let Observed::Message(m) = o {
                    out.push(m.clone());
                }
            });
            rest = &rest[n..];
        }
        assert_eq!(out[0].payload, t);
        assert_eq!(out[0].inflated_len, Some(t.len() as u64));
    }
}
