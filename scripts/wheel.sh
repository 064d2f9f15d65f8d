#!/usr/bin/env bash
# Builds the release wheel and the sdist into dist/ and checks that the wheel is portable.
#
#   bash scripts/wheel.sh
#
# The wheel is linked by zig (the `ziglang` package from PyPI, through `maturin build --zig`)
# against the symbol versions of glibc 2.28, the policy torch's own Linux wheels use, so it
# installs wherever torch does; a plain `maturin build` here would be tagged with this
# machine's newer glibc. It is one cp310-abi3 wheel for every CPython >= 3.10, and it never
# links torch: the kernels choose their SIMD level at run time (no `target-cpu` anywhere).
#
# Checks (the script fails if one does not hold): `auditwheel show` names a manylinux policy
# no newer than the target; the file name carries `cp310-abi3`; no `target-cpu` flag reached
# the build. Prints the wheel's and the sdist's size.
#
# Environment knobs:
#   BMOJO_WHEEL_POLICY   target policy (default manylinux_2_28)
#   BMOJO_DIST           output folder (default <repo>/dist)
#   BMOJO_FORCE_BUILD=1  rebuild even when the sources did not change since the last build
# The build is skipped when dist/ holds a wheel and an sdist built from the same sources,
# toolchain and policy (a stamp in dist/ records them).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh

BMOJO_WHEEL_POLICY="${BMOJO_WHEEL_POLICY:-manylinux_2_28}"
BMOJO_DIST="${BMOJO_DIST:-$BMOJO_ROOT/dist}"
_wheel_log() { printf '[wheel.sh] %s\n' "$*" >&2; }
_wheel_die() {
  printf '[wheel.sh] ERROR: %s\n' "$*" >&2
  exit 1
}

if [[ ! "$BMOJO_WHEEL_POLICY" =~ ^manylinux_2_([0-9]+)$ ]]; then
  _wheel_die "BMOJO_WHEEL_POLICY must look like manylinux_2_28, got '$BMOJO_WHEEL_POLICY'."
fi
_wheel_glibc_minor="${BASH_REMATCH[1]}"

# A shipped build never targets the build machine's CPU: the kernels dispatch at run time.
for _flags in "${RUSTFLAGS:-}" "${CARGO_ENCODED_RUSTFLAGS:-}" \
  "${CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS:-}"; do
  if [[ "$_flags" == *target-cpu* ]]; then
    _wheel_die "a target-cpu flag is set in the environment ($_flags); unset it for a release build."
  fi
done
if grep -rqs 'target-cpu' .cargo Cargo.toml rust/*/Cargo.toml; then
  _wheel_die "a target-cpu flag is set in the cargo configuration; remove it for a release build."
fi

# The stamp covers everything that goes into the wheel or the sdist.
_wheel_key="$(
  {
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git ls-files -z --cached --others --exclude-standard | LC_ALL=C sort -z |
        xargs -0 -r sha256sum 2>/dev/null || true
    else
      find Cargo.toml Cargo.lock pyproject.toml README.md rust python cuda -type f \
        -not -name '*.so' -not -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z |
        xargs -0 -r sha256sum
    fi
    printf '%s\n' "$(rustc --version)" "$(maturin --version)" "$BMOJO_WHEEL_POLICY"
  } | sha256sum | cut -d' ' -f1
)"
_wheel_stamp="$BMOJO_DIST/.bmojo_wheel.stamp"

_wheel_find() { compgen -G "$BMOJO_DIST/bmojo_core-*$1" | head -n 1; }

if [ "${BMOJO_FORCE_BUILD:-0}" != "1" ] &&
  [ "$(cat "$_wheel_stamp" 2>/dev/null || true)" = "$_wheel_key" ] &&
  [ -n "$(_wheel_find .whl)" ] && [ -n "$(_wheel_find .tar.gz)" ]; then
  _wheel_log "dist/ is up to date (sources unchanged since the last build)"
else
  rm -rf "$BMOJO_DIST"
  mkdir -p "$BMOJO_DIST"
  _wheel_log "building the release wheel for $BMOJO_WHEEL_POLICY (maturin build --zig)"
  maturin build --release --zig --compatibility "$BMOJO_WHEEL_POLICY" \
    --interpreter "$BMOJO_VENV/bin/python" --out "$BMOJO_DIST" ||
    _wheel_die "maturin build failed (see the output above)."
  _wheel_log "building the sdist (maturin sdist)"
  maturin sdist --out "$BMOJO_DIST" || _wheel_die "maturin sdist failed."
  printf '%s' "$_wheel_key" >"$_wheel_stamp"
fi

_wheel="$(_wheel_find .whl)"
_sdist="$(_wheel_find .tar.gz)"
[ -n "$_wheel" ] || _wheel_die "no wheel in $BMOJO_DIST"
[ -n "$_sdist" ] || _wheel_die "no sdist in $BMOJO_DIST"

# --- checks ----------------------------------------------------------------------------------
case "$(basename "$_wheel")" in
  *-cp310-abi3-*) ;;
  *) _wheel_die "$(basename "$_wheel") is not a cp310-abi3 wheel." ;;
esac

_wheel_show="$(auditwheel show "$_wheel" 2>&1)" || _wheel_die "auditwheel show failed:
$_wheel_show"
printf '%s\n' "$_wheel_show"
_wheel_policy="$(printf '%s\n' "$_wheel_show" | tr '\n' ' ' | tr -s ' ' |
  sed -n 's/.*consistent with the following platform tag: *"\([^"]*\)".*/\1/p')"
if [[ ! "$_wheel_policy" =~ ^manylinux_2_([0-9]+)_ ]]; then
  _wheel_die "auditwheel named no manylinux policy for $(basename "$_wheel") (got '$_wheel_policy')."
fi
if ((BASH_REMATCH[1] > _wheel_glibc_minor)); then
  _wheel_die "auditwheel's policy $_wheel_policy is newer than the target $BMOJO_WHEEL_POLICY."
fi
case "$(basename "$_wheel")" in
  *"$_wheel_policy"*) ;;
  *) _wheel_die "$(basename "$_wheel") is not tagged $_wheel_policy." ;;
esac

_wheel_size() { du -k "$1" | cut -f1; }
_wheel_log "wheel: $_wheel ($(_wheel_size "$_wheel") KiB, policy $_wheel_policy)"
_wheel_log "sdist: $_sdist ($(_wheel_size "$_sdist") KiB)"
