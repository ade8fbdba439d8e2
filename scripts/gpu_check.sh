#!/usr/bin/env bash
# The GPU check, one shot: every GPU number rettn needs, from one run on a fresh GPU machine.
#
#   bash scripts/fetch_gpu_wheels.sh          # here, once: .gpu_wheels/ (diffusers), carried along
#   bash scripts/gpu_check.sh                 # on the GPU machine, from the repo root (OUT=dir)
#   bash scripts/gpu_check.sh --rehearse      # the same steps on CPU: tiny shapes, Triton interpreter
#   GPU_CHECK_STEPS=profile,compile bash scripts/gpu_check.sh   # only some steps (a short rerun)
#
# Steps, most valuable first; each writes into $OUT as soon as it has numbers, and the summary
# (summary.json, summary.txt) is rewritten after every step, so a run cut short still returns
# what it measured:
#   install  wheels from .gpu_wheels/ for what the image lacks (--no-deps into /tmp/site)
#   bench    kernels at the CogVideoX-2B shape (B=2 H=30 S=17,776 D=64 bf16, 226 text tokens
#            first, dense text rows and columns) at keep 3.125% and 6.25%: SDPA (flash, cuDNN),
#            FlexAttention (BlockMask built outside the timing), rettn sparse / +lse / rescaled,
#            dense attention with lse, selection    -> bench_attention.json
#   tests    the GPU test tier, tests/test_gpu.py (no -x: every test runs)  -> tests.txt
#   profile  CogVideoX-2B, random weights, full shape, 50 steps, dense vs the preset; a short
#            kernel table (sdpa and rettn, 5 repeats; the JSON is written before it)
#                                                   -> profile-cogvideox-2b.json
#   compile  torch.compile (Inductor, regional) on 8 CogVideoX-2B blocks, 10 steps (3 dense,
#            2 cache, 5 sparse), eager vs compiled  -> bench_compile.json
#   long     long sequences, 2 blocks of each kind, random weights, 10 steps (2 dense, 2 cache,
#            6 sparse): HunyuanVideo 720p x 129 frames (119,056 tokens) and Wan 2.1 14B 720p x 81
#            frames (75,600 tokens), dense vs rettn, then HunyuanVideo again with R in host memory
#            (residual_device="cpu"): what the offload costs (scripts/profile_long.py; the JSON is
#            rewritten after every timed run)       -> profile-long.json
# Everything else a step prints goes to log.txt. 8 files in all come back from $OUT (the device
# tool returns at most 8).
#
# Budget: GPU_CHECK_BUDGET seconds (default 400, under 7 minutes); each step has a cap (install
# 20, bench 70, tests 60, profile 90, compile 70: 310 s) and is also cut to what is left; the
# last step, long, gets all that is left (about 85 s when the others use their whole caps; on the
# first H200 run install, bench and tests left ~60 s of theirs unused). Each step records which
# Triton kernel specialisations it launched (scripts/launch_log.py); the rehearsal maps them to
# the GPU's tile choice and prints the list.
set -u -o pipefail
REHEARSE=0
case "${1:-}" in
  --rehearse) REHEARSE=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--rehearse]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
: > "$LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # step records and launch logs (not returned)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export PY=${PYTHON:-$(command -v python3 || command -v python)}  # the image's python3 holds torch
LINKED=0
cleanup() {
  (( LINKED )) && rm -f rettn/configs
  (( REHEARSE )) && rm -rf "$WORK"
  return 0
}
trap cleanup EXIT
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-400}
ONLY=${GPU_CHECK_STEPS:-}  # e.g. "profile,compile": a second, shorter run of some steps (install always runs)
if (( REHEARSE )); then
  # CPU: the kernels under the Triton interpreter; one thread (no OpenMP contention on a busy CI
  # machine); a GPU, if any, is hidden so the rehearsal is the same everywhere
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=1 RETTN_GPU_TIER=interpret CUDA_VISIBLE_DEVICES=
fi

