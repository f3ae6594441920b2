//! `ws_route`, `ws_allow_origin`, `ws_handshake` through the real nginx: upstream pools that
//! say who they are, raw sockets for malformed handshakes and lying upstreams, reject records,
//! the route variables, and `nginx -t` errors.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::harness::*;

/// An upstream that says its name: a WebSocket peer answers the text `whoami` with it (and
/// echoes anything else, selecting the first subprotocol the client offers); a plain HTTP
/// request gets it as a 200 body.
async fn named_server(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_named(tcp, name));
        }
    });
    addr
}

/// Peeks at the request head without consuming it.
async fn peek_head(tcp: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 8192];
    for _ in 0..400 {
        let n = tcp.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(String::from_utf8_lossy(&buf[..end + 4]).into_owned());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

async fn serve_named(mut tcp: TcpStream, name: &'static str) {
    let Some(head) = peek_head(&tcp).await else {
        return;
    };
    if !head.to_ascii_lowercase().contains("upgrade: websocket") {
        let mut sink = vec![0u8; head.len()];
        let _ = tcp.read_exact(&mut sink).await;
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
            name.len()
        );
        let _ = tcp.write_all(resp.as_bytes()).await;
        return;
    }
    #[allow(clippy::result_large_err)]
    let cb = |req: &Request, mut resp: Response| {
        if let Some(p) = req.headers().get("sec-websocket-protocol") {
            let first = p
                .to_str()
                .unwrap_or("")
                .split(',')
                .next()
                .unwrap_or("")
                .trim();
            if !first.is_empty() {
                resp.headers_mut().insert(
                    "sec-websocket-protocol",
                    HeaderValue::from_str(first).expect("token"),
                );
            }
        }
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(t) if t == "whoami" => Message::Text(name.to_string()),
            m @ (Message::Text(_) | Message::Binary(_)) => m,
            Message::Close(_) => {
                let _ = ws.flush().await;
                return;
            }
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

/// Extra request headers.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// Three named pools and a log format showing the route variables.
async fn pools() -> String {
    let (a, b, c) = (
        named_server("alpha").await,
        named_server("beta").await,
        named_server("gamma").await,
    );
    format!(
        "upstream alpha {{ server {a}; }}\nupstream beta {{ server {b}; }}\n\
         upstream gamma {{ server {c}; }}\n\
         log_format route '$status|$ws_route|$ws_upstream|$uri';"
    )
}

const ROUTED_PROXY: &str = "proxy_pass http://$ws_upstream;\nproxy_http_version 1.1;\n\
    proxy_set_header Upgrade $http_upgrade;\nproxy_set_header Connection \"upgrade\";\n";

const LOGGING: &str = "ws_log logs/ws.log;\nws_log_events open close reject;\n\
    access_log logs/access.log route;\n";

/// Opens a WebSocket with extra request headers; the HTTP status of a refusal is an `Err`.
async fn open(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
        Option<String>,
    ),
    u16,
> {
    let mut req = url.into_client_request().expect("request");
    for (k, v) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
            .expect("header name");
        req.headers_mut()
            .insert(name, HeaderValue::from_str(v).expect("header value"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            let proto = resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap_or("").to_string());
            Ok((ws, proto))
        }
        Err(WsError::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect {url}: {e}"),
    }
}

/// Which pool served a WebSocket opened with these headers.
async fn whoami(url: &str, headers: &[(&str, &str)]) -> Result<String, u16> {
    let (mut ws, _) = open(url, headers).await?;
    ws.send(Message::Text("whoami".into())).await.expect("send");
    let name = loop {
        match ws.next().await.expect("reply").expect("ws") {
            Message::Text(t) => break t,
            _ => continue,
        }
    };
    let _ = ws.close(None).await;
    Ok(name)
}

/// Sends a raw request head and returns the status and the response head.
async fn raw(port: u16, request: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head)
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A well-formed upgrade request, with `extra` header lines.
fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
         {extra}\r\n"
    )
}

