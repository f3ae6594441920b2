//! Following permessage-deflate on 1 KiB messages: the module's path next to the inflate
//! crate's raw speed, and next to the same compressed tunnel when nothing needs inflating.
//!
//! 1000 JSON-like text messages of 1 KiB, compressed as a permessage-deflate sender does
//! (15-bit window, context takeover, sync flush, tail removed), about 190 bytes each on the
//! wire, masked client frames in 4093-byte reads (about one nginx buffer):
//!
//! - `raw-flate2`: flate2 (system zlib) alone inflating the unmasked payloads into a 4 KiB
//!   buffer, appending the tail: the crate's speed, the floor;
//! - `observer-inflating`: the module's path, `observe::Direction` with a 256-byte prefix
//!   captured and the message records built (parse, unmask, inflate, prefix, length);
//! - `observer-not-inflating`: the same stream when nothing needs inflating (what every
//!   compressed tunnel without capture or `ws_max_inflated_size` costs, as before).
//!
//!
//! It also prints the heap a direction holds once it inflates (window 9, 12 and 15 bits), and
//! before (nothing needs inflating), measured with a counting allocator.
//!
//!     cargo bench -p ws-core --bench inflate

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use ws_core::frame::{encode_header, unmask, FrameHeader, Opcode};
use ws_core::inflate::Stream;
use ws_core::observe::{Capture, Direction, Inflate, Observed};

/// Live heap bytes.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc requires.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        // SAFETY: allocated by System with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_sub(l.size(), Relaxed);
        LIVE.fetch_add(n, Relaxed);
        // SAFETY: allocated by System with this layout.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MESSAGES: usize = 1000;
const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

fn message(i: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut k = i as u64;
    while s.len() < 1024 {
        k = k
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s += &format!(
            "{{\"id\":{},\"user\":\"user{}\",\"text\":\"hello world {}\",\"ok\":{}}},",
            k % 100000,
            (k >> 20) % 977,
            (k >> 33) % 31337,
            k & 1 == 1
        );
    }
    s.truncate(1024);
    s.into_bytes()
}

/// The compressed payloads (tail removed) of the messages.
fn compressed() -> Vec<Vec<u8>> {
    let mut c = Compress::new_with_window_bits(Compression::default(), false, 15);
    (0..MESSAGES)
        .map(|i| {
            let mut out = Vec::with_capacity(2048);
            c.compress_vec(&message(i), &mut out, FlushCompress::Sync)
                .unwrap();
            out.truncate(out.len() - 4);
            out
        })
        .collect()
}

/// The masked client frames carrying them.
fn wire(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut s = Vec::new();
    for p in payloads {
        let h = FrameHeader {
            rsv1: true,
            ..FrameHeader::single(Opcode::Text, Some(MASK), p.len() as u64)
        };
        let (hdr, n) = encode_header(&h);
        s.extend_from_slice(&hdr[..n]);
        let start = s.len();
        s.extend_from_slice(p);
        unmask(&mut s[start..], MASK, 0);
    }
    s
}

/// The heap one direction holds after its first compressed message, by window.
fn memory() {
    for bits in [9u8, 12, 15] {
        let mut c = Compress::new_with_window_bits(Compression::default(), false, bits);
        let mut p = Vec::with_capacity(2048);
        c.compress_vec(&message(0), &mut p, FlushCompress::Sync)
            .unwrap();
        p.truncate(p.len() - 4);
        let s = wire(&[p]);
        let stream = Stream {
            window_bits: bits,
            no_context_takeover: false,
        };
        let mut sizes = Vec::new();
        for inflate in [Inflate::Off, Inflate::On { stream, limit: 0 }] {
            let cap = Capture {
                payload: 256,
                deflate: true,
                inflate,
                unread: Default::default(),
            };
            let before = LIVE.load(Relaxed);
            let mut d = Direction::new();
            d.feed(&s, cap, |_| {});
            sizes.push(LIVE.load(Relaxed) - before);
            drop(d);
        }
        eprintln!(
            "memory of one direction after a compressed message, window {bits} bits: \
             {} B not inflating, {} B inflating (256-byte prefix kept)",
            sizes[0], sizes[1]
        );
    }
}

fn bench(c: &mut Criterion) {
    memory();
    let payloads = compressed();
    let s = wire(&payloads);
    let reads: Vec<&[u8]> = s.chunks(4093).collect();
    let mut g = c.benchmark_group("inflate-1KiB");
    g.throughput(Throughput::Elements(MESSAGES as u64));

    g.bench_function("raw-flate2", |b| {
        b.iter(|| {
            let mut d = Decompress::new_with_window_bits(false, 15);
            let mut out = [0u8; 4096];
            let mut total = 0u64;
            for p in &payloads {
                for chunk in [&p[..], &[0, 0, 0xff, 0xff][..]] {
                    let before = d.total_out();
                    d.decompress(black_box(chunk), &mut out, FlushDecompress::None)
                        .unwrap();
                    total += d.total_out() - before;
                }
            }
            assert_eq!(total, (MESSAGES * 1024) as u64);
            total
        })
    });

    let reads = &reads;
    let run = move |inflate: Inflate| {
        let cap = Capture {
            payload: 256,
            deflate: true,
            inflate,
            unread: Default::default(),
        };
        move || {
            let mut d = Direction::new();
            let mut inflated = 0u64;
            for r in reads {
                d.feed(black_box(r), cap, |o| {
                    if let Observed::Message(m) = o {
                        inflated += m.inflated_len.unwrap_or(0) + m.payload.len() as u64;
                    }
                });
            }
            assert_eq!(d.messages, MESSAGES as u64);
            inflated
        }
    };
    let on = run(Inflate::On {
        stream: Stream::default(),
        limit: 0,
    });
    g.bench_function("observer-inflating", |b| b.iter(&on));
    let off = run(Inflate::Off);
    g.bench_function("observer-not-inflating", |b| b.iter(&off));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
