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
    let cases: [(&str, Vec<u8>); 5] = [
        ("unmasked client frame", vec![0x81, 0x02, b'h', b'i']),
        ("reserved opcode", vec![0x83, 0x80, 1, 2, 3, 4]),
        ("rsv2 set", vec![0xa1, 0x80, 1, 2, 3, 4]),
        ("fragmented ping", vec![0x09, 0x80, 1, 2, 3, 4]),
        ("orphan continuation", vec![0x80, 0x80, 1, 2, 3, 4]),
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
