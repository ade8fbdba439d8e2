"""apply_rettention on tiny offline models of every family: exactness, undo, schedules, CFG."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, tiny_inputs, tiny_pipeline, tiny_pipeline_kwargs, tiny_transformer

import rettn
from rettn.diffusers import processor
from rettn.diffusers.processor import RettnProcessor, _MaskChecks, _suffix_valid_lengths

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
TIMESTEPS = [950.0, 850.0, 700.0, 600.0, 450.0, 300.0, 200.0, 100.0]
SMALL = dict(block_size=32, warmup=2, refresh_interval=3, min_seq_len=0)


def sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


@torch.no_grad()
def generate(model, family, timesteps=TIMESTEPS, batch=2):
    """A denoising-like run: the same inputs at decreasing timesteps, outputs stacked."""
    return torch.stack([sample(model(**tiny_inputs(family, model, batch=batch, t=t))) for t in timesteps])


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_transformer(request.param, qk_gain=8.0)


def test_keep_all_equals_unpatched_model(family_model):
    family, model = family_model
    base = generate(model, family)
    with rettn.apply_rettention(model, keep=1.0, **SMALL) as handle:
        out = generate(model, family)
        assert handle.stats().counts() == {"dense": 2, "cache": 2, "sparse": 4}
    scale = base.abs().max().item()
    assert (out - base).abs().max().item() <= 5e-5 * max(1.0, scale)  # fp32 round-off only


def test_remove_restores_processors_and_output(family_model):
    family, model = family_model
    originals = dict(model.attn_processors)
    base = generate(model, family)
    handle = rettn.apply_rettention(model, keep=0.1, **SMALL)
    assert any(isinstance(p, RettnProcessor) for p in model.attn_processors.values())
    generate(model, family)
    handle.remove()
    assert all(p is originals[name] for name, p in model.attn_processors.items())
    assert not model._forward_pre_hooks
    assert torch.equal(generate(model, family), base)
    handle.remove()  # twice is fine


def test_sparse_output_is_finite_differs_and_repeats(family_model):
    family, model = family_model
    base = generate(model, family)
    handle = rettn.apply_rettention(model, keep=0.1, **SMALL)
    first = generate(model, family)
    stats = handle.stats()
    second = generate(model, family)
    handle.remove()
    assert torch.isfinite(first).all()
    assert (first - base).abs().max() > 1e-4  # sparse steps really changed something
    # dense warm-up steps: rettn's dense kernel, on CPU the model's own (PyTorch's CPU flash
    # kernel), bit for bit; HunyuanVideo's padded text runs row by row (a masked SDPA call goes to
    # another kernel), equal to rounding
    if family == "hunyuanvideo":
        torch.testing.assert_close(first[:2], base[:2], atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(first[:2], base[:2])
    assert torch.equal(first, second)  # the second generation starts from a clean state
    assert stats.kinds() == ["dense", "dense", "cache", "sparse", "sparse", "cache", "sparse", "sparse"]
    assert 0 < stats.mean_density() < 1 and stats.cached_bytes > 0


def test_batch_of_three_and_joint_text_dense(family_model):
    family, model = family_model
    handle = rettn.apply_rettention(model, keep=0.1, **SMALL)
    out = generate(model, family, batch=3)
    handle.remove()
    assert out.shape[1] == 3 and torch.isfinite(out).all()


# ------------------------------------------------------------------------------ pipelines
def kinds_for(steps, warm, cache):
    kinds = ["dense"] * warm + ["sparse"] * (steps - warm)
    for c in cache:
        kinds[c] = "cache"
    return kinds


@torch.no_grad()
def test_pixart_20_step_paper_schedule():
    pipe = tiny_pipeline("pixart-sigma", qk_gain=8.0)
    handle = rettn.apply_rettention(pipe, preset="pixart-sigma", block_size=32, min_seq_len=0)
    out = pipe(**tiny_pipeline_kwargs("pixart-sigma", num_inference_steps=20, output_type="latent")).images
    stats = handle.stats()
    handle.remove()
    assert torch.isfinite(out).all()
    assert stats.kinds() == kinds_for(20, 5, [5, 10, 15])
    assert stats.num_inference_steps == 20
    assert all(s.forwards == 1 for s in stats.steps)  # CFG batched into one call per step


@torch.no_grad()
def test_cogvideox_50_step_paper_schedule_and_text_dense():
    pipe = tiny_pipeline("cogvideox", qk_gain=8.0)
    handle = rettn.apply_rettention(pipe, preset="cogvideox-2b", block_size=32, min_seq_len=0)
    out = pipe(**tiny_pipeline_kwargs("cogvideox", num_inference_steps=50, output_type="latent")).frames
    stats = handle.stats()
    layout = next(iter(handle.engine.cache.values())).layout
    handle.remove()
    assert torch.isfinite(out).all()
    assert stats.kinds() == kinds_for(50, 15, list(range(15, 50, 5)))
    assert stats.counts() == {"dense": 15, "cache": 7, "sparse": 28}
    # 226 text tokens first: query blocks 0-7 (tokens 0-255) dense, key blocks 0-7 in every row
    dense = layout.to_dense()
    assert dense[:, :, :7].all() and dense[..., :7].all()


@torch.no_grad()
def test_wan_two_calls_per_step_keep_separate_state():
    pipe = tiny_pipeline("wan", qk_gain=8.0)
    def kwargs():  # a fresh seeded generator per call
        return tiny_pipeline_kwargs("wan", num_inference_steps=6, output_type="latent", guidance_scale=5.0)

    base = pipe(**kwargs()).frames
    handle = rettn.apply_rettention(pipe, keep=0.2, block_size=32, warmup=2, refresh_interval=2, min_seq_len=0)
    out = pipe(**kwargs()).frames
    stats = handle.stats()
    branches = {key[1] for key in handle.engine.cache}
    handle.remove()
    assert stats.kinds() == ["dense", "dense", "cache", "sparse", "cache", "sparse"]
    assert all(s.forwards == 2 for s in stats.steps)  # cond, then uncond
    assert branches == {"cond", "uncond"}  # the pipeline's cache_context names
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    again = pipe(**kwargs()).frames
    assert torch.equal(again, base)


@torch.no_grad()
def test_keep_all_pipeline_matches_and_several_prompts():
    pipe = tiny_pipeline("pixart", qk_gain=8.0)
    kwargs = dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2, output_type="latent")
    base = pipe(**tiny_pipeline_kwargs("pixart", num_inference_steps=8, **kwargs)).images
    handle = rettn.apply_rettention(pipe, keep=1.0, block_size=32, warmup=2, refresh_interval=3, min_seq_len=0)
    out = pipe(**tiny_pipeline_kwargs("pixart", num_inference_steps=8, **kwargs)).images
    handle.remove()
    assert out.shape[0] == 4
    torch.testing.assert_close(out, base, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_remove_after_exception_mid_generation_leaves_pipeline_clean():
    pipe = tiny_pipeline("cogvideox", qk_gain=8.0)
    def kwargs():
        return tiny_pipeline_kwargs("cogvideox", num_inference_steps=6, output_type="latent")

    base = pipe(**kwargs()).frames
    originals = dict(pipe.transformer.attn_processors)
    sdpa = F.scaled_dot_product_attention
    handle = rettn.apply_rettention(pipe, keep=0.1, block_size=32, warmup=1, refresh_interval=2, min_seq_len=0)

    def boom(pipe_, step, timestep, callback_kwargs):
        if step == 3:
            raise KeyboardInterrupt("user stopped")
        return callback_kwargs

    with pytest.raises(KeyboardInterrupt):
        pipe(**kwargs(), callback_on_step_end=boom)
    assert not torch.overrides._get_current_function_mode_stack()  # no interception left open
    assert F.scaled_dot_product_attention is sdpa  # torch's own function, while the handle lives
    handle.remove()
    assert F.scaled_dot_product_attention is sdpa
    assert all(p is originals[n] for n, p in pipe.transformer.attn_processors.items())
    assert torch.equal(pipe(**kwargs()).frames, base)


def test_applying_twice_is_an_error():
    model = tiny_transformer("pixart")
    handle = rettn.apply_rettention(model, keep=0.5)
    with pytest.raises(RuntimeError, match="already applied.*remove\\(\\) on the first handle"):
        rettn.apply_rettention(model, keep=0.5)
    handle.remove()
    rettn.apply_rettention(model, keep=0.5).remove()


@torch.no_grad()
def test_budget_error_before_anything_is_cached():
    pipe = tiny_pipeline("pixart")
    handle = rettn.apply_rettention(pipe, keep=0.1, block_size=32, warmup=2, min_seq_len=0, max_cache_bytes="10KB")
    with pytest.raises(MemoryError, match="over max_cache_bytes"):
        pipe(**tiny_pipeline_kwargs("pixart", num_inference_steps=6, output_type="latent"))
    assert handle.stats().steps[0].step == 0 and len(handle.stats().steps) == 1
    handle.remove()


def test_bad_targets_and_arguments():
    with pytest.raises(TypeError, match="expects a diffusers pipeline"):
        rettn.apply_rettention(torch.nn.Linear(2, 2))
    model = tiny_transformer("wan")
    with pytest.raises(ValueError, match=r"unknown RettnConfig field\(s\) \['kep'\]"):
        rettn.apply_rettention(model, kep=0.1)
    with pytest.raises(ValueError, match="unknown preset"):
        rettn.apply_rettention(model, preset="nope")
    assert not any(isinstance(p, RettnProcessor) for p in model.attn_processors.values())


class _HandAttention(torch.nn.Module):
    """An attention module whose processor computes softmax attention by hand (no SDPA)."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads, self.qkv = heads, torch.nn.Linear(dim, 3 * dim)
        self.processor = self.by_hand

    def by_hand(self, attn, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return (w @ v).transpose(1, 2).reshape(b, s, -1)

    def forward(self, x):
        return self.processor(self, x)


class _HandModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _HandAttention()

    def forward(self, x, timestep):
        return self.attn(x)


@torch.no_grad()
def test_model_whose_attention_never_reaches_the_engine_is_an_error_at_its_first_call():
    model = _HandModel()
    with pytest.warns(UserWarning, match="rettn does not know _HandModel and uses its generic path"):
        handle = rettn.apply_rettention(model, keep=0.1, block_size=32, min_seq_len=0, warmup=0)
    assert "sparse-eligible" in str(rettn.describe(model, keep=0.1))  # the plan says eligible
    with pytest.raises(RuntimeError, match=r"rettn reached none of the attention calls of _HandModel: its "
                                           r"processors \['method'\] compute attention without torch"):
        model(torch.randn(1, 64, 32), timestep=torch.tensor([900.0]))
    assert handle.describe().dense_unseen() == ["attn"]
    handle.remove()
    assert model.attn.processor == model.attn.by_hand


@torch.no_grad()
def test_generic_path_for_a_model_without_a_family_row():
    from diffusers import Transformer2DModel  # the legacy class, configured as a DiT: no row of its own

    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                               sample_size=32, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero").eval()
    x = torch.randn(2, 4, 32, 32)
    labels = torch.tensor([1, 2])

    def run():
        return torch.stack([model(x, timestep=torch.tensor([t, t]), class_labels=labels).sample
                            for t in TIMESTEPS])

    base = run()
    with pytest.warns(UserWarning, match="uses its generic path"):
        handle = rettn.apply_rettention(model, keep=1.0, **SMALL)
    assert handle.family.name == "generic"
    torch.testing.assert_close(run(), base, atol=1e-5, rtol=1e-5)
    handle.remove()
    with pytest.warns(UserWarning, match="uses its generic path"):
        handle = rettn.apply_rettention(model, keep=0.2, **SMALL)
    out = run()
    assert handle.stats().mean_density() < 0.5
    handle.remove()
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-5


def test_frame_window_reads_the_grid_of_each_video_family():
    for family in ("cogvideox", "wan", "hunyuanvideo", "ltx-video"):
        model = tiny_transformer(family, qk_gain=8.0)
        handle = rettn.apply_rettention(model, keep=0.1, pattern="frame_window", block_size=16,
                                        warmup=0, refresh_interval=2, min_seq_len=0)
        out = generate(model, family, timesteps=TIMESTEPS[:3])
        layouts = list(handle.engine.static_layouts.values())
        handle.remove()
        assert torch.isfinite(out).all() and layouts, family
        assert all(lay.density() < 1 for lay in layouts)


@torch.no_grad()
def test_skip_layers_count_self_attention_layers_in_model_order():
    model = tiny_transformer("pixart", qk_gain=8.0)
    handle = rettn.apply_rettention(model, keep=0.1, skip_layers=[1], **SMALL)
    procs = {name: m.processor for name, m in handle.modules.items()}
    assert procs["transformer_blocks.0.attn1"].layer == 0 and procs["transformer_blocks.1.attn1"].layer == 1
    assert procs["transformer_blocks.0.attn2"].kind == "cross"
    generate(model, "pixart", timesteps=TIMESTEPS[:4])
    stats = handle.stats()
    cached_layers = {key[0] for key in handle.engine.cache}
    handle.remove()
    assert 0 in cached_layers and 1 not in cached_layers
    assert stats.steps[2].kind == "cache" and stats.steps[2].dense_calls == 1 and stats.steps[2].sparse_calls >= 1


# ------------------------------------------------------------------------------ masks
def _old_suffix_valid_lengths(mask, batch, seq_k):
    """The check as it was before it ran on the device in one host read (the reference)."""
    if mask.dtype != torch.bool or mask.shape[-1] != seq_k:
        return None
    if bool(mask.all()):
        return [seq_k] * batch
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] != 1:
        return None
    keys = mask[:, 0, 0].expand(batch, seq_k)
    valid = keys.sum(-1)
    expected = torch.arange(seq_k, device=mask.device) < valid.unsqueeze(-1)
    if not torch.equal(keys, expected) or int(valid.min()) == 0:
        return None
    if mask.shape[2] > 1:
        rows = mask[:, 0].expand(batch, -1, seq_k)
        for b, n in enumerate(valid.tolist()):
            real = n if rows.shape[1] == seq_k else rows.shape[1]
            if not torch.equal(rows[b, :real], expected[b].expand(real, seq_k)):
                return None
            pad = rows[b, real:]
            if pad.numel() and not bool(((pad == expected[b]).all(-1) | pad.all(-1) | ~pad.any(-1)).all()):
                return None
    return valid.tolist()


