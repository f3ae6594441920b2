//! Following permessage-deflate under any input: compressed messages made from the input (any
//! window, with or without context takeover) cut into any frames and any read splits, or
//! arbitrary bytes flagged as compressed; through the observer alone or through the flow
//! shaper that holds and inflates frames before forwarding them. No panic; a captured prefix
//! never exceeds `ws_log_payload`; a message inflated to its end has its exact length and
//! prefix; what passes the flow unrefused is the input byte for byte.
#![no_main]

use flate2::{Compress, Compression, FlushCompress};
use libfuzzer_sys::fuzz_target;
use nginx_ws_fuzz::flow::{Event as FlowEvent, Flow, Policy, Sent, Sink, Write};
use nginx_ws_fuzz::frame::{encode_header, unmask, FrameHeader, Opcode};
use nginx_ws_fuzz::inflate::Stream;
use nginx_ws_fuzz::observe::{Capture, Direction, Inflate, Message, Observed};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn frame(fin: bool, opcode: Opcode, rsv1: bool, payload: &[u8]) -> Vec<u8> {
    let h = FrameHeader {
        fin,
        rsv1,
        ..FrameHeader::single(opcode, Some(MASK), payload.len() as u64)
    };
    let (hdr, n) = encode_header(&h);
    let mut out = hdr[..n].to_vec();
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], MASK, 0);
    out
}

fn compress(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut input = data;
    loop {
        out.reserve(256);
        let before = (c.total_in(), out.len());
        let status = c.compress_vec(input, &mut out, FlushCompress::Sync)
            .unwrap();
        input = &input[(c.total_in() - before.0) as usize..];
        if status == flate2::Status::BufError && out.len() == before.1 && input.is_empty() {
            // No output for a second sync flush without new input: an empty stored block.
            out.extend_from_slice(&[0x00, 0x00, 0x00, 0xff, 0xff]);
            break;
        }
        if input.is_empty() && out.ends_with(&[0, 0, 0xff, 0xff]) && out.len() < out.capacity() {
            break;
        }
    }
    out.truncate(out.len() - 4);
    out
}

struct Accept(Vec<u8>);

impl Sink for Accept {
    fn write(&mut self, data: &[u8]) -> Write {
        self.0.extend_from_slice(data);
        Write::Done(data.len())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (h, rest) = data.split_at(8);
    let stream = Stream {
        window_bits: 9 + h[0] % 7,
        no_context_takeover: h[1] & 1 == 1,
    };
    let prefix = usize::from(h[2]) * 4;
    let limit = u64::from(h[3]) * 512;
    let compressed_input = h[4] & 1 == 1;
    let through_flow = h[4] & 2 == 2;
    let protocol_check = h[4] & 4 == 4;
    let mut seed = u32::from_le_bytes([h[5], h[6], h[7], 1]);
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };

    // The input stream and, for compressed input, the messages it carries.
    let mut wire = Vec::new();
    let mut messages: Vec<Vec<u8>> = Vec::new();
    if compressed_input {
        let mut c = Compress::new_with_window_bits(Compression::fast(), false, stream.window_bits);
        let mut at = 0;
        while at < rest.len() && messages.len() < 6 {
            let n = (next() as usize % 300).min(rest.len() - at);
            // Repeat the piece so that there is something to compress.
            let m = rest[at..at + n].repeat(1 + (next() as usize % 8));
            at += n.max(1);
            if stream.no_context_takeover {
                c.reset();
            }
            let z = compress(&mut c, &m);
            let frames = 1 + next() as usize % 3;
            let step = z.len().div_ceil(frames).max(1);
            let chunks: Vec<&[u8]> = if z.is_empty() {
                vec![&[]]
            } else {
                z.chunks(step).collect()
            };
            for (i, p) in chunks.iter().enumerate() {
                let op = if i > 0 {
                    Opcode::Continuation
                } else if next() & 1 == 0 {
                    Opcode::Text
                } else {
                    Opcode::Binary
                };
                wire.extend(frame(i + 1 == chunks.len(), op, i == 0, p));
            }
            messages.push(m);
        }
    } else {
        let mut at = 0;
        while at < rest.len() {
            let n = (next() as usize % 200).min(rest.len() - at);
            let fin = next() % 3 != 0;
            let op = if next() % 4 == 0 {
                Opcode::Continuation
            } else {
                Opcode::Binary
            };
            wire.extend(frame(fin, op, next() & 1 == 1, &rest[at..at + n]));
            at += n.max(1);
        }
    }

    let capture = Capture {
        payload: prefix,
        deflate: true,
        inflate: Inflate::On { stream, limit },
        unread: Default::default(),
    };
    let mut got: Vec<Message> = Vec::new();
    let mut take = |o: &Observed<'_>| {
        if let Observed::Message(m) = o {
            assert!(m.payload.len() <= prefix);
            got.push((*m).clone());
        }
    };
    let mut refused = false;
    if through_flow {
        let policy = Policy {
            protocol_check,
            expect_masked: true,
            rsv_allowed: 4,
            max_inflated: limit,
            ..Policy::default()
        };
        let mut flow = Flow::new(capture, policy, 0);
        let mut sink = Accept(Vec::new());
        let mut buf: Vec<u8> = Vec::new();
        let (mut pos, mut read) = (0, 0);
        let mut spins = 0;
        while read < wire.len() || pos < buf.len() || flow.has_pending() {
            if read < wire.len() {
                let n = (1 + next() as usize % 600).min(wire.len() - read);
                buf.extend_from_slice(&wire[read..read + n]);
                read += n;
            }
            match flow.send(&buf[pos..], &mut sink, &mut |e| {
                if let FlowEvent::Peer(o) = e {
                    take(&o)
                }
            }) {
                Sent::Consumed(n) => pos += n,
                Sent::Again => {}
                Sent::Error => break,
            }
            spins += 1;
            assert!(spins < 1_000_000, "no progress");
        }
        refused = flow.violation.is_some();
        if !refused {
            assert_eq!(sink.0, wire, "unrefused input passes byte for byte");
        }
    } else {
        let mut d = Direction::new();
        let mut at = 0;
        while at < wire.len() {
            let n = (1 + next() as usize % 700).min(wire.len() - at);
            d.feed(&wire[at..at + n], capture, |o| take(&o));
            at += n;
        }
    }
    if compressed_input && !refused {
        for (m, want) in got.iter().zip(&messages) {
            if limit > 0 && want.len() as u64 > limit {
                break;
            }
            assert_eq!(m.inflate_error, None);
            if let Some(len) = m.inflated_len {
                assert_eq!(len, want.len() as u64);
            }
            if prefix > 0 {
                assert_eq!(m.payload, want[..want.len().min(prefix)]);
            }
        }
    }
});
