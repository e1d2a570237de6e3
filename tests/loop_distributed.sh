#!/usr/bin/env bash
# Run the distributed tests N times in a row in the full suite's collection order (the test files
# that come before tests/test_distributed.py run first, in the same pytest process), counting how
# many runs pass. A flaky teardown shows up as a failed run; its log is kept.
#
#   tests/loop_distributed.sh [N]                      # default N=20
#   FILES="tests/test_cli.py tests/test_distributed.py" K="..." tests/loop_distributed.sh 10
#
# FILES: the test files to run (default: every file up to and including test_distributed.py, in
# pytest's order). K: an optional -k expression to thin the files before it. PYTHON: the
# interpreter (default .venv/bin/python of this checkout, else python). LOGS: where logs go.
set -u
cd "$(dirname "$0")/.."
N=${1:-20}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
if [ -z "${FILES:-}" ]; then
  FILES=$(ls tests/test_*.py | sort | awk '{print} /test_distributed.py$/ {exit}')
fi
LOGS=${LOGS:-$(mktemp -d /tmp/loop_distributed.XXXXXX)}
mkdir -p "$LOGS"
kargs=()
[ -n "${K:-}" ] && kargs=(-k "$K")
pass=0
dist_pass=0
dist_total=0
for i in $(seq 1 "$N"); do
  log="$LOGS/run$i.log"
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$PY" -m pytest $FILES "${kargs[@]}" -p no:cacheprovider -q -rA >"$log" 2>&1
  rc=$?
  p=$(grep -c '^PASSED tests/test_distributed.py' "$log")
  t=$(grep -cE '^(PASSED|FAILED|ERROR) tests/test_distributed.py' "$log")
  dist_pass=$((dist_pass + p))
  dist_total=$((dist_total + t))
  if [ "$rc" -eq 0 ]; then pass=$((pass + 1)); status=ok; else status="FAILED (rc=$rc, log $log)"; fi
  echo "run $i/$N: $status; test_distributed.py $p/$t passed; $(( $(date +%s) - start )) s"
done
echo "runs passed: $pass/$N; distributed tests passed: $dist_pass/$dist_total; logs in $LOGS"
[ "$pass" -eq "$N" ]
