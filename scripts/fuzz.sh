#!/usr/bin/env bash
# Runs every fuzz target for a bounded time each (default 60 s). Uses the
# nightly toolchain with AddressSanitizer when it is installed; otherwise the
# stable one (RUSTC_BOOTSTRAP lets it take cargo-fuzz's -Z flags), without a
# sanitizer, which still catches panics, hangs and runaway memory. Installs
# cargo-fuzz from crates.io if missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install -q --locked cargo-fuzz
if [[ "${FUZZ_TOOLCHAIN:-}" != stable ]] && rustup toolchain list 2>/dev/null | grep -q "^nightly"; then
  toolchain=(+nightly) sanitizer=address
else
  # The default toolchain, whatever its name.
  toolchain=() sanitizer=none
  export RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/stable}"
fi
for target in $(cargo fuzz list); do
  echo "== fuzz $target for ${secs}s (${toolchain[*]:-default toolchain}, sanitizer $sanitizer)"
  cargo "${toolchain[@]}" fuzz run -s "$sanitizer" "$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 2>&1 | grep -E '^(Done|==[0-9]+==|SUMMARY)|panicked|crash-|timeout-|oom-' || true
  # cargo fuzz exits non-zero on a finding; pipefail is off inside || true,
  # so look for the artifact instead.
  if ls artifacts/"$target"/ 2>/dev/null | grep -qE '^(crash|timeout|oom|leak)-'; then
    echo "fuzz $target found a failure: see fuzz/artifacts/$target" >&2
    exit 1
  fi
done
