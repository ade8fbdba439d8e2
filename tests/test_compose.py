"""rettn together with what users already run: diffusers' caches (FirstBlockCache, MagCache,
TaylorSeer, PAB), model and group offload, set_attention_backend for the dense steps, LoRA.
Each test checks that the combination runs and stays finite, that rettn's sparse steps really
happen, and that the other feature's effect really happens too."""

import diffusers
import pytest
import torch
from diffusers import FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig
from tiny_models import tiny_pipeline, tiny_pipeline_kwargs

import rettn

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
SMALL = dict(keep=0.2, block_size=32, warmup=2, refresh_interval=3, min_seq_len=0)
STEPS = 8


def kwargs():
    return tiny_pipeline_kwargs("wan", num_inference_steps=STEPS, output_type="latent", guidance_scale=5.0)


def self_rows(handle):
    return {r["module"]: r for r in handle.describe().rows if r["role"] == "self"}


CACHES = {
    # threshold so high that every step after the first reuses the first block's residual
    "first-block": lambda pipe: FirstBlockCacheConfig(threshold=1e9),
    "mag": lambda pipe: MagCacheConfig(threshold=1e9, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS,
                                       max_skip_steps=2, retention_ratio=0.2),
    "taylorseer": lambda pipe: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                     cache_identifiers=[r"blocks\.\d+"]),
    "pab": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep),
}


@pytest.mark.parametrize("cache", sorted(CACHES))
@torch.no_grad()
def test_diffusers_caches_and_rettn_both_act(cache):
    pipe = tiny_pipeline("wan", qk_gain=8.0)
    pipe.transformer.enable_cache(CACHES[cache](pipe))
    handle = rettn.apply_rettention(pipe, **SMALL)
    out = pipe(**kwargs()).frames
    rows, stats = self_rows(handle), handle.stats()
    handle.remove()
    pipe.transformer.disable_cache()
    assert torch.isfinite(out).all()
    assert stats.counts()["sparse"] > 0 and all(r["sparse"] > 0 or r["calls"] <= 2 for r in rows.values())
    every_call = STEPS * 2  # two CFG calls per step
    assert min(r["calls"] for r in rows.values()) < every_call  # the cache skipped work


@torch.no_grad()
def test_group_offload_and_model_cpu_offload():
    base_pipe = tiny_pipeline("wan", qk_gain=8.0)
    handle = rettn.apply_rettention(base_pipe, **SMALL)
    expected = base_pipe(**kwargs()).frames
    handle.remove()

    pipe = tiny_pipeline("wan", qk_gain=8.0)
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    onloads = []
    block = pipe.transformer.blocks[0]
    hook = block._diffusers_hook.get_hook("group_offloading")
    real = hook.fn_ref.pre_forward  # the hook chain calls the reference it was registered with
    hook.fn_ref.pre_forward = lambda module, *a, **k: (onloads.append(1), real(module, *a, **k))[1]
    handle = rettn.apply_rettention(pipe, **SMALL)
    out = pipe(**kwargs()).frames
    assert handle.stats().counts()["sparse"] > 0 and onloads  # both really ran
    handle.remove()
    torch.testing.assert_close(out, expected)

    pipe = tiny_pipeline("wan", qk_gain=8.0)
    pipe.enable_model_cpu_offload(device="cpu")
    handle = rettn.apply_rettention(pipe, **SMALL)
    out = pipe(**kwargs()).frames
    assert handle.stats().counts()["sparse"] > 0
    assert hasattr(pipe.transformer, "_hf_hook")  # accelerate's offload hook is on the model
    handle.remove()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["_native_math", "flex"])
