//! Raw WebSocket pieces for compressed (permessage-deflate, RFC 7692) traffic, which
//! tokio-tungstenite 0.24 does not speak: the handshake by hand, frames read and written
//! whole, a byte-for-byte echo and a compressing client. Shared by ws-echo (`--deflate`) and
//! ws-bench (the compressed workloads).
//!
//! The echo returns each frame of the client as it came (unmasked), RSV1 included: since
//! messages are echoed in order, the client's compressed stream is a valid compressed stream
//! in the other direction as well, even with context takeover. The answer to the client's
//! offer keeps that true (the server's window and context takeover mirror the client's).

// Each example uses its own part of this file.
#![allow(dead_code)]

use std::io;

use base64::Engine as _;
use flate2::{Compress, Compression, FlushCompress};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// RFC 6455 4.2.2: the `Sec-WebSocket-Accept` of a key.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The `Sec-WebSocket-Extensions` answer of a byte-for-byte echo to the client's offers: the
/// first permessage-deflate offer it can accept, with the server's window and context
/// takeover equal to the client's (the echoed stream is the client's own). None: decline.
pub fn deflate_answer(offers: &str) -> Option<String> {
    'offer: for offer in offers.split(',') {
        let mut parts = offer.split(';').map(str::trim);
        if !parts
            .next()
            .is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate"))
        {
            continue;
        }
        let (mut no_takeover, mut server_bits, mut client_bits_ok) = (false, None, false);
        for p in parts {
            let (name, value) = match p.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (p, None),
            };
            match (name, value) {
                ("server_no_context_takeover" | "client_no_context_takeover", None) => {
                    no_takeover = true
                }
                ("server_max_window_bits", Some(v)) => match v.parse::<u8>() {
                    Ok(b @ 9..=15) => server_bits = Some(b),
                    _ => continue 'offer,
                },
                ("client_max_window_bits", _) => client_bits_ok = true,
                _ => continue 'offer,
            }
        }
        let mut answer = String::from("permessage-deflate");
        if no_takeover {
            answer.push_str("; server_no_context_takeover; client_no_context_takeover");
        }
        if let Some(b) = server_bits {
            // The client must then compress with no larger a window than the echo claims.
            if b < 15 && !client_bits_ok {
                continue;
            }
            answer.push_str(&format!("; server_max_window_bits={b}"));
            if b < 15 {
                answer.push_str(&format!("; client_max_window_bits={b}"));
            }
        }
        return Some(answer);
    }
    None
}

