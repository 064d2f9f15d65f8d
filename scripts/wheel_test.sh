#!/usr/bin/env bash
# The wheel tests (part of the README's test command): the wheel a user installs, proven
# without a Rust toolchain and across the torch versions pyproject.toml declares.
#
#   bash scripts/wheel_test.sh
#
# 1. scripts/wheel.sh builds (or reuses) dist/'s release wheel and sdist.
# 2. sdist: a fresh venv holding only pip builds a wheel from the sdist with `pip wheel`
#    (cargo on PATH, maturin fetched by pip's build isolation, no target dir reused).
# 3. For the newest torch on PyPI and for the oldest torch pyproject.toml declares
#    (`torch>=X` -> torch==X), a fresh venv (recreated on every run) gets the release wheel
#    with its [test,mqar] extras, and the wheel-facing test subset runs there with no cargo,
#    rustc or maturin on PATH: tests/wheel (install origin, tag, `bmojo info`, the sdist
#    wheel's contents), every op against its reference with autograd and opcheck, streaming,
#    the layers, training, the MQAR CLI (`bmojo mqar --quick`), the realization toolkit and
#    the transformers integration (skipped where the resolved transformers refuses that
#    torch). The newest venv then swaps in the sdist-built wheel and runs a smoke subset.
#    The oldest torch runs on the oldest CPython >= 3.10 found, the newest on the newest.
#
# Downloads are cached by uv (UV_CACHE_DIR, default ~/.cache/bmojo_core/uv) and venvs are
# filled from that cache by hard links, so a re-run only re-creates the venvs.
#
# Environment knobs:
#   BMOJO_WHEEL_VENVS   where the test venvs live (default ~/.cache/bmojo_core/wheel-venvs)
#   BMOJO_WHEEL_TORCH   space-separated subset of "newest floor" to run (default both)
#   BMOJO_WHEEL_SDIST=0 skip the sdist build (default 1)
#   BMOJO_TEST_WORKERS  pytest-xdist workers (default 2)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
_wt_t0=$SECONDS
bash scripts/wheel.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh # uv and the interpreter that reads pyproject.toml
_wt_build_s=$((SECONDS - _wt_t0))

_wt_log() { printf '[wheel_test.sh] %s\n' "$*" >&2; }
_wt_die() {
  printf '[wheel_test.sh] ERROR: %s\n' "$*" >&2
  exit 1
}

BMOJO_WHEEL_VENVS="${BMOJO_WHEEL_VENVS:-$HOME/.cache/bmojo_core/wheel-venvs}"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$HOME/.cache/bmojo_core/uv}"
_wt_uv="$(command -v uv)" || _wt_die "uv is missing from $BMOJO_VENV (scripts/env.sh installs it)"
_wt_workers="${BMOJO_TEST_WORKERS:-2}"
mkdir -p "$BMOJO_WHEEL_VENVS" "$UV_CACHE_DIR"

_wt_wheel="$(compgen -G "$BMOJO_ROOT/dist/bmojo_core-*.whl" | head -n 1)"
_wt_sdist="$(compgen -G "$BMOJO_ROOT/dist/bmojo_core-*.tar.gz" | head -n 1)"
if [ -z "$_wt_wheel" ] || [ -z "$_wt_sdist" ]; then
  _wt_die "dist/ lacks the wheel or the sdist"
fi

# The torch floor pyproject.toml declares.
_wt_floor="$(python - <<'EOF'
import re, sys
text = open("pyproject.toml").read()
deps = re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)
m = re.search(r'"torch>=([0-9][0-9.]*)"', deps)
if not m:
    sys.exit("pyproject.toml declares no 'torch>=X' dependency")
v = m.group(1)
print(v if v.count(".") >= 2 else v + ".0")
EOF
)" || _wt_die "could not read the torch floor from pyproject.toml"

