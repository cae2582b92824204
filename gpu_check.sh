#!/usr/bin/env bash
# What only a GPU can check (README lists what is written but untested on one), in about 10 minutes on
# one GPU:  bash gpu_check.sh     (DEVICE=cpu LAYERS=2 bash gpu_check.sh runs the same checks on a CPU;
# CHECKS="2 3" runs only those)
#   1. memory: plan.py's prediction against the allocator's peak, at the study's defaults and real depth
#   2. the decode step as a CUDA graph: compiled and eager decoding sample and evaluate the same tokens
#   3. bf16 merged sampling against the fp32 learner: the logged gap and the mean importance weight
# Each check prints what it measured; the script stops at the first that fails.
set -euo pipefail
cd "$(dirname "$0")"
DEVICE=${DEVICE:-cuda}
LAYERS=${LAYERS:-28}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
python -c "import torch, sys; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 'no CUDA device')"

CHECKS=${CHECKS:-1 2 3}
[[ " $CHECKS " == *" 1 "* ]] && echo "1. memory of one learn step, $LAYERS layers, the study's defaults (plan.py)"
for ckpt in "" "--grad-checkpointing"; do
  [[ " $CHECKS " == *" 1 "* ]] || break
  MALLOC_MMAP_THRESHOLD_=65536 python plan.py --device "$DEVICE" --layers "$LAYERS" $ckpt ${PLAN_FLAGS:-} | tee "$OUT/plan"
  python - "$OUT/plan" <<'PY'
import re, sys
measured, predicted = map(float, re.findall(r"(\d+\.\d+) GiB", open(sys.argv[1]).read()))
assert abs(predicted - measured) <= 0.15 * measured, "the plan is off by more than 15%"
PY
done

if [[ " $CHECKS " == *" 2 "* ]]; then
echo "2. compiled and eager decoding, tiny preset on $DEVICE"
common=(--preset tiny --device "$DEVICE" --steps 3 --eval-n 8 --eval-every 0 --is-cap 0)
python train.py "${common[@]}" --compile off --out "$OUT/eager" > /dev/null
python train.py "${common[@]}" --compile on --out "$OUT/compiled" > /dev/null
python - "$OUT" <<'PY'
import json, sys
read = lambda run, name: [json.loads(line) for line in open(f"{sys.argv[1]}/{run}/{name}")]
same = lambda key, name: [r[key] for r in read("eager", name)] == [r[key] for r in read("compiled", name)]
assert same("completion", "eval_final.jsonl"), "compiled decoding evaluates differently"
assert same("tokens", "metrics.jsonl") and same("reward", "metrics.jsonl"), "compiled decoding samples differently"
print("   the same completions and rewards, step by step")
PY
fi

if [[ " $CHECKS " == *" 3 "* ]]; then
echo "3. the sampler-learner gap and the importance weight (default --is-cap 3, the device's precision)"
python train.py --preset tiny --device "$DEVICE" --steps 3 --eval-n 8 --eval-every 0 --out "$OUT/gap" > /dev/null
python - "$OUT/gap/metrics.jsonl" <<'PY'
import json, sys
for m in map(json.loads, open(sys.argv[1])):
    print(f"   step {m['step']}: |log pi_old - log pi_sampler| mean {m['logp_mismatch_mean']:.2e}, "
          f"max {m['logp_mismatch_max']:.2e}; importance weight mean {m['is_weight_mean']:.4f}")
    assert m["logp_mismatch_max"] < 1.0 and abs(m["is_weight_mean"] - 1) < 0.1, "sampler and learner disagree"
PY
fi
echo "gpu_check: all passed on $DEVICE"
