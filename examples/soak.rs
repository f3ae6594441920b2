//! Soak and fault-injection run: nginx with the module in front of in-process echo upstreams,
//! many concurrent WebSocket tunnels for a fixed time, reloads, upstreams that die mid-frame,
//! clients that stall mid-frame and a log disk that fills; then checks and a summary.
//!
//! Run it through `scripts/soak`, which builds the module, nginx and this example and passes
//! their paths:
//!
//!     soak --nginx PATH --module PATH [--duration SECS] [--tunnels N] [--prefix DIR] ...
//!
//! Every message is generated from a seed, the tunnel's URI and its index, so both the echo
//! upstream and the client check it byte for byte. Each tunnel has a unique URI
//! (`/echo/<slot>-<n>`, `/kill/...`, `/stall/...`, `/full/...`); the `open` record carries it,
//! `conn` + `request_id` lead to the `close` record, whose message counts are compared with
//! what the peers counted. Exits 0 when every check passed, 1 otherwise, 2 on bad arguments.

#[path = "common/proc.rs"]
mod proc;
use proc::{children, rss_kib};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

const USAGE: &str = "usage: soak --nginx PATH --module PATH [options]

  --nginx PATH       the nginx binary the module was built for
  --module PATH      the module (libnginx_ws.so)
  --duration SECS    how long the soak phase runs (default 120)
  --tunnels N        concurrent client tunnels (default 1000)
  --pause-ms MS      each client waits 0..MS between messages (default 2000)
  --reloads N        nginx -s reload (SIGHUP) N times, evenly spread (default 4: every
                     duration/5)
  --kill-pct P       percent of new tunnels whose upstream dies mid-frame (default 2)
  --stall-pct P      percent of new tunnels whose client stalls mid-frame (default 1)
  --full-pct P       percent of new tunnels logging to the small full disk (default 10)
  --seed N           seed of the message generator (default: from the clock)
  --prefix DIR       nginx prefix (configuration, logs); emptied first; kept afterwards
                     (default: a temporary directory, removed unless a check failed)";

// Timings in the generated configuration; the checks derive their bounds from them.
const DRAIN_SECS: u64 = 2;
const CLOSE_TIMEOUT_SECS: u64 = 2;
const IDLE_SECS: u64 = 3;
/// How long a reply may take before the run calls the tunnel stuck.
const ECHO_TIMEOUT: Duration = Duration::from_secs(30);
/// Worker RSS at the end may exceed the baseline by this factor plus `RSS_SLACK_KIB`.
const RSS_FACTOR: f64 = 1.25;
const RSS_SLACK_KIB: u64 = 16 * 1024;

