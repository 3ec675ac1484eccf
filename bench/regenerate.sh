#!/usr/bin/env bash
# Regenerate bench/RESULTS.md from scratch: every section from one commit (HEAD, a clean tree), one
# script after another, on a machine with nothing else running (~50 min on 2 cores).
#
#   bench/regenerate.sh                 # every section
#   BASELINE=7bbf8cc bench/regenerate.sh  # and easgate-1 at that commit next to this tree in bench_all
#
# Needs what the scripts need (bench/README.md): wrk, nginx-light, openssl, redis-server and PostgreSQL
# (scripts/ensure_test_tools.sh), easgate[cluster] in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY -c 'import sys; sys.path.insert(0, "bench"); import benchlib; benchlib.refuse_dirty_write(True, "regenerate.sh")'
[ -x .venv/bin/py-spy ] || .venv/bin/pip install -q py-spy  # bench_gateway.py profile; not a project dependency
contenders=(nginx mitmdump lean-bare)
[ -n "${BASELINE:-}" ] && contenders+=("easgate-1@${BASELINE}")
contenders+=(easgate-1 easgate-2)

cat > bench/RESULTS.md <<HEAD
# easgate benchmark results

Numbers from the benchmarks in bench/ (never run as tests), all made by \`bench/regenerate.sh\` at commit
$(git rev-parse --short HEAD) on $(date -u +%Y-%m-%d), one script after another on an otherwise idle machine. Each
section names its machine and the commit again. Loopback only: load generators, upstreams and the gateway share
the cores, so the numbers are ratios measured side by side in one run, not absolute capacities.
HEAD

run() { echo "== $*" >&2; "$PY" "$@"; }
run bench/bench_all.py --contenders "${contenders[@]}" --write
run bench/bench_gateway.py throughput --duration 5 --write
run bench/bench_gateway.py callouts --write
run bench/bench_gateway.py policy-size --write
run bench/bench_gateway.py profile --write
run bench/bench_gateway.py soak --minutes 3 --write
run bench/bench_scale.py --skip-throughput --write
run bench/bench_workers.py ${BASELINE:+--also "$BASELINE"} --write
run bench/bench_tls_memory.py --write
run bench/bench_identity.py --write
run bench/bench_ratelimit.py --write
run bench/bench_inventory.py --write
run bench/bench_netscaler.py --write
run bench/bench_reload.py --write
run bench/bench_cluster.py --write
echo "bench/RESULTS.md regenerated at $(git rev-parse --short HEAD)" >&2
