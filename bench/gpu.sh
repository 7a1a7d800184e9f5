#!/usr/bin/env bash
# The standard GPU benchmark set: one JSON per configuration under $OUT (copy the ones worth keeping to bench/results/).
# On the GPU machine, from the project root, after ../shared/gpu/wheels.sh has filled .whl/ here:
#   bash .whl/run.sh 'bash bench/gpu.sh'                       # all of them (several minutes)
#   bash .whl/run.sh 'bash bench/gpu.sh gspo-qwen3-8b sweep'   # some of them, by name
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

declare -A CONFIGS=(
  # The planner's prediction for the default shape on this GPU (nothing runs; every benchmark JSON records it too)
  [explain-qwen3-8b]="--explain"
  # GSPO (grpo loss, sequence level) on the qwen3-8b head at 8192 tokens, bf16: the CLI's default
  [gspo-qwen3-8b]=""
  # DAPO (token level) at the same shape
  [dapo-qwen3-8b]="--loss-type dapo --level token --epsilon-high 0.28"
  # Small hidden size (qwen3-0.6b): the softmax epilogue is no longer hidden behind the GEMM
  [gspo-qwen3-0.6b]="--model qwen3-0.6b"
  [dapo-qwen3-0.6b]="--model qwen3-0.6b --loss-type dapo --level token --epsilon-high 0.28"
  # Token-level DAPO with a KL term on the llama3-8b head
  [dapo-kl-llama3-8b]="--model llama3-8b --loss-type dapo --level token --beta 0.04"
  # 256k vocabulary with logit softcapping (Liger and torch_lce have no softcapping: reported unsupported)
  [gspo-gemma2-2b]="--model gemma2-2b"
  # Preference losses at the qwen3-8b head, 8192 tokens (8 pairs of 512): DPO (Liger runs its own reference pass),
  # CPO (TRL holds the full logits) and SimPO
  [dpo-qwen3-8b]="--objective dpo"
  [cpo-qwen3-8b]="--objective cpo"
  [simpo-qwen3-8b]="--objective cpo --cpo-loss-type simpo"
  # GSPO at the qwen3-8b head across token counts, forward+backward: time and peak memory per contender
  [sweep]="--sweep-tokens 1024,2048,4096,8192,16384,32768,65536 --modes fwd_bwd --plot $OUT/bench-sweep.png"
)
ORDER=(explain-qwen3-8b gspo-qwen3-8b dapo-qwen3-8b gspo-qwen3-0.6b dapo-qwen3-0.6b dapo-kl-llama3-8b gspo-gemma2-2b
       dpo-qwen3-8b cpo-qwen3-8b simpo-qwen3-8b sweep)

status=0
for name in "${@:-${ORDER[@]}}"; do
  if [[ -z ${CONFIGS[$name]+set} ]]; then
    echo "unknown configuration $name; choose from ${ORDER[*]}" >&2
    status=2
    continue
  fi
  echo "=== $name: fused-gspo-bench ${CONFIGS[$name]}"
  # shellcheck disable=SC2086  # the options are meant to split
  fused-gspo-bench ${CONFIGS[$name]} --json "$OUT/bench-$name.json" || status=$?
done
exit $status