step() {  # step NAME CAP OUTFILE CMD...: run CMD under timeout, append its output to OUTFILE
  local name=$1 want=$2 file=$3
  shift 3
  local left=$(( BUDGET - ($(date +%s) - START) )) cap=$want rc t0
  (( left < cap )) && cap=$left
  echo "== $name: cap ${cap} s, $(( $(date +%s) - START )) s in ==" >> "$LOG"
  t0=$(date +%s%N)
  if [[ -n $ONLY && $name != install && ",$ONLY," != *",$name,"* ]]; then
    rc=125
    echo "$name skipped: not in GPU_CHECK_STEPS=$ONLY" >> "$LOG"
  elif (( cap < 5 )); then
    rc=125
    echo "$name skipped: no budget left" >> "$LOG"
  else
    RETTN_LAUNCH_LOG=$WORK/launches-$name.json timeout -k 5 "$cap" "$@" >> "$file" 2>&1
    rc=$?
  fi
  echo "== $name: rc=$rc ==" >> "$LOG"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" "$cap" >> "$WORK/steps.tsv"
  "$PY" scripts/gpu_check_summary.py "$OUT" "$WORK" "$REHEARSE" "$BUDGET" "$START" --quiet >> "$LOG" 2>&1
  return 0
}

install_wheels() {  # the carried wheels whose distribution the image lacks, --no-deps, into /tmp/site
  "$PY" - .gpu_wheels /tmp/site <<'EOF'
import subprocess, sys
from importlib import metadata
from pathlib import Path

wheels, target = Path(sys.argv[1]), sys.argv[2]
missing = []
for whl in sorted(wheels.glob("*.whl")) if wheels.is_dir() else []:
    name, version = whl.name.split("-")[:2]
    try:
        print(f"{name}: {metadata.version(name)} is installed, {whl.name} not needed")
    except metadata.PackageNotFoundError:
        missing.append(str(whl))
if not missing:
    print("nothing to install" + ("" if wheels.is_dir() else f" ({wheels} absent)"))
    sys.exit(0)
print("installing", ", ".join(Path(m).name for m in missing), "into", target)
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--disable-pip-version-check", "--target", target] + missing))
EOF
  "$PY" - <<'EOF'  # the install step fails here if the check still cannot import what it needs
import diffusers, torch, triton
print("diffusers", diffusers.__version__, "| torch", torch.__version__, "| triton", triton.__version__)
EOF
}

# ---- environment (and the install: everything after it imports diffusers)
{ command -v nvidia-smi > /dev/null && nvidia-smi; } >> "$LOG" 2>&1
if (( REHEARSE )); then
  step install 20 "$LOG" "$PY" -c "from importlib import metadata as m; print('rehearsal: nothing to install;', \
    *(f'{p} {m.version(p)}' for p in ('torch', 'triton', 'diffusers')))"
else
  export PYTHONPATH=$PYTHONPATH:/tmp/site  # appended: the image's own packages win
  export -f install_wheels
  step install 20 "$LOG" bash -c install_wheels
fi
# A bare checkout (the GPU machine's copy, rettn not installed) has no rettn.configs: pyproject
# maps configs/ to it at install. Link it for this run; the link goes at exit.
configs_found() {  # rettn.configs reachable: in the tree, or through an installed (editable) finder
  [[ -e rettn/configs ]] || "$PY" -c "
import sys
from importlib.machinery import PathFinder
def found(f):
    try:
        return f is not PathFinder and f.find_spec('rettn.configs', None) is not None
    except Exception:
        return False
sys.exit(0 if any(found(f) for f in sys.meta_path) else 1)"
}
if ! configs_found; then
  ln -s ../configs rettn/configs && LINKED=1 && echo "linked rettn/configs -> ../configs for this run" >> "$LOG"
fi
timeout 60 "$PY" scripts/gpu_check_summary.py "$OUT" "$WORK" "$REHEARSE" "$BUDGET" "$START" --env >> "$LOG" 2>&1

# ---- 1. kernels at the CogVideoX-2B shape (real layout), both keeps
if (( REHEARSE )); then
  BENCH=(--preset rehearse --backend triton --flex-compile-backend aot_eager --repeats 1 --warmup 0 --window-ms 0)
else
  # one keep (the paper's 3.125%) and no FlexAttention (its Inductor compile; 2.4 ms measured on the
  # first run): the check's 400 s hold the whole-model steps too
  BENCH=(--preset cogvideox --keep 0.03125
         --providers sdpa,sdpa_flash,sdpa_cudnn,rettn,rettn_lse,dense_lse,cache_fused,cache_two_pass,cache_auto)