def _pad(lengths, sk, sq=1, pad_rows="expected"):
    """(B, 1, sq, sk): key padding after each row's length; with sq == sk, the query rows past
    the length are "expected" (the real rows' keys), "all" (True), "none" or "mixed" (in turn)."""
    keys = torch.arange(sk) < torch.tensor(lengths).unsqueeze(-1)
    mask = keys[:, None, None].expand(-1, 1, sq, sk).clone()
    fills = {"expected": [None], "all": [True], "none": [False], "mixed": [None, True, False]}[pad_rows]
    for b, n in enumerate(lengths if sq == sk else []):
        for i, r in enumerate(range(n, sk)):
            if fills[i % len(fills)] is not None:
                mask[b, 0, r] = fills[i % len(fills)]
    return mask


def _flipped(mask, *index):
    mask = mask.clone()
    mask[index] = ~mask[index]
    return mask


MASK_TABLE = [  # (mask, batch, seq_k, expected)
    (torch.ones(2, 1, 1, 8), 2, 8, None),  # a float mask
    (torch.ones(2, 1, 1, 7, dtype=torch.bool), 2, 8, None),  # other key count
    (torch.ones(2, 1, 1, 8, dtype=torch.bool), 2, 8, [8, 8]),
    (torch.ones(3, 5, 8, dtype=torch.bool), 2, 8, [8, 8]),  # all True: any shape
    (torch.ones(2, 1, 0, 8, dtype=torch.bool), 2, 8, [8, 8]),  # empty
    (_pad([5, 3], 8)[:, 0], 2, 8, None),  # 3-D
    (_pad([5, 3, 4], 8), 2, 8, None),  # batch 3 for 2
    (_pad([5, 3], 8).expand(2, 2, 1, 8), 2, 8, None),  # per-head mask
    (_pad([5, 3], 8), 2, 8, [5, 3]),
    (_pad([6], 8), 3, 8, [6, 6, 6]),  # one row broadcast over the batch
    (_flipped(_pad([5, 3], 8), 1, 0, 0, 1), 2, 8, None),  # padding in the middle
    (_pad([5, 0], 8), 2, 8, None),  # a row with no valid key
    (_pad([5, 3], 8, 8), 2, 8, [5, 3]),  # HunyuanVideo 1.5: (B, 1, S, S)
    (_pad([5, 3], 8, 8, "all"), 2, 8, [5, 3]),
    (_pad([5, 3], 8, 8, "none"), 2, 8, [5, 3]),
    (_pad([5, 3], 8, 8, "mixed"), 2, 8, [5, 3]),  # each padded row one of the three
    (_flipped(_pad([5, 3], 8, 8), 1, 0, 6, 0), 2, 8, None),  # a padded row of another pattern
    (_flipped(_pad([5, 3], 8, 8), 0, 0, 2, 6), 2, 8, None),  # a real row sees a padded key
    (_flipped(_pad([5, 3], 8, 8, "all"), 1, 0, 2, 6), 2, 8, None),
    (_pad([7], 8, 8, "none"), 2, 8, [7, 7]),
    (_pad([5, 3], 8, 4), 2, 8, [5, 3]),  # Sq != Sk: every row real
    (_pad([5, 3], 8, 6), 2, 8, [5, 3]),
    (_flipped(_pad([5, 3], 8, 4), 1, 0, 3, 0), 2, 8, None),  # ... and each must match
    (_pad([5, 3], 8, 8, "all").expand(2, 1, 8, 8), 2, 8, [5, 3]),  # expanded (stride 0) rows
]


