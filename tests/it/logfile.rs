//! The log file: buffering, reopen, and writes that fail.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

async fn exchange(ngx: &Nginx, n: usize) {
    let mut ws = connect(&ngx.url("/")).await;
    for i in 0..n {
        ws.send(Message::Text(format!("m{i}"))).await.unwrap();
        loop {
            if let Message::Text(_) = ws.next().await.unwrap().unwrap() {
                break;
            }
        }
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_moves_to_a_new_file() {
    let echo = echo_server().await;
    let loc = format!(
        "location / {{ ws_log logs/ws.log; {} }}",
        proxy_to(echo.addr)
    );
    let ngx = Nginx::start(1, "", &loc);
    exchange(&ngx, 1).await;
    ngx.wait_records("logs/ws.log", closes(1)).await;
    std::fs::rename(ngx.path("logs/ws.log"), ngx.path("logs/ws.log.1")).unwrap();
    ngx.signal(libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ngx.path("logs/ws.log").exists() {
        assert!(Instant::now() < deadline, "not reopened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give the worker time to reopen too (the master signals it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    exchange(&ngx, 1).await;
    ngx.wait_records("logs/ws.log", closes(1)).await;
    assert_eq!(of_event(&ngx.records("logs/ws.log.1"), "close").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_records_flush_on_timer_and_close() {
    let echo = echo_server().await;
    let loc = format!(
        "location / {{ ws_log logs/ws.log buffer=64k flush=500ms;\n\
         ws_log_events open frame close; {} }}",
        proxy_to(echo.addr)
    );
    let ngx = Nginx::start(1, "", &loc);
    let mut ws = connect(&ngx.url("/")).await;
    ws.send(Message::Text("one".into())).await.unwrap();
    ws.next().await.unwrap().unwrap();
    // Buffered: not written at once, but by the flush timer while the tunnel is still open.
    let recs = ngx.wait_records("logs/ws.log", |r| r.len() >= 3).await;
    assert_eq!(recs[0]["event"], "open");
    assert!(of_event(&recs, "close").is_empty());
    ws.send(Message::Text("two".into())).await.unwrap();
    ws.next().await.unwrap().unwrap();
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    // The close record comes with everything before it, flushed at tunnel close.
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    assert_eq!(of_event(&recs, "frame").len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_writes_drop_records_not_tunnels() {
    let echo = echo_server().await;
    let loc = format!(
        "location / {{ ws_log /dev/full; ws_log_events open frame message close; {} }}",
        proxy_to(echo.addr)
    );
    let ngx = Nginx::start(1, "", &loc);
    let started = Instant::now();
    for _ in 0..3 {
        exchange(&ngx, 20).await;
    }
    let secs = started.elapsed().as_secs() + 1;
    let log = ngx.read("logs/error.log");
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("log records dropped"))
        .collect();
    assert!(!errors.is_empty(), "no drop error logged:\n{log}");
    assert!(
        errors.len() as u64 <= secs + 1,
        "{} errors in {secs}s: not rate-limited",
        errors.len()
    );
    assert!(
        errors[0].contains("write() to \"/dev/full\" failed"),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].contains("No space left on device"),
        "{}",
        errors[0]
    );
    // Every record was dropped and counted: 3 tunnels x (open + 81 frames + 40 messages + close).
    let last = errors.last().unwrap();
    let n: u64 = last
        .split(", ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("count in {last}"));
    assert!(n >= 1, "{last}");
    ngx.assert_no_crash();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffer_writes_whole_records_in_order() {
    let echo = echo_server().await;
    // No flush= and a buffer of a few records: records reach the file only when it fills,
    // and one record (1,500 payload bytes) is larger than the whole buffer.
    let loc = format!(
        "location / {{ ws_log logs/ws.log buffer=1k;\n\
         ws_log_events frame close; ws_log_payload 1500; {} }}",
        proxy_to(echo.addr)
    );
    let ngx = Nginx::start(1, "", &loc);
    let mut ws = connect(&ngx.url("/")).await;
    let texts: Vec<String> = (0..40)
        .map(|i| {
            if i == 20 {
                "x".repeat(1500)
            } else {
                format!("m{i}")
            }
        })
        .collect();
    for t in &texts {
        ws.send(Message::Text(t.clone())).await.unwrap();
        ws.next().await.unwrap().unwrap();
    }
    // The tunnel is open: what is on disk came out because the buffer filled.
    let recs = ngx
        .wait_records("logs/ws.log", |r| of_event(r, "frame").len() >= 60)
        .await;
    assert!(of_event(&recs, "close").is_empty());
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    for from in ["client", "upstream"] {
        let payloads: Vec<&str> = of_event(&recs, "frame")
            .into_iter()
            .filter(|r| r["from"] == from && r["opcode"] == "text")
            .map(|r| r["payload"].as_str().unwrap())
            .collect();
        assert_eq!(payloads, texts, "{from}'s frames, in order");
    }
    assert_eq!(of_event(&recs, "frame").len(), 82);
    assert_eq!(recs.last().unwrap()["event"], "close");
}

/// Reads a FIFO in a thread: nothing for `stall`, then `chunk` bytes every `pause` until the
/// writer closes; returns everything read.
fn fifo_reader(
    path: std::path::PathBuf,
    stall: Duration,
    chunk: usize,
    pause: Duration,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        use std::io::Read;
        // Opening for reading waits for nginx's master to open the writing end.
        let mut f = std::fs::File::open(&path).expect("open fifo");
        std::thread::sleep(stall);
        let mut out = Vec::new();
        let mut b = vec![0u8; chunk];
        loop {
            match f.read(&mut b) {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&b[..n]),
            }
            std::thread::sleep(pause);
        }
    })
}

/// Every line parses as one JSON record: no torn line continued by the next record.
fn whole_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    let text = String::from_utf8_lossy(bytes);
    assert!(text.is_empty() || text.ends_with('\n'), "last line torn");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line ({e}): {l}")))
        .collect()
}

/// A log into a pipe whose reader stalls, then reads slowly: the tunnel never waits for the
/// log (records that do not fit are dropped and counted), and every line that arrives is a
/// whole record, even though writes into a full pipe are short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_pipe_never_stalls_the_tunnel_nor_tears_lines() {
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("ws.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    let reader = fifo_reader(
        fifo.clone(),
        Duration::from_secs(4),
        700,
        Duration::from_millis(2),
    );
    let loc = format!(
        "location / {{ ws_log {}; ws_log_events open frame message close; ws_log_payload 1000;\n\
         {} }}",
        fifo.display(),
        proxy_to(echo.addr)
    );
    let ngx = Nginx::start(1, "", &loc);
    let mut ws = connect(&ngx.url("/")).await;
    // About 4.5 KB of records per exchange: the 64 KiB pipe fills after ~15.
    let started = Instant::now();
    for i in 0..200 {
        ws.send(Message::Text(format!("{i:04}{}", "x".repeat(996))))
            .await
            .unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(3), ws.next()).await;
        assert!(
            matches!(echoed, Ok(Some(Ok(Message::Text(_))))),
            "exchange {i}: the tunnel waited for the log ({:?} in)",
            started.elapsed()
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the tunnel was held up by the stalled log: {:?}",
        started.elapsed()
    );
    // The reader wakes up; what the proxy kept back reaches it, then the close record.
    tokio::time::sleep(Duration::from_secs(5)).await;
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ngx.read("logs/error.log").contains("log records dropped") {
        assert!(Instant::now() < deadline, "no drop logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(ngx); // nginx exits: the writing end closes and the reader ends.
    let recs = whole_lines(&reader.join().unwrap());
    assert_eq!(recs[0]["event"], "open");
    assert_eq!(recs.last().unwrap()["event"], "close", "close record lost");
    let frames = of_event(&recs, "frame").len();
    assert!(frames > 20 && frames < 400, "{frames} frame records");
}

/// nginx in the foreground (as in a container), its stdout a pipe read `chunk` bytes a
/// millisecond by a thread.
struct ForegroundNginx {
    child: std::process::Child,
    reader: std::thread::JoinHandle<Vec<u8>>,
}

impl ForegroundNginx {
    /// Writes `conf` into `dir` and starts nginx there, waiting until it listens on `port`.
    fn start(dir: &tempfile::TempDir, conf: &str, port: u16, chunk: usize) -> ForegroundNginx {
        use std::process::{Command, Stdio};
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let mut child = Command::new(nginx_bin())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut all = Vec::new();
            let mut b = vec![0u8; chunk];
            loop {
                match out.read(&mut b) {
                    Ok(0) | Err(_) => return all,
                    Ok(n) => all.extend_from_slice(&b[..n]),
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        ForegroundNginx { child, reader }
    }

    /// Stops nginx gracefully; returns everything it wrote to its stdout.
    fn quit(mut self) -> Vec<u8> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        self.child.wait().unwrap();
        self.reader.join().unwrap()
    }
}

/// `ws_log /dev/stdout` with nginx in the foreground, its stdout a pipe read slowly (as in a
/// container): every line is a whole record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_stdout_of_a_foreground_nginx_gets_whole_lines() {
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let port = free_port();
    let conf = main_conf(
        1,
        &format!(
            "server {{ listen 127.0.0.1:{port};\n\
             location / {{ ws_log /dev/stdout; ws_log_events open frame close;\n\
             ws_log_payload 2000; {} }} }}",
            proxy_to(echo.addr)
        ),
    );
    let nginx = ForegroundNginx::start(&dir, &conf, port, 333);
    let mut ws = connect(&format!("ws://127.0.0.1:{port}/")).await;
    for i in 0..100 {
        ws.send(Message::Text(format!("{i:04}{}", "y".repeat(1996))))
            .await
            .unwrap();
        ws.next().await.unwrap().unwrap();
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    tokio::time::sleep(Duration::from_secs(3)).await;
    let recs = whole_lines(&nginx.quit());
    assert_eq!(recs[0]["event"], "open");
    // A reader slower than the traffic loses records (counted), never line boundaries.
    let errors = std::fs::read_to_string(dir.path().join("logs/error.log")).unwrap_or_default();
    let complete = recs.len() == 202 && recs.last().unwrap()["event"] == "close";
    assert!(
        complete || errors.contains("log records dropped"),
        "{} records, no drop logged",
        recs.len()
    );
}

/// Several workers write `/dev/stdout` (one pipe, as in a container with `worker_processes
/// auto`), read slowly: their writes must not interleave inside a line, whether records are
/// written one by one (here through a second name of the same pipe) or from a buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_stdout_shared_by_several_workers_gets_whole_lines() {
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let port = free_port();
    let conf = main_conf(
        4,
        &format!(
            "server {{ listen 127.0.0.1:{port} reuseport;\n\
             location / {{ ws_log /proc/self/fd/1; ws_log_events open frame close;\n\
             ws_log_payload 300; {p} }}\n\
             location /buffered {{ ws_log /dev/stdout buffer=16k flush=100ms;\n\
             ws_log_events open frame close;\n\
             ws_log_payload 300; {p} }} }}",
            p = proxy_to(echo.addr)
        ),
    );
    let nginx = ForegroundNginx::start(&dir, &conf, port, 1000);
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let url = format!(
                "ws://127.0.0.1:{port}/{}",
                if t % 2 == 0 { "" } else { "buffered" }
            );
            tokio::spawn(async move {
                let mut ws = connect(&url).await;
                for i in 0..150 {
                    ws.send(Message::Text(format!("{t:02}-{i:04}{}", "z".repeat(290))))
                        .await
                        .unwrap();
                    ws.next().await.unwrap().unwrap();
                }
                ws.close(None).await.unwrap();
                while let Some(Ok(_)) = ws.next().await {}
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let recs = whole_lines(&nginx.quit());
    assert!(
        of_event(&recs, "frame").len() > 100,
        "{} records",
        recs.len()
    );
}
