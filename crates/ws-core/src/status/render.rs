//! `ws_status` output from a [`Snapshot`]: JSON, and the Prometheus text exposition format
//! (version 0.0.4).

use core::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::{EntrySnapshot, Reject, Snapshot, BUCKETS_MS, DIRECTIONS, ENDS};
use crate::flow::Rule;
use crate::frame::Opcode;

/// Opcodes printed always; reserved ones only when seen.
const NAMED_OPCODES: [Opcode; 6] = [
    Opcode::Text,
    Opcode::Binary,
    Opcode::Continuation,
    Opcode::Close,
    Opcode::Ping,
    Opcode::Pong,
];

/// Which opcodes of one direction to print, with their label value.
fn opcodes(counts: &[u64; 16]) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = NAMED_OPCODES
        .iter()
        .map(|o| {
            (
                o.name().unwrap_or_default().to_string(),
                usize::from(o.as_u8()),
            )
        })
        .collect();
    for (v, &n) in counts.iter().enumerate() {
        if n > 0 && Opcode::from_u8(v as u8).name().is_none() {
            out.push((v.to_string(), v));
        }
    }
    out
}

fn seconds(ms: u64) -> String {
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

/// The zone as JSON (the schema is in docs/metrics.md).
pub fn json(zone: &str, size: usize, s: &Snapshot) -> Value {
    let entries: Vec<Value> = s.entries.iter().map(entry_json).collect();
    json!({
        "zone": zone,
        "size": size,
        "capacity": s.capacity,
        "used": s.used,
        "log_records_dropped": s.log_dropped,
        "entries": entries,
    })
}

fn entry_json(e: &EntrySnapshot) -> Value {
    let by_opcode = |table: &[[u64; 16]; 3]| {
        let mut m = Map::new();
        for (d, counts) in DIRECTIONS.iter().zip(table) {
            let mut o = Map::new();
            for (name, v) in opcodes(counts) {
                o.insert(name, counts[v].into());
            }
            m.insert(d.as_str().into(), o.into());
        }
        Value::Object(m)
    };
    let messages: Map<String, Value> = DIRECTIONS[..2]
        .iter()
        .zip(&e.messages)
        .map(|(d, m)| (d.as_str().into(), json!({"text": m[0], "binary": m[1]})))
        .collect();
    let codes: Map<String, Value> = DIRECTIONS
        .iter()
        .zip(&e.codes)
        .map(|(d, c)| {
            let m: Map<String, Value> = c
                .iter()
                .map(|(l, n)| (l.to_string(), (*n).into()))
                .collect();
            (d.as_str().into(), m.into())
        })
        .collect();
    let ends: Map<String, Value> = ENDS
        .iter()
        .zip(&e.ends)
        .map(|(end, n)| (end.as_str().into(), (*n).into()))
        .collect();
    let rejects: Map<String, Value> = Reject::ALL
        .iter()
        .zip(&e.rejects)
        .map(|(r, n)| (r.as_str().into(), (*n).into()))
        .collect();
    let violations: Map<String, Value> = ["client", "upstream"]
        .iter()
        .zip(&e.violations)
        .map(|(side, counts)| {
            let m: Map<String, Value> = Rule::ALL
                .iter()
                .zip(counts)
                .map(|(r, n)| (r.as_str().into(), (*n).into()))
                .collect();
            ((*side).into(), m.into())
        })
        .collect();
    let mut cumulative = 0;
    let buckets: Vec<Value> = e
        .buckets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            cumulative += n;
            let le = match BUCKETS_MS.get(i) {
                Some(&ms) => json!(ms as f64 / 1000.0),
                None => json!("+Inf"),
            };
            json!({"le": le, "count": cumulative})
        })
        .collect();
    json!({
        "route": e.route,
        "upstream": e.upstream,
        "other": e.other,
        "tunnels": {"active": e.active, "opened": e.opened, "closed": e.closed},
        "frames": by_opcode(&e.frames),
        "bytes": by_opcode(&e.bytes),
        "messages": messages,
        "close_codes": codes,
        "ends": ends,
        "rejects": rejects,
        "protocol_violations": violations,
        "messages_delayed": {"client": e.delayed[0], "upstream": e.delayed[1]},
        "duration": {
            "buckets": buckets,
            "sum_seconds": e.duration_ms as f64 / 1000.0,
            "count": cumulative,
        },
    })
}

