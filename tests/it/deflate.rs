//! Compressed tunnels (permessage-deflate, RFC 7692): real Python `websockets` peers and a real
//! browser compress; the log shows the uncompressed payloads, `inflated_len` is exact, nothing
//! on the wire changes; corrupt data, other extensions and decompression bombs.

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::{closes, of_event, Nginx};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/deflate_peer.py");
const PREFIX: usize = 256;

/// A Python peer server; its port, and its stdout for the close codes it saw.
struct Server {
    _child: Child,
    port: u16,
    out: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

async fn server(cfg: Value) -> Server {
    let mut child = Command::new("python3")
        .args([PEER, "server", &cfg.to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with the websockets package (scripts/test installs it)");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), out.next_line())
        .await
        .expect("peer server start")
        .unwrap()
        .expect("peer server port");
    Server {
        _child: child,
        port: line.trim().parse().expect("port"),
        out,
    }
}

impl Server {
    /// The close code the server saw on its next finished connection.
    async fn close_code(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(20), self.out.next_line())
            .await
            .expect("server saw the connection end")
            .unwrap()
            .unwrap();
        serde_json::from_str::<Value>(&line).unwrap()["close_code"].clone()
    }
}

/// Runs the peer in `mode` with `cfg`; its one JSON line.
async fn peer(mode: &str, cfg: Value) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("python3")
            .args([PEER, mode, &cfg.to_string()])
            .output(),
    )
    .await
    .expect("peer finished")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "peer {mode} {cfg}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("peer JSON")
}

fn location(path: &str, port: u16, extra: &str) -> String {
    format!(
        "location {path} {{ ws_log logs/ws.log; ws_log_events open frame message close;\n\
         ws_log_payload {PREFIX}; {extra}\n\
         proxy_pass http://127.0.0.1:{port}; proxy_http_version 1.1;\n\
         proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade; }}\n"
    )
}

/// The records of the tunnel whose open record has `uri`.
fn tunnel<'a>(recs: &'a [Value], uri: &str) -> Vec<&'a Value> {
    let conns: Vec<&Value> = recs
        .iter()
        .filter(|r| r["event"] == "open" && r["uri"] == uri)
        .map(|r| &r["conn"])
        .collect();
    assert_eq!(conns.len(), 1, "one tunnel for {uri}");
    recs.iter().filter(|r| &r["conn"] == conns[0]).collect()
}

/// Checks the message records of one side against the messages the client sent.
fn check_messages(recs: &[&Value], from: &str, sent: &[Value], full_len: bool, what: &str) {
    let msgs: Vec<&&Value> = recs
        .iter()
        .filter(|r| r["event"] == "message" && r["from"] == from)
        .collect();
    assert_eq!(msgs.len(), sent.len(), "{what}: {from} messages");
    for (i, (m, s)) in msgs.iter().zip(sent).enumerate() {
        let data = base64::engine::general_purpose::STANDARD
            .decode(s["b64"].as_str().unwrap())
            .unwrap();
        let at = format!("{what}: {from} message {i} ({} bytes): {m}", data.len());
        assert_eq!(m["type"], s["kind"], "{at}");
        assert_eq!(m["compressed"], true, "{at}");
        assert_eq!(m["inflate_error"], Value::Null, "{at}");
        let prefix = &data[..data.len().min(PREFIX)];
        let expect = if s["kind"] == "text" {
            json!(String::from_utf8(prefix.to_vec()).unwrap())
        } else {
            json!(base64::engine::general_purpose::STANDARD.encode(prefix))
        };
        assert_eq!(m["payload"], expect, "{at}");
        if full_len || data.len() < PREFIX {
            assert_eq!(m["inflated_len"], data.len() as u64, "{at}");
            assert_eq!(m["payload_truncated"], data.len() > PREFIX, "{at}");
        } else {
            // Without context takeover and without a limit, inflation stops after the prefix:
            // the length is not known.
            assert_eq!(m["inflated_len"], Value::Null, "{at}");
            assert_eq!(m["payload_truncated"], true, "{at}");
        }
    }
    // Frame records of compressed frames keep payload null.
    for f in recs.iter().filter(|r| {
        r["event"] == "frame"
            && r["from"] == from
            && (r["opcode"] == "text" || r["opcode"] == "binary")
    }) {
        assert_eq!(f["payload"], Value::Null, "{what}: {f}");
    }
}