@pytest.mark.parametrize("case", range(len(MASK_TABLE)))
def test_mask_check_answers_as_before(case):
    mask, batch, seq_k, expected = MASK_TABLE[case]
    assert _old_suffix_valid_lengths(mask, batch, seq_k) == expected  # the table is right
    assert _suffix_valid_lengths(mask, batch, seq_k) == expected


def test_mask_check_agrees_with_the_old_one_on_random_masks():
    gen = torch.Generator().manual_seed(0)
    for i in range(300):
        batch, sk = 1 + i % 3, 4 + i % 5
        sq = (1, sk, sk, 3)[i % 4]
        lengths = torch.randint(0, sk + 1, (batch if i % 5 else 1,), generator=gen).tolist()
        mask = _pad(lengths, sk, sq, ("expected", "all", "none", "mixed")[i % 7 % 4])
        if i % 3:  # a few flipped entries
            flips = torch.rand(mask.shape, generator=gen) < 0.02 * (i % 3)
            mask = mask ^ flips
        assert _suffix_valid_lengths(mask, batch, sk) == _old_suffix_valid_lengths(mask, batch, sk), (i, mask)


def _counting(monkeypatch):
    checks, real = [], processor._suffix_valid_lengths  # counts the checks (holds no mask)
    monkeypatch.setattr(processor, "_suffix_valid_lengths", lambda *a: checks.append(1) or real(*a))
    return checks


