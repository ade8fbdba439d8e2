"""Quality regression on the embedded model: Re-ttention beats plain sparse attention at 6.25%."""

import pytest
import torch

from rettn.core.config import RettnConfig
from rettn.tools.evaluate import DEFAULT_PROMPTS, evaluate

# Measured with `rettn eval` (docs/quality.md); the bound leaves room for platform noise.
MIN_PSNR_GAIN_DB = 3.0


@pytest.fixture(scope="module")
def pipe():
    from rettn.tiny import load_default_pipeline

    p = load_default_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@torch.no_grad()
def test_rettention_beats_plain_sparse_at_keep_6_25(pipe):
    base = RettnConfig.from_preset("tiny-shapes")
    rows = evaluate(pipe, base, prompts=DEFAULT_PROMPTS[:3], seeds=(0,), methods=("sparse-topk", "rettn-topk"),
                    keeps=(0.0625,), progress=False)
    sparse, rett = rows
    assert sparse["method"] == "sparse-topk" and rett["method"] == "rettn-topk"
    # same keep and schedule; top-k picks from each run's own q, k, so the union with the dense
    # text rows/columns can differ by a block here and there
    assert sparse["density"] == pytest.approx(rett["density"], rel=0.02)
    assert rett["psnr"] - sparse["psnr"] >= MIN_PSNR_GAIN_DB, (rett["psnr"], sparse["psnr"])
    assert rett["attn_rel_err"] < sparse["attn_rel_err"]
