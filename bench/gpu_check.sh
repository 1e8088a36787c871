#!/bin/bash
# The learned edit on a GPU, as one script (run where a CUDA machine is lent;
# docs/performance.md): the organism recipe learned on CUDA in bfloat16 (gradient checkpointing
# on, the default there), verified and evaluated, then the calibration-cost benchmark on
# CUDA. Writes its logs and reports to $OUT (default ./gpu-check).
#     bash bench/gpu_check.sh
set -o pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PYTHONPATH
cli() { python3 -c "import sys; sys.argv[0] = 'vlmguard-edit'; import cli; cli.run()" "$@"; }
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
cli -q convert examples/organism/vlm --recipe recipes/organism.yaml --device cuda \
    --dtype bfloat16 -o /tmp/gpu-guarded --overwrite || exit 1
echo "convert (learn 2 candidates + fold) on cuda bf16: $(( $(date +%s) - start )) s"
cp /tmp/gpu-guarded/calibration.md "$OUT/"
cli verify /tmp/gpu-guarded --source examples/organism/vlm | tail -3
cli -q eval /tmp/gpu-guarded --against examples/organism/vlm -o /tmp/gpu-report \
    --harmful examples/organism/eval_harmful.jsonl --benign examples/organism/eval_benign.jsonl \
    --settings text,blank,noise,scene --limit 48 --max-new-tokens 24 --device cuda
cp /tmp/gpu-report/report.md "$OUT/eval.md"
python3 bench/calibrate_cost.py --device cuda --dtype bfloat16 --widths 1024,2048,4096 \
    --layers 4 2>&1 | grep -v "Loading\|Warn" | tee "$OUT/cost.md"
