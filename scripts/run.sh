#!/usr/bin/env bash
# The one run command: installs what it needs (idempotently), shows the embedded mode on the
# demo photos (lookalike index + lookalike search), then runs the whole stack locally with
# `lookalike demo`: Redis, Label Studio, lookalike serve and a worker, a demo project, connected
# and indexed. Ctrl-C stops everything. Arguments go to `lookalike demo` (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS=demo
APT_PACKAGES=(redis-server:redis-server)
# shellcheck source=scripts/setup.sh
. scripts/setup.sh

DEMO_DIR=.lookalike-demo
export PATH="$ROOT/.venv/bin:$PATH"
if [ -z "${LOOKALIKE_MODEL:-}" ]; then
    # Offline-capable default for the demo; `lookalike demo` says so too.
    [ -f "$DEMO_DIR/weights/efficientnet_lite0.pth" ] \
        || lookalike weights "$DEMO_DIR/weights/efficientnet_lite0.pth" >/dev/null
    CLI_ENV=(LOOKALIKE_MODEL=timm:efficientnet_lite0
             "LOOKALIKE_WEIGHTS=$ROOT/$DEMO_DIR/weights/efficientnet_lite0.pth")
else
    CLI_ENV=()
fi
"$VPY" -c "from lookalike_dev.demo import demo_images; demo_images(__import__('pathlib').Path('$DEMO_DIR/images'))"

step "embedded mode: lookalike index $DEMO_DIR/images"
env ${CLI_ENV[@]+"${CLI_ENV[@]}"} LOOKALIKE_DATA_DIR="$DEMO_DIR/data" \
    lookalike index "$DEMO_DIR/images" --collection demo
step "embedded mode: lookalike search --image $DEMO_DIR/images/chelsea-cropped.jpg -k 5"
env ${CLI_ENV[@]+"${CLI_ENV[@]}"} LOOKALIKE_DATA_DIR="$DEMO_DIR/data" \
    lookalike search --image "$DEMO_DIR/images/chelsea-cropped.jpg" -k 5 --collection demo

step "lookalike demo $*"
exec lookalike demo --dir "$DEMO_DIR" "$@"
