#!/usr/bin/env bash
# slimtune serve on a lent GPU, for BENCHMARKS.md: serve_load.py on CUDA with the default
# model (see gpu_default_model.sh for the calls it takes).
source benchmarks/gpu_default_model.sh
python3 benchmarks/serve_load.py --device cuda --requests 48 --clients 8 --deltas 4 \
  --max-tokens 32 2>&1 | grep -v "kernels-community" | tee "$out/serve_gpu.txt"
