#!/usr/bin/env bash
# One short check on a lent CUDA machine, run from the repo root: the CUDA tests (LRP, the radix top-k's masks,
# the GPU decode path), the precision probe (GPU float32 against the CPU float64 oracle: vgg-shapes and a random
# VGG16, TF32 off/on, cuDNN benchmark off/on), then the LRP, top-k, pixel-flipping and pipeline benchmarks on the
# GPU. Every step is bounded; a failed step does not stop the next.
# JSON and the log go to $OUT (the device tool's output folder; bench/results when unset).
set -uo pipefail
OUT="${OUT:-bench/results}"
export GPU_CHECK_OUT="$OUT"  # tests write measured figures (GPU decode vs Pillow) here
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step SECONDS NAME COMMAND...: run bounded, record the exit code, go on
    local limit=$1 name=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%T)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo; echo "=== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || status=1
}
nvidia-smi || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
python3 -c "import zennit; print('zennit', zennit.__file__)" || echo "zennit missing: its tests and rows are skipped"
step 150 "CUDA tests" python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" --timeout=120 \
    --junitxml="$OUT/cuda_tests.xml" tests/test_cuda.py tests/test_api.py tests/test_topk.py tests/test_gpu_decode.py
step 100 "precision probe: TF32 x cuDNN benchmark" python3 -m bench.gpu_probe --device cuda --out "$OUT/gpu_probe.json"
step 70 "LRP speed, VGG16 224, batch 32" python3 -m bench.lrp_speed --device cuda --quick --repeats 5 --batch 32 \
    --out "$OUT/lrp_speed_cuda.json"
step 45 "top-k: radix vs bracket vs torch.topk, LRP top-k 0.1 vs plain (target +15 %)" \
    python3 -m bench.topk_speed --device cuda --batch 32 --repeats 5 --out "$OUT/topk_speed_cuda.json"
step 40 "pixel flipping speed" python3 -m bench.faithfulness_speed --device cuda --batch 16 --repeats 5 \
    --out "$OUT/faithfulness_speed_cuda.json"
step 150 "pipeline end to end vs bare LRP, float32 and TF32 (bench-pipeline DEVICE=cuda)" \
    python3 -m bench.pipeline_speed --device cuda --images 2000 --out "$OUT/pipeline_speed_cuda.json"
echo "=== gpu_check done, status $status $(date -u +%T)"
exit $status
