//! `cargo xtask bench-instructions [ROUND_TRIPS] [SIZE]`: user-space instructions per proxied
//! message, counted by valgrind's callgrind. A repeatable figure (the same binary and input
//! give the same count whatever else the machine does), next to `cargo xtask bench`'s CPU
//! times, which move by several per cent from run to run on a shared machine. It leaves out
//! the kernel, where most of a proxy's time goes (send, recv, epoll): it says what the
//! module's own code costs, not the share of the worker's CPU.
//!
//! For each configuration nginx runs as one process (master_process off) under callgrind,
//! proxying to the bundled echo backend (examples/ws-echo.rs), while a Python websockets
//! client (bench_instructions_client.py) does N round trips of SIZE-byte messages on one
//! connection; a second run without round trips gives the fixed cost (startup, module
//! loading, the handshake), which is subtracted. Per message = (I(N) - I(0)) / 2N: each round
//! trip carries the message through the proxy twice.
//!
//! The compressed rows: the client negotiates permessage-deflate with `ws-echo --deflate`,
//! which returns every frame byte for byte, and sends different JSON-like texts; their extra
//! is counted over stock nginx carrying the same compressed traffic.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use crate::build::{self, Artifacts};
use crate::proc::{free_port, Guard};
use crate::{repo_root, Error};

const CLIENT: &str = include_str!("bench_instructions_client.py");

/// A configuration of the table.
struct Config {
    id: &'static str,
    label: &'static str,
    /// Loads the module.
    module: bool,
    /// In `http {}`.
    http: &'static str,
    /// In the proxied location.
    location: &'static str,
    /// Compressed traffic (permessage-deflate).
    deflate: bool,
}

const CLOSE_LOG: &str =
    "ws_log logs/ws.log buffer=64k flush=1s; ws_log_events close;\n            \
                         access_log logs/access.log ws;";
const WS_FORMAT: &str = "log_format ws \"$status $ws_client_frames $ws_upstream_frames \
                         $ws_client_messages $ws_upstream_messages $ws_client_bytes \
                         $ws_upstream_bytes $ws_close_code $ws_closed_by $ws_end $ws_duration\";";

const CONFIGS: [Config; 9] = [
    Config {
        id: "stock",
        label: "stock nginx",
        module: false,
        http: "",
        location: "",
        deflate: false,
    },
    Config {
        id: "loaded",
        label: "module, no directive",
        module: true,
        http: "",
        location: "",
        deflate: false,
    },
    Config {
        id: "close",
        label: "close records + $ws_* variables",
        module: true,
        http: WS_FORMAT,
        location: CLOSE_LOG,
        deflate: false,
    },
    Config {
        id: "limit",
        label: "as close, + a ws_limit that never triggers",
        module: true,
        http: concat!(
            "log_format ws \"$status $ws_client_frames $ws_upstream_frames \
             $ws_client_messages $ws_upstream_messages $ws_client_bytes \
             $ws_upstream_bytes $ws_close_code $ws_closed_by $ws_end $ws_duration\";",
            "\n    ws_limit_zone $binary_remote_addr zone=bench:1m rate=1000000r/s;"
        ),
        location: concat!(
            "ws_log logs/ws.log buffer=64k flush=1s; ws_log_events close;\n            \
             access_log logs/access.log ws;",
            "\n            ws_limit zone=bench burst=1000000;"
        ),
        deflate: false,
    },
    Config {
        id: "frame",
        label: "frame records",
        module: true,
        http: "",
        location: "ws_log logs/ws.log buffer=64k flush=1s; ws_log_events open frame close;",
        deflate: false,
    },
    Config {
        id: "payload",
        label: "frame + payload 64",
        module: true,
        http: "",
        location: "ws_log logs/ws.log buffer=64k flush=1s; ws_log_events open frame close; \
                   ws_log_payload 64;",
        deflate: false,
    },
    Config {
        id: "stock-deflate",
        label: "stock nginx, compressed traffic",
        module: false,
        http: "",
        location: "",
        deflate: true,
    },
    Config {
        id: "message-deflate",
        label: "message records, compressed traffic (capture off: no inflate)",
        module: true,
        http: "",
        location: "ws_log logs/ws.log buffer=64k flush=1s; ws_log_events open message close;",
        deflate: true,
    },
    Config {
        id: "payload-deflate",
        label: "message + payload 256, compressed traffic (inflating)",
        module: true,
        http: "",
        location: "ws_log logs/ws.log buffer=64k flush=1s; ws_log_events open message close; \
                   ws_log_payload 256;",
        deflate: true,
    },
];

fn say(what: &str) {
    eprintln!("\x1b[1mbench-instructions:\x1b[0m {what}");
}