/// A label value, escaped for the text format.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

struct Prom {
    out: String,
}

impl Prom {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: &dyn core::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// The zone in the Prometheus text format.
pub fn prometheus(zone: &str, s: &Snapshot) -> String {
    let mut p = Prom { out: String::new() };
    let base = |e: &EntrySnapshot| [("route", e.route.clone()), ("upstream", e.upstream.clone())];
    let labels = |e: &EntrySnapshot, extra: &[(&'static str, String)]| {
        let mut v: Vec<(&'static str, String)> = base(e).to_vec();
        v.extend_from_slice(extra);
        v
    };
    let emit =
        |p: &mut Prom, name: &str, l: Vec<(&'static str, String)>, v: &dyn core::fmt::Display| {
            let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            p.sample(name, &l, v);
        };

    p.family(
        "nginx_ws_tunnels_active",
        "gauge",
        "WebSocket tunnels open now.",
    );
    for e in &s.entries {
        emit(&mut p, "nginx_ws_tunnels_active", labels(e, &[]), &e.active);
    }
    p.family(
        "nginx_ws_tunnels_opened_total",
        "counter",
        "WebSocket tunnels opened (101 Switching Protocols passed).",
    );
    for e in &s.entries {
        emit(
            &mut p,
            "nginx_ws_tunnels_opened_total",
            labels(e, &[]),
            &e.opened,
        );
    }
    p.family(
        "nginx_ws_tunnels_closed_total",
        "counter",
        "WebSocket tunnels closed.",
    );
    for e in &s.entries {
        emit(
            &mut p,
            "nginx_ws_tunnels_closed_total",
            labels(e, &[]),
            &e.closed,
        );
    }

    for (name, help, table) in [
        (
            "nginx_ws_frames_total",
            "Frames forwarded, by sender and opcode.",
            (|e: &EntrySnapshot| e.frames) as fn(&EntrySnapshot) -> [[u64; 16]; 3],
        ),
        (
            "nginx_ws_payload_bytes_total",
            "Frame payload bytes, by sender and opcode.",
            |e: &EntrySnapshot| e.bytes,
        ),
    ] {
        p.family(name, "counter", help);
        for e in &s.entries {
            let t = table(e);
            for (d, counts) in DIRECTIONS.iter().zip(&t) {
                for (op, v) in opcodes(counts) {
                    let l = labels(
                        e,
                        &[("direction", d.as_str().into()), ("opcode", op.clone())],
                    );
                    emit(&mut p, name, l, &counts[v]);
                }
            }
        }
    }

    p.family(
        "nginx_ws_messages_total",
        "counter",
        "Complete data messages, by sender and type.",
    );
    for e in &s.entries {
        for (d, m) in DIRECTIONS[..2].iter().zip(&e.messages) {
            for (op, n) in [("text", m[0]), ("binary", m[1])] {
                let l = labels(
                    e,
                    &[("direction", d.as_str().into()), ("opcode", op.into())],
                );
                emit(&mut p, "nginx_ws_messages_total", l, &n);
            }
        }
    }

    p.family(
        "nginx_ws_close_codes_total",
        "counter",
        "Tunnels in which a side sent a Close frame, by side and the code of its first Close.",
    );
    for e in &s.entries {
        for (d, codes) in DIRECTIONS.iter().zip(&e.codes) {
            for (code, n) in codes {
                let l = labels(
                    e,
                    &[("direction", d.as_str().into()), ("code", code.to_string())],
                );
                emit(&mut p, "nginx_ws_close_codes_total", l, n);
            }
        }
    }

    p.family(
        "nginx_ws_tunnel_ends_total",
        "counter",
        "Closed tunnels by why they ended.",
    );
    for e in &s.entries {
        for (end, n) in ENDS.iter().zip(&e.ends) {
            let l = labels(e, &[("end", end.as_str().into())]);
            emit(&mut p, "nginx_ws_tunnel_ends_total", l, n);
        }
    }

    p.family(
        "nginx_ws_handshake_rejections_total",
        "counter",
        "Upgrade requests refused by the module, by reason.",
    );
    for e in &s.entries {
        for (r, n) in Reject::ALL.iter().zip(&e.rejects) {
            let l = labels(e, &[("reason", r.as_str().into())]);
            emit(&mut p, "nginx_ws_handshake_rejections_total", l, n);
        }
    }

    p.family(
        "nginx_ws_messages_delayed_total",
        "counter",
        "Data messages a ws_limit held back, by the peer that sent them.",
    );
    for e in &s.entries {
        for (side, n) in ["client", "upstream"].iter().zip(&e.delayed) {
            let l = labels(e, &[("direction", (*side).into())]);
            emit(&mut p, "nginx_ws_messages_delayed_total", l, n);
        }
    }

    p.family(
        "nginx_ws_protocol_violations_total",
        "counter",
        "Frames refused by ws_protocol_check, by the peer that sent them and the RFC 6455 rule.",
    );
    for e in &s.entries {
        for (side, counts) in ["client", "upstream"].iter().zip(&e.violations) {
            for (r, n) in Rule::ALL.iter().zip(counts) {
                let l = labels(
                    e,
                    &[("direction", (*side).into()), ("rule", r.as_str().into())],
                );
                emit(&mut p, "nginx_ws_protocol_violations_total", l, n);
            }
        }
    }

    p.family(
        "nginx_ws_tunnel_duration_seconds",
        "histogram",
        "How long closed tunnels were open.",
    );
    for e in &s.entries {
        let mut cumulative = 0;
        for (i, n) in e.buckets.iter().enumerate() {
            cumulative += n;
            let le = match BUCKETS_MS.get(i) {
                Some(&ms) => seconds(ms)
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_string(),
                None => "+Inf".into(),
            };
            let l = labels(e, &[("le", le)]);
            emit(
                &mut p,
                "nginx_ws_tunnel_duration_seconds_bucket",
                l,
                &cumulative,
            );
        }
        let sum = seconds(e.duration_ms);
        emit(
            &mut p,
            "nginx_ws_tunnel_duration_seconds_sum",
            labels(e, &[]),
            &sum,
        );
        emit(
            &mut p,
            "nginx_ws_tunnel_duration_seconds_count",
            labels(e, &[]),
            &cumulative,
        );
    }

    p.family(
        "nginx_ws_log_records_dropped_total",
        "counter",
        "ws_log records lost to failed writes, all workers.",
    );
    p.sample("nginx_ws_log_records_dropped_total", &[], &s.log_dropped);
    p.family(
        "nginx_ws_status_zone_label_sets",
        "gauge",
        "Label sets (route, upstream) stored in the ws_status_zone.",
    );
    p.sample(
        "nginx_ws_status_zone_label_sets",
        &[("zone", zone)],
        &s.used,
    );
    p.family(
        "nginx_ws_status_zone_capacity",
        "gauge",
        "Label sets the ws_status_zone has room for; further ones count as \"(other)\".",
    );
    p.sample(
        "nginx_ws_status_zone_capacity",
        &[("zone", zone)],
        &s.capacity,
    );
    p.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{End, From};
    use crate::status::tests::Mem;
    use crate::status::{bucket_index, Key};

    fn sample() -> Snapshot {
        let m = Mem::new(3);
        let (s, _) = m.table.slot(Key::new("", "chat \"a\"\\b"), || ());
        let e = s.entry();
        e.opened();
        e.opened();
        e.frame(From::Client, Opcode::Text, 10);
        e.message(From::Client, Opcode::Text);
        e.frame(From::Upstream, Opcode::Reserved(0xb), 1);
        e.closed(
            End::IdleTimeout,
            [Some(Some(1000)), None, Some(Some(1001))],
            2_500,
        );
        e.reject(Reject::Origin);
        e.violation(From::Upstream, Rule::Masking);
        m.table.count_log_dropped(3);
        m.table.slot(Key::new("", "x"), || ());
        let (o, _) = m.table.slot(Key::new("", "y"), || ());
        o.entry().opened();
        m.table.snapshot()
    }

    #[test]
    fn json_schema() {
        let v = json("ws", 1 << 20, &sample());
        assert_eq!(v["zone"], "ws");
        assert_eq!(v["size"], 1 << 20);
        assert_eq!(
            (v["capacity"].as_u64(), v["used"].as_u64()),
            (Some(2), Some(2))
        );
        assert_eq!(v["log_records_dropped"], 3);
        let e = &v["entries"][0];
        assert_eq!(e["upstream"], "chat \"a\"\\b");
        assert_eq!(e["route"], "");
        assert_eq!(e["tunnels"], json!({"active": 1, "opened": 2, "closed": 1}));
        assert_eq!(e["frames"]["client"]["text"], 1);
        assert_eq!(e["frames"]["proxy"]["close"], 0);
        assert_eq!(e["frames"]["upstream"]["11"], 1);
        assert_eq!(e["bytes"]["client"]["text"], 10);
        assert_eq!(e["messages"]["client"], json!({"text": 1, "binary": 0}));
        assert_eq!(e["close_codes"]["client"], json!({"1000": 1}));
        assert_eq!(e["close_codes"]["upstream"], json!({}));
        assert_eq!(e["protocol_violations"]["upstream"]["masking"], 1);
        assert_eq!(e["protocol_violations"]["client"]["masking"], 0);
        assert_eq!(e["close_codes"]["proxy"], json!({"1001": 1}));
        assert_eq!(e["ends"]["idle_timeout"], 1);
        assert_eq!(e["ends"].as_object().unwrap().len(), ENDS.len());
        assert_eq!(e["rejects"]["origin"], 1);
        let b = e["duration"]["buckets"].as_array().unwrap();
        assert_eq!(b.len(), BUCKETS_MS.len() + 1);
        assert_eq!(b[bucket_index(2_500)]["count"], 1);
        assert_eq!(b[bucket_index(2_500) - 1]["count"], 0);
        assert_eq!(b.last().unwrap()["le"], "+Inf");
        assert_eq!(e["duration"]["sum_seconds"], 2.5);
        let other = &v["entries"][2];
        assert_eq!(other["other"], true);
        assert_eq!(other["tunnels"]["opened"], 1);
    }

    #[test]
    fn prometheus_text() {
        let t = prometheus("ws", &sample());
        let has = |line: &str| assert!(t.lines().any(|l| l == line), "{line:?} in\n{t}");
        has("# TYPE nginx_ws_tunnels_opened_total counter");
        has(r#"nginx_ws_tunnels_opened_total{route="",upstream="chat \"a\"\\b"} 2"#);
        has(
            r#"nginx_ws_frames_total{route="",upstream="chat \"a\"\\b",direction="client",opcode="text"} 1"#,
        );
        has(
            r#"nginx_ws_frames_total{route="",upstream="chat \"a\"\\b",direction="upstream",opcode="11"} 1"#,
        );
        has(
            r#"nginx_ws_close_codes_total{route="",upstream="chat \"a\"\\b",direction="proxy",code="1001"} 1"#,
        );
        has(
            r#"nginx_ws_tunnel_duration_seconds_bucket{route="",upstream="chat \"a\"\\b",le="1"} 0"#,
        );
        has(
            r#"nginx_ws_tunnel_duration_seconds_bucket{route="",upstream="chat \"a\"\\b",le="5"} 1"#,
        );
        has(
            r#"nginx_ws_tunnel_duration_seconds_bucket{route="",upstream="chat \"a\"\\b",le="0.1"} 0"#,
        );
        has(
            r#"nginx_ws_tunnel_duration_seconds_bucket{route="",upstream="chat \"a\"\\b",le="+Inf"} 1"#,
        );
        has(r#"nginx_ws_tunnel_duration_seconds_sum{route="",upstream="chat \"a\"\\b"} 2.500"#);
        has(r#"nginx_ws_tunnels_opened_total{route="(other)",upstream="(other)"} 1"#);
        has("nginx_ws_log_records_dropped_total 3");
        has(
            r#"nginx_ws_protocol_violations_total{route="",upstream="chat \"a\"\\b",direction="upstream",rule="masking"} 1"#,
        );
        has(
            r#"nginx_ws_protocol_violations_total{route="",upstream="chat \"a\"\\b",direction="client",rule="masking"} 0"#,
        );
        has(r#"nginx_ws_status_zone_capacity{zone="ws"} 2"#);
        // Each family has exactly one HELP and TYPE line.
        let types: Vec<&str> = t.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let mut dedup = types.clone();
        dedup.dedup();
        assert_eq!(types, dedup);
    }
}
