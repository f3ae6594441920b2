//! TLS on either side: `wss://` terminated by nginx, and `proxy_pass https://`.

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

use crate::harness::*;

struct Cert {
    pem: String,
    key: String,
    der: rustls::pki_types::CertificateDer<'static>,
    key_der: rustls::pki_types::PrivateKeyDer<'static>,
}

fn make_cert() -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen");
    Cert {
        pem: ck.cert.pem(),
        key: ck.key_pair.serialize_pem(),
        der: ck.cert.der().clone(),
        key_der: rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into()),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

async fn exchange_and_check(ws_url: &str, connector: Option<Connector>, ngx: &Nginx) {
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        ws_url,
        Some(ws_config()),
        false,
        connector,
    )
    .await
    .expect("connect");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::Text("over tls".into())).await.unwrap();
    ws.send(Message::Binary(big.clone())).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        if let m @ (Message::Text(_) | Message::Binary(_)) = ws.next().await.unwrap().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got[0], Message::Text("over tls".into()));
    assert!(got[1] == Message::Binary(big), "binary echo differs");
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let close = of_event(&recs, "close")[0];
    assert_eq!(close["client"]["messages"], 2);
    assert_eq!(close["upstream"]["messages"], 2);
    assert_eq!(
        close["client"]["bytes"],
        8 + 300_000,
        "close(None) has no payload"
    );
    assert_eq!(close["end"], "normal");
    let frames = of_event(&recs, "frame");
    assert_eq!(frames.iter().filter(|f| f["from"] == "client").count(), 3);
    assert_eq!(frames.iter().filter(|f| f["from"] == "upstream").count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_terminated_by_nginx() {
    let cert = make_cert();
    let echo = echo_server().await;
    let port = free_port();
    let dir_conf = format!(
        "server {{ listen 127.0.0.1:{port} ssl;\n\
         ssl_certificate certs/server.crt; ssl_certificate_key certs/server.key;\n\
         ssl_protocols TLSv1.2 TLSv1.3;\n\
         location /wss {{ ws_log logs/ws.log; ws_log_events open frame close; {} }} }}",
        proxy_to(echo.addr)
    );
    let conf = main_conf(1, &dir_conf);
    // The certificate must exist before nginx starts: write it into a prefix we control.
    let ngx = start_with_files(
        &conf,
        port,
        &[
            ("certs/server.crt", &cert.pem),
            ("certs/server.key", &cert.key),
        ],
    );

    let url = format!("wss://localhost:{port}/wss");
    exchange_and_check(&url, Some(tls_trusting(&cert.der)), &ngx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_to_tls_upstream() {
    let cert = make_cert();
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der.clone()], cert.key_der.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let s = s2.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve_ws(tls, s).await;
                }
            });
        }
    });
    let loc = format!(
        "location / {{ ws_log logs/ws.log; ws_log_events open frame close;\n\
         proxy_pass https://{addr}; proxy_http_version 1.1;\n\
         proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade; }}"
    );
    let ngx = Nginx::start(1, "", &loc);
    exchange_and_check(&ngx.url("/"), None, &ngx).await;
    assert_eq!(seen.lock().unwrap().messages.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_over_wss() {
    let cert = make_cert();
    let echo = echo_server().await;
    let port = free_port();
    let server = format!(
        "server {{ listen 127.0.0.1:{port} ssl;\n\
         ssl_certificate certs/server.crt; ssl_certificate_key certs/server.key;\n\
         location / {{ ws_log logs/ws.log; ws_idle_timeout 1s; ws_close_timeout 1s; {} }} }}",
        proxy_to(echo.addr)
    );
    let ngx = start_with_files(
        &main_conf(1, &server),
        port,
        &[
            ("certs/server.crt", &cert.pem),
            ("certs/server.key", &cert.key),
        ],
    );
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        format!("wss://localhost:{port}/"),
        Some(ws_config()),
        false,
        Some(tls_trusting(&cert.der)),
    )
    .await
    .unwrap();
    ws.send(Message::Text("once".into())).await.unwrap();
    let t0 = std::time::Instant::now();
    let close = loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Close(f) => break f.unwrap(),
            _ => continue,
        }
    };
    assert_eq!(
        (u16::from(close.code), &*close.reason),
        (1001, "idle timeout")
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(3));
    while let Some(Ok(_)) = ws.next().await {}
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    assert_eq!(of_event(&recs, "close")[0]["end"], "idle_timeout");
    assert_eq!(
        echo.seen.lock().unwrap().closes,
        [(1001, "idle timeout".to_string())]
    );
}
