# shellcheck shell=bash
# What building and testing the module needs, installed from Debian's packages (and PyPI for
# the Python test peer). Sourced by scripts/demo and scripts/test.

BUILD_PACKAGES=(build-essential pkg-config libssl-dev libpcre2-dev zlib1g-dev libclang-dev clang)

deps_say() {
    printf '\033[1m%s:\033[0m %s\n' "${0##*/}" "$*" >&2
}

# Installs the missing Debian packages given as arguments (as root, or through sudo).
install_packages() {
    if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
        deps_say "no apt-get here: make sure these are installed: $*"
        return 0
    fi
    local missing=() pkg status sudo=()
    for pkg in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [[ "$status" == installed ]] || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if ((EUID != 0)); then
        command -v sudo >/dev/null || {
            deps_say "missing packages: ${missing[*]}; install them as root: apt-get install ${missing[*]}"
            exit 1
        }
        sudo=(sudo)
    fi
    deps_say "installing ${missing[*]}"
    "${sudo[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends \
        "${missing[@]}"
}

# Build packages, and cargo on PATH (rustup installs into ~/.cargo/bin).
install_build_deps() {
    install_packages "${BUILD_PACKAGES[@]}"
    if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        PATH=$HOME/.cargo/bin:$PATH
    fi
    if ! command -v cargo >/dev/null; then
        cat >&2 <<'MSG'
cargo (Rust) is not installed. Install Rust with rustup (https://rustup.rs):

    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
    . "$HOME/.cargo/env"

then run this command again.
MSG
        exit 1
    fi
}

# Debian's prometheus (server and promtool) for tests/it/prometheus.rs. On a machine running
# systemd the package starts its service on :9090: a service we started only by installing the
# package for the tests is stopped and disabled again.
install_prometheus() {
    [[ -x /usr/bin/prometheus && -x /usr/bin/promtool ]] && return 0
    install_packages prometheus
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
        local sudo=()
        ((EUID == 0)) || sudo=(sudo)
        deps_say "stopping the prometheus service the package started (the tests run their own)"
        "${sudo[@]}" systemctl disable --now prometheus.service || true
    fi
}

# Python 3 with the `websockets` package (a permessage-deflate client/server): a test peer,
# and the client of scripts/bench-instructions.
install_python_websockets() {
    if ! command -v python3 >/dev/null; then
        install_packages python3 python3-pip
    fi
    if ! python3 -c 'import websockets' 2>/dev/null; then
        deps_say "installing the Python websockets package (PyPI)"
        python3 -m pip install --quiet 'websockets>=14' 2>/dev/null \
            || python3 -m pip install --quiet --break-system-packages 'websockets>=14' \
            || install_packages python3-websockets
    fi
    python3 -c 'import websockets' || {
        deps_say "python3 cannot import websockets"
        exit 1
    }
}

# Test peers: Python websockets, Debian's chromium (a real browser, headless) and Prometheus.
install_test_deps() {
    install_prometheus
    install_python_websockets
    # A real browser for the compressed-tunnel test (tests/it/deflate.rs): Debian's chromium.
    command -v chromium >/dev/null || install_packages chromium
}

# The nginx-tests-format suite (tests/nginx/*.t): perl's prove, Protocol::WebSocket and
# IO::Socket::SSL, from Debian's packages.
install_nginx_t_deps() {
    command -v prove >/dev/null || install_packages perl
    perl -MProtocol::WebSocket -e 1 2>/dev/null || install_packages libprotocol-websocket-perl
    perl -MIO::Socket::SSL -e 1 2>/dev/null || install_packages libio-socket-ssl-perl
}
