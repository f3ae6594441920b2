//! What the flow targets share: a connection with a scripted write pattern, and the frames
//! and policy verdicts of a byte stream computed from RFC 6455 and the documented rules, not
//! from the flow's code.

use std::cell::Cell;
use std::rc::Rc;

use ws_core::flow::{Policy, Sink, Write};
use ws_core::frame::{unmask, Event, FrameHeader, Opcode, Parser};

/// A connection that takes at most `caps[i]` bytes at its i-th write; a cap of 0 returns
/// "again" (except at every 7th write, so that the flow always progresses), after which the
/// same bytes must be offered again.
pub struct Conn {
    pub out: Vec<u8>,
    /// How much has been written, readable from the flow's event callback.
    pub written: Rc<Cell<usize>>,
    /// The clock of the caller, read at each write.
    pub now: Rc<Cell<u64>>,
    /// (output length before the write, the clock then) for every write that wrote bytes.
    pub writes: Vec<(usize, u64)>,
    pub caps: Vec<u8>,
    pub i: usize,
    pub again: Option<(usize, usize)>,
}

impl Conn {
    pub fn new(caps: &[u8]) -> Conn {
        Conn {
            out: Vec::new(),
            written: Rc::new(Cell::new(0)),
            now: Rc::new(Cell::new(0)),
            writes: Vec::new(),
            caps: caps.to_vec(),
            i: 0,
            again: None,
        }
    }

    /// The clock when the byte at `offset` of the output was written.
    pub fn time_of(&self, offset: usize) -> u64 {
        let i = self.writes.partition_point(|&(start, _)| start <= offset);
        self.writes[i - 1].1
    }
}

impl Sink for Conn {
    fn write(&mut self, data: &[u8]) -> Write {
        if let Some((ptr, len)) = self.again.take() {
            assert_eq!(ptr, data.as_ptr() as usize);
            assert!(data.len() >= len);
        }
        let cap = usize::from(self.caps[self.i % self.caps.len()]);
        self.i += 1;
        if cap == 0 && self.i % 7 != 0 {
            self.again = Some((data.as_ptr() as usize, data.len()));
            return Write::Again;
        }
        let n = cap.max(1).min(data.len());
        if n > 0 {
            self.writes.push((self.out.len(), self.now.get()));
        }
        self.out.extend_from_slice(&data[..n]);
        self.written.set(self.out.len());
        Write::Done(n)
    }
}

/// A whole frame of a stream: its opcode, unmasked payload, and where it starts and ends.
pub struct Frame {
    pub opcode: Opcode,
    pub payload: Vec<u8>,
    pub start: usize,
    pub end: usize,
}

/// Frames of a stream (only whole frames), whether the stream ends between frames, and the
/// headers of all frames, the last one possibly partly there.
pub fn frames(stream: &[u8]) -> (Vec<Frame>, bool, Vec<FrameHeader>) {
    let mut p = Parser::new();
    let mut out = Vec::new();
    let mut headers = Vec::new();
    let mut pos = 0usize;
    let mut cur: Option<(Option<[u8; 4]>, Opcode, Vec<u8>, usize)> = None;
    p.feed(stream, |ev| match ev {
        Event::Header(h) => {
            let start = pos;
            pos += usize::from(h.header_len);
            headers.push(h);
            cur = Some((h.mask, h.opcode, Vec::new(), start))
        }
        Event::Payload { offset, data } => {
            pos += data.len();
            if let Some((m, _, b, _)) = cur.as_mut() {
                let mut d = data.to_vec();
                if let Some(m) = m {
                    unmask(&mut d, *m, offset);
                }
                b.extend(d);
            }
        }
        Event::End => {
            if let Some((_, opcode, payload, start)) = cur.take() {
                out.push(Frame {
                    opcode,
                    payload,
                    start,
                    end: pos,
                });
            }
        }
    });
    (out, p.at_boundary(), headers)
}