# CPython interpreters >= 3.10 on this machine (PATH, then pyenv's versions), oldest first,
# each as the real executable (a pyenv shim only answers for its selected versions).
_wt_pythons=()
_wt_find_pythons() {
  local minor cand real candidates
  for minor in 10 11 12 13 14; do
    candidates=()
    cand="$(command -v "python3.$minor" 2>/dev/null || true)"
    [ -z "$cand" ] || candidates+=("$cand")
    mapfile -t -O "${#candidates[@]}" candidates < <(
      compgen -G "${PYENV_ROOT:-$HOME/.pyenv}/versions/3.$minor.*/bin/python3" | sort -rV || true
    )
    for cand in "${candidates[@]}"; do
      if real="$("$cand" -c 'import sys, venv; print(sys.executable)' 2>/dev/null)" &&
        [ -n "$real" ]; then
        _wt_pythons+=("$real")
        break
      fi
    done
  done
  [ "${#_wt_pythons[@]}" -gt 0 ] || _wt_pythons+=("$(command -v python3)")
}
_wt_find_pythons

# PATH without any folder that holds a Rust toolchain or maturin.
_wt_path_without_rust() {
  local out="" dir
  local IFS=:
  for dir in $PATH; do
    [ -n "$dir" ] || continue
    if [ -e "$dir/cargo" ] || [ -e "$dir/rustc" ] || [ -e "$dir/maturin" ] ||
      [ "$dir" = "$BMOJO_VENV/bin" ]; then
      continue
    fi
    out="${out:+$out:}$dir"
  done
  printf '%s' "$out"
}
_wt_clean_path="$(_wt_path_without_rust)"

# Run a command in a venv: that venv first on PATH, no toolchain, none of env.sh's exports.
_wt_in_venv() {
  local venv="$1"
  shift
  env -u CARGO_TARGET_DIR -u PYO3_PYTHON -u PYO3_CONFIG_FILE -u PYTHONPATH -u PYTHONHOME \
    -u BMOJO_TEST_STRICT VIRTUAL_ENV="$venv" PATH="$venv/bin:$_wt_clean_path" "$@"
}

# The wheel-facing subset (tests/cuda, tests/adversarial and the repository-layout tests
# stay with the source-tree suite).
_wt_subset=(
  tests/wheel tests/test_public_api.py tests/ops tests/inference tests/layers tests/train
  tests/mqar tests/runtime tests/realization tests/integrations tests/distributed
)
_wt_smoke=(tests/wheel tests/test_public_api.py tests/ops/test_selective_scan.py tests/ops/test_ssd.py)

_wt_summary=()
_wt_failed=()

# --- sdist -> wheel with only Rust and pip -----------------------------------------------------
_wt_sdist_wheel=""
if [ "${BMOJO_WHEEL_SDIST:-1}" = "1" ]; then
  _wt_t=$SECONDS
  _wt_venv="$BMOJO_WHEEL_VENVS/sdist-build"
  rm -rf "$_wt_venv" "$BMOJO_WHEEL_VENVS/sdist-wheel"
  "${_wt_pythons[-1]}" -m venv "$_wt_venv"
  _wt_cargo_dir="$(dirname "$(command -v cargo)")"
  _wt_log "building a wheel from $(basename "$_wt_sdist") with pip (only Rust and pip)"
  if env -u CARGO_TARGET_DIR -u PYO3_PYTHON -u PYO3_CONFIG_FILE -u VIRTUAL_ENV \
    PATH="$_wt_venv/bin:$_wt_cargo_dir:$_wt_clean_path" \
    "$_wt_venv/bin/python" -m pip wheel --disable-pip-version-check --no-deps \
    -w "$BMOJO_WHEEL_VENVS/sdist-wheel" "$_wt_sdist"; then
    _wt_sdist_wheel="$(compgen -G "$BMOJO_WHEEL_VENVS/sdist-wheel/bmojo_core-*.whl" | head -n 1)"
    _wt_summary+=("sdist: pip built $(basename "$_wt_sdist_wheel") in $((SECONDS - _wt_t)) s")
  else
    _wt_failed+=("sdist build")
    _wt_summary+=("sdist: pip wheel FAILED after $((SECONDS - _wt_t)) s")
  fi
fi

