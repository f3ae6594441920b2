//! Frame-aware timeouts and graceful closing: idle, lifetime, proxy pings, drain on reload.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

const FORMAT: &str = "log_format ws '$ws_end $ws_closed_by $ws_close_code \"$ws_close_reason\"';";

fn location(echo: &Echo, directives: &str) -> String {
    format!(
        "location / {{ ws_log logs/ws.log; ws_log_events open frame close;\n\
         access_log logs/access.log ws;\n{directives}\n{} }}",
        proxy_to(echo.addr)
    )
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads until the Close frame; returns (code, reason) and when it came.
async fn await_close(ws: &mut Ws) -> ((u16, String), Instant) {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => {
                let f = f.expect("close frame without code");
                let at = Instant::now();
                // Let tungstenite send its reply and see the end.
                while let Some(Ok(_)) = ws.next().await {}
                return ((u16::from(f.code), f.reason.to_string()), at);
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

async fn check_proxy_close(ngx: &Nginx, echo: &Echo, end: &str, code: u16, reason: &str) {
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let close = of_event(&recs, "close")[0];
    assert_eq!(close["end"], end);
    assert_eq!(close["closed_by"], "proxy");
    let proxy: Vec<_> = of_event(&recs, "frame")
        .into_iter()
        .filter(|f| f["from"] == "proxy")
        .collect();
    assert_eq!(proxy.len(), 2, "a Close to each peer: {proxy:?}");
    assert!(proxy
        .iter()
        .all(|f| f["opcode"] == "close" && f["code"] == code));
    assert_eq!(
        proxy.iter().filter(|f| f["masked"] == true).count(),
        1,
        "upstream's is masked"
    );
    // The upstream got a (masked) Close with the same code.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(c) = echo.seen.lock().unwrap().closes.first() {
            assert_eq!(c, &(code, reason.to_string()));
            break;
        }
        assert!(Instant::now() < deadline, "upstream got no close frame");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = ngx.wait_lines("logs/access.log", 1).await.remove(0);
    assert_eq!(line, format!("{end} proxy {code} \"{reason}\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_ignores_pings_and_closes_both_sides() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        FORMAT,
        &location(&echo, "ws_idle_timeout 1s; ws_close_timeout 1s;"),
    );
    let mut ws = connect(&ngx.url("/")).await;
    // Taken before the last data frame leaves: the idle time nginx counts starts later.
    let last_data = Instant::now();
    ws.send(Message::Text("last data".into())).await.unwrap();
    ws.next().await.unwrap().unwrap();
    // Pings every 100 ms do not keep the tunnel open.
    let (pinger_ws_tx, mut rx) = ws.split();
    let pinger = tokio::spawn(async move {
        let mut tx = pinger_ws_tx;
        for _ in 0..40 {
            if tx
                .send(Message::Ping(b"keepalive?".to_vec()))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => break f.unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close: {other:?}"),
        }
    };
    let after = last_data.elapsed();
    pinger.abort();
    assert_eq!(u16::from(close.code), 1001);
    assert_eq!(close.reason, "idle timeout");
    assert!(
        after >= Duration::from_millis(950) && after < Duration::from_secs(3),
        "{after:?}"
    );
    check_proxy_close(&ngx, &echo, "idle_timeout", 1001, "idle timeout").await;
    assert!(echo.seen.lock().unwrap().pings >= 5, "pings were forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_keeps_an_idle_timeout_open() {
    let echo = echo_server().await;
    let ngx = Nginx::start(1, FORMAT, &location(&echo, "ws_idle_timeout 1s;"));
    let mut ws = connect(&ngx.url("/")).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3300) {
        ws.send(Message::Text("tick".into())).await.unwrap();
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => break assert_eq!(t, "tick"),
                Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
        ws.send(Message::Ping(vec![])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    assert_eq!(of_event(&recs, "close")[0]["end"], "normal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_closes_a_busy_tunnel() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        FORMAT,
        &location(&echo, "ws_max_lifetime 1s; ws_close_timeout 1s;"),
    );
    // Taken before the handshake: the lifetime nginx counts starts at the 101.
    let opened = Instant::now();
    let ws = connect(&ngx.url("/")).await;
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        while tx.send(Message::Text("busy".into())).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => break f.unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close: {other:?}"),
        }
    };
    let after = opened.elapsed();
    sender.abort();
    drop(rx);
    assert_eq!(
        (u16::from(close.code), &*close.reason),
        (1001, "max lifetime")
    );
    assert!(
        after >= Duration::from_millis(950) && after < Duration::from_secs(3),
        "{after:?}"
    );
    check_proxy_close(&ngx, &echo, "max_lifetime", 1001, "max lifetime").await;
}

/// A raw client: handshake, then nothing unless told.
async fn raw_client(port: u16, path: &str) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(c.read(&mut b).await.unwrap(), 1, "eof in handshake");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    c
}

/// Reads unmasked server frames from a raw socket: (opcode, payload) until EOF or timeout.
async fn read_frames(c: &mut TcpStream, limit: Duration) -> (Vec<(u8, Vec<u8>)>, bool) {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    let deadline = Instant::now() + limit;
    let mut eof = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                eof = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&b[..n]),
            Err(_) => break,
        }
    }
    let mut frames = Vec::new();
    let mut i = 0;
    while i + 2 <= buf.len() {
        let op = buf[i] & 0x0f;
        let len = usize::from(buf[i + 1] & 0x7f);
        assert!(len < 126 && buf[i + 1] & 0x80 == 0);
        frames.push((op, buf[i + 2..i + 2 + len].to_vec()));
        i += 2 + len;
    }
    (frames, eof)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_pings_keep_live_clients_and_drop_dead_ones() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        FORMAT,
        &location(
            &echo,
            "ws_ping_interval 500ms; ws_pong_timeout 1s; ws_close_timeout 1s;",
        ),
    );
    // A live client (tungstenite answers pings while it reads) stays open well past
    // interval + pong timeout, and its pongs never reach the upstream.
    let mut ws = connect(&ngx.url("/live")).await;
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(2600) {
        match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Ok(Some(Ok(Message::Ping(p)))) => {
                assert!(p.starts_with(b"ngx-ws-ping-"), "{p:?}");
                pings += 1;
            }
            Ok(Some(Ok(Message::Close(f)))) => panic!("live client closed: {f:?}"),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => {}
        }
    }
    assert!(pings >= 3, "only {pings} proxy pings");
    ws.send(Message::Text("still here".into())).await.unwrap();
    loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            assert_eq!(t, "still here");
            break;
        }
    }
    assert_eq!(
        echo.seen.lock().unwrap().pongs,
        0,
        "proxy's pongs forwarded upstream"
    );
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    ngx.wait_records("logs/ws.log", closes(1)).await;

    // A dead client (reads nothing, answers nothing) gets one ping, then Close 1001.
    let mut dead = raw_client(ngx.port, "/dead").await;
    let t0 = Instant::now();
    let (frames, eof) = read_frames(&mut dead, Duration::from_secs(6)).await;
    let took = t0.elapsed();
    assert_eq!(frames[0].0, 0x9, "a ping first: {frames:?}");
    let close = frames
        .last()
        .filter(|f| f.0 == 0x8)
        .expect("close frame, and nothing after it");
    assert_eq!(&close.1[..2], &1001u16.to_be_bytes());
    assert_eq!(&close.1[2..], b"ping timeout");
    assert!(eof, "TCP closed after ws_close_timeout");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(6),
        "{took:?}"
    );
    let recs = ngx.wait_records("logs/ws.log", closes(2)).await;
    let c = of_event(&recs, "close")[1];
    assert_eq!(
        (c["end"].as_str(), c["closed_by"].as_str()),
        (Some("ping_timeout"), Some("proxy"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_stalled_inside_a_frame_is_closed_without_close_frame() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        FORMAT,
        &location(&echo, "ws_idle_timeout 1s; ws_close_timeout 1s;"),
    );
    let mut c = raw_client(ngx.port, "/stall").await;
    // Half a masked 100-byte binary frame, then silence.
    let mut frame = vec![0x82, 0x80 | 100, 1, 2, 3, 4];
    frame.extend(std::iter::repeat_n(0u8, 50));
    c.write_all(&frame).await.unwrap();
    let (frames, eof) = read_frames(&mut c, Duration::from_secs(6)).await;
    // The client direction is at a boundary: it gets its Close; the upstream direction is
    // mid-frame: the upstream gets no Close, and TCP closes after ws_close_timeout.
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].0, 0x8);
    assert!(eof);
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    assert_eq!(of_event(&recs, "close")[0]["end"], "idle_timeout");
    assert!(
        echo.seen.lock().unwrap().closes.is_empty(),
        "upstream got a close mid-frame"
    );
    let log = ngx.read("logs/error.log");
    assert!(
        log.contains("client stalled inside a frame, no close frame sent to the upstream"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_on_reload_sends_1012_and_old_worker_exits() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        FORMAT,
        &location(&echo, "ws_drain 1s; ws_close_timeout 1s;"),
    );
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut ws = connect(&ngx.url("/")).await;
        ws.send(Message::Text("hi".into())).await.unwrap();
        ws.next().await.unwrap().unwrap();
        clients.push(ws);
    }
    let t0 = Instant::now();
    ngx.signal(libc::SIGHUP);
    let mut codes = Vec::new();
    for ws in clients.iter_mut() {
        let ((code, reason), _) = await_close(ws).await;
        codes.push((code, reason));
    }
    let took = t0.elapsed();
    assert!(
        codes
            .iter()
            .all(|c| c == &(1012, "service restart".to_string())),
        "{codes:?}"
    );
    assert!(took < Duration::from_secs(4), "drain took {took:?}");
    // The old worker exits as soon as its tunnels are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = ngx.read("logs/error.log");
        if log.contains("exiting") {
            break;
        }
        assert!(Instant::now() < deadline, "old worker did not exit:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recs = ngx.wait_records("logs/ws.log", closes(5)).await;
    for c in of_event(&recs, "close") {
        assert_eq!(c["end"], "drain");
    }
    // New workers serve new tunnels.
    let mut ws = connect(&ngx.url("/")).await;
    ws.send(Message::Text("after".into())).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));
}

