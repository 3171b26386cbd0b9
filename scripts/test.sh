#!/usr/bin/env bash
# The one test command: installs what the tests need (idempotently), then lints and runs pytest.
#
#   bash scripts/test.sh                 # everything, including the end-to-end tests
#   bash scripts/test.sh -m 'not e2e'    # arguments go to pytest
#
# The tests start their own Redis, Label Studio, `lookalike serve` and `lookalike worker`
# processes and a headless Chromium; nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS=test
APT_PACKAGES=(redis-server:redis-server chromium:chromium chromedriver:chromium-driver
              docker-compose:docker-compose)
# shellcheck source=scripts/setup.sh
. scripts/setup.sh

step "ruff check backend tests bench"
.venv/bin/ruff check backend tests bench

step "pytest tests${*:+ $*}"
exec "$VPY" -m pytest tests "$@"
