#!/usr/bin/env bash
# The README's main-job command: builds bmojo_core (scripts/env.sh) and runs the MQAR
# experiment (`bmojo mqar`: SSM, SWA, B'MOJO-F and B'MOJO at an equal attention budget).
# Arguments go to `bmojo mqar`, e.g. `bash scripts/run.sh --quick --out /tmp/mqar`.
set -euo pipefail

# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec bmojo mqar "$@"
