#!/usr/bin/env bash
# Runs every fuzz target for a bounded time each (default 60 s): needs the
# nightly toolchain and cargo-fuzz (installed here if missing).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install -q cargo-fuzz
for target in $(cargo +nightly fuzz list); do
  echo "== fuzz $target for ${secs}s"
  cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=2048
done
