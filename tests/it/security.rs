//! Ways around the module's own controls, each closed: odd `Upgrade` headers, HTTP/2 upgrade
//! attempts, `post_action`, client-chosen metric labels.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::harness::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends an upgrade request with `upgrade_lines` (whole `Upgrade: ...` lines, or any other
/// headers) and reads the response head. Returns the head and, on 101, the client WebSocket.
async fn raw_upgrade(
    port: u16,
    path: &str,
    lines: &str,
) -> (String, Option<WebSocketStream<TcpStream>>) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}Connection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b))
            .await
            .expect("response head")
            .unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&b[..n]);
    }
    let p = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let rest = buf.split_off(p);
    let head = String::from_utf8_lossy(&buf).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        return (head, None);
    }
    let ws = WebSocketStream::from_partially_read(c, rest, Role::Client, Some(ws_config())).await;
    (head, Some(ws))
}

/// Reads until the proxy's Close; returns its (code, reason).
async fn close_of(ws: &mut WebSocketStream<TcpStream>) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return (u16::from(f.code), f.reason.to_string());
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

/// A location whose upstream accepts any upgrade attempt as WebSocket: nginx sends it a fixed
/// `Upgrade: websocket`, as lenient servers (gorilla, Jetty, ...) accept `h2c, websocket`.
fn limited(echo: &Echo, extra: &str) -> String {
    format!(
        "location / {{ ws_log logs/ws.log; ws_log_events open close reject; ws_close_timeout 1s;\n\
         ws_max_frame_size 64k; {extra}\n\
         proxy_pass http://{addr}; proxy_http_version 1.1;\n\
         proxy_set_header Upgrade websocket; proxy_set_header Connection upgrade; }}",
        addr = echo.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_upgrade_headers_cannot_switch_the_module_off() {
    let echo = echo_server().await;
    let ngx = Nginx::start(1, "", &limited(&echo, ""));
    let cases = [
        "Upgrade: h2c\r\nUpgrade: websocket\r\n",
        "Upgrade: h2c, websocket\r\n",
        "Upgrade: WebSocket/13\r\n",
        "Upgrade: foo\r\n",
    ];
    for (i, lines) in cases.iter().enumerate() {
        let (head, ws) = raw_upgrade(ngx.port, "/", lines).await;
        let mut ws = ws.unwrap_or_else(|| panic!("{lines:?}: no 101: {head}"));
        ws.send(Message::Binary(vec![7; 100 * 1024])).await.unwrap();
        assert_eq!(
            close_of(&mut ws).await,
            (1009, "message too big".to_string()),
            "{lines:?}: the oversized frame was not refused"
        );
        let recs = ngx.wait_records("logs/ws.log", closes(i + 1)).await;
        let close = of_event(&recs, "close")[i];
        assert_eq!(close["end"], "too_big", "{lines:?}: {close}");
        assert_eq!(of_event(&recs, "open").len(), i + 1, "{lines:?}");
    }
    assert!(
        echo.seen.lock().unwrap().messages.is_empty(),
        "an oversized frame reached the upstream"
    );
    ngx.assert_no_crash();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upgrade_attempt_meets_the_origin_check() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        "",
        &limited(&echo, "ws_allow_origin https://good.example;"),
    );
    for lines in [
        "Upgrade: foo\r\nOrigin: https://evil.example\r\n",
        "Upgrade: h2c\r\nUpgrade: websocket\r\nOrigin: https://evil.example\r\n",
    ] {
        let (head, _) = raw_upgrade(ngx.port, "/", lines).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{lines:?}: {head}");
    }
    let (head, ws) = raw_upgrade(
        ngx.port,
        "/",
        "Upgrade: websocket\r\nOrigin: https://good.example\r\n",
    )
    .await;
    assert!(ws.is_some(), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_handshake_wants_websocket_alone() {
    let echo = echo_server().await;
    let ngx = Nginx::start(1, "", &limited(&echo, "ws_handshake strict;"));
    for lines in [
        "Upgrade: h2c\r\nUpgrade: websocket\r\n",
        "Upgrade: h2c, websocket\r\n",
        "Upgrade: foo\r\n",
    ] {
        let (head, _) = raw_upgrade(ngx.port, "/", lines).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{lines:?}: {head}");
    }
    let (head, ws) = raw_upgrade(ngx.port, "/", "Upgrade: websocket\r\n").await;
    assert!(ws.is_some(), "{head}");
    let err = ngx.read("logs/error.log");
    assert!(
        err.contains("\"Upgrade\" offers other protocols besides \"websocket\""),
        "{err}"
    );
}

/// An HTTP/2 request carrying `upgrade: websocket` (nginx itself passes it on, and would
/// "tunnel" an upstream's 101 over an HTTP/2 stream): strict mode refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_handshake_refuses_http2_upgrade_attempts() {
    let echo = echo_server().await;
    let port = free_port();
    let conf = main_conf(
        1,
        &format!(
            "server {{ listen 127.0.0.1:{port}; http2 on;\n{} }}",
            limited(&echo, "ws_handshake strict;")
        ),
    );
    let ngx = Nginx::start_conf(&conf, port);
    // HTTP/2 client libraries (the h2 crate among them) refuse to send connection-specific
    // headers (RFC 9113 8.2.2) but nginx accepts them: the request is built by hand, with
    // HPACK literals ("without indexing", no Huffman).
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "127.0.0.1"),
        ("upgrade", "websocket"),
        ("connection", "upgrade"),
        ("sec-websocket-key", KEY),
        ("sec-websocket-version", "13"),
    ] {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[])); // SETTINGS
    out.extend(frame(1, 0x5, 1, &block)); // HEADERS, END_STREAM | END_HEADERS
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(&out).await.unwrap();
    // The first HEADERS frame on stream 1: nginx sends `:status: 400` as HPACK index 12.
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    let status = loop {
        let mut i = 0;
        let mut found = None;
        while i + 9 <= got.len() {
            let len = u32::from_be_bytes([0, got[i], got[i + 1], got[i + 2]]) as usize;
            if i + 9 + len > got.len() {
                break;
            }
            let stream = u32::from_be_bytes([got[i + 5], got[i + 6], got[i + 7], got[i + 8]]);
            if got[i + 3] == 1 && stream == 1 {
                found = Some(got[i + 9]);
            }
            i += 9 + len;
        }
        if let Some(first) = found {
            break first;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b))
            .await
            .expect("HTTP/2 response")
            .unwrap();
        assert!(n > 0, "connection closed without a response: {got:?}");
        got.extend_from_slice(&b[..n]);
    };
    assert_eq!(status, 0x80 | 12, "not :status 400");
    let err = ngx.read("logs/error.log");
    assert!(err.contains("upgrade over HTTP/2 or HTTP/3"), "{err}");
    let recs = ngx.wait_records("logs/ws.log", |r| !r.is_empty()).await;
    assert_eq!(recs[0]["event"], "reject");
    assert_eq!(recs[0]["reason"], "handshake");
}

