# shellcheck shell=sh
# Read by nginx's ./configure while it writes objs/Makefile: the cargo build of nginx-ws.
# (auto/rust was sourced by ./config in this same shell.)

ngx_ws_make_rules
