//! The benchmark load generator that `scripts/bench` (`cargo xtask bench`) runs (see
//! docs/benchmarks.md).
//!
//! Starts every configuration itself on 127.0.0.1 — the echo upstream directly, stock nginx,
//! nginx with the module loaded but no `ws_*` directive, the module tracking with `close`
//! records, with `frame` records, with `frame` records and `ws_log_payload 64`, and HAProxy —
//! and measures them interleaved: for each workload, each round runs every configuration of
//! that workload once. Besides the plain echoes and the stream: compressed echoes
//! (permessage-deflate, done by hand in examples/common/rawws.rs) with `message` records,
//! capture off and with `ws_log_payload 256`; echoes under a `ws_limit` that never triggers
//! (against close records alone) and under one that shapes. The upstream is a WebSocket
//! echo/sink in a process of its own, the same for all configurations. Figures: messages/s,
//! MB/s, round-trip latency, CPU time of the one nginx worker (or the HAProxy process) per
//! 10^5 messages from /proc, worker RSS per idle tunnel (plain and compressed), and each
//! configuration's ratio to stock nginx (or to the configuration it is judged against) in the
//! same round. Writes results.json, results.md, ratios.dat and (with gnuplot) ratios.png into
//! `--out`.
//!
//!     ws-bench --nginx PATH --module PATH --out DIR [options]

#[path = "common/proc.rs"]
mod proc;
#[path = "common/rawws.rs"]
mod rawws;
use proc::{children, rss_kib};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const USAGE: &str = "usage: ws-bench --nginx PATH --module PATH --out DIR [options]

  --nginx PATH        nginx binary (the vendored build)
  --module PATH       libnginx_ws.so
  --haproxy PATH      HAProxy binary (default: haproxy on PATH; skipped when missing)
  --out DIR           results folder (created)
  --work DIR          nginx/HAProxy prefixes (default: DIR/run)
  --quick             the under-a-minute run: 2 rounds, short measurements, no 1000-connection
                      workloads, 1000 idle tunnels
  --rounds N          rounds per workload (default 5)
  --duration SECS     measured time per configuration and round (default 0.6)
  --no-pin            do not pin processes to CPUs. By default (with 2 CPUs or more) the
                      proxy runs on CPU 1, the generator and the upstream on CPU 0: the
                      proxy's CPU per message then moves by a few per cent from run to run
                      instead of ±7 (measured here); worse when other work runs, since the
                      pinned processes cannot move away from it
  --idle N            idle tunnels for the memory figures (default 10000; 0 skips)
  --only LIST         comma-separated workload id prefixes to run (echo, stream, deflate,
                      limit, shaped, idle (plain and compressed), idle-deflate, echo-64B, ...)
  --criterion DIR     criterion's output folder (target/criterion): parser figures for the
                      report
  --instructions FILE a table of scripts/bench-instructions (bench-results/instructions/
                      <SIZE>B.md), judged against the instruction targets; repeatable";

// --- Arguments --------------------------------------------------------------------------------

struct Args {
    nginx: PathBuf,
    module: PathBuf,
    haproxy: Option<PathBuf>,
    out: PathBuf,
    work: Option<PathBuf>,
    quick: bool,
    pin: bool,
    rounds: usize,
    duration: Duration,
    warmup: Duration,
    sizes: Vec<usize>,
    conns: Vec<usize>,
    stream_size: usize,
    idle: usize,
    only: Vec<String>,
    criterion: Option<PathBuf>,
    /// Tables written by scripts/bench-instructions.
    instructions: Vec<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut nginx = None;
    let mut module = None;
    let mut haproxy = None;
    let mut out = None;
    let mut work = None;
    let mut quick = false;
    let mut pin = true;
    let mut rounds = None;
    let mut duration = None;
    let mut idle = None;
    let mut only = Vec::new();
    let mut criterion = None;
    let mut instructions = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--nginx" => nginx = Some(PathBuf::from(value()?)),
            "--module" => module = Some(PathBuf::from(value()?)),
            "--haproxy" => haproxy = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--work" => work = Some(PathBuf::from(value()?)),
            "--criterion" => criterion = Some(PathBuf::from(value()?)),
            "--instructions" => instructions.push(PathBuf::from(value()?)),
            "--quick" => quick = true,
            "--pin" => pin = true,
            "--no-pin" => pin = false,
            "--rounds" => {
                let v = value()?;
                rounds = Some(v.parse().map_err(|e| format!("--rounds {v}: {e}"))?);
            }
            "--duration" => {
                let v = value()?;
                let s: f64 = v.parse().map_err(|e| format!("--duration {v}: {e}"))?;
                duration = Some(
                    Duration::try_from_secs_f64(s).map_err(|e| format!("--duration {v}: {e}"))?,
                );
            }
            "--idle" => {
                let v = value()?;
                idle = Some(v.parse().map_err(|e| format!("--idle {v}: {e}"))?);
            }
            "--only" => only.extend(value()?.split(',').map(str::to_string)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    let haproxy = haproxy.or_else(|| which("haproxy"));
    let rounds = rounds.unwrap_or(if quick { 2 } else { 5 }).max(1);
    let duration = duration.unwrap_or(Duration::from_millis(if quick { 250 } else { 600 }));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(Args {
        nginx: nginx.ok_or("--nginx is required")?,
        module: module.ok_or("--module is required")?,
        haproxy,
        out: out.ok_or("--out is required")?,
        work,
        quick,
        pin: pin && cpus >= 2,
        rounds,
        duration,
        warmup: (duration / 3).min(Duration::from_millis(300)),
        sizes: vec![64, 1024, 64 * 1024],
        conns: if quick {
            vec![1, 64]
        } else {
            vec![1, 64, 1000]
        },
        stream_size: 64 * 1024,
        idle: idle.unwrap_or(if quick { 1000 } else { 10_000 }),
        only,
        criterion,
        instructions,
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

// --- Configurations ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Direct,
    Stock,
    Loaded,
    Close,
    Frame,
    FrameUnbuffered,
    Payload,
    Haproxy,
    /// Message records without payload: compressed tunnels need no inflate.
    Message,
    /// Message records with ws_log_payload 256: compressed tunnels inflate both directions.
    MessagePayload,
    /// Close records and a ws_limit that never triggers.
    Limit,
    /// Close records and a ws_limit that shapes (SHAPED_RATE for all tunnels together).
    Shaped,
    /// Stock nginx with an access_log whose format has as many indexed variables as close
    /// records' (idle memory only): nginx keeps a value slot for every indexed variable in
    /// each request's pool, so this is what close records' tunnels compare with like for like.
    StockLogged,
}

/// The configurations of the echo and stream workloads (and of the table columns).
const TARGETS: [Target; 8] = [
    Target::Direct,
    Target::Stock,
    Target::Loaded,
    Target::Close,
    Target::Frame,
    Target::FrameUnbuffered,
    Target::Payload,
    Target::Haproxy,
];

impl Target {
    fn id(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Stock => "stock",
            Target::Loaded => "module-off",
            Target::Close => "close",
            Target::Frame => "frame",
            Target::FrameUnbuffered => "frame-unbuffered",
            Target::Payload => "frame-payload",
            Target::Haproxy => "haproxy",
            Target::Message => "message",
            Target::MessagePayload => "message-payload",
            Target::Limit => "limit",
            Target::Shaped => "limit-shaping",
            Target::StockLogged => "stock-log",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Stock => "stock nginx",
            Target::Loaded => "module, no directive",
            Target::Close => "close records",
            Target::Frame => "frame records",
            Target::FrameUnbuffered => "frame records, unbuffered",
            Target::Payload => "frame + payload 64",
            Target::Haproxy => "HAProxy",
            Target::Message => "message records",
            Target::MessagePayload => "message + payload 256",
            Target::Limit => "close + ws_limit, never triggers",
            Target::Shaped => "close + ws_limit, shaping",
            Target::StockLogged => "stock nginx + access_log",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Target::Direct => "client to the echo upstream, no proxy (the physical limit)",
            Target::Stock => "nginx without load_module",
            Target::Loaded => "load_module, no ws_* directive",
            Target::Close => {
                "ws_log logs/ws.log buffer=64k flush=1s; ws_log_events close; an access_log \
                 line per tunnel with every $ws_* counter variable"
            }
            Target::Frame => {
                "ws_log logs/ws.log buffer=64k flush=1s; ws_log_events open frame close"
            }
            Target::FrameUnbuffered => {
                "ws_log logs/ws.log; ws_log_events open frame close (each record written \
                 at once, as the README's first examples do)"
            }
            Target::Payload => "as frame, plus ws_log_payload 64",
            Target::Haproxy => "HAProxy, mode http, nbthread 1, timeout tunnel 1h",
            Target::Message => {
                "ws_log logs/ws.log buffer=64k flush=1s; ws_log_events open message close \
                 (compressed messages are only flagged: no inflate)"
            }
            Target::MessagePayload => {
                "as message, plus ws_log_payload 256 (compressed messages are inflated, both \
                 directions)"
            }
            Target::Limit => {
                "as close, plus ws_limit_zone $binary_remote_addr zone=bench:1m \
                 rate=1000000r/s; ws_limit zone=bench burst=1000000 (never triggers)"
            }
            Target::Shaped => {
                "as close, plus ws_limit_zone $binary_remote_addr zone=shape:1m rate=1000r/s; \
                 ws_limit zone=shape (every tunnel of the generator shares the one bucket; \
                 messages over the rate are delayed)"
            }
            Target::StockLogged => {
                "nginx without load_module, with an access_log line per tunnel whose format has \
                 the same number of indexed variables as close records' (10 upstream and \
                 connection variables in place of the 10 $ws_* counters)"
            }
        }
    }

    fn is_nginx(self) -> bool {
        !matches!(self, Target::Direct | Target::Haproxy)
    }

    /// The module directives of the proxied location.
    fn ws_directives(self) -> &'static str {
        match self {
            Target::Close => {
                "      ws_log logs/ws.log buffer=64k flush=1s;\n      ws_log_events close;\n      \
                 access_log logs/access.log ws;\n"
            }
            Target::Frame => {
                "      ws_log logs/ws.log buffer=64k flush=1s;\n      \
                 ws_log_events open frame close;\n"
            }
            Target::FrameUnbuffered => {
                "      ws_log logs/ws.log;\n      ws_log_events open frame close;\n"
            }
            Target::Payload => {
                "      ws_log logs/ws.log buffer=64k flush=1s;\n      \
                 ws_log_events open frame close;\n      ws_log_payload 64;\n"
            }
            Target::Message => {
                "      ws_log logs/ws.log buffer=64k flush=1s;\n      \
                 ws_log_events open message close;\n"
            }
            Target::MessagePayload => {
                "      ws_log logs/ws.log buffer=64k flush=1s;\n      \
                 ws_log_events open message close;\n      ws_log_payload 256;\n"
            }
            Target::Limit => {
                "      ws_log logs/ws.log buffer=64k flush=1s;\n      ws_log_events close;\n      \
                 access_log logs/access.log ws;\n      ws_limit zone=bench burst=1000000;\n"
            }
            Target::Shaped => {
                "      ws_log logs/ws.log buffer=64k flush=1s;\n      ws_log_events close;\n      \
                 access_log logs/access.log ws;\n      ws_limit zone=shape;\n"
            }
            Target::StockLogged => "      access_log logs/access.log stock;\n",
            _ => "",
        }
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(l.local_addr().map_err(|e| format!("bind: {e}"))?.port())
}

/// The upstream's two ports for one configuration: the tokio-tungstenite echo and sink, and
/// the raw echo that accepts permessage-deflate (examples/common/rawws.rs).
#[derive(Debug, Clone, Copy)]
struct UpPorts {
    echo: u16,
    raw: u16,
}

/// The messages per second of the shaping configuration, for all its tunnels together.
const SHAPED_RATE: u32 = 1000;

fn nginx_conf(args: &Args, limit: u64, t: Target, port: u16, up: UpPorts) -> String {
    let load = if matches!(t, Target::Stock | Target::StockLogged) {
        String::new()
    } else {
        format!("load_module {};\n", args.module.display())
    };
    let location = |path: &str, to: u16| {
        format!(
            "    location {path} {{
      proxy_pass http://127.0.0.1:{to};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection \"upgrade\";
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
{ws}    }}
",
            ws = t.ws_directives()
        )
    };
    let mut fmt = String::new();
    if matches!(t, Target::Close | Target::Limit | Target::Shaped) {
        fmt.push_str(
            "  log_format ws '$remote_addr $status $ws_client_frames $ws_upstream_frames \
             $ws_client_messages $ws_upstream_messages $ws_client_bytes $ws_upstream_bytes \
             $ws_close_code $ws_closed_by $ws_end $ws_duration';\n",
        );
    }
    if t == Target::StockLogged {
        // $status is one of the log module's own fields, not an indexed variable; the ten
        // others stand in for the ten $ws_* counters of the ws format above.
        fmt.push_str(
            "  log_format stock '$remote_addr $status $upstream_addr $upstream_status \
             $upstream_response_time $upstream_connect_time $upstream_header_time \
             $upstream_bytes_received $upstream_bytes_sent $request_id $connection \
             $connection_requests';\n",
        );
    }
    match t {
        Target::Limit => {
            fmt.push_str("  ws_limit_zone $binary_remote_addr zone=bench:1m rate=1000000r/s;\n")
        }
        Target::Shaped => fmt.push_str(&format!(
            "  ws_limit_zone $binary_remote_addr zone=shape:1m rate={SHAPED_RATE}r/s;\n"
        )),
        _ => {}
    }
    format!(
        "{load}daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {limit};
error_log logs/error.log warn;
pid logs/nginx.pid;
events {{ worker_connections {conns}; }}
http {{
  access_log off;
{fmt}  server {{
    listen 127.0.0.1:{port} backlog=4096;
{main}{deflate}  }}
}}
",
        main = location("/", up.echo),
        deflate = location("/deflate", up.raw),
        conns = limit.saturating_sub(100),
    )
}

