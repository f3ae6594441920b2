//! Every configuration in nginx-conf/ starts, and a real client gets through it.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

use crate::harness::*;

/// Reads an example and substitutes its documented tokens.
fn example(name: &str, port: u16, backends: [SocketAddr; 2]) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/nginx-conf/");
    let text = std::fs::read_to_string(format!("{path}{name}")).expect("example config");
    text.replace(
        "modules/ngx_http_ws_module.so",
        &module_path().display().to_string(),
    )
    .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
    .replace("127.0.0.1:8443", &format!("127.0.0.1:{port}"))
    .replace("127.0.0.1:9001", &backends[0].to_string())
    .replace("127.0.0.1:9002", &backends[1].to_string())
}

async fn echo_once(url: &str, connector: Option<Connector>) {
    let (mut ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(url, Some(ws_config()), false, connector)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    ws.send(Message::Text("hello example".into()))
        .await
        .unwrap();
    loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            assert_eq!(t, "hello example");
            break;
        }
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

async fn two_backends() -> (Echo, Echo) {
    (echo_server().await, echo_server().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_plain_conf() {
    let (a, b) = two_backends().await;
    let port = free_port();
    let ngx = Nginx::start_conf(&example("ws-plain.conf", port, [a.addr, b.addr]), port);
    for _ in 0..4 {
        echo_once(&ngx.url("/chat/room1"), None).await;
    }
    let recs = ngx.wait_records("logs/ws.log", closes(4)).await;
    assert_eq!(of_event(&recs, "open").len(), 4);
    // Round robin over the upstream{} pool.
    let (na, nb) = (
        a.seen.lock().unwrap().paths.len(),
        b.seen.lock().unwrap().paths.len(),
    );
    assert_eq!((na, nb), (2, 2));
    assert!(of_event(&recs, "open")
        .iter()
        .all(|o| o["upstream_name"] == "chat_backend"));
    let lines = ngx.wait_lines("logs/access.log", 4).await;
    assert!(
        lines[0].contains(" 101 ") && lines[0].contains("end=normal"),
        "{}",
        lines[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_conf() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (a, b) = two_backends().await;
    let port = free_port();
    let conf = example("wss.conf", port, [a.addr, b.addr]);
    assert!(conf.contains(" ssl;") && !conf.lines().any(|l| l.trim() == "ssl on;"));
    let ngx = start_with_files(
        &conf,
        port,
        &[
            ("certs/server.crt", &ck.cert.pem()),
            ("certs/server.key", &ck.key_pair.serialize_pem()),
        ],
    );
    let url = format!("wss://localhost:{port}/wss");
    echo_once(&url, Some(tls_trusting(ck.cert.der()))).await;
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    assert_eq!(of_event(&recs, "message").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_conf() {
    let (a, b) = two_backends().await;
    let port = free_port();
    let ngx = Nginx::start_conf(&example("logging.conf", port, [a.addr, b.addr]), port);
    echo_once(&ngx.url("/chat"), None).await;
    echo_once(&ngx.url("/feed"), None).await;
    echo_once(&ngx.url("/untracked"), None).await;
    let frames = ngx.wait_records("logs/ws-frames.log", closes(1)).await;
    assert!(!of_event(&frames, "frame").is_empty());
    assert_eq!(of_event(&frames, "message")[0]["payload"], "hello example");
    let conns = ngx.wait_records("logs/ws.log", closes(1)).await;
    assert!(of_event(&conns, "frame").is_empty());
    assert_eq!(of_event(&conns, "open").len(), 1, "only /feed logs here");
    let lines = ngx.wait_lines("logs/access.log", 3).await;
    assert!(lines[2].contains("end=-"), "untracked: {}", lines[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_conf() {
    let (a, b) = two_backends().await;
    let port = free_port();
    let ngx = Nginx::start_conf(&example("timeouts.conf", port, [a.addr, b.addr]), port);
    echo_once(&ngx.url("/chat/x"), None).await;
    // A frame over ws_max_frame_size 1m is refused with 1009.
    let mut ws = connect(&ngx.url("/chat/big")).await;
    ws.send(Message::Binary(vec![0; (1 << 20) + 1]))
        .await
        .unwrap();
    let code = loop {
        if let Message::Close(Some(f)) = ws.next().await.unwrap().unwrap() {
            break u16::from(f.code);
        }
    };
    assert_eq!(code, 1009);
    let recs = ngx.wait_records("logs/ws.log", closes(2)).await;
    let ends: Vec<&str> = of_event(&recs, "close")
        .iter()
        .map(|c| c["end"].as_str().unwrap())
        .collect();
    assert_eq!(ends, ["normal", "too_big"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_conf() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (chat, gql) = two_backends().await;
    let port = free_port();
    let ngx = Nginx::start_conf(&example("routing.conf", port, [chat.addr, gql.addr]), port);
    echo_once(&ngx.url("/ws/chat/lobby"), None).await;
    // The GraphQL pool only for clients offering one of its subprotocols.
    let mut req = ngx.url("/ws/graphql").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "graphql-ws".parse().unwrap());
    req.headers_mut()
        .insert("Origin", "https://eu.app.example.com".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    assert_eq!(chat.seen.lock().unwrap().paths, ["/ws/chat/lobby"]);
    assert_eq!(gql.seen.lock().unwrap().paths, ["/ws/graphql"]);
    // Another site's page is refused; so is an unknown path.
    let mut req = ngx.url("/ws/chat/x").into_client_request().unwrap();
    req.headers_mut()
        .insert("Origin", "https://evil-example.com".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let err = tokio_tungstenite::connect_async(ngx.url("/ws/nothing"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    let recs = ngx
        .wait_records("logs/ws.log", |r| of_event(r, "reject").len() >= 2)
        .await;
    let reasons: Vec<&str> = of_event(&recs, "reject")
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["origin", "no_route"]);
    let lines = ngx.wait_lines("logs/access.log", 4).await;
    assert!(
        lines[0].contains("route=/ws/chat/ upstream=chat"),
        "{}",
        lines[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_conf() {
    let (a, b) = two_backends().await;
    let port = free_port();
    let ngx = Nginx::start_conf(&example("metrics.conf", port, [a.addr, b.addr]), port);
    for _ in 0..3 {
        echo_once(&ngx.url("/chat/room"), None).await;
    }
    echo_once(&ngx.url("/direct"), None).await;
    let direct = b.addr.to_string();
    let v = crate::metrics::wait_closed(port, "/ws-status", 4).await;
    let closed = |up: &str| {
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["upstream"] == up)
            .map(|e| e["tunnels"]["closed"].clone())
    };
    assert_eq!(closed("chat_backend"), Some(3.into()), "{v:#}");
    assert_eq!(closed(&direct), Some(1.into()), "{v:#}");
    let (code, _, text) = crate::metrics::get(port, "/metrics").await;
    assert_eq!(code, 200);
    assert!(text.contains(
        r#"nginx_ws_frames_total{route="",upstream="chat_backend",direction="client",opcode="text"} 3"#
    ), "{text}");
}