fn messages_around_the_prefix() -> Value {
    json!([
        {"kind": "text", "size": 1, "seed": 1},
        {"kind": "text", "size": PREFIX - 1, "seed": 2},
        {"kind": "binary", "size": PREFIX, "seed": 3},
        {"kind": "text", "size": PREFIX + 1, "seed": 4, "fragments": 2},
        {"kind": "binary", "size": 5000, "seed": 5, "fragments": 3},
        {"kind": "text", "size": 70000, "seed": 6, "fragments": 4},
        {"kind": "text", "size": 0, "seed": 7},
        {"kind": "binary", "size": 3000, "seed": 8},
    ])
}

/// Python `websockets` on both sides with permessage-deflate: default parameters, both
/// `*_no_context_takeover`, every window from 9 to 15 bits in each direction; text and binary,
/// fragmented, crossing the payload prefix. Every echo is intact (the client checks) and every
/// record's prefix and `inflated_len` exact; with no context takeover the length is known only
/// where `ws_max_inflated_size` made the proxy inflate to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_parameters_and_records() {
    // (server's factory parameters, client's factory parameters, sender resets per message)
    let mut cases: Vec<(Value, Value, bool)> = vec![
        (json!({}), json!({}), false),
        (
            json!({"server_no_context_takeover": true, "client_no_context_takeover": true}),
            json!({"server_no_context_takeover": true, "client_no_context_takeover": true}),
            true,
        ),
    ];
    for bits in 9..=15 {
        cases.push((
            json!({"server_max_window_bits": bits, "client_max_window_bits": 24 - bits}),
            json!({"server_max_window_bits": bits, "client_max_window_bits": 24 - bits}),
            false,
        ));
    }
    let mut servers = Vec::new();
    let mut locs = String::new();
    for (i, (srv, _, _)) in cases.iter().enumerate() {
        let s = server(srv.clone()).await;
        locs += &location(&format!("/c{i}"), s.port, "");
        locs += &location(&format!("/l{i}"), s.port, "ws_max_inflated_size 1m;");
        servers.push(s);
    }
    let ngx = Nginx::start(1, "", &locs);
    let mut sent = Vec::new();
    for (i, (_, cli, _)) in cases.iter().enumerate() {
        for path in [format!("/c{i}"), format!("/l{i}")] {
            let out = peer(
                "client",
                json!({"port": ngx.port, "path": path, "params": cli,
                       "messages": messages_around_the_prefix()}),
            )
            .await;
            assert!(
                out["extensions"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("permessage-deflate"),
                "{out}"
            );
            assert_eq!(out["close_code"], 1000, "{path}: {out}");
            sent.push((path, out));
        }
    }
    let recs = ngx.wait_records("logs/ws.log", closes(sent.len())).await;
    for (path, out) in &sent {
        let reset = cases[path[2..].parse::<usize>().unwrap()].2;
        let limited = path.starts_with("/l");
        let t = tunnel(&recs, path);
        let what = format!("{path} {}", out["extensions"]);
        let msgs = out["messages"].as_array().unwrap();
        check_messages(&t, "client", msgs, !reset || limited, &what);
        check_messages(&t, "upstream", msgs, !reset || limited, &what);
        let close = t.iter().find(|r| r["event"] == "close").unwrap();
        assert_eq!(close["end"], "normal", "{what}");
    }
    ngx.assert_no_crash();
}

