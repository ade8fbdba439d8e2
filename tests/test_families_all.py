"""apply_rettention on a tiny model of every diffusers transformer class with softmax attention
(tests/tiny_models.py ALL_FAMILIES): keep=1 equals the unpatched model, remove() restores it bit
for bit, a sparse run differs at its sparse steps, is finite and repeats after reset(), every
self-attention module reaches the engine. Linear-attention models are refused at apply time."""

import pytest
import torch
from tiny_models import ALL_FAMILIES, tiny_inputs, tiny_shape, tiny_transformer

import rettn
from rettn.diffusers import families as fam
from rettn.core.config import load_preset, preset_names
from rettn.core.engine import NOT_REACHED

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
TIMESTEPS = [950.0, 850.0, 700.0, 600.0, 450.0, 300.0]
SMALL = dict(block_size=32, warmup=2, refresh_interval=3, min_seq_len=0)
SOFTMAX = [k for k in ALL_FAMILIES if tiny_shape(k).softmax]
LINEAR = [k for k in ALL_FAMILIES if not tiny_shape(k).softmax]


def sample(out):
    if isinstance(out, tuple):
        out = out[0]
    out = getattr(out, "sample", out)
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image: one tensor per sample


@torch.no_grad()
def run(model, key, batch=2):
    return [sample(model(**tiny_inputs(key, model, batch=batch, t=t))).clone() for t in TIMESTEPS]


def close(a, b, tol):
    return all((x - y).abs().max().item() <= tol * max(1.0, y.abs().max().item()) for x, y in zip(a, b))


@pytest.mark.parametrize("key", SOFTMAX)
def test_every_softmax_family(key):
    try:
        model = tiny_transformer(key, qk_gain=8.0)  # peaky attention: sparse differs from dense
    except ValueError:  # no q/k norm weight to sharpen it with (AuraFlow, CogView)
        model = tiny_transformer(key)
    family = fam.detect_family(model)
    assert not family.generic, f"{type(model).__name__} has no row in rettn's family table"
    originals = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    base = run(model, key)

    with rettn.apply_rettention(model, keep=1.0, **SMALL) as handle:
        same = run(model, key)
        assert handle.stats().counts() == {"dense": 2, "cache": 2, "sparse": 2}
    assert close(same, base, 5e-5), "keep=1 must reproduce the model"

    handle = rettn.apply_rettention(model, keep=0.2, **SMALL)
    first = run(model, key)
    stats, desc = handle.stats(), handle.describe()
    handle.reset()
    again = run(model, key)
    handle.remove()
    assert all(torch.isfinite(x).all() for x in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "reset() must give the same run"
    # dense warm-up steps: rettn's dense kernel, on CPU the kernel the model's SDPA runs (bit for
    # bit); a masked call (padded or all-True text mask) runs row by row / unmasked there, while
    # the model's masked SDPA takes another kernel: equal to rounding
    assert close(first[:2], base[:2], 2e-6), "dense warm-up steps are the model's own"
    assert stats.kinds() == ["dense", "dense", "cache", "sparse", "sparse", "cache"]
    selfs = [r for r in desc.rows if r["role"] == "self"]
    assert selfs and all(r["calls"] for r in selfs) and not desc.dense_unseen()
    assert not any(NOT_REACHED in r["dense"] for r in desc.rows)
    if stats.counts()["sparse"] and stats.mean_density() is not None:
        assert stats.mean_density() < 1
        assert any(not torch.equal(a, b) for a, b in zip(first[2:], base[2:])), "sparse steps changed nothing"
    else:  # every call stayed dense: the reasons must say why (never silently)
        reasons = {reason for s in stats.steps for reason in s.dense_reasons}
        assert reasons - {"dense step (schedule)"}, stats

    assert all(m.processor is originals[name] for name, m in model.named_modules() if hasattr(m, "processor"))
    assert all(torch.equal(a, b) for a, b in zip(run(model, key), base)), "remove() must restore the model"


@pytest.mark.parametrize("key", LINEAR)
def test_linear_attention_models_are_refused_at_apply_time(key):
    model = tiny_transformer(key)
    with pytest.raises(ValueError, match=r"self-attention is linear attention.*softmax"):
        rettn.apply_rettention(model, keep=0.2)
    assert not any(type(m.processor).__name__.startswith("Rettn") for m in model.modules() if hasattr(m, "processor"))


def test_family_table_and_presets_agree():
    names = set(preset_names())
    for family in fam.FAMILIES.values():
        assert set(family.presets) <= names, family.name
        assert {p for p, _ in family.variants} <= set(family.presets), family.name
    for name in names:
        owner = load_preset(name).get("family")
        assert owner in fam.FAMILIES or name == "tiny-shapes", (name, owner)
    classes = [c for f in fam.FAMILIES.values() for c in f.classes]
    assert len(classes) == len(set(classes)), "a class in two rows"


def test_usage_doc_holds_the_generated_families_table():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    table = doc.split("<!-- families-table -->\n", 1)[1].split("\n<!-- /families-table -->", 1)[0]
    assert table == fam.table_markdown(), "regenerate the table with rettn.diffusers.families.table_markdown()"
