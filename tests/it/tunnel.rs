//! Tunnel observation through the real nginx: records, variables, byte-exact forwarding.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

const WS_FORMAT: &str = "log_format ws '$status $ws_client_frames $ws_upstream_frames \
$ws_client_messages $ws_upstream_messages $ws_client_bytes $ws_upstream_bytes \
$ws_close_code \"$ws_close_reason\" $ws_closed_by $ws_end $ws_duration $ws_subprotocol';";

fn logged_location(echo: &Echo, extra: &str) -> String {
    format!(
        "location / {{\n ws_log logs/ws.log;\n ws_log_events open frame message close;\n\
         access_log logs/access.log ws;\n {extra}\n{}\n}}",
        proxy_to(echo.addr)
    )
}

async fn next_data(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Message {
    loop {
        match ws.next().await.expect("stream ended").expect("ws error") {
            m @ (Message::Text(_) | Message::Binary(_)) => return m,
            _ => continue,
        }
    }
}

fn client_frames(recs: &[Value]) -> Vec<&Value> {
    of_event(recs, "frame")
        .into_iter()
        .filter(|r| r["from"] == "client")
        .collect()
}

fn upstream_frames(recs: &[Value]) -> Vec<&Value> {
    of_event(recs, "frame")
        .into_iter()
        .filter(|r| r["from"] == "upstream")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_kind_is_recorded() {
    let echo = echo_server().await;
    let ngx = Nginx::start(1, WS_FORMAT, &logged_location(&echo, "ws_log_payload 8;"));
    let mut ws = connect(&ngx.url("/chat?token=secret")).await;

    ws.send(Message::Text("hello world".into())).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::Text("hello world".into())
    );
    ws.send(Message::Binary(vec![0, 1, 2, 255])).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::Binary(vec![0, 1, 2, 255])
    );
    // A fragmented text message with a ping between its fragments.
    let first = Frame::message(b"frag".to_vec(), OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(first)).await.unwrap();
    ws.send(Message::Ping(b"p1".to_vec())).await.unwrap();
    let last = Frame::message(b"ment".to_vec(), OpCode::Data(Data::Continue), true);
    ws.send(Message::Frame(last)).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("fragment".into()));
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "client done".into(),
    }))
    .await
    .unwrap();
    while let Some(Ok(_)) = ws.next().await {}

    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    {
        let seen = echo.seen.lock().unwrap();
        assert_eq!(seen.paths, ["/chat"]);
        assert_eq!(seen.messages.len(), 3);
    }
    let open = of_event(&recs, "open");
    assert_eq!(open.len(), 1);
    let open = open[0];
    assert_eq!(open["uri"], "/chat", "no query string in uri");
    assert_eq!(open["host"], "127.0.0.1");
    assert!(open["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(open["upstream"], echo.addr.to_string());
    for k in ["route", "upstream_name", "subprotocol", "extensions"] {
        assert!(open[k].is_null(), "{k} should be null: {open}");
    }
    let rid = open["request_id"].as_str().unwrap();
    assert_eq!(rid.len(), 32);
    assert!(recs.iter().all(|r| r["request_id"] == rid));
    assert!(recs.iter().all(|r| r["conn"] == open["conn"]));
    let t = recs[0]["time"].as_str().unwrap();
    assert!(
        t.len() == 24 && t.ends_with('Z') && &t[10..11] == "T",
        "time {t}"
    );

    let cf = client_frames(&recs);
    let ops: Vec<&str> = cf.iter().map(|f| f["opcode"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        ["text", "binary", "text", "ping", "continuation", "close"]
    );
    assert!(cf.iter().all(|f| f["masked"] == true));
    assert_eq!(cf[0]["len"], 11);
    assert_eq!(cf[0]["payload"], "hello wo");
    assert_eq!(cf[0]["payload_truncated"], true);
    assert_eq!(cf[1]["payload"], "AAEC/w==");
    assert_eq!(cf[1]["payload_truncated"], false);
    assert_eq!(cf[2]["fin"], false);
    assert_eq!(cf[2]["payload"], "frag");
    assert!(cf[3]["payload"].is_null());
    assert_eq!(cf[4]["payload"], "ment");
    assert_eq!(cf[4]["fin"], true);
    assert_eq!(cf[5]["code"], 4000);
    assert_eq!(cf[5]["reason"], "client done");
    assert!(cf[0]["code"].is_null() && cf[0].get("rsv1").is_none());

    let uf = upstream_frames(&recs);
    let ops: Vec<&str> = uf.iter().map(|f| f["opcode"].as_str().unwrap()).collect();
    assert_eq!(ops, ["text", "binary", "pong", "text", "close"]);
    assert!(uf.iter().all(|f| f["masked"] == false));
    assert_eq!(uf[4]["code"], 4000);

    let msgs = of_event(&recs, "message");
    let client_msgs: Vec<&&Value> = msgs.iter().filter(|m| m["from"] == "client").collect();
    assert_eq!(client_msgs.len(), 3);
    assert_eq!(client_msgs[2]["type"], "text");
    assert_eq!(client_msgs[2]["len"], 8);
    assert_eq!(client_msgs[2]["frames"], 2);
    assert_eq!(client_msgs[2]["payload"], "fragment");
    assert_eq!(client_msgs[2]["payload_truncated"], false);
    assert_eq!(client_msgs[2]["compressed"], false);
    assert_eq!(client_msgs[1]["type"], "binary");

    let close = of_event(&recs, "close")[0];
    let client_bytes = 11 + 4 + 4 + 2 + 4 + (2 + 11);
    assert_eq!(
        close["client"],
        json!({"frames": 6, "messages": 3, "bytes": client_bytes,
               "close_code": 4000, "close_reason": "client done"})
    );
    assert_eq!(close["upstream"]["frames"], 5);
    assert_eq!(close["upstream"]["messages"], 3);
    assert_eq!(close["upstream"]["bytes"], 11 + 4 + 2 + 8 + 13);
    assert_eq!(close["closed_by"], "client");
    assert_eq!(close["end"], "normal");
    assert!(close["duration_ms"].as_u64().is_some());

    let line = ngx.wait_lines("logs/access.log", 1).await.remove(0);
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(
        &f[..8],
        [
            "101",
            "6",
            "5",
            "3",
            "3",
            &client_bytes.to_string(),
            "38",
            "4000"
        ]
    );
    assert_eq!(f[8..10].join(" "), "\"client done\"");
    assert_eq!(&f[10..12], ["client", "normal"]);
    let dur: f64 = f[12].parse().unwrap();
    assert!(f[12].contains('.') && f[12].split('.').nth(1).unwrap().len() == 3);
    assert!((0.0..10.0).contains(&dur));
    assert_eq!(f[13], "-", "no subprotocol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_pass_byte_identical() {
    let echo = echo_server().await;
    let ngx = Nginx::start(1, WS_FORMAT, &logged_location(&echo, "ws_log_payload 4;"));
    let mut ws = connect(&ngx.url("/big")).await;
    let sizes = [70 * 1024, 17 * 1024 * 1024 + 3];
    for (i, &n) in sizes.iter().enumerate() {
        let data: Vec<u8> = (0..n).map(|j| (j * 31 + i) as u8).collect();
        ws.send(Message::Binary(data.clone())).await.unwrap();
        match next_data(&mut ws).await {
            Message::Binary(got) => assert!(got == data, "echo of {n} bytes differs"),
            other => panic!("unexpected {other:?}"),
        }
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let cf = client_frames(&recs);
    assert_eq!(cf[0]["len"], sizes[0]);
    assert_eq!(cf[1]["len"], sizes[1]);
    // The first 4 bytes of the second message (j * 31 + 1), base64.
    assert_eq!(cf[1]["payload"], "ASA/Xg==");
    assert_eq!(cf[1]["payload_truncated"], true);
    let close = of_event(&recs, "close")[0];
    let total = (sizes[0] + sizes[1]) as u64;
    assert_eq!(close["client"]["bytes"], total);
    assert_eq!(close["upstream"]["bytes"], total);
    assert_eq!(close["end"], "normal");
}

/// A masked client frame.
fn masked(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 65535 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// An unmasked server frame.
fn unmasked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let n = payload.len();
    if n < 126 {
        out.push(n as u8);
    } else {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

const HANDSHAKE: &str = "GET /raw HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let n = s.read(&mut b).await.unwrap();
        assert!(
            n > 0,
            "eof before head end: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&b[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(p + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
    }
}

async fn read_exact_more(s: &mut TcpStream, have: &mut Vec<u8>, n: usize) {
    let mut b = [0u8; 4096];
    while have.len() < n {
        let k = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("read timed out")
            .unwrap();
        assert!(k > 0, "eof after {} of {n} bytes", have.len());
        have.extend_from_slice(&b[..k]);
    }
}

async fn write_bytewise(s: &mut TcpStream, data: &[u8]) {
    for b in data {
        s.write_all(&[*b]).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A raw upstream: answers the handshake with 101 plus the first frame in the same write, then
/// writes `frames` one byte at a time; collects what the client sent.
async fn raw_upstream(frames: Vec<u8>) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let (head, mut rest) = read_head(&mut s).await;
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap()
            .trim()
            .to_string();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        // The first 3 bytes of the frames travel with the 101 (nginx's u->buffer path).
        out.extend_from_slice(&frames[..3]);
        s.write_all(&out).await.unwrap();
        write_bytewise(&mut s, &frames[3..]).await;
        // Read until the client's close frame arrives (6 bytes header+mask, 2 code).
        let mut b = [0u8; 1024];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&b[..n]);
        }
        rest
    });
    (addr, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_at_a_time_on_both_sides_with_pipelined_data() {
    // Upstream side: text "server says hi", a 300-byte binary, then Close 1000.
    let mut up = unmasked(0x1, true, b"server says hi");
    up.extend(unmasked(0x2, true, &[9u8; 300]));
    up.extend(unmasked(0x8, true, &[0x03, 0xe8]));
    let (addr, upstream) = raw_upstream(up.clone()).await;
    let loc = format!(
        "location / {{ ws_log logs/ws.log; ws_log_events open frame message close;\n\
         ws_log_payload 64;\n{} }}",
        proxy_to(addr)
    );
    let ngx = Nginx::start(1, "", &loc);

    let mut c = TcpStream::connect(("127.0.0.1", ngx.port)).await.unwrap();
    c.set_nodelay(true).unwrap();
    // The handshake and the first client frame in one write: nginx's r->header_in path.
    let f1 = masked(0x1, true, b"pipelined", [1, 2, 3, 4]);
    let mut first = HANDSHAKE.as_bytes().to_vec();
    first.extend_from_slice(&f1);
    c.write_all(&first).await.unwrap();
    // Then a fragmented message and a close, one byte at a time.
    let mut rest = masked(0x2, false, &[7u8; 200], [9, 9, 9, 9]);
    rest.extend(masked(0x9, true, b"pi", [5, 6, 7, 8]));
    rest.extend(masked(0x0, true, &[8u8; 130], [0xa, 0xb, 0xc, 0xd]));
    write_bytewise(&mut c, &rest).await;

    let (head, mut got) = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    read_exact_more(&mut c, &mut got, up.len()).await;
    assert_eq!(got, up, "client received exactly what the upstream sent");
    let close = masked(0x8, true, &[0x03, 0xe8], [1, 1, 1, 1]);
    c.write_all(&close).await.unwrap();
    let received = upstream.await.unwrap();
    let mut sent = f1.clone();
    sent.extend_from_slice(&rest);
    sent.extend_from_slice(&close);
    assert_eq!(
        received, sent,
        "upstream received exactly what the client sent"
    );
    drop(c);

    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let cf = client_frames(&recs);
    let ops: Vec<&str> = cf.iter().map(|f| f["opcode"].as_str().unwrap()).collect();
    assert_eq!(ops, ["text", "binary", "ping", "continuation", "close"]);
    assert_eq!(cf[0]["payload"], "pipelined");
    assert_eq!(cf[1]["len"], 200);
    assert_eq!(cf[3]["len"], 130);
    let uf = upstream_frames(&recs);
    let ops: Vec<&str> = uf.iter().map(|f| f["opcode"].as_str().unwrap()).collect();
    assert_eq!(ops, ["text", "binary", "close"]);
    assert_eq!(uf[0]["payload"], "server says hi");
    assert_eq!(uf[2]["code"], 1000);
    let msgs = of_event(&recs, "message");
    let fragmented = msgs
        .iter()
        .find(|m| m["from"] == "client" && m["type"] == "binary")
        .unwrap();
    assert_eq!(fragmented["len"], 330);
    assert_eq!(fragmented["frames"], 2);
    let close = of_event(&recs, "close")[0];
    assert_eq!(close["client"]["frames"], 5);
    assert_eq!(close["client"]["bytes"], 9 + 200 + 2 + 130 + 2);
    assert_eq!(close["upstream"]["close_code"], 1000);
    assert_eq!(close["closed_by"], "upstream");
    assert_eq!(close["end"], "normal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_tunnels_are_counted_exactly() {
    let echo = echo_server().await;
    let ngx = Nginx::start(2, WS_FORMAT, &logged_location(&echo, ""));
    let tunnels = 100;
    let per = 10;
    let mut tasks = Vec::new();
    for i in 0..tunnels {
        let url = ngx.url(&format!("/c{i}"));
        tasks.push(tokio::spawn(async move {
            let mut ws = connect(&url).await;
            for j in 0..per {
                let m = format!("tunnel {i} message {j}");
                ws.send(Message::Text(m.clone())).await.unwrap();
                assert_eq!(next_data(&mut ws).await, Message::Text(m));
            }
            ws.close(None).await.unwrap();
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let recs = ngx.wait_records("logs/ws.log", closes(tunnels)).await;
    let cl = of_event(&recs, "close");
    assert_eq!(cl.len(), tunnels);
    assert_eq!(of_event(&recs, "open").len(), tunnels);
    for c in &cl {
        assert_eq!(c["client"]["messages"], per);
        assert_eq!(c["upstream"]["messages"], per);
        assert_eq!(c["end"], "normal");
    }
    let msgs = of_event(&recs, "message");
    assert_eq!(msgs.len(), 2 * tunnels * per);
    let mut conns: Vec<u64> = cl.iter().map(|c| c["conn"].as_u64().unwrap()).collect();
    conns.sort_unstable();
    conns.dedup();
    assert!(conns.len() > 1);
}

async fn single_exchange(path: &str, ngx: &Nginx) {
    let mut ws = connect(&ngx.url(path)).await;
    ws.send(Message::Text("x".into())).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_causes() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        WS_FORMAT,
        &logged_location(&echo, "proxy_read_timeout 1s;"),
    );

    // Upstream starts the closing handshake.
    single_exchange("/close", &ngx).await;
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let c = of_event(&recs, "close")[0];
    assert_eq!(
        (c["end"].as_str(), c["closed_by"].as_str()),
        (Some("normal"), Some("upstream"))
    );
    assert_eq!(c["upstream"]["close_code"], 4002);
    assert_eq!(c["upstream"]["close_reason"], "server bye");

    // Upstream drops TCP.
    single_exchange("/abort", &ngx).await;
    let recs = ngx.wait_records("logs/ws.log", closes(2)).await;
    let c = of_event(&recs, "close")[1];
    assert_eq!(c["end"], "upstream_abort");
    assert_eq!(c["closed_by"], "upstream");
    assert!(c["upstream"]["close_code"].is_null());

    // Client drops TCP.
    let mut ws = connect(&ngx.url("/echo")).await;
    ws.send(Message::Text("x".into())).await.unwrap();
    next_data(&mut ws).await;
    drop(ws);
    let recs = ngx.wait_records("logs/ws.log", closes(3)).await;
    let c = of_event(&recs, "close")[2];
    assert_eq!(c["end"], "client_abort");
    assert_eq!(c["closed_by"], "client");

    // Nothing passes for proxy_read_timeout.
    let mut ws = connect(&ngx.url("/silent")).await;
    ws.send(Message::Text("x".into())).await.unwrap();
    let started = std::time::Instant::now();
    while let Some(Ok(_)) = ws.next().await {}
    assert!(started.elapsed() >= Duration::from_millis(900));
    let recs = ngx.wait_records("logs/ws.log", closes(4)).await;
    let c = of_event(&recs, "close")[3];
    assert_eq!(c["end"], "upstream_timeout");
    assert_eq!(c["closed_by"], "proxy");

    let lines = ngx.wait_lines("logs/access.log", 4).await;
    assert!(
        lines[0].contains(" 4002 \"server bye\" upstream normal "),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains(" - \"-\" upstream upstream_abort "),
        "{}",
        lines[1]
    );
    assert!(lines[2].contains(" client client_abort "), "{}", lines[2]);
    assert!(
        lines[3].contains(" proxy upstream_timeout "),
        "{}",
        lines[3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untracked_requests_pass_untouched() {
    let echo = echo_server().await;
    // A raw upstream that answers any Upgrade with 101 and echoes bytes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (_head, rest) = read_head(&mut s).await;
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n")
                    .await
                    .unwrap();
                s.write_all(&rest).await.unwrap();
                let mut b = [0u8; 1024];
                while let Ok(n) = s.read(&mut b).await {
                    if n == 0 || s.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let server = format!(
        "location /plain {{ access_log logs/access.log ws; {} }}\n\
         location /foo {{ ws_log logs/ws.log; access_log logs/access.log ws; {} }}\n\
         location /ws {{ ws_log logs/ws.log; access_log logs/access.log ws; {} }}",
        proxy_to(echo.addr),
        proxy_to(raw),
        proxy_to(echo.addr)
    );
    let ngx = Nginx::start(1, WS_FORMAT, &server);

    // No ws_* directive: a WebSocket tunnel, but not tracked.
    let mut ws = connect(&ngx.url("/plain")).await;
    ws.send(Message::Text("a".into())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("a".into()));
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}

    // Another upgrade protocol: 101 but not WebSocket.
    let mut c = TcpStream::connect(("127.0.0.1", ngx.port)).await.unwrap();
    c.write_all(b"GET /foo HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\nabc")
        .await
        .unwrap();
    let (head, mut got) = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 101"));
    read_exact_more(&mut c, &mut got, 3).await;
    assert_eq!(got, b"abc");
    drop(c);

    // Not a 101: a plain GET to the WebSocket server is refused by it.
    let mut c = TcpStream::connect(("127.0.0.1", ngx.port)).await.unwrap();
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_head(&mut c).await;
    assert!(!head.starts_with("HTTP/1.1 101"), "{head}");
    drop(c);

    let lines = ngx.wait_lines("logs/access.log", 3).await;
    for l in &lines {
        assert!(l.ends_with("- - - - - - - \"-\" - - - -"), "untracked: {l}");
    }
    assert!(
        ngx.read("logs/ws.log").is_empty(),
        "{}",
        ngx.read("logs/ws.log")
    );
}

/// Tunnels with only close records and variables are passive (the proxy never writes, sends
/// are counted rather than shaped): they report what a tunnel with frame and message records
/// reports for the same exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counted_tunnels_report_what_observed_ones_do() {
    let echo = echo_server().await;
    let p = proxy_to(echo.addr);
    let locs = format!(
        "location /observed/ {{ ws_log logs/observed.log; ws_log_events frame message close;\n\
         access_log logs/observed.access ws; {p} }}\n\
         location /counted/ {{ ws_log logs/counted.log; ws_log_events close;\n\
         access_log logs/counted.access ws; {p} }}"
    );
    let ngx = Nginx::start(1, WS_FORMAT, &locs);
    for path in ["/observed/x", "/counted/x"] {
        let mut ws = connect(&ngx.url(path)).await;
        for m in [
            Message::Text("hello".into()),
            Message::Binary(vec![7; 70_000]),
            Message::Text("é".repeat(40_000)),
            Message::Binary(vec![]),
        ] {
            ws.send(m.clone()).await.unwrap();
            assert_eq!(next_data(&mut ws).await, m);
        }
        ws.send(Message::Ping(b"p".to_vec())).await.unwrap();
        ws.send(Message::Text("last".into())).await.unwrap();
        next_data(&mut ws).await;
        ws.close(Some(CloseFrame {
            code: CloseCode::Library(4001),
            reason: "bye now".into(),
        }))
        .await
        .unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    let observed = ngx.wait_records("logs/observed.log", closes(1)).await;
    let counted = ngx.wait_records("logs/counted.log", closes(1)).await;
    assert_eq!(counted.len(), 1, "only the close record");
    let (o, c) = (of_event(&observed, "close")[0], &counted[0]);
    for key in ["client", "upstream", "closed_by", "end"] {
        assert_eq!(c[key], o[key], "{key}");
    }
    assert_eq!(c["client"]["frames"], client_frames(&observed).len());
    assert_eq!(c["client"]["messages"], 5);
    assert_eq!(c["client"]["close_code"], 4001);
    assert_eq!(c["client"]["close_reason"], "bye now");
    // The variables too (the duration aside).
    let strip = |l: &str| l.rsplitn(3, ' ').nth(2).unwrap_or_default().to_string();
    let o = ngx.wait_lines("logs/observed.access", 1).await;
    let c = ngx.wait_lines("logs/counted.access", 1).await;
    assert_eq!(strip(&c[0]), strip(&o[0]));
    assert!(c[0].starts_with("101 7 "), "{}", c[0]);
}

/// With close records only, `$request_id` is read when the close record is written, not when
/// the tunnel opens (so that nginx's copy of it does not sit in the request pool for the
/// tunnel's whole life): the record must still carry the request's own id, the one the access
/// log writes, and each tunnel its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_records_carry_the_request_id_read_at_the_end() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        "log_format rid '$request_id $ws_end';",
        &format!(
            "location / {{\n ws_log logs/ws.log;\n ws_log_events close;\n\
             access_log logs/access.log rid;\n{}\n}}",
            proxy_to(echo.addr)
        ),
    );
    for _ in 0..3 {
        // The echo server closes /close after the first message.
        single_exchange("/close", &ngx).await;
    }
    let recs = ngx.wait_records("logs/ws.log", closes(3)).await;
    let lines = ngx.wait_lines("logs/access.log", 3).await;
    let mut from_log: Vec<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
    let mut from_records: Vec<&str> = of_event(&recs, "close")
        .iter()
        .map(|c| c["request_id"].as_str().expect("request_id"))
        .collect();
    from_log.sort_unstable();
    from_records.sort_unstable();
    assert_eq!(from_records, from_log);
    from_log.dedup();
    assert_eq!(from_log.len(), 3, "{lines:?}");
    assert!(from_records
        .iter()
        .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())));
}
