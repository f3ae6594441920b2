//! The metrics as a real Prometheus (Debian's `prometheus` 2.42, installed by scripts/test)
//! scrapes and queries them; the alert rules under `promtool`; the Grafana dashboard's and the
//! alerts' expressions against the metric names a running nginx exports.
//!
//! The tests that need `/usr/bin/prometheus` or `/usr/bin/promtool` are skipped, saying so,
//! only when those are not installed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;
use crate::metrics::get;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

fn contrib(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(rel)
}

/// False, after saying why, when `bin` is not installed.
fn have(bin: &str) -> bool {
    if Path::new(bin).exists() {
        return true;
    }
    eprintln!("SKIPPED: {bin} is not installed (scripts/test installs Debian's prometheus)");
    false
}

/// A Prometheus server of our own: temporary storage, a scrape job for one nginx `/metrics`
/// every second, optional rule files, on a run-time port.
struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Prometheus {
    async fn start(nginx_port: u16, rule_files: &[PathBuf]) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("  - {:?}\n", p.display().to_string()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{rules}\
             scrape_configs:\n  - job_name: nginx-ws\n    metrics_path: /metrics\n\
             \x20   static_configs:\n      - targets: [\"127.0.0.1:{nginx_port}\"]\n",
            rules = if rules.is_empty() {
                "  []\n".to_string()
            } else {
                rules.concat()
            }
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write config");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(PROMETHEUS)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let mut p = Prometheus { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && get(port, "/-/ready").await.0 == 200
            {
                return p;
            }
            assert!(Instant::now() < deadline, "not ready:\n{}", p.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An API call's JSON answer, whatever its status.
    async fn api(&self, path: &str) -> Value {
        let (code, head, body) = get(self.port, path).await;
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: {code} {e}\n{head}\n{body}\n{}", self.log()))
    }

    /// `/api/v1/query` (at `time`, seconds, or now): the result, or what Prometheus said.
    async fn try_query(&self, q: &str, time: Option<f64>) -> Result<Value, String> {
        let mut path = format!("/api/v1/query?query={}", urlencode(q));
        if let Some(t) = time {
            path += &format!("&time={t:.3}");
        }
        let v = self.api(&path).await;
        if v["status"] == "success" {
            Ok(v["data"]["result"].clone())
        } else {
            Err(format!("{}: {}", v["errorType"], v["error"]))
        }
    }

    async fn query(&self, q: &str, time: Option<f64>) -> Value {
        self.try_query(q, time)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"))
    }

    /// The value of a query whose result is one sample.
    async fn value(&self, q: &str, time: Option<f64>) -> f64 {
        let r = self.query(q, time).await;
        let samples = r.as_array().unwrap_or_else(|| panic!("{q}: {r}"));
        assert_eq!(samples.len(), 1, "{q}: {r:#}");
        sample_value(&samples[0])
    }

    /// A query's samples by the value of one label (`""` when absent).
    async fn by(&self, q: &str, label: &str, time: Option<f64>) -> BTreeMap<String, f64> {
        let r = self.query(q, time).await;
        r.as_array()
            .unwrap_or_else(|| panic!("{q}: {r}"))
            .iter()
            .map(|s| {
                let l = s["metric"][label].as_str().unwrap_or("").to_string();
                (l, sample_value(s))
            })
            .collect()
    }

    /// Polls until the single value of `q` is `want`.
    async fn wait_value(&self, q: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = self.query(q, None).await;
            let got = r
                .as_array()
                .filter(|a| a.len() == 1)
                .map(|a| sample_value(&a[0]));
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{q} never became {want}: {r:#}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: terminating our own child process.
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

fn sample_value(s: &Value) -> f64 {
    let v = s["value"][1].as_str().unwrap_or_else(|| panic!("{s}"));
    v.parse().unwrap_or_else(|e| panic!("{v}: {e}"))
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// An nginx with 2 workers, a status zone, `/ws` proxied to `echo` (Origin allowlist: requests
/// without Origin pass) and `/metrics`.
fn nginx(echo: &Echo) -> Nginx {
    let port = free_port();
    let http = format!(
        "ws_status_zone ws_prom 1m;\n\
         upstream backend {{ server {echo}; }}\n\
         server {{\n\
           listen 127.0.0.1:{port};\n\
           location /ws {{\n\
             ws_allow_origin https://app.example;\n\
             proxy_pass http://backend;\n\
             proxy_http_version 1.1;\n\
             proxy_set_header Upgrade $http_upgrade;\n\
             proxy_set_header Connection \"upgrade\";\n\
           }}\n\
           location = /metrics {{ ws_status prometheus; }}\n\
         }}",
        echo = echo.addr
    );
    Nginx::start_conf(&main_conf(2, &http), port)
}

/// The sample lines of a scrape, as (name, labels, value).
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            // The test's label values hold no commas or quotes.
            let labels = labels
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("label");
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            (name.to_string(), labels, value.parse().expect("value"))
        })
        .collect()
}

/// Every series name the module exports, from the `# TYPE` lines of a scrape: histograms as
/// their `_bucket`, `_sum` and `_count` series.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("TYPE line");
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else {
            names.insert(name.to_string());
        }
    }
    names
}

/// Every `nginx_ws_...` name in a text.
fn used_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("nginx_ws_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Label names an expression groups or matches by: `by (...)`, `on (...)`, `without (...)`,
/// `ignoring (...)`, `group_left (...)` lists and `{name="..."}` matchers.
fn used_labels(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for kw in [
        "by",
        "on",
        "without",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        let mut rest = expr;
        while let Some(i) = rest.find(&format!("{kw} (")) {
            let before = rest[..i].chars().next_back();
            let tail = &rest[i + kw.len() + 2..];
            let end = tail.find(')').expect("closing parenthesis");
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                let list = tail[..end].split(',').map(str::trim);
                labels.extend(list.filter(|w| !w.is_empty()).map(String::from));
            }
            rest = &tail[end..];
        }
    }
    let mut rest = expr;
    while let Some(i) = rest.find('{') {
        let tail = &rest[i + 1..];
        let end = tail.find('}').expect("closing brace");
        // Matchers: name, operator, quoted value (the values used hold no commas).
        for m in tail[..end].split(',') {
            if let Some(j) = m.find(['=', '!']) {
                labels.insert(m[..j].trim().to_string());
            }
        }
        rest = &tail[end..];
    }
    labels
}

/// `histogram_quantile` as Prometheus computes it, from cumulative (upper bound, count) pairs.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let total = buckets.last().expect("+Inf bucket").1;
    let rank = q * total;
    let i = buckets.iter().position(|b| b.1 >= rank).expect("bucket");
    if buckets[i].0.is_infinite() {
        return buckets[i - 1].0;
    }
    let (lo, below) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
    lo + (buckets[i].0 - lo) * (rank - below) / (buckets[i].1 - below)
}

const MESSAGES: usize = 7;
const MESSAGE: &str = "hello, prometheus";

/// How a client ends its tunnel.
#[derive(Clone, Copy)]
enum Ending {
    Close(u16),
    /// Drops the TCP connection without a Close frame.
    Abort,
}

/// One tunnel: MESSAGES text messages, each echoed, then it stays open until `hold` after it
/// opened and ends as told. Returns how long it was open, as the client saw it.
async fn tunnel(url: &str, messages: usize, hold: Duration, ending: Ending) -> Duration {
    let mut ws = connect(url).await;
    let opened = Instant::now();
    for _ in 0..messages {
        ws.send(Message::Text(MESSAGE.into())).await.unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo, Message::Text(MESSAGE.into()));
    }
    tokio::time::sleep_until((opened + hold).into()).await;
    match ending {
        Ending::Close(code) => {
            ws.close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: "done".into(),
            }))
            .await
            .unwrap();
            while let Some(Ok(_)) = ws.next().await {}
        }
        Ending::Abort => drop(ws),
    }
    opened.elapsed()
}

