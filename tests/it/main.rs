//! Integration tests: the vendored nginx (or `NGX_WS_NGINX`) with the module loaded by
//! `load_module`, real WebSocket peers, run-time ports on 127.0.0.1.

mod config;
mod docs;
mod examples;
mod harness;
mod logfile;
mod metrics;
mod policy;
mod prometheus;
mod route;
mod security;
mod timeouts;
mod tls;
mod tunnel;
