#!/usr/bin/env bash
# The full claims run (configs/claims.yaml) as one command, sized for a 2-core machine:
#
#   benchmarks/claims_rerun.sh [OUT] [CONFIG]      # OUT defaults to runs/claims
#
# Two compare processes share OUT (--compare.share_folder true), one per half of the seeds (each
# runs both α and its seeds' preference sweeps, so the halves cost the same), one torch thread
# each; compare reuses finished runs, so a last pass over all seeds only reads them back and writes
# summary.md, metrics.csv and plots/. An interrupted run continues where it stopped when started again. The wall time of each
# stage lands in OUT/wall_time.txt. Measured on the 2-core machine (other jobs light) with a copy of
# claims.yaml on seeds [0, 1]: runs 4 min 19 s, report pass 15 s; claims_quick.yaml: 7 min 23 s.
# So claims.yaml (16 seeds) ≈ 8 × 4.3 min + ≈ 2 min report ≈ 37 min; about 2.5× that if other
# jobs load the machine heavily (the 5-seed × 3-α run of before took 62 min at load 15-19).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/claims}
CONFIG=${2:-configs/claims.yaml}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mapfile -t HALVES < <("$PY" - "$CONFIG" <<'EOF'
import sys, yaml
seeds = yaml.safe_load(open(sys.argv[1]))["compare"]["seeds"]
half = (len(seeds) + 1) // 2
print(seeds[:half]); print(seeds[half:])
EOF
)
start=$(date +%s)
pids=()
for i in 0 1; do
  [ "${HALVES[$i]}" = "[]" ] && continue
  "$PY" -m firm_lightning compare --config "$CONFIG" --federation.output_dir "$OUT" \
    --compare.seeds "${HALVES[$i]}" --compare.share_folder true > "$OUT/part$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
runs_done=$(date +%s)
if [ "$status" -ne 0 ]; then
  echo "a compare process failed (exit $status); see $OUT/part0.log and $OUT/part1.log" >&2
  exit "$status"
fi
"$PY" -m firm_lightning compare --config "$CONFIG" --federation.output_dir "$OUT" > "$OUT/report.log" 2>&1
end=$(date +%s)
{
  echo "runs (2 processes): $(( (runs_done - start) / 60 )) min $(( (runs_done - start) % 60 )) s"
  echo "report pass: $(( (end - runs_done) / 60 )) min $(( (end - runs_done) % 60 )) s"
  echo "total: $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s"
} | tee "$OUT/wall_time.txt"
echo "summary: $OUT/summary.md"
