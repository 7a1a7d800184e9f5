#!/usr/bin/env bash
# Issues 21 (GPU speed) and 20 (autocast): everything the GPU session runs, in ONE call of at most 8 minutes on an
# H100/H200. On the GPU machine, from the project root, after `bash ../shared/gpu/wheels.sh` here filled .whl/:
#   bash .whl/run.sh 'bash bench/gpu_issue21.sh'              # every step, most important first, within the deadline
#   bash .whl/run.sh 'bash bench/gpu_issue21.sh trainer dpo'  # some steps by name (e.g. those a first run skipped)
#   bash bench/gpu_issue21.sh --dry-run                       # here, on CPU: every step at toy sizes (several minutes)
#
# Steps, most important first (name: what; seconds expected / allowed, estimated in bench/README.md from the H100
# run's timings):
#   tests     python -m pytest -m gpu tests (with the CUDA torch.compile test)           90 / 170
#   explain   fused-gspo-bench --explain on this GPU's profile (runs nothing)              5 / 20
#   gspo-8b   the benchmark, all contenders, GSPO at the qwen3-8b head, N=8192            85 / 120
#   profile   bench/gpu_profile.py: kernels, idle time within one call, prediction        30 / 75
#   dapo-8b   DAPO at the qwen3-8b head (eager, torch, triton, trl, floor)                 26 / 60
#   gspo-0.6b GSPO at the qwen3-0.6b head, H=1024 (same contenders)                        20 / 45
#   ws512     GSPO at --workspace-bytes 536870912 (triton, trl, floor)                     20 / 45
#   dpo-8b    DPO at the qwen3-8b head, all contenders                                     50 / 75
#   trainer   bench/gpu_trainer.py: GRPOTrainer, flag off vs on, longest completion       65 / 150
#   gspo-32k  GSPO at N=32768 (triton, trl, floor): the peak as N grows                    30 / 75
#   autocast  fp32 weights under bf16 autocast (eager, torch, triton, trl, floor)          27 / 60
#   checks    bench/gpu_checks.py: copy and GEMM ceilings, kernels' registers/spills      20 / 45
# A step starts only if the deadline leaves it time (GPU_DEADLINE_S, default 440 s after the script starts; the
# wheels' install before it takes ~20 s), and runs under `timeout` with what is left: one hang cannot eat the rest.
# Everything lands in a work folder, packed after each step into $OUT/gpu21-results.tar.gz (the run tool brings back
# at most 8 files); $OUT/summary.txt has the targets table (bench/gpu_summary.py), also printed last.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/out}
PY=${PYTHON:-python3}
DRY=0
NAMES=()
for arg in "$@"; do
  if [[ $arg == --dry-run ]]; then DRY=1; else NAMES+=("$arg"); fi
done
ORDER=(tests explain gspo-8b profile dapo-8b gspo-0.6b ws512 dpo-8b trainer gspo-32k autocast checks)
declare -A BUDGET=([tests]=170 [explain]=20 [gspo-8b]=120 [profile]=75 [trainer]=150 [dapo-8b]=60 [gspo-0.6b]=45
                   [ws512]=45 [gspo-32k]=75 [autocast]=60 [dpo-8b]=75 [checks]=45)
if ((DRY)); then
  DEADLINE=${GPU_DEADLINE_S:-1800}
  for name in "${ORDER[@]}"; do BUDGET[$name]=400; done
else
  DEADLINE=${GPU_DEADLINE_S:-440}