/// The client writes every byte in a TCP segment of its own, fragmented messages included,
/// with `ws_max_inflated_size` (compressed frames are then held and inflated before they go
/// on): echoes intact, records exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_one_byte_writes() {
    let s = server(json!({})).await;
    let locs = location(
        "/",
        s.port,
        "ws_max_inflated_size 1m; ws_protocol_check on;",
    ) + &location("/capture", s.port, "");
    let ngx = Nginx::start(1, "", &locs);
    let messages = json!([
        {"kind": "text", "size": 300, "seed": 11, "fragments": 3},
        {"kind": "binary", "size": 600, "seed": 12},
        {"kind": "text", "size": 40, "seed": 13, "fragments": 2},
    ]);
    let mut outs = Vec::new();
    for path in ["/", "/capture"] {
        let out = peer(
            "client",
            json!({"port": ngx.port, "path": path, "byte_writes": true, "messages": messages}),
        )
        .await;
        assert_eq!(out["close_code"], 1000, "{out}");
        outs.push((path, out));
    }
    let recs = ngx.wait_records("logs/ws.log", closes(2)).await;
    for (path, out) in &outs {
        let t = tunnel(&recs, path);
        let msgs = out["messages"].as_array().unwrap();
        check_messages(&t, "client", msgs, true, path);
        check_messages(&t, "upstream", msgs, true, path);
    }
}

/// Without payload capture in message records and without `ws_max_inflated_size`, nothing is
/// inflated: compressed messages are flagged, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_not_inflated_where_nothing_needs_it() {
    let s = server(json!({})).await;
    let loc = format!(
        "location / {{ ws_log logs/ws.log; ws_log_events open message close;\n\
         proxy_pass http://127.0.0.1:{}; proxy_http_version 1.1;\n\
         proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade; }}",
        s.port
    );
    let ngx = Nginx::start(1, "", &loc);
    let out = peer(
        "client",
        json!({"port": ngx.port, "messages": [{"kind": "text", "size": 500}]}),
    )
    .await;
    assert_eq!(out["close_code"], 1000);
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    for m in of_event(&recs, "message") {
        assert_eq!(m["compressed"], true);
        assert_eq!(m["payload"], Value::Null);
        assert_eq!(m["inflated_len"], Value::Null);
        assert_eq!(m["inflate_error"], Value::Null);
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Corrupt compressed data: without `ws_protocol_check` the record says why and the tunnel is
/// not disturbed (the backend answers as it will); with it, the client gets Close 1007, the
/// backend 1001, the frame is not forwarded, end `protocol_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_corrupt_data() {
    let mut s = server(json!({})).await;
    let locs =
        location("/plain", s.port, "") + &location("/check", s.port, "ws_protocol_check on;");
    let ngx = Nginx::start(1, "", &locs);
    // Block type 3 (reserved): not DEFLATE.
    let bad = json!([[true, 1, true, b64(&[0xff, 0xff, 0xff, 0xff])]]);

    let out = peer(
        "raw",
        json!({"port": ngx.port, "offer": "permessage-deflate", "frames": bad, "path": "/plain"}),
    )
    .await;
    // The backend itself refuses it (Python websockets: 1002 "decompression failed"); the
    // module does not interfere.
    assert_eq!(out["close_code"], 1002, "{out}");
    s.close_code().await;
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let m = of_event(&recs, "message")[0];
    assert_eq!(m["compressed"], true);
    assert_eq!(m["payload"], Value::Null);
    assert_eq!(m["inflate_error"], "corrupt data");
    assert_eq!(m["inflated_len"], Value::Null);
    let c = of_event(&recs, "close")[0];
    assert_eq!(c["closed_by"], "upstream", "{c}");
    assert!(
        !recs.iter().any(|r| r["from"] == "proxy"),
        "the proxy sent nothing"
    );
}

/// With `ws_protocol_check on`, corrupt compressed data gets Close 1007 from the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_corrupt_data_protocol_check() {
    let mut s = server(json!({})).await;
    let ngx = Nginx::start(1, "", &location("/", s.port, "ws_protocol_check on;"));
    let bad = json!([[true, 1, true, b64(&[0xff, 0xff, 0xff, 0xff])]]);
    let out = peer(
        "raw",
        json!({"port": ngx.port, "offer": "permessage-deflate", "frames": bad}),
    )
    .await;
    assert_eq!(out["close_code"], 1007, "{out}");
    // The backend never saw the frame: it got the proxy's 1001.
    assert_eq!(s.close_code().await, 1001);
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let c = of_event(&recs, "close")[0];
    assert_eq!(c["end"], "protocol_error", "{c}");
    assert_eq!(c["closed_by"], "proxy", "{c}");
    let proxy: Vec<&Value> = recs
        .iter()
        .filter(|r| r["event"] == "frame" && r["from"] == "proxy")
        .collect();
    let codes: Vec<&Value> = proxy.iter().map(|r| &r["code"]).collect();
    assert!(
        codes.contains(&&json!(1007)) && codes.contains(&&json!(1001)),
        "{proxy:?}"
    );
}

