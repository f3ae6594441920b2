//! Frame policy: size limits and protocol checks end the tunnel with the spec's Close codes.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

fn location(echo: &Echo, directives: &str) -> String {
    format!(
        "location / {{ ws_log logs/ws.log; ws_log_events open frame close;\n\
         ws_close_timeout 1s; {directives}\n{} }}",
        proxy_to(echo.addr)
    )
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads messages until the Close; returns the data messages and the close (code, reason).
async fn until_close(ws: &mut Ws) -> (Vec<Message>, (u16, String)) {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => {
                let f = f.expect("close code");
                while let Some(Ok(_)) = ws.next().await {}
                return (got, (u16::from(f.code), f.reason.to_string()));
            }
            Ok(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => got.push(m),
            Ok(Some(Ok(_))) => {}
            other => panic!("no close: {other:?}"),
        }
    }
}

async fn upstream_close(echo: &Echo) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(c) = echo.seen.lock().unwrap().closes.first() {
            return c.clone();
        }
        assert!(Instant::now() < deadline, "upstream got no close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn end_of(ngx: &Nginx) -> serde_json::Value {
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    of_event(&recs, "close")[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_limit_just_below_and_above() {
    let echo = echo_server().await;
    let ngx = Nginx::start(1, "", &location(&echo, "ws_max_frame_size 1k;"));
    let mut ws = connect(&ngx.url("/")).await;
    ws.send(Message::Binary(vec![1; 1024])).await.unwrap();
    // The echo first: the proxy's Close, once sent, is the last frame the client gets, so an
    // echo still on its way when the oversized frame arrives would (rightly) be dropped.
    let echo_of_first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    assert!(
        matches!(&echo_of_first, Ok(Some(Ok(Message::Binary(b)))) if b == &vec![1; 1024]),
        "frame at the limit not echoed: {echo_of_first:?}"
    );
    ws.send(Message::Binary(vec![2; 1025])).await.unwrap();
    let (got, close) = until_close(&mut ws).await;
    assert_eq!(got, []);
    assert_eq!(close, (1009, "message too big".to_string()));
    assert_eq!(
        upstream_close(&echo).await,
        (1001, "message too big".to_string())
    );
    assert_eq!(
        echo.seen.lock().unwrap().messages.len(),
        1,
        "oversized frame forwarded"
    );
    let c = end_of(&ngx).await;
    assert_eq!(
        (c["end"].as_str(), c["closed_by"].as_str()),
        (Some("too_big"), Some("proxy"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_oversized_frame_gets_1009() {
    let echo = echo_server().await;
    let ngx = Nginx::start(1, "", &location(&echo, "ws_max_frame_size 1000;"));
    let mut ws = connect(&ngx.url("/grow")).await;
    ws.send(Message::Text("x".repeat(600))).await.unwrap();
    let (got, close) = until_close(&mut ws).await;
    assert!(got.is_empty(), "the 1200-byte answer was forwarded");
    assert_eq!(close, (1001, "message too big".to_string()));
    assert_eq!(
        upstream_close(&echo).await,
        (1009, "message too big".to_string())
    );
    assert_eq!(end_of(&ngx).await["end"], "too_big");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_limit_counts_fragments_across_frames() {
    let echo = echo_server().await;
    let ngx = Nginx::start(1, "", &location(&echo, "ws_max_message_size 1000;"));
    let mut ws = connect(&ngx.url("/")).await;
    // 1000 bytes in three fragments: passes.
    for (op, fin, n) in [
        (Data::Text, false, 400),
        (Data::Continue, false, 400),
        (Data::Continue, true, 200),
    ] {
        let f = Frame::message(vec![b'a'; n], OpCode::Data(op), fin);
        ws.send(Message::Frame(f)).await.unwrap();
    }
    loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            assert_eq!(t, "a".repeat(1000));
            break;
        }
    }
    // 1001 bytes in three fragments: the last fragment crosses the limit.
    for (op, fin, n) in [
        (Data::Text, false, 400),
        (Data::Continue, false, 400),
        (Data::Continue, true, 201),
    ] {
        let f = Frame::message(vec![b'b'; n], OpCode::Data(op), fin);
        ws.send(Message::Frame(f)).await.unwrap();
    }
    let (got, close) = until_close(&mut ws).await;
    assert!(got.is_empty());
    assert_eq!(close.0, 1009);
    assert_eq!(upstream_close(&echo).await.0, 1001);
    assert_eq!(echo.seen.lock().unwrap().messages.len(), 1);
    assert_eq!(end_of(&ngx).await["end"], "too_big");
}

/// A raw client sends `frame` after the handshake; returns the server frames it got.
async fn raw_violation(ngx: &Nginx, frame: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut c = TcpStream::connect(("127.0.0.1", ngx.port)).await.unwrap();
    c.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut b).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&b[..n]);
    }
    let p = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut rest = buf.split_off(p);
    c.write_all(frame).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => rest.extend_from_slice(&b[..n]),
        }
    }
    let mut frames = Vec::new();
    let mut i = 0;
    while i + 2 <= rest.len() {
        let len = usize::from(rest[i + 1] & 0x7f);
        frames.push((rest[i] & 0x0f, rest[i + 2..i + 2 + len].to_vec()));
        i += 2 + len;
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_get_1002() {
    let echo = echo_server().await;
    let ngx = Nginx::start(1, "", &location(&echo, "ws_protocol_check on;"));
    let m = Some([1, 2, 3, 4]);
    let cases: [(&str, Vec<u8>); 8] = [
        ("unmasked client frame", vec![0x81, 0x02, b'h', b'i']),
        ("reserved opcode", vec![0x83, 0x80, 1, 2, 3, 4]),
        ("rsv2 set", vec![0xa1, 0x80, 1, 2, 3, 4]),
        ("fragmented ping", vec![0x09, 0x80, 1, 2, 3, 4]),
        ("orphan continuation", vec![0x80, 0x80, 1, 2, 3, 4]),
        (
            "16-bit length for 5 bytes",
            raw_frame(true, 0x1, m, b"hello", Some(2)),
        ),
        (
            "64-bit length for 200 bytes",
            raw_frame(true, 0x2, m, &[0; 200], Some(8)),
        ),
        (
            "64-bit length with the top bit set",
            raw_header(true, 0x2, m, 1 << 63, 8),
        ),
    ];
    for (i, (name, frame)) in cases.iter().enumerate() {
        let frames = raw_violation(&ngx, frame).await;
        let close = frames
            .last()
            .unwrap_or_else(|| panic!("{name}: nothing back"));
        assert_eq!(close.0, 0x8, "{name}: {frames:?}");
        assert_eq!(&close.1[..2], &1002u16.to_be_bytes(), "{name}");
        assert_eq!(&close.1[2..], b"protocol error", "{name}");
        let recs = ngx.wait_records("logs/ws.log", closes(i + 1)).await;
        assert_eq!(
            of_event(&recs, "close")[i]["end"],
            "protocol_error",
            "{name}"
        );
    }
    // The error log names the rule each frame broke.
    let err = ngx.read("logs/error.log");
    for rule in [
        "a frame masked the wrong way for its direction (RFC 6455 5.1)",
        "a reserved opcode (RFC 6455 5.2)",
        "an RSV bit no extension defines (RFC 6455 5.2)",
        "a fragmented control frame (RFC 6455 5.5)",
        "a continuation with no message (RFC 6455 5.4)",
        "a non-minimal or out-of-range length (RFC 6455 5.2)",
    ] {
        assert!(
            err.contains(&format!("refused by ws_protocol_check: {rule}")),
            "{rule}: {err}"
        );
    }
    // The upstream got 1001 each time and never a violating frame.
    let seen = echo.seen.lock().unwrap();
    assert!(seen.messages.is_empty());
    assert!(seen.closes.iter().all(|c| c.0 == 1001), "{:?}", seen.closes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_traffic_passes_protocol_check() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        "",
        &location(
            &echo,
            "ws_protocol_check on; ws_max_frame_size 64k; ws_max_message_size 1m;",
        ),
    );
    let mut ws = connect(&ngx.url("/")).await;
    let f1 = Frame::message(b"frag".to_vec(), OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(f1)).await.unwrap();
    ws.send(Message::Ping(b"between".to_vec())).await.unwrap();
    let f2 = Frame::message(b"ment".to_vec(), OpCode::Data(Data::Continue), true);
    ws.send(Message::Frame(f2)).await.unwrap();
    ws.send(Message::Binary(vec![7; 65536])).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        if let m @ (Message::Text(_) | Message::Binary(_)) = ws.next().await.unwrap().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(
        got,
        [
            Message::Text("fragment".into()),
            Message::Binary(vec![7; 65536])
        ]
    );
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    assert_eq!(end_of(&ngx).await["end"], "normal");
}

/// permessage-deflate negotiated by real clients (Python `websockets`, which compresses by
/// default) passes untouched with `ws_protocol_check on`: RSV1 frames are allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permessage_deflate_passes_protocol_check() {
    let py = "import asyncio, sys, websockets
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    async with websockets.serve(echo, '127.0.0.1', 0) as srv:
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
";
    let mut server = tokio::process::Command::new("python3")
        .args(["-c", py])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with the websockets package (scripts/test installs it)");
    let mut out = tokio::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .unwrap();
    let port: u16 = line.trim().parse().expect("python websockets server port");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let loc = format!(
        "location / {{ ws_log logs/ws.log; ws_log_events open frame message close;\n\
         ws_protocol_check on; {} }}",
        proxy_to(addr)
    );
    let ngx = Nginx::start(1, "", &loc);
    let client = format!(
        "import asyncio, websockets
async def main():
    async with websockets.connect('ws://127.0.0.1:{}/') as ws:
        for i in range(5):
            m = 'compress me ' * 50 + str(i)
            await ws.send(m)
            assert await ws.recv() == m
        print('ok', ws.response.headers.get('Sec-WebSocket-Extensions'))
asyncio.run(main())
",
        ngx.port
    );
    let out = tokio::process::Command::new("python3")
        .args(["-c", &client])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("permessage-deflate"),
        "not negotiated: {stdout}"
    );
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let open = of_event(&recs, "open")[0];
    assert!(open["extensions"]
        .as_str()
        .unwrap()
        .contains("permessage-deflate"));
    let msgs = of_event(&recs, "message");
    assert_eq!(msgs.len(), 10);
    assert!(msgs
        .iter()
        .all(|m| m["compressed"] == true && m["len"].as_u64() < Some(600)));
    let frames = of_event(&recs, "frame");
    assert!(frames
        .iter()
        .filter(|f| f["opcode"] == "text")
        .all(|f| f["rsv1"] == true));
    let close = of_event(&recs, "close")[0];
    assert_eq!(close["end"], "normal");
    assert_eq!(close["client"]["messages"], 5);
}

