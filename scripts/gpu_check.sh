#!/usr/bin/env bash
# One prepared GPU check (run on the lent H200 through the device tool, from the repo root):
#   installs what the image lacks from carried wheels (.gpu_wheels/, built beforehand with
#   `pip download --no-deps -d .gpu_wheels pytest diffusers==0.42.1`; carry
#   `.gpu_wheels`), runs the GPU test tier, the attention benchmark, and the latency profiles of
#   CogVideoX-2B and -5B-shaped transformers with random weights at 49 frames 720x480 (dense vs
#   the cogvideox presets, 50 steps), and writes everything as JSON/text into $OUT.
# Budget: under 8 minutes in all (GPU_CHECK_BUDGET seconds, default 470): each step's timeout is
# cut to what is left. At most 8 files come back from $OUT: env.txt, tests.txt,
# bench_attention.{json,txt}, bench_compile.json, profile-cogvideox-2b.json, profile-cogvideox-5b.json,
# profile.txt (the profiles' and the compile benchmark's text).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the image's python3 holds torch
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-470}
cap() {  # cap WANT: WANT seconds, or what is left of the budget if less (at least 1)
  local want=$1 left=$(( BUDGET - ($(date +%s) - START) ))
  (( left < want )) && want=$left
  (( want < 1 )) && want=1
  echo "$want"
}

{ nvidia-smi; "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt" 2>&1
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links .gpu_wheels pytest >> "$OUT/env.txt" 2>&1
if ! "$PY" -c "import diffusers" 2>/dev/null; then  # the image has no diffusers (a pure-Python wheel;
  # its other needs are in the image, and importlib_metadata is only imported on Python < 3.8)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_wheels/diffusers-*.whl >> "$OUT/env.txt" 2>&1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
"$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" >> "$OUT/env.txt" 2>&1

# 1. GPU test tier (+ the profiler's CUDA path on a shrunk CogVideoX-2B, seconds)
timeout "$(cap 150)" "$PY" -m pytest -q -x tests/test_gpu.py tests/test_kernels.py tests/test_compile.py \
  tests/test_safety.py tests/test_profiler.py::test_profile_on_cuda -p no:cacheprovider \
  > "$OUT/tests.txt" 2>&1
echo "tests rc=$? ($(( $(date +%s) - START )) s in)" >> "$OUT/tests.txt"

# 2. attention kernels at the CogVideoX-2B shape
timeout "$(cap 90)" "$PY" scripts/bench_attention.py --preset cogvideox --out "$OUT/bench_attention.json" \
  > "$OUT/bench_attention.txt" 2>&1
echo "bench rc=$? ($(( $(date +%s) - START )) s in)" >> "$OUT/bench_attention.txt"

# 3. latency profiles: the real transformers with random weights, 49 frames 720x480 (17,776
#    tokens, CFG batch 2, bf16), 50 steps, dense vs the preset schedule; warm-up runs excluded.
#    The 2B kernel table includes FlexAttention (compiled once, excluded); the 5B one skips it.
: > "$OUT/profile.txt"
echo "== CogVideoX-2B ==" >> "$OUT/profile.txt"
timeout "$(cap 120)" "$PY" scripts/profile_latency.py --random-weights --arch cogvideox-2b --no-chart \
  --json "$OUT/profile-cogvideox-2b.json" >> "$OUT/profile.txt" 2>&1
echo "profile 2b rc=$? ($(( $(date +%s) - START )) s in)" >> "$OUT/profile.txt"
# 3b. torch.compile on top of the Triton kernels: 8 CogVideoX-2B blocks at the full shape,
#     regional Inductor compilation, dense and rettn, eager vs compiled (first runs excluded)
echo "== torch.compile (8 CogVideoX-2B blocks) ==" >> "$OUT/profile.txt"
timeout "$(cap 150)" "$PY" scripts/bench_compile.py --arch cogvideox-2b --layers 8 --steps 10 \
  --json "$OUT/bench_compile.json" >> "$OUT/profile.txt" 2>&1
echo "bench_compile rc=$? ($(( $(date +%s) - START )) s in)" >> "$OUT/profile.txt"
echo "== CogVideoX-5B ==" >> "$OUT/profile.txt"
timeout "$(cap 200)" "$PY" scripts/profile_latency.py --random-weights --arch cogvideox-5b \
  --kernel-providers sdpa,dense_lse,rettn,rettn_rescaled --no-chart \
  --json "$OUT/profile-cogvideox-5b.json" >> "$OUT/profile.txt" 2>&1
echo "profile 5b rc=$? ($(( $(date +%s) - START )) s in)" >> "$OUT/profile.txt"

# 4. the speedups side by side, with each schedule's ceiling (the run if sparse attention cost nothing)
"$PY" - "$OUT" >> "$OUT/profile.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
print("== summary: per-step and whole-run speedups (CUDA events; warm-up runs excluded) ==")
for name in ("cogvideox-2b", "cogvideox-5b"):
    p = Path(sys.argv[1]) / f"profile-{name}.json"
    if not p.exists():
        print(f"{name}: no report (the run did not finish)")
        continue
    r = json.loads(p.read_text())
    s, run = r["summary"], r["summary"]["run"]
    rows = {x["label"]: x for x in s["rows"]}
    ms = lambda label: 1e3 * rows[label]["mean_s"] if label in rows else float("nan")
    print(f"{name}: dense step {ms('dense (no rettn)'):.1f} ms, rettn dense {ms('rettn dense'):.1f} ms, "
          f"cache {ms('rettn cache'):.1f} ms, sparse {ms('rettn sparse'):.1f} ms "
          f"(attention {1e3 * (rows.get('rettn sparse') or {}).get('attention_s', float('nan')):.1f} ms)")
    fx = lambda v, f=".2f": "-" if v is None else format(v, f)
    print(f"  sparse step vs dense step: {fx(s['sparse_step_speedup'])}x | whole {r['steps']}-step run: "
          f"dense {run['dense_s']:.2f} s, rettn {run['rettn_s']:.2f} s -> {run['speedup']:.2f}x | "
          f"ceiling {run['ceiling_s']:.2f} s -> {fx(run['ceiling_speedup'])}x | density {fx(s['mean_density'], '.4f')}")
    for t, v in (r.get("targets") or {}).items():
        print(f"  target {t}: {v['value']:.2f}x (>= {v['bound']}x) {'met' if v['met'] else 'NOT met'}")
EOF
tail -n 3 "$OUT/tests.txt"; cat "$OUT/bench_attention.txt" "$OUT/profile.txt"
echo "gpu_check total $(( $(date +%s) - START )) s"