/// An extension other than permessage-deflate: compressed-flagged messages cannot be read,
/// the record says so, the bytes pass untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_other_extension() {
    let mut s = server(json!({"raw_extension": "x-webkit-deflate-frame"})).await;
    let ngx = Nginx::start(1, "", &location("/", s.port, ""));
    let payload = b"\x01\x02\x03 opaque to the proxy";
    let out = peer(
        "raw",
        json!({"port": ngx.port, "offer": "x-webkit-deflate-frame",
               "frames": [[true, 2, true, b64(payload)], [true, 8, false, b64(&1000u16.to_be_bytes())]]}),
    )
    .await;
    assert_eq!(out["extensions"], "x-webkit-deflate-frame");
    // The echo came back byte for byte, RSV1 included.
    assert_eq!(
        out["frames"][0],
        json!([true, 2, true, b64(payload)]),
        "{out}"
    );
    assert_eq!(s.close_code().await, 1000);
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let msgs = of_event(&recs, "message");
    assert_eq!(msgs.len(), 2);
    for m in msgs {
        assert_eq!(m["compressed"], true);
        assert_eq!(m["payload"], Value::Null);
        assert_eq!(m["inflate_error"], "unsupported extension", "{m}");
    }
}

/// A decompression bomb (about 1 KiB on the wire, 1 MB inflated) against
/// `ws_max_inflated_size 64k`: the client gets 1009, the backend 1001 and never the bomb, end
/// `too_big`, counted in the metrics. The same from a client writing byte by byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_bomb() {
    let mut s = server(json!({})).await;
    let http = "ws_status_zone ws 1m;";
    let locs =
        location("/", s.port, "ws_max_inflated_size 64k;") + "location = /status { ws_status; }\n";
    let ngx = Nginx::start(1, http, &locs);
    // A small message first, then 1 MB of one byte value.
    for byte_writes in [false, true] {
        let bomb = json!([
            {"kind": "text", "size": 1000, "seed": 1},
            {"kind": "zeros", "size": 1 << 20, "expect_close": true},
        ]);
        let out = peer(
            "client",
            json!({"port": ngx.port, "messages": bomb, "byte_writes": byte_writes,
                   "expect_close_from_proxy": true}),
        )
        .await;
        assert_eq!(out["close_code"], 1009, "{out}");
        assert_eq!(s.close_code().await, 1001);
    }
    let recs = ngx.wait_records("logs/ws.log", closes(2)).await;
    for c in of_event(&recs, "close") {
        assert_eq!(c["end"], "too_big", "{c}");
        assert_eq!(c["closed_by"], "proxy", "{c}");
        // The backend echoed only the first message: the bomb never reached it.
        assert_eq!(c["upstream"]["messages"], 1, "{c}");
    }
    let wire: Vec<u64> = recs
        .iter()
        .filter(|r| r["event"] == "frame" && r["from"] == "client" && r["opcode"] == "binary")
        .map(|r| r["len"].as_u64().unwrap())
        .collect();
    assert!(wire.iter().all(|&l| l < 2048), "{wire:?}");
    let st = crate::metrics::status_json(ngx.port).await;
    assert!(st.to_string().contains("\"too_big\":2"), "{st}");
}

