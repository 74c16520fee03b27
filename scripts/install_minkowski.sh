#!/usr/bin/env bash
# Build and install MinkowskiEngine 0.5.4 (CPU only) against the installed torch.
#
# MinkowskiEngine is the optional backend of the sparse encoder (README,
# "MinkowskiEngine backend"). Its last release cannot be installed by pip (its
# setup.py imports torch while pip prepares metadata) and does not import on Python >= 3.10
# as published, so this script fetches the sdist, verifies its hash, patches it, builds a
# wheel once (9-10 minutes on 2 cores) and caches it. With the wheel cached, a re-run is a
# plain `pip install --no-deps` of it; torch is never touched by pip.
#
# Usage:   bash scripts/install_minkowski.sh
# Env:     FCMAE_WHEEL_CACHE  wheel cache dir (default $HOME/.cache/fcmae-wheels)
#          PYTHON             interpreter to install into (default python3)
#          MAX_JOBS           parallel compile jobs (default: number of CPUs)
# Needs:   root (apt-get for libopenblas-dev), a C++ compiler, network for the first build.
set -euo pipefail

ME_VERSION="0.5.4"
ME_SDIST="MinkowskiEngine-${ME_VERSION}.tar.gz"
ME_SHA256="b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94"
PYPI_INDEX="https://pypi.org/simple/minkowskiengine/"
PYTHON="${PYTHON:-python3}"
CACHE_ROOT="${FCMAE_WHEEL_CACHE:-$HOME/.cache/fcmae-wheels}"

export PIP_ROOT_USER_ACTION=ignore  # the one pip install below is deliberate and --no-deps

log() { echo "[install_minkowski] $*" >&2; }
die() { echo "[install_minkowski] ERROR: $*" >&2; exit 1; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

command -v curl >/dev/null || die "curl is needed to download the MinkowskiEngine sources; install it (apt-get install -y curl)."

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

# --- 3. Build the wheel unless it is cached.
WHEEL="$(find_cached_wheel || true)"
if [ -n "$WHEEL" ]; then
    log "using cached wheel $WHEEL"
else
    WORK_DIR="$(mktemp -d)"
    trap 'rm -rf "$WORK_DIR"' EXIT
    cd "$WORK_DIR"

    log "looking up $ME_SDIST on $PYPI_INDEX"
    SDIST_URL="$(curl -fsSL "$PYPI_INDEX" | grep -o "https://[^\"]*/${ME_SDIST}#sha256=${ME_SHA256}" | head -n 1)" ||
        die "could not find $ME_SDIST with sha256 $ME_SHA256 on $PYPI_INDEX (network down?)."
    log "downloading ${SDIST_URL%%#*}"
    curl -fsSL -o "$ME_SDIST" "${SDIST_URL%%#*}" || die "download of $ME_SDIST failed."
    echo "$ME_SHA256  $ME_SDIST" | sha256sum -c --status - ||
        die "sha256 of $ME_SDIST does not match $ME_SHA256; refusing to build it."
    tar xzf "$ME_SDIST"
    SRC_DIR="$WORK_DIR/MinkowskiEngine-$ME_VERSION"

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