# --- the wheel in fresh venvs against two torch versions ----------------------------------------
_wt_run() { # label, torch requirement, interpreters to try (first that resolves)
  local label="$1" req="$2"
  shift 2
  local venv="$BMOJO_WHEEL_VENVS/$label" py ok="" t=$SECONDS
  for py in "$@"; do
    rm -rf "$venv"
    "$_wt_uv" venv --quiet --python "$py" "$venv"
    _wt_log "$label: installing $(basename "$_wt_wheel") with $req on $("$py" --version 2>&1)"
    # setuptools: torch < 2.6 imports it for torch.compile without declaring it (pip's
    # venvs on CPython <= 3.11 carry it, uv's do not).
    if "$_wt_uv" pip install --quiet --python "$venv/bin/python" \
      "${_wt_wheel}[test,mqar]" pytest-xdist setuptools "$req"; then
      ok=1
      break
    fi
    _wt_log "$label: $req does not install on $("$py" --version 2>&1); trying the next interpreter"
  done
  if [ -z "$ok" ]; then
    _wt_failed+=("$label install")
    _wt_summary+=("$label: could not install $req")
    return
  fi
  local install_s=$((SECONDS - t)) versions
  versions="$("$venv/bin/python" - <<'EOF'
import platform, torch
try:
    import transformers
    from transformers.utils import is_torch_available
    tf = transformers.__version__ + ("" if is_torch_available() else " (refuses this torch)")
except ImportError:
    tf = "absent"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {tf}")
EOF
)"
  _wt_log "$label: $versions"
  t=$SECONDS
  local tests=("${_wt_subset[@]}")
  if ! _wt_in_venv "$venv" BMOJO_WHEEL_TEST=1 BMOJO_WHEEL="$_wt_wheel" \
    BMOJO_WHEEL_INSTALLED="$_wt_wheel" BMOJO_SDIST_WHEEL="${_wt_sdist_wheel}" \
    "$venv/bin/python" -m pytest -q -n "$_wt_workers" -p no:cacheprovider "${tests[@]}"; then
    _wt_failed+=("$label tests")
  fi
  _wt_summary+=("$label: $versions; install ${install_s} s, tests $((SECONDS - t)) s")

  if [ "$label" = newest ] && [ -n "$_wt_sdist_wheel" ]; then
    t=$SECONDS
    "$_wt_uv" pip install --quiet --python "$venv/bin/python" --reinstall --no-deps \
      "$_wt_sdist_wheel"
    if ! _wt_in_venv "$venv" BMOJO_WHEEL_TEST=1 BMOJO_WHEEL="$_wt_wheel" \
      BMOJO_WHEEL_INSTALLED="$_wt_sdist_wheel" \
      "$venv/bin/python" -m pytest -q -n "$_wt_workers" -p no:cacheprovider "${_wt_smoke[@]}"; then
      _wt_failed+=("sdist wheel smoke tests")
    fi
    _wt_summary+=("sdist wheel: smoke subset on $label in $((SECONDS - t)) s")
  fi
}

_wt_newest_first=()
for ((i = ${#_wt_pythons[@]} - 1; i >= 0; i--)); do _wt_newest_first+=("${_wt_pythons[i]}"); done
for _wt_which in ${BMOJO_WHEEL_TORCH:-newest floor}; do
  case "$_wt_which" in
    newest) _wt_run newest torch "${_wt_newest_first[@]}" ;;
    floor) _wt_run floor "torch==$_wt_floor" "${_wt_pythons[@]}" ;;
    *) _wt_die "BMOJO_WHEEL_TORCH: unknown entry '$_wt_which' (use newest and/or floor)" ;;
  esac
done

echo
echo "wheel tests: $(basename "$_wt_wheel") (build/reuse ${_wt_build_s} s)"
for _wt_line in "${_wt_summary[@]}"; do echo "  $_wt_line"; done
echo "  total $((SECONDS - _wt_t0)) s"
if [ "${#_wt_failed[@]}" -ne 0 ]; then
  echo "wheel_test.sh: FAILED: ${_wt_failed[*]}"
  exit 1
fi
echo "wheel_test.sh: all wheel checks passed"