def test_mask_check_once_per_mask_tensor(monkeypatch):
    checks, memo = _counting(monkeypatch), _MaskChecks(size=2)
    mask = _pad([5, 3], 8)
    assert memo.valid_lengths(mask, 2, 8) == [5, 3] and memo.valid_lengths(mask, 2, 8) == [5, 3]
    assert len(checks) == 1
    assert memo.valid_lengths(mask[:1], 1, 8) == [5] and len(checks) == 2  # another tensor
    mask[1, 0, 0, 3:] = True  # in place: checked again
    assert memo.valid_lengths(mask, 2, 8) == [5, 8] and len(checks) == 3
    assert memo.valid_lengths(mask, 3, 8) is None and len(checks) == 4  # other batch
    assert memo.valid_lengths(mask, 3, 8) is None and len(checks) == 4  # None is kept too
    assert len(memo) == 2  # the last two only
    del mask
    for lengths in ([2, 4], [4, 2], [2, 4]):  # a freed tensor's answer never serves a new one (ids get reused)
        assert memo.valid_lengths(_pad(lengths, 8), 2, 8) == lengths
    assert len(checks) == 7
    with torch.inference_mode():  # no version counter: checked at every call
        mask = _pad([5, 3], 8)
        memo.valid_lengths(mask, 2, 8), memo.valid_lengths(mask, 2, 8)
    assert len(checks) == 9


@torch.no_grad()
def test_masked_model_checks_each_forwards_mask_once(monkeypatch):
    """HunyuanVideo's padded text: every layer of a forward gets the same mask tensor; its check
    (and host read) runs once per forward, not once per layer, and the output is the old check's."""
    model = tiny_transformer("hunyuanvideo", qk_gain=8.0)

    def run():
        with rettn.apply_rettention(model, keep=0.1, **SMALL) as handle:
            out = generate(model, "hunyuanvideo", timesteps=TIMESTEPS[:4])
            assert handle.stats().kinds() == ["dense", "dense", "cache", "sparse"]
        return out

    checks, calls, real = _counting(monkeypatch), [], processor.mask_checks.valid_lengths
    monkeypatch.setattr(processor.mask_checks, "valid_lengths", lambda *a: calls.append(1) or real(*a))
    out = run()
    assert len(checks) == 4 and len(calls) == 8  # 4 forwards, 2 masked layers in each
    monkeypatch.setattr(processor, "_suffix_valid_lengths", _old_suffix_valid_lengths)
    monkeypatch.setattr(processor.mask_checks, "size", 0)  # the old check, at every call
    assert torch.equal(run(), out)