/// A frame as the raw peers below write it: `ext` extra length bytes (0, 2 or 8; `None`: the
/// fewest), masked with `mask` when set.
fn raw_frame(
    fin: bool,
    op: u8,
    mask: Option<[u8; 4]>,
    payload: &[u8],
    ext: Option<usize>,
) -> Vec<u8> {
    let len = payload.len() as u64;
    let ext = ext.unwrap_or(match len {
        0..=125 => 0,
        126..=65535 => 2,
        _ => 8,
    });
    let mut out = raw_header(fin, op, mask, len, ext);
    let mut p = payload.to_vec();
    if let Some(m) = mask {
        for (i, b) in p.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    out.extend(p);
    out
}

fn raw_header(fin: bool, op: u8, mask: Option<[u8; 4]>, len: u64, ext: usize) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | op];
    let bit = if mask.is_some() { 0x80 } else { 0 };
    match ext {
        0 => out.push(bit | len as u8),
        2 => {
            out.push(bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(bit | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    out.extend(
        mask.unwrap_or_default()
            .iter()
            .take(if mask.is_some() { 4 } else { 0 }),
    );
    out
}

/// A frame a raw peer received: opcode, FIN, payload (unmasked).
#[derive(Debug)]
struct RawFrame {
    op: u8,
    fin: bool,
    payload: Vec<u8>,
}

impl RawFrame {
    fn close_code(&self) -> Option<u16> {
        (self.op == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Takes the complete frames off the front of `buf`.
fn take_frames(buf: &mut Vec<u8>) -> Vec<RawFrame> {
    let mut out = Vec::new();
    loop {
        if buf.len() < 2 {
            return out;
        }
        let (mut len, mut pos) = (u64::from(buf[1] & 0x7f), 2);
        if len == 126 && buf.len() >= 4 {
            (len, pos) = (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4);
        } else if len == 127 && buf.len() >= 10 {
            (len, pos) = (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10);
        } else if len >= 126 {
            return out;
        }
        let masked = buf[1] & 0x80 != 0;
        if masked && buf.len() < pos + 4 {
            return out;
        }
        let mask = masked.then(|| [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]);
        pos += if masked { 4 } else { 0 };
        let end = pos + len as usize;
        if buf.len() < end {
            return out;
        }
        let mut payload = buf[pos..end].to_vec();
        if let Some(m) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= m[i % 4];
            }
        }
        out.push(RawFrame {
            op: buf[0] & 0x0f,
            fin: buf[0] & 0x80 != 0,
            payload,
        });
        buf.drain(..end);
    }
}

/// Reads frames until the peer's Close (or end of stream, or 10 s of silence), `chunk` bytes
/// at a time with `pause` between reads: a slow reader keeps the other side's writes blocked.
async fn read_frames<R: AsyncReadExt + Unpin>(
    rd: &mut R,
    mut buf: Vec<u8>,
    chunk: usize,
    pause: Duration,
) -> Vec<RawFrame> {
    let mut frames = take_frames(&mut buf);
    let mut b = vec![0u8; chunk];
    while !frames.iter().any(|f| f.op == 8) {
        match tokio::time::timeout(Duration::from_secs(10), rd.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&b[..n]),
            _ => break,
        }
        frames.extend(take_frames(&mut buf));
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    frames
}

/// Reads an HTTP head; returns it and what came after it.
async fn read_head<S: AsyncReadExt + Unpin>(c: &mut S) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut b).await.unwrap();
        assert!(n > 0, "no HTTP head");
        buf.extend_from_slice(&b[..n]);
    }
    let p = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let rest = buf.split_off(p);
    (String::from_utf8_lossy(&buf).into_owned(), rest)
}

/// Accepts one WebSocket connection by hand (no frame checks of its own, as a lenient
/// upstream); returns it and the bytes after the request.
async fn raw_accept<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    accepted: impl std::future::Future<Output = std::io::Result<S>>,
) -> (S, Vec<u8>) {
    let mut c = accepted.await.unwrap();
    let (head, rest) = read_head(&mut c).await;
    let key = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .expect("Sec-WebSocket-Key");
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    c.write_all(resp.as_bytes()).await.unwrap();
    (c, rest)
}