fi
[[ ${#NAMES[@]} -gt 0 ]] || NAMES=("${ORDER[@]}")
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu21.XXXXXX")
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FUSED_GSPO_FINDINGS="$WORK/findings.jsonl"
[[ -f $OUT/env.txt ]] && cp "$OUT/env.txt" "$WORK/env.txt"
git -C "$ROOT" describe --always --dirty >"$WORK/commit.txt" 2>&1
echo "$0 $* | dry run: $DRY | deadline ${DEADLINE}s | results in $WORK" | tee "$WORK/about.txt"

TINY=(--tokens 64 --hidden 32 --vocab 384 --seq-len 16 --device cpu --repeats 2 --warmup 0)
bench_cmd() {  # bench_cmd NAME ARGS...: the benchmark, its JSON under the work folder
  local name=$1
  shift
  CMD=("$PY" -m fused_gspo.bench "$@" --repeats 10 --json "$WORK/bench-$name.json")
  ((DRY)) && CMD+=("${TINY[@]}")
  return 0
}

set_cmd() {  # the command of step $1, in CMD
  local few=(--contenders eager,torch,triton,trl,floor)
  case $1 in
    tests)
      CMD=("$PY" -m pytest -q -m gpu tests -p no:cacheprovider -rfEsxX)
      if ((!DRY)); then
        "$PY" -c "import xdist" 2>/dev/null && CMD+=(-n 4)  # compiles and CPU references in parallel
        "$PY" -c "import pytest_timeout" 2>/dev/null && CMD+=(--timeout 150)
      fi
      ;;
    explain) CMD=("$PY" -m fused_gspo.bench --explain --json "$WORK/explain.json")
      ((DRY)) && CMD+=(--device-profile h200) ;;
    gspo-8b) bench_cmd gspo-qwen3-8b ;;
    dapo-8b) bench_cmd dapo-qwen3-8b --loss-type dapo --level token --epsilon-high 0.28 "${few[@]}" ;;
    gspo-0.6b) bench_cmd gspo-qwen3-0.6b --model qwen3-0.6b "${few[@]}" ;;
    ws512) bench_cmd gspo-qwen3-8b-ws512 --workspace-bytes 536870912 --contenders triton,trl,floor
      ((DRY)) && CMD+=(--workspace-bytes 16384) ;;
    gspo-32k) bench_cmd gspo-qwen3-8b-32k --tokens 32768 --contenders triton,trl,floor --modes fwd_bwd,logprobs ;;
    autocast) bench_cmd gspo-autocast --dtype fp32 --autocast bf16 "${few[@]}" ;;
    dpo-8b) bench_cmd dpo-qwen3-8b --objective dpo ;;
    profile)
      CMD=("$PY" bench/gpu_profile.py --json "$WORK/gpu-profile.json")
      ((DRY)) && CMD=(env TRITON_INTERPRET=1 "${CMD[@]}" --device cpu --backend torch --tokens 64 --seq-len 16
                      --hidden 32 --vocab 384 --lean-workspace 8192) ;;
    trainer)
      CMD=("$PY" bench/gpu_trainer.py --max-seconds 80 --json "$WORK/trainer.json")
      ((DRY)) && CMD+=(--tiny --device cpu) ;;
    checks)
      CMD=("$PY" bench/gpu_checks.py --json "$WORK/gpu-checks.json")
      ((DRY)) && CMD=("$PY" -m py_compile bench/gpu_checks.py) ;;  # it needs CUDA throughout
    *) return 1 ;;
  esac
  return 0
}

STEPS_TSV="$WORK/steps.tsv"
: >"$STEPS_TSV"
pack() {
  "$PY" - "$STEPS_TSV" "$WORK/steps.json" <<'EOF'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
keys = ("name", "budget_s", "limit_s", "seconds", "rc", "status", "command")
steps = [dict(zip(keys, row)) for row in rows]
for step in steps:
    for key in ("budget_s", "limit_s", "seconds", "rc"):
        step[key] = int(step[key]) if step.get(key, "").lstrip("-").isdigit() else None
json.dump(steps, open(sys.argv[2], "w"), indent=1)
EOF
  tar -czf "$OUT/gpu21-results.tar.gz.part" -C "$WORK" . && mv "$OUT/gpu21-results.tar.gz.part" "$OUT/gpu21-results.tar.gz"
}

status=0
for name in "${NAMES[@]}"; do
  if ! set_cmd "$name"; then
    echo "unknown step $name; choose from ${ORDER[*]}" >&2
    status=2
    continue
  fi
  budget=${BUDGET[$name]}
  left=$((DEADLINE - SECONDS - 10))
  if ((left < (budget < 30 ? budget : 30))); then
    echo "=== $name: skipped, ${left}s left before the deadline (it may take ${budget}s)"
    printf '%s\t%s\t0\t0\t\tskipped: out of time\t%s\n' "$name" "$budget" "${CMD[*]}" >>"$STEPS_TSV"
    pack
    continue
  fi
  limit=$((budget < left ? budget : left))
  echo "=== $name (up to ${limit}s; ${SECONDS}s gone): ${CMD[*]}"
  start=$SECONDS
  timeout --kill-after=10 "$limit" "${CMD[@]}" >"$WORK/$name.log" 2>&1
  rc=$?
  took=$((SECONDS - start))
  case $rc in
    0) what=ok ;;
    124 | 137) what="timed out after ${limit}s" ;;
    *) what="failed (exit $rc)" ;;
  esac
  [[ $name == tests ]] && cp "$WORK/tests.log" "$WORK/pytest.log"
  tail -n 12 "$WORK/$name.log" | cut -c1-240
  echo "--- $name: $what in ${took}s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$budget" "$limit" "$took" "$rc" "$what" "${CMD[*]}" >>"$STEPS_TSV"
  ((rc == 0 || status != 0)) || status=$rc
  pack
done

"$PY" bench/gpu_summary.py "$WORK" --json "$WORK/summary.json" >"$WORK/summary.txt" 2>&1
pack
cp "$WORK/summary.txt" "$OUT/summary.txt"
echo "=== summary (all of it: $OUT/summary.txt; every file: $OUT/gpu21-results.tar.gz), ${SECONDS}s in all"
cat "$WORK/summary.txt"
exit $status