fn haproxy_conf(limit: u64, port: u16, echo: u16) -> String {
    format!(
        "global
  nbthread 1
  maxconn {maxconn}
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  server echo 127.0.0.1:{echo}
",
        maxconn = limit.saturating_sub(100) / 2,
    )
}

/// A running proxy (nginx master with one worker, or HAProxy).
struct Proxy {
    child: Child,
    prefix: PathBuf,
    port: u16,
    /// The process whose CPU and memory are measured: the nginx worker or HAProxy itself.
    pid: i32,
}

impl Proxy {
    fn start(
        args: &Args,
        limit: u64,
        work: &Path,
        t: Target,
        up: UpPorts,
    ) -> Result<Proxy, String> {
        let port = free_port()?;
        let prefix = work.join(t.id());
        let _ = std::fs::remove_dir_all(&prefix);
        std::fs::create_dir_all(prefix.join("logs")).map_err(|e| format!("{e}"))?;
        let stderr = std::fs::File::create(prefix.join("logs/stderr.log"))
            .map_err(|e| format!("stderr.log: {e}"))?;
        let mut cmd = if t == Target::Haproxy {
            let conf = prefix.join("haproxy.cfg");
            std::fs::write(&conf, haproxy_conf(limit, port, up.echo))
                .map_err(|e| format!("{e}"))?;
            let bin = args.haproxy.as_ref().ok_or("no haproxy")?;
            let mut c = Command::new(bin);
            c.arg("-db").arg("-f").arg(conf);
            c
        } else {
            let conf = prefix.join("nginx.conf");
            let text = nginx_conf(args, limit, t, port, up);
            std::fs::write(&conf, text).map_err(|e| format!("{e}"))?;
            let mut c = Command::new(&args.nginx);
            c.arg("-p").arg(&prefix).arg("-c").arg(conf);
            c
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", t.id()))?;
        let mut p = Proxy {
            pid: child.id() as i32,
            child,
            prefix,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                return Err(format!(
                    "{} exited ({st}):\n{}{}",
                    t.id(),
                    p.read("logs/stderr.log"),
                    p.read("logs/error.log")
                ));
            }
            let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if up && t.is_nginx() {
                if let [w] = children(p.child.id() as i32)[..] {
                    p.pid = w;
                }
            }
            if up && (p.pid != p.child.id() as i32 || !t.is_nginx()) {
                if args.pin && !pin(p.pid, PROXY_CPU) {
                    return Err(format!("cannot pin {} to CPU {PROXY_CPU}", t.id()));
                }
                return Ok(p);
            }
            if Instant::now() > deadline {
                return Err(format!("{} does not listen on 127.0.0.1:{port}", t.id()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.prefix.join(rel)).unwrap_or_default()
    }

    /// Empties the frame log between runs (nginx appends), so the disk does not fill up.
    fn truncate_log(&self) {
        if let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .open(self.prefix.join("logs/ws.log"))
        {
            let _ = f.set_len(0);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// --- /proc ------------------------------------------------------------------------------------

/// CPU time of all threads of `pid` in nanoseconds: the run time in /proc/PID/task/*/schedstat
/// (nanosecond resolution), or utime+stime from /proc/PID/stat (clock ticks) without it.
fn cpu_ns(pid: i32) -> Option<u64> {
    let mut total = 0u64;
    let mut any = false;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            let s = std::fs::read_to_string(e.path().join("schedstat")).unwrap_or_default();
            if let Some(ns) = s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
            {
                total += ns;
                any = true;
            }
        }
    }
    if any && total > 0 {
        return Some(total);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(f.iter().sum::<u64>() * 1_000_000_000 / hz)
}

/// The CPU the measured proxy process runs on; the generator and the upstream run on CPU 0.
const PROXY_CPU: usize = 1;

/// Pins every thread of `pid` (0: the calling thread) to `cpu`; false if the kernel refused.
fn pin(pid: i32, cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain data and all zeroes is the empty set; `cpu` is below
    // CPU_SETSIZE (the callers pass 0 and 1).
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    };
    let tids: Vec<i32> = if pid == 0 {
        vec![0]
    } else {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    !tids.is_empty()
        && tids.iter().all(|t| {
            // SAFETY: a valid cpu_set_t of the size given.
            let rc = unsafe {
                libc::sched_setaffinity(*t, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            rc == 0
        })
}

/// Raises the descriptor limit to `want` (root may raise the hard limit); returns the limit.
fn raise_nofile(want: u64) -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 1024;
        }
        let mut up = libc::rlimit {
            rlim_cur: want.max(l.rlim_cur),
            rlim_max: want.max(l.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &up) != 0 {
            up.rlim_cur = l.rlim_max;
            up.rlim_max = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &up);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
    }
    l.rlim_cur
}

// --- The upstream: an echo and sink in a child process ---------------------------------------
//
// The same binary with `--upstream N`: N listeners (one per configuration, so that one
// configuration's connections never wait for another's TIME_WAIT ports) of the
// tokio-tungstenite echo and sink, then N of the raw echo that accepts permessage-deflate,
// ports printed on one line of stdout; each `stats` line on stdin is answered with `open messages bytes`. A process
// of its own so that its descriptors do not count against the generator's limit, and its CPU
// is not the generator's.

#[derive(Default)]
struct Upstream {
    /// Open upstream connections (to wait for a proxy to finish tearing tunnels down).
    open: AtomicU64,
    sink_msgs: AtomicU64,
    sink_bytes: AtomicU64,
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: None,
        max_frame_size: None,
        ..WebSocketConfig::default()
    }
}

fn upstream_main(n: usize) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let up = Arc::new(Upstream::default());
    let mut ports = Vec::new();
    for i in 0..2 * n {
        let l = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .map_err(|e| format!("upstream bind: {e}"))?;
        ports.push(
            l.local_addr()
                .map_err(|e| format!("{e}"))?
                .port()
                .to_string(),
        );
        rt.spawn(upstream_listener(l, up.clone(), i >= n));
    }
    println!("{}", ports.join(" "));
    for line in std::io::stdin().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "stats" {
            println!(
                "{} {} {}",
                up.open.load(Relaxed),
                up.sink_msgs.load(Relaxed),
                up.sink_bytes.load(Relaxed)
            );
        }
    }
    // stdin closed: the generator is done (or gone).
    Ok(())
}

/// The upstream child process, seen from the generator.
struct UpstreamProc {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    ports: Vec<UpPorts>,
}

/// What the upstream counted: open connections, messages and bytes received on `/sink`.
#[derive(Debug, Clone, Copy, Default)]
struct UpStats {
    open: u64,
    msgs: u64,
    bytes: u64,
}

impl UpstreamProc {
    fn start(n: usize) -> Result<UpstreamProc, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut child = Command::new(exe)
            .arg("--upstream")
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the upstream: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("upstream pipes".into());
        };
        let mut u = UpstreamProc {
            child,
            stdin,
            stdout: std::io::BufReader::new(stdout),
            ports: Vec::new(),
        };
        let line = u.line()?;
        let ports: Vec<u16> = line
            .split_whitespace()
            .map(|p| p.parse().map_err(|e| format!("upstream port {p:?}: {e}")))
            .collect::<Result<_, String>>()?;
        if ports.len() != 2 * n {
            return Err(format!("upstream said {line:?}"));
        }
        u.ports = (0..n)
            .map(|i| UpPorts {
                echo: ports[i],
                raw: ports[n + i],
            })
            .collect();
        Ok(u)
    }

    fn line(&mut self) -> Result<String, String> {
        use std::io::BufRead;
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) | Err(_) => Err("the upstream process ended".into()),
            Ok(_) => Ok(line),
        }
    }

    fn stats(&mut self) -> Result<UpStats, String> {
        use std::io::Write;
        writeln!(self.stdin, "stats").map_err(|e| format!("upstream: {e}"))?;
        let line = self.line()?;
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        match v[..] {
            [open, msgs, bytes] => Ok(UpStats { open, msgs, bytes }),
            _ => Err(format!("upstream said {line:?}")),
        }
    }
}