/// The upstream answers the proxy's Close and hangs up at once; the client answers later. The
/// proxy waits for the client's reply instead of cutting it off with the upstream's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_close_reply_is_still_awaited() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        FORMAT,
        &location(&echo, "ws_idle_timeout 1s; ws_close_timeout 3s;"),
    );
    let mut c = raw_client(ngx.port, "/slow").await;
    let (frames, eof) = read_frames(&mut c, Duration::from_millis(2500)).await;
    assert!(!eof, "connection closed before the client answered");
    assert_eq!(frames.last().map(|f| f.0), Some(0x8), "{frames:?}");
    // Answer 400 ms after the Close came, long after the upstream has hung up.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reply = [0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xe9 ^ 2];
    c.write_all(&reply).await.expect("the reply could be sent");
    let (_, eof) = read_frames(&mut c, Duration::from_secs(3)).await;
    assert!(eof, "closed after the reply");
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let close = of_event(&recs, "close")[0];
    assert_eq!(close["end"], "idle_timeout");
    assert_eq!(close["client"]["close_code"], 1001, "{close}");
    assert_eq!(close["upstream"]["close_code"], 1001, "{close}");
    // Ended by the completed handshake, not by ws_close_timeout.
    let log = ngx.read("logs/error.log");
    assert!(!log.contains("after ws_close_timeout"), "{log}");
}
