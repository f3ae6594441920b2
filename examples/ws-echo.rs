//! The bundled WebSocket echo backend for the demo, the example configurations and manual tests.
//!
//! Echoes every text and binary message back to its sender, answers pings, and completes the
//! close handshake. No message or frame size limits. With `--name NAME`, the text message
//! `whoami` is answered with `NAME` instead of an echo, to show which server of an
//! `upstream {}` pool a connection reached. With `--protocol NAME`, the subprotocol `NAME` is
//! selected when the client offers it. With `--deflate`, it accepts permessage-deflate and
//! returns every frame byte for byte (unmasked), compressed ones included: a compressing
//! client then gets a valid compressed stream back (scripts/bench-instructions' compressed
//! rows; tokio-tungstenite has no permessage-deflate).
//!
//!     cargo run --example ws-echo -- [--listen 127.0.0.1:9001] [--name NAME] [--protocol NAME]
//!                                    [--deflate]

#[path = "common/rawws.rs"]
mod rawws;

use std::net::SocketAddr;
use std::process::ExitCode;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

const USAGE: &str =
    "usage: ws-echo [--listen ADDR:PORT] [--name NAME] [--protocol NAME] [--deflate]

  --listen ADDR:PORT  address to listen on (default 127.0.0.1:9001)
  --name NAME         answer the text message \"whoami\" with NAME
  --protocol NAME     select subprotocol NAME when the client offers it
  --deflate           accept permessage-deflate and echo every frame byte for byte (no
                      --name or --protocol then)";

struct Args {
    listen: SocketAddr,
    name: Option<String>,
    protocol: Option<String>,
    deflate: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
        name: None,
        protocol: None,
        deflate: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => {
                let v = value()?;
                args.listen = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "--name" => args.name = Some(value()?),
            "--protocol" => args.protocol = Some(value()?),
            "--deflate" => args.deflate = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(args)
}

fn config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: None,
        max_frame_size: None,
        ..WebSocketConfig::default()
    }
}

/// Serves one connection until it closes.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    name: Option<String>,
    protocol: Option<String>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    // The callback's Result type is tungstenite's (its error is an HTTP response).
    #[allow(clippy::result_large_err)]
    let select = |req: &Request, mut resp: Response| {
        let offered = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim);
        if let Some(p) = protocol.as_deref() {
            if offered.into_iter().any(|o| o == p) {
                if let Ok(v) = HeaderValue::from_str(p) {
                    resp.headers_mut().insert("sec-websocket-protocol", v);
                }
            }
        }
        Ok(resp)
    };
    // Echo each message as soon as it is written, not after a delayed ACK.
    stream.set_nodelay(true)?;
    let mut ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, select, Some(config())).await?;
    eprintln!("ws-echo: {peer} connected");
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Text(t) if t == "whoami" && name.is_some() => {
                ws.send(Message::Text(name.clone().unwrap_or_default()))
                    .await?;
            }
            m @ (Message::Text(_) | Message::Binary(_)) => ws.send(m).await?,
            // tungstenite queues the Pong and the Close reply itself; the next read sends them.
            Message::Close(c) => eprintln!("ws-echo: {peer} sent close {c:?}"),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    Ok(())
}

/// `--deflate`: the handshake and the echo by hand (examples/common/rawws.rs).
async fn serve_raw(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (_, rest) = rawws::accept(&mut stream).await?;
    rawws::echo(stream, rest).await
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ws-echo: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ws-echo: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let who = args.name.as_deref().unwrap_or("ws-echo");
    eprintln!("ws-echo: {who} listening on ws://{}", args.listen);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                eprintln!("ws-echo: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if args.deflate {
            tokio::spawn(async move {
                match serve_raw(stream).await {
                    Ok(()) => eprintln!("ws-echo: {peer} closed"),
                    Err(e) => eprintln!("ws-echo: {peer} ended: {e}"),
                }
            });
            continue;
        }
        let (name, protocol) = (args.name.clone(), args.protocol.clone());
        tokio::spawn(async move {
            match serve(stream, peer, name, protocol).await {
                Ok(()) => eprintln!("ws-echo: {peer} closed"),
                Err(e) => eprintln!("ws-echo: {peer} ended: {e}"),
            }
        });
    }
}