/// Reads an HTTP head (up to the empty line) from `s`; returns it and the bytes after it.
async fn read_head(s: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > 16 * 1024 {
            return Err(io::Error::other("HTTP head over 16 KiB"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of header `name` in an HTTP head (the first one).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A frame, its payload unmasked.
pub struct Frame {
    /// FIN, RSV1-3 and the opcode, as on the wire.
    pub first: u8,
    pub payload: Vec<u8>,
}

/// Frames read whole from a byte stream.
#[derive(Default)]
pub struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    fn new(leftover: Vec<u8>) -> Self {
        Frames { buf: leftover }
    }

    /// The next frame; None at the end of the stream between frames.
    pub async fn next(&mut self, s: &mut TcpStream) -> io::Result<Option<Frame>> {
        loop {
            if let Some((frame, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            // Small reads into spare room: thousands of idle tunnels keep little memory.
            self.buf.reserve(4096);
            let n = s.read_buf(&mut self.buf).await?;
            if n == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    _ => Err(io::ErrorKind::UnexpectedEof.into()),
                };
            }
        }
    }
}

/// A whole frame at the start of `b` and the bytes it takes.
fn parse(b: &[u8]) -> Option<(Frame, usize)> {
    let (first, second) = (*b.first()?, *b.get(1)?);
    let (len, mut at) = match second & 0x7f {
        126 => (
            u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask: Option<[u8; 4]> = if second & 0x80 != 0 {
        at += 4;
        Some(b.get(at - 4..at)?.try_into().ok()?)
    } else {
        None
    };
    let mut payload = b.get(at..at.checked_add(len)?)?.to_vec();
    if let Some(m) = mask {
        apply_mask(&mut payload, m);
    }
    Some((Frame { first, payload }, at + len))
}

fn apply_mask(p: &mut [u8], m: [u8; 4]) {
    for (i, b) in p.iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// A frame on the wire: `first` (FIN, RSV, opcode), the length, the mask if any, the payload.
pub fn encode(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(first);
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => f.push(m | n as u8),
        n @ 126..=0xffff => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = f.len();
    f.extend_from_slice(payload);
    if let Some(k) = mask {
        f.splice(start..start, k);
        apply_mask(&mut f[start + 4..], k);
    }
    f
}

/// Server side: reads the upgrade request, answers 101 (accepting permessage-deflate when
/// offered, see `deflate_answer`), and returns the request path and the bytes read after it.
pub async fn accept(s: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let (head, rest) = read_head(s).await?;
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let key = header(&head, "sec-websocket-key")
        .ok_or_else(|| io::Error::other("no Sec-WebSocket-Key"))?;
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(ext) = header(&head, "sec-websocket-extensions").and_then(deflate_answer) {
        resp.push_str(&format!("Sec-WebSocket-Extensions: {ext}\r\n"));
    }
    resp.push_str("\r\n");
    s.write_all(resp.as_bytes()).await?;
    Ok((path, rest))
}

/// Echoes every frame back as it came (unmasked), answers Pings, returns the Close. Runs
/// until the client closes.
pub async fn echo(mut s: TcpStream, leftover: Vec<u8>) -> io::Result<()> {
    let mut frames = Frames::new(leftover);
    while let Some(f) = frames.next(&mut s).await? {
        match f.first & 0x0f {
            0x8 => {
                s.write_all(&encode(0x88, &f.payload, None)).await?;
                return Ok(());
            }
            0x9 => s.write_all(&encode(0x8a, &f.payload, None)).await?,
            0xa => {}
            _ => s.write_all(&encode(f.first, &f.payload, None)).await?,
        }
    }
    Ok(())
}

/// A varying JSON-like text of exactly `size` bytes (at least 64): a sequence number, an
/// event type and items with ids, user names, prices and times drawn from `seed`, ending in a
/// note of words that fills it up. What a chat or market-data feed sends, compressing to
/// roughly a fifth with context takeover.
pub fn json_text(seed: u64, size: usize) -> String {
    const EVENTS: [&str; 4] = ["update", "trade", "quote", "presence"];
    const WORDS: [&str; 12] = [
        "alpha", "bravo", "delta", "order", "filled", "pending", "north", "east", "market",
        "limit", "cancel", "route",
    ];
    let mut r = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        r ^= r >> 12;
        r ^= r << 25;
        r ^= r >> 27;
        r.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 16
    };
    let mut s = format!(
        "{{\"seq\":{},\"event\":\"{}\",\"items\":[",
        seed % 1_000_000_000,
        EVENTS[(next() % 4) as usize]
    );
    loop {
        let item = format!(
            "{{\"id\":{},\"user\":\"user-{}\",\"price\":{}.{:02},\"qty\":{},\
             \"ts\":\"2026-11-30T{:02}:{:02}:{:02}.{:03}Z\"}}",
            next() % 1_000_000,
            next() % 5000,
            next() % 10_000,
            next() % 100,
            next() % 500,
            next() % 24,
            next() % 60,
            next() % 60,
            next() % 1000,
        );
        // Room left for this item, the comma, `],"note":"` and `"}`.
        if s.len() + item.len() + 1 + 14 > size {
            break;
        }
        if !s.ends_with('[') {
            s.push(',');
        }
        s.push_str(&item);
    }
    s.push_str("],\"note\":\"");
    while s.len() + 2 < size {
        let w = WORDS[(next() % 12) as usize];
        let room = size - 2 - s.len();
        s.push_str(&w[..w.len().min(room)]);
        if s.len() + 2 < size {
            s.push(' ');
        }
    }
    s.push_str("\"}");
    s
}

/// Client side of a compressed tunnel: permessage-deflate negotiated (15-bit windows, context
/// takeover), each text message compressed by one persistent raw deflater with a sync flush,
/// the trailing `00 00 ff ff` removed (RFC 7692 7.2.1), RSV1 on the frame, masked.
pub struct DeflateClient {
    s: TcpStream,
    frames: Frames,
    /// Dropped once the client sends no more (idle tunnels): about 256 KiB each.
    deflater: Option<Compress>,
    seq: u64,
    mask: u64,
}

impl DeflateClient {
    pub async fn connect(host_port: &str, path: &str, id: u64) -> Result<Self, String> {
        let mut s = TcpStream::connect(host_port)
            .await
            .map_err(|e| format!("connect {host_port}: {e}"))?;
        let _ = s.set_nodelay(true);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (head, rest) = read_head(&mut s)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        if !head.starts_with("HTTP/1.1 101") {
            return Err(format!(
                "handshake: {}",
                head.lines().next().unwrap_or_default()
            ));
        }
        let ext = header(&head, "sec-websocket-extensions").unwrap_or_default();
        if ext.trim() != "permessage-deflate" {
            return Err(format!("permessage-deflate not negotiated (got {ext:?})"));
        }
        Ok(DeflateClient {
            s,
            frames: Frames::new(rest),
            deflater: Some(Compress::new_with_window_bits(
                Compression::default(),
                false,
                15,
            )),
            seq: id << 32,
            mask: id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        })
    }

    /// Compresses `text` as the next message of this tunnel.
    fn compress(&mut self, text: &[u8]) -> Result<Vec<u8>, String> {
        let c = self.deflater.as_mut().ok_or("the deflater was dropped")?;
        let mut out = Vec::with_capacity(text.len() / 2 + 64);
        let start = c.total_in();
        loop {
            let done = (c.total_in() - start) as usize;
            c.compress_vec(&text[done..], &mut out, FlushCompress::Sync)
                .map_err(|e| format!("deflate: {e}"))?;
            // Finished when all input is in and the flush did not fill the buffer.
            if (c.total_in() - start) as usize == text.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity());
        }
        if !out.ends_with(&[0, 0, 0xff, 0xff]) {
            return Err("deflate: no sync flush tail".into());
        }
        out.truncate(out.len() - 4);
        Ok(out)
    }

    /// Sends the next `size`-byte text message compressed and waits for its echo, which must
    /// be the same compressed bytes.
    pub async fn round_trip(&mut self, size: usize) -> Result<(), String> {
        self.seq += 1;
        let text = json_text(self.seq, size);
        let wire = self.compress(text.as_bytes())?;
        self.mask ^= self.mask << 13;
        self.mask ^= self.mask >> 7;
        self.mask ^= self.mask << 17;
        let frame = encode(0xc1, &wire, Some((self.mask as u32).to_be_bytes()));
        self.s
            .write_all(&frame)
            .await
            .map_err(|e| format!("send: {e}"))?;
        loop {
            match self.frames.next(&mut self.s).await {
                Ok(Some(f)) if f.first & 0x0f == 0x1 => {
                    return match f.first == 0xc1 && f.payload == wire {
                        true => Ok(()),
                        false => Err("the echo differs from the message sent".into()),
                    };
                }
                Ok(Some(f)) if f.first & 0x0f == 0x8 => return Err("closed by the peer".into()),
                Ok(Some(_)) => {}
                Ok(None) => return Err("connection closed".into()),
                Err(e) => return Err(format!("receive: {e}")),
            }
        }
    }

    /// Frees the compressor (256 KiB): this tunnel will send no more.
    pub fn idle(&mut self) {
        self.deflater = None;
        self.frames.buf = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_have_the_size_asked() {
        for size in [64, 100, 1024, 4096] {
            for seed in 0..50 {
                assert_eq!(json_text(seed, size).len(), size);
            }
        }
    }
}