/// Opens a WebSocket through nginx by hand, with a small receive buffer when `rcvbuf` is
/// set; returns it and the bytes after the 101.
async fn raw_connect(port: u16, rcvbuf: Option<u32>) -> (TcpStream, Vec<u8>) {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n).unwrap();
    }
    let mut c = s.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    c.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, rest) = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (c, rest)
}

/// A frame limit, and nginx buffers that take in all a peer sends while the other stalls: a
/// write retried after "again" is then offered everything that came after it.
const STALLED: &str = "ws_max_frame_size 2000; proxy_buffer_size 1m; proxy_buffers 4 1m; \
                       proxy_busy_buffers_size 1m;";

/// Many tiny frames (so that a blocked write tends to block at a frame boundary), then one
/// over 2000 bytes, then a few more.
fn small_then_big(mask: Option<[u8; 4]>, total: usize) -> Vec<u8> {
    let mut s = Vec::new();
    let mut i = 0usize;
    while s.len() < total {
        s.extend(raw_frame(true, 0x2, mask, &vec![b's'; i % 5], None));
        i += 1;
    }
    s.extend(raw_frame(true, 0x2, mask, &[b'B'; 3000], None));
    for _ in 0..10 {
        s.extend(raw_frame(true, 0x2, mask, &[b'a'; 100], None));
    }
    s
}

