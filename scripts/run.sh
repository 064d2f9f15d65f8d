#!/usr/bin/env bash
# The README's main-job command: builds bmojo_core (scripts/env.sh) and runs the benchmark
# suite. Arguments go to `bmojo bench`, e.g. `bash scripts/run.sh --quick --json out.json`.
set -euo pipefail

# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec bmojo bench "$@"
