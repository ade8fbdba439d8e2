#!/usr/bin/env bash
# Downloads, here (where pip reaches PyPI), the wheels that the GPU machine's image lacks, into
# .gpu_wheels/ (gitignored), for scripts/gpu_check.sh to install there without a network:
#
#   bash scripts/fetch_gpu_wheels.sh            # then carry ".gpu_wheels" with the device tool
#
# The image (see /work/shared/design/KERNELS.md and the device notes): Python 3.12.3, torch
# 2.11.0+cu130, triton 3.6.0, pytest, accelerate 1.15, transformers 5.17, huggingface_hub 1.33,
# safetensors 0.8.0, numpy, pillow, pyyaml, regex, requests, filelock, tqdm, imageio, matplotlib,
# torchmetrics, scikit-image. It has no diffusers and no imageio-ffmpeg.
#
# What is fetched, and why only that:
# - diffusers==0.42.1 (pure Python). Its needs (importlib_metadata, filelock, huggingface-hub
#   >=1.32,<3, numpy, regex, requests, safetensors>=0.8.0, Pillow) are all in the image;
#   importlib_metadata is imported only on Python < 3.8.
# - imageio-ffmpeg is left out: its wheel carries an ffmpeg binary (~30 MB) and the GPU check
#   writes no video file (rettn.tools.media imports it only to write MP4).
# rettn itself travels as the working tree (gpu_check.sh puts the repo on PYTHONPATH).
#
# gpu_check.sh installs a wheel only when the image lacks that distribution, with --no-deps into
# /tmp/site, so nothing of the image is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_WHEELS:-.gpu_wheels}
PINS=(diffusers==0.42.1)
LIMIT_MIB=20

PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$DEST" "${PINS[@]}"

"$PY" - "$DEST" "$LIMIT_MIB" <<'EOF'
import sys, zipfile
from pathlib import Path

dest, limit = Path(sys.argv[1]), float(sys.argv[2])
total = 0
for whl in sorted(dest.glob("*.whl")):
    size = whl.stat().st_size
    total += size
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        needs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
                 if l.startswith("Requires-Dist:") and "extra ==" not in l]
    print(f"{whl.name}: {size / 2**20:.2f} MiB; needs {', '.join(needs) or 'nothing'}")
print(f"{dest}: {total / 2**20:.2f} MiB in all (limit {limit:g} MiB)")
if total > limit * 2**20:
    sys.exit(f"{dest} is over {limit:g} MiB: the working tree and carried paths travel under 64 MiB")
EOF