/// What one side of a stalled tunnel received: every frame within the limit, then the
/// proxy's Close with `code`.
fn assert_limit_held(side: &str, frames: &[RawFrame], code: u16) {
    let big = frames.iter().filter(|f| f.payload.len() > 2000).count();
    assert_eq!(
        big,
        0,
        "{side} got the oversized frame ({} frames)",
        frames.len()
    );
    let last = frames
        .last()
        .unwrap_or_else(|| panic!("{side} got nothing"));
    assert_eq!(last.close_code(), Some(code), "{side}: last frame {last:?}");
    assert!(frames.len() > 1000, "{side} got {} frames", frames.len());
}

/// A stalled upstream: nginx's writes to it return "again" again and again while the client
/// sends many small frames and then an oversized one. Each retried write must stop where its
/// judged frame ended: the oversized frame never reaches the upstream. The upstream listens on
/// a unix socket, whose send buffer does not grow as TCP's does on loopback (to megabytes), so
/// that nginx's writes block often.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_never_gets_the_oversized_frame() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // nginx's workers may run as another user.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("up.sock");
    let up = tokio::net::UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let proxy = format!(
        "proxy_pass http://unix:{}:;\n proxy_http_version 1.1;\n\
         proxy_set_header Upgrade $http_upgrade;\n proxy_set_header Connection \"upgrade\";",
        sock.display()
    );
    let loc = format!(
        "location / {{ ws_log logs/ws.log; ws_log_events open close;\n\
         ws_close_timeout 1s; {STALLED}\n{proxy} }}"
    );
    let ngx = Nginx::start(1, "", &loc);
    for round in 0..4 {
        let ((client, _), (mut upstream, rest)) = tokio::join!(
            raw_connect(ngx.port, None),
            raw_accept(async { up.accept().await.map(|a| a.0) })
        );
        let (mut rd, mut wr) = client.into_split();
        let writer = tokio::spawn(async move {
            let _ = wr
                .write_all(&small_then_big(Some([1, 2, 3, 4]), 400_000))
                .await;
            wr
        });
        // Stall, then read slowly.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = read_frames(&mut upstream, rest, 2048, Duration::from_millis(1)).await;
        assert_limit_held(&format!("round {round}: upstream"), &got, 1001);
        // Answer the Close, so that the tunnel ends without waiting for ws_close_timeout.
        let _ = upstream
            .write_all(&raw_frame(true, 0x8, None, &[0x03, 0xe9], None))
            .await;
        let back = read_frames(&mut rd, Vec::new(), 4096, Duration::ZERO).await;
        assert_eq!(back.last().and_then(RawFrame::close_code), Some(1009));
        let mut wr = writer.await.unwrap();
        let _ = wr
            .write_all(&raw_frame(
                true,
                0x8,
                Some([1, 2, 3, 4]),
                &[0x03, 0xf1],
                None,
            ))
            .await;
        let recs = ngx.wait_records("logs/ws.log", closes(round + 1)).await;
        assert_eq!(of_event(&recs, "close")[round]["end"], "too_big");
    }
}