/// Waits until no upstream connection is open (the proxy has torn the tunnels down).
async fn settle(up: &RefCell<UpstreamProc>, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while up.borrow_mut().stats()?.open > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

impl Drop for UpstreamProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn upstream_listener(l: TcpListener, up: Arc<Upstream>, raw: bool) {
    loop {
        match l.accept().await {
            Ok((tcp, _)) => {
                let up = up.clone();
                tokio::spawn(async move {
                    up.open.fetch_add(1, Relaxed);
                    if raw {
                        let _ = upstream_raw(tcp).await;
                    } else {
                        upstream_serve(tcp, &up).await;
                    }
                    up.open.fetch_sub(1, Relaxed);
                });
            }
            Err(e) => {
                eprintln!("ws-bench: upstream accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// `/sink` counts and drops what arrives; every other path echoes each message back.
async fn upstream_serve(tcp: TcpStream, up: &Upstream) {
    let _ = tcp.set_nodelay(true);
    let mut sink = false;
    // The callback's Result type is tungstenite's (its error is an HTTP response).
    #[allow(clippy::result_large_err)]
    let cb = |req: &Request, resp: Response| {
        sink = req.uri().path() == "/sink";
        Ok(resp)
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(tcp, cb, Some(ws_config())).await
    else {
        return;
    };
    while let Some(Ok(m)) = ws.next().await {
        if !m.is_text() && !m.is_binary() {
            continue;
        }
        if sink {
            up.sink_msgs.fetch_add(1, Relaxed);
            up.sink_bytes.fetch_add(m.len() as u64, Relaxed);
        } else if ws.send(m).await.is_err() {
            return;
        }
    }
}

/// The raw echo: permessage-deflate accepted, every frame returned as it came.
async fn upstream_raw(mut tcp: TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let (_, rest) = rawws::accept(&mut tcp).await?;
    rawws::echo(tcp, rest).await
}

// --- Clients ----------------------------------------------------------------------------------

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(url: &str) -> Result<Ws, String> {
    let c = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true);
    match tokio::time::timeout(Duration::from_secs(20), c).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(format!("connect {url}: {e}")),
        Err(_) => Err(format!("connect {url}: timed out")),
    }
}

async fn connect_all(url: &str, n: usize) -> Result<Vec<Ws>, String> {
    futures_util::stream::iter(0..n)
        .map(|_| connect(url))
        .buffer_unordered(200)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// One round trip: send `msg`, wait for the echo.
async fn round_trip(ws: &mut Ws, msg: &Message) -> Result<(), String> {
    ws.send(msg.clone())
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(_) | Message::Binary(_))) => return Ok(()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("receive: {e}")),
            None => return Err("connection closed".into()),
        }
    }
}

#[derive(Default)]
struct Window {
    measuring: AtomicBool,
    stop: AtomicBool,
}

/// Round trips until stopped; counts and times those that complete while measuring.
async fn echo_client(mut ws: Ws, msg: Message, w: Arc<Window>) -> Result<Vec<u32>, String> {
    let mut lat = Vec::new();
    while !w.stop.load(Relaxed) {
        let t0 = Instant::now();
        round_trip(&mut ws, &msg).await?;
        if w.measuring.load(Relaxed) {
            lat.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
    }
    Ok(lat)
}

/// Compressed round trips until stopped, like `echo_client`.
async fn deflate_client(
    mut c: rawws::DeflateClient,
    size: usize,
    w: Arc<Window>,
) -> Result<Vec<u32>, String> {
    let mut lat = Vec::new();
    while !w.stop.load(Relaxed) {
        let t0 = Instant::now();
        c.round_trip(size).await?;
        if w.measuring.load(Relaxed) {
            lat.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
    }
    Ok(lat)
}

/// `n` compressed tunnels to 127.0.0.1:port.
async fn deflate_connect_all(port: u16, n: usize) -> Result<Vec<rawws::DeflateClient>, String> {
    let addr = format!("127.0.0.1:{port}");
    futures_util::stream::iter(0..n)
        .map(|i| {
            let addr = &addr;
            async move {
                let c = rawws::DeflateClient::connect(addr, "/deflate", i as u64);
                match tokio::time::timeout(Duration::from_secs(20), c).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("connect {addr}: timed out")),
                }
            }
        })
        .buffer_unordered(200)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

async fn stream_client(mut ws: Ws, msg: Message, w: Arc<Window>) -> Result<Vec<u32>, String> {
    while !w.stop.load(Relaxed) {
        ws.send(msg.clone())
            .await
            .map_err(|e| format!("send: {e}"))?;
    }
    Ok(Vec::new())
}

// --- Measurements -----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Echo {
        size: usize,
        conns: usize,
    },
    Stream {
        size: usize,
        conns: usize,
    },
    /// Echoes of varying JSON-like text, compressed (permessage-deflate, context takeover).
    Deflate {
        size: usize,
        conns: usize,
    },
    /// Echoes under a ws_limit that never triggers, against the same tunnel without it.
    Limit {
        size: usize,
        conns: usize,
    },
    /// Echoes under a ws_limit that shapes them to SHAPED_RATE.
    Shaped {
        size: usize,
        conns: usize,
    },
}

impl Work {
    fn id(self) -> String {
        let (kind, size, conns) = self.parts();
        format!("{kind}-{}-x{conns}", size_name(size))
    }
    fn label(self) -> String {
        let (_, size, conns) = self.parts();
        let kind = match self {
            Work::Echo { .. } => "echo",
            Work::Stream { .. } => "stream",
            Work::Deflate { .. } => "compressed echo",
            Work::Limit { .. } => "limited echo",
            Work::Shaped { .. } => "shaped echo",
        };
        format!("{kind} {} × {conns}", size_name(size))
    }
    /// The id's first word, the message size and the connections.
    fn parts(self) -> (&'static str, usize, usize) {
        match self {
            Work::Echo { size, conns } => ("echo", size, conns),
            Work::Stream { size, conns } => ("stream", size, conns),
            Work::Deflate { size, conns } => ("deflate", size, conns),
            Work::Limit { size, conns } => ("limit", size, conns),
            Work::Shaped { size, conns } => ("shaped", size, conns),
        }
    }
    /// The echo and stream workloads: every configuration of TARGETS, in the main tables.
    fn is_main(self) -> bool {
        matches!(self, Work::Echo { .. } | Work::Stream { .. })
    }
    /// The configurations this workload runs on.
    fn targets(self) -> &'static [Target] {
        match self {
            Work::Echo { .. } | Work::Stream { .. } => &TARGETS,
            Work::Deflate { .. } => &[
                Target::Direct,
                Target::Stock,
                Target::Loaded,
                Target::Message,
                Target::MessagePayload,
            ],
            Work::Limit { .. } => &[Target::Stock, Target::Close, Target::Limit],
            Work::Shaped { .. } => &[Target::Close, Target::Shaped],
        }
    }
}

fn size_name(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n >= 1024 && n % 1024 == 0 {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

/// One configuration's figures in one round.
#[derive(Debug, Clone, Default)]
struct Sample {
    msgs: u64,
    secs: f64,
    bytes: u64,
    cpu_ns: Option<u64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
}

impl Sample {
    fn msg_rate(&self) -> f64 {
        self.msgs as f64 / self.secs
    }
    fn mb_rate(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    /// CPU milliseconds per 10^5 messages.
    fn cpu_per_1e5(&self) -> Option<f64> {
        let c = self.cpu_ns? as f64;
        (self.msgs > 0).then(|| c / 1e6 / self.msgs as f64 * 1e5)
    }
    /// The share of one CPU the proxy used over the window.
    fn cpu_share(&self) -> Option<f64> {
        Some(self.cpu_ns? as f64 / 1e9 / self.secs)
    }
}

struct Bench<'a> {
    args: &'a Args,
    /// The descriptor limit the proxies get.
    limit: u64,
    up: RefCell<UpstreamProc>,
    /// The upstream's ports for each configuration.
    up_ports: BTreeMap<Target, UpPorts>,
    /// Where each configuration listens, and its process.
    ports: BTreeMap<Target, u16>,
    proxies: BTreeMap<Target, Proxy>,
}

impl Bench<'_> {
    fn up_stats(&self) -> Result<UpStats, String> {
        self.up.borrow_mut().stats()
    }

    async fn run(&self, t: Target, work: Work) -> Result<Sample, String> {
        let port = match (t, work) {
            (Target::Direct, Work::Deflate { .. }) => self.up_ports[&t].raw,
            _ => self.ports[&t],
        };
        let proc_pid = self.proxies.get(&t).map(|p| p.pid);
        let (_, size, conns) = work.parts();
        let w = Arc::new(Window::default());
        let tasks: Vec<_> = if let Work::Deflate { .. } = work {
            deflate_connect_all(port, conns)
                .await?
                .into_iter()
                .map(|c| tokio::spawn(deflate_client(c, size, w.clone())))
                .collect()
        } else {
            let path = match work {
                Work::Stream { .. } => "/sink",
                _ => "/echo",
            };
            let url = format!("ws://127.0.0.1:{port}{path}");
            let clients = connect_all(&url, conns).await?;
            let msg = Message::Text("x".repeat(size));
            clients
                .into_iter()
                .map(|ws| {
                    let (msg, w) = (msg.clone(), w.clone());
                    match work {
                        Work::Stream { .. } => tokio::spawn(stream_client(ws, msg, w)),
                        _ => tokio::spawn(echo_client(ws, msg, w)),
                    }
                })
                .collect()
        };
        tokio::time::sleep(self.args.warmup).await;

        let cpu0 = proc_pid.and_then(cpu_ns);
        let sink0 = self.up_stats()?;
        let t0 = Instant::now();
        w.measuring.store(true, Relaxed);
        tokio::time::sleep(self.args.duration).await;
        w.measuring.store(false, Relaxed);
        let secs = t0.elapsed().as_secs_f64();
        let cpu1 = proc_pid.and_then(cpu_ns);
        let sink1 = self.up_stats()?;
        w.stop.store(true, Relaxed);

        let mut lat = Vec::new();
        let mut err = None;
        for t in tasks {
            match tokio::time::timeout(Duration::from_secs(30), t).await {
                Ok(Ok(Ok(l))) => lat.extend(l),
                Ok(Ok(Err(e))) => err = Some(e),
                Ok(Err(e)) => err = Some(format!("client task: {e}")),
                Err(_) => err = Some("a client did not stop".into()),
            }
        }
        settle(&self.up, Duration::from_secs(10)).await?;
        if let Some(e) = err {
            return Err(e);
        }
        let (msgs, bytes) = match work {
            Work::Stream { .. } => (sink1.msgs - sink0.msgs, sink1.bytes - sink0.bytes),
            // Compressed: the bytes of the uncompressed messages.
            _ => (lat.len() as u64, lat.len() as u64 * size as u64),
        };
        let quantile = |lat: &mut Vec<u32>, q: f64| -> Option<f64> {
            if lat.is_empty() {
                return None;
            }
            let i = ((lat.len() - 1) as f64 * q).round() as usize;
            Some(*lat.select_nth_unstable(i).1 as f64 / 1000.0)
        };
        Ok(Sample {
            msgs,
            secs,
            bytes,
            cpu_ns: match (cpu0, cpu1) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            },
            p50_us: quantile(&mut lat, 0.50),
            p99_us: quantile(&mut lat, 0.99),
        })
    }
}

/// Round trips of 1 KiB compressed texts each idle compressed tunnel makes before the memory
/// is read: 40 KiB of text each way, more than a 15-bit window, so that a tunnel that inflates
/// has written its two windows through. (After one message, RSS showed only the pages of the
/// windows written so far: 25.8 KB per tunnel instead of the allocated 2 × 40 KB.)
const IDLE_DEFLATE_TRIPS: usize = 40;

/// Worker (or HAProxy) RSS before and after opening `n` tunnels, each after one round trip of
/// a 64 B text, or with `deflate` after IDLE_DEFLATE_TRIPS round trips of compressed 1 KiB
/// texts (so that a tunnel that inflates holds both inflate states with full windows).
async fn idle_run(
    b: &Bench<'_>,
    work: &Path,
    t: Target,
    n: usize,
    deflate: bool,
) -> Result<(u64, u64), String> {
    let p = Proxy::start(b.args, b.limit, &work.join("idle"), t, b.up_ports[&t])?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib(p.pid).ok_or("no VmRSS")?;
    if deflate {
        let addr = format!("127.0.0.1:{}", p.port);
        let addr = &addr;
        return rss_while_open(b, p, before, n, |i| async move {
            let mut c = rawws::DeflateClient::connect(addr, "/deflate", i as u64).await?;
            for _ in 0..IDLE_DEFLATE_TRIPS {
                c.round_trip(1024).await?;
            }
            c.idle();
            Ok(c)
        })
        .await;
    }
    let url = format!("ws://127.0.0.1:{}/echo", p.port);
    let msg = Message::Text("x".repeat(64));
    let (url, msg) = (&url, &msg);
    rss_while_open(b, p, before, n, |_| async move {
        let mut ws = connect(url).await?;
        round_trip(&mut ws, msg).await?;
        Ok(ws)
    })
    .await
}

