#!/usr/bin/env bash
# The allocator comparison of bench/README.md: builds scale-bench with the
# system allocator, jemalloc and mimalloc, then runs each (and the tuned
# variants below) ALLOC_RUNS times over the delta-ADS path only, at a 4-pod
# mesh and at ALLOC_SIZES, and prints every run's tables. JSON of each run
# is kept in $OUT (default: a temp dir) for aggregation.
#
#     ./bench/scale-alloc.sh          # ALLOC_RUNS=3 ALLOC_SIZES="10000 50000"
#
# No root, no network beyond loopback. Builds run one after another
# (CARGO_INCREMENTAL=0, as the shared target dir is built).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${ALLOC_RUNS:-3}
sizes=${ALLOC_SIZES:-"10000 50000"}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out/bin"
export CARGO_INCREMENTAL=0

for a in system jemalloc mimalloc; do
    features=()
    [[ $a != system ]] && features=(--features "$a")
    cargo build --release -p bench --bin scale-bench "${features[@]}"
    cp target/release/scale-bench "$out/bin/scale-bench-$a"
done

# name | binary | environment. The tuned rows are runtime options, no
# rebuild: glibc with 2 arenas; jemalloc with one arena; mimalloc without
# eager arena commit (its default commits whole arena chunks up front).
configs=(
    "system|system|"
    "system-arena2|system|GLIBC_TUNABLES=glibc.malloc.arena_max=2"
    "jemalloc|jemalloc|"
    "jemalloc-narenas1|jemalloc|_RJEM_MALLOC_CONF=narenas:1"
    "mimalloc|mimalloc|"
    "mimalloc-lazy-commit|mimalloc|MIMALLOC_ARENA_EAGER_COMMIT=0"
)
for r in $(seq 1 "$runs"); do
    for c in "${configs[@]}"; do
        IFS='|' read -r name bin envs <<<"$c"
        echo "### $name, run $r ${envs:+($envs)}"
        # shellcheck disable=SC2086 # $envs is zero or one VAR=value word
        env $envs "$out/bin/scale-bench-$bin" 4 $sizes --only-ads --json >"$out/$name-$r.txt"
        sed -n '/^delta-ADS/,/measurement floor/p' "$out/$name-$r.txt"
    done
done
echo "outputs in $out"