/// The index of the first frame the policy refuses (`headers.len()` when none), from RFC 6455
/// and the policy's documented rules, not from the flow's code: a message size runs from a
/// Text/Binary frame after a finished message (or the start) over every data frame up to the
/// next FIN, whatever frames interrupt it.
pub fn first_refused(headers: &[FrameHeader], p: &Policy) -> usize {
    let (mut unfinished, mut counted) = (false, 0u64);
    for (i, h) in headers.iter().enumerate() {
        let starts = matches!(h.opcode, Opcode::Text | Opcode::Binary);
        let data = starts || h.opcode == Opcode::Continuation;
        let control = !data && !matches!(h.opcode, Opcode::Reserved(n) if n < 8);
        let rsv = (u8::from(h.rsv1) << 2) | (u8::from(h.rsv2) << 1) | u8::from(h.rsv3);
        let allowed = if starts { p.rsv_allowed } else { 0 };
        let ext = usize::from(h.header_len) - 2 - if h.mask.is_some() { 4 } else { 0 };
        let long_len =
            (ext == 2 && h.len < 126) || (ext == 8 && (h.len < 65536 || h.len >> 63 == 1));
        let base = if starts && !unfinished { 0 } else { counted };
        let protocol = p.protocol_check
            && (rsv & !allowed != 0
                || matches!(h.opcode, Opcode::Reserved(_))
                || (control && (h.len > 125 || !h.fin))
                || (h.opcode == Opcode::Continuation && !unfinished)
                || (starts && unfinished)
                || (h.opcode == Opcode::Close && h.len == 1)
                || long_len
                || h.mask.is_some() != p.expect_masked);
        let too_big = (p.max_frame > 0 && h.len > p.max_frame)
            || (p.max_message > 0 && data && base.saturating_add(h.len) > p.max_message);
        if protocol || too_big {
            return i;
        }
        if data {
            (unfinished, counted) = (!h.fin, base.saturating_add(h.len));
        }
    }
    headers.len()
}

/// Which proxy-injected frames a flow wrote, by where they end in the output, and the peer
/// frames of the output in order (those that are not the proxy's).
pub fn peer_frames<'a>(out: &'a [Frame], proxy_ends: &[usize]) -> Vec<&'a Frame> {
    out.iter()
        .filter(|f| !proxy_ends.contains(&f.end))
        .collect()
}

/// Checks that the peer frames of the output are the input's frames in order, none at or
/// after frame `refused` of the input, missing only consumed pongs (payload `pong`). Returns
/// for each peer frame of the output the index of its input frame.
pub fn match_input(input: &[Frame], peer: &[&Frame], refused: usize, pong: &[u8]) -> Vec<usize> {
    let mut k = 0;
    let mut matched = Vec::new();
    for (i, f) in input.iter().enumerate() {
        if k == peer.len() {
            break;
        }
        if (f.opcode, &f.payload) == (peer[k].opcode, &peer[k].payload) {
            assert!(
                i < refused,
                "a frame the policy refuses reached the connection"
            );
            matched.push(i);
            k += 1;
        } else {
            // Only a consumed pong may be missing.
            assert!(
                f.opcode == Opcode::Pong && f.payload == pong,
                "unexpected frame in output"
            );
        }
    }
    assert_eq!(k, peer.len(), "output has frames the input did not");
    matched
}

/// The flow and policy the first seven bytes of a flow target's input choose: frame and
/// message limits, protocol check, masking, RSV bits, deflate, payload capture, mask seed,
/// and whether a proxy Ping's Pong is watched for.
pub fn flow_from(head: &[u8; 7]) -> (ws_core::flow::Flow, Policy) {
    use ws_core::observe::{Capture, Inflate};
    let policy = Policy {
        max_frame: u64::from(head[0]) * 4,
        max_message: u64::from(head[1]) * 8,
        protocol_check: head[2] & 1 == 1,
        expect_masked: head[2] & 2 == 2,
        rsv_allowed: head[3] & 7,
        max_inflated: 0,
    };
    let capture = Capture {
        payload: usize::from(head[4]),
        deflate: head[3] & 8 == 8,
        inflate: Inflate::Off,
        unread: Default::default(),
    };
    let mut flow = ws_core::flow::Flow::new(capture, policy, u32::from(head[5]));
    if head[6] & 1 == 1 {
        flow.watch_pong(b"ngx-ws-ping-1".to_vec());
    }
    (flow, policy)
}