/// An upstream that answers the upgrade with 101 and then never sends a byte (nor closes).
async fn silent_upstream() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                          Connection: Upgrade\r\n\
                          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                    )
                    .await;
                while let Ok(n) = s.read(&mut b).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A tunnel the proxy ends itself (on idle, then after `ws_close_timeout`, as the upstream
/// never answers) in a location with `post_action`: the close record and `$ws_*` are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_action_does_not_hide_the_end() {
    let upstream = silent_upstream().await;
    let server = format!(
        "location / {{ ws_log logs/ws.log; ws_idle_timeout 300ms; ws_close_timeout 300ms;\n\
         access_log logs/access.log wsend; post_action @after;\n{} }}\n\
         location @after {{ return 204; }}",
        proxy_to(upstream)
    );
    let ngx = Nginx::start(
        1,
        "log_format wsend '$status $ws_end $ws_close_code';",
        &server,
    );
    let (head, ws) = raw_upgrade(ngx.port, "/", "Upgrade: websocket\r\n").await;
    let mut ws = ws.unwrap_or_else(|| panic!("{head}"));
    assert_eq!(close_of(&mut ws).await.0, 1001);
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    assert_eq!(of_event(&recs, "close")[0]["end"], "idle_timeout");
    let lines = ngx.wait_lines("logs/access.log", 1).await;
    assert_eq!(lines[0], "101 idle_timeout 1001", "{lines:?}");
    ngx.assert_no_crash();
}

/// With `proxy_pass` to an address held in a variable, the client cannot choose the
/// `upstream` label of the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_choose_metric_labels() {
    let echo = echo_server().await;
    let server = "location / { proxy_pass http://$arg_to; proxy_http_version 1.1;\n\
         proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade; }\n\
         location = /metrics { ws_status prometheus; }";
    let ngx = Nginx::start(1, "ws_status_zone ws 64k;", server);
    // The address is the client's to choose; the label must not be.
    for to in [echo.addr.to_string(), echo.addr.to_string()] {
        let mut ws = connect(&ngx.url(&format!("/?to={to}"))).await;
        ws.send(Message::Text("a".into())).await.unwrap();
        let _ = ws.next().await;
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (_, _, body) = crate::metrics::get(ngx.port, "/metrics").await;
        if body.contains("nginx_ws_tunnels_closed_total") && body.contains("} 2") {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        body.contains(r#"nginx_ws_tunnels_opened_total{route="",upstream="(variable)"} 2"#),
        "{body}"
    );
    assert!(!body.contains(&echo.addr.to_string()), "{body}");
}
