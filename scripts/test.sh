#!/usr/bin/env bash
# The README's test command: builds bmojo_core (scripts/env.sh), then runs every check.
#
#   bash scripts/test.sh
#
# Steps: cargo fmt --check, cargo clippy -D warnings, cargo test (release), ruff check,
# ruff format --check, pytest (2 xdist workers; BMOJO_TEST_WORKERS overrides), and the wheel
# tests (scripts/wheel_test.sh: the release wheel in fresh venvs against the newest and the
# oldest declared torch, and the sdist build; BMOJO_TEST_WHEEL=0 skips them). Every step
# runs even when an earlier one fails; the exit status is non-zero if any step failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh

# Reuse the interpreter configuration maturin generated, so that plain cargo commands do not
# rebuild pyo3 with a different configuration.
_bmojo_pyo3_cfg="$(ls -t "$CARGO_TARGET_DIR"/maturin/pyo3-config-*.txt 2>/dev/null | head -n 1 || true)"
if [ -n "$_bmojo_pyo3_cfg" ]; then
  export PYO3_CONFIG_FILE="$_bmojo_pyo3_cfg"
fi

# rustfmt and clippy are separate rustup components; add them when rustup can.
for _bmojo_tool in fmt clippy; do
  if ! cargo "$_bmojo_tool" --version >/dev/null 2>&1; then
    _bmojo_component=$([ "$_bmojo_tool" = fmt ] && echo rustfmt || echo clippy)
    if command -v rustup >/dev/null 2>&1; then
      echo "[test.sh] installing the rustup component $_bmojo_component" >&2
      rustup component add "$_bmojo_component"
    else
      echo "[test.sh] ERROR: 'cargo $_bmojo_tool' is missing; install the Rust component" \
        "'$_bmojo_component' (rustup component add $_bmojo_component)." >&2
      exit 1
    fi
  fi
done

failed=()
step() {
  local name="$1"
  shift
  printf '\n==> %s\n    $ %s\n' "$name" "$*"
  local t0=$SECONDS
  if "$@"; then
    printf '<== %s: ok (%ds)\n' "$name" $((SECONDS - t0))
  else
    printf '<== %s: FAILED (%ds)\n' "$name" $((SECONDS - t0))
    failed+=("$name")
  fi
}

step "cargo fmt" cargo fmt --all --check
step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
step "cargo test" cargo test --workspace --release
step "ruff check" ruff check python tests benches
step "ruff format" ruff format --check python tests benches
step "pytest" env BMOJO_TEST_STRICT=1 python -m pytest -q -n "${BMOJO_TEST_WORKERS:-2}" tests
if [ "${BMOJO_TEST_WHEEL:-1}" = "1" ]; then
  step "wheel tests" bash scripts/wheel_test.sh
fi

echo
if [ "${#failed[@]}" -ne 0 ]; then
  echo "test.sh: FAILED steps: ${failed[*]}"
  exit 1
fi
echo "test.sh: all checks passed"
