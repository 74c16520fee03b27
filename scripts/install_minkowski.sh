#!/usr/bin/env bash
# Build and install MinkowskiEngine 0.5.4 (CPU only) against the installed torch.
#
# MinkowskiEngine is the optional backend of the sparse encoder (README,
# "MinkowskiEngine backend"). Its last release cannot be installed by pip (its
# setup.py imports torch while pip prepares metadata) and does not import on Python >= 3.10
# as published, so this script fetches the sdist through pip (so your pip configuration applies:
# index, mirrors, proxies, certificates), has pip verify its sha256, patches it, builds a wheel
# once (9-10 minutes on 2 cores) and caches it. With the wheel cached, a re-run is a plain
# `pip install --no-deps` of it; torch is never touched by pip.
#
# Usage:   bash scripts/install_minkowski.sh
# Env:     FCMAE_WHEEL_CACHE  wheel cache dir (default $HOME/.cache/fcmae-wheels)
#          PYTHON             interpreter to install into (default python3)
#          MAX_JOBS           parallel compile jobs (default: number of CPUs)
#          ME_SDIST_FILE      a MinkowskiEngine-0.5.4.tar.gz you downloaded yourself (e.g. with curl from
#                             your package index), used instead of fetching it; its sha256 is checked
# Needs:   root (apt-get for libopenblas-dev), a C++ compiler, network for the first build.
set -euo pipefail

ME_VERSION="0.5.4"
ME_SDIST="MinkowskiEngine-${ME_VERSION}.tar.gz"
ME_SHA256="b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94"
PYTHON="${PYTHON:-python3}"
CACHE_ROOT="${FCMAE_WHEEL_CACHE:-$HOME/.cache/fcmae-wheels}"

export PIP_ROOT_USER_ACTION=ignore  # the one pip install below is deliberate and --no-deps

log() { echo "[install_minkowski] $*" >&2; }
die() { echo "[install_minkowski] ERROR: $*" >&2; exit 1; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

# --- 1. torch must already be there: the wheel is built against it, pip never installs it.
TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)" ||
    die "'$PYTHON' cannot import torch; install the CPU build of torch first (README)."
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
CACHE_DIR="$CACHE_ROOT/MinkowskiEngine-${ME_VERSION}_torch-${TORCH_VERSION}_py${PY_VERSION}"
log "python $PY_VERSION ($PYTHON), torch $TORCH_VERSION, wheel cache $CACHE_DIR"

# --- 2. OpenBLAS: needed to build (headers) and at run time (libopenblas.so).
if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "libopenblas-dev is missing and this is not root: run 'apt-get install -y libopenblas-dev' as root first."
    log "installing libopenblas-dev"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q libopenblas-dev >&2 ||
        { log "apt-get install failed; running apt-get update and retrying"; apt-get update -q >&2 && apt-get install -y -q libopenblas-dev >&2; } ||
        die "could not install libopenblas-dev with apt-get."
else
    log "libopenblas-dev already installed"
fi

# the directory name is the cache key; the wheel name's case depends on the setuptools version
find_cached_wheel() { ls "$CACHE_DIR"/*.whl 2>/dev/null | head -n 1; }

# Prints the folder of the unpacked, hash-verified sources. pip has no command that only downloads
# an sdist (pypa/pip#1884): `pip download` unpacks it and asks its setup.py for metadata. It does
# so in an isolated build environment, without torch, where MinkowskiEngine's setup.py stops at its
# `import torch`, before anything else runs (next it would run `rm -rf build` and `pip uninstall
# MinkowskiEngine`). So pip fails by design after it downloaded the sdist (through your pip
# configuration) and checked its sha256 (--require-hashes: a mismatch stops it before unpacking);
# --no-clean keeps the unpacked sources under our TMPDIR. A `pip` on PATH that refuses to run makes
# sure that uninstall cannot happen even where pip's configuration turns build isolation off. A
# pip that someday only downloads leaves the sdist in the download folder instead; both work.
fetch_sources_with_pip() {
    local pip_tmp="$WORK_DIR/pip-tmp" refusing_pip="$WORK_DIR/refusing-pip" sources
    mkdir -p "$pip_tmp" "$refusing_pip" "$WORK_DIR/sdist"
    printf '#!/bin/sh\necho "install_minkowski: pip called from a setup.py, refused" >&2\nexit 1\n' > "$refusing_pip/pip"
    chmod +x "$refusing_pip/pip"
    echo "MinkowskiEngine==$ME_VERSION --hash=sha256:$ME_SHA256" > "$WORK_DIR/requirement.txt"
    log "downloading $ME_SDIST with pip (your pip configuration; sha256 checked by pip)"
    TMPDIR="$pip_tmp" PATH="$refusing_pip:$PATH" "$PYTHON" -m pip download --disable-pip-version-check --no-deps \
        --no-binary :all: --no-clean --require-hashes -r "$WORK_DIR/requirement.txt" -d "$WORK_DIR/sdist" \
        >"$WORK_DIR/pip-download.log" 2>&1 || true  # fails at the metadata step by design (above)
    if [ -f "$WORK_DIR/sdist/$ME_SDIST" ]; then
        echo "$ME_SHA256  $WORK_DIR/sdist/$ME_SDIST" | sha256sum -c --status - ||
            die "sha256 of $ME_SDIST does not match $ME_SHA256; refusing to build it."
        tar xzf "$WORK_DIR/sdist/$ME_SDIST" -C "$WORK_DIR"
        echo "$WORK_DIR/MinkowskiEngine-$ME_VERSION"
        return
    fi
    sources="$(find "$pip_tmp" -path '*/MinkowskiEngine/__init__.py' -print -quit)"
    if [ -z "$sources" ]; then  # pip unpacks only what it downloaded and verified
        tail -n 30 "$WORK_DIR/pip-download.log" >&2
        die "pip could not download $ME_SDIST with sha256 $ME_SHA256 (its output above). Without network access to your package index, download $ME_SDIST yourself (e.g. curl -fLO <its URL on your index>) and rerun with ME_SDIST_FILE=/path/to/$ME_SDIST."
    fi
    dirname "$(dirname "$sources")"
}

