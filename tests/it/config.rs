//! `nginx -t` rejects bad directive values with a message naming the directive and value.

use crate::harness::*;

fn check_fails(http_body: &str, expect: &str) {
    let (ok, out) = nginx_t(&main_conf(1, http_body));
    assert!(!ok, "nginx -t accepted {http_body:?}:\n{out}");
    assert!(out.contains(expect), "expected {expect:?} in:\n{out}");
}

fn in_location(directives: &str) -> String {
    format!(
        "server {{ listen 127.0.0.1:{}; location / {{ {directives} }} }}",
        free_port()
    )
}

#[test]
fn good_configuration_passes() {
    let body = format!(
        "ws_log logs/a.log buffer=32k flush=2s;\nws_log_events open close;\n\
         ws_log_payload 64k;\nserver {{ listen 127.0.0.1:{}; ws_log off;\n\
         location / {{ ws_log logs/b.log; ws_log_events open frame message close reject;\n\
         ws_log_payload 0; }} }}",
        free_port()
    );
    let (ok, out) = nginx_t(&main_conf(1, &body));
    assert!(ok, "{out}");
}

#[test]
fn ws_log_bad_values() {
    check_fails(
        &in_location("ws_log logs/a.log buffer=lots;"),
        "invalid parameter \"buffer=lots\" in \"ws_log\" directive",
    );
    check_fails(
        &in_location("ws_log logs/a.log buffer=0;"),
        "invalid parameter \"buffer=0\" in \"ws_log\" directive",
    );
    check_fails(
        &in_location("ws_log logs/a.log buffer=4k flush=soon;"),
        "invalid parameter \"flush=soon\" in \"ws_log\" directive",
    );
    check_fails(
        &in_location("ws_log logs/a.log gzip;"),
        "invalid parameter \"gzip\" in \"ws_log\" directive",
    );
    check_fails(
        &in_location("ws_log logs/a.log flush=1s;"),
        "\"ws_log\" \"logs/a.log\": flush= needs buffer=",
    );
    check_fails(
        &in_location("ws_log off extra;"),
        "invalid parameter \"extra\" in \"ws_log\" directive",
    );
    check_fails(
        &in_location("ws_log off; ws_log off;"),
        "\"ws_log\" directive is duplicate",
    );
    check_fails(
        &in_location("ws_log;"),
        "invalid number of arguments in \"ws_log\" directive",
    );
    // Same file, different buffering.
    check_fails(
        &format!(
            "ws_log logs/a.log buffer=4k;\n{}",
            in_location("ws_log logs/a.log buffer=8k;")
        ),
        "\"ws_log\" \"logs/a.log\" is already defined with conflicting parameters",
    );
    // A buffered access_log on the same file, in either order.
    check_fails(
        &in_location("ws_log logs/a.log; access_log logs/a.log combined buffer=4k;"),
        "cannot share its file with a buffered log",
    );
    check_fails(
        &in_location("access_log logs/a.log combined buffer=4k; ws_log logs/a.log;"),
        "cannot share its file with a buffered log",
    );
    // Not allowed outside http.
    let (ok, out) = nginx_t(&main_conf(1, "").replace("events {", "events { ws_log x.log;"));
    assert!(
        !ok && out.contains("\"ws_log\" directive is not allowed here"),
        "{out}"
    );
}

#[test]
fn several_ws_log_syslog_and_if_pass() {
    let body = format!(
        "split_clients $request_id $ws_sample {{ 1% 1; * 0; }}\n\
         ws_log logs/all.log buffer=32k flush=1s;\n\
         ws_log syslog:server=127.0.0.1:{},facility=local3,severity=notice,tag=ws,nohostname;\n\
         server {{ listen 127.0.0.1:{};\n\
         location / {{ ws_log logs/sampled.log if=$ws_sample; ws_log logs/all.log buffer=32k \
         flush=1s if=$arg_debug;\n\
         ws_log syslog:server=unix:/dev/log if=$ws_sample; }}\n\
         location /quiet {{ ws_log off; }} }}",
        free_port(),
        free_port()
    );
    let (ok, out) = nginx_t(&main_conf(1, &body));
    assert!(ok, "{out}");
}

#[test]
fn ws_log_off_is_alone_in_its_scope() {
    check_fails(
        &in_location("ws_log off; ws_log logs/a.log;"),
        "\"ws_log off\" cannot be combined with other \"ws_log\" in the same scope",
    );
    check_fails(
        &in_location("ws_log logs/a.log; ws_log off;"),
        "\"ws_log off\" cannot be combined with other \"ws_log\" in the same scope",
    );
    let many: String = (0..65).map(|i| format!("ws_log logs/{i}.log;\n")).collect();
    check_fails(
        &in_location(&many),
        "too many \"ws_log\" in one scope, the maximum is 64",
    );
}

