# shellcheck shell=bash
# What every script here shares: its messages. Sourced by the scripts in scripts/.
#
#   say MESSAGE...   a progress line on stderr, "name: message" with the name in bold
#   die MESSAGE...   "name: error: message" on stderr, then exit $DIE_STATUS (default 1)
#
# name is the script's file name.

say() {
    printf '\033[1m%s:\033[0m %s\n' "${0##*/}" "$*" >&2
}

die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit "${DIE_STATUS:-1}"
}

# build_and_locate [--release] [--nice]: one cargo build of the module, the vendored nginx and
# the examples (cargo xtask build, xtask/src/build.rs), then sets module, nginx, build_dir and
# example_NAME for each example (dashes as underscores: example_ws_echo).
# shellcheck disable=SC2120 # the options are optional
build_and_locate() {
    local vars
    vars=$(cargo xtask build --shell "$@") || die "cargo build failed"
    module='' nginx='' build_dir=''
    eval "$vars"
    [[ -f "$module" && -x "$nginx" ]] || die "cargo xtask build did not locate the module and nginx"
}
