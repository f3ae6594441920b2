//! Differential: any bytes, fed whole or cut at fuzzer-chosen points, give the same frames and
//! messages, and the observer's counters add up; counting only (`Direction::count`, passive
//! tunnels) gives the same totals and Close as the full observer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nginx_ws_fuzz::observe::{Capture, Direction, Observed};

/// FNV-1a over what the observer reported: cheap enough for millions of runs.
struct Digest(u64, u64);

impl Digest {
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        self.1 += 1;
    }
}

type Totals = (u64, u64, u64, u64, bool, Option<u16>, Option<String>);

fn totals(d: &Direction) -> Totals {
    let r = d.close_reason().map(str::to_owned);
    (
        d.frames,
        d.messages,
        d.bytes,
        d.data_frames,
        d.close_sent,
        d.close_code,
        r,
    )
}

fn count(chunks: &[&[u8]]) -> Totals {
    let mut d = Direction::new();
    for c in chunks {
        d.count(c);
    }
    totals(&d)
}

fn run(chunks: &[&[u8]], cap: Capture) -> (u64, u64, u64, u64, u64) {
    let mut d = Direction::new();
    let mut h = Digest(0xcbf2_9ce4_8422_2325, 0);
    for c in chunks {
        d.feed(c, cap, |o| match o {
            Observed::Frame(f) => {
                let x = f.header;
                h.add(&[
                    0,
                    x.opcode.as_u8(),
                    u8::from(x.fin),
                    u8::from(x.rsv1),
                    x.header_len,
                ]);
                h.add(&x.len.to_le_bytes());
                h.add(&[
                    u8::from(f.truncated),
                    f.message_kind.map_or(99, |k| k.as_u8()),
                ]);
                h.add(f.payload.unwrap_or(b"-"));
                h.add(&f.close_code.unwrap_or(0).to_le_bytes());
                h.add(f.close_reason.as_deref().unwrap_or("-").as_bytes());
            }
            Observed::Message(m) => {
                h.add(&[
                    1,
                    m.kind.as_u8(),
                    u8::from(m.compressed),
                    u8::from(m.truncated),
                ]);
                h.add(&m.len.to_le_bytes());
                h.add(&m.frames.to_le_bytes());
                h.add(&m.payload);
            }
        });
    }
    assert_eq!(count(chunks), totals(&d), "counting differs from observing");
    (h.0, h.1, d.frames, d.messages, d.bytes)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let cap = Capture {
        payload: usize::from(data[0] & 0x3f),
        deflate: data[1] & 1 == 1,
        inflate: Default::default(),
        unread: Default::default(),
    };
    let step = usize::from(data[2]).max(1);
    let stream = &data[3..];
    let whole = run(&[stream], cap);
    let chunks: Vec<&[u8]> = stream.chunks(step).collect();
    assert_eq!(run(&chunks, cap), whole);
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(run(&bytes, cap), whole);
});