#[test]
fn ws_log_if_bad_values() {
    check_fails(
        &in_location("ws_log logs/a.log if=;"),
        "invalid parameter \"if=\" in \"ws_log\" directive",
    );
    check_fails(
        &in_location("ws_log logs/a.log if=$arg_a if=$arg_b;"),
        "invalid parameter \"if=$arg_b\" in \"ws_log\" directive",
    );
    // nginx's own messages, from its complex value compiler and variable table.
    check_fails(
        &in_location("ws_log logs/a.log if=${arg_a;"),
        "the closing bracket in \"arg_a\" variable is missing",
    );
    check_fails(
        &in_location("ws_log logs/a.log if=$ws_no_such_variable;"),
        "unknown \"ws_no_such_variable\" variable",
    );
}

#[test]
fn ws_log_syslog_bad_values() {
    check_fails(
        &in_location("ws_log syslog:server=127.0.0.1 buffer=4k;"),
        "\"ws_log\" \"syslog:server=127.0.0.1\": logs to syslog cannot be buffered",
    );
    check_fails(
        &in_location("ws_log syslog:server=127.0.0.1 flush=1s;"),
        "flush= needs buffer=",
    );
    check_fails(
        &in_location("ws_log syslog:server=127.0.0.1 gzip;"),
        "invalid parameter \"gzip\" in \"ws_log\" directive",
    );
    // nginx's own syslog parser and its messages.
    check_fails(
        &in_location("ws_log syslog:facility=local0;"),
        "no syslog server specified",
    );
    check_fails(
        &in_location("ws_log syslog:server=127.0.0.1,facility=local9;"),
        "unknown syslog facility \"local9\"",
    );
    check_fails(
        &in_location("ws_log syslog:server=127.0.0.1,severity=loud;"),
        "unknown syslog severity \"loud\"",
    );
    check_fails(
        &in_location("ws_log syslog:server=127.0.0.1,tag=no-dash;"),
        "syslog \"tag\" only allows alphanumeric characters and underscore",
    );
    check_fails(
        &in_location("ws_log syslog:server=127.0.0.1,colour=red;"),
        "unknown syslog parameter \"colour=red\"",
    );
    check_fails(
        &in_location("ws_log syslog:server=127.0.0.1:99999;"),
        "invalid port in syslog server \"127.0.0.1:99999\"",
    );
}

#[test]
fn ws_log_events_bad_values() {
    check_fails(
        &in_location("ws_log_events open frames;"),
        "invalid value \"frames\" in \"ws_log_events\" directive",
    );
    check_fails(
        &in_location("ws_log_events;"),
        "invalid number of arguments in \"ws_log_events\" directive",
    );
    check_fails(
        &in_location("ws_log_events open; ws_log_events close;"),
        "\"ws_log_events\" directive is duplicate",
    );
}

#[test]
fn ws_log_payload_bad_values() {
    check_fails(
        &in_location("ws_log_payload lots;"),
        "invalid value \"lots\" in \"ws_log_payload\" directive",
    );
    check_fails(
        &in_location("ws_log_payload -1;"),
        "invalid value \"-1\" in \"ws_log_payload\" directive",
    );
    check_fails(
        &in_location("ws_log_payload 65537;"),
        "\"ws_log_payload\" must not exceed 65536 bytes, \"65537\" given",
    );
    check_fails(
        &in_location("ws_log_payload 1m;"),
        "\"ws_log_payload\" must not exceed 65536 bytes",
    );
    check_fails(
        &in_location("ws_log_payload 1 2;"),
        "invalid number of arguments in \"ws_log_payload\" directive",
    );
    check_fails(
        &in_location("ws_log_payload 1; ws_log_payload 2;"),
        "\"ws_log_payload\" directive is duplicate",
    );
}

#[test]
fn ws_max_inflated_size_values() {
    let (ok, out) = nginx_t(&main_conf(
        1,
        &format!(
            "ws_max_inflated_size 1m;\nserver {{ listen 127.0.0.1:{}; \
             location / {{ ws_max_inflated_size off; }} location /b {{ ws_max_inflated_size 64k; }} }}",
            free_port()
        ),
    ));
    assert!(ok, "{out}");
    check_fails(
        &in_location("ws_max_inflated_size lots;"),
        "invalid value \"lots\" in \"ws_max_inflated_size\" directive",
    );
    check_fails(
        &in_location("ws_max_inflated_size 1m; ws_max_inflated_size 2m;"),
        "\"ws_max_inflated_size\" directive is duplicate",
    );
}