/// Opens `n` clients with `open` (200 at a time), reads the proxy's RSS while they are all
/// open, then closes them and waits for the upstream to see them go: (`before`, that RSS).
async fn rss_while_open<T, F, Fut>(
    b: &Bench<'_>,
    p: Proxy,
    before: u64,
    n: usize,
    open: F,
) -> Result<(u64, u64), String>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let clients: Result<Vec<T>, String> = futures_util::stream::iter(0..n)
        .map(open)
        .buffer_unordered(200)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect();
    let clients = clients?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kib(p.pid).ok_or("no VmRSS")?;
    drop(clients);
    settle(&b.up, Duration::from_secs(30)).await?;
    drop(p);
    Ok((before, after))
}

// --- Statistics -------------------------------------------------------------------------------

fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}

fn min_max(v: &[f64]) -> Option<(f64, f64)> {
    let s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let lo = s.iter().copied().reduce(f64::min)?;
    let hi = s.iter().copied().reduce(f64::max)?;
    Some((lo, hi))
}

/// Median, min and max of a figure over the rounds.
#[derive(Debug, Clone, Copy)]
struct Stat {
    med: f64,
    min: f64,
    max: f64,
}

fn stat(v: &[f64]) -> Option<Stat> {
    let (min, max) = min_max(v)?;
    Some(Stat {
        med: median(v)?,
        min,
        max,
    })
}

fn stat_json(s: Option<Stat>) -> Value {
    match s {
        Some(s) => json!({"median": s.med, "min": s.min, "max": s.max}),
        None => Value::Null,
    }
}

/// Per-round ratios of `f(target)` to `f(stock)` in the same round.
fn ratios(
    rounds: &[BTreeMap<Target, Sample>],
    t: Target,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Vec<f64> {
    ratios_to(rounds, t, Target::Stock, f)
}

/// Per-round ratios of `f(target)` to `f(base)` in the same round.
fn ratios_to(
    rounds: &[BTreeMap<Target, Sample>],
    t: Target,
    base: Target,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Vec<f64> {
    rounds
        .iter()
        .filter_map(|r| Some(f(r.get(&t)?)? / f(r.get(&base)?)?))
        .collect()
}

/// Per-round ratio of `f(target)` to `f(stock)` in the same round, summarised.
fn ratio(
    rounds: &[BTreeMap<Target, Sample>],
    t: Target,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Option<Stat> {
    stat(&ratios(rounds, t, f))
}

// --- The run ----------------------------------------------------------------------------------

struct WorkResult {
    work: Work,
    /// The configurations it ran on.
    targets: Vec<Target>,
    rounds: Vec<BTreeMap<Target, Sample>>,
}

struct IdleResult {
    n: usize,
    /// (before, after) KiB per round, per configuration.
    rss: BTreeMap<Target, Vec<(u64, u64)>>,
}

impl IdleResult {
    fn per_tunnel(&self, t: Target) -> Vec<f64> {
        self.rss.get(&t).map_or(Vec::new(), |v| {
            v.iter()
                .map(|(b, a)| (*a as f64 - *b as f64) * 1024.0 / self.n as f64)
                .collect()
        })
    }
    /// Per-round difference of `t` to `base` in bytes per tunnel.
    fn diff(&self, t: Target, base: Target) -> Vec<f64> {
        let b = self.per_tunnel(base);
        self.per_tunnel(t)
            .iter()
            .zip(&b)
            .map(|(a, b)| a - b)
            .collect()
    }
    /// Per-round difference to stock in bytes per tunnel.
    fn extra(&self, t: Target) -> Option<Stat> {
        let s = self.per_tunnel(Target::Stock);
        let v: Vec<f64> = self
            .per_tunnel(t)
            .iter()
            .zip(&s)
            .map(|(a, b)| a - b)
            .collect();
        stat(&v)
    }
}

fn selected(args: &Args, id: &str) -> bool {
    args.only.is_empty() || args.only.iter().any(|o| id.starts_with(o.as_str()))
}

fn say(msg: &str) {
    eprintln!("\x1b[1mws-bench:\x1b[0m {msg}");
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--upstream") {
        let n = argv.get(2).and_then(|v| v.parse().ok()).unwrap_or(1);
        return match upstream_main(n) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ws-bench upstream: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ws-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ws-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let work = args.work.clone().unwrap_or_else(|| args.out.join("run"));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let work = std::fs::canonicalize(&work).map_err(|e| format!("{e}"))?;
    // The proxies inherit the limit. A proxy needs two descriptors per tunnel, the generator
    // and the upstream process one each; HAProxy sizes itself from its maxconn and refuses to
    // start below that.
    let limit = raise_nofile(1 << 17);
    // (At 9,800 tunnels under a 20,000 limit nginx already ran out of worker_connections.)
    let idle = args
        .idle
        .min((limit.saturating_sub(400) / 2000 * 1000) as usize);
    if idle < args.idle {
        say(&format!(
            "descriptor limit {limit} (hard): {idle} idle tunnels instead of {}",
            args.idle
        ));
    }
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // Before any thread or child exists, so that all of them inherit it.
    if args.pin && !pin(0, 0) {
        return Err("cannot pin the generator to CPU 0".into());
    }

    // The clients run on this thread, the upstream in a process of its own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;

    if args.haproxy.is_none() {
        say("no haproxy binary: HAProxy is skipped");
    }
    let have = |t: &Target| args.haproxy.is_some() || *t != Target::Haproxy;
    // The main configurations (echo and stream workloads), then those of the compressed and
    // rate-limit workloads.
    let targets: Vec<Target> = TARGETS.iter().copied().filter(have).collect();
    let mut all = targets.clone();
    all.extend([
        Target::Message,
        Target::MessagePayload,
        Target::Limit,
        Target::Shaped,
        Target::StockLogged,
    ]);
    let up = UpstreamProc::start(all.len())?;
    let up_ports: BTreeMap<Target, UpPorts> =
        all.iter().copied().zip(up.ports.iter().copied()).collect();

    let mut bench = Bench {
        args,
        limit,
        up: RefCell::new(up),
        up_ports,
        ports: BTreeMap::new(),
        proxies: BTreeMap::new(),
    };
    let mut works = Vec::new();
    for &conns in &args.conns {
        for &size in &args.sizes {
            works.push(Work::Echo { size, conns });
        }
    }
    works.push(Work::Stream {
        size: args.stream_size,
        conns: 1,
    });
    for &conns in &args.conns {
        works.push(Work::Deflate { size: 1024, conns });
    }
    for &conns in &args.conns {
        works.push(Work::Limit { size: 1024, conns });
    }
    for conns in [1, 64] {
        works.push(Work::Shaped { size: 1024, conns });
    }
    works.retain(|w| selected(args, &w.id()));
    let used: std::collections::BTreeSet<Target> = works
        .iter()
        .flat_map(|w| w.targets().iter().copied())
        .collect();
    for t in all.iter().filter(|t| used.contains(t) && have(t)) {
        if *t == Target::Direct {
            bench.ports.insert(*t, bench.up_ports[t].echo);
            continue;
        }
        let p = Proxy::start(args, limit, &work, *t, bench.up_ports[t])?;
        bench.ports.insert(*t, p.port);
        bench.proxies.insert(*t, p);
    }

    let mut results = Vec::new();
    for w in works {
        let wt: Vec<Target> = w.targets().iter().copied().filter(have).collect();
        let mut rounds = Vec::new();
        for r in 0..args.rounds {
            let mut got = BTreeMap::new();
            // Rotate the order each round so that no configuration always runs first.
            for i in 0..wt.len() {
                let t = wt[(i + r) % wt.len()];
                let s = rt
                    .block_on(bench.run(t, w))
                    .map_err(|e| format!("{} on {}: {e}", w.id(), t.id()))?;
                if let Some(p) = bench.proxies.get(&t) {
                    p.truncate_log();
                }
                got.insert(t, s);
            }
            let line: Vec<String> = wt
                .iter()
                .map(|t| {
                    let s = &got[t];
                    match s.cpu_per_1e5() {
                        Some(c) => format!("{} {:.0}/s {c:.1}ms", t.id(), s.msg_rate()),
                        None => format!("{} {:.0}/s", t.id(), s.msg_rate()),
                    }
                })
                .collect();
            say(&format!(
                "{} round {}/{}: {}",
                w.id(),
                r + 1,
                args.rounds,
                line.join(", ")
            ));
            rounds.push(got);
        }
        results.push(WorkResult {
            work: w,
            targets: wt,
            rounds,
        });
    }
    for (_, p) in std::mem::take(&mut bench.proxies) {
        let log = p.read("logs/error.log");
        if log.contains("exited on signal") || log.contains("panicked") {
            return Err(format!("a worker crashed:\n{log}"));
        }
    }

    // Idle tunnels: a fresh process per configuration and round, since memory freed by closed
    // tunnels stays in the worker's heap. Uncompressed: every proxy, and message records (the
    // configuration that inflates nothing in the compressed run). Compressed (each tunnel has
    // passed one compressed message each way): stock, close records, message records (no
    // inflate) and message records with payload (inflating both directions).
    let mut idle_plain = Vec::new();
    if idle > 0 && selected(args, "idle") {
        idle_plain = targets
            .iter()
            .copied()
            .filter(|t| *t != Target::Direct)
            .chain([Target::Message, Target::StockLogged])
            .collect();
    }
    let mut idle_deflate = Vec::new();
    if idle > 0 && selected(args, "idle-deflate") {
        idle_deflate = vec![
            Target::Stock,
            Target::StockLogged,
            Target::Close,
            Target::Message,
            Target::MessagePayload,
        ];
    }
    let mut idle_res = IdleResult {
        n: idle,
        rss: BTreeMap::new(),
    };
    let mut idle_deflate_res = IdleResult {
        n: idle,
        rss: BTreeMap::new(),
    };
    let idle_rounds = if args.quick { 1 } else { 2 };
    for r in 0..idle_rounds {
        for (list, deflate) in [(&idle_plain, false), (&idle_deflate, true)] {
            for t in list.iter() {
                let (b, a) = rt
                    .block_on(idle_run(&bench, &work, *t, idle, deflate))
                    .map_err(|e| format!("idle on {}: {e}", t.id()))?;
                say(&format!(
                    "idle-{}{idle} round {}/{idle_rounds}: {} RSS {b} -> {a} KiB ({:.0} B/tunnel)",
                    if deflate { "deflate-" } else { "" },
                    r + 1,
                    t.id(),
                    (a as f64 - b as f64) * 1024.0 / idle as f64
                ));
                let res = if deflate {
                    &mut idle_deflate_res
                } else {
                    &mut idle_res
                };
                res.rss.entry(*t).or_default().push((b, a));
            }
        }
    }
    let idle_res = (!idle_plain.is_empty()).then_some(idle_res);
    let idle_deflate_res = (!idle_deflate.is_empty()).then_some(idle_deflate_res);

    let parser = args.criterion.as_deref().map(read_criterion);
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let machine = machine(args, load_start.trim(), load_end.trim());
    let elapsed = started.elapsed().as_secs_f64();
    let instructions = args
        .instructions
        .iter()
        .map(|p| read_instructions(p))
        .collect::<Result<Vec<_>, _>>()?;
    let report = Report {
        args,
        targets: &targets,
        all_targets: &all,
        results: &results,
        idle: idle_res.as_ref(),
        idle_deflate: idle_deflate_res.as_ref(),
        parser: parser.as_ref(),
        instructions: &instructions,
        machine: &machine,
        elapsed,
    };
    let write = |name: &str, text: &str| {
        std::fs::write(args.out.join(name), text).map_err(|e| format!("{name}: {e}"))
    };
    write(
        "results.json",
        &serde_json::to_string_pretty(&report.json()).map_err(|e| format!("{e}"))?,
    )?;
    let md = report.markdown();
    write("results.md", &md)?;
    write("ratios.dat", &report.ratios_dat())?;
    let columns = report.proxies().count(); // the workload column, and all but stock
    write(
        "ratios.gp",
        &GNUPLOT.replace("COLUMNS", &columns.to_string()),
    )?;
    let chart = if results.is_empty() {
        None
    } else {
        Command::new("gnuplot")
            .arg("ratios.gp")
            .current_dir(&args.out)
            .status()
            .ok()
    };
    match chart {
        Some(s) if s.success() => {}
        Some(s) => say(&format!("gnuplot failed ({s}): no ratios.png")),
        None if results.is_empty() => {}
        None => say("no gnuplot: no ratios.png"),
    }
    println!("{md}");
    say(&format!(
        "done in {elapsed:.0} s; results in {}",
        args.out.display()
    ));
    Ok(())
}

// --- Machine and parser figures ---------------------------------------------------------------

fn machine(args: &Args, load_start: &str, load_end: &str) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, v)| v.trim().to_string());
    m.insert("cpu", model);
    // Online CPUs, not this process's affinity (which --pin narrows).
    // SAFETY: sysconf has no preconditions.
    let nproc = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    m.insert("nproc", nproc.to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    m.insert("kernel", kernel.trim().to_string());
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(kb) = mem
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
    {
        m.insert("memory", format!("{:.1} GiB", kb as f64 / 1048576.0));
    }
    let version = |bin: &Path, arg: &str| -> String {
        Command::new(bin)
            .arg(arg)
            .output()
            .map(|o| {
                let s = String::from_utf8_lossy(&o.stderr).to_string()
                    + &String::from_utf8_lossy(&o.stdout);
                s.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_default()
    };
    m.insert(
        "nginx",
        version(&args.nginx, "-v").replace("nginx version: ", ""),
    );
    if let Some(h) = &args.haproxy {
        // "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
        let v = version(h, "-v");
        let v = v.split(" - ").next().unwrap_or("").replace(" version", "");
        m.insert("haproxy", v);
    }
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    m.insert("date", date);
    m.insert("loadavg_start", load_start.to_string());
    m.insert("loadavg_end", load_end.to_string());
    m
}

/// (group, split, size) -> GB/s, from criterion's estimates (median time per iteration).
type ParserFigures = BTreeMap<(String, String, String), f64>;

fn read_criterion(dir: &Path) -> ParserFigures {
    let mut out = BTreeMap::new();
    for group in ["parser", "observer"] {
        let Ok(splits) = std::fs::read_dir(dir.join(group)) else {
            continue;
        };
        for s in splits.flatten() {
            let Ok(sizes) = std::fs::read_dir(s.path()) else {
                continue;
            };
            for z in sizes.flatten() {
                let read = |f: &str| -> Option<Value> {
                    let t = std::fs::read_to_string(z.path().join("new").join(f)).ok()?;
                    serde_json::from_str(&t).ok()
                };
                let (Some(est), Some(b)) = (read("estimates.json"), read("benchmark.json")) else {
                    continue;
                };
                let ns = est["median"]["point_estimate"].as_f64();
                let bytes = b["throughput"]["Bytes"].as_f64();
                if let (Some(ns), Some(bytes)) = (ns, bytes) {
                    out.insert(
                        (
                            group.to_string(),
                            s.file_name().to_string_lossy().into_owned(),
                            z.file_name().to_string_lossy().into_owned(),
                        ),
                        bytes / ns,
                    );
                }
            }
        }
    }
    out
}

// --- Report -----------------------------------------------------------------------------------

const GNUPLOT: &str = r#"# Worker CPU per message, each configuration against stock nginx (1 = same cost).
set terminal png size 1400,650 font ",10"
set output 'ratios.png'
set datafile separator "\t"
set style data histogram
set style histogram cluster gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set key top left autotitle columnhead
set grid ytics
set yrange [0:*]
set xtics rotate by -25
set ylabel "worker CPU per message / stock nginx"
set title "nginx-ws: proxy CPU per message relative to stock nginx (median of the rounds)"
plot for [i=2:COLUMNS] 'ratios.dat' using i:xtic(1), 1 with lines lc rgb "black" dt 2 notitle
"#;

struct Report<'a> {
    args: &'a Args,
    /// The configurations of the main workloads (echo, stream).
    targets: &'a [Target],
    /// Those and the configurations of the compressed and rate-limit workloads.
    all_targets: &'a [Target],
    results: &'a [WorkResult],
    idle: Option<&'a IdleResult>,
    /// Idle tunnels that passed one compressed message each way.
    idle_deflate: Option<&'a IdleResult>,
    parser: Option<&'a ParserFigures>,
    instructions: &'a [InstrTable],
    machine: &'a BTreeMap<&'static str, String>,
    elapsed: f64,
}

/// A target from the issue, judged on this run's figures.
struct Goal {
    what: String,
    limit: String,
    got: String,
    met: Met,
}

/// Whether a target is met, beyond the noise of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Met {
    Yes,
    No,
    /// The limit lies inside the interval: this run cannot tell.
    WithinNoise,
    NotMeasured,
}

impl Met {
    fn text(self) -> &'static str {
        match self {
            Met::Yes => "yes",
            Met::No => "**no**",
            Met::WithinNoise => "within noise",
            Met::NotMeasured => "—",
        }
    }

    fn json(self) -> Value {
        match self {
            Met::Yes => json!(true),
            Met::No => json!(false),
            Met::WithinNoise => json!("within noise"),
            Met::NotMeasured => Value::Null,
        }
    }

    /// For an upper limit, from an interval [lo, hi] of the measured value.
    fn upper(limit: f64, lo: f64, hi: f64) -> Met {
        if hi <= limit {
            Met::Yes
        } else if lo > limit {
            Met::No
        } else {
            Met::WithinNoise
        }
    }
}

