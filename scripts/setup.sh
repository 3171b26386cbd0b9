#!/usr/bin/env bash
# Shared install steps of scripts/run.sh and scripts/test.sh (sourced, not run): idempotent,
# so a second run skips what is already done. The caller sets, before sourcing:
#   EXTRAS        the project's pip extras to install ("test" or "demo")
#   APT_PACKAGES  "command:debian-package" pairs, installed when the command is missing
# Installs: those Debian packages, .venv (python3.11+) with torch, torchvision and
# `pip install -e '.[EXTRAS]'`, and Label Studio 1.23.2 in its own venv at
# ${LOOKALIKE_LS_VENV:-$HOME/.cache/lookalike-ls-venv}.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
LABEL_STUDIO_VERSION=1.23.2
export LOOKALIKE_LS_VENV="${LOOKALIKE_LS_VENV:-$HOME/.cache/lookalike-ls-venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '==> %s\n' "$*"; }

# pip, minus this machine's noise about local index directories that lack a package.
pip_q() {
    local status=0
    "$@" 2>&1 | { grep -v -E "^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.$" || true; } || status=$?
    return "$status"
}
die() { printf 'scripts/setup.sh: %s\n' "$*" >&2; exit 1; }

# --- Debian packages: "command:package" pairs, installed when the command is missing -------
APT_UPDATED=
apt_need() {
    local pair command package missing=()
    for pair in "$@"; do
        command=${pair%%:*}
        package=${pair#*:}
        if command -v "$command" >/dev/null 2>&1; then
            step "$package: $(command -v "$command")"
        else
            missing+=("$package")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    step "installing ${missing[*]} (apt)"
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=()
    elif [ -t 0 ]; then
        SUDO=(sudo)
    else
        SUDO=(sudo -n)  # no terminal to ask for a password on (CI)
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "$APT_UPDATED" ]; then
        ${SUDO[@]+"${SUDO[@]}"} apt-get update -qq
        APT_UPDATED=1
    fi
    # No recommends: docker-compose would otherwise pull in a whole Docker engine.
    ${SUDO[@]+"${SUDO[@]}"} apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || die "${pair#*:} still missing after apt-get install"
    done
}
apt_need "${APT_PACKAGES[@]}"

# --- python 3.11+ -------------------------------------------------------------------------
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [ -x .venv/bin/python ] && python_ok .venv/bin/python; then
    step ".venv: $(.venv/bin/python --version)"
else
    PY=$(find_python) || die "need Python 3.11 or newer (set PYTHON=/path/to/python3.11)"
    step "creating .venv with $PY ($("$PY" --version))"
    rm -rf .venv
    "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"

# --- torch (from this machine's wheels), then the project --------------------------------
torch_ok() {
    "$VPY" - "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version

want = {"torch": sys.argv[1], "torchvision": sys.argv[2]}
sys.exit(any(version(name).split("+")[0] != v for name, v in want.items()))
EOF
}

if torch_ok; then
    step "torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION: installed"
else
    step "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
    pip_q "$VPY" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

STAMP=.venv/.lookalike-install-stamp
WANT_STAMP="$(sha256sum <pyproject.toml | cut -d' ' -f1) torch=$TORCH_VERSION tv=$TORCHVISION_VERSION extras=$EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT_STAMP" ] \
    && "$VPY" -c 'import lookalike' >/dev/null 2>&1; then
    step "lookalike[$EXTRAS]: up to date with pyproject.toml"
else
    step "installing lookalike[$EXTRAS] (pip install -e '.[$EXTRAS]')"
    rm -f "$STAMP"
    pip_q "$VPY" -m pip install -q -e ".[$EXTRAS]"
    printf '%s\n' "$WANT_STAMP" >"$STAMP"
fi

# --- Label Studio, in a venv of its own ----------------------------------------------------
LS_STAMP="$LOOKALIKE_LS_VENV/.lookalike-label-studio-$LABEL_STUDIO_VERSION"
if [ -x "$LOOKALIKE_LS_VENV/bin/label-studio" ] \
    && { [ -f "$LS_STAMP" ] || "$LOOKALIKE_LS_VENV/bin/python" -c \
        "from importlib.metadata import version; assert version('label-studio') == '$LABEL_STUDIO_VERSION'" \
        >/dev/null 2>&1; }; then
    step "label-studio $LABEL_STUDIO_VERSION: $LOOKALIKE_LS_VENV"
    touch "$LS_STAMP" 2>/dev/null || true
else
    step "installing label-studio==$LABEL_STUDIO_VERSION into $LOOKALIKE_LS_VENV (takes a while)"
    if [ ! -x "$LOOKALIKE_LS_VENV/bin/python" ] || ! python_ok "$LOOKALIKE_LS_VENV/bin/python"; then
        PY=${PY:-$(find_python)} || die "need Python 3.11 or newer for Label Studio"
        mkdir -p "$(dirname "$LOOKALIKE_LS_VENV")"
        "$PY" -m venv "$LOOKALIKE_LS_VENV"
    fi
    pip_q "$LOOKALIKE_LS_VENV/bin/python" -m pip install -q "label-studio==$LABEL_STUDIO_VERSION"
    [ -x "$LOOKALIKE_LS_VENV/bin/label-studio" ] || die "label-studio not installed in $LOOKALIKE_LS_VENV"
    touch "$LS_STAMP"
fi