# --- 3. Build the wheel unless it is cached.
WHEEL="$(find_cached_wheel || true)"
if [ -n "$WHEEL" ]; then
    log "using cached wheel $WHEEL"
else
    WORK_DIR="$(mktemp -d)"
    trap 'rm -rf "$WORK_DIR"' EXIT
    cd "$WORK_DIR"

    if [ -n "${ME_SDIST_FILE:-}" ]; then
        log "using $ME_SDIST_FILE (ME_SDIST_FILE)"
        echo "$ME_SHA256  $ME_SDIST_FILE" | sha256sum -c --status - ||
            die "sha256 of $ME_SDIST_FILE does not match $ME_SHA256; refusing to build it."
        tar xzf "$ME_SDIST_FILE"
        SRC_DIR="$WORK_DIR/MinkowskiEngine-$ME_VERSION"
    else
        SRC_DIR="$(fetch_sources_with_pip)"
    fi

    log "patching the sources for Python >= 3.10"
    # collections.Sequence was removed in Python 3.10.
    sed -i -E 's/^from collections import Sequence$/from collections.abc import Sequence/;
               s/^from collections import Sequence, namedtuple$/from collections import namedtuple\nfrom collections.abc import Sequence/' \
        "$SRC_DIR"/MinkowskiEngine/*.py "$SRC_DIR"/MinkowskiEngine/utils/*.py
    ! grep -rnE "from collections import .*(Sequence|Iterable|Mapping)" "$SRC_DIR/MinkowskiEngine" >&2 ||
        die "a collections import was left unpatched (listed above)."
    # setup.py runs `rm -rf build` and `pip uninstall MinkowskiEngine` at import time.
    sed -i -E '/^run_command\("(rm|pip)"/d' "$SRC_DIR/setup.py"

    # The build tools go on PYTHONPATH, not into the environment: the build sees the installed
    # torch (no build isolation) and nothing the user has installed changes.
    log "fetching the build tools (setuptools<81, wheel) into the build directory"
    "$PYTHON" -m pip install -q --disable-pip-version-check --target "$WORK_DIR/build-tools" "setuptools<81" wheel >&2 ||
        die "could not fetch setuptools<81 and wheel with pip."

    log "compiling (CPU only, OpenBLAS, MAX_JOBS=${MAX_JOBS:-$(nproc)}); this takes 9-10 minutes on 2 cores"
    BUILD_START=$SECONDS
    (cd "$SRC_DIR" && PYTHONPATH="$WORK_DIR/build-tools" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$PYTHON" setup.py bdist_wheel --cpu_only --blas=openblas -d "$WORK_DIR/dist") >"$WORK_DIR/build.log" 2>&1 ||
        { tail -n 60 "$WORK_DIR/build.log" >&2; die "build failed (last 60 lines of the log above)."; }
    log "compiled in $((SECONDS - BUILD_START)) s"

    # copy under a temporary name, then rename: an interrupted run never leaves a partial wheel
    BUILT="$(ls "$WORK_DIR"/dist/*.whl)" || die "the build reported success but left no wheel in $WORK_DIR/dist."
    mkdir -p "$CACHE_DIR"
    cp "$BUILT" "$CACHE_DIR/.partial"
    mv "$CACHE_DIR/.partial" "$CACHE_DIR/$(basename "$BUILT")"
    WHEEL="$(find_cached_wheel)"
    log "cached $WHEEL"
fi

# --- 4. Install without dependencies so pip cannot replace torch.
log "installing $WHEEL"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$WHEEL" >&2 ||
    die "pip install of $WHEEL failed."

cd /
"$PYTHON" -c 'import torch, MinkowskiEngine as ME; print(ME.__version__, ME.__file__)' >&2 ||
    die "MinkowskiEngine installed but does not import; see the traceback above."
log "done: MinkowskiEngine $ME_VERSION is importable"
