#!/usr/bin/env bash
# Set up everything the book and the tests need, in .venv next to this file:
#   1. a virtual environment .venv (python3.11, else python3 >= 3.10);
#   2. torch==2.13.0 FIRST (the CPU build on the book's machines), then requirements.txt,
#      then minidiff itself with `pip install -e .`;
#   3. the offline widget manager for the book (npm packages requirejs and
#      @jupyter-widgets/html-manager, unpacked into book/widgets_js/jupyter-widgets/);
#   4. Debian's chromium for the real-browser test (only as root with apt-get; skipped with a
#      message otherwise, and then tests/test_book.py skips unless CI is set).
# Idempotent: a second run checks and returns in a second or two. Safe to run before every command.
# Colab does not use this script: there, `pip install` the library only and keep Colab's torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

TORCH_SPEC="torch==2.13.0"         # never loosen: any other spec pulls GBs of CUDA wheels
REQUIREJS="requirejs@2.3.8"
HTML_MANAGER="@jupyter-widgets/html-manager@1.0.15"
WIDGETS_DIR="book/widgets_js/jupyter-widgets"
REQUIREJS_SHA256="c1fc6b1d53af7522f78d664922abb32acac64ed0ecccb8f907f1e6fc7262563a"
EMBED_AMD_SHA256="ca87dff57c70ffb2658794fde0eab0e27e5f5472a1f5df7ab2b08e1039fc4b72"

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 DEBIAN_FRONTEND=noninteractive

log() { printf "[setup %3ds] %s\n" "$SECONDS" "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- 1-2. Python environment -------------------------------------------------------------
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
PYTHON=""
for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then PYTHON="$candidate"; break; fi
done
[ -n "$PYTHON" ] || die "need python3.11 (or python3 >= 3.10) on PATH"

stamp_file=".venv/.minidiff-setup"
stamp="$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -x .venv/bin/python ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] \
        && .venv/bin/python -c 'import torch, minidiff' 2>/dev/null; then
    log "python environment .venv is up to date"
else
    if [ ! -x .venv/bin/python ]; then
        log "creating .venv with $PYTHON ($("$PYTHON" --version 2>&1))"
        "$PYTHON" -m venv .venv
    fi
    pip=(.venv/bin/python -m pip install --progress-bar off -qq)
    log "installing $TORCH_SPEC"
    "${pip[@]}" "$TORCH_SPEC"
    log "installing requirements.txt"
    "${pip[@]}" -r requirements.txt
    log "installing minidiff (editable)"
    "${pip[@]}" -e .
    .venv/bin/python -c 'import torch, minidiff; print("[setup] torch", torch.__version__, "| minidiff", minidiff.__version__)'
    echo "$stamp" > "$stamp_file"
fi

# --- 3. Offline widget manager for the book ------------------------------------------------
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
if sha_ok "$WIDGETS_DIR/require.js" "$REQUIREJS_SHA256" && sha_ok "$WIDGETS_DIR/embed-amd.js" "$EMBED_AMD_SHA256"; then
    log "widget manager files are in $WIDGETS_DIR"
else
    if ! command -v npm >/dev/null 2>&1; then
        if is_root && command -v apt-get >/dev/null 2>&1; then
            log "installing Debian npm (needed once, to fetch the widget manager)"
            apt_install npm
        else
            die "npm is needed once to fetch $HTML_MANAGER and $REQUIREJS into $WIDGETS_DIR; install Node.js/npm and run again"
        fi
    fi
    log "fetching $REQUIREJS and $HTML_MANAGER from the npm registry"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent --loglevel=error "$REQUIREJS" "$HTML_MANAGER" >/dev/null)
    mkdir -p "$tmp/requirejs" "$tmp/manager" "$WIDGETS_DIR"
    tar -xzf "$tmp"/requirejs-*.tgz -C "$tmp/requirejs"
    tar -xzf "$tmp"/jupyter-widgets-html-manager-*.tgz -C "$tmp/manager"
    rm -rf "${WIDGETS_DIR:?}"/*
    cp "$tmp/requirejs/package/require.js" "$WIDGETS_DIR/"
    # embed-amd.js and the icon fonts it loads from its own folder (no source maps, no other bundles)
    find "$tmp/manager/package/dist" -maxdepth 1 -type f \
        \( -name embed-amd.js -o -name '*.woff' -o -name '*.woff2' -o -name '*.ttf' -o -name '*.eot' -o -name '*.svg' \) \
        -exec cp {} "$WIDGETS_DIR/" \;
    sha_ok "$WIDGETS_DIR/require.js" "$REQUIREJS_SHA256" || die "require.js does not match its pinned sha256"
    sha_ok "$WIDGETS_DIR/embed-amd.js" "$EMBED_AMD_SHA256" || die "embed-amd.js does not match its pinned sha256"
    log "widget manager ready ($(du -sh "$WIDGETS_DIR" | cut -f1))"
fi

# --- 4. Chromium for the real-browser test ------------------------------------------------
chromium=""
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then chromium="$name"; break; fi
done
if [ -n "$chromium" ]; then
    log "browser for tests/test_book.py: $(command -v "$chromium")"
elif is_root && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian chromium (apt-get)"
    if apt_install chromium fonts-liberation; then
        log "installed $(chromium --version 2>/dev/null || echo chromium)"
    elif [ -n "${CI:-}" ]; then
        die "could not install chromium, and CI is set: the browser test would fail"
    else
        log "WARNING: could not install chromium; the browser test in tests/test_book.py will be skipped"
    fi
else
    log "chromium not found and not running as root: skipping its install."
    log "  The browser test in tests/test_book.py will be skipped (it fails when CI is set)."
    log "  Install it with: sudo apt-get install chromium"
fi
log "done"