@torch.no_grad()
def test_set_attention_backend_serves_the_dense_calls(backend, monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    # set_attention_backend also sets diffusers' process-wide active backend (reset_attention_backend
    # does not restore it): put it back after the test, or later tests run on this backend
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    name = AttentionBackendName(backend)
    calls = []
    real = _AttentionBackendRegistry._backends[name]
    monkeypatch.setitem(_AttentionBackendRegistry._backends, name,
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    pipe = tiny_pipeline("wan", qk_gain=8.0)
    pipe.transformer.set_attention_backend(backend)
    expected = pipe(**kwargs()).frames
    n_plain = len(calls)
    # every step dense: rettn's dense calls are the user's backend, bit for bit
    handle = rettn.apply_rettention(pipe, **{**SMALL, "warmup": STEPS})
    assert torch.equal(pipe(**kwargs()).frames, expected)
    stats = handle.stats()
    assert stats.counts() == {"dense": STEPS, "cache": 0, "sparse": 0}
    # rettn's dense calls (the self-attention ones, half of Wan's) run on the user's backend
    assert stats.dense_kernels == {f"diffusers:{backend}": n_plain // 2}
    if backend == "flex":  # the intercepted call is switched to native: only rettn's dense call counts
        assert len(calls) == n_plain + n_plain
    else:  # the model's call, whose SDPA rettn takes, and rettn's dense call through the same backend
        assert len(calls) == n_plain + n_plain + n_plain // 2
    handle.remove()
    # with sparse steps: the backend still serves the dense ones (warm-up and cross-attention)
    calls.clear()
    handle = rettn.apply_rettention(pipe, **SMALL)
    out = pipe(**kwargs()).frames
    stats = handle.stats()
    handle.remove()
    assert torch.isfinite(out).all() and stats.counts()["sparse"] > 0
    if backend == "flex":  # never calls torch's SDPA: switched to native for rettn's calls
        assert n_plain // 2 <= len(calls) < n_plain  # cross-attention and warm-up dense, the rest rettn's
    else:  # ends in torch's SDPA, where rettn takes the sparse calls; its dense ones use it too
        assert len(calls) == n_plain + sum(stats.dense_kernels.values())
        assert set(stats.dense_kernels) == {f"diffusers:{backend}"}
    assert pipe.transformer.blocks[0].attn1.processor._attention_backend == backend  # restored


@torch.no_grad()
def test_lora_adapter_and_rettn():
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe = tiny_pipeline("wan", qk_gain=8.0)
    handle = rettn.apply_rettention(pipe, **SMALL)
    without_lora = pipe(**kwargs()).frames
    handle.remove()
    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                            init_lora_weights=False))
    dense_lora = pipe(**kwargs()).frames
    handle = rettn.apply_rettention(pipe, **SMALL)
    out = pipe(**kwargs()).frames
    stats = handle.stats()
    handle.remove()
    assert torch.isfinite(out).all() and stats.counts()["sparse"] > 0
    assert not torch.equal(out, without_lora)  # the adapter changed q, k, v
    assert not torch.equal(out, dense_lora)  # and rettn ran sparse on top of it
    assert torch.equal(pipe(**kwargs()).frames, dense_lora)  # removed: the LoRA model as it was


def test_pipeline_reaches_vae_sdpa_untouched():
    # the VAE's own attention (outside any wrapped processor call) is torch's SDPA
    pipe = tiny_pipeline("pixart")
    assert any("Attention" in type(m).__name__ for m in pipe.vae.modules())
    handle = rettn.apply_rettention(pipe, **SMALL)
    images = pipe(**tiny_pipeline_kwargs("pixart", num_inference_steps=4, output_type="pt")).images
    rows = handle.describe().rows
    handle.remove()
    assert torch.isfinite(images).all()
    assert all(r["model"] == "transformer" for r in rows)  # the VAE was never patched
    assert isinstance(pipe.vae, diffusers.AutoencoderKL)


@torch.no_grad()
def test_embedded_pipeline_takes_diffusers_caches_alone_and_with_rettn():
    """rettn.tiny's pipeline wraps its transformer call in cache_context("cond_uncond"), as
    CogVideoXPipeline does: enable_cache works on it, and rettn reads that name as the CFG branch."""
    import rettn.tiny

    pipe = rettn.tiny.load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle moving right", num_inference_steps=6, height=16, width=16, num_frames=2,
                output_type="pt", generator=torch.Generator().manual_seed(0))
    plain = pipe(**call).frames
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))  # the setting: runs
    assert torch.isfinite(pipe(**{**call, "generator": torch.Generator().manual_seed(0)}).frames).all()
    pipe.transformer.disable_cache()

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # reuses after the first step
    handle = rettn.apply_rettention(pipe, keep=0.25, block_size=32, warmup=1, refresh_interval=2, min_seq_len=0)
    out = pipe(**{**call, "generator": torch.Generator().manual_seed(0)}).frames
    rows, stats, branches = self_rows(handle), handle.stats(), {key[1] for key in handle.engine.cache}
    handle.remove()
    pipe.transformer.disable_cache()
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert stats.counts()["sparse"] > 0 and branches == {"cond_uncond"}  # the pipeline's context name
    assert min(r["calls"] for r in rows.values()) < 6  # the cache skipped blocks (one batched CFG call a step)
    assert torch.equal(pipe(**{**call, "generator": torch.Generator().manual_seed(0)}).frames, plain)  # all removed