/// The case users hit: a real browser (headless Chromium) loads a page served by the same
/// nginx over `wss://` with a self-signed certificate and talks to a compressing Python
/// backend (Python `websockets` with its default settings: 12-bit windows); Chromium offers
/// permessage-deflate on its own. The log shows every payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_browser() {
    use std::os::unix::fs::PermissionsExt;
    let s = server(json!({"websockets_default": true})).await;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen");
    let port = crate::harness::free_port();
    // Texts the page sends (and gets back): short, across the prefix, long; one binary.
    let page = format!(
        r#"<!doctype html><html><body><pre id="out">waiting</pre><script>
const texts = ["hello from the browser", "abc ".repeat(100), "browser ".repeat(2000)];
const ws = new WebSocket("wss://127.0.0.1:{port}/ws");
ws.binaryType = "arraybuffer";
let got = 0;
ws.onopen = () => {{
  for (const t of texts) ws.send(t);
  ws.send(new Uint8Array(600).map((_, i) => i % 7));
}};
ws.onmessage = () => {{
  if (++got === texts.length + 1) {{
    document.getElementById("out").textContent = "done " + ws.extensions;
    ws.close(1000, "bye");
  }}
}};
</script></body></html>"#
    );
    let conf = crate::harness::main_conf(
        1,
        &format!(
            "server {{ listen 127.0.0.1:{port} ssl;\n\
             ssl_certificate certs/server.crt; ssl_certificate_key certs/server.key;\n\
             root html;\n\
             location / {{ }}\n{} }}",
            location("/ws", s.port, "")
        ),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for (rel, text) in [
        ("certs/server.crt", ck.cert.pem()),
        ("certs/server.key", ck.key_pair.serialize_pem()),
        ("html/page.html", page),
    ] {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    // Workers may run as nobody: the document root must be readable for them.
    for d in [dir.path().to_path_buf(), dir.path().join("html")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let ngx = Nginx::spawn_in(dir, &conf, port);
    let profile = tempfile::tempdir().expect("profile dir");
    // No --dump-dom and no virtual time budget: the browser keeps the page open, in real time,
    // until the log shows the tunnel closed (slow machines and valgrind included); dropping
    // the child ends it.
    let _browser = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--ignore-certificate-errors",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("https://127.0.0.1:{port}/page.html"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium (scripts/test installs Debian's chromium)");
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let open = of_event(&recs, "open")[0];
    assert!(
        open["extensions"]
            .as_str()
            .unwrap_or("")
            .starts_with("permessage-deflate"),
        "{open}"
    );
    eprintln!("chromium negotiated: {}", open["extensions"]);
    let texts = [
        "hello from the browser".to_string(),
        "abc ".repeat(100),
        "browser ".repeat(2000),
    ];
    let mut sent: Vec<Value> = texts
        .iter()
        .map(|t| json!({"kind": "text", "b64": b64(t.as_bytes())}))
        .collect();
    let bin: Vec<u8> = (0..600).map(|i| (i % 7) as u8).collect();
    sent.push(json!({"kind": "binary", "b64": b64(&bin)}));
    let all: Vec<&Value> = recs.iter().collect();
    check_messages(&all, "client", &sent, true, "chromium");
    check_messages(&all, "upstream", &sent, true, "chromium");
}

/// A bomb in a compressed frame larger than the 16 KiB the proxy holds: it is inflated as it
/// passes, and where it crosses `ws_max_inflated_size` the rest of the frame is not forwarded;
/// the sender gets 1009, the backend no Close (none can go inside a frame) and the connections
/// close after `ws_close_timeout`; end `too_big`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_bomb_in_a_large_frame() {
    let mut s = server(json!({})).await;
    let ngx = Nginx::start(
        1,
        "",
        &location(
            "/",
            s.port,
            "ws_max_inflated_size 64k; ws_close_timeout 1s;",
        ),
    );
    let bomb = json!([{"kind": "noise+zeros", "size": 4 << 20, "seed": 3, "expect_close": true}]);
    let out = peer(
        "client",
        json!({"port": ngx.port, "messages": bomb, "expect_close_from_proxy": true}),
    )
    .await;
    assert_eq!(out["close_code"], 1009, "{out}");
    // The backend got part of a frame and then the end of the connection.
    assert_eq!(s.close_code().await, 1006);
    let recs = ngx.wait_records("logs/ws.log", closes(1)).await;
    let c = of_event(&recs, "close")[0];
    assert_eq!(c["end"], "too_big", "{c}");
    assert_eq!(c["upstream"]["messages"], 0, "{c}");
}
