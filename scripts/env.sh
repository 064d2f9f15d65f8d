#!/usr/bin/env bash
# Find or create bmojo_core's virtual environment, then build and install the package.
#
#   source scripts/env.sh      # used by scripts/run.sh and scripts/test.sh
#   bash scripts/env.sh        # just set up / rebuild
#
# Environment knobs:
#   BMOJO_VENV       where the virtual environment lives (default ~/.cache/bmojo_core/venv)
#   BMOJO_PYTHON     interpreter used to create it (default python3, must be >= 3.10)
#   BMOJO_PIP_ARGS   extra arguments for the requirements install, e.g.
#                    "--extra-index-url https://download.pytorch.org/whl/cpu"
#   BMOJO_FORCE_BUILD=1  rebuild the extension even when the sources did not change
#
# Idempotent: the pip install is skipped when a stamp in the venv records the same
# requirement list, and the Rust build is skipped when a stamp in target/ records the same
# sources, toolchain and interpreter. Cargo's target dir is the repository's target/.
set -euo pipefail

BMOJO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BMOJO_VENV="${BMOJO_VENV:-$HOME/.cache/bmojo_core/venv}"
export BMOJO_ROOT BMOJO_VENV

_bmojo_log() { printf '[env.sh] %s\n' "$*" >&2; }
_bmojo_die() {
  printf '[env.sh] ERROR: %s\n' "$*" >&2
  return 1
}

# --- Rust toolchain ------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  _bmojo_die "'cargo' was not found on PATH. bmojo_core needs a Rust toolchain (>= 1.89).
  Install one with rustup:
      curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | \\
          sh -s -- -y --profile minimal --component rustfmt,clippy
      source \"\$HOME/.cargo/env\"
  then run this command again."
fi
_bmojo_rustc="$(rustc --version 2>/dev/null || true)"
if [[ "$_bmojo_rustc" =~ ^rustc\ 1\.([0-9]+) ]] && ((BASH_REMATCH[1] < 89)); then
  _bmojo_die "$_bmojo_rustc is too old; bmojo_core needs Rust >= 1.89 (try: rustup update stable)."
fi

# --- virtual environment -------------------------------------------------------------------
if [ ! -x "$BMOJO_VENV/bin/python" ]; then
  _bmojo_py="${BMOJO_PYTHON:-python3}"
  if ! command -v "$_bmojo_py" >/dev/null 2>&1; then
    _bmojo_die "'$_bmojo_py' was not found; install Python >= 3.10 (or set BMOJO_PYTHON)."
  fi
  if ! "$_bmojo_py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    _bmojo_die "$("$_bmojo_py" --version 2>&1) is too old; bmojo_core needs Python >= 3.10."
  fi
  _bmojo_log "creating virtual environment $BMOJO_VENV"
  mkdir -p "$(dirname "$BMOJO_VENV")"
  if ! "$_bmojo_py" -m venv "$BMOJO_VENV"; then
    rm -rf "$BMOJO_VENV"
    _bmojo_die "'$_bmojo_py -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)."
  fi
fi

export VIRTUAL_ENV="$BMOJO_VENV"
export PATH="$BMOJO_VENV/bin:$PATH"
unset PYTHONHOME
_bmojo_python="$BMOJO_VENV/bin/python"

# --- requirements (skipped when the stamp matches) -------------------------------------------
_bmojo_reqs=(torch numpy scipy safetensors transformers control matplotlib hypothesis pytest pytest-xdist pytest-benchmark tqdm ruff "maturin[zig]" auditwheel uv)
_bmojo_req_stamp="$BMOJO_VENV/.bmojo_requirements.stamp"
_bmojo_req_key="requirements: ${_bmojo_reqs[*]}; pip args: ${BMOJO_PIP_ARGS:-}; python: $(
  "$_bmojo_python" -c 'import sys; print(sys.version.split()[0])'
)"
if [ "$(cat "$_bmojo_req_stamp" 2>/dev/null || true)" != "$_bmojo_req_key" ]; then
  _bmojo_log "installing requirements into $BMOJO_VENV (first run: torch is a large download)"
  "$_bmojo_python" -m pip install --disable-pip-version-check --upgrade pip
  # shellcheck disable=SC2086  # BMOJO_PIP_ARGS is deliberately word-split
  "$_bmojo_python" -m pip install --disable-pip-version-check ${BMOJO_PIP_ARGS:-} \
    "${_bmojo_reqs[@]}"
  printf '%s' "$_bmojo_req_key" >"$_bmojo_req_stamp"
else
  _bmojo_log "requirements already installed in $BMOJO_VENV"
fi

# --- build and install bmojo_core (maturin develop: editable, extension built in release) ----
export CARGO_TARGET_DIR="$BMOJO_ROOT/target"
# The same interpreter for maturin and for plain cargo (clippy/test), so pyo3's build script
# is not re-run between them.
export PYO3_PYTHON="$_bmojo_python"

_bmojo_sources_hash() {
  (
    cd "$BMOJO_ROOT"
    local paths=()
    local p
    for p in Cargo.toml Cargo.lock pyproject.toml rust; do
      [ -e "$p" ] && paths+=("$p")
    done
    {
      find "${paths[@]}" -type f -not -path '*/target/*' -print0 | LC_ALL=C sort -z |
        xargs -0 sha256sum
      printf '%s\n' "$_bmojo_rustc" "$_bmojo_python" "${RUSTFLAGS:-}" "${CARGO_BUILD_TARGET:-}"
    } | sha256sum | cut -d' ' -f1
  )
}

_bmojo_installed_here() {
  # The package resolves to this checkout (several checkouts may share one venv), the
  # extension module exists next to it and the console script is installed.
  [ -x "$BMOJO_VENV/bin/bmojo" ] || return 1
  compgen -G "$BMOJO_ROOT/python/bmojo_core/_core*.so" >/dev/null ||
    compgen -G "$BMOJO_ROOT/python/bmojo_core/_core*.pyd" >/dev/null || return 1
  local origin
  origin="$("$_bmojo_python" -c 'import importlib.util as u
s = u.find_spec("bmojo_core")
print(s.origin if s else "")' 2>/dev/null)" || return 1
  [ "$origin" = "$BMOJO_ROOT/python/bmojo_core/__init__.py" ]
}

_bmojo_build_stamp="$CARGO_TARGET_DIR/.bmojo_build.stamp"
_bmojo_build_key="$(_bmojo_sources_hash) $BMOJO_ROOT"
if [ "${BMOJO_FORCE_BUILD:-0}" != "1" ] &&
  [ "$(cat "$_bmojo_build_stamp" 2>/dev/null || true)" = "$_bmojo_build_key" ] &&
  _bmojo_installed_here; then
  _bmojo_log "bmojo_core is up to date (sources unchanged since the last build)"
else
  _bmojo_log "building bmojo_core (maturin develop --release)"
  rm -f "$_bmojo_build_stamp"
  if ! (cd "$BMOJO_ROOT" && maturin develop --release); then
    _bmojo_die "building bmojo_core failed (see the cargo/maturin output above)."
  fi
  mkdir -p "$CARGO_TARGET_DIR"
  printf '%s' "$_bmojo_build_key" >"$_bmojo_build_stamp"
fi

_bmojo_log "ready: venv $BMOJO_VENV, package from $BMOJO_ROOT/python"
