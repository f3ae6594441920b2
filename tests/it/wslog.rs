//! `ws_log` like `access_log`: `if=` (sampling, switches), `syslog:`, several logs in one
//! scope, and inheritance.

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

/// One tunnel: the messages out and their echoes back, then a Close from the client.
async fn tunnel(url: &str, headers: &[(&'static str, &str)], messages: &[&str]) {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), false)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    for m in messages {
        ws.send(Message::Text(m.to_string())).await.unwrap();
        loop {
            if let Message::Text(_) = ws.next().await.unwrap().unwrap() {
                break;
            }
        }
    }
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
}

/// The status of an upgrade request the proxy refuses.
async fn refused(url: &str, headers: &[(&'static str, &str)]) -> u16 {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        other => panic!("not refused: {:?}", other.map(|(_, r)| r.status())),
    }
}

/// Records grouped by tunnel (`request_id`).
fn by_tunnel(recs: &[Value]) -> BTreeMap<String, Vec<&Value>> {
    let mut m: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in recs {
        let id = r["request_id"].as_str().expect("request_id").to_string();
        m.entry(id).or_default().push(r);
    }
    m
}

/// Every tunnel of a log has all its records: open, the four frames of one echoed message
/// and the closing handshake, and close.
fn all_or_nothing(name: &str, recs: &[Value]) -> BTreeSet<String> {
    let tunnels = by_tunnel(recs);
    for (id, recs) in &tunnels {
        let n = |e: &str| recs.iter().filter(|r| r["event"] == e).count();
        assert_eq!(
            (n("open"), n("frame"), n("close")),
            (1, 4, 1),
            "{name}: tunnel {id} is not whole: {recs:#?}"
        );
        assert_eq!(recs[0]["event"], "open", "{name}: {id}");
        assert_eq!(recs.last().unwrap()["event"], "close", "{name}: {id}");
    }
    tunnels.into_keys().collect()
}

/// Sampling with `split_clients` (as the docs show): each tunnel is logged whole or not at
/// all, about half of them; a second log with the opposite condition gets exactly the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_samples_whole_tunnels() {
    let echo = echo_server().await;
    let http = "split_clients $request_id $ws_sample { 50% 1; * 0; }\n\
                map $ws_sample $ws_unsampled { 1 0; default 1; }";
    let loc = format!(
        "location / {{ ws_log logs/sampled.log if=$ws_sample;\n\
         ws_log logs/rest.log buffer=16k if=$ws_unsampled;\n\
         ws_log_events open frame close; {} }}",
        proxy_to(echo.addr)
    );
    let ngx = Nginx::start(2, http, &loc);
    let url = ngx.url("/");
    const TUNNELS: usize = 200;
    for batch in 0..TUNNELS / 20 {
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let url = url.clone();
                tokio::spawn(async move {
                    tunnel(&url, &[], &[&format!("m{}", batch * 20 + i)]).await;
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let (sampled, rest) = loop {
        let (s, r) = (
            ngx.records("logs/sampled.log"),
            ngx.records("logs/rest.log"),
        );
        if of_event(&s, "close").len() + of_event(&r, "close").len() == TUNNELS {
            break (s, r);
        }
        assert!(Instant::now() < deadline, "records missing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let a = all_or_nothing("sampled.log", &sampled);
    let b = all_or_nothing("rest.log", &rest);
    assert!(a.is_disjoint(&b), "a tunnel in both logs");
    assert_eq!(a.len() + b.len(), TUNNELS);
    // Binomial(200, 0.5): 60..=140 is more than 5 standard deviations either way.
    assert!(
        (60..=140).contains(&a.len()),
        "{} of {TUNNELS} sampled at 50%",
        a.len()
    );
}

/// A per-client switch with `map`, also for `reject` records (evaluated per request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_switches_per_client_and_for_rejects() {
    let echo = echo_server().await;
    let http = "map $http_x_debug $ws_debug { default 0; on 1; }";
    let loc = format!(
        "location / {{ ws_allow_origin https://good.example;\n\
         ws_log logs/ws.log if=$ws_debug; ws_log_events open close reject; {} }}",
        proxy_to(echo.addr)
    );
    let ngx = Nginx::start(1, http, &loc);
    let url = ngx.url("/");
    let evil = ("Origin", "https://evil.example");
    // Not logged: no switch, or the switch off.
    tunnel(&url, &[], &["a"]).await;
    tunnel(&url, &[("X-Debug", "off")], &["b"]).await;
    assert_eq!(refused(&url, &[evil]).await, 403);
    // Logged.
    tunnel(&url, &[("X-Debug", "on")], &["c"]).await;
    assert_eq!(refused(&url, &[evil, ("X-Debug", "on")]).await, 403);
    let recs = ngx
        .wait_records("logs/ws.log", |r| !of_event(r, "reject").is_empty())
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recs = if recs.len() < 3 {
        ngx.records("logs/ws.log")
    } else {
        recs
    };
    let events: Vec<&str> = recs.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["open", "close", "reject"], "{recs:#?}");
    assert_eq!(recs[2]["status"], 403);
}

/// A scope with its own `ws_log` uses only its own; `ws_log off` turns every log off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inheritance_like_access_log() {
    let echo = echo_server().await;
    let p = proxy_to(echo.addr);
    let http = "ws_log logs/http.log; ws_log logs/all.log;";
    let loc = format!(
        "location /own {{ ws_log logs/own.log; {p} }}\n\
         location /inherit {{ {p} }}\n\
         location /off {{ ws_log off; {p} }}"
    );
    let ngx = Nginx::start(1, http, &loc);
    tunnel(&ngx.url("/off"), &[], &["x"]).await;
    tunnel(&ngx.url("/own"), &[], &["x"]).await;
    tunnel(&ngx.url("/inherit"), &[], &["x"]).await;
    let uris = |f: &str| -> Vec<String> {
        of_event(&ngx.records(f), "open")
            .iter()
            .map(|r| r["uri"].as_str().unwrap().to_string())
            .collect()
    };
    ngx.wait_records("logs/all.log", closes(1)).await;
    ngx.wait_records("logs/own.log", closes(1)).await;
    assert_eq!(uris("logs/own.log"), ["/own"]);
    assert_eq!(uris("logs/http.log"), ["/inherit"]);
    assert_eq!(uris("logs/all.log"), ["/inherit"]);
    // The two inherited logs got the same bytes.
    assert_eq!(ngx.read("logs/http.log"), ngx.read("logs/all.log"));
}

/// A syslog message as nginx writes it (RFC 3164): `<PRI>TIMESTAMP [HOSTNAME ]TAG: MSG`.
#[derive(Debug)]
struct Syslog {
    pri: u32,
    host: Option<String>,
    tag: String,
    msg: String,
}

fn parse_syslog(d: &[u8], with_host: bool) -> Syslog {
    let s = std::str::from_utf8(d).expect("utf-8 datagram");
    let rest = s.strip_prefix('<').unwrap_or_else(|| panic!("no PRI: {s}"));
    let (pri, rest) = rest
        .split_once('>')
        .unwrap_or_else(|| panic!("no PRI: {s}"));
    // "Mmm dd hh:mm:ss ", the day padded with a space.
    let (ts, rest) = rest.split_at(16);
    let b = ts.as_bytes();
    assert!(
        b[3] == b' ' && b[6] == b' ' && b[9] == b':' && b[12] == b':' && b[15] == b' ',
        "timestamp {ts:?} in {s}"
    );
    assert!(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
            .contains(&&ts[..3]),
        "{ts:?}"
    );
    let (host, rest) = if with_host {
        let (h, r) = rest.split_once(' ').expect("host");
        (Some(h.to_string()), r)
    } else {
        (None, rest)
    };
    let (tag, msg) = rest
        .split_once(": ")
        .unwrap_or_else(|| panic!("no tag: {s}"));
    Syslog {
        pri: pri.parse().expect("PRI"),
        host,
        tag: tag.to_string(),
        msg: msg.to_string(),
    }
}

/// Reads datagrams until `pred` holds for them or `wait` passes.
fn receive(sock: &UdpSocket, wait: Duration, pred: impl Fn(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    while !pred(&got) && Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    got
}

fn hostname() -> String {
    let mut b = [0u8; 256];
    // SAFETY: a buffer of the given size.
    let rc = unsafe { libc::gethostname(b.as_mut_ptr().cast(), b.len()) };
    assert_eq!(rc, 0);
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).to_lowercase()
}

/// `syslog:` next to a file in one scope: each record is one datagram whose message is the
/// file's line, byte for byte; facility, severity, tag and nohostname are nginx's; `if=` after
/// a syslog target applies to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_messages_carry_whole_records() {
    let echo = echo_server().await;
    let full = UdpSocket::bind("127.0.0.1:0").unwrap();
    let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
    let never = UdpSocket::bind("127.0.0.1:0").unwrap();
    let loc = format!(
        "location / {{ ws_log logs/ws.log;\n\
         ws_log syslog:server={},facility=local3,severity=notice,tag=wstest;\n\
         ws_log syslog:server={},nohostname;\n\
         ws_log syslog:server={} if=$arg_never;\n\
         ws_log_events open frame message close; ws_log_payload 200; {} }}",
        full.local_addr().unwrap(),
        plain.local_addr().unwrap(),
        never.local_addr().unwrap(),
        proxy_to(echo.addr)
    );
    let ngx = Nginx::start(1, "", &loc);
    let tricky = "quotes \" and \\ backslash, tab\t, newline\n, ünïcödé ✓, </script>";
    tunnel(&ngx.url("/chat"), &[], &["hello", tricky]).await;
    ngx.wait_records("logs/ws.log", closes(1)).await;
    let lines: Vec<String> = ngx.read("logs/ws.log").lines().map(String::from).collect();
    assert!(lines.len() >= 12, "{lines:#?}");

    let n = lines.len();
    let got = receive(&full, Duration::from_secs(10), |g| g.len() >= n);
    let host = hostname();
    let msgs: Vec<String> = got
        .iter()
        .map(|d| {
            let m = parse_syslog(d, true);
            assert_eq!(m.pri, 19 * 8 + 5, "local3.notice: {m:?}");
            assert_eq!(m.host.as_deref(), Some(host.as_str()), "{m:?}");
            assert_eq!(m.tag, "wstest");
            m.msg
        })
        .collect();
    assert_eq!(
        msgs, lines,
        "one message per record, the same JSON as the file"
    );
    let tricky_rec: Vec<Value> = msgs
        .iter()
        .map(|m| serde_json::from_str::<Value>(m).unwrap())
        .filter(|r| r["event"] == "message" && r["payload"] == tricky)
        .collect();
    assert_eq!(tricky_rec.len(), 2, "the payload intact, both ways");

    let got = receive(&plain, Duration::from_secs(10), |g| g.len() >= n);
    let msgs: Vec<String> = got
        .iter()
        .map(|d| {
            let m = parse_syslog(d, false);
            assert_eq!(m.pri, 23 * 8 + 6, "nginx's default local7.info: {m:?}");
            assert_eq!(m.tag, "nginx");
            m.msg
        })
        .collect();
    assert_eq!(msgs, lines);

    // The switched-off one got nothing; switched on, it gets the next tunnel.
    assert!(receive(&never, Duration::from_millis(300), |_| false).is_empty());
    tunnel(&ngx.url("/?never=1"), &[], &["x"]).await;
    let got = receive(&never, Duration::from_secs(10), |g| {
        g.iter()
            .any(|d| parse_syslog(d, true).msg.contains("\"event\":\"close\""))
    });
    let events: Vec<String> = got
        .iter()
        .map(|d| {
            let r: Value = serde_json::from_str(&parse_syslog(d, true).msg).unwrap();
            r["event"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(events.first().map(String::as_str), Some("open"));
    assert_eq!(events.last().map(String::as_str), Some("close"));
}

/// A syslog server that is not there: records are dropped and counted, the tunnel is fine,
/// the error log says so at most once a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_failures_drop_records_not_tunnels() {
    let echo = echo_server().await;
    // A port with nothing behind it: the kernel answers datagrams with ICMP "unreachable",
    // which the next send reports.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let loc = format!(
        "location / {{ ws_log syslog:server=127.0.0.1:{port}; ws_log logs/ws.log;\n\
         ws_log_events open frame close; {} }}",
        proxy_to(echo.addr)
    );
    let ngx = Nginx::start(1, "", &loc);
    let msgs: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    let msgs: Vec<&str> = msgs.iter().map(String::as_str).collect();
    tunnel(&ngx.url("/"), &[], &msgs).await;
    // The file, next to it, has everything.
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    assert_eq!(of_event(&recs, "frame").len(), 62);
    let log = ngx.read("logs/error.log");
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("log records dropped"))
        .collect();
    assert!(!errors.is_empty(), "no drop logged:\n{log}");
    assert!(errors.len() <= 3, "not rate-limited: {errors:#?}");
    assert!(
        errors[0].contains(&format!(
            "send() to \"syslog:server=127.0.0.1:{port}\" failed (111: Connection refused)"
        )),
        "{}",
        errors[0]
    );
    ngx.assert_no_crash();
}
