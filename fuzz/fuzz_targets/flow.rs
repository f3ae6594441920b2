//! The flow shaper under any input, read split, write pattern (writes that return "again"
//! included), policy and injection moment: no panic, the output is whole frames, the peer
//! frames in it are exactly the input's first frames, none of them at or after the first frame
//! the policy refuses, and a retry after "again" always repeats the same bytes.
#![no_main]

use std::cell::Cell;
use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use nginx_ws_fuzz::flow::{Event as FlowEvent, Flow, Policy, Sent, Sink, Write};
use nginx_ws_fuzz::frame::{unmask, Event, FrameHeader, Opcode, Parser};
use nginx_ws_fuzz::observe::{Capture, Inflate};

struct Conn {
    out: Vec<u8>,
    /// How much has been written, readable from the flow's event callback.
    written: Rc<Cell<usize>>,
    caps: Vec<u8>,
    i: usize,
    again: Option<(usize, usize)>,
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
        self.out.extend_from_slice(&data[..n]);
        self.written.set(self.out.len());
        Write::Done(n)
    }
}

/// Frames of a stream: (opcode, unmasked payload, end offset); only whole frames. Also the
/// headers of all frames, the last one possibly partly there.
fn frames(stream: &[u8]) -> (Vec<(Opcode, Vec<u8>, usize)>, bool, Vec<FrameHeader>) {
    let mut p = Parser::new();
    let mut out = Vec::new();
    let mut headers = Vec::new();
    let mut pos = 0usize;
    let mut cur: Option<(Option<[u8; 4]>, Opcode, Vec<u8>)> = None;
    p.feed(stream, |ev| match ev {
        Event::Header(h) => {
            pos += usize::from(h.header_len);
            headers.push(h);
            cur = Some((h.mask, h.opcode, Vec::new()))
        }
        Event::Payload { offset, data } => {
            pos += data.len();
            if let Some((m, _, b)) = cur.as_mut() {
                let mut d = data.to_vec();
                if let Some(m) = m {
                    unmask(&mut d, *m, offset);
                }
                b.extend(d);
            }
        }
        Event::End => {
            if let Some((_, op, b)) = cur.take() {
                out.push((op, b, pos));
            }
        }
    });
    (out, p.at_boundary(), headers)
}

/// The index of the first frame the policy refuses (`headers.len()` when none), from RFC 6455
/// and the policy's documented rules, not from the flow's code: a message size runs from a
/// Text/Binary frame after a finished message (or the start) over every data frame up to the
/// next FIN, whatever frames interrupt it.
fn first_refused(headers: &[FrameHeader], p: &Policy) -> usize {
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

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (head, input) = data.split_at(12);
    let policy = Policy {
        max_frame: u64::from(head[0]) * 4,
        max_message: u64::from(head[1]) * 8,
        protocol_check: head[2] & 1 == 1,
        expect_masked: head[2] & 2 == 2,
        rsv_allowed: head[3] & 7,
        max_inflated: 0,
    };
    let mut flow = Flow::new(
        Capture {
            payload: usize::from(head[4]),
            deflate: head[3] & 8 == 8,
            inflate: Inflate::Off,
            unread: Default::default(),
        },
        policy,
        u32::from(head[5]),
    );
    if head[6] & 1 == 1 {
        flow.watch_pong(b"ngx-ws-ping-1".to_vec());
    }
    let read = usize::from(head[7]).max(1);
    let close_at = usize::from(head[8]) * 8;
    let ping_at = usize::from(head[9]) * 8;
    let written = Rc::new(Cell::new(0));
    let mut conn = Conn {
        out: Vec::new(),
        written: written.clone(),
        caps: head[10..12].to_vec(),
        i: 0,
        again: None,
    };
    // Where each frame the proxy injected ended in the output.
    let mut proxy_ends = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(input.len());
    let (mut pos, mut got) = (0, 0);
    let mut spins = 0;
    while got < input.len() || pos < buf.len() || flow.has_pending() {
        if got < input.len() {
            let n = read.min(input.len() - got);
            buf.extend_from_slice(&input[got..got + n]);
            got += n;
            if got >= ping_at && got < ping_at + read {
                flow.request_ping(b"ngx-ws-ping-2".to_vec());
            }
            if got >= close_at && head[8] != 0 {
                flow.request_close(1001, "idle timeout");
            }
        }
        let mut on = |e: FlowEvent<'_>| {
            if let FlowEvent::Proxy { .. } = e {
                proxy_ends.push(written.get());
            }
        };
        match flow.send(&buf[pos..], &mut conn, &mut on) {
            Sent::Consumed(n) => pos += n,
            Sent::Again => {}
            Sent::Error => unreachable!(),
        }
        spins += 1;
        if spins > 100_000 {
            panic!("no progress");
        }
    }
    let (out, whole, _) = frames(&conn.out);
    let (inp, input_whole, headers) = frames(input);
    let refused = first_refused(&headers, &policy);
    // Input that ends inside a frame may leave the output inside that frame; whole frames in
    // give whole frames out.
    assert!(whole || !input_whole, "output ends inside a frame");
    // Peer frames in the output are the input's frames in order, minus consumed pongs.
    let peer: Vec<_> = out.iter().filter(|f| !proxy_ends.contains(&f.2)).collect();
    let mut k = 0;
    for (i, f) in inp.iter().enumerate() {
        if k == peer.len() {
            break;
        }
        if (f.0, &f.1) == (peer[k].0, &peer[k].1) {
            assert!(
                i < refused,
                "a frame the policy refuses reached the connection"
            );
            k += 1;
        } else {
            // Only a consumed pong may be missing.
            assert!(
                f.0 == Opcode::Pong && f.1 == b"ngx-ws-ping-1",
                "unexpected frame in output"
            );
        }
    }
    assert_eq!(k, peer.len(), "output has frames the input did not");
});