fi
step bench 80 "$LOG" "$PY" scripts/bench_attention.py "${BENCH[@]}" --out "$OUT/bench_attention.json"

# ---- 1b. block selection alone at the CogVideoX-2B shape: eager, CUDA-graph replay, syncs (into log.txt)
if (( REHEARSE )); then
  SELECT=(--device cpu --heads 2 --seq 2048 --repeats 1)
else
  SELECT=(--device cuda --heads 30)
fi
step select 20 "$LOG" "$PY" scripts/bench_selection.py "${SELECT[@]}"

# ---- 2. the GPU test tier (no -x). Where the image has them: a per-test timeout (pytest-timeout),
#      and 4 workers (pytest-xdist) so that the ~15 Triton compiles run side by side
EXTRA=()
"$PY" -c "import pytest_timeout" 2> /dev/null && EXTRA+=(--timeout 45)
"$PY" -c "import xdist" 2> /dev/null && EXTRA+=(-n 4)
step tests 60 "$OUT/tests.txt" env PYTHONPATH="$PYTHONPATH:$PWD/scripts" "$PY" -m pytest -q tests/test_gpu.py tests/test_selection.py::test_topk_in_a_cuda_graph \
  -p launch_log -p no:cacheprovider -rfE --durations=12 "${EXTRA[@]}"

# ---- 3. CogVideoX-2B latency profile: full shape (17,776 tokens, CFG batch 2, bf16), 50 steps; a
#      short kernel table after the JSON (the bench step has the full one)
if (( REHEARSE )); then
  PROFILE=(--heads 2 --layers 1 --frames 1 --height 256 --width 256 --text-len 16 --steps 4 --warmup 1
           --refresh-interval 3 --min-seq-len 0 --backend triton --dtype bfloat16 --device cpu --kernel-repeats 1)
else
  PROFILE=(--no-kernels)  # the bench step has the kernels at this shape
fi
step profile 110 "$LOG" "$PY" scripts/profile_latency.py --random-weights --arch cogvideox-2b --no-chart \
  --density-sweep none --kernel-providers sdpa,rettn "${PROFILE[@]}" --json "$OUT/profile-cogvideox-2b.json"

# ---- 4. torch.compile on top of the kernels: 8 CogVideoX-2B blocks at the full shape
if (( REHEARSE )); then
  COMPILE=(--heads 2 --layers 1 --frames 1 --height 256 --width 128 --text-len 16 --steps 4 --min-seq-len 0
           --backend triton --compile-backend aot_eager --device cpu --dtype bfloat16)
else
  COMPILE=(--layers 8 --steps 10)
fi
step compile 90 "$LOG" "$PY" scripts/bench_compile.py --arch cogvideox-2b "${COMPILE[@]}" --json "$OUT/bench_compile.json"

# ---- 5. long sequences: HunyuanVideo and Wan 2.1 14B at 720p, 2 blocks each, 10 steps (the dense
#      run times 4 of them: every dense step is the same work), then HunyuanVideo with R offloaded.
#      The last step: it gets all that is left of the budget.
if (( REHEARSE )); then
  LONG=(--layers 1 --heads 2 --frames 1 --height 128 --width 256 --text-len 16 --steps 4 --warmup 1
        --refresh-interval 3 --min-seq-len 0 --backend triton --dtype bfloat16 --device cpu)
else
  LONG=(--dense-steps 4)
fi
# --dense-backend default: no separate SDPA timing at 119k / 75k tokens (~20 s: three 1.5 GB inputs
# made and timed per model); every ratio is against the faster of that dense step and rettn's own
# dense step, which runs the backend chooser's measured fastest dense kernel
step long "$BUDGET" "$LOG" "$PY" scripts/profile_long.py --cases hunyuanvideo+offload,wan2.1-14b --dense-backend default \
  "${LONG[@]}" --json "$OUT/profile-long.json"
rm -f "$OUT"/*.tmp  # a write cut by the cap (the JSON itself is replaced atomically)

# ---- the summary: summary.json, and one screen of text (also summary.txt)
"$PY" scripts/gpu_check_summary.py "$OUT" "$WORK" "$REHEARSE" "$BUDGET" "$START"
