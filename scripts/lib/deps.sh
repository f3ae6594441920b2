# shellcheck shell=bash
# Installs what building the module needs, from Debian's packages only.

BUILD_PACKAGES=(build-essential pkg-config libssl-dev libpcre2-dev zlib1g-dev libclang-dev clang)

install_build_deps() {
    local missing=()
    local p
    for p in "${BUILD_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" -ne 0 ]; then
            echo "missing packages: ${missing[*]} (run as root, or install them)" >&2
            exit 1
        fi
        echo "== installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        if [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            echo "cargo not found: install a stable Rust toolchain (https://rustup.rs) first" >&2
            exit 1
        fi
    fi
}
