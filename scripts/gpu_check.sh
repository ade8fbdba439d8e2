#!/usr/bin/env bash
# One prepared GPU check (run on the lent H200 through the device tool, from the repo root):
#   installs what the image lacks from carried wheels (.gpu_wheels/, built beforehand with
#   `pip download -d .gpu_wheels pytest`), runs the GPU test tier and the attention benchmark,
#   and writes everything as JSON/text into $OUT. Budget: under 8 minutes.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt" 2>&1
python -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu_wheels pytest
timeout 240 python -m pytest -q -x tests/test_gpu.py tests/test_kernels.py -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/tests.txt"
timeout 200 python scripts/bench_attention.py --preset cogvideox --out "$OUT/bench_attention.json" \
  > "$OUT/bench_attention.txt" 2>&1
echo "bench rc=$?" >> "$OUT/bench_attention.txt"
tail -n 3 "$OUT/tests.txt"; cat "$OUT/bench_attention.txt"