struct Args {
    nginx: PathBuf,
    module: PathBuf,
    duration: Duration,
    tunnels: usize,
    pause_ms: u64,
    reloads: u32,
    kill_pct: u64,
    stall_pct: u64,
    full_pct: u64,
    seed: u64,
    prefix: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut nginx = None;
    let mut module = None;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut args = Args {
        nginx: PathBuf::new(),
        module: PathBuf::new(),
        duration: Duration::from_secs(120),
        tunnels: 1000,
        pause_ms: 2000,
        reloads: 4,
        kill_pct: 2,
        stall_pct: 1,
        full_pct: 10,
        seed,
        prefix: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        fn num(a: &str, v: String) -> Result<u64, String> {
            v.parse().map_err(|e| format!("{a} {v}: {e}"))
        }
        match a.as_str() {
            "--nginx" => nginx = Some(PathBuf::from(value()?)),
            "--module" => module = Some(PathBuf::from(value()?)),
            "--duration" => args.duration = Duration::from_secs(num(&a, value()?)?),
            "--tunnels" => args.tunnels = num(&a, value()?)? as usize,
            "--pause-ms" => args.pause_ms = num(&a, value()?)?,
            "--reloads" => args.reloads = num(&a, value()?)? as u32,
            "--kill-pct" => args.kill_pct = num(&a, value()?)?,
            "--stall-pct" => args.stall_pct = num(&a, value()?)?,
            "--full-pct" => args.full_pct = num(&a, value()?)?,
            "--seed" => args.seed = num(&a, value()?)?,
            "--prefix" => args.prefix = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    args.nginx = nginx.ok_or("--nginx is required")?;
    args.module = module.ok_or("--module is required")?;
    if args.tunnels == 0 || args.duration.is_zero() {
        return Err("--tunnels and --duration must be above 0".into());
    }
    if args.kill_pct + args.stall_pct + args.full_pct > 100 {
        return Err("--kill-pct + --stall-pct + --full-pct must not exceed 100".into());
    }
    Ok(args)
}

// --- Deterministic randomness ----------------------------------------------------------------

/// SplitMix64: small, fast, and the same on both peers for the same seed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn hash_str(seed: u64, s: &str) -> u64 {
    // FNV-1a over the seed and the string.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in seed.to_le_bytes().iter().chain(s.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Message `index` of the tunnel `uri`: (is text, payload). 0 to 64 KiB, favouring the frame
/// header's length boundaries and small sizes as well as large ones.
fn message_for(seed: u64, uri: &str, index: u64) -> (bool, Vec<u8>) {
    let mut r = Rng::new(hash_str(seed, uri) ^ index.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let size = match r.below(10) {
        0..=3 => r.below(65_537) as usize,
        4..=5 => r.below(4_096) as usize,
        6..=8 => r.below(200) as usize,
        _ => [0, 1, 125, 126, 127, 65_535, 65_536][r.below(7) as usize],
    };
    if r.percent(50) {
        // Valid UTF-8 of exactly `size` bytes, with multi-byte characters that fragmenting
        // cuts in two now and then.
        const CHARS: [&str; 10] = ["a", "Z", " ", "\"", "\\", "\n", "é", "€", "😀", "7"];
        let mut s = String::with_capacity(size);
        while s.len() < size {
            let c = CHARS[r.below(CHARS.len() as u64) as usize];
            if s.len() + c.len() <= size {
                s.push_str(c);
            } else {
                s.push('x');
            }
        }
        (true, s.into_bytes())
    } else {
        (false, r.bytes(size))
    }
}

/// Splits `len` bytes into 1 to 8 fragments at random places (empty fragments included).
fn split_points(r: &mut Rng, len: usize) -> Vec<(usize, usize)> {
    let k = if r.percent(30) {
        1
    } else {
        2 + r.below(7) as usize
    };
    let mut cuts: Vec<usize> = (1..k).map(|_| r.below(len as u64 + 1) as usize).collect();
    cuts.sort_unstable();
    let mut out = Vec::with_capacity(k);
    let mut start = 0;
    for c in cuts.into_iter().chain(std::iter::once(len)) {
        out.push((start, c));
        start = c;
    }
    out
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: None,
        max_frame_size: None,
        ..WebSocketConfig::default()
    }
}

// --- Shared state and counters ---------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Echo,
    Full,
    Kill,
    Stall,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Echo => "echo",
            Kind::Full => "full",
            Kind::Kill => "kill",
            Kind::Stall => "stall",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum ClientEnd {
    /// The client sent Close 1000 and got this code back.
    ClientClose(u16),
    /// The proxy (or upstream) sent Close first, with this code.
    PeerClose(u16),
    /// The connection ended without a Close frame.
    Aborted(String),
    /// The run's own failure (timeout waiting for a reply); already reported.
    Stuck,
}

/// What a client counted on one tunnel.
#[derive(Debug)]
struct ClientTunnel {
    uri: String,
    kind: Kind,
    /// Messages completely written.
    sent: u64,
    /// Echoes received (all checked).
    recv: u64,
    /// Payload bytes the client wrote: data frames and pings; pongs it received.
    data_bytes: u64,
    ping_bytes: u64,
    pong_bytes_in: u64,
    end: ClientEnd,
}

/// What the echo upstream counted on one tunnel.
#[derive(Default, Debug)]
struct ServerTunnel {
    recv: u64,
    sent: u64,
    close: Option<u16>,
    /// Payload bytes the upstream wrote: echoes and pings; pongs it received.
    data_bytes: u64,
    ping_bytes: u64,
    pong_bytes_in: u64,
}

#[derive(Default)]
struct Stats {
    tunnels_opened: AtomicU64,
    connect_errors: AtomicU64,
    msgs_sent: AtomicU64,
    bytes_sent: AtomicU64,
    echoes_ok: AtomicU64,
    echo_bytes: AtomicU64,
    echoes_bad: AtomicU64,
    upstream_ok: AtomicU64,
    upstream_bad: AtomicU64,
    echoes_sent: AtomicU64,
    frames_sent: AtomicU64,
    pings_sent: AtomicU64,
    pongs_ok: AtomicU64,
    pongs_bad: AtomicU64,
    server_pings: AtomicU64,
    server_pongs_ok: AtomicU64,
    server_pongs_bad: AtomicU64,
    in_flight_at_close: AtomicU64,
    kills: AtomicU64,
    stalls: AtomicU64,
}

struct Shared {
    seed: u64,
    port: u16,
    pause_ms: u64,
    stop: AtomicBool,
    stats: Stats,
    tunnels: Mutex<Vec<ClientTunnel>>,
    server: Mutex<HashMap<String, ServerTunnel>>,
    failures: Mutex<Vec<String>>,
    stall_cut_ms: Mutex<Vec<u64>>,
    /// After a Close from the proxy: how the client's connection ended.
    after_close: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn fail(&self, what: String) {
        eprintln!("soak: FAIL: {what}");
        self.failures.lock().unwrap().push(what);
    }
    fn stopping(&self) -> bool {
        self.stop.load(Relaxed)
    }
}

// --- Echo upstream ---------------------------------------------------------------------------

async fn echo_upstream(listener: TcpListener, sh: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(serve(tcp, sh.clone()));
            }
            Err(e) => {
                eprintln!("soak: echo accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A final frame's header for `len` payload bytes, masked with `mask` when given.
fn frame_header(opcode: u8, len: usize, mask: Option<[u8; 4]>) -> Vec<u8> {
    let m = if mask.is_some() { 0x80 } else { 0 };
    let mut h = vec![0x80 | opcode];
    if len < 126 {
        h.push(m | len as u8);
    } else if len <= 0xffff {
        h.push(m | 126);
        h.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        h.push(m | 127);
        h.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(k) = mask {
        h.extend_from_slice(&k);
    }
    h
}

async fn serve(tcp: TcpStream, sh: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let mut uri = String::new();
    #[allow(clippy::result_large_err)]
    let cb = |req: &Request, resp: Response| {
        uri = req.uri().path().to_string();
        Ok(resp)
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(tcp, cb, Some(ws_config())).await
    else {
        return;
    };
    let kill_after = if uri.starts_with("/kill/") {
        Some(1 + Rng::new(hash_str(sh.seed, &uri)).below(5))
    } else {
        None
    };
    sh.server
        .lock()
        .unwrap()
        .insert(uri.clone(), ServerTunnel::default());
    let mut r = Rng::new(hash_str(sh.seed ^ 0x5e7e, &uri));
    let mut pings: VecDeque<Vec<u8>> = VecDeque::new();
    let mut index = 0u64;
    while let Some(Ok(msg)) = ws.next().await {
        let (text, data) = match msg {
            Message::Text(t) => (true, t.into_bytes()),
            Message::Binary(b) => (false, b),
            Message::Pong(p) => {
                if let Some(t) = sh.server.lock().unwrap().get_mut(&uri) {
                    t.pong_bytes_in += p.len() as u64;
                }
                let ok = check_pong(&mut pings, &p);
                let c = if ok {
                    &sh.stats.server_pongs_ok
                } else {
                    &sh.stats.server_pongs_bad
                };
                c.fetch_add(1, Relaxed);
                if !ok {
                    sh.fail(format!("{uri}: upstream got a pong that answers no ping"));
                }
                continue;
            }
            Message::Close(f) => {
                let code = f.map(|f| u16::from(f.code)).unwrap_or(1005);
                if let Some(t) = sh.server.lock().unwrap().get_mut(&uri) {
                    t.close = Some(code);
                }
                // tungstenite queued the reply; the next read sends it and sees the end.
                continue;
            }
            _ => continue,
        };
        let want = message_for(sh.seed, &uri, index);
        index += 1;
        if want != (text, data.clone()) {
            sh.stats.upstream_bad.fetch_add(1, Relaxed);
            sh.fail(format!(
                "{uri}: upstream got message {} ({} bytes, text={text}) that differs from what \
                 the client sent ({} bytes, text={})",
                index - 1,
                data.len(),
                want.1.len(),
                want.0
            ));
        } else {
            sh.stats.upstream_ok.fetch_add(1, Relaxed);
        }
        if let Some(t) = sh.server.lock().unwrap().get_mut(&uri) {
            t.recv += 1;
        }
        if kill_after.is_some_and(|k| index > k) {
            // Die mid-frame: flush what tungstenite holds, write half a frame, drop TCP
            // (every other one with a reset instead of a FIN).
            sh.stats.kills.fetch_add(1, Relaxed);
            let _ = ws.flush().await;
            let len = data.len().max(64);
            let mut half = frame_header(0x2, len, None);
            half.extend(std::iter::repeat_n(0x55u8, len / 2));
            let tcp = ws.get_mut();
            let _ = tcp.write_all(&half).await;
            let _ = tcp.flush().await;
            if index % 2 == 0 {
                let _ = tcp.set_zero_linger();
            }
            return;
        }
        // Echo, fragmented its own way, with pings between the fragments now and then.
        let opcode = if text { Data::Text } else { Data::Binary };
        let parts = split_points(&mut r, data.len());
        let single = parts.len() == 1;
        let mut ok = true;
        for (i, &(a, b)) in parts.iter().enumerate() {
            if i > 0 && r.percent(10) {
                let n = r.below(126) as usize;
                let p = r.bytes(n);
                pings.push_back(p.clone());
                sh.stats.server_pings.fetch_add(1, Relaxed);
                if let Some(t) = sh.server.lock().unwrap().get_mut(&uri) {
                    t.ping_bytes += p.len() as u64;
                }
                if ws.send(Message::Ping(p)).await.is_err() {
                    ok = false;
                    break;
                }
            }
            let m = if single {
                if text {
                    Message::Text(String::from_utf8(data.clone()).unwrap_or_default())
                } else {
                    Message::Binary(data.clone())
                }
            } else {
                let op = if i == 0 {
                    OpCode::Data(opcode)
                } else {
                    OpCode::Data(Data::Continue)
                };
                Message::Frame(Frame::message(
                    data[a..b].to_vec(),
                    op,
                    i + 1 == parts.len(),
                ))
            };
            if ws.send(m).await.is_err() {
                ok = false;
                break;
            }
        }
        if !ok {
            break;
        }
        sh.stats.echoes_sent.fetch_add(1, Relaxed);
        if let Some(t) = sh.server.lock().unwrap().get_mut(&uri) {
            t.sent += 1;
            t.data_bytes += data.len() as u64;
        }
    }
}

/// A pong must answer an outstanding ping; a peer may skip pings (RFC 6455 5.5.3), not reorder.
fn check_pong(pings: &mut VecDeque<Vec<u8>>, pong: &[u8]) -> bool {
    while let Some(p) = pings.pop_front() {
        if p == pong {
            return true;
        }
    }
    false
}

// --- Clients ---------------------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn client_slot(sh: Arc<Shared>, slot: usize, kill: u64, stall: u64, full: u64) {
    let mut r = Rng::new(sh.seed ^ (slot as u64).wrapping_mul(0x1000_0001));
    let mut n = 0u64;
    while !sh.stopping() {
        n += 1;
        let p = r.below(100);
        let kind = if p < kill {
            Kind::Kill
        } else if p < kill + stall {
            Kind::Stall
        } else if p < kill + stall + full {
            Kind::Full
        } else {
            Kind::Echo
        };
        let uri = format!("/{}/{slot}-{n}", kind.path());
        let t = if kind == Kind::Stall {
            stall_tunnel(&sh, uri).await
        } else {
            let msgs = 5 + r.below(56);
            echo_tunnel(&sh, uri, kind, msgs, &mut r).await
        };
        match t {
            Some(t) => sh.tunnels.lock().unwrap().push(t),
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn connect(sh: &Shared, uri: &str) -> Option<Ws> {
    let url = format!("ws://127.0.0.1:{}{uri}", sh.port);
    let fut = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true);
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok((ws, _))) => {
            sh.stats.tunnels_opened.fetch_add(1, Relaxed);
            Some(ws)
        }
        Ok(Err(e)) => {
            sh.stats.connect_errors.fetch_add(1, Relaxed);
            eprintln!("soak: connect {uri}: {e}");
            None
        }
        Err(_) => {
            sh.stats.connect_errors.fetch_add(1, Relaxed);
            eprintln!("soak: connect {uri}: timed out");
            None
        }
    }
}

/// Reads what is left after a Close: tungstenite answers it, then the stream ends.
/// Reads to the end after the peer's Close and counts how the connection ended: a clean end
/// of stream, or an error (a broken pipe: the proxy closed TCP before the Close reply).
async fn finish(sh: &Shared, ws: &mut Ws) {
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return e.to_string(),
                None => return "clean".to_string(),
            }
        }
    })
    .await
    .unwrap_or_else(|_| "timeout".to_string());
    *sh.after_close.lock().unwrap().entry(end).or_default() += 1;
}

/// One tunnel of `msgs` messages (fewer when the run stops or the proxy closes it), each
/// sent fragmented with pings in between, and its echo checked.
async fn echo_tunnel(
    sh: &Shared,
    uri: String,
    kind: Kind,
    msgs: u64,
    r: &mut Rng,
) -> Option<ClientTunnel> {
    let mut ws = connect(sh, &uri).await?;
    let mut t = ClientTunnel {
        uri,
        kind,
        sent: 0,
        recv: 0,
        data_bytes: 0,
        ping_bytes: 0,
        pong_bytes_in: 0,
        end: ClientEnd::Stuck,
    };
    let mut pings: VecDeque<Vec<u8>> = VecDeque::new();
    let mut index = 0;
    while index < msgs && !sh.stopping() {
        let (text, data) = message_for(sh.seed, &t.uri, index);
        index += 1;
        let opcode = if text { Data::Text } else { Data::Binary };
        let parts = split_points(r, data.len());
        let single = parts.len() == 1;
        let mut written = true;
        for (i, &(a, b)) in parts.iter().enumerate() {
            if r.percent(25) {
                let n = r.below(126) as usize;
                let p = r.bytes(n);
                pings.push_back(p.clone());
                sh.stats.pings_sent.fetch_add(1, Relaxed);
                t.ping_bytes += p.len() as u64;
                if ws.send(Message::Ping(p)).await.is_err() {
                    written = false;
                    break;
                }
            }
            let m = if single {
                if text {
                    Message::Text(String::from_utf8(data.clone()).unwrap_or_default())
                } else {
                    Message::Binary(data.clone())
                }
            } else {
                let op = if i == 0 {
                    OpCode::Data(opcode)
                } else {
                    OpCode::Data(Data::Continue)
                };
                Message::Frame(Frame::message(
                    data[a..b].to_vec(),
                    op,
                    i + 1 == parts.len(),
                ))
            };
            if ws.send(m).await.is_err() {
                written = false;
                break;
            }
            t.data_bytes += (b - a) as u64;
            sh.stats.frames_sent.fetch_add(1, Relaxed);
        }
        if written {
            t.sent += 1;
            sh.stats.msgs_sent.fetch_add(1, Relaxed);
            sh.stats.bytes_sent.fetch_add(data.len() as u64, Relaxed);
        }
        // Wait for the echo (a failed write still reads: the Close that explains it).
        loop {
            let next = match tokio::time::timeout(ECHO_TIMEOUT, ws.next()).await {
                Ok(n) => n,
                Err(_) => {
                    sh.fail(format!(
                        "{}: no echo of message {} within {ECHO_TIMEOUT:?}",
                        t.uri,
                        index - 1
                    ));
                    return Some(t);
                }
            };
            match next {
                Some(Ok(Message::Text(s))) => {
                    check_echo(sh, &mut t, index - 1, (true, s.into_bytes()), (text, &data));
                    break;
                }
                Some(Ok(Message::Binary(b))) => {
                    check_echo(sh, &mut t, index - 1, (false, b), (text, &data));
                    break;
                }
                Some(Ok(Message::Pong(p))) => {
                    t.pong_bytes_in += p.len() as u64;
                    if check_pong(&mut pings, &p) {
                        sh.stats.pongs_ok.fetch_add(1, Relaxed);
                    } else {
                        sh.stats.pongs_bad.fetch_add(1, Relaxed);
                        sh.fail(format!("{}: a pong that answers no ping", t.uri));
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    if written {
                        sh.stats.in_flight_at_close.fetch_add(1, Relaxed);
                    }
                    t.end = ClientEnd::PeerClose(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                    finish(sh, &mut ws).await;
                    return Some(t);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    t.end = ClientEnd::Aborted(e.to_string());
                    return Some(t);
                }
                None => {
                    t.end = ClientEnd::Aborted("end of stream".into());
                    return Some(t);
                }
            }
        }
        if index < msgs && sh.pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(r.below(sh.pause_ms + 1))).await;
        }
    }
    // A normal end: Close 1000, then the reply.
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    };
    if let Err(e) = ws.close(Some(bye)).await {
        t.end = ClientEnd::Aborted(format!("close: {e}"));
        return Some(t);
    }
    t.end = ClientEnd::Aborted("no close reply".into());
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(f)) => {
                    t.end = ClientEnd::ClientClose(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    Some(t)
}

fn check_echo(
    sh: &Shared,
    t: &mut ClientTunnel,
    index: u64,
    got: (bool, Vec<u8>),
    want: (bool, &[u8]),
) {
    t.recv += 1;
    if got.0 == want.0 && got.1 == want.1 {
        sh.stats.echoes_ok.fetch_add(1, Relaxed);
        sh.stats.echo_bytes.fetch_add(got.1.len() as u64, Relaxed);
    } else {
        sh.stats.echoes_bad.fetch_add(1, Relaxed);
        let first_diff = got.1.iter().zip(want.1).position(|(a, b)| a != b);
        sh.fail(format!(
            "{}: echo of message {index} differs: got {} bytes text={}, sent {} bytes text={}, \
             first differing byte {first_diff:?}",
            t.uri,
            got.1.len(),
            got.0,
            want.1.len(),
            want.0
        ));
    }
}

/// A client that sends a few messages, then half a frame, then nothing: the location's
/// `ws_idle_timeout` must close it (Close to the client, TCP after `ws_close_timeout`).
async fn stall_tunnel(sh: &Shared, uri: String) -> Option<ClientTunnel> {
    let mut c = match raw_handshake(sh.port, &uri).await {
        Ok(c) => c,
        Err(e) => {
            sh.stats.connect_errors.fetch_add(1, Relaxed);
            eprintln!("soak: connect {uri}: {e}");
            return None;
        }
    };
    sh.stats.tunnels_opened.fetch_add(1, Relaxed);
    sh.stats.stalls.fetch_add(1, Relaxed);
    let mut t = ClientTunnel {
        uri,
        kind: Kind::Stall,
        sent: 0,
        recv: 0,
        data_bytes: 0,
        ping_bytes: 0,
        pong_bytes_in: 0,
        end: ClientEnd::Stuck,
    };
    let mut buf = Vec::new();
    let mut r = Rng::new(hash_str(sh.seed ^ 0x57a1, &t.uri));
    let n = 1 + r.below(3);
    for index in 0..n {
        let (text, data) = message_for(sh.seed, &t.uri, index);
        let key = r.bytes(4);
        let key = [key[0], key[1], key[2], key[3]];
        let mut f = frame_header(if text { 1 } else { 2 }, data.len(), Some(key));
        f.extend(data.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        if c.write_all(&f).await.is_err() {
            t.end = ClientEnd::Aborted("write failed".into());
            return Some(t);
        }
        t.sent += 1;
        sh.stats.msgs_sent.fetch_add(1, Relaxed);
        sh.stats.bytes_sent.fetch_add(data.len() as u64, Relaxed);
        sh.stats.frames_sent.fetch_add(1, Relaxed);
        match read_message(&mut c, &mut buf, ECHO_TIMEOUT).await {
            RawRead::Message(op, payload) => {
                check_echo(sh, &mut t, index, (op == 1, payload), (text, &data));
            }
            RawRead::Close(code) => {
                sh.stats.in_flight_at_close.fetch_add(1, Relaxed);
                t.end = ClientEnd::PeerClose(code);
                return Some(t);
            }
            RawRead::Eof => {
                t.end = ClientEnd::Aborted("end of stream".into());
                return Some(t);
            }
            RawRead::Timeout => {
                sh.fail(format!("{}: no echo within {ECHO_TIMEOUT:?}", t.uri));
                return Some(t);
            }
        }
    }
    // Half a masked 1000-byte frame, then silence.
    let mut half = frame_header(2, 1000, Some([1, 2, 3, 4]));
    half.extend(std::iter::repeat_n(0u8, 500));
    let t0 = Instant::now();
    if c.write_all(&half).await.is_err() {
        t.end = ClientEnd::Aborted("write failed".into());
        return Some(t);
    }
    let limit = Duration::from_secs(IDLE_SECS + CLOSE_TIMEOUT_SECS + 10);
    let mut code = None;
    loop {
        match read_message(&mut c, &mut buf, limit.saturating_sub(t0.elapsed())).await {
            RawRead::Message(..) => {}
            RawRead::Close(c) => code = Some(c),
            RawRead::Eof => break,
            RawRead::Timeout => {
                sh.fail(format!(
                    "{}: a client stalled mid-frame was not cut within {limit:?}",
                    t.uri
                ));
                return Some(t);
            }
        }
    }
    sh.stall_cut_ms
        .lock()
        .unwrap()
        .push(t0.elapsed().as_millis() as u64);
    t.end = match code {
        Some(c) => ClientEnd::PeerClose(c),
        None => ClientEnd::Aborted("no close frame".into()),
    };
    Some(t)
}

async fn raw_handshake(port: u16, uri: &str) -> std::io::Result<TcpStream> {
    let fut = async {
        let mut c = TcpStream::connect(("127.0.0.1", port)).await?;
        c.set_nodelay(true)?;
        let req = format!(
            "GET {uri} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        c.write_all(req.as_bytes()).await?;
        // Byte by byte, so that nothing after the head is consumed.
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if c.read(&mut b).await? == 0 {
                return Err(std::io::Error::other("end of stream in the handshake"));
            }
            head.push(b[0]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            let line = String::from_utf8_lossy(&head);
            return Err(std::io::Error::other(format!("not a 101: {line:?}")));
        }
        Ok(c)
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("handshake timed out")))
}

enum RawRead {
    /// A whole data message: opcode of its first frame, payload.
    Message(u8, Vec<u8>),
    Close(u16),
    Eof,
    Timeout,
}

/// Reads unmasked server frames until a whole data message or a Close; pings are skipped.
async fn read_message(c: &mut TcpStream, buf: &mut Vec<u8>, limit: Duration) -> RawRead {
    let deadline = tokio::time::Instant::now() + limit;
    let mut msg: Option<(u8, Vec<u8>)> = None;
    loop {
        while let Some((fin, op, payload, used)) = parse_frame(buf) {
            buf.drain(..used);
            match op {
                0x8 => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    return RawRead::Close(code);
                }
                0x9 | 0xa => {}
                0x0 => {
                    if let Some(m) = msg.as_mut() {
                        m.1.extend_from_slice(&payload);
                    }
                }
                _ => msg = Some((op, payload)),
            }
            if fin && op < 0x8 {
                if let Some((op, p)) = msg.take() {
                    return RawRead::Message(op, p);
                }
            }
        }
        let mut b = [0u8; 16384];
        match tokio::time::timeout_at(deadline, c.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return RawRead::Eof,
            Ok(Ok(n)) => buf.extend_from_slice(&b[..n]),
            Err(_) => return RawRead::Timeout,
        }
    }
}

/// One frame from the start of `b`: (fin, opcode, unmasked payload, bytes used).
fn parse_frame(b: &[u8]) -> Option<(bool, u8, Vec<u8>, usize)> {
    if b.len() < 2 {
        return None;
    }
    let (fin, op) = (b[0] & 0x80 != 0, b[0] & 0x0f);
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7f {
        126 => (
            u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (usize::from(n), 2),
    };
    let key = if masked {
        let k = b.get(at..at + 4)?;
        at += 4;
        Some([k[0], k[1], k[2], k[3]])
    } else {
        None
    };
    let mut p = b.get(at..at + len)?.to_vec();
    if let Some(k) = key {
        p.iter_mut().enumerate().for_each(|(i, x)| *x ^= k[i % 4]);
    }
    Some((fin, op, p, at + len))
}

// --- nginx -----------------------------------------------------------------------------------

struct Nginx {
    child: Option<Child>,
    prefix: PathBuf,
    bin: PathBuf,
}

impl Nginx {
    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }
    fn signal(&self, sig: i32) {
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(self.pid(), sig) };
    }
    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.prefix.join(rel)).unwrap_or_default()
    }
    /// Stops nginx gracefully (QUIT, which flushes the buffered logs); true if it exited
    /// within `limit`.
    fn quit(&mut self, limit: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(c.id() as i32, libc::SIGQUIT) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The tmpfs that the `/full/` location logs to, unmounted when dropped.
struct SmallDisk {
    dir: PathBuf,
    mounted: bool,
}

impl SmallDisk {
    fn new(dir: PathBuf) -> SmallDisk {
        let _ = std::fs::create_dir_all(&dir);
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !mounted {
            // No mount here (not root, or no CAP_SYS_ADMIN): every write fails like on a full
            // disk.
            let _ = std::os::unix::fs::symlink("/dev/full", dir.join("ws.log"));
        }
        SmallDisk { dir, mounted }
    }
    fn unmount(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                eprintln!("soak: umount {} failed", self.dir.display());
            }
            self.mounted = false;
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        self.unmount();
    }
}