/// Polls nginx's own `/metrics` until `n` tunnels have closed; returns the scrape.
async fn scrape_when_closed(port: u16, n: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _, body) = get(port, "/metrics").await;
        assert_eq!(code, 200, "{body}");
        let closed: f64 = samples(&body)
            .iter()
            .filter(|s| s.0 == "nginx_ws_tunnels_closed_total")
            .map(|s| s.2)
            .sum();
        if closed >= n {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{n} tunnels never closed:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Prometheus scrapes exactly what the module counted: tunnels, messages by direction and
/// their rate, payload bytes, close codes, end causes, a rejection and the duration histogram
/// (its median where the tunnels' durations put it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_exact_counts() {
    if !have(PROMETHEUS) {
        return;
    }
    let echo = echo_server().await;
    let ngx = nginx(&echo);
    let prom = Prometheus::start(ngx.port, &[]).await;
    let url = ngx.url("/ws/prom");

    // A first tunnel, with no messages, creates the label set: Prometheus then holds a zero
    // for every counter before the traffic, so increase() and rate() see all of it.
    tunnel(&url, 0, Duration::ZERO, Ending::Close(1000)).await;
    prom.wait_value(
        r#"nginx_ws_messages_total{upstream="backend",direction="client",opcode="text"}"#,
        0.0,
    )
    .await;
    prom.wait_value(r#"nginx_ws_tunnels_closed_total{upstream="backend"}"#, 1.0)
        .await;

    // 5 tunnels of 7 echoed messages each: one lasts 0.25 s, four 1.5 s; they end with
    // 1000, 4001, 4001, 1001 and a dropped TCP connection. One upgrade is refused (Origin).
    let short = Duration::from_millis(250);
    let long = Duration::from_millis(1500);
    let plan = [
        (short, Ending::Close(1000)),
        (long, Ending::Close(4001)),
        (long, Ending::Close(4001)),
        (long, Ending::Close(1001)),
        (long, Ending::Abort),
    ];
    let tasks: Vec<_> = plan
        .iter()
        .map(|&(hold, ending)| {
            let url = url.clone();
            tokio::spawn(async move { tunnel(&url, MESSAGES, hold, ending).await })
        })
        .collect();
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("Origin", "https://evil.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
    let mut durations = Vec::new();
    for t in tasks {
        durations.push(t.await.unwrap());
    }
    let n = (plan.len() + 1) as f64;
    let m = (plan.len() * MESSAGES) as f64;

    // What nginx says, and then what Prometheus scraped after it.
    let scrape = scrape_when_closed(ngx.port, n).await;
    prom.wait_value("sum(nginx_ws_tunnels_closed_total)", n)
        .await;
    // Evaluate everything at the time of the latest scrape: no extrapolation past it.
    let t = prom
        .value(
            r#"timestamp(nginx_ws_tunnels_closed_total{upstream="backend"})"#,
            None,
        )
        .await;
    let at = Some(t);
    let b = r#"upstream="backend""#;

    assert_eq!(
        prom.value(&format!("nginx_ws_tunnels_opened_total{{{b}}}"), at)
            .await,
        n
    );
    assert_eq!(
        prom.value(&format!("nginx_ws_tunnels_closed_total{{{b}}}"), at)
            .await,
        n
    );
    assert_eq!(
        prom.value(&format!("nginx_ws_tunnels_active{{{b}}}"), at)
            .await,
        0.0
    );
    let q = format!("sum by (direction) (nginx_ws_messages_total{{{b}}})");
    let want: BTreeMap<String, f64> = [("client".into(), m), ("upstream".into(), m)].into();
    assert_eq!(prom.by(&q, "direction", at).await, want);
    let q = format!(r#"sum by (opcode) (nginx_ws_messages_total{{{b}}})"#);
    let want: BTreeMap<String, f64> = [("binary".into(), 0.0), ("text".into(), 2.0 * m)].into();
    assert_eq!(prom.by(&q, "opcode", at).await, want);
    let q = format!(r#"sum by (direction) (nginx_ws_payload_bytes_total{{{b},opcode="text"}})"#);
    let bytes = m * MESSAGE.len() as f64;
    let want: BTreeMap<String, f64> = [
        ("client".into(), bytes),
        ("proxy".into(), 0.0),
        ("upstream".into(), bytes),
    ]
    .into();
    assert_eq!(prom.by(&q, "direction", at).await, want);

    // The whole traffic is inside the last minute, which starts with the zero sample: the
    // increase is exact, and the rate is that increase over the 60 s.
    let client = format!(r#"nginx_ws_messages_total{{{b},direction="client",opcode="text"}}"#);
    let increase = prom.value(&format!("increase({client}[1m])"), at).await;
    let rate = prom.value(&format!("rate({client}[1m])"), at).await;
    assert_eq!(increase, m);
    assert!(rate > 0.0);
    assert!((rate - m / 60.0).abs() < 1e-9, "rate {rate}");
    // A recent window sees a positive rate too, no more than the traffic can explain.
    let recent = prom.value(&format!("rate({client}[10s])"), at).await;
    assert!(recent > 0.0 && recent <= m, "rate over 10s {recent}");

    // Close codes by the side that sent them: the echo server answers each Close with its
    // code; the aborted tunnel has none.
    let codes = |dir: &str| format!(r#"nginx_ws_close_codes_total{{{b},direction="{dir}"}}"#);
    let want: BTreeMap<String, f64> = [
        ("1000".into(), 2.0),
        ("1001".into(), 1.0),
        ("4001".into(), 2.0),
    ]
    .into();
    assert_eq!(prom.by(&codes("client"), "code", at).await, want);
    assert_eq!(prom.by(&codes("upstream"), "code", at).await, want);
    assert!(prom
        .query(&codes("proxy"), at)
        .await
        .as_array()
        .unwrap()
        .is_empty());
    let q = format!("nginx_ws_tunnel_ends_total{{{b}}} > 0");
    let want: BTreeMap<String, f64> =
        [("client_abort".into(), 1.0), ("normal".into(), n - 1.0)].into();
    assert_eq!(prom.by(&q, "end", at).await, want);

    // The refused upgrade has no route or upstream: Prometheus drops the empty labels.
    let q = "sum by (reason) (nginx_ws_handshake_rejections_total)";
    let want: BTreeMap<String, f64> = [
        ("handshake".into(), 0.0),
        ("no_route".into(), 0.0),
        ("not_upgrade".into(), 0.0),
        ("origin".into(), 1.0),
    ]
    .into();
    assert_eq!(prom.by(q, "reason", at).await, want);
    assert_eq!(
        prom.value(
            r#"nginx_ws_handshake_rejections_total{reason="origin",upstream=""}"#,
            at
        )
        .await,
        1.0
    );
    assert_eq!(
        prom.value("nginx_ws_log_records_dropped_total", at).await,
        0.0
    );
    assert_eq!(
        prom.value(r#"nginx_ws_status_zone_label_sets{zone="ws_prom"}"#, at)
            .await,
        2.0
    );

    // Durations: the first tunnel well under 0.1 s, one of 0.25 s, four of 1.5 s. The median
    // of six falls among the 1.5 s ones, in the bucket (1, 5].
    let hist = "nginx_ws_tunnel_duration_seconds";
    let median = prom
        .value(
            &format!("histogram_quantile(0.5, sum by (le) ({hist}_bucket))"),
            at,
        )
        .await;
    assert!(median > 1.0 && median <= 5.0, "median {median}");
    let mut buckets: Vec<(f64, f64)> = samples(&scrape)
        .iter()
        .filter(|s| s.0 == format!("{hist}_bucket") && s.1["upstream"] == "backend")
        .map(|s| (s.1["le"].parse().unwrap(), s.2))
        .collect();
    buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
    assert_eq!(median, quantile(0.5, &buckets), "{buckets:?}");
    assert_eq!(prom.value(&format!("{hist}_count{{{b}}}"), at).await, n);
    let sum = prom.value(&format!("{hist}_sum{{{b}}}"), at).await;
    let client_sum: f64 = durations.iter().map(Duration::as_secs_f64).sum();
    assert!(
        sum > 4.0 * 1.5 && (sum - client_sum).abs() < 0.5,
        "sum {sum}, clients saw {client_sum} ({durations:?})"
    );
    eprintln!(
        "prometheus at {t}: median {median}, duration sum {sum} (clients {client_sum:.3}), \
         increase {increase}, rate {rate}, rate[10s] {recent}, buckets {buckets:?}"
    );
    ngx.assert_no_crash();
}

/// Grafana variables replaced by what "All" and a one-minute view give.
fn grafana_to_promql(expr: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in [
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$__range", "1h"),
        ("$instance", ".*"),
        ("$upstream", ".*"),
        ("$route", ".*"),
    ] {
        e = e.replace(var, value);
    }
    assert!(!e.contains('$'), "unknown variable in {expr}");
    e
}

/// Every `expr` of the dashboard's panels, and the template variables' queries.
fn dashboard_queries(v: &Value, exprs: &mut Vec<String>, variables: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(s)) => exprs.push(s.clone()),
                    ("definition", Value::String(s)) => variables.push(s.clone()),
                    _ => dashboard_queries(x, exprs, variables),
                }
            }
        }
        Value::Array(a) => a
            .iter()
            .for_each(|x| dashboard_queries(x, exprs, variables)),
        _ => {}
    }
}

/// The dashboard and the alert rules use only metric names the module exports (read from a
/// live scrape, not a list), every dashboard expression runs without error in Prometheus, and
/// Prometheus loads and evaluates every alert rule without error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_exported_metrics() {
    let echo = echo_server().await;
    let ngx = nginx(&echo);
    tunnel(&ngx.url("/ws"), 3, Duration::ZERO, Ending::Close(1000)).await;
    let scrape = scrape_when_closed(ngx.port, 1.0).await;
    let exported = exported_names(&scrape);
    // Label names: the module's, and those Prometheus adds to every scraped series.
    let mut labels: BTreeSet<String> = samples(&scrape)
        .into_iter()
        .flat_map(|s| s.1.into_keys())
        .collect();
    labels.extend(["instance".to_string(), "job".to_string()]);
    assert!(
        labels.contains("direction") && labels.contains("le"),
        "{labels:?}"
    );
    assert!(exported.contains("nginx_ws_tunnel_duration_seconds_bucket"));
    assert!(exported.len() >= 15, "{exported:?}");

    let text = std::fs::read_to_string(contrib("grafana/nginx-ws.json")).expect("dashboard");
    let dash: Value = serde_json::from_str(&text).expect("dashboard JSON");
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
    let (mut exprs, mut variables) = (Vec::new(), Vec::new());
    dashboard_queries(&dash, &mut exprs, &mut variables);
    assert!(exprs.len() >= 15, "{exprs:?}");
    assert_eq!(variables.len(), 3, "{variables:?}");
    for e in exprs.iter().chain(&variables) {
        let used = used_names(e);
        assert!(!used.is_empty(), "no nginx_ws_ metric in {e}");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "dashboard: {unknown:?} not exported, in {e}"
        );
        let unknown: Vec<_> = used_labels(e).difference(&labels).cloned().collect();
        assert!(
            unknown.is_empty(),
            "dashboard: labels {unknown:?} not exported, in {e}"
        );
    }
    let alerts = std::fs::read_to_string(contrib("prometheus/alerts.yml")).expect("alerts");
    let used = used_names(&alerts);
    assert!(used.len() >= 6, "{used:?}");
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "alerts.yml: {unknown:?} not exported");

    if !have(PROMETHEUS) {
        return;
    }
    let prom = Prometheus::start(ngx.port, &[contrib("prometheus/alerts.yml")]).await;
    prom.wait_value(r#"nginx_ws_tunnels_closed_total{upstream="backend"}"#, 1.0)
        .await;
    for e in &exprs {
        let q = grafana_to_promql(e);
        if let Err(err) = prom.try_query(&q, None).await {
            panic!("dashboard expression fails in Prometheus: {err}\n{q}");
        }
    }
    // Every rule loaded, and evaluated against the live series without error.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = prom.api("/api/v1/rules").await;
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules").clone())
            .collect();
        assert_eq!(rules.len(), 7, "{v:#}");
        for r in &rules {
            let q = r["query"].as_str().unwrap();
            assert!(used_names(q).is_subset(&exported), "{q}");
            let unknown: Vec<_> = used_labels(q).difference(&labels).cloned().collect();
            assert!(
                unknown.is_empty(),
                "alerts.yml: labels {unknown:?} not exported, in {q}"
            );
            assert_ne!(r["health"], "err", "{r:#}");
        }
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(Instant::now() < deadline, "rules not evaluated: {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ngx.assert_no_crash();
}

/// `promtool check rules` and `promtool test rules` on contrib/prometheus.
#[test]
fn promtool_checks_and_tests_alert_rules() {
    if !have(PROMTOOL) {
        return;
    }
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new(PROMTOOL)
            .args(args)
            .current_dir(contrib("prometheus"))
            .output()
            .expect("run promtool");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
        eprintln!("promtool {}:\n{text}", args.join(" "));
    }
}