pub fn main(args: &[String]) -> Result<(), Error> {
    let mut nums = Vec::new();
    for a in args {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            n => nums.push(n.parse::<u64>().map_err(|_| {
                Error::usage(format!("\"{n}\" is not a number: [ROUND_TRIPS] [SIZE]"))
            })?),
        }
    }
    let (trips, size) = match nums[..] {
        [] => (5000, 64),
        [t] => (t, 64),
        [t, s] => (t, s),
        _ => return Err(Error::usage("at most two arguments: [ROUND_TRIPS] [SIZE]")),
    };
    if trips == 0 {
        return Err(Error::usage("ROUND_TRIPS must be at least 1"));
    }
    say("building the module, nginx and examples/ws-echo.rs (release)");
    let a = build::build(&build::Options {
        release: true,
        nice: true,
    })?;
    let table = run(&a, trips, size)?;
    print!("{table}");
    Ok(())
}

/// Counts every configuration at `trips` round trips of `size`-byte messages; writes the table
/// to bench-results/instructions/<SIZE>B.md and returns it.
pub fn run(a: &Artifacts, trips: u64, size: u64) -> Result<String, Error> {
    let echo_bin = a.example("ws-echo")?;
    let repo = repo_root();
    let work = repo.join("target/bench-instructions");
    let _ = fs::remove_dir_all(&work);
    let results = repo.join("bench-results/instructions");
    for d in [&work, &results] {
        fs::create_dir_all(d).map_err(|e| Error::msg(format!("{}: {e}", d.display())))?;
    }
    let client = work.join("client.py");
    fs::write(&client, CLIENT).map_err(|e| Error::msg(format!("{}: {e}", client.display())))?;

    // The echo for plain traffic, and the byte-for-byte echo that accepts permessage-deflate.
    let plain_port = free_port()?;
    let mut plain = Guard::spawn(
        "ws-echo",
        Command::new(echo_bin).args(["--listen", &format!("127.0.0.1:{plain_port}")]),
        &work.join("echo.log"),
        libc::SIGTERM,
    )?;
    plain.wait_port(plain_port)?;
    let deflate_port = free_port()?;
    let mut deflate = Guard::spawn(
        "ws-echo --deflate",
        Command::new(echo_bin).args([
            "--listen",
            &format!("127.0.0.1:{deflate_port}"),
            "--deflate",
        ]),
        &work.join("echo-deflate.log"),
        libc::SIGTERM,
    )?;
    deflate.wait_port(deflate_port)?;

    let mut per = Vec::new();
    for c in &CONFIGS {
        say(&format!(
            "{}: 0 and {trips} round trips of {size} B under callgrind",
            c.label
        ));
        let echo = if c.deflate { deflate_port } else { plain_port };
        let base = count(a, &work, &client, c, echo, 0, size)?;
        let full = count(a, &work, &client, c, echo, trips, size)?;
        per.push((full as i64 - base as i64) / (2 * trips as i64));
    }
    plain.stop();
    deflate.stop();

    let table = render(trips, size, &nginx_version(&a.nginx), &per);
    let file = results.join(format!("{size}B.md"));
    fs::write(&file, &table).map_err(|e| Error::msg(format!("{}: {e}", file.display())))?;
    Ok(table)
}

/// The Markdown table: each configuration's instructions per message and its extra over stock
/// nginx (the compressed rows over stock nginx with compressed traffic).
fn render(trips: u64, size: u64, nginx: &str, per: &[i64]) -> String {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut t = format!(
        "User-space instructions per proxied message (callgrind; {trips} round trips of {size} B \
         messages on one connection, fixed cost subtracted), {date}, {nginx}:\n\n\
         | Configuration | instructions per message | extra vs stock nginx |\n|---|---:|---:|\n"
    );
    let mut base = 0;
    for (c, n) in CONFIGS.iter().zip(per) {
        if c.module {
            t.push_str(&format!("| {} | {n} | {:+} |\n", c.label, n - base));
        } else {
            base = *n;
            t.push_str(&format!("| {} | {n} | — |\n", c.label));
        }
    }
    t.push_str(&format!(
        "\nCompressed rows: a different JSON-like text of {size} B each time, sent by Python \
         websockets with permessage-deflate (15-bit windows, context takeover) to an echo that \
         returns its frames byte for byte; their extra is over stock nginx with the same \
         compressed traffic.\n"
    ));
    t
}