fn nginx_conf(module: &Path, port: u16, upstreams: &[u16], full_log: &Path) -> String {
    let servers: String = upstreams
        .iter()
        .map(|p| format!("    server 127.0.0.1:{p};\n"))
        .collect();
    format!(
        "load_module {module};
daemon off;
master_process on;
worker_processes 2;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  upstream echo {{
{servers}  }}
  ws_drain {DRAIN_SECS}s;
  ws_close_timeout {CLOSE_TIMEOUT_SECS}s;
  ws_log_events open frame message close;
  proxy_http_version 1.1;
  proxy_set_header Upgrade $http_upgrade;
  proxy_set_header Connection \"upgrade\";
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    ws_log logs/ws.log buffer=64k flush=1s;
    location /echo/ {{ proxy_pass http://echo; }}
    location /kill/ {{ proxy_pass http://echo; }}
    location /stall/ {{ ws_idle_timeout {IDLE_SECS}s; proxy_pass http://echo; }}
    location /full/ {{ ws_log {full}; proxy_pass http://echo; }}
  }}
}}
",
        module = module.display(),
        full = full_log.display(),
    )
}

fn start_nginx(args: &Args, prefix: &Path, conf: &str, port: u16) -> Result<Nginx, String> {
    std::fs::write(prefix.join("nginx.conf"), conf).map_err(|e| format!("nginx.conf: {e}"))?;
    let stderr = std::fs::File::create(prefix.join("logs/stderr.log"))
        .map_err(|e| format!("logs/stderr.log: {e}"))?;
    let child = Command::new(&args.nginx)
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(prefix.join("nginx.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", args.nginx.display()))?;
    let mut n = Nginx {
        child: Some(child),
        prefix: prefix.to_path_buf(),
        bin: args.nginx.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(n);
        }
        if let Some(Ok(Some(st))) = n.child.as_mut().map(|c| c.try_wait()) {
            return Err(format!(
                "nginx exited ({st}):\n{}{}",
                n.read("logs/stderr.log"),
                n.read("logs/error.log")
            ));
        }
        if Instant::now() > deadline {
            return Err(format!("nginx does not listen on 127.0.0.1:{port}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (total VmRSS of the workers in KiB, number of workers).
fn workers_rss(master: i32) -> (u64, usize) {
    let w = children(master);
    (w.iter().filter_map(|p| rss_kib(*p)).sum(), w.len())
}

// --- The ws_log file, read as it grows -------------------------------------------------------

#[derive(Default)]
struct LogIndex {
    offset: u64,
    partial: Vec<u8>,
    by_event: BTreeMap<String, u64>,
    bad_lines: u64,
    /// uri -> (conn, request_id) of its open record.
    opens: HashMap<String, (u64, String)>,
    /// (conn, request_id) -> close record.
    closes: HashMap<(u64, String), Value>,
}

impl LogIndex {
    fn key(v: &Value) -> (u64, String) {
        (
            v["conn"].as_u64().unwrap_or(u64::MAX),
            v["request_id"].as_str().unwrap_or("").to_string(),
        )
    }

    /// Reads what was appended since the last call.
    fn update(&mut self, path: &Path) {
        let Ok(mut f) = std::fs::File::open(path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut r = std::io::BufReader::with_capacity(1 << 20, &mut f);
        loop {
            let mut line = std::mem::take(&mut self.partial);
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => {
                    self.partial = line;
                    break;
                }
                Ok(n) => {
                    self.offset += n as u64;
                    if line.last() != Some(&b'\n') {
                        self.partial = line;
                        break;
                    }
                    self.line(&line);
                }
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        // Cheap path for frame and message records: the event name, nothing else.
        let event = find_event(line);
        let Some(event) = event else {
            self.bad_lines += 1;
            return;
        };
        *self.by_event.entry(event.to_string()).or_default() += 1;
        if event != "open" && event != "close" {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            self.bad_lines += 1;
            return;
        };
        if event == "open" {
            let uri = v["uri"].as_str().unwrap_or("").to_string();
            self.opens.insert(uri, Self::key(&v));
        } else {
            self.closes.insert(Self::key(&v), v);
        }
    }

    fn records(&self) -> u64 {
        self.by_event.values().sum()
    }
}

fn find_event(line: &[u8]) -> Option<&str> {
    const TAG: &[u8] = b"\"event\":\"";
    let at = line.windows(TAG.len()).position(|w| w == TAG)? + TAG.len();
    let len = line[at..].iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&line[at..at + len]).ok()
}

// --- The run ---------------------------------------------------------------------------------

fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool, String> {
    raise_nofile();
    let (_tmp, prefix) = match &args.prefix {
        Some(p) => {
            let _ = std::fs::remove_dir_all(p.join("logs"));
            (None, p.clone())
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("nginx-ws-soak.")
                .tempdir()
                .map_err(|e| format!("temporary directory: {e}"))?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    std::fs::create_dir_all(prefix.join("logs")).map_err(|e| format!("logs: {e}"))?;
    let prefix = prefix
        .canonicalize()
        .map_err(|e| format!("{}: {e}", prefix.display()))?;
    let module = args
        .module
        .canonicalize()
        .map_err(|e| format!("{}: {e}", args.module.display()))?;

    let mut disk = SmallDisk::new(prefix.join("full"));
    let full_log = disk.dir.join("ws.log");

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())?.port()
    };
    let sh = Arc::new(Shared {
        seed: args.seed,
        port,
        pause_ms: args.pause_ms,
        stop: AtomicBool::new(false),
        stats: Stats::default(),
        tunnels: Mutex::new(Vec::new()),
        server: Mutex::new(HashMap::new()),
        failures: Mutex::new(Vec::new()),
        stall_cut_ms: Mutex::new(Vec::new()),
        after_close: Mutex::new(BTreeMap::new()),
    });
    let mut ports = Vec::new();
    for _ in 0..2 {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("echo listener: {e}"))?;
        ports.push(l.local_addr().map_err(|e| e.to_string())?.port());
        tokio::spawn(echo_upstream(l, sh.clone()));
    }
    let conf = nginx_conf(&module, port, &ports, &full_log);
    let mut ngx = start_nginx(&args, &prefix, &conf, port)?;
    let master = ngx.pid();
    println!(
        "soak: nginx {} (master {master}) on 127.0.0.1:{port}, prefix {}, seed {}, log disk: {}",
        ngx.bin.display(),
        prefix.display(),
        args.seed,
        if disk.mounted {
            "tmpfs 512k"
        } else {
            "/dev/full (mount impossible)"
        }
    );

    // Warm-up: every slot opens one tunnel, exchanges a few messages and closes; the workers'
    // memory after that is the baseline.
    println!("soak: warm-up: {} tunnels of 3 messages each", args.tunnels);
    let ramp = Duration::from_millis(2000);
    let mut warm = Vec::new();
    for slot in 0..args.tunnels {
        let sh = sh.clone();
        let delay = ramp.mul_f64(slot as f64 / args.tunnels as f64);
        warm.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut r = Rng::new(sh.seed ^ slot as u64);
            let uri = format!("/echo/{slot}-0");
            if let Some(t) = echo_tunnel(&sh, uri, Kind::Echo, 3, &mut r).await {
                sh.tunnels.lock().unwrap().push(t);
            }
        }));
    }
    for w in warm {
        let _ = w.await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (base_rss, base_workers) = workers_rss(master);
    let base_master = rss_kib(master).unwrap_or(0);
    println!(
        "soak: baseline worker RSS {} ({base_workers} workers), master {}",
        mib(base_rss),
        mib(base_master)
    );

    // The soak proper.
    println!(
        "soak: {} tunnels for {:?}, {} reloads",
        args.tunnels, args.duration, args.reloads
    );
    let t_start = Instant::now();
    let mut clients = Vec::new();
    for slot in 0..args.tunnels {
        let sh = sh.clone();
        let delay = ramp.mul_f64(slot as f64 / args.tunnels as f64);
        let (k, s, f) = (args.kill_pct, args.stall_pct, args.full_pct);
        clients.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            client_slot(sh, slot, k, s, f).await;
        }));
    }

    let main_log = prefix.join("logs/ws.log");
    let mut index = LogIndex::default();
    let mut peak_rss = base_rss;
    let mut reloads = 0u32;
    let mut old_workers: Vec<(i32, Instant)> = Vec::new();
    let mut drain_exit_ms: Vec<u64> = Vec::new();
    let every = args.duration / (args.reloads + 1);
    let mut next_report = Duration::from_secs(10);
    while t_start.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = t_start.elapsed();
        let (rss, _) = workers_rss(master);
        peak_rss = peak_rss.max(rss);
        if reloads < args.reloads && now >= every * (reloads + 1) {
            let before = children(master);
            ngx.signal(libc::SIGHUP);
            reloads += 1;
            println!("soak: {now:.1?}: reload {reloads} (old workers {before:?})");
            old_workers.extend(before.into_iter().map(|p| (p, Instant::now())));
        }
        // Old workers must exit once their tunnels are drained.
        let live = children(master);
        old_workers.retain(|(p, at)| {
            if !live.contains(p) {
                drain_exit_ms.push(at.elapsed().as_millis() as u64);
                return false;
            }
            if at.elapsed() > Duration::from_secs(DRAIN_SECS + CLOSE_TIMEOUT_SECS + 20) {
                sh.fail(format!(
                    "old worker {p} still runs {:?} after the reload: a tunnel does not end",
                    at.elapsed()
                ));
                return false;
            }
            true
        });
        if now >= next_report {
            next_report += Duration::from_secs(10);
            index.update(&main_log);
            let s = &sh.stats;
            println!(
                "soak: {:>5.0?}: tunnels {} msgs {} echoes {} kills {} stalls {} \
                 records {} worker RSS {}",
                now,
                s.tunnels_opened.load(Relaxed),
                s.msgs_sent.load(Relaxed),
                s.echoes_ok.load(Relaxed),
                s.kills.load(Relaxed),
                s.stalls.load(Relaxed),
                index.records(),
                mib(rss)
            );
        }
    }

    // The end: clients finish their message and close; every tunnel must end.
    println!("soak: stopping the clients");
    sh.stop.store(true, Relaxed);
    let t_stop = Instant::now();
    let mut stuck = 0;
    for c in clients {
        let left = Duration::from_secs(90).saturating_sub(t_stop.elapsed());
        if tokio::time::timeout(left, c).await.is_err() {
            stuck += 1;
        }
    }
    if stuck > 0 {
        sh.fail(format!(
            "{stuck} clients did not finish within 90 s of the stop"
        ));
    }
    // Old workers still draining must be gone too.
    let deadline = Instant::now() + Duration::from_secs(DRAIN_SECS + CLOSE_TIMEOUT_SECS + 20);
    while !old_workers.is_empty() && Instant::now() < deadline {
        let live = children(master);
        old_workers.retain(|(p, at)| {
            if live.contains(p) {
                return true;
            }
            drain_exit_ms.push(at.elapsed().as_millis() as u64);
            false
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (p, _) in &old_workers {
        sh.fail(format!("old worker {p} never exited"));
    }

    // Every open record in the main log must get its close record.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        index.update(&main_log);
        let open = index
            .opens
            .values()
            .filter(|k| !index.closes.contains_key(*k))
            .count();
        if open == 0 {
            break;
        }
        if Instant::now() > deadline {
            let some: Vec<_> = index
                .opens
                .iter()
                .filter(|(_, k)| !index.closes.contains_key(*k))
                .take(10)
                .map(|(u, _)| u.clone())
                .collect();
            sh.fail(format!(
                "{open} tunnels have an open record and no close record 30 s after the \
                 clients finished: {some:?}"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (end_rss, end_workers) = workers_rss(master);
    let end_master = rss_kib(master).unwrap_or(0);
    let soak_secs = t_start.elapsed().as_secs_f64();

    // Whole records, and lines that are not (a short write on the full disk cuts one).
    let full_text = std::fs::read(&full_log).unwrap_or_default();
    let full_lines = full_text
        .split(|c| *c == b'\n')
        .filter(|l| serde_json::from_slice::<Value>(l).is_ok())
        .count();
    let full_torn = full_text
        .split(|c| *c == b'\n')
        .filter(|l| !l.is_empty() && serde_json::from_slice::<Value>(l).is_err())
        .count();
    let full_bytes = std::fs::metadata(&full_log).map(|m| m.len()).unwrap_or(0);
    if !ngx.quit(Duration::from_secs(30)) {
        sh.fail("nginx did not exit within 30 s of QUIT".into());
    }
    // Keep the full disk's log for inspection; the tmpfs goes away.
    let _ = std::fs::copy(&full_log, prefix.join("logs/full-disk-ws.log"));
    disk.unmount();
    index.update(&main_log);

    let ok = report(
        &args,
        &sh,
        &ngx,
        &index,
        Report {
            soak_secs,
            reloads,
            drain_exit_ms,
            base_rss,
            base_workers,
            peak_rss,
            end_rss,
            end_workers,
            base_master,
            end_master,
            full_lines,
            full_torn,
            full_bytes,
            disk_mounted: disk.mounted || full_bytes > 0,
        },
    );
    if !ok || args.prefix.is_some() {
        if let Some(t) = _tmp {
            let kept = t.keep();
            println!("soak: logs kept in {}", kept.display());
        } else {
            println!("soak: logs in {}", prefix.display());
        }
    }
    Ok(ok)
}

struct Report {
    soak_secs: f64,
    reloads: u32,
    drain_exit_ms: Vec<u64>,
    base_rss: u64,
    base_workers: usize,
    peak_rss: u64,
    end_rss: u64,
    end_workers: usize,
    base_master: u64,
    end_master: u64,
    full_lines: usize,
    full_torn: usize,
    full_bytes: u64,
    disk_mounted: bool,
}

/// The per-tunnel and global checks, and the summary. True when everything passed.
fn report(args: &Args, sh: &Shared, ngx: &Nginx, index: &LogIndex, rep: Report) -> bool {
    let tunnels = sh.tunnels.lock().unwrap();
    let server = sh.server.lock().unwrap();
    let s = &sh.stats;

    // Per tunnel: open -> close record, counts against the peers'.
    let mut exact = 0u64;
    let mut bounded = 0u64;
    let mut bounded_exact = 0u64;
    let mut bytes_checked = 0u64;
    let mut table = String::from(
        "uri\tkind\tclient_end\tclient_sent\tclient_received\tupstream_received\t\
         upstream_sent\tend\tclosed_by\tclient.messages\tupstream.messages\tclient.bytes\t\
         upstream.bytes\n",
    );
    let mut mismatches = Vec::new();
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    let mut client_codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut full_tunnels = 0u64;
    for t in tunnels.iter() {
        let code = match &t.end {
            ClientEnd::ClientClose(c) | ClientEnd::PeerClose(c) => c.to_string(),
            ClientEnd::Aborted(_) => "none (no close frame)".into(),
            ClientEnd::Stuck => "none (stuck)".into(),
        };
        *client_codes.entry(code).or_default() += 1;
        if t.kind == Kind::Full {
            full_tunnels += 1;
        }
        if matches!(t.end, ClientEnd::Aborted(_)) && t.kind != Kind::Kill {
            let why = match &t.end {
                ClientEnd::Aborted(w) => w.as_str(),
                _ => "",
            };
            mismatches.push(format!("{}: ended without a close frame: {why}", t.uri));
        }
        if t.kind == Kind::Full {
            continue; // its records are on the full disk
        }
        let Some(key) = index.opens.get(&t.uri) else {
            mismatches.push(format!("{}: no open record", t.uri));
            continue;
        };
        let Some(rec) = index.closes.get(key) else {
            mismatches.push(format!("{}: no close record", t.uri));
            continue;
        };
        let end = rec["end"].as_str().unwrap_or("?");
        *ends.entry(end.to_string()).or_default() += 1;
        let by = rec["closed_by"].as_str().unwrap_or("?");
        let cm = rec["client"]["messages"].as_u64().unwrap_or(u64::MAX);
        let um = rec["upstream"]["messages"].as_u64().unwrap_or(u64::MAX);
        let srv = server.get(&t.uri);
        let (s_recv, s_sent) = srv.map(|x| (x.recv, x.sent)).unwrap_or((0, 0));
        let cb = rec["client"]["bytes"].as_u64().unwrap_or(u64::MAX);
        let ub = rec["upstream"]["bytes"].as_u64().unwrap_or(u64::MAX);
        // Payload bytes each side wrote, as its peer and the client counted them: data, pings,
        // the pongs the other side received, and the Close (code 1000 + "done", echoed).
        let (want_cb, want_ub) = srv
            .map(|x| {
                (
                    t.data_bytes + t.ping_bytes + x.pong_bytes_in + 6,
                    x.data_bytes + x.ping_bytes + t.pong_bytes_in + 6,
                )
            })
            .unwrap_or((0, 0));
        let what = format!(
            "{}: record end={end} closed_by={by} client.messages={cm} upstream.messages={um} \
             client.bytes={cb} upstream.bytes={ub}; client sent {} received {}, upstream \
             received {s_recv} sent {s_sent}, client end {:?}",
            t.uri, t.sent, t.recv, t.end
        );
        table.push_str(&format!(
            "{}\t{:?}\t{:?}\t{}\t{}\t{s_recv}\t{s_sent}\t{end}\t{by}\t{cm}\t{um}\t{cb}\t{ub}\n",
            t.uri, t.kind, t.end, t.sent, t.recv
        ));
        match (&t.end, t.kind) {
            (ClientEnd::ClientClose(1000), _) => {
                exact += 1;
                if end != "normal"
                    || by != "client"
                    || cm != t.sent
                    || um != s_sent
                    || s_sent != t.recv
                    || s_recv != t.sent
                {
                    mismatches.push(what);
                } else if t.kind == Kind::Echo {
                    bytes_checked += 1;
                    if cb != want_cb || ub != want_ub {
                        mismatches.push(format!(
                            "{what}: payload bytes differ, expected client.bytes={want_cb} \
                             upstream.bytes={want_ub}"
                        ));
                    }
                }
            }
            (_, Kind::Kill) if end == "upstream_abort" => {
                exact += 1;
                if by != "upstream" || cm != t.sent || um != s_sent || um != t.recv {
                    mismatches.push(what);
                }
            }
            (_, Kind::Stall) if end == "idle_timeout" => {
                exact += 1;
                if by != "proxy"
                    || t.end != ClientEnd::PeerClose(1001)
                    || cm != t.sent
                    || um != t.recv
                    || um != s_sent
                {
                    mismatches.push(what);
                }
            }
            _ => {
                // Ended by the proxy (drain): a message may have been in flight, so bounds.
                bounded += 1;
                if cm == t.sent && um == s_sent {
                    bounded_exact += 1;
                }
                let expected_end = end == "drain"
                    || (end == "normal" && matches!(t.end, ClientEnd::ClientClose(_)));
                if !expected_end
                    || cm > t.sent
                    || cm < s_recv
                    || um > s_sent
                    || um < t.recv
                    || t.sent > t.recv + 1
                {
                    mismatches.push(what);
                }
            }
        }
    }
    // Every tunnel of the main log, for a closer look after a failure.
    let _ = std::fs::write(ngx.prefix.join("logs/soak-tunnels.tsv"), table);
    for m in mismatches.iter().take(20) {
        eprintln!("soak: FAIL: {m}");
    }

    // The error log.
    let err = ngx.read("logs/error.log");
    let crashes = err.matches("exited on signal").count();
    let panics = err.matches("panicked").count();
    let mut dropped_by_pid: BTreeMap<String, u64> = BTreeMap::new();
    let mut drop_alerts = 0;
    for l in err.lines().filter(|l| l.contains("log records dropped")) {
        drop_alerts += 1;
        let pid = l
            .split_whitespace()
            .nth(3)
            .and_then(|w| w.split('#').next())
            .unwrap_or("?")
            .to_string();
        let n = l
            .split(", ")
            .last()
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let e = dropped_by_pid.entry(pid).or_default();
        *e = (*e).max(n);
    }
    let dropped: u64 = dropped_by_pid.values().sum();
    let level = |l: &str| err.lines().filter(|x| x.contains(l)).count();
    let stalled_msgs = err
        .matches("closing connections after ws_close_timeout")
        .count();

    // Global checks.
    let mut fails: Vec<String> = sh.failures.lock().unwrap().clone();
    if !mismatches.is_empty() {
        fails.push(format!(
            "{} tunnels with wrong records or ends",
            mismatches.len()
        ));
    }
    if crashes > 0 {
        fails.push(format!("{crashes} \"exited on signal\" in the error log"));
    }
    if panics > 0 {
        fails.push(format!("{panics} panics in the error log"));
    }
    if s.echoes_bad.load(Relaxed) + s.upstream_bad.load(Relaxed) > 0 {
        fails.push("messages that differ from what was sent".into());
    }
    if drop_alerts == 0 && full_tunnels > 0 {
        fails.push("the error log never says \"log records dropped\"".into());
    }
    if index.bad_lines > 0 {
        fails.push(format!(
            "{} unparsable lines in logs/ws.log",
            index.bad_lines
        ));
    }
    if rep.reloads != args.reloads {
        fails.push(format!("{} reloads of {}", rep.reloads, args.reloads));
    }
    let rss_limit = (rep.base_rss as f64 * RSS_FACTOR) as u64 + RSS_SLACK_KIB;
    if rep.end_rss > rss_limit {
        fails.push(format!(
            "worker RSS {} at the end, above the limit {} (baseline {})",
            mib(rep.end_rss),
            mib(rss_limit),
            mib(rep.base_rss)
        ));
    }
    let kill_tunnels = tunnels.iter().filter(|t| t.kind == Kind::Kill).count();
    let stall_tunnels = tunnels.iter().filter(|t| t.kind == Kind::Stall).count();
    let opened = s.tunnels_opened.load(Relaxed);
    let main_opens = index.by_event.get("open").copied().unwrap_or(0);
    let main_closes = index.by_event.get("close").copied().unwrap_or(0);
    let cuts = sh.stall_cut_ms.lock().unwrap().clone();
    let (cut_min, cut_max) = (
        cuts.iter().min().copied().unwrap_or(0),
        cuts.iter().max().copied().unwrap_or(0),
    );
    let drain_max = rep.drain_exit_ms.iter().max().copied().unwrap_or(0);
    let msgs = s.msgs_sent.load(Relaxed);
    let echoes = s.echoes_ok.load(Relaxed);
    let lost = s.echoes_bad.load(Relaxed) + s.upstream_bad.load(Relaxed);

    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    println!("\n=== nginx-ws soak summary ===");
    println!(
        "run:          {:.0} s soak + warm-up, {} concurrent tunnels, pause 0..{} ms, seed {}",
        rep.soak_secs, args.tunnels, args.pause_ms, args.seed
    );
    println!(
        "tunnels:      {opened} opened ({} echo, {full_tunnels} full-disk log, {kill_tunnels} \
         upstream-kill, {stall_tunnels} stalled), {} finished by the clients, {} connect errors",
        tunnels.len() - kill_tunnels - stall_tunnels - full_tunnels as usize,
        tunnels.len(),
        s.connect_errors.load(Relaxed)
    );
    println!("main log:     {main_opens} open / {main_closes} close records; ends {ends:?}");
    println!(
        "messages:     {msgs} sent by clients ({}), {echoes} echoes received and byte-identical \
         ({}), {} checked byte-identical by the upstream, {} echoed by the upstream",
        gib(s.bytes_sent.load(Relaxed)),
        gib(s.echo_bytes.load(Relaxed)),
        s.upstream_ok.load(Relaxed),
        s.echoes_sent.load(Relaxed)
    );
    println!(
        "frames:       {} data frames sent by clients, {} client pings ({} pongs matched, {} \
         wrong), {} upstream pings ({} pongs matched, {} wrong)",
        s.frames_sent.load(Relaxed),
        s.pings_sent.load(Relaxed),
        s.pongs_ok.load(Relaxed),
        s.pongs_bad.load(Relaxed),
        s.server_pings.load(Relaxed),
        s.server_pongs_ok.load(Relaxed),
        s.server_pongs_bad.load(Relaxed)
    );
    println!(
        "lost:         {lost} messages differing, {} messages in flight when the proxy closed \
         (their tunnel ended: not lost)",
        s.in_flight_at_close.load(Relaxed)
    );
    println!(
        "per tunnel:   {exact} checked exactly (client close 1000, upstream kill, stall; \
         payload bytes too for {bytes_checked}), {bounded} within bounds (drain; {bounded_exact} \
         of them exact), {} mismatches",
        mismatches.len()
    );
    println!(
        "reloads:      {} (old workers exited {} of them, the slowest after {} ms)",
        rep.reloads,
        rep.drain_exit_ms.len(),
        drain_max
    );
    println!(
        "faults:       {} upstream kills mid-frame, {} stalled clients (cut after {}..{} ms, \
         {stalled_msgs} \"closing connections after ws_close_timeout\" in the error log)",
        s.kills.load(Relaxed),
        s.stalls.load(Relaxed),
        cut_min,
        cut_max
    );
    println!(
        "log records:  {} written to logs/ws.log {:?}; full disk ({}): {} records and {} torn \
         line(s) in {} bytes, at least {dropped} dropped ({drop_alerts} alerts)",
        index.records(),
        index.by_event,
        if rep.disk_mounted {
            "tmpfs size=512k"
        } else {
            "/dev/full"
        },
        rep.full_lines,
        rep.full_torn,
        rep.full_bytes
    );
    println!("close codes:  seen by clients {client_codes:?}");
    println!(
        "after a proxy Close: client connections ended {:?}",
        sh.after_close.lock().unwrap()
    );
    println!(
        "error log:    {} [alert], {} [crit], {} [error], {crashes} exited on signal, {panics} \
         panics",
        level("[alert]"),
        level("[crit]"),
        level("[error]")
    );
    println!(
        "worker RSS:   baseline {} ({} workers), peak {}, end {} ({} workers), limit {}; \
         master {} -> {}",
        mib(rep.base_rss),
        rep.base_workers,
        mib(rep.peak_rss),
        mib(rep.end_rss),
        rep.end_workers,
        mib(rss_limit),
        mib(rep.base_master),
        mib(rep.end_master)
    );
    if fails.is_empty() {
        println!("result:       PASS");
        true
    } else {
        println!("result:       FAIL");
        for f in fails.iter().take(30) {
            println!("  - {f}");
        }
        false
    }
}
