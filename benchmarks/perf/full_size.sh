#!/usr/bin/env bash
# benchmarks/perf/RESULTS.md's full-size rows, in one GPU session: today's tree and 40de34e
# (exported to .old/, carried to the GPU machine) through the same script, full_size.py.
#   git archive 40de34e | (mkdir -p .old && tar -x -C .old)      # once, here
#   PART=old|eval|quant|pool|graphs|qvlm|final|qig OUT=DIR bash benchmarks/perf/full_size.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-perf-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
run() { local name=$1; shift; echo "== $name"; $PY benchmarks/perf/full_size.py --out "$OUT/$name.json" "$@" 2>&1 | grep -v "Loading weights"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
case "${PART:-all}" in
  old|all)   # 40de34e: quantization on the same slices as the new path's comparison rows
    run old --tree .old --layers 0-3 --vision-layers 0-5 ;;&
  eval|all)
    run new-eval --tree . --work eval ;;&
  quant|all)
    run new-slices --tree . --layers 0-3 --vision-layers 0-5 --work gptq_lm,awq_lm,gptq_vision
    run new-full --tree . --work gptq_lm,awq_lm,gptq_vision ;;&
  pool|all)
    run pool --tree . --work pool --pool-config llava-1.5-13b-hf --pool-batch 32 ;;&
  graphs)   # GPTQ's per-block CUDA graphs vs the eager sweep, and the evaluation with prefix sharing
    $PY benchmarks/perf/quant_cores.py --skip awq --shapes 4096x4096,11008x4096,4096x11008 --repeat 2 \
      2>&1 | tee "$OUT/quant-cores-graphs.txt"
    VQB_GPTQ_GRAPHS=0 run eager-slices --tree . --layers 0-3 --vision-layers 0-5 --work gptq_lm,gptq_vision
    run graphs-slices --tree . --layers 0-3 --vision-layers 0-5 --work gptq_lm,gptq_vision
    run graphs-full --tree . --work eval,eval_profile,gptq_lm,gptq_vision --batches 1,16,64,128 ;;
  qvlm)
    run qvlm --tree . --work qvlm_all ;;
  qig)      # issue 19: QIG-weighted AWQ/GPTQ beside plain on one slice of the language model, and
            # Q-VLM W4A4 with the authors' quantizers (issue 18), whole model
    run qig-slices --tree . --layers 0-3 --work awq_lm,awq_qig_lm,gptq_lm,gptq_qig_lm
    timeout 300 $PY benchmarks/perf/full_size.py --tree . --work qvlm_official_all --out "$OUT/qvlm-official.json" 2>&1 \
      | grep -v "Loading weights" ;;
  final)    # Q-VLM W4A4 of the whole model (bounded), then BLIP-2 OPT-2.7B evaluation and GPTQ
    timeout 400 $PY benchmarks/perf/full_size.py --tree . --work qvlm_all --progress --out "$OUT/qvlm.json" 2>&1 \
      | tr '\r' '\n' | grep -v "Loading weights" | awk 'NR % 20 == 1 || /work/' | tail -40
    timeout 170 $PY benchmarks/perf/full_size.py --tree . --config blip2-opt-2.7b --work eval,gptq_all \
      --batches 1,64 --beams 1,5 --out "$OUT/blip2.json" 2>&1 | grep -v "Loading weights" ;;
esac