fn nginx_version(nginx: &Path) -> String {
    crate::proc::nginx_v(nginx)
        .rsplit(": ")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Instructions nginx executed for configuration `c` and `trips` round trips.
fn count(
    a: &Artifacts,
    work: &Path,
    client: &Path,
    c: &Config,
    echo: u16,
    trips: u64,
    size: u64,
) -> Result<u64, Error> {
    let dir = work.join(format!("{}-{trips}", c.id));
    fs::create_dir_all(dir.join("logs"))
        .map_err(|e| Error::msg(format!("{}: {e}", dir.display())))?;
    let port = free_port()?;
    let load = if c.module {
        format!("load_module {};", a.module.display())
    } else {
        String::new()
    };
    let conf = format!(
        "{load}
master_process off;
daemon off;
error_log logs/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    {http}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{echo};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection upgrade;
            {location}
        }}
    }}
}}
",
        http = c.http,
        location = c.location,
    );
    let conf_file = dir.join("nginx.conf");
    fs::write(&conf_file, conf).map_err(|e| Error::msg(format!("{e}")))?;
    let log = dir.join("valgrind.log");
    let mut prefix = dir.clone().into_os_string();
    prefix.push("/");
    let mut vg = Guard::spawn(
        &format!("nginx ({}) under valgrind", c.id),
        Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!(
                "--callgrind-out-file={}",
                dir.join("callgrind.out").display()
            ))
            .arg(&a.nginx)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf_file),
        &log,
        libc::SIGQUIT,
    )?;
    // valgrind starts nginx slowly.
    wait_long(&mut vg, port, c.id, &dir)?;
    let mut cmd = Command::new("python3");
    cmd.arg(client)
        .arg(format!("ws://127.0.0.1:{port}/"))
        .arg(trips.to_string())
        .arg(size.to_string());
    if c.deflate {
        cmd.arg("--deflate");
    }
    let st = cmd
        .status()
        .map_err(|e| Error::msg(format!("python3: {e}")))?;
    if !st.success() {
        return Err(Error::msg(format!("client failed ({})", c.id)));
    }
    sleep(Duration::from_millis(500));
    vg.stop();
    let text = fs::read_to_string(&log).unwrap_or_default();
    collected(&text).ok_or_else(|| {
        Error::msg(format!(
            "no instruction count in {} (valgrind did not finish?)",
            log.display()
        ))
    })
}

/// Waits up to 30 s for nginx under valgrind to listen.
fn wait_long(g: &mut Guard, port: u16, id: &str, dir: &Path) -> Result<(), Error> {
    for _ in 0..3 {
        if g.wait_port(port).is_ok() {
            return Ok(());
        }
    }
    Err(Error::msg(format!(
        "nginx ({id}) did not start; see {}",
        dir.display()
    )))
}

/// The total of callgrind's "Collected : N" line.
fn collected(log: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.split("Collected : ").nth(1))
        .and_then(|v| v.trim().parse().ok())
}

/// Where `run` writes the table of `size`-byte messages.
pub fn table_path(size: u64) -> PathBuf {
    repo_root().join(format!("bench-results/instructions/{size}B.md"))
}

const HELP: &str = "\
Usage: cargo xtask bench-instructions [ROUND_TRIPS (default 5000)] [SIZE (default 64)]

User-space instructions per proxied message, counted by valgrind's callgrind: repeatable on a
loaded machine, unlike CPU times. For each configuration (stock nginx, the module loaded
without directives, close records with $ws_* variables, the same with a ws_limit that never
triggers, frame records, frame records with 64 payload bytes; and with compressed
permessage-deflate traffic: stock nginx, message records without payload (no inflate) and
with ws_log_payload 256 (inflating)), nginx runs as one process under callgrind while a
Python websockets client does ROUND_TRIPS round trips of SIZE-byte messages on one
connection; a run without round trips gives the fixed cost, which is subtracted.

Prints a Markdown table; also writes it to bench-results/instructions/<SIZE>B.md. Needs
valgrind and Python's websockets (scripts/bench-instructions installs them).
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_callgrinds_total() {
        let log = "==1== Events    : Ir\n==1== Collected : 123456789\n==1==\n";
        assert_eq!(collected(log), Some(123456789));
        assert_eq!(collected("==1== no\n"), None);
    }

    #[test]
    fn extra_is_over_the_stock_row_above() {
        let t = render(
            10,
            64,
            "nginx/1",
            &[800, 801, 1000, 1100, 1800, 3000, 790, 2500, 9000],
        );
        assert!(t.contains("| stock nginx | 800 | — |"));
        assert!(t.contains("| module, no directive | 801 | +1 |"));
        assert!(t.contains("| stock nginx, compressed traffic | 790 | — |"));
        assert!(
            t.contains("| message + payload 256, compressed traffic (inflating) | 9000 | +8210 |")
        );
    }
}
