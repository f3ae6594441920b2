//! A small WebSocket client that generates every kind of frame, for the demo and manual tests.
//!
//! Connects to a `ws://` or `wss://` URL, sends `whoami` once, then each round (every second by
//! default) sends a text message, a binary message, a text message fragmented into three frames
//! and a ping, printing what comes back. After `--rounds N` rounds it closes with code 1000 and
//! waits for the server's Close. Exits non-zero if the connection fails or ends abnormally.
//!
//!     cargo run --example ws-traffic -- [URL] [--rounds N] [--interval SECS]
//!         [--protocol NAME] [--ca FILE] [--quiet]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

const USAGE: &str = "usage: ws-traffic [URL] [--rounds N] [--interval SECS] [--protocol NAME]
                  [--ca FILE] [--quiet]

  URL              ws:// or wss:// URL (default ws://127.0.0.1:8080/chat)
  --rounds N       close after N rounds (default: run until interrupted)
  --interval SECS  pause between rounds (default 1)
  --protocol NAME  offer subprotocol NAME (Sec-WebSocket-Protocol)
  --ca FILE        for wss://: trust the PEM certificate(s) in FILE instead of the
                   system's web roots (e.g. a self-signed server certificate)
  --quiet          print only errors and the final summary";

struct Args {
    url: String,
    rounds: Option<u64>,
    interval: Duration,
    protocol: Option<String>,
    ca: Option<String>,
    quiet: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        url: "ws://127.0.0.1:8080/chat".to_string(),
        rounds: None,
        interval: Duration::from_secs(1),
        protocol: None,
        ca: None,
        quiet: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--rounds" => {
                let v = value()?;
                args.rounds = Some(v.parse().map_err(|e| format!("--rounds {v}: {e}"))?);
            }
            "--interval" => {
                let v = value()?;
                let secs: f64 = v.parse().map_err(|e| format!("--interval {v}: {e}"))?;
                args.interval = Duration::try_from_secs_f64(secs)
                    .map_err(|e| format!("--interval {v}: {e}"))?;
            }
            "--protocol" => args.protocol = Some(value()?),
            "--ca" => args.ca = Some(value()?),
            "--quiet" | "-q" => args.quiet = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            s if s.starts_with("ws://") || s.starts_with("wss://") => args.url = a,
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(args)
}

/// A rustls connector trusting only the certificates in a PEM file.
fn tls_connector(ca: &str) -> Result<Connector, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("{ca}: {e}"))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{ca}: {e}"))?;
        roots.add(cert).map_err(|e| format!("{ca}: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Connector::Rustls(Arc::new(config)))
}

fn show(m: &Message) -> String {
    match m {
        Message::Text(t) => format!("text {t:?}"),
        Message::Binary(b) => format!("binary {} bytes", b.len()),
        Message::Ping(p) => format!("ping {:?}", String::from_utf8_lossy(p)),
        Message::Pong(p) => format!("pong {:?}", String::from_utf8_lossy(p)),
        Message::Close(Some(c)) => format!("close {} {:?}", u16::from(c.code), c.reason),
        Message::Close(None) => "close (no code)".to_string(),
        Message::Frame(_) => "raw frame".to_string(),
    }
}

/// One round's messages. The fragmented message goes out as raw frames: a text frame without
/// FIN, a continuation, and a final continuation.
fn round(n: u64) -> Vec<Message> {
    let frame = |data: &str, op: Data, fin: bool| {
        Message::Frame(Frame::message(
            data.as_bytes().to_vec(),
            OpCode::Data(op),
            fin,
        ))
    };
    vec![
        Message::Text(format!("hello #{n}")),
        Message::Binary((0..16).map(|i| (n as u8).wrapping_add(i)).collect()),
        frame("fragmented ", Data::Text, false),
        frame("message ", Data::Continue, false),
        frame(&format!("#{n}"), Data::Continue, true),
        Message::Ping(format!("ping #{n}").into_bytes()),
    ]
}

async fn run(args: Args) -> Result<(), String> {
    let mut request = args
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("{}: {e}", args.url))?;
    if let Some(p) = &args.protocol {
        let v = HeaderValue::from_str(p).map_err(|e| format!("--protocol {p}: {e}"))?;
        request.headers_mut().insert("sec-websocket-protocol", v);
    }
    let connector = args.ca.as_deref().map(tls_connector).transpose()?;
    let config = WebSocketConfig {
        max_message_size: None,
        max_frame_size: None,
        ..WebSocketConfig::default()
    };
    let (ws, resp) =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, connector)
            .await
            .map_err(|e| format!("connect {}: {e}", args.url))?;
    let quiet = args.quiet;
    let protocol = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(|p| format!(", subprotocol {p}"))
        .unwrap_or_default();
    println!("ws-traffic: connected to {}{protocol}", args.url);

    let (mut tx, mut rx) = ws.split();
    // The reader prints everything and reports how the server closed.
    let reader = tokio::spawn(async move {
        let mut received = 0u64;
        while let Some(m) = rx.next().await {
            let m = m.map_err(|e| format!("read: {e}"))?;
            received += 1;
            if !quiet {
                println!("<- {}", show(&m));
            }
            if let Message::Close(c) = m {
                return Ok((received, c.map(|c| u16::from(c.code))));
            }
        }
        Err::<_, String>("connection ended without a Close frame".to_string())
    });

    let signal = |kind| signal(kind).map_err(|e| format!("signal handler: {e}"));
    let (mut int, mut term) = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
    );
    let mut sent = 0u64;
    let mut n = 0u64;
    let send = |m: Message| {
        if !quiet {
            match &m {
                Message::Frame(f) => println!(
                    "-> frame {:?} fin={} {:?}",
                    f.header().opcode,
                    f.header().is_final,
                    String::from_utf8_lossy(f.payload())
                ),
                m => println!("-> {}", show(m)),
            }
        }
        m
    };
    tx.send(send(Message::Text("whoami".into())))
        .await
        .map_err(|e| format!("send: {e}"))?;
    sent += 1;
    while args.rounds.is_none_or(|r| n < r) {
        n += 1;
        for m in round(n) {
            tx.send(send(m)).await.map_err(|e| format!("send: {e}"))?;
            sent += 1;
        }
        if reader.is_finished() {
            break;
        }
        // Ctrl-C or a TERM (the demo's cleanup) ends the loop with a proper Close.
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = int.recv() => break,
            _ = term.recv() => break,
        }
    }
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    };
    tx.send(send(Message::Close(Some(close))))
        .await
        .map_err(|e| format!("send close: {e}"))?;
    let (received, code) = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .map_err(|_| "no Close reply within 10s".to_string())?
        .map_err(|e| format!("reader: {e}"))??;
    let code = code.map_or("none".to_string(), |c| c.to_string());
    println!(
        "ws-traffic: {n} rounds, sent {sent} messages/frames, received {received}, \
         server close code {code}"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ws-traffic: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ws-traffic: {e}");
            ExitCode::FAILURE
        }
    }
}
