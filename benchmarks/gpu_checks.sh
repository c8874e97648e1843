#!/usr/bin/env bash
# The project's GPU checks in one run (CI and the project's machine have no GPU; BENCHMARKS.md records the
# results): the CUDA tests (with the fused Triton layers' checks), the fused layer against the unfused ops, full
# training-step times of the optimizers on the GPU (Adam measured in the same run),
# and the language-model comparison with the populations on the GPU.
#
# Durations on an H200: tests 41 s (2026-11-27; 93-111 s on 2026-11-28), step times ~80 s (six compilations; a
# CNN-only run of three compiled optimizers took over 110 s on 2026-11-28: give it time); the comparison is
# launch-bound (tiny models):
# ~60 population steps/s for a baseline grid (35 runs), ~30/s for a learned optimizer (5 runs), i.e. about
# 3 min per grid and 5.5 min per learned optimizer at 10,000 steps: it runs only with COMPARE=1 (COMPARE_TIMEOUT,
# seconds, to fit).
#
#   OUT=runs/gpu bash benchmarks/gpu_checks.sh          (PYTHON=... to pick the interpreter; TASK=cnn or mlp for one
#                                                        task: a lent machine runs one command for 10 minutes at most)
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu.txt"
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt"
timeout 90 $PY benchmarks/bench_fused.py 2>&1 | tee "$OUT/bench_fused.txt"
timeout 420 $PY benchmarks/bench_optimizers.py --device cuda --task "${TASK:-all}" --steps 50 --seed 0 --profile UNF-compiled \
  --only UNF UNF-unfused UNF-compiled UNF-compiled-hidden UNF-compiled-combo UNF-compiled-unfused PerParamMLP \
  PerParamMLP-compiled DeepSet DeepSet-compiled \
  2>&1 | tee "$OUT/bench_optimizers.txt"
[ "${COMPARE:-0}" = 1 ] || exit 0
timeout "${COMPARE_TIMEOUT:-1800}" $PY -m unf compare --task transformer-shakespeare --steps 2000 10000 --seeds 5 \
  --optimizer optimizers/weights/unf-transformer-shakespeare.safetensors \
  --optimizer optimizers/weights/deepset-mnist1d.safetensors \
  --optimizer optimizers/weights/perparam-mnist1d.safetensors \
  --device cuda --out "$OUT/compare" --no-progress 2>&1 | tee "$OUT/compare.txt"