/// The same toward a stalled client, through a listening socket with a small send buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_never_gets_the_oversized_frame() {
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = free_port();
    let server = format!(
        "server {{ listen 127.0.0.1:{port} sndbuf=4k;\n\
         location / {{ ws_log logs/ws.log; ws_log_events open close;\n\
         ws_close_timeout 1s; {STALLED}\n{} }} }}",
        proxy_to(up.local_addr().unwrap())
    );
    let ngx = Nginx::start_conf(&main_conf(1, &server), port);
    for round in 0..4 {
        let ((mut client, rest), (upstream, _)) = tokio::join!(
            raw_connect(ngx.port, Some(4096)),
            raw_accept(async { up.accept().await.map(|a| a.0) })
        );
        let (mut rd, mut wr) = upstream.into_split();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&small_then_big(None, 40_000)).await;
            wr
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = read_frames(&mut client, rest, 1024, Duration::ZERO).await;
        assert_limit_held(&format!("round {round}: client"), &got, 1001);
        let reply = raw_frame(true, 0x8, Some([5, 6, 7, 8]), &[0x03, 0xe9], None);
        let _ = client.write_all(&reply).await;
        let back = read_frames(&mut rd, Vec::new(), 4096, Duration::ZERO).await;
        assert_eq!(back.last().and_then(RawFrame::close_code), Some(1009));
        let mut wr = writer.await.unwrap();
        let _ = wr
            .write_all(&raw_frame(true, 0x8, None, &[0x03, 0xf1], None))
            .await;
        let recs = ngx.wait_records("logs/ws.log", closes(round + 1)).await;
        assert_eq!(of_event(&recs, "close")[round]["end"], "too_big");
    }
}

