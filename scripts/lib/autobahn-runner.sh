#!/usr/bin/env bash
# Sets up the Autobahn|Testsuite fuzzing client for `cargo xtask autobahn` and prints, on
# stdout, three lines: the runner (wstest or kosoku), its executable, and its description.
#
# Usage: scripts/lib/autobahn-runner.sh wstest|kosoku WORKDIR
#
# wstest is Python 2.7 code. Python 2.7 comes from Debian 11's packages, fetched with
# `apt-get download` under a private apt configuration (the system's sources are untouched)
# and unpacked into WORKDIR/py27/root; a virtualenv with pinned versions from PyPI goes to
# WORKDIR/venv. Both are kept, so later runs start at once. When wstest cannot be set up, it
# falls back to kosoku (PyPI, Python 3, a runner of the same cases) in WORKDIR/kosoku.
# Installing and downloading is shell work; the runs and their comparison are in xtask.
set -euo pipefail

runner=${1:?usage: autobahn-runner.sh wstest|kosoku WORKDIR}
work=${2:?usage: autobahn-runner.sh wstest|kosoku WORKDIR}
mkdir -p "$work"
work=$(cd "$work" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/lib/common.sh
. "$repo/scripts/lib/common.sh"
# shellcheck source=scripts/lib/deps.sh
. "$repo/scripts/lib/deps.sh"
command -v python3 >/dev/null || install_packages python3 python3-venv
python3 -c 'import venv, ensurepip' 2>/dev/null || install_packages python3-venv
# Everything this prints for people goes to stderr: stdout is for xtask.
exec 3>&1 1>&2

py27=$work/py27
venv=$work/venv
# What wstest needs, at the last versions that work on Python 2.7 together (autobahntestsuite
# declares none of them).
WSTEST_PINS=(setuptools==44.0.0 txaio==2.1.0 incremental==16.10.1 pyOpenSSL==19.1.0
    cryptography==3.3.2 Twisted==19.10.0 zope.interface==4.6.0 jinja2==2.11.3 markupsafe==1.1.1
    Werkzeug==1.0.1 klein==17.10.0 service_identity==18.1.0 unittest2==1.1.0 six==1.16.0
    'autobahn[accelerate,twisted]==0.10.9' autobahntestsuite==25.10.1)
PY27_DEBS=(python2.7 python2.7-minimal libpython2.7-minimal libpython2.7-stdlib python2.7-dev
    libpython2.7-dev libpython2.7 libssl1.1 libffi7)

wstest_env() {
    export LD_LIBRARY_PATH=$py27/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

# Python 2.7 from Debian 11 (bullseye) into $py27/root, with apt's own state in $py27/apt.
setup_py27() {
    [[ -x "$py27/root/usr/bin/python2.7" ]] && return 0
    command -v apt-get >/dev/null && command -v dpkg >/dev/null || {
        say "no apt-get/dpkg: cannot fetch Python 2.7"
        return 1
    }
    [[ "$(dpkg --print-architecture)" == amd64 ]] || {
        say "Python 2.7 from Debian packages is set up for amd64 only"
        return 1
    }
    local apt=$py27/apt keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -f "$keyring" ]] || install_packages debian-archive-keyring
    rm -rf "$py27"
    mkdir -p "$apt/sources.list.d" "$apt/preferences.d" "$apt/lists/partial" \
        "$apt/cache/archives/partial" "$py27/debs" "$py27/root.tmp"
    : >"$apt/status"
    cat >"$apt/sources.list" <<EOF
deb [signed-by=$keyring] http://deb.debian.org/debian bullseye main
deb [signed-by=$keyring] http://deb.debian.org/debian-security bullseye-security main
EOF
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list"
        -o "Dir::Etc::SourceParts=$apt/sources.list.d"
        -o "Dir::Etc::Preferences=$apt/preferences"
        -o "Dir::Etc::PreferencesParts=$apt/preferences.d"
        -o "Dir::State::Lists=$apt/lists" -o "Dir::State::status=$apt/status"
        -o "Dir::Cache=$apt/cache" -o APT::Architecture=amd64 -o Acquire::Languages=none
        -o APT::Sandbox::User=root)
    say "fetching Python 2.7 from Debian 11 (private apt configuration in $apt)"
    apt-get "${opts[@]}" -q update >"$py27/apt.log" 2>&1 || {
        say "apt-get update for bullseye failed; see $py27/apt.log"
        return 1
    }
    (cd "$py27/debs" && apt-get "${opts[@]}" -q download "${PY27_DEBS[@]}") >>"$py27/apt.log" 2>&1 || {
        say "apt-get download failed; see $py27/apt.log"
        return 1
    }
    local deb
    for deb in "$py27"/debs/*.deb; do
        dpkg -x "$deb" "$py27/root.tmp"
    done
    mv "$py27/root.tmp" "$py27/root"
    wstest_env
    "$py27/root/usr/bin/python2.7" -c 'import ssl, zlib, ctypes' || {
        say "the unpacked Python 2.7 does not run"
        rm -rf "$py27/root"
        return 1
    }
}

setup_wstest() {
    local stamp=$venv/.nginx-ws-pins
    wstest_env
    if [[ -x "$venv/bin/wstest" && "$(cat "$stamp" 2>/dev/null)" == "${WSTEST_PINS[*]}" ]]; then
        return 0
    fi
    setup_py27 || return 1
    say "installing wstest and its pinned dependencies into $venv (PyPI)"
    # virtualenv 20.22 dropped Python 2 targets; it lives in a Python 3 venv of its own.
    if [[ ! -x "$work/tools/bin/virtualenv" ]]; then
        python3 -m venv "$work/tools" && "$work/tools/bin/pip" install -q 'virtualenv<20.22' ||
            return 1
    fi
    rm -rf "$venv"
    "$work/tools/bin/virtualenv" -q -p "$py27/root/usr/bin/python2.7" "$venv" || return 1
    local root=$py27/root/usr/include
    CFLAGS="-I$root/python2.7 -I$root/x86_64-linux-gnu/python2.7 -I$root ${CFLAGS:-}" \
        nice "$venv/bin/pip" install -q --no-warn-script-location "${WSTEST_PINS[@]}" \
        >"$work/pip.log" 2>&1 || {
        say "pip install failed; see $work/pip.log"
        return 1
    }
    "$venv/bin/wstest" --help >/dev/null 2>&1 || return 1
    printf '%s' "${WSTEST_PINS[*]}" >"$stamp"
}

setup_kosoku() {
    [[ -x "$work/kosoku/bin/kosoku" ]] && return 0
    say "installing kosoku into $work/kosoku (PyPI)"
    python3 -m venv "$work/kosoku" && "$work/kosoku/bin/pip" install -q kosoku
}

mkdir -p "$work"
if [[ "$runner" == wstest ]] && ! setup_wstest; then
    say "wstest could not be set up: using kosoku (a Python 3 runner of the same cases) instead"
    runner=kosoku
fi
if [[ "$runner" == kosoku ]]; then
    setup_kosoku || die "kosoku could not be installed"
    printf '%s\n%s\n%s\n' kosoku "$work/kosoku/bin/kosoku" \
        "kosoku $("$work/kosoku/bin/pip" show kosoku 2>/dev/null | sed -n 's/^Version: //p')" >&3
else
    printf '%s\n%s\n%s\n' wstest "$venv/bin/wstest" \
        "wstest (autobahntestsuite 25.10.1, Python 2.7)" >&3
fi
