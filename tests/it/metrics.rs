//! `ws_status_zone` / `ws_status`: counters shared by every worker, exact totals, reloads,
//! the JSON and Prometheus outputs, a full zone, and configuration errors.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

/// A plain HTTP/1.0 GET: status line code, headers, body.
pub async fn get(port: u16, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_string(), body.to_string())
}

pub async fn status_json(port: u16) -> Value {
    status_json_at(port, "/status").await
}

async fn status_json_at(port: u16, path: &str) -> Value {
    let (code, head, body) = get(port, path).await;
    assert_eq!(code, 200, "{head}\n{body}");
    assert!(head.contains("Content-Type: application/json"), "{head}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The entry of an upstream label.
fn entry<'a>(v: &'a Value, upstream: &str) -> &'a Value {
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["upstream"] == upstream)
        .unwrap_or_else(|| panic!("no entry {upstream} in {v:#}"))
}

/// Polls the status until `pred` holds for it.
async fn wait_status(port: u16, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = status_json(port).await;
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the JSON status at `path` until `n` tunnels have closed, over all label sets.
pub async fn wait_closed(port: u16, path: &str, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = status_json_at(port, path).await;
        let closed: u64 = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["tunnels"]["closed"].as_u64().unwrap())
            .sum();
        if closed >= n {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} closed: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count(s: &str, needle: &str) -> usize {
    s.matches(needle).count()
}

/// Sends SIGHUP and waits until `workers` new worker processes have started.
pub async fn reload(ngx: &Nginx, workers: usize) {
    let before = count(&ngx.read("logs/error.log"), "start worker process");
    ngx.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&ngx.read("logs/error.log"), "start worker process") < before + workers {
        assert!(
            Instant::now() < deadline,
            "no new workers:\n{}",
            ngx.read("logs/error.log")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reloads with no tunnel open and waits until the old workers have exited: until then they
/// may still accept a connection, counted in their configuration's zone.
async fn reload_idle(ngx: &Nginx, workers: usize) {
    let exited = count(&ngx.read("logs/error.log"), "exited with code");
    reload(ngx, workers).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&ngx.read("logs/error.log"), "exited with code") < exited + workers {
        assert!(Instant::now() < deadline, "{}", ngx.read("logs/error.log"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const TEXTS: usize = 3;
const BINS: usize = 2;
const SIZE: usize = 100;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends TEXTS text messages of SIZE bytes and BINS binary ones of SIZE+1, reading each echo.
async fn talk(ws: &mut Ws) {
    for i in 0..TEXTS + BINS {
        let m = if i < TEXTS {
            Message::Text("t".repeat(SIZE))
        } else {
            Message::Binary(vec![7; SIZE + 1])
        };
        ws.send(m.clone()).await.unwrap();
        loop {
            let got = ws.next().await.unwrap().unwrap();
            if got.is_text() || got.is_binary() {
                assert_eq!(got, m);
                break;
            }
        }
    }
}

/// Closes with 1000 "bye" (5 payload bytes; the echo server answers with the same).
async fn bye(mut ws: Ws) {
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

fn server(port: u16, echo: &Echo, extra: &str) -> String {
    format!(
        "ws_status_zone ws_stats 1m;\n\
         log_format pid '$pid $status';\n\
         upstream backend {{ server {echo}; }}\n\
         server {{\n\
           listen 127.0.0.1:{port} reuseport;\n\
           location /ws {{\n\
             access_log logs/ws-access.log pid;\n\
             proxy_pass http://backend;\n\
             proxy_http_version 1.1;\n\
             proxy_set_header Upgrade $http_upgrade;\n\
             proxy_set_header Connection \"upgrade\";\n\
           }}\n\
           location = /status {{ ws_status; }}\n\
           location = /metrics {{ ws_status prometheus; }}\n\
           {extra}\n\
         }}",
        echo = echo.addr
    )
}

/// What `n` tunnels that each ran `talk` and `bye` must have counted.
fn assert_totals(e: &Value, n: u64) {
    let (t, b, s) = (TEXTS as u64, BINS as u64, SIZE as u64);
    assert_eq!(e["tunnels"]["opened"], n, "{e:#}");
    assert_eq!(e["tunnels"]["closed"], n, "{e:#}");
    assert_eq!(e["tunnels"]["active"], 0, "{e:#}");
    for dir in ["client", "upstream"] {
        let f = &e["frames"][dir];
        assert_eq!(f["text"], n * t, "{dir} {e:#}");
        assert_eq!(f["binary"], n * b, "{dir} {e:#}");
        assert_eq!(f["close"], n, "{dir} {e:#}");
        assert_eq!(f["ping"], 0);
        assert_eq!(f["continuation"], 0);
        let by = &e["bytes"][dir];
        assert_eq!(by["text"], n * t * s, "{dir} {e:#}");
        assert_eq!(by["binary"], n * b * (s + 1), "{dir} {e:#}");
        assert_eq!(by["close"], n * 5, "{dir} {e:#}");
        assert_eq!(e["messages"][dir]["text"], n * t);
        assert_eq!(e["messages"][dir]["binary"], n * b);
        assert_eq!(
            e["close_codes"][dir],
            serde_json::json!({"1000": n}),
            "{e:#}"
        );
    }
    assert_eq!(e["frames"]["proxy"]["close"], 0);
    assert_eq!(e["close_codes"]["proxy"], serde_json::json!({}));
    assert_eq!(e["ends"]["normal"], n, "{e:#}");
    let ends: u64 = e["ends"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(ends, n);
    assert_eq!(e["duration"]["count"], n);
    let buckets = e["duration"]["buckets"].as_array().unwrap();
    assert_eq!(buckets.last().unwrap()["count"], n);
    assert_eq!(buckets.last().unwrap()["le"], "+Inf");
}

async fn run_clients(url: &str, n: usize) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move {
                let mut ws = connect(&url).await;
                talk(&mut ws).await;
                bye(ws).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_totals_across_workers_and_a_reload() {
    let echo = echo_server().await;
    let port = free_port();
    let ngx = Nginx::start_conf(&main_conf(2, &server(port, &echo, "")), port);
    let url = ngx.url("/ws/x");

    // Phase 1: 30 concurrent tunnels, start to end.
    run_clients(&url, 30).await;
    let v = wait_status(port, "30 closed", |v| {
        entry(v, "backend")["tunnels"]["closed"] == 30
    })
    .await;
    assert_totals(entry(&v, "backend"), 30);
    assert_eq!(v["zone"], "ws_stats");
    assert_eq!(v["size"], 1 << 20);
    assert_eq!(v["used"], 1);
    assert_eq!(v["log_records_dropped"], 0);

    // Phase 2: 20 tunnels stay open over a reload.
    let mut open = Vec::new();
    for _ in 0..20 {
        let mut ws = connect(&url).await;
        talk(&mut ws).await;
        open.push(ws);
    }
    let v = status_json(port).await;
    assert_eq!(entry(&v, "backend")["tunnels"]["active"], 20);
    assert_eq!(entry(&v, "backend")["tunnels"]["opened"], 50);
    reload(&ngx, 2).await;
    // New workers read the same zone.
    for _ in 0..4 {
        let v = status_json(port).await;
        let e = entry(&v, "backend");
        assert_eq!(e["tunnels"]["active"], 20, "{v:#}");
        assert_eq!(e["tunnels"]["opened"], 50, "{v:#}");
        assert_eq!(e["frames"]["client"]["text"], 50 * TEXTS as u64);
    }
    // Phase 3: 10 tunnels through the new workers while the old ones still serve 20.
    run_clients(&url, 10).await;
    // The old workers' tunnels finish and are counted in the same zone.
    for ws in open {
        bye(ws).await;
    }
    let v = wait_status(port, "60 closed", |v| {
        entry(v, "backend")["tunnels"]["closed"] == 60
    })
    .await;
    assert_totals(entry(&v, "backend"), 60);

    // Tunnels were served by more than one worker (which ones took phase 3 depends on when
    // the old workers closed their listening sockets).
    let lines = ngx.wait_lines("logs/ws-access.log", 60).await;
    let mut pids: Vec<&str> = lines
        .iter()
        .filter(|l| l.ends_with(" 101"))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(pids.len(), 60);
    pids.sort();
    pids.dedup();
    assert!(pids.len() >= 2, "tunnels not spread over workers: {pids:?}");
    ngx.assert_no_crash();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_output_parses() {
    let echo = echo_server().await;
    let port = free_port();
    let ngx = Nginx::start_conf(&main_conf(2, &server(port, &echo, "")), port);
    run_clients(&ngx.url("/ws/p"), 4).await;
    wait_status(port, "4 closed", |v| {
        entry(v, "backend")["tunnels"]["closed"] == 4
    })
    .await;

    for path in ["/metrics", "/status?format=prometheus"] {
        let (code, head, body) = get(port, path).await;
        assert_eq!(code, 200);
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        let scrape =
            prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        // Every sample line was understood (histogram buckets are grouped by the parser).
        let sample_lines = body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count();
        let parsed: usize = scrape
            .samples
            .iter()
            .map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) => h.len(),
                _ => 1,
            })
            .sum();
        assert_eq!(parsed, sample_lines, "{body}");
        assert!(scrape.docs.keys().all(|k| k.starts_with("nginx_ws_")));

        let find = |metric: &str, labels: &[(&str, &str)]| -> &prometheus_parse::Sample {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .unwrap_or_else(|| panic!("no {metric} {labels:?} in\n{body}"))
        };
        let counter = |metric: &str, labels: &[(&str, &str)]| match find(metric, labels).value {
            prometheus_parse::Value::Counter(v) => v,
            ref other => panic!("{metric} is {other:?}"),
        };
        let b = [("upstream", "backend"), ("route", "")];
        assert_eq!(counter("nginx_ws_tunnels_opened_total", &b), 4.0);
        assert_eq!(counter("nginx_ws_tunnels_closed_total", &b), 4.0);
        match find("nginx_ws_tunnels_active", &b).value {
            prometheus_parse::Value::Gauge(v) => assert_eq!(v, 0.0),
            ref other => panic!("{other:?}"),
        }
        let fr = |dir, op| {
            let l = [b[0], ("direction", dir), ("opcode", op)];
            counter("nginx_ws_frames_total", &l)
        };
        assert_eq!(fr("client", "text"), 4.0 * TEXTS as f64);
        assert_eq!(fr("upstream", "binary"), 4.0 * BINS as f64);
        assert_eq!(fr("proxy", "close"), 0.0);
        let l = [b[0], ("direction", "client"), ("opcode", "text")];
        assert_eq!(
            counter("nginx_ws_payload_bytes_total", &l),
            (4 * TEXTS * SIZE) as f64
        );
        assert_eq!(counter("nginx_ws_messages_total", &l), (4 * TEXTS) as f64);
        let l = [b[0], ("direction", "upstream"), ("code", "1000")];
        assert_eq!(counter("nginx_ws_close_codes_total", &l), 4.0);
        assert_eq!(
            counter("nginx_ws_tunnel_ends_total", &[b[0], ("end", "normal")]),
            4.0
        );
        for reason in ["origin", "handshake", "no_route", "not_upgrade"] {
            let l = [b[0], ("reason", reason)];
            assert_eq!(counter("nginx_ws_handshake_rejections_total", &l), 0.0);
        }
        assert_eq!(counter("nginx_ws_log_records_dropped_total", &[]), 0.0);
        match &find("nginx_ws_tunnel_duration_seconds", &b).value {
            prometheus_parse::Value::Histogram(h) => {
                assert_eq!(h.len(), 14);
                assert!(h.last().unwrap().less_than.is_infinite());
                assert_eq!(h.last().unwrap().count, 4.0);
                assert!(h.windows(2).all(|w| w[0].count <= w[1].count));
            }
            other => panic!("{other:?}"),
        }
        let c = find("nginx_ws_tunnel_duration_seconds_count", &b);
        assert_eq!(c.value, prometheus_parse::Value::Untyped(4.0));
    }
    // The query overrides the location's format, and a bad one is refused.
    let (code, head, _) = get(port, "/metrics?format=json").await;
    assert_eq!(code, 200);
    assert!(head.contains("application/json"));
    let (code, _, _) = get(port, "/status?format=xml").await;
    assert_eq!(code, 400);
    ngx.assert_no_crash();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_without_ws_directives_is_counted() {
    let echo = echo_server().await;
    let port = free_port();
    let extra = format!("location /direct {{ {} }}", proxy_to(echo.addr));
    let ngx = Nginx::start_conf(&main_conf(1, &server(port, &echo, &extra)), port);
    run_clients(&ngx.url("/direct"), 2).await;
    // No upstream{} block: the label is the peer's address.
    let label = echo.addr.to_string();
    let v = wait_status(port, "2 closed", |v| {
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["upstream"] == label && e["tunnels"]["closed"] == 2)
    })
    .await;
    assert_totals(entry(&v, &label), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_zone_counts_new_label_sets_as_other() {
    let echo = echo_server().await;
    let port = free_port();
    let mut http = String::from("ws_status_zone tiny 32k;\n");
    let mut locations = String::new();
    for i in 0..40 {
        http += &format!("upstream u{i} {{ server {}; }}\n", echo.addr);
        locations += &format!(
            "location /u{i} {{ proxy_pass http://u{i}; proxy_http_version 1.1; \
             proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade; }}\n"
        );
    }
    http += &format!(
        "server {{ listen 127.0.0.1:{port}; {locations} location = /status {{ ws_status; }} }}"
    );
    let ngx = Nginx::start_conf(&main_conf(2, &http), port);
    for round in 0..2 {
        for i in 0..40 {
            let mut ws = connect(&ngx.url(&format!("/u{i}"))).await;
            talk(&mut ws).await;
            bye(ws).await;
        }
        let v = wait_status(port, "all closed", |v| {
            v["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["tunnels"]["closed"].as_u64().unwrap())
                .sum::<u64>()
                == 40 * (round + 1)
        })
        .await;
        let cap = v["capacity"].as_u64().unwrap();
        assert!((2..40).contains(&cap), "capacity {cap}");
        assert_eq!(v["used"], cap);
        let entries = v["entries"].as_array().unwrap();
        assert_eq!(entries.len() as u64, cap + 1);
        let other = entries.last().unwrap();
        assert_eq!(other["other"], true);
        assert_eq!(other["upstream"], "(other)");
        assert_eq!(other["tunnels"]["opened"], (40 - cap) * (round + 1));
        for e in &entries[..entries.len() - 1] {
            assert_eq!(e["other"], false);
            assert_totals(e, round + 1);
        }
        assert_totals(other, (40 - cap) * (round + 1));
    }
    let log = ngx.read("logs/error.log");
    assert_eq!(
        count(&log, "ws_status_zone \"tiny\" is full"),
        1,
        "logged once:\n{log}"
    );
    ngx.assert_no_crash();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_change_on_reload() {
    let echo = echo_server().await;
    let port = free_port();
    let conf = main_conf(1, &server(port, &echo, ""));
    let ngx = Nginx::start_conf(&conf, port);
    run_clients(&ngx.url("/ws"), 3).await;
    wait_status(port, "3 closed", |v| {
        entry(v, "backend")["tunnels"]["closed"] == 3
    })
    .await;

    // Same size: the zone and its counters are kept.
    reload_idle(&ngx, 1).await;
    assert_eq!(
        entry(&status_json(port).await, "backend")["tunnels"]["opened"],
        3
    );

    // Another size: nginx makes a new zone of that size, as for any shared zone (the old
    // one is not passed to init), so the counters start again from zero.
    std::fs::write(
        ngx.path("nginx.conf"),
        conf.replace("ws_status_zone ws_stats 1m;", "ws_status_zone ws_stats 2m;"),
    )
    .unwrap();
    reload_idle(&ngx, 1).await;
    let v = status_json(port).await;
    assert_eq!(v["size"], 2 << 20, "{v:#}");
    assert!(v["entries"].as_array().unwrap().is_empty(), "{v:#}");
    run_clients(&ngx.url("/ws"), 2).await;
    let v = wait_status(port, "2 closed", |v| {
        v["entries"].as_array().unwrap().len() == 1 && entry(v, "backend")["tunnels"]["closed"] == 2
    })
    .await;
    assert_totals(entry(&v, "backend"), 2);

    // A configuration nginx refuses (the zone name taken for another use) leaves the
    // running one in place, counters included.
    std::fs::write(
        ngx.path("nginx.conf"),
        conf.replace(
            "ws_status_zone ws_stats 1m;",
            "ws_status_zone ws_stats 2m; limit_req_zone $binary_remote_addr zone=ws_stats:2m rate=1r/s;",
        ),
    )
    .unwrap();
    ngx.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ngx
        .read("logs/error.log")
        .contains("already declared for a different use")
    {
        assert!(Instant::now() < deadline, "{}", ngx.read("logs/error.log"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = status_json(port).await;
    assert_eq!(entry(&v, "backend")["tunnels"]["opened"], 2);
    ngx.assert_no_crash();
}

fn check_fails(http_body: &str, expect: &str) {
    let (ok, out) = nginx_t(&main_conf(1, http_body));
    assert!(!ok, "nginx -t accepted {http_body:?}:\n{out}");
    assert!(out.contains(expect), "expected {expect:?} in:\n{out}");
}

#[test]
fn configuration_errors() {
    let srv = |loc: &str| {
        format!(
            "server {{ listen 127.0.0.1:{}; location / {{ {loc} }} }}",
            free_port()
        )
    };
    let ok = format!("ws_status_zone a 64k;\n{}", srv("ws_status prometheus;"));
    let (good, out) = nginx_t(&main_conf(1, &ok));
    assert!(good, "{out}");

    check_fails(
        "ws_status_zone a 8k;",
        "zone \"a\" is too small in \"ws_status_zone\" directive, the minimum is 32k",
    );
    check_fails(
        "ws_status_zone a lots;",
        "invalid value \"lots\" in \"ws_status_zone\" directive",
    );
    check_fails(
        "ws_status_zone a;",
        "invalid number of arguments in \"ws_status_zone\" directive",
    );
    check_fails(
        "ws_status_zone a 64k; ws_status_zone b 64k;",
        "\"ws_status_zone\" directive is duplicate",
    );
    check_fails(
        "ws_status_zone a 64k; limit_req_zone $binary_remote_addr zone=a:64k rate=1r/s;",
        "the shared memory zone \"a\" is already declared for a different use",
    );
    check_fails(
        &format!(
            "server {{ listen 127.0.0.1:{}; ws_status_zone a 64k; }}",
            free_port()
        ),
        "\"ws_status_zone\" directive is not allowed here",
    );
    check_fails(
        &format!("ws_status_zone a 64k;\n{}", srv("ws_status xml;")),
        "invalid value \"xml\" in \"ws_status\" directive",
    );
    check_fails(
        &format!(
            "ws_status_zone a 64k;\n{}",
            srv("ws_status; ws_status json;")
        ),
        "\"ws_status\" directive is duplicate",
    );
    check_fails(
        &srv("ws_status;"),
        "\"ws_status\" needs a \"ws_status_zone\" in the http block",
    );
}

/// Routed tunnels are labelled by their `ws_route` rule and upstream{} name; refused upgrade
/// requests are counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_label_tunnels_and_rejections_are_counted() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let echo = echo_server().await;
    let port = free_port();
    let http = format!(
        "ws_status_zone ws 1m;\nupstream chat {{ server {}; }}\n\
         server {{ listen 127.0.0.1:{port};\n\
         location /status {{ ws_status; }}\n\
         location /ws/ {{ ws_route /ws/chat/ chat; ws_allow_origin https://app.example.com;\n\
           proxy_pass http://$ws_upstream; proxy_http_version 1.1;\n\
           proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade; }} }}",
        echo.addr
    );
    let ngx = Nginx::start_conf(&main_conf(1, &http), port);
    let mut ws = connect(&format!("ws://127.0.0.1:{port}/ws/chat/a")).await;
    ws.send(Message::Text("x".into())).await.unwrap();
    ws.next().await.unwrap().unwrap();
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let mut req = format!("ws://127.0.0.1:{port}/ws/chat/b")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Origin", "https://evil.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
    assert!(
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws/none"))
            .await
            .is_err()
    );
    let v = wait_closed(port, "/status", 1).await;
    let entries = v["entries"].as_array().unwrap();
    let routed = entries
        .iter()
        .find(|e| e["route"] == "/ws/chat/")
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(routed["upstream"], "chat");
    assert_eq!(routed["tunnels"]["closed"], 1);
    let rejects = entries
        .iter()
        .find(|e| e["route"] == "" && e["upstream"] == "")
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(rejects["rejects"]["origin"], 1);
    assert_eq!(rejects["rejects"]["no_route"], 1);
    drop(ngx);
}
