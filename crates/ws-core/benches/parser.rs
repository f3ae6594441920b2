//! Microbenchmarks of the pure frame parser (`ws_core::frame`) and of the per-direction
//! observer built on it (`ws_core::observe`), the code every tunnel byte passes through.
//!
//! Streams of masked client frames with 64 B, 1 KiB and 1 MiB payloads are fed three ways:
//! whole (one call), in 4093-byte pieces (about one nginx buffer, odd so that headers straddle
//! the cuts) and in 1-7 byte pieces (the worst split). Throughput is bytes on the wire per
//! second; the payload is only counted, never copied, as in the tunnel.
//!
//!     cargo bench --bench parser [-- FILTER]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use ws_core::frame::{encode_header, Event, FrameHeader, Opcode, Parser};
use ws_core::observe;

/// About this many wire bytes per stream, so that small frames are measured over many frames.
const STREAM_BYTES: usize = 1 << 20;

fn frame_bytes(len: usize, i: usize) -> Vec<u8> {
    let h = FrameHeader::single(Opcode::Text, Some([1, 2, 3, (i % 251) as u8]), len as u64);
    let (hdr, n) = encode_header(&h);
    let mut out = hdr[..n].to_vec();
    out.resize(n + len, b'x');
    out
}

/// A stream of masked text frames with `len`-byte payloads, at least one frame.
fn stream(len: usize) -> Vec<u8> {
    let mut s = Vec::new();
    let mut i = 0;
    while s.is_empty() || s.len() + len < STREAM_BYTES {
        s.extend(frame_bytes(len, i));
        i += 1;
    }
    s
}

/// The stream cut into pieces: `None` whole, else cycling through the given piece sizes.
fn pieces<'a>(s: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut k = 0;
    while at < s.len() {
        let n = sizes[k % sizes.len()].min(s.len() - at);
        out.push(&s[at..at + n]);
        at += n;
        k += 1;
    }
    out
}

const SIZES: [(usize, &str); 3] = [(64, "64B"), (1024, "1KiB"), (1 << 20, "1MiB")];
const SPLITS: [(&[usize], &str); 3] = [
    (&[usize::MAX], "whole"),
    (&[4093], "4093B-pieces"),
    (&[1, 7, 3, 5, 2, 6, 4], "1-7B-pieces"),
];

/// Runs `feed_all` over every frame size and split, as one criterion group.
fn sweep<R>(c: &mut Criterion, group: &str, feed_all: impl Fn(&[&[u8]]) -> R) {
    let mut g = c.benchmark_group(group);
    for (len, name) in SIZES {
        let s = stream(len);
        for (sizes, split) in SPLITS {
            let ps = pieces(&s, sizes);
            g.throughput(Throughput::Bytes(s.len() as u64));
            g.bench_with_input(BenchmarkId::new(split, name), &ps, |b, ps| {
                b.iter(|| black_box(feed_all(ps)))
            });
        }
    }
    g.finish();
}

fn parser(c: &mut Criterion) {
    sweep(c, "parser", |ps| {
        let mut p = Parser::new();
        let (mut frames, mut bytes) = (0u64, 0u64);
        for piece in ps {
            p.feed(black_box(piece), |ev| match ev {
                Event::Header(_) => {}
                Event::Payload { data, .. } => bytes += data.len() as u64,
                Event::End => frames += 1,
            });
        }
        (frames, bytes)
    });
}

/// The observer without payload capture: what a tracked tunnel does per direction.
fn observer(c: &mut Criterion) {
    sweep(c, "observer", |ps| {
        let mut d = observe::Direction::new();
        let mut seen = 0u64;
        for piece in ps {
            d.feed(black_box(piece), observe::Capture::default(), |_| seen += 1);
        }
        (seen, d.frames, d.bytes)
    });
}

criterion_group!(benches, parser, observer);
criterion_main!(benches);