fn rejects(recs: &[Value]) -> Vec<(String, u64, String)> {
    of_event(recs, "reject")
        .iter()
        .map(|r| {
            assert!(r["time"].is_string() && r["conn"].is_u64(), "{r}");
            assert!(r["request_id"].is_string(), "{r}");
            (
                r["uri"].as_str().unwrap_or("").to_string(),
                r["status"].as_u64().unwrap_or(0),
                r["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_form_picks_its_pool() {
    let http = pools().await;
    let ngx = Nginx::start(
        1,
        &http,
        &format!(
            "location / {{\n{LOGGING}\
             ws_route =/exact gamma;\n\
             ws_route /chat/ alpha protocol=v2.chat,v3.chat;\n\
             ws_route ~^/chat/ beta;\n\
             ws_route ~* ^/LOUD/ gamma;\n\
             ws_route /prefix/ alpha;\n\
             ws_route default beta;\n{ROUTED_PROXY}}}"
        ),
    );
    let cases: &[(&str, Headers, &str)] = &[
        ("/exact", &[], "gamma"),
        ("/exact/more", &[], "beta"),
        (
            "/chat/1",
            &[("Sec-WebSocket-Protocol", "v1, v3.chat")],
            "alpha",
        ),
        ("/chat/1", &[], "beta"),
        // Subprotocol names are case-sensitive.
        ("/chat/1", &[("Sec-WebSocket-Protocol", "V2.CHAT")], "beta"),
        ("/loud/x", &[], "gamma"),
        ("/prefix/z", &[], "alpha"),
        ("/elsewhere", &[], "beta"),
    ];
    for (path, headers, pool) in cases {
        let got = whoami(&ngx.url(path), headers).await;
        assert_eq!(got.as_deref(), Ok(*pool), "{path} {headers:?}");
    }

    let recs = ngx
        .wait_records("logs/ws.log", |r| of_event(r, "open").len() >= cases.len())
        .await;
    let opens: Vec<(String, String, String)> = of_event(&recs, "open")
        .iter()
        .map(|r| {
            (
                r["uri"].as_str().unwrap().to_string(),
                r["route"].as_str().unwrap().to_string(),
                r["upstream_name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = [
        ("/exact", "=/exact", "gamma"),
        ("/exact/more", "default", "beta"),
        ("/chat/1", "/chat/ protocol=v2.chat,v3.chat", "alpha"),
        ("/chat/1", "~^/chat/", "beta"),
        ("/chat/1", "~^/chat/", "beta"),
        ("/loud/x", "~*^/LOUD/", "gamma"),
        ("/prefix/z", "/prefix/", "alpha"),
        ("/elsewhere", "default", "beta"),
    ];
    for (uri, route, up) in expect {
        assert!(
            opens
                .iter()
                .any(|o| o == &(uri.to_string(), route.to_string(), up.to_string())),
            "no open record {uri} {route} {up} in {opens:#?}"
        );
    }
    let lines = ngx.wait_lines("logs/access.log", cases.len()).await;
    assert!(
        lines.contains(&"101|=/exact|gamma|/exact".to_string()),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"101|/chat/ protocol=v2.chat,v3.chat|alpha|/chat/1".to_string()),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"101|~*^/LOUD/|gamma|/loud/x".to_string()),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subprotocol_routing_selects_pool_and_keeps_protocol() {
    let http = pools().await;
    let ngx = Nginx::start(
        1,
        &http,
        &format!(
            "location /ws {{\n\
             ws_route /ws alpha protocol=mqtt;\n\
             ws_route /ws gamma protocol=graphql-ws,graphql-transport-ws;\n\
             ws_route default beta;\n{ROUTED_PROXY}}}"
        ),
    );
    let url = ngx.url("/ws");
    assert_eq!(
        whoami(&url, &[("Sec-WebSocket-Protocol", "mqtt")]).await,
        Ok("alpha".into())
    );
    assert_eq!(
        whoami(&url, &[("Sec-WebSocket-Protocol", "graphql-transport-ws")]).await,
        Ok("gamma".into())
    );
    assert_eq!(
        whoami(&url, &[("Sec-WebSocket-Protocol", "soap")]).await,
        Ok("beta".into())
    );
    // The protocol the pool selected reaches the client.
    let (_ws, proto) = open(&url, &[("Sec-WebSocket-Protocol", "graphql-ws")])
        .await
        .expect("open");
    assert_eq!(proto.as_deref(), Some("graphql-ws"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_match_is_404_and_plain_http_is_426() {
    let http = pools().await;
    let ngx = Nginx::start(
        1,
        &http,
        &format!(
            "ws_route default gamma;\n\
             location /only {{\n{LOGGING}ws_route /only/a alpha;\n{ROUTED_PROXY}}}\n\
             location /inherit {{\n{LOGGING}{ROUTED_PROXY}}}\n\
             location /plain {{\n{LOGGING}ws_route /plain/ws alpha;\nws_route default beta;\n\
             {ROUTED_PROXY}}}"
        ),
    );
    assert_eq!(whoami(&ngx.url("/only/a"), &[]).await, Ok("alpha".into()));
    assert_eq!(whoami(&ngx.url("/only/b"), &[]).await, Err(404));
    // The location's own rules replace the server's: no default here.
    let (status, head) = raw(
        ngx.port,
        "GET /only/a HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 426, "{head}");
    assert!(
        head.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nUpgrade: websocket\r\n"), "{head}");

    // The server's default applies where a location has no ws_route.
    assert_eq!(whoami(&ngx.url("/inherit"), &[]).await, Ok("gamma".into()));

    // A plain HTTP request goes to the default pool.
    let (status, _) = raw(
        ngx.port,
        "GET /plain/ws HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    let mut tcp = TcpStream::connect(("127.0.0.1", ngx.port)).await.unwrap();
    tcp.write_all(b"GET /plain/page HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.unwrap();
    assert!(body.ends_with("\r\n\r\nbeta"), "{body}");

    let recs = ngx
        .wait_records("logs/ws.log", |r| of_event(r, "reject").len() >= 2)
        .await;
    let rj = rejects(&recs);
    assert!(
        rj.contains(&("/only/b".into(), 404, "no_route".into())),
        "{rj:?}"
    );
    assert!(
        rj.contains(&("/only/a".into(), 426, "not_upgrade".into())),
        "{rj:?}"
    );
    let lines = ngx.wait_lines("logs/access.log", 6).await;
    assert!(lines.contains(&"404|-|-|/only/b".to_string()), "{lines:#?}");
    assert!(
        lines.contains(&"200|default|beta|/plain/page".to_string()),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"101|default|gamma|/inherit".to_string()),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_forms() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        "",
        &format!(
            "ws_log logs/ws.log;\nws_log_events reject;\n\
             location / {{\nws_allow_origin https://app.example.com https://*.example.com \
             http://localhost:3000 \"~^https://dev-[0-9]+\\.example\\.net$\";\n{}}}\n\
             location /any {{\nws_allow_origin * missing=deny;\n{}}}\n\
             location /ci {{\nws_allow_origin ~*^https://CI\\.;\n{}}}",
            proxy_to(echo.addr),
            proxy_to(echo.addr),
            proxy_to(echo.addr)
        ),
    );
    let url = ngx.url("/");
    let status = |r: Result<_, u16>| r.map(|_| 101).unwrap_or_else(|s| s);
    for (origin, expect) in [
        ("https://app.example.com", 101),
        ("HTTPS://App.Example.COM", 101),
        ("https://app.example.com:443", 101),
        ("https://chat.example.com", 101),
        ("https://a.b.example.com", 101),
        ("http://localhost:3000", 101),
        ("https://dev-12.example.net", 101),
        ("https://example.com", 403),
        ("https://evil-example.com", 403),
        ("https://example.com.evil.com", 403),
        ("https://app.example.com.evil.com", 403),
        ("http://app.example.com", 403),
        ("https://app.example.com:8443", 403),
        ("http://localhost", 403),
        ("https://dev-x.example.net", 403),
        ("null", 403),
    ] {
        let got = status(open(&url, &[("Origin", origin)]).await);
        assert_eq!(got, expect, "Origin {origin}");
    }
    // No Origin (not a browser): allowed unless missing=deny.
    assert_eq!(status(open(&url, &[]).await), 101);
    let any = ngx.url("/any");
    assert_eq!(status(open(&any, &[]).await), 403);
    assert_eq!(
        status(open(&any, &[("Origin", "https://whatever.test")]).await),
        101
    );
    let ci = ngx.url("/ci");
    assert_eq!(
        status(open(&ci, &[("Origin", "https://ci.example.org")]).await),
        101
    );
    // Only upgrade requests are checked.
    let (s, _) = raw(
        ngx.port,
        "GET / HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_ne!(s, 403);

    let recs = ngx
        .wait_records("logs/ws.log", |r| of_event(r, "reject").len() >= 10)
        .await;
    let rj = rejects(&recs);
    assert_eq!(rj.len(), 10, "{rj:?}");
    assert!(rj.iter().all(|r| r.1 == 403 && r.2 == "origin"), "{rj:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_handshake_rejects_malformed_requests() {
    let echo = echo_server().await;
    let ngx = Nginx::start(
        1,
        "",
        &format!(
            "ws_log logs/ws.log;\nws_log_events reject;\nws_handshake strict;\n\
             location / {{\n{}}}",
            proxy_to(echo.addr)
        ),
    );
    let p = ngx.port;
    let base = |method: &str, version: &str, lines: &str| {
        format!("{method} /x {version}\r\nHost: localhost\r\nUpgrade: websocket\r\n{lines}\r\n")
    };
    let good =
        format!("Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n");
    let cases = [
        (
            base("POST", "HTTP/1.1", &format!("{good}Content-Length: 0\r\n")),
            400,
        ),
        (base("GET", "HTTP/1.0", &good), 400),
        (
            base(
                "GET",
                "HTTP/1.1",
                &format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"),
            ),
            400,
        ),
        (
            base(
                "GET",
                "HTTP/1.1",
                &format!(
                    "Connection: keep-alive, upgraded\r\nSec-WebSocket-Key: {KEY}\r\n\
                     Sec-WebSocket-Version: 13\r\n"
                ),
            ),
            400,
        ),
        (
            base(
                "GET",
                "HTTP/1.1",
                // base64 of 10 bytes
                "Connection: Upgrade\r\nSec-WebSocket-Key: AAAAAAAAAAAAAA==\r\n\
                 Sec-WebSocket-Version: 13\r\n",
            ),
            400,
        ),
        (
            base(
                "GET",
                "HTTP/1.1",
                "Connection: Upgrade\r\nSec-WebSocket-Key: not-base64-at-all-here!!\r\n\
                 Sec-WebSocket-Version: 13\r\n",
            ),
            400,
        ),
        (
            base(
                "GET",
                "HTTP/1.1",
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
            ),
            400,
        ),
    ];
    for (req, expect) in &cases {
        let (status, head) = raw(p, req).await;
        assert_eq!(status, *expect, "{req:?} -> {head}");
    }
    let (status, head) = raw(
        p,
        &base(
            "GET",
            "HTTP/1.1",
            &format!(
                "Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 8\r\n"
            ),
        ),
    )
    .await;
    assert_eq!(status, 426, "{head}");
    assert!(head.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{head}");
    // A well-formed one (keep-alive, Upgrade in any case) passes.
    let (status, head) = raw(
        p,
        &base(
            "GET",
            "HTTP/1.1",
            &format!("Connection: keep-alive, UPGRADE\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"),
        ),
    )
    .await;
    assert_eq!(status, 101, "{head}");
    let mut ws = connect(&ngx.url("/ok")).await;
    ws.send(Message::Text("hi".into())).await.unwrap();

    let recs = ngx
        .wait_records("logs/ws.log", |r| of_event(r, "reject").len() > cases.len())
        .await;
    let rj = rejects(&recs);
    assert_eq!(rj.len(), cases.len() + 1, "{rj:?}");
    assert!(
        rj.iter().all(|r| r.2 == "handshake" && r.0 == "/x"),
        "{rj:?}"
    );
    assert_eq!(rj.iter().filter(|r| r.1 == 426).count(), 1, "{rj:?}");
}

/// An upstream that answers every upgrade with a 101 made to order by path: `/wrong-accept`,
/// `/proto` (selects `evil`), `/ext` (selects `x-evil`), anything else correct (echoing the
/// offered protocol's first token and `permessage-deflate` if offered).
async fn lying_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = peek_head(&tcp).await else {
                    return;
                };
                let mut sink = vec![0u8; head.len()];
                let _ = tcp.read_exact(&mut sink).await;
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let header = |name: &str| {
                    head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case(name)
                            .then(|| v.trim().to_string())
                    })
                };
                let key = header("sec-websocket-key").unwrap_or_default();
                let mut accept = derive_accept_key(key.as_bytes());
                let mut extra = String::new();
                match path.as_str() {
                    "/wrong-accept" | "/loose/wrong-accept" => {
                        accept = derive_accept_key(b"some other key")
                    }
                    "/proto" => extra.push_str("Sec-WebSocket-Protocol: evil\r\n"),
                    "/ext" => extra.push_str("Sec-WebSocket-Extensions: x-evil\r\n"),
                    _ => {
                        if let Some(p) = header("sec-websocket-protocol") {
                            let first = p.split(',').next().unwrap_or("").trim().to_string();
                            extra.push_str(&format!("Sec-WebSocket-Protocol: {first}\r\n"));
                        }
                        if header("sec-websocket-extensions")
                            .is_some_and(|e| e.contains("permessage-deflate"))
                        {
                            extra.push_str("Sec-WebSocket-Extensions: permessage-deflate\r\n");
                        }
                    }
                }
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_upstream_becomes_502() {
    let up = lying_upstream().await;
    let ngx = Nginx::start(
        1,
        "log_format st '$status $request_uri';",
        &format!(
            "ws_log logs/ws.log;\nws_log_events open reject;\naccess_log logs/access.log st;\n\
             location / {{\nws_handshake strict;\n{}}}\n\
             location /loose/ {{\n{}}}",
            proxy_to(up),
            proxy_to(up)
        ),
    );
    let offer = "Sec-WebSocket-Protocol: chat, superchat\r\n\
                 Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    for path in ["/wrong-accept", "/proto", "/ext"] {
        let (status, head) = raw(ngx.port, &upgrade_request(path, offer)).await;
        assert_eq!(status, 502, "{path}: {head}");
        let lower = head.to_ascii_lowercase();
        assert!(!lower.contains("sec-websocket-accept"), "{head}");
        assert!(!lower.contains("upgrade: websocket"), "{head}");
        // nginx's own 502 page, not the upstream's headers.
        assert!(lower.contains("content-type: text/html"), "{head}");
    }
    // A subprotocol or extension the client did not offer at all.
    let (status, _) = raw(ngx.port, &upgrade_request("/proto", "")).await;
    assert_eq!(status, 502);
    // The honest answer passes, with what the client offered.
    let (status, head) = raw(ngx.port, &upgrade_request("/good", offer)).await;
    assert_eq!(status, 101, "{head}");
    assert!(head.contains("Sec-WebSocket-Protocol: chat\r\n"), "{head}");
    // Without strict, nginx passes the lie on.
    let (status, head) = raw(ngx.port, &upgrade_request("/loose/wrong-accept", "")).await;
    assert_eq!(status, 101, "{head}");

    let recs = ngx
        .wait_records("logs/ws.log", |r| of_event(r, "reject").len() >= 4)
        .await;
    let rj = rejects(&recs);
    assert_eq!(rj.len(), 4, "{rj:?}");
    assert!(
        rj.iter().all(|r| r.1 == 502 && r.2 == "handshake"),
        "{rj:?}"
    );
    // Only the tunnels that really opened have open records.
    let opens = of_event(&recs, "open");
    assert_eq!(opens.len(), 2, "{opens:#?}");
    let lines = ngx.wait_lines("logs/access.log", 6).await;
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("502 ")).count(),
        4,
        "{lines:#?}"
    );
    let log = ngx.read("logs/error.log");
    assert!(
        log.contains(
            "ws: upstream sent an invalid WebSocket handshake: wrong \"Sec-WebSocket-Accept\""
        ),
        "{log}"
    );
    assert!(!log.contains("[alert]"), "{log}");
    ngx.assert_no_crash();
}

#[test]
fn configuration_errors() {
    let port = free_port();
    let fails = |body: &str, expect: &str| {
        let (ok, out) = nginx_t(&main_conf(1, body));
        assert!(!ok, "nginx -t accepted {body:?}:\n{out}");
        assert!(out.contains(expect), "expected {expect:?} in:\n{out}");
    };
    let server = |loc: &str| {
        format!(
            "upstream chat {{ server 127.0.0.1:1; }}\n\
             server {{ listen 127.0.0.1:{port};\nlocation / {{\n{loc}\n}}\n}}"
        )
    };
    fails(
        &server("ws_route /a nochat;"),
        "ws_route: no upstream \"nochat\" defined in ",
    );
    fails(
        &server("ws_route default nochat;"),
        "ws_route: no upstream \"nochat\" defined",
    );
    // An implicit upstream made by proxy_pass is not an upstream{} block.
    fails(
        &server("ws_route default localhost; proxy_pass http://localhost:80;"),
        "ws_route: no upstream \"localhost\" defined",
    );
    fails(
        &server("ws_route ~^/(chat chat;"),
        "\"ws_route\": pcre2_compile() failed: missing closing parenthesis in \"^/(chat\"",
    );
    fails(
        &server("ws_route /a chat proto=x;"),
        "invalid parameter \"proto=x\" in \"ws_route\" directive",
    );
    fails(
        &server("ws_route /a chat protocol=;"),
        "invalid value \"protocol=\" in \"ws_route\" directive",
    );
    fails(
        &server("ws_route default chat extra;"),
        "invalid parameter \"extra\" in \"ws_route\" directive",
    );
    fails(
        &server("ws_route = /a;"),
        "invalid number of arguments in \"ws_route\" directive",
    );
    fails(
        &server("ws_route default chat; ws_route default chat;"),
        "\"ws_route default\" is duplicate",
    );
    fails(
        &format!("ws_route default chat;\n{}", server("")),
        "\"ws_route\" directive is not allowed here",
    );
    fails(
        &server("ws_allow_origin https://a.example.com/path;"),
        "invalid value \"https://a.example.com/path\" in \"ws_allow_origin\" directive",
    );
    fails(
        &server("ws_allow_origin https://a*.example.com;"),
        "invalid value \"https://a*.example.com\" in \"ws_allow_origin\" directive",
    );
    fails(
        &server("ws_allow_origin * missing=maybe;"),
        "invalid parameter \"missing=maybe\" in \"ws_allow_origin\" directive",
    );
    fails(
        &server("ws_allow_origin missing=deny;"),
        "invalid number of arguments in \"ws_allow_origin\" directive",
    );
    fails(
        &server("ws_allow_origin \"~^(x\";"),
        "\"ws_allow_origin\": pcre2_compile() failed: missing closing parenthesis in \"^(x\"",
    );
    fails(
        &server("ws_allow_origin *; ws_allow_origin https://a.b;"),
        "\"ws_allow_origin\" directive is duplicate",
    );
    fails(
        &server("ws_handshake lenient;"),
        "invalid value \"lenient\" in \"ws_handshake\" directive",
    );
    fails(
        &server("ws_handshake strict; ws_handshake off;"),
        "\"ws_handshake\" directive is duplicate",
    );

    // Upstream blocks may come after the server that routes to them.
    let ok = format!(
        "ws_handshake strict;\nws_allow_origin https://*.example.com missing=deny;\n\
         server {{ listen 127.0.0.1:{port};\nws_route default Late;\n\
         location / {{ ws_route = /x late protocol=a,b; ws_route ~* ^/Y late; \
         proxy_pass http://$ws_upstream; }} }}\n\
         upstream late {{ server 127.0.0.1:1; }}"
    );
    let (ok, out) = nginx_t(&main_conf(1, &ok));
    assert!(ok, "{out}");
}
