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