fn pct(r: f64) -> String {
    format!("{:+.1} %", (r - 1.0) * 100.0)
}

/// A ratio's median over the rounds with its spread: `+7.4 % [-2.1, +15.3]` (min–max of the
/// per-round ratios).
fn pct_spread(s: Stat) -> String {
    format!(
        "{} [{:+.1}, {:+.1}]",
        pct(s.med),
        (s.min - 1.0) * 100.0,
        (s.max - 1.0) * 100.0
    )
}

/// A small deterministic generator for the bootstrap (xorshift64*): the same run gives the
/// same interval.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// Bootstrap resamples for the geometric-mean intervals.
const RESAMPLES: usize = 2000;

/// The geometric mean over workloads of each workload's median per-round ratio, and its 95 %
/// percentile-bootstrap interval: each resample draws every workload's rounds again, with
/// replacement. `per_work` holds each workload's per-round ratios.
fn geo_interval(per_work: &[Vec<f64>]) -> Option<(f64, f64, f64)> {
    let geo = |meds: &mut dyn Iterator<Item = f64>| -> f64 {
        let (sum, n) = meds.fold((0.0, 0), |(s, n), m| (s + m.ln(), n + 1));
        (sum / f64::from(n)).exp()
    };
    if per_work.is_empty() || per_work.iter().any(Vec::is_empty) {
        return None;
    }
    let point = geo(&mut per_work.iter().filter_map(|v| median(v)));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut draws: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            geo(&mut per_work.iter().filter_map(|v| {
                let r: Vec<f64> = (0..v.len()).map(|_| v[rng.below(v.len())]).collect();
                median(&r)
            }))
        })
        .collect();
    draws.sort_by(f64::total_cmp);
    let at = |q: f64| draws[((RESAMPLES as f64 - 1.0) * q).round() as usize];
    Some((point, at(0.025), at(0.975)))
}

/// One row of a scripts/bench-instructions table: instructions per message and the extra
/// over stock nginx.
#[derive(Debug, Clone)]
struct InstrRow {
    label: String,
    per: i64,
    extra: i64,
}

/// A scripts/bench-instructions table: the message size it was measured at, its rows, and
/// the text itself.
#[derive(Debug, Clone)]
struct InstrTable {
    size: String,
    rows: Vec<InstrRow>,
    text: String,
}

// Labels of rows of a scripts/bench-instructions table (`cargo xtask bench-instructions`).
const CLOSE_ROW: &str = "close records + $ws_* variables";
const LIMIT_ROW: &str = "as close, + a ws_limit that never triggers";
const DEFLATE_STOCK_ROW: &str = "stock nginx, compressed traffic";
const DEFLATE_OFF_ROW: &str = "message records, compressed traffic (capture off: no inflate)";
const DEFLATE_ON_ROW: &str = "message + payload 256, compressed traffic (inflating)";

fn read_instructions(path: &Path) -> Result<InstrTable, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // "... round trips of 64 B messages ..."
    let size = text
        .split(" round trips of ")
        .nth(1)
        .and_then(|t| t.split(" messages").next())
        .unwrap_or("?")
        .to_string();
    let rows = text
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            let per = cells.get(1)?.parse().ok()?;
            let extra = match *cells.get(2)? {
                "—" => 0,
                x => x.trim_start_matches('+').parse().ok()?,
            };
            Some(InstrRow {
                label: cells[0].to_string(),
                per,
                extra,
            })
        })
        .collect();
    Ok(InstrTable { size, rows, text })
}

fn idle_json(i: &IdleResult) -> Value {
    let per: serde_json::Map<String, Value> = i
        .rss
        .iter()
        .map(|(t, v)| {
            (
                t.id().to_string(),
                json!({
                    "rss_kib_before_after": v,
                    "bytes_per_tunnel": stat_json(stat(&i.per_tunnel(*t))),
                    "extra_bytes_per_tunnel_vs_stock": stat_json(i.extra(*t)),
                }),
            )
        })
        .collect();
    json!({"tunnels": i.n, "configurations": per})
}

