//! What one direction of a tunnel carried: frames assembled into messages, counters, captured
//! payload prefixes and the Close frame a side sent.
//!
//! Pure Rust on top of [`crate::frame`]; the nginx glue in `tunnel.rs` feeds it the bytes a
//! `send` really wrote and turns what it reports into log records.

use crate::frame::{parse_close_payload, unmask, Event, FrameHeader, Opcode, Parser};

/// Control frames carry at most 125 payload bytes; a longer Close is kept only up to this.
const CONTROL_MAX: usize = 125;

/// What to capture while observing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capture {
    /// Payload prefix to keep for each data frame and message (`ws_log_payload`).
    pub payload: usize,
    /// A compression extension was negotiated: RSV1 on a first frame means "compressed".
    pub deflate: bool,
}

/// A data message in progress or just completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `Text` or `Binary`.
    pub kind: Opcode,
    pub len: u64,
    pub frames: u64,
    pub compressed: bool,
    /// Unmasked payload prefix, when captured.
    pub payload: Vec<u8>,
    pub truncated: bool,
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
        self.run::<true, F>(data, cap, f);
    }

    /// Feeds bytes that were written for the totals and the Close frames only: the same
    /// counters as [`Direction::feed`], no frames or messages reported, nothing captured.
    pub fn count(&mut self, data: &[u8]) {
        self.run::<false, _>(data, Capture::default(), |_| {});
    }

    #[inline(always)]
    fn run<const REPORT: bool, F: FnMut(Observed<'_>)>(
        &mut self,
        data: &[u8],
        cap: Capture,
        mut f: F,
    ) {
        let mut data = data;
        loop {
            // Whole frames in one step; frames split across writes event by event.
            if let Some((h, payload)) = self.parser.whole_frame(&mut data) {
                self.header(&h, cap);
                if !payload.is_empty() {
                    self.payload(&h, 0, payload, cap);
                }
                self.end::<REPORT, F>(h, cap, &mut f);
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
                self.msg = Some(InProgress {
                    kind: h.opcode,
                    len: 0,
                    frames: 0,
                    compressed: cap.deflate && h.rsv1,
                    truncated: false,
                });
                if let Some(k) = self.kept.as_deref_mut() {
                    k.message.clear();
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
        if cap.payload == 0 || m.compressed {
            return;
        }
        let k = self.kept.get_or_insert_with(Box::default);
        let room = cap.payload.saturating_sub(k.frame.len());
        if data.len() > room {
            k.frame_truncated = true;
        }
        keep(&mut k.frame, data, room, h.mask, offset);
        let room = cap.payload.saturating_sub(k.message.len());
        if data.len() > room {
            m.truncated = true;
        }
        keep(&mut k.message, data, room, h.mask, offset);
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
                captured = cap.payload > 0 && !m.compressed;
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
        if !finished {
            return;
        }
        self.messages += 1;
        let Some(p) = self.msg.take() else { return };
        if !REPORT {
            return;
        }
        // Lend the kept prefix to the message, then take the buffer back.
        let payload = self
            .kept
            .as_deref_mut()
            .map(|k| core::mem::take(&mut k.message))
            .unwrap_or_default();
        let m = Message {
            kind: p.kind,
            len: p.len,
            frames: p.frames,
            compressed: p.compressed,
            payload,
            truncated: p.truncated,
        };
        f(Observed::Message(&m));
        if let Some(k) = self.kept.as_deref_mut() {
            k.message = m.payload;
            k.message.clear();
        }
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
mod tests {
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
            deflate: false,
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
            deflate: false,
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

    #[test]
    fn compressed_messages_are_flagged_not_captured() {
        let s = build_frame(true, Opcode::Text, None, b"\x01\x02", true);
        let cap = Capture {
            payload: 16,
            deflate: true,
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
}
