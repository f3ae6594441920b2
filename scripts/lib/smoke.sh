# shellcheck shell=bash
# A live check of a built module in a given nginx binary: `nginx -t` with a generated
# configuration, then a WebSocket tunnel through that nginx to the ws-echo example, and the
# frame records and $ws_* variables it must produce. Everything runs in its own prefix on
# 127.0.0.1 with ports picked at run time; no system file or service is touched.
# Sourced by scripts/build-for-system-nginx and scripts/test-nginx-build.

smoke_say() {
    printf '\033[1m%s:\033[0m %s\n' "${0##*/}" "$*" >&2
}

# A free TCP port on 127.0.0.1.
smoke_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# smoke_run PREFIX NGINX MODULE ECHO_BIN TRAFFIC_BIN
#   PREFIX   an empty or new directory: nginx's prefix (-p) for this check
#   NGINX    the nginx binary
#   MODULE   the .so to load with load_module, or "" when the module is built into NGINX
#   ECHO_BIN, TRAFFIC_BIN  the ws-echo and ws-traffic example binaries
# Returns non-zero (with the reason on stderr) when any step fails.
smoke_run() {
    local prefix=$1 nginx=$2 module=$3 echo_bin=$4 traffic_bin=$5
    local port backend load_line='' rc=0

    mkdir -p "$prefix/logs" "$prefix/tmp"
    prefix=$(cd "$prefix" && pwd)
    chmod 755 "$prefix"
    port=$(smoke_free_port)
    backend=$(smoke_free_port)
    if [[ -n "$module" ]]; then
        load_line="load_module $module;"
    fi

    # -e (nginx >= 1.19.5) keeps the startup error log in the prefix too; Debian's nginx is
    # built with --error-log-path=stderr, others with a path under /var/log or /usr/local.
    cat >"$prefix/nginx.conf" <<EOF
$load_line
daemon off;
master_process on;
worker_processes 1;
error_log logs/error.log info;
pid logs/nginx.pid;
events { worker_connections 64; }
http {
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;

    log_format ws '\$status \$ws_client_frames \$ws_upstream_frames \$ws_close_code \$ws_end';
    access_log logs/access.log ws;

    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      close;
    }

    server {
        listen 127.0.0.1:$port;

        location / {
            proxy_pass http://127.0.0.1:$backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;

            ws_log logs/ws.log;
            ws_log_events open frame message close;
        }
    }
}
EOF

    smoke_say "$nginx -t -p $prefix"
    if ! "$nginx" -p "$prefix" -e logs/error.log -c "$prefix/nginx.conf" -t 2>"$prefix/t.out"; then
        cat "$prefix/t.out" >&2
        smoke_say "FAIL: nginx -t"
        return 1
    fi
    sed 's/^/    /' "$prefix/t.out" >&2

    "$echo_bin" --listen "127.0.0.1:$backend" >"$prefix/logs/echo.log" 2>&1 &
    local echo_pid=$!
    "$nginx" -p "$prefix" -e logs/error.log -c "$prefix/nginx.conf" 2>>"$prefix/logs/stderr.log" &
    local nginx_pid=$!

    local i
    for ((i = 0; i < 200; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null &&
            (exec 3<>"/dev/tcp/127.0.0.1/$backend") 2>/dev/null; then
            break
        fi
        sleep 0.05
    done

    smoke_say "tunnel: ws://127.0.0.1:$port/smoke -> ws-echo 127.0.0.1:$backend"
    if ! timeout 60 "$traffic_bin" "ws://127.0.0.1:$port/smoke" --rounds 3 --interval 0.1 \
        --quiet >&2; then
        smoke_say "FAIL: ws-traffic through nginx"
        rc=1
    fi

    # Records of a tunnel are complete once its close record is written (at tunnel close).
    for ((i = 0; i < 100; i++)); do
        grep -q '"event":"close"' "$prefix/logs/ws.log" 2>/dev/null && break
        sleep 0.05
    done
    kill -TERM "$nginx_pid" 2>/dev/null || true
    wait "$nginx_pid" 2>/dev/null || true
    kill -TERM "$echo_pid" 2>/dev/null || true
    wait "$echo_pid" 2>/dev/null || true

    local opens frames messages closes normal access
    opens=$(grep -c '"event":"open"' "$prefix/logs/ws.log" 2>/dev/null) || true
    frames=$(grep -c '"event":"frame"' "$prefix/logs/ws.log" 2>/dev/null) || true
    messages=$(grep -c '"event":"message"' "$prefix/logs/ws.log" 2>/dev/null) || true
    closes=$(grep -c '"event":"close"' "$prefix/logs/ws.log" 2>/dev/null) || true
    normal=$(grep -c '"event":"close".*"closed_by":"client","end":"normal"' \
        "$prefix/logs/ws.log" 2>/dev/null) || true
    access=$(cat "$prefix/logs/access.log" 2>/dev/null) || true
    smoke_say "records: open=${opens:-0} frame=${frames:-0} message=${messages:-0} close=${closes:-0}"
    smoke_say "access_log (\$status \$ws_client_frames \$ws_upstream_frames \$ws_close_code \$ws_end): $access"

    if [[ "${opens:-0}" != 1 || "${closes:-0}" != 1 || "${normal:-0}" != 1 ]] ||
        ((${frames:-0} < 10 || ${messages:-0} < 6)); then
        smoke_say "FAIL: unexpected records in $prefix/logs/ws.log"
        rc=1
    fi
    if ! [[ "$access" =~ ^101\ [1-9][0-9]*\ [1-9][0-9]*\ 1000\ normal$ ]]; then
        smoke_say "FAIL: unexpected access_log line"
        rc=1
    fi
    if grep -q 'exited on signal\|\[alert\]\|\[emerg\]' "$prefix/logs/error.log"; then
        grep 'exited on signal\|\[alert\]\|\[emerg\]' "$prefix/logs/error.log" >&2
        smoke_say "FAIL: errors in $prefix/logs/error.log"
        rc=1
    fi
    return "$rc"
}