impl Report<'_> {
    /// The echo and stream workloads (the main tables).
    fn main(&self) -> impl Iterator<Item = &WorkResult> + '_ {
        self.results.iter().filter(|r| r.work.is_main())
    }

    /// The configurations that ran: in a workload or an idle measurement.
    fn used_targets(&self) -> impl Iterator<Item = Target> + '_ {
        self.all_targets.iter().copied().filter(|t| {
            self.results.iter().any(|r| r.targets.contains(t))
                || [self.idle, self.idle_deflate]
                    .iter()
                    .flatten()
                    .any(|i| i.rss.contains_key(t))
        })
    }

    /// A table of CPU per 10^5 messages over `works`: each of `cols` with its ratio to stock
    /// (where stock ran), and then the ratio of each pair `(t, base)` of `pairs`.
    fn cpu_table(
        &self,
        o: &mut String,
        works: &[&WorkResult],
        cols: &[Target],
        pairs: &[(Target, Target)],
    ) {
        let _ = write!(o, "| Workload |");
        for t in cols {
            let _ = write!(o, " {} |", t.label());
        }
        for (t, b) in pairs {
            let _ = write!(o, " {} vs {} |", t.label(), b.label());
        }
        let _ = write!(o, "\n|---|");
        for _ in 0..cols.len() + pairs.len() {
            let _ = write!(o, "---:|");
        }
        let _ = writeln!(o);
        for r in works {
            let _ = write!(o, "| {} |", r.work.label());
            for t in cols {
                let c = self.stats(r, *t, Sample::cpu_per_1e5);
                let cell = match (c, *t == Target::Stock, Self::cpu_ratio(r, *t)) {
                    (Some(c), false, Some(x)) => format!("{:.1} ({})", c.med, pct_spread(x)),
                    (Some(c), _, _) => format!("{:.1}", c.med),
                    _ => "—".into(),
                };
                let _ = write!(o, " {cell} |");
            }
            for (t, b) in pairs {
                let x = stat(&ratios_to(&r.rounds, *t, *b, Sample::cpu_per_1e5));
                let _ = write!(o, " {} |", x.map_or("—".into(), pct_spread));
            }
            let _ = writeln!(o);
        }
    }

    /// Messages/s over `works` for each of `cols`.
    fn rate_table(&self, o: &mut String, works: &[&WorkResult], cols: &[Target]) {
        let _ = write!(o, "| Workload |");
        for t in cols {
            let _ = write!(o, " {} |", t.label());
        }
        let _ = write!(o, "\n|---|");
        for _ in cols {
            let _ = write!(o, "---:|");
        }
        let _ = writeln!(o);
        for r in works {
            let _ = write!(o, "| {} |", r.work.label());
            for t in cols {
                let rate = self.stats(r, *t, |s| Some(s.msg_rate()));
                let p50 = self.stats(r, *t, |s| s.p50_us);
                let cell = match (rate, p50) {
                    (Some(v), Some(l)) => format!("{:.0} (p50 {:.0} µs)", v.med, l.med),
                    (Some(v), None) => format!("{:.0}", v.med),
                    _ => "—".into(),
                };
                let _ = write!(o, " {cell} |");
            }
            let _ = writeln!(o);
        }
    }

    fn deflate_markdown(&self, o: &mut String) {
        let works: Vec<&WorkResult> = self
            .results
            .iter()
            .filter(|r| matches!(r.work, Work::Deflate { .. }))
            .collect();
        if works.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "\n## Compressed tunnels (permessage-deflate)\n\n\
             Each message is a different JSON-like text of 1 KiB, compressed by the client as a \
             permessage-deflate sender does (one raw deflater per tunnel, 15-bit window, \
             context takeover, sync flush, RSV1): about a fifth of that on the wire. The \
             upstream returns each frame byte for byte, so both directions carry compressed \
             messages. Capture off (message records without payload) only flags them; \
             `ws_log_payload 256` inflates every message of both directions. MB/s counts the \
             uncompressed bytes.\n\nProxy CPU per 10^5 messages (ms), against stock nginx, \
             and capture on against capture off:\n"
        );
        let cols = [
            Target::Stock,
            Target::Loaded,
            Target::Message,
            Target::MessagePayload,
        ];
        self.cpu_table(
            o,
            &works,
            &cols,
            &[(Target::MessagePayload, Target::Message)],
        );
        let _ = writeln!(o, "\nMessages/s (round-trip latency p50):\n");
        let mut with_direct = vec![Target::Direct];
        with_direct.extend(cols);
        self.rate_table(o, &works, &with_direct);
    }

    fn limit_markdown(&self, o: &mut String) {
        let limited: Vec<&WorkResult> = self
            .results
            .iter()
            .filter(|r| matches!(r.work, Work::Limit { .. }))
            .collect();
        let shaped: Vec<&WorkResult> = self
            .results
            .iter()
            .filter(|r| matches!(r.work, Work::Shaped { .. }))
            .collect();
        if limited.is_empty() && shaped.is_empty() {
            return;
        }
        let _ = writeln!(o, "\n## Message rate limits (ws_limit)\n");
        if !limited.is_empty() {
            let _ = writeln!(
                o,
                "1 KiB echoes under a `ws_limit` that never triggers (rate 1000000r/s, burst \
                 1000000): the cost of the accounting, against the same tunnel without it \
                 (close records). Proxy CPU per 10^5 messages (ms):\n"
            );
            let cols = [Target::Stock, Target::Close, Target::Limit];
            self.cpu_table(o, &limited, &cols, &[(Target::Limit, Target::Close)]);
            let _ = writeln!(o, "\nMessages/s (round-trip latency p50):\n");
            self.rate_table(o, &limited, &cols);
        }
        if !shaped.is_empty() {
            let _ = writeln!(
                o,
                "\n1 KiB echoes under a `ws_limit` that shapes: rate={SHAPED_RATE}r/s, no burst, \
                 keyed by `$binary_remote_addr` (every tunnel of the generator shares the \
                 bucket), default delay; the same tunnels without the limit (close records) \
                 beside them. A message is one limited client message and its echo.\n"
            );
            let _ = writeln!(
                o,
                "| Workload | configured msgs/s | achieved msgs/s [min–max] | achieved / \
                 configured | p50 / p99 latency (ms) | worker CPU ms per 10^5 msgs | worker \
                 CPU, % of a core | without the limit: msgs/s, CPU ms per 10^5 msgs |\n\
                 |---|---:|---:|---:|---:|---:|---:|---:|"
            );
            for r in &shaped {
                let t = Target::Shaped;
                let rate = self.stats(r, t, |s| Some(s.msg_rate()));
                let f = f64::from(SHAPED_RATE);
                let cell = |s: Option<Stat>, scale: f64, d: usize| {
                    s.map_or("—".into(), |s| format!("{:.d$}", s.med * scale, d = d))
                };
                let _ = writeln!(
                    o,
                    "| {} | {SHAPED_RATE} | {} | {} | {} / {} | {} | {} | {} msgs/s, {} ms |",
                    r.work.label(),
                    rate.map_or("—".into(), |s| format!(
                        "{:.0} [{:.0}–{:.0}]",
                        s.med, s.min, s.max
                    )),
                    cell(rate, 1.0 / f, 3),
                    cell(self.stats(r, t, |s| s.p50_us), 1e-3, 1),
                    cell(self.stats(r, t, |s| s.p99_us), 1e-3, 1),
                    cell(self.stats(r, t, Sample::cpu_per_1e5), 1.0, 1),
                    cell(self.stats(r, t, Sample::cpu_share), 100.0, 1),
                    cell(self.stats(r, Target::Close, |s| Some(s.msg_rate())), 1.0, 0),
                    cell(self.stats(r, Target::Close, Sample::cpu_per_1e5), 1.0, 1),
                );
            }
        }
    }

    fn proxies(&self) -> impl Iterator<Item = Target> + '_ {
        self.targets
            .iter()
            .copied()
            .filter(|t| *t != Target::Direct)
    }

    fn stats(&self, r: &WorkResult, t: Target, f: impl Fn(&Sample) -> Option<f64>) -> Option<Stat> {
        let v: Vec<f64> = r.rounds.iter().filter_map(|x| f(x.get(&t)?)).collect();
        stat(&v)
    }

    fn cpu_ratio(r: &WorkResult, t: Target) -> Option<Stat> {
        ratio(&r.rounds, t, Sample::cpu_per_1e5)
    }

    fn goals(&self) -> Vec<Goal> {
        let mut g = Vec::new();
        // Instructions per proxied message (callgrind): the primary judge, repeatable.
        for table in self.instructions {
            for (label, limit) in [
                ("module, no directive", 0),
                ("close records + $ws_* variables", 150),
                ("frame records", 500),
                ("frame + payload 64", 900),
            ] {
                let row = table.rows.iter().find(|r| r.label == label);
                g.push(Goal {
                    what: format!(
                        "{label}: extra user-space instructions per proxied message, {} \
                         (callgrind)",
                        table.size
                    ),
                    limit: format!("≤ {limit:+}"),
                    got: row.map_or("not measured".into(), |r| {
                        format!("{:+} ({} per message)", r.extra, r.per)
                    }),
                    // The subtraction of the fixed cost moves a count by ±2.
                    met: row.map_or(Met::NotMeasured, |r| {
                        Met::upper(limit as f64, (r.extra - 2) as f64, (r.extra + 2) as f64)
                    }),
                });
            }
            // Reported, no limit of their own: one row against another of the same table.
            for (what, label, base) in [
                (
                    "ws_limit that never triggers: extra instructions per message over the \
                     same tunnel without it (close records)",
                    LIMIT_ROW,
                    CLOSE_ROW,
                ),
                (
                    "compressed traffic, message records: capture on (ws_log_payload 256, \
                     inflating) over capture off",
                    DEFLATE_ON_ROW,
                    DEFLATE_OFF_ROW,
                ),
                (
                    "compressed traffic, message records + ws_log_payload 256: extra over \
                     stock nginx with the same traffic",
                    DEFLATE_ON_ROW,
                    DEFLATE_STOCK_ROW,
                ),
            ] {
                let find = |l: &str| table.rows.iter().find(|r| r.label == l);
                let (Some(r), Some(b)) = (find(label), find(base)) else {
                    continue;
                };
                g.push(Goal {
                    what: format!("{what}, {} (callgrind)", table.size),
                    limit: "—".into(),
                    got: format!("{:+} ({} vs {} per message)", r.per - b.per, r.per, b.per),
                    met: Met::NotMeasured,
                });
            }
        }
        // Over the workloads matching `pick`: the geometric mean of the median per-round
        // ratios (judged) with its bootstrap interval, and the worst workload.
        let summary = |t: Target,
                       base: Target,
                       pick: &dyn Fn(Work) -> bool|
         -> Option<((f64, f64, f64), f64, String)> {
            let picked: Vec<&WorkResult> = self.results.iter().filter(|r| pick(r.work)).collect();
            let per_work: Vec<Vec<f64>> = picked
                .iter()
                .map(|r| ratios_to(&r.rounds, t, base, Sample::cpu_per_1e5))
                .filter(|v| !v.is_empty())
                .collect();
            let geo = geo_interval(&per_work)?;
            let v: Vec<(f64, String)> = picked
                .iter()
                .filter_map(|r| {
                    let s = stat(&ratios_to(&r.rounds, t, base, Sample::cpu_per_1e5))?;
                    Some((s.med, r.work.label()))
                })
                .collect();
            let worst = v.iter().max_by(|a, b| a.0.total_cmp(&b.0))?;
            Some((geo, worst.0, worst.1.clone()))
        };
        let all = |w: Work| w.is_main();
        let echo_size = |n: usize| move |w: Work| matches!(w, Work::Echo { size, .. } if size == n);
        let deflate = |w: Work| matches!(w, Work::Deflate { .. });
        let limited = |w: Work| matches!(w, Work::Limit { .. });
        let mut cpu_goal =
            |what: &str, t: Target, base: Target, limit: f64, pick: &dyn Fn(Work) -> bool| {
                let w = summary(t, base, pick);
                g.push(Goal {
                    what: what.to_string(),
                    limit: if limit.is_finite() {
                        format!("≤ {:+.0} %", limit * 100.0)
                    } else {
                        "—".into()
                    },
                    got: w
                        .as_ref()
                        .map_or("not measured".into(), |((geo, lo, hi), r, l)| {
                            format!(
                                "{} [95 % interval {:+.1}, {:+.1}] (worst: {}, {l})",
                                pct(*geo),
                                (lo - 1.0) * 100.0,
                                (hi - 1.0) * 100.0,
                                pct(*r)
                            )
                        }),
                    met: match w {
                        Some(((_, lo, hi), _, _)) if limit.is_finite() => {
                            Met::upper(limit, lo - 1.0, hi - 1.0)
                        }
                        _ => Met::NotMeasured,
                    },
                });
            };
        cpu_goal(
            "module loaded, no directive: worker CPU per message, all workloads",
            Target::Loaded,
            Target::Stock,
            0.01,
            &all,
        );
        cpu_goal(
            "close records: worker CPU per message, all workloads",
            Target::Close,
            Target::Stock,
            0.03,
            &all,
        );
        cpu_goal(
            "frame records (buffer=64k): worker CPU per message, 1 KiB echo workloads",
            Target::Frame,
            Target::Stock,
            0.08,
            &echo_size(1024),
        );
        cpu_goal(
            "frame records, unbuffered: worker CPU per message, 1 KiB echo workloads \
             (reported; no limit of its own)",
            Target::FrameUnbuffered,
            Target::Stock,
            f64::INFINITY,
            &echo_size(1024),
        );
        cpu_goal(
            "frame records: worker CPU per message, 64 B echo workloads",
            Target::Frame,
            Target::Stock,
            0.30,
            &echo_size(64),
        );
        cpu_goal(
            "compressed 1 KiB echoes, message records + ws_log_payload 256 (inflating both \
             directions): worker CPU per message over capture off (message records, no \
             inflate) (reported; no limit given)",
            Target::MessagePayload,
            Target::Message,
            f64::INFINITY,
            &deflate,
        );
        cpu_goal(
            "compressed 1 KiB echoes, message records + ws_log_payload 256: worker CPU per \
             message over stock nginx (reported; no limit given)",
            Target::MessagePayload,
            Target::Stock,
            f64::INFINITY,
            &deflate,
        );
        cpu_goal(
            "compressed 1 KiB echoes, capture off (message records, no inflate): worker CPU \
             per message over stock nginx (reported; no limit given)",
            Target::Message,
            Target::Stock,
            f64::INFINITY,
            &deflate,
        );
        cpu_goal(
            "ws_limit that never triggers: worker CPU per message over the same tunnel \
             without it (close records), 1 KiB echo workloads",
            Target::Limit,
            Target::Close,
            0.05,
            &limited,
        );
        for r in self
            .results
            .iter()
            .filter(|r| matches!(r.work, Work::Shaped { .. }))
        {
            let rate = self.stats(r, Target::Shaped, |s| Some(s.msg_rate()));
            let cpu = self.stats(r, Target::Shaped, Sample::cpu_per_1e5);
            let core = self.stats(r, Target::Shaped, Sample::cpu_share);
            g.push(Goal {
                what: format!(
                    "shaping ws_limit (rate={SHAPED_RATE}r/s, one bucket for every tunnel), {}: \
                     achieved message rate over the configured one, and worker CPU",
                    r.work.label()
                ),
                limit: "—".into(),
                got: match (rate, cpu, core) {
                    (Some(x), Some(c), Some(k)) => {
                        let f = f64::from(SHAPED_RATE);
                        format!(
                            "{:.0} msgs/s = {:.3} × configured [{:.3}–{:.3}]; worker CPU \
                             {:.1} ms per 10^5 messages, {:.1} % of a core",
                            x.med,
                            x.med / f,
                            x.min / f,
                            x.max / f,
                            c.med,
                            k.med * 100.0
                        )
                    }
                    _ => "not measured".into(),
                },
                met: Met::NotMeasured,
            });
        }
        let mem = self.idle.and_then(|i| i.extra(Target::Close));
        g.push(Goal {
            what: "extra worker memory per tracked tunnel (close records vs stock)".into(),
            limit: "≤ 1024 B".into(),
            got: mem.map_or("not measured".into(), |s| format!("{:.0} B", s.med)),
            met: mem.map_or(Met::NotMeasured, |s| Met::upper(1024.0, s.min, s.max)),
        });
        if let Some(d) = self.idle_deflate {
            // Per round: the tunnel that inflates both directions over the same tunnel with
            // capture off, same compressed traffic.
            let on = stat(&d.diff(Target::MessagePayload, Target::Message));
            let budget = 2.0 * (32768.0 + 8192.0);
            g.push(Goal {
                what: "extra worker memory per compressed tunnel that inflates (message + \
                       payload 256 over message records; 15-bit windows, both directions)"
                    .into(),
                limit: format!("≤ 2 × (window + 8 KiB) = {budget:.0} B"),
                got: on.map_or("not measured".into(), |s| {
                    format!("{:.0} B [{:.0}–{:.0}]", s.med, s.min, s.max)
                }),
                met: on.map_or(Met::NotMeasured, |s| Met::upper(budget, s.min, s.max)),
            });
            // Per round: (compressed - stock with compressed traffic) - (uncompressed -
            // stock with uncompressed traffic), for the configurations that inflate nothing.
            // Exactly 0 cannot be shown: the heap's layout moves these figures from round to
            // round by far more than RSS pages would (33 B at 1000 tunnels). The noise taken
            // is how far stock nginx's own figure moved between rounds (plain or compressed);
            // one round is not judged.
            let spread = |i: &IdleResult| {
                min_max(&i.per_tunnel(Target::Stock)).map_or(0.0, |(lo, hi)| hi - lo)
            };
            let noise = self.idle.map_or(0.0, spread).max(spread(d));
            // Close records' tunnels write an access_log line whose format has 11 indexed
            // variables; nginx keeps a 16-byte slot per indexed variable in every request's
            // pool, and with a compressed tunnel's longer 101 that tips the pool into one more
            // 4 KiB block — stock nginx with a log format of as many indexed variables does the
            // same. So close records are compared with stock nginx + access_log (like for like);
            // the comparison with plain stock nginx is printed beside it.
            let compressed_vs_plain = |t: Target, base: Target| {
                self.idle.map(|p| {
                    let c = d.diff(t, base);
                    let u = p.diff(t, base);
                    c.iter().zip(&u).map(|(c, u)| c - u).collect::<Vec<f64>>()
                })
            };
            for t in [Target::Close, Target::Message] {
                let base = if t == Target::Close && d.rss.contains_key(&Target::StockLogged) {
                    Target::StockLogged
                } else {
                    Target::Stock
                };
                let off = compressed_vs_plain(t, base);
                let rounds = off.as_ref().map_or(0, Vec::len);
                let off = off.as_deref().and_then(stat);
                let beside = (base == Target::StockLogged)
                    .then(|| {
                        let old = compressed_vs_plain(t, Target::Stock)
                            .as_deref()
                            .and_then(stat)?;
                        let stock = compressed_vs_plain(Target::StockLogged, Target::Stock)
                            .as_deref()
                            .and_then(stat)?;
                        Some(format!(
                            "; against stock nginx without access_log {:+.0} B, as stock nginx \
                             + access_log itself: {:+.0} B",
                            old.med, stock.med
                        ))
                    })
                    .flatten()
                    .unwrap_or_default();
                g.push(Goal {
                    what: format!(
                        "extra worker memory per compressed tunnel that needs no inflate ({}; \
                         compressed vs uncompressed, each against {} with the same traffic)",
                        t.label(),
                        base.label()
                    ),
                    limit: if rounds >= 2 {
                        format!("0 B (± {noise:.0} B: stock nginx's own movement between rounds)")
                    } else {
                        "0 B".into()
                    },
                    got: off.map_or("not measured".into(), |s| {
                        format!(
                            "{:+.0} B [{:+.0}, {:+.0}] ({rounds} round{}{beside})",
                            s.med,
                            s.min,
                            s.max,
                            if rounds == 1 { ", not judged" } else { "s" }
                        )
                    }),
                    met: match off {
                        Some(_) if rounds < 2 => Met::NotMeasured,
                        Some(s) if s.min >= -noise && s.max <= noise => Met::Yes,
                        Some(s) if s.min > noise || s.max < -noise => Met::No,
                        Some(_) => Met::WithinNoise,
                        None => Met::NotMeasured,
                    },
                });
            }
        }
        let gbs = self.parser.and_then(|p| {
            p.get(&("parser".into(), "whole".into(), "1KiB".into()))
                .copied()
        });
        g.push(Goal {
            what: "parser, 1 KiB frames, whole buffers".into(),
            limit: "≥ 1 GB/s".into(),
            got: gbs.map_or("not measured".into(), |v| format!("{v:.2} GB/s")),
            met: gbs.map_or(
                Met::NotMeasured,
                |v| {
                    if v >= 1.0 {
                        Met::Yes
                    } else {
                        Met::No
                    }
                },
            ),
        });
        g
    }

    fn markdown(&self) -> String {
        let mut o = String::new();
        let m = self.machine;
        let a = self.args;
        let get = |k: &str| m.get(k).map_or("?", String::as_str);
        let _ = writeln!(o, "# nginx-ws benchmark results\n");
        let _ = writeln!(
            o,
            "{} run on {}: {} × {} ({} cores), {} RAM, Linux {}, {}, {}. \
             {} rounds of {:.2} s per configuration and workload, interleaved; {}; \
             total {:.0} s. \
             Load average at the start: {}; at the end: {}.\n",
            if a.quick { "Quick" } else { "Full" },
            get("date"),
            get("nproc"),
            get("cpu"),
            get("nproc"),
            get("memory"),
            get("kernel"),
            get("nginx"),
            m.get("haproxy").map_or("no HAProxy", String::as_str),
            a.rounds,
            a.duration.as_secs_f64(),
            if a.pin {
                "the proxy pinned to CPU 1, the generator and the upstream to CPU 0"
            } else {
                "no CPU pinning"
            },
            self.elapsed,
            get("loadavg_start"),
            get("loadavg_end"),
        );
        let _ = writeln!(o, "Configurations:\n");
        for t in self.used_targets() {
            let _ = writeln!(o, "- **{}**: {}", t.label(), t.describe());
        }
        let _ = writeln!(
            o,
            "\nA message is one client message echoed back by the upstream (one round trip, the \
             message crosses the proxy both ways); for `stream`, one message the upstream \
             received. MB/s is payload one way. CPU is the nginx worker's (HAProxy's) run time \
             from /proc/PID/task/*/schedstat over the measured window. Ratios are taken against \
             stock nginx (or the configuration named) within each round, then the median over \
             rounds; the spread in brackets is the min–max of those per-round ratios, in per \
             cent.\n"
        );

        let _ = writeln!(
            o,
            "## Targets\n\nInstruction counts (callgrind, user space, one connection; \
             scripts/bench-instructions) are the primary judge: the same binary and input give \
             the same count whatever else the machine does. CPU targets: the geometric mean \
             over the workloads named of each workload's median per-round ratio to stock \
             nginx (or the configuration named), with a 95 % bootstrap interval (the rounds of every workload drawn again, \
             {RESAMPLES} times); met when the whole interval is within the limit, within noise \
             when the limit lies inside it; the worst workload beside it.\n"
        );
        let _ = writeln!(o, "| Target | Limit | Measured | Met |\n|---|---|---|---|");
        for g in self.goals() {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} |",
                g.what,
                g.limit,
                g.got,
                g.met.text()
            );
        }

        for t in self.instructions {
            let _ = writeln!(
                o,
                "\n## Instructions per proxied message, {} (callgrind)\n\n{}",
                t.size,
                t.text.trim_end()
            );
        }

        let header = |o: &mut String, first: &str, with_direct: bool| {
            let cols: Vec<Target> = self
                .targets
                .iter()
                .copied()
                .filter(|t| with_direct || *t != Target::Direct)
                .collect();
            let _ = write!(o, "| {first} |");
            for t in &cols {
                let _ = write!(o, " {} |", t.label());
            }
            let _ = write!(o, "\n|---|");
            for _ in &cols {
                let _ = write!(o, "---:|");
            }
            let _ = writeln!(o);
            cols
        };

        if self.main().next().is_some() {
            let _ = writeln!(
                o,
                "\n## Proxy CPU per 10^5 messages (ms), and against stock nginx\n"
            );
            let cols = header(&mut o, "Workload", false);
            for r in self.main() {
                let _ = write!(o, "| {} |", r.work.label());
                for t in &cols {
                    let c = self.stats(r, *t, Sample::cpu_per_1e5);
                    let cell = match (c, *t == Target::Stock, Self::cpu_ratio(r, *t)) {
                        (Some(c), true, _) => format!("{:.1}", c.med),
                        (Some(c), false, Some(x)) => format!("{:.1} ({})", c.med, pct_spread(x)),
                        _ => "—".into(),
                    };
                    let _ = write!(o, " {cell} |");
                }
                let _ = writeln!(o);
            }

            let _ = writeln!(o, "\n## Messages/s (MB/s), and against stock nginx\n");
            let cols = header(&mut o, "Workload", true);
            for r in self.main() {
                let _ = write!(o, "| {} |", r.work.label());
                for t in &cols {
                    let rate = self.stats(r, *t, |s| Some(s.msg_rate()));
                    let mb = self.stats(r, *t, |s| Some(s.mb_rate()));
                    let x = ratio(&r.rounds, *t, |s| Some(s.msg_rate()));
                    let cell = match (rate, mb) {
                        (Some(v), Some(mb)) if *t == Target::Stock => {
                            format!("{:.0} ({:.1})", v.med, mb.med)
                        }
                        (Some(v), Some(mb)) => match x {
                            Some(x) => format!("{:.0} ({:.1}) {}", v.med, mb.med, pct_spread(x)),
                            None => format!("{:.0} ({:.1})", v.med, mb.med),
                        },
                        _ => "—".into(),
                    };
                    let _ = write!(o, " {cell} |");
                }
                let _ = writeln!(o);
            }

            let _ = writeln!(o, "\n## Round-trip latency p50 / p99 (µs)\n");
            let cols = header(&mut o, "Workload", true);
            for r in self
                .results
                .iter()
                .filter(|r| matches!(r.work, Work::Echo { .. }))
            {
                let _ = write!(o, "| {} |", r.work.label());
                for t in &cols {
                    let p50 = self.stats(r, *t, |s| s.p50_us);
                    let p99 = self.stats(r, *t, |s| s.p99_us);
                    let cell = match (p50, p99) {
                        (Some(a), Some(b)) => format!("{:.0} / {:.0}", a.med, b.med),
                        _ => "—".into(),
                    };
                    let _ = write!(o, " {cell} |");
                }
                let _ = writeln!(o);
            }
        }
        self.deflate_markdown(&mut o);
        self.limit_markdown(&mut o);

        if let Some(i) = self.idle {
            let _ = writeln!(
                o,
                "\n## Memory: {} idle tunnels (one round trip each), worker RSS\n",
                i.n
            );
            let _ = writeln!(
                o,
                "| Configuration | RSS before (KiB) | RSS with the tunnels (KiB) | per tunnel (B) | \
                 extra per tunnel vs stock (B) |\n|---|---:|---:|---:|---:|"
            );
            for (t, v) in &i.rss {
                let b: Vec<f64> = v.iter().map(|x| x.0 as f64).collect();
                let af: Vec<f64> = v.iter().map(|x| x.1 as f64).collect();
                let per = stat(&i.per_tunnel(*t));
                let extra = match t {
                    Target::Stock => "—".into(),
                    _ => i.extra(*t).map_or("—".into(), |s| format!("{:+.0}", s.med)),
                };
                let _ = writeln!(
                    o,
                    "| {} | {:.0} | {:.0} | {} | {extra} |",
                    t.label(),
                    median(&b).unwrap_or(0.0),
                    median(&af).unwrap_or(0.0),
                    per.map_or("—".into(), |s| format!("{:.0}", s.med)),
                );
            }
        }
        if let Some(d) = self.idle_deflate {
            let _ = writeln!(
                o,
                "\n## Memory: {} idle compressed tunnels ({IDLE_DEFLATE_TRIPS} compressed 1 KiB \
                 messages each way), worker RSS\n\nThe tunnels negotiated permessage-deflate (15-bit windows, \
                 context takeover). Message records without payload need no inflate; with \
                 `ws_log_payload 256` both directions inflate, so each tunnel holds two inflate \
                 states with their windows, written through by the {IDLE_DEFLATE_TRIPS} KiB of \
                 text each way. The last column compares each configuration's \
                 extra over stock with the same configuration's over stock in the uncompressed \
                 run above. Stock nginx + access_log writes an access_log line per tunnel with as \
                 many indexed variables as close records' format: nginx keeps 16 bytes per \
                 indexed variable in each request's pool, and its own row shows what a \
                 compressed tunnel's longer 101 does to that pool with no module loaded (one \
                 more 4 KiB block when it no longer fits); close records are judged against it.\n",
                d.n
            );
            let _ = writeln!(
                o,
                "| Configuration | RSS before (KiB) | RSS with the tunnels (KiB) | per tunnel (B) | \
                 extra per tunnel vs stock (B) | extra vs the same, uncompressed (B) |\n\
                 |---|---:|---:|---:|---:|---:|"
            );
            for (t, v) in &d.rss {
                let b: Vec<f64> = v.iter().map(|x| x.0 as f64).collect();
                let af: Vec<f64> = v.iter().map(|x| x.1 as f64).collect();
                let per = stat(&d.per_tunnel(*t));
                let (extra, vs_plain) = match t {
                    Target::Stock => ("—".into(), "—".into()),
                    _ => {
                        let c = d.diff(*t, Target::Stock);
                        let u = self.idle.map(|p| p.diff(*t, Target::Stock));
                        let both: Vec<f64> = u
                            .iter()
                            .flat_map(|u| c.iter().zip(u).map(|(c, u)| c - u))
                            .collect();
                        (
                            stat(&c).map_or("—".into(), |s| format!("{:+.0}", s.med)),
                            stat(&both).map_or("—".into(), |s| format!("{:+.0}", s.med)),
                        )
                    }
                };
                let _ = writeln!(
                    o,
                    "| {} | {:.0} | {:.0} | {} | {extra} | {vs_plain} |",
                    t.label(),
                    median(&b).unwrap_or(0.0),
                    median(&af).unwrap_or(0.0),
                    per.map_or("—".into(), |s| format!("{:.0}", s.med)),
                );
            }
        }

        if let Some(p) = self.parser.filter(|p| !p.is_empty()) {
            let _ = writeln!(
                o,
                "\n## Parser microbenchmarks (criterion, GB/s of wire bytes, median)\n\n\
                 `parser`: `frame::Parser::feed` alone; `observer`: `observe::Direction::feed` \
                 without payload capture (what a tracked tunnel runs per direction). Masked text \
                 frames, about 1 MiB per iteration.\n"
            );
            let _ = writeln!(
                o,
                "| Code | Frames | whole | 4093 B pieces | 1-7 B pieces |\n|---|---|---:|---:|---:|"
            );
            for group in ["parser", "observer"] {
                for size in ["64B", "1KiB", "1MiB"] {
                    let _ = write!(o, "| {group} | {size} |");
                    for split in ["whole", "4093B-pieces", "1-7B-pieces"] {
                        let v = p.get(&(group.into(), split.into(), size.into()));
                        let _ = write!(o, " {} |", v.map_or("—".into(), |v| format!("{v:.2}")));
                    }
                    let _ = writeln!(o);
                }
            }
        }

        let _ = writeln!(o, "\n## Detail: median [min–max] over the rounds\n");
        for r in self.results {
            let _ = writeln!(o, "### {}\n", r.work.label());
            let _ = writeln!(
                o,
                "| Configuration | messages/s | MB/s | p50 µs | p99 µs | CPU ms/10^5 msgs | \
                 CPU vs stock | msgs/s vs stock |\n|---|---:|---:|---:|---:|---:|---:|---:|"
            );
            let fmt = |s: Option<Stat>, d: usize| {
                s.map_or("—".into(), |s| {
                    format!("{:.d$} [{:.d$}–{:.d$}]", s.med, s.min, s.max, d = d)
                })
            };
            for t in &r.targets {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    t.label(),
                    fmt(self.stats(r, *t, |s| Some(s.msg_rate())), 0),
                    fmt(self.stats(r, *t, |s| Some(s.mb_rate())), 1),
                    fmt(self.stats(r, *t, |s| s.p50_us), 0),
                    fmt(self.stats(r, *t, |s| s.p99_us), 0),
                    fmt(self.stats(r, *t, Sample::cpu_per_1e5), 1),
                    fmt(Self::cpu_ratio(r, *t), 3),
                    fmt(ratio(&r.rounds, *t, |s| Some(s.msg_rate())), 3),
                );
            }
            let _ = writeln!(o);
        }
        o
    }

    fn json(&self) -> Value {
        let workloads: Vec<Value> = self
            .results
            .iter()
            .map(|r| {
                let mut per = serde_json::Map::new();
                for t in &r.targets {
                    let rounds: Vec<Value> = r
                        .rounds
                        .iter()
                        .filter_map(|x| x.get(t))
                        .map(|s| {
                            json!({
                                "messages": s.msgs, "seconds": s.secs, "bytes": s.bytes,
                                "cpu_ns": s.cpu_ns, "p50_us": s.p50_us, "p99_us": s.p99_us,
                            })
                        })
                        .collect();
                    per.insert(
                        t.id().into(),
                        json!({
                            "messages_per_s": stat_json(self.stats(r, *t, |s| Some(s.msg_rate()))),
                            "mb_per_s": stat_json(self.stats(r, *t, |s| Some(s.mb_rate()))),
                            "p50_us": stat_json(self.stats(r, *t, |s| s.p50_us)),
                            "p99_us": stat_json(self.stats(r, *t, |s| s.p99_us)),
                            "cpu_ms_per_1e5": stat_json(self.stats(r, *t, Sample::cpu_per_1e5)),
                            "cpu_ratio_to_stock": stat_json(Self::cpu_ratio(r, *t)),
                            "rate_ratio_to_stock":
                                stat_json(ratio(&r.rounds, *t, |s| Some(s.msg_rate()))),
                            "rounds": rounds,
                        }),
                    );
                }
                json!({"id": r.work.id(), "label": r.work.label(), "configurations": per})
            })
            .collect();
        let idle = self.idle.map(idle_json);
        let parser = self.parser.map(|p| {
            p.iter()
                .map(|((g, s, z), v)| json!({"code": g, "split": s, "frames": z, "gb_per_s": v}))
                .collect::<Vec<_>>()
        });
        let goals: Vec<Value> = self
            .goals()
            .into_iter()
            .map(|g| json!({"target": g.what, "limit": g.limit, "measured": g.got, "met": g.met.json()}))
            .collect();
        let configs: Vec<Value> = self
            .used_targets()
            .map(|t| json!({"id": t.id(), "label": t.label(), "setup": t.describe()}))
            .collect();
        json!({
            "machine": self.machine,
            "quick": self.args.quick,
            "rounds": self.args.rounds,
            "pinned": self.args.pin,
            "duration_s": self.args.duration.as_secs_f64(),
            "elapsed_s": self.elapsed,
            "configurations": configs,
            "targets": goals,
            "instructions": self.instructions.iter().map(|t| json!({
                "size": t.size,
                "rows": t.rows.iter().map(|r| json!({
                    "configuration": r.label, "per_message": r.per, "extra_vs_stock": r.extra,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "workloads": workloads,
            "idle": idle,
            "idle_deflate": self.idle_deflate.map(idle_json),
            "shaped_rate": SHAPED_RATE,
            "parser": parser,
        })
    }

    /// Tab-separated: workload, then each proxy's median CPU-per-message ratio to stock.
    fn ratios_dat(&self) -> String {
        let cols: Vec<Target> = self.proxies().filter(|t| *t != Target::Stock).collect();
        let mut o = String::from("workload");
        for t in &cols {
            let _ = write!(o, "\t\"{}\"", t.label());
        }
        o.push('\n');
        for r in self.main() {
            let _ = write!(o, "\"{}\"", r.work.label());
            for t in &cols {
                match Self::cpu_ratio(r, *t) {
                    Some(s) => {
                        let _ = write!(o, "\t{:.4}", s.med);
                    }
                    None => o.push_str("\tNaN"),
                }
            }
            o.push('\n');
        }
        o
    }
}