/// With `ws_protocol_check off` a lenient upstream takes any framing: the message limit still
/// holds. A Text frame inside an unfinished message continues its size; so does a
/// Continuation without a message before it, or after a finished one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_limit_holds_for_broken_framing() {
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let loc = format!(
        "location / {{ ws_log logs/ws.log; ws_log_events open close;\n\
         ws_close_timeout 1s; ws_max_message_size 1000;\n{} }}",
        proxy_to(up.local_addr().unwrap())
    );
    let ngx = Nginx::start(1, "", &loc);
    let m = Some([1, 2, 3, 4]);
    // (name, first frame (passes), second frame (crosses the limit)): 600 + 600 bytes.
    let cases = [
        (
            "text interrupting an unfinished text",
            (false, 0x1),
            (true, 0x1),
        ),
        ("orphan continuations", (false, 0x0), (true, 0x0)),
        (
            "continuation after a finished message",
            (true, 0x1),
            (true, 0x0),
        ),
    ];
    for (i, (name, first, second)) in cases.into_iter().enumerate() {
        let ((client, _), (mut upstream, rest)) = tokio::join!(
            raw_connect(ngx.port, None),
            raw_accept(async { up.accept().await.map(|a| a.0) })
        );
        let (mut rd, mut wr) = client.into_split();
        let mut frames = raw_frame(first.0, first.1, m, &[b'a'; 600], None);
        frames.extend(raw_frame(second.0, second.1, m, &[b'b'; 600], None));
        wr.write_all(&frames).await.unwrap();
        let back = read_frames(&mut rd, Vec::new(), 4096, Duration::ZERO).await;
        assert_eq!(
            back.last().and_then(RawFrame::close_code),
            Some(1009),
            "{name}: {back:?}"
        );
        let got = read_frames(&mut upstream, rest, 4096, Duration::ZERO).await;
        assert_eq!(got.len(), 2, "{name}: {got:?}");
        assert_eq!(
            (got[0].op, got[0].fin, got[0].payload.len()),
            (first.1, first.0, 600),
            "{name}"
        );
        assert_eq!(got[1].close_code(), Some(1001), "{name}");
        let _ = upstream
            .write_all(&raw_frame(true, 0x8, None, &[0x03, 0xe9], None))
            .await;
        let _ = wr
            .write_all(&raw_frame(true, 0x8, m, &[0x03, 0xf1], None))
            .await;
        let recs = ngx.wait_records("logs/ws.log", closes(i + 1)).await;
        assert_eq!(of_event(&recs, "close")[i]["end"], "too_big", "{name}");
    }
}
