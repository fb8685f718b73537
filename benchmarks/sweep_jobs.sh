#!/usr/bin/env bash
# A reduced Table 2 twice, from scratch: one run after another on two threads (`make table2-runs
# JOBS=1`, OMP_NUM_THREADS=2), then two runs at a time on one thread each (`JOBS=2`); the wall
# time of each, their ratio and each row's -log p(x) from both go to $RESULT (Markdown).
#
#   benchmarks/sweep_jobs.sh                          # the acceptance run: 9 rows, ~25 min
#   ROWS="configs/table2/none-k0.yaml configs/table2/planar-k10.yaml" STEPS=200 LIMIT=200 \
#       RESULT=/tmp/sweep-jobs.md benchmarks/sweep_jobs.sh   # a check that it works, ~2 min
#
# Run it on a quiet machine: anything else on the cores changes both times, and not equally.
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-$(ls configs/table2/*.yaml | sort | tr '\n' ' ')}
STEPS=${STEPS:-3000}
LIMIT=${LIMIT:-2000}
S=${S:-200}
OUT=${OUT:-runs/bench-sweep}
RESULT=${RESULT:-benchmarks/results-sweep-jobs.md}
PYTHON=${PYTHON:-python}

rm -rf "$OUT/sequential" "$OUT/jobs2"
common=(TABLE2_ROWS="$ROWS" TABLE2_SET="--set train.steps=$STEPS"
        TABLE2_EVAL="--iw-samples $S --limit $LIMIT" PYTHON="$PYTHON")

timed() {  # timed NAME JOBS THREADS: one sweep, its wall seconds on stdout
    local start end
    start=$(date +%s.%N)
    OMP_NUM_THREADS=$3 MKL_NUM_THREADS=$3 make -s table2-runs JOBS="$2" \
        TABLE2_OUT="$OUT/$1" "${common[@]}" >&2
    end=$(date +%s.%N)
    "$PYTHON" -c "print($end - $start)"
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
seq_s=$(timed sequential 1 2)
par_s=$(timed jobs2 2 1)
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
nrows=$(echo "$ROWS" | wc -w)

{
    echo "## \`flowvae sweep --jobs 2\` against one run at a time"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), revision $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
        "$("$PYTHON" -c 'from flowvae.run_folder import cpu_model; print(cpu_model())')," \
        "$(nproc) cores; load average before $load_before, after $load_after."
    echo "$nrows rows of Table 2 ($(echo "$ROWS" | xargs -n1 basename | sed 's/.yaml//' | paste -sd, -)), $STEPS updates each," \
        "S = $S on the first $LIMIT test images (\`benchmarks/sweep_jobs.sh\`):"
    echo
    echo "| how | command | wall time |"
    echo "|---|---|---:|"
    echo "| one at a time, 2 threads | \`OMP_NUM_THREADS=2 make table2-runs JOBS=1\` | $(printf '%.0f' "$seq_s") s |"
    echo "| two at a time, 1 thread each | \`make table2-runs JOBS=2\` | $(printf '%.0f' "$par_s") s |"
    echo
    echo "Speed-up of \`--jobs 2\`: **$("$PYTHON" -c "print(f'{$seq_s / $par_s:.2f}')")×**."
    echo
    "$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| row | -log p(x), one at a time | -log p(x), --jobs 2 |")
print("|---|---:|---:|")
gap = 0.0
for run in sorted(p for p in (out / "sequential").iterdir() if p.is_dir()):
    a = json.loads((run / "eval.json").read_text())
    b = json.loads((out / "jobs2" / run.name / "eval.json").read_text())
    gap = max(gap, abs(a["nll"] - b["nll"]))
    print(f"| {run.name} | {a['nll']:.3f} | {b['nll']:.3f} |")
print()
print(f"Largest difference between the two: {gap:.2g} nats (two threads may sum in another")
print("order than one, so the runs need not agree to the last bit).")
EOF
} > "$RESULT"
cat "$RESULT"
