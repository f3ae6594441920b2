//! What one direction of a tunnel carried: frames assembled into messages, counters, captured
//! payload prefixes and the Close frame a side sent.
//!
//! Pure Rust on top of [`crate::frame`]; the nginx glue in `tunnel.rs` feeds it the bytes a
//! `send` really wrote and turns what it reports into log records.

use crate::frame::{parse_close_payload, unmask, Event, FrameHeader, Opcode, Parser};

/// Control frames carry at most 125 payload bytes; a longer one is kept only up to this.
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
    /// Whether this side sent a Close frame, and the first one's code and reason.
    pub close_sent: bool,
    pub close_code: Option<u16>,
    pub close_reason: Option<String>,
    /// Completed data frames (text, binary, continuation).
    pub data_frames: u64,
    msg: Option<Message>,
    frame_capture: Vec<u8>,
    frame_truncated: bool,
    control: Vec<u8>,
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

    /// Whether a data frame's payload is passing right now.
    pub fn in_data_frame(&self) -> bool {
        self.parser.current().is_some_and(|h| h.opcode.is_data())
    }

    /// See [`Parser::until_known`](crate::frame::Parser::until_known).
    pub fn until_known(&self) -> Option<u64> {
        self.parser.until_known()
    }

    /// Feeds bytes that were written, calling `f` for each completed frame and message.
    pub fn feed<F: FnMut(Observed<'_>)>(&mut self, data: &[u8], cap: Capture, mut f: F) {
        let Direction {
            parser,
            frames,
            messages,
            bytes,
            close_sent,
            close_code,
            close_reason,
            data_frames,
            msg,
            frame_capture,
            frame_truncated,
            control,
        } = self;

        let mut data = data;
        while let Some(ev) = parser.next_event(&mut data) {
            match ev {
                Event::Header(h) => {
                    frame_capture.clear();
                    *frame_truncated = false;
                    control.clear();
                    match h.opcode {
                        Opcode::Text | Opcode::Binary => {
                            *msg = Some(Message {
                                kind: h.opcode,
                                len: 0,
                                frames: 0,
                                compressed: cap.deflate && h.rsv1,
                                payload: Vec::new(),
                                truncated: false,
                            });
                        }
                        Opcode::Continuation if msg.is_none() => {
                            // A continuation without a start: counted as a frame, no message.
                        }
                        _ => {}
                    }
                }
                Event::Payload { offset, data } => {
                    *bytes += data.len() as u64;
                    // The parser's header is the one this payload belongs to.
                    let Some(h) = parser.last_header() else {
                        continue;
                    };
                    if h.opcode.is_control() {
                        let room = CONTROL_MAX.saturating_sub(control.len());
                        keep(control, data, room, h.mask, offset);
                        continue;
                    }
                    if !h.opcode.is_data() {
                        continue;
                    }
                    let Some(m) = msg.as_mut() else { continue };
                    m.len += data.len() as u64;
                    if cap.payload == 0 || m.compressed {
                        continue;
                    }
                    let room = cap.payload.saturating_sub(frame_capture.len());
                    if data.len() > room {
                        *frame_truncated = true;
                    }
                    keep(frame_capture, data, room, h.mask, offset);
                    let room = cap.payload.saturating_sub(m.payload.len());
                    if data.len() > room {
                        m.truncated = true;
                    }
                    keep(&mut m.payload, data, room, h.mask, offset);
                }
                Event::End => {
                    let Some(&h) = parser.last_header() else {
                        continue;
                    };
                    *frames += 1;
                    if h.opcode.is_data() {
                        *data_frames += 1;
                    }
                    let mut frame = Frame {
                        header: h,
                        message_kind: None,
                        payload: None,
                        truncated: false,
                        close_code: None,
                        close_reason: None,
                    };
                    if h.opcode == Opcode::Close {
                        let (code, reason) = parse_close_payload(control);
                        if !*close_sent {
                            *close_sent = true;
                            *close_code = code;
                            close_reason.clone_from(&reason);
                        }
                        frame.close_code = code;
                        frame.close_reason = reason;
                    }
                    let mut finished = false;
                    if h.opcode.is_data() {
                        if let Some(m) = msg.as_mut() {
                            m.frames += 1;
                            frame.message_kind = Some(m.kind);
                            if cap.payload > 0 && !m.compressed {
                                frame.payload = Some(frame_capture.as_slice());
                                frame.truncated = *frame_truncated;
                            }
                            finished = h.fin;
                        }
                    }
                    f(Observed::Frame(frame));
                    if finished {
                        *messages += 1;
                        if let Some(m) = msg.as_ref() {
                            f(Observed::Message(m));
                        }
                        *msg = None;
                    }
                }
            }
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
        assert_eq!(d.close_reason.as_deref(), Some("done"));
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
