"""PSNR against dense of presets on the embedded model's default captions (seed 0, the pipeline's
30 steps): the first two are the ones ``rettn calibrate`` uses by default, the other six are held out.

    python scripts/calibration_heldout.py [PRESET ...]   # default: docs/examples/calibrate/tiny95.yaml tiny-shapes
"""

import sys

import numpy as np
import torch

import rettn
from rettn.tiny import load_default_pipeline
from rettn.tools.evaluate import DEFAULT_PROMPTS
from rettn.tools.metrics import psnr


def main(presets):
    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt):
        out = pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np")
        return np.asarray(out.frames[0], dtype=np.float32)

    dense = {p: generate(p) for p in DEFAULT_PROMPTS}
    for preset in presets:
        values, densities = [], []
        for prompt in DEFAULT_PROMPTS:
            handle = rettn.apply_rettention(pipe, preset=preset)
            try:
                out = generate(prompt)
                densities.append(handle.stats().mean_density())
            finally:
                handle.remove()
            values.append(psnr(dense[prompt], out))
        held = values[2:]
        print(f"{preset}: calibration {[round(v, 2) for v in values[:2]]} held-out {[round(v, 2) for v in held]} "
              f"mean held-out {np.mean(held):.2f} min {min(held):.2f} dB; counted density {np.mean(densities):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["docs/examples/calibrate/tiny95.yaml", "tiny-shapes"])
