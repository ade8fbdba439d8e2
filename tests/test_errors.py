"""The bad-input sweep: user-facing failures that no other test file checks.

API errors: the exception type and its message. Command line errors (``rettn generate / eval /
profile``): exit code 2 and exactly one line ``rettn: error: ...`` on stderr; the parser's own
errors: SystemExit(2) and the same one line, ending with ``(see rettn <command> --help)``.
``docs/errors.md`` lists every user-facing failure with the test that checks it.
"""

import functools
import importlib
import sys

import numpy as np
import pytest
import torch
from conftest import DEVICE
from helpers import qkv
from tiny_models import tiny_inputs, tiny_pipeline, tiny_transformer

import rettn
from rettn import BlockSparseLayout, RettnConfig
from rettn.ops import selection
from rettn.tools.cli import main
from rettn.diffusers.processor import RettnProcessor

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# ============================================================================ helpers
def cli_error(argv, capsys) -> str:
    """Run the CLI in-process; assert exit code 2 and one stderr line; return that line."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert err.startswith("rettn: error: ") and err.count("\n") == 1, err
    return err.strip()


def argparse_error(argv, capsys) -> str:
    """The parser's own errors: SystemExit(2), one line ``rettn: error: ... (see rettn <command>
    --help)``; return that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("rettn: error: ") and err.count("\n") == 1, err
    command = next((a for a in argv if not a.startswith("-")), None)
    assert err.endswith(f"(see rettn{' ' + command if command else ''} --help)\n"), err
    return err.strip()


@pytest.fixture(scope="module")
def image_pipeline_folder(tmp_path_factory):
    """A saved tiny PixArt pipeline: an image model that takes no --frames, loaded with --model."""
    folder = tmp_path_factory.mktemp("pixart")
    tiny_pipeline("pixart").save_pretrained(folder)
    return folder


# ============================================================================ configuration
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), "block_size must be a positive integer, got 0"),
        (dict(block_size=64.0), "block_size must be a positive integer, got 64.0"),
        (dict(reselect="always"), r"reselect must be one of \('cache', 'step'\), got 'always'"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive integer or None, got 0"),
        (dict(ramp=-0.1), r"ramp \(the paper's lambda\) must be a finite number >= 0, got -0.1"),
        (dict(use_rho="no"), "use_rho must be True or False, got 'no'"),
        (dict(dense_conditioning=1), "dense_conditioning must be True or False, got 1"),
        (dict(min_seq_len=-1), "min_seq_len must be an integer >= 0, got -1"),
        (dict(residual_device="cuda"), "residual_device must be None or 'cpu', got 'cuda'"),
        (dict(max_cache_bytes=-5), "max_cache_bytes must be >= 0, got -5"),
        (dict(max_cache_bytes=1.5), "max_cache_bytes must be a byte count or a size such as '8GB'"),
    ],
)
def test_config_field_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RettnConfig(**kwargs)


def test_replace_and_preset_overrides_are_validated():
    with pytest.raises(ValueError, match=r"unknown RettnConfig field\(s\) \['kep'\]; allowed: \["):
        RettnConfig().replace(kep=0.1)
    with pytest.raises(ValueError, match=r"keep must be a fraction in \(0, 1\], got 2"):
        RettnConfig.from_preset("flux", keep=2)
    with pytest.raises(ValueError, match=r"unknown RettnConfig field\(s\) \['kep'\]"):
        RettnConfig.from_preset("flux", kep=0.1)
    assert RettnConfig.from_preset("flux", keep=0.5).keep == 0.5  # a good override is taken


# ============================================================================ apply / remove
def test_config_and_preset_together():
    model = tiny_transformer("pixart")
    with pytest.raises(ValueError, match="pass either config or preset, not both"):
        rettn.apply_rettention(model, RettnConfig(), preset="pixart-alpha")
    assert not any(isinstance(p, RettnProcessor) for p in model.attn_processors.values())


def test_config_of_the_wrong_type():
    model = tiny_transformer("pixart")
    with pytest.raises(TypeError, match="config must be a RettnConfig, got dict"):
        rettn.apply_rettention(model, {"keep": 0.1})
    with pytest.raises(ValueError, match=r"unknown RettnConfig field\(s\) \['kep'\]"):
        rettn.apply_rettention(model, RettnConfig(), kep=0.1)  # overrides of a config are checked too
    assert not any(isinstance(p, RettnProcessor) for p in model.attn_processors.values())


def test_known_family_without_self_attention_modules():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.processor = lambda attn, x: x

        def set_processor(self, p):
            self.processor = p

    model = type("PixArtTransformer2DModel", (torch.nn.Module,), {})()  # a PixArt by name only
    model.attn = Attn()
    with pytest.raises(ValueError, match="found no self-attention modules to sparsify in PixArtTransformer2DModel"):
        rettn.apply_rettention(model)


@torch.no_grad()
def test_forward_without_timestep():
    model = tiny_transformer("pixart")
    inputs = tiny_inputs("pixart", model)
    inputs["timestep"] = None
    handle = rettn.apply_rettention(model, keep=0.5)
    try:
        with pytest.raises(ValueError, match=r"rettn needs the transformer's `timestep` argument to track steps; "
                                             r"PixArtTransformer2DModel.forward got none"):
            model(**inputs)
    finally:
        handle.remove()


@torch.no_grad()
def test_bare_transformer_with_a_fractional_schedule():
    # no step count: the fractions are read against the timestep's progress (no error); with
    # set_num_inference_steps they are fractions of the steps again
    model = tiny_transformer("pixart")
    handle = rettn.apply_rettention(model, keep=0.5, warmup=0.3, refresh_interval=2, block_size=32, min_seq_len=0)
    try:
        for t in (1000.0, 800.0, 600.0, 400.0, 200.0):  # progress 0, .2, .4, .6, .8
            assert torch.isfinite(model(**tiny_inputs("pixart", model, t=t))[0]).all()
        assert handle.stats().kinds() == ["dense", "dense", "cache", "sparse", "cache"]
        handle.set_num_inference_steps(10)
        for t in (1000.0, 900.0, 800.0, 700.0):
            model(**tiny_inputs("pixart", model, t=t))
        assert handle.stats().kinds() == ["dense", "dense", "dense", "cache"]
    finally:
        handle.remove()


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_set_num_inference_steps_rejects_non_positive_integers(n):
    handle = rettn.apply_rettention(tiny_transformer("pixart"), keep=0.5)
    try:
        with pytest.raises(ValueError, match=f"num_inference_steps must be a positive integer, got {n!r}"):
            handle.set_num_inference_steps(n)
    finally:
        handle.remove()


@torch.no_grad()
def test_frame_window_without_a_token_grid():
    from diffusers import Transformer2DModel  # no family row: the generic path cannot read a token grid

    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=1,
                               sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero").eval()
    with pytest.warns(UserWarning, match="generic path"):
        handle = rettn.apply_rettention(model, keep=0.25, pattern="frame_window", block_size=16, warmup=0,
                                        refresh_interval=2, min_seq_len=0)
    try:
        with pytest.raises(ValueError, match=r"pattern='frame_window' needs the token grid \(frames, height, "
                                             r"width\).*generic call; use pattern='topk' or 'window'"):
            model(torch.randn(1, 4, 16, 16), timestep=torch.tensor([900]), class_labels=torch.tensor([1]))
    finally:
        handle.remove()


# ============================================================================ attention ops
def test_qkv_must_be_floating_tensors():
    q, k, v = qkv(1, 2, 64, 16)
    layout = BlockSparseLayout.dense(64, 64, 16, 16)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        rettn.block_sparse_attention(q.tolist(), k, v, layout)
    with pytest.raises(TypeError, match=r"k must be a floating tensor \(fp16/bf16/fp32/fp64\), got torch.int64"):
        rettn.attention_with_lse(q, k.long(), v)


def test_qkv_must_agree_on_batch_heads_sequence_and_device():
    q, k, v = qkv(1, 2, 64, 16)
    layout = BlockSparseLayout.dense(64, 64, 16, 16)
    with pytest.raises(ValueError, match=r"q, k, v must agree on batch and heads, and k, v on sequence length: "
                                         r"got q \(1, 2, 64, 16\), k \(1, 1, 64, 16\)"):
        rettn.block_sparse_attention(q, k[:, :1], v, layout)
    with pytest.raises(ValueError, match="must agree on batch and heads, and k, v on sequence length"):
        rettn.attention_with_lse(q, k, v[:, :, :32])
    with pytest.raises(ValueError, match="q, k, v must be on one device, got cpu, meta, cpu"):
        rettn.attention_with_lse(q, k.to("meta"), v)


@pytest.mark.parametrize("scale, message", [
    ("abc", "scale must be a positive number, got 'abc'"),
    ([0.5], r"scale must be a positive number, got \[0.5\]"),
    (True, "scale must be a positive number, got True"),
    (0.0, "scale must be positive, got 0.0"),
])
def test_scale_must_be_a_positive_number(scale, message):
    q, k, v = qkv(1, 2, 64, 16)
    with pytest.raises(ValueError, match=message):
        rettn.block_sparse_attention(q, k, v, BlockSparseLayout.dense(64, 64, 16, 16), scale=scale)
    with pytest.raises(ValueError, match=message):
        rettn.attention_with_lse(q, k, v, scale=scale)
    out = rettn.block_sparse_attention(q, k, v, BlockSparseLayout.dense(64, 64, 16, 16), scale=np.float32(0.25))
    assert torch.allclose(out, rettn.attention_with_lse(q, k, v, scale=0.25)[0], atol=1e-5)  # numpy floats are fine


def test_empty_sequence():
    q, k, v = qkv(1, 2, 64, 16)
    with pytest.raises(ValueError, match="sequence lengths must be positive"):
        rettn.attention_with_lse(q, k[:, :, :0], v[:, :, :0])


def test_layout_on_another_device():
    q, k, v = qkv(1, 2, 64, 16)
    layout = BlockSparseLayout.dense(64, 64, 16, 16, device="meta")
    with pytest.raises(ValueError, match=r"layout is on meta but q is on cpu; move it with layout.to\(device\)"):
        rettn.block_sparse_attention(q, k, v, layout)


def test_triton_backend_rejects_dtype_and_head_dim():
    layout = BlockSparseLayout.dense(64, 64, 16, 16, device=DEVICE)
    q, k, v = qkv(1, 1, 64, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="the triton backend supports float16, bfloat16 and float32, "
                                         "not torch.float64"):
        rettn.block_sparse_attention(q, k, v, layout, backend="triton")
    q, k, v = qkv(1, 1, 64, 8, device=DEVICE)
    with pytest.raises(ValueError, match="the triton backend supports head dims 16 to 256, got 8"):
        rettn.block_sparse_attention(q, k, v, layout, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for CPU tensors")
def test_triton_backend_needs_cuda_tensors(monkeypatch):
    importlib.import_module("rettn.ops._triton")  # its @triton.jit runs at import: before the env change

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(1, 1, 64, 16)
    with pytest.raises(ValueError, match=r"the triton backend needs CUDA tensors \(or TRITON_INTERPRET=1 with CPU"):
        rettn.block_sparse_attention(q, k, v, BlockSparseLayout.dense(64, 64, 16, 16), backend="triton")


# ============================================================================ layouts
def test_layout_metadata_must_be_int32_tensors_of_the_right_shape():
    n = torch.ones(1, 1, 2, dtype=torch.int32)
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    sizes = dict(block_q=64, block_k=64, seq_q=128, seq_k=128)
    with pytest.raises(TypeError, match="kv_num_blocks and kv_indices must be torch tensors"):
        BlockSparseLayout([[[1, 1]]], idx, **sizes)
    with pytest.raises(ValueError, match=r"expected kv_num_blocks of shape \(B, H, nQ\) and kv_indices of shape "
                                         r"\(B, H, nQ, max_kv\), got \(1, 2\) and \(1, 1, 2, 1\)"):
        BlockSparseLayout(n[0], idx, **sizes)
    with pytest.raises(ValueError, match="kv_num_blocks and kv_indices must be on the same device"):
        BlockSparseLayout(n, idx.to("meta"), **sizes)
    with pytest.raises(ValueError, match="kv_indices must have at least one column"):
        BlockSparseLayout(n, idx[..., :0], **sizes)
    assert BlockSparseLayout(n, idx, **sizes).density() == pytest.approx(0.5)  # the good one builds


def test_from_dense_needs_a_4d_mask():
    with pytest.raises(ValueError, match=r"block_mask must be a 4-D \(B, H, nQ, nK\) tensor"):
        BlockSparseLayout.from_dense(torch.ones(1, 2, 2, dtype=torch.bool), 64, 64, 128, 128)


# ============================================================================ selection
def test_selection_needs_matching_4d_q_and_k():
    q, k, _ = qkv(1, 2, 64, 16)
    with pytest.raises(ValueError, match=r"q must be a 4-D \(batch, heads, seq, head_dim\) tensor, got shape "
                                         r"\(2, 64, 16\)"):
        selection.topk(q[0], k, keep=0.5, block_q=16)
    # not a tensor at all: TypeError, as block_sparse_attention says for the same input
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        selection.topk(q.tolist(), k, keep=0.5, block_q=16)
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got ndarray"):
        selection.topk_mass(q, k.numpy(), block_q=16)
    with pytest.raises(ValueError, match=r"q \(1, 2, 64, 16\) and k \(1, 1, 64, 16\) must agree on batch, heads "
                                         "and head_dim"):
        selection.topk_mass(q, k[:, :1], block_q=16)


def test_topk_mass_fractions():
    q, k, _ = qkv(1, 2, 64, 16)
    with pytest.raises(ValueError, match=r"mass must be a fraction in \(0, 1\], got 0"):
        selection.topk_mass(q, k, mass=0, block_q=16)
    with pytest.raises(ValueError, match=r"max_keep must be a fraction in \(0, 1\], got 2"):
        selection.topk_mass(q, k, max_keep=2, block_q=16)


@pytest.mark.parametrize("scale, message", [
    (-1.0, "scale must be positive, got -1.0"),
    (0, "scale must be positive, got 0.0"),
    ("abc", "scale must be a positive number, got 'abc'"),
])
def test_selection_scale_must_be_a_positive_number(scale, message):
    q, k, _ = qkv(1, 2, 64, 16)
    with pytest.raises(ValueError, match=message):
        selection.topk(q, k, keep=0.5, block_q=16, scale=scale)
    with pytest.raises(ValueError, match=message):
        selection.topk_mass(q, k, block_q=16, scale=scale)


@pytest.mark.parametrize("grid, message", [
    (5, "got 5"),
    ("abc", "got 'abc'"),
    ((4, 4), r"got \(4, 4\)"),
    (None, "got None"),
])
def test_frame_window_grid_must_be_three_integers(grid, message):
    with pytest.raises(ValueError, match=r"grid must be \(frames, height, width\) in tokens: three positive "
                                         r"integers, " + message):
        selection.frame_window(grid, keep=0.1)
    with pytest.raises(ValueError, match="width must be a positive integer, got 4.0"):
        selection.frame_window((2, 4, 4.0), keep=0.1)


def test_numpy_integers_are_taken_as_integers():
    a = selection.window(np.int64(64), keep=0.5, block_size=np.int64(16))
    assert a.seq_q == 64 and type(a.block_q) is int and type(a.seq_q) is int
    assert torch.equal(a.to_dense(), selection.window(64, keep=0.5, block_size=16).to_dense())
    b = selection.frame_window(np.array([2, 4, 4]), keep=0.5, block_size=np.int32(16), video_start=np.int64(8),
                               half_width=np.int64(2))
    assert torch.equal(b.to_dense(), selection.frame_window((2, 4, 4), keep=0.5, block_size=16, video_start=8,
                                                            half_width=2).to_dense())
    q, k, _ = qkv(1, 2, 64, 16)
    c = selection.topk(q, k, keep=0.5, block_q=np.int64(16), block_k=np.int16(16))
    assert type(c.block_k) is int and c.block_k == 16
    d = BlockSparseLayout.dense(np.int64(64), np.int64(64), np.int64(16), np.int64(16))
    assert (type(d.seq_q), type(d.block_q)) == (int, int)
    for bad in (np.int64(0), np.float64(16.0), np.bool_(True), True):
        with pytest.raises(ValueError, match="block_size must be a positive integer, got"):
            selection.window(64, keep=0.5, block_size=bad)


def test_window_and_frame_window_arguments():
    with pytest.raises(ValueError, match="seq_len must be a positive integer, got 0"):
        selection.window(0, keep=0.5, block_size=16)
    with pytest.raises(ValueError, match="video_start must be a non-negative integer, got -1"):
        selection.frame_window((2, 4, 4), keep=0.5, block_size=16, video_start=-1)
    with pytest.raises(ValueError, match="half_width must be a non-negative integer, got -2"):
        selection.frame_window((2, 4, 4), keep=0.5, block_size=16, half_width=-2)


def test_dense_spans_need_a_self_attention_layout():
    cross = BlockSparseLayout.dense(64, 128, 16, 16)
    with pytest.raises(ValueError, match=r"dense spans apply to self-attention layouts \(seq_q == seq_k\)"):
        selection.add_dense_spans(cross, [(0, 8)])
    q, _, _ = qkv(1, 1, 64, 16)
    _, k, _ = qkv(1, 1, 128, 16)
    with pytest.raises(ValueError, match="dense spans apply to self-attention layouts"):
        selection.topk(q, k, keep=0.5, block_q=16, dense_spans=[(0, 8)])


# ============================================================================ other helpers
def test_lpips_unavailable_is_a_runtime_error(monkeypatch):
    from rettn.tools.metrics import LPIPS

    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
    with pytest.raises(RuntimeError, match=r"LPIPS not available: the lpips package is not installed "
                                           r"\(pip install lpips\)"):
        LPIPS.load()


# ============================================================================ CLI: generate
FAST = ["--steps", "2", "--no-progress"]


def test_no_command(capsys):
    line = argparse_error([], capsys)
    assert line == "rettn: error: the following arguments are required: COMMAND (see rettn --help)"


@pytest.mark.parametrize("argv, message", [
    (["--frames", "0"], "argument --frames: expected a positive integer, got '0'"),
    (["--warmup", "abc"], "argument --warmup: expected a step count, a fraction or auto, got 'abc'"),
    (["--pattern", "diagonal"], "argument --pattern: invalid choice: 'diagonal'"),
    (["--keep", "lots"], "argument --keep: invalid float value: 'lots'"),
])
def test_generate_argument_type_errors(argv, message, capsys):
    line = argparse_error(["generate", "--prompt", "x"] + argv, capsys)
    assert message in line, line


def test_generate_empty_prompt(capsys):
    assert cli_error(["generate", "--prompt", "   "] + FAST, capsys) == "rettn: error: --prompt is empty"


def test_generate_prompts_file_without_prompts(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("\n   \n\n")
    line = cli_error(["generate", "--prompts", str(path)] + FAST, capsys)
    assert line == f"rettn: error: --prompts file '{path}' holds no prompt"


@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown device 'tpu'; use cpu or cuda"),
    ("meta", "unsupported device 'meta'; use cpu or cuda"),
])
def test_generate_unknown_device(device, message, capsys):
    assert cli_error(["generate", "--prompt", "x", "--device", device] + FAST, capsys) == "rettn: error: " + message


def test_generate_dense_with_a_preset(capsys):
    line = cli_error(["generate", "--prompt", "x", "--dense", "--preset", "flux"] + FAST, capsys)
    assert line == "rettn: error: --dense runs without rettn; drop the sparsity options (--preset)"


def test_generate_dense_with_sparsity_flags_names_them_as_typed(capsys):
    line = cli_error(["generate", "--prompt", "x", "--dense", "--keep", "0.1", "--block-size", "16", "--no-rho"] + FAST,
                     capsys)
    assert line == "rettn: error: --dense runs without rettn; drop the sparsity options (--keep, --block-size, --no-rho)"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""
    import rettn.tools.models

    def load_pipeline(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad output location was reported")

    monkeypatch.setattr(rettn.tools.models, "load_pipeline", load_pipeline)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x", "--out", "{file}/clip.gif"], "cannot write --out '{file}/clip.gif': '{file}' is not a folder"),
    (["--prompt", "x", "--out", "{file}/sub/clip.gif"],
     "cannot write --out '{file}/sub/clip.gif': '{file}' is not a folder"),
    (["--prompt", "x", "--out", "{dir}"], "cannot write --out '{dir}': it is a folder; give a file name"),
    (["--prompts", "{file}", "--out", "{file}/outs"], "cannot write --out '{file}/outs': '{file}' is not a folder"),
    (["--prompt", "x", "--json", "{file}/s.json"], "cannot write --json '{file}/s.json': '{file}' is not a folder"),
    (["--prompt", "x", "--json", "{dir}"], "cannot write --json '{dir}': it is a folder; give a file name"),
])
def test_generate_unwritable_output_fails_before_any_model_loads(argv, message, tmp_path, capsys, no_model_load):
    a_file = tmp_path / "a_file"
    a_file.write_text("a red circle moving right\n")
    argv = [a.format(file=a_file, dir=tmp_path) for a in argv]
    line = cli_error(["generate"] + argv + FAST, capsys)
    assert line == "rettn: error: " + message.format(file=a_file, dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written or created


def test_generate_creates_the_folders_of_out_and_json(tmp_path, capsys):
    out, summary = tmp_path / "new" / "clip.gif", tmp_path / "other" / "deeper" / "s.json"
    assert main(["generate", "--prompt", "x", "--out", str(out), "--json", str(summary)] + FAST) == 0
    assert out.is_file() and summary.is_file()


def test_generate_write_error_is_one_line(tmp_path, capsys, monkeypatch):
    import rettn.tools.media

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rettn.tools.media, "write", full_disk)
    out = tmp_path / "clip.gif"
    # a schedule with a sparse step at 2 steps (else a ScheduleWarning line comes first)
    line = cli_error(["generate", "--prompt", "x", "--out", str(out), "--warmup", "0", "--refresh-interval", "2"]
                     + FAST, capsys)
    assert line == f"rettn: error: cannot write --out '{out}': No space left on device"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_generate_triton_backend_without_cuda(capsys, monkeypatch, no_model_load):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = cli_error(["generate", "--prompt", "x", "--backend", "triton"] + FAST, capsys)
    assert line == ("rettn: error: --backend triton needs a CUDA device, but this run is on --device cpu: use "
                    "--device cuda on a machine with a GPU, or --backend torch or flex (or set TRITON_INTERPRET=1 "
                    "to run Triton's CPU interpreter)")


def test_triton_backend_check_follows_the_kernel_rule(monkeypatch):
    from rettn.ops import attention
    from rettn.tools.args import CLIError, check_backend

    if not attention.triton_installed():
        with pytest.raises(CLIError, match=r"--backend triton needs the triton package \(pip install triton\)"):
            check_backend("triton", torch.device("cpu"))
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel runs CPU tensors in Triton's interpreter
    check_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(CLIError, match="--backend triton needs a CUDA device, but this run is on --device cpu"):
        check_backend("triton", torch.device("cpu"))
    check_backend("torch", torch.device("cpu"))  # other backends run anywhere


def test_generate_rettn_errors_are_not_blamed_on_the_pipeline(capsys, monkeypatch):
    # a ValueError raised inside rettn's code during the pipeline call keeps its own message
    monkeypatch.setattr(selection, "topk", functools.partial(selection.topk, scale="abc"))
    line = cli_error(["generate", "--prompt", "x", "--pattern", "topk", "--warmup", "0",
                             "--refresh-interval", "2"] + FAST, capsys)
    assert line == "rettn: error: scale must be a positive number, got 'abc'"
    # the pipeline's own checks are still labelled as such
    line = cli_error(["generate", "--prompt", "x", "--height", "31"] + FAST, capsys)
    assert line.startswith("rettn: error: TinyVideoPipeline rejected the request: height must be")


def test_generate_model_folder_problems(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text("{not json")
    line = cli_error(["generate", "--prompt", "x", "--model", str(folder)] + FAST, capsys)
    assert line.startswith(f"rettn: error: '{folder / 'model_index.json'}' is not readable JSON: ")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0")
    line = cli_error(["generate", "--prompt", "x", "--model", str(a_file)] + FAST, capsys)
    assert line == (f"rettn: error: '{a_file}' is not a diffusers pipeline folder (no model_index.json in it)")


def test_generate_prompts_with_a_file_as_out(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving right\n")
    out = tmp_path / "clip.gif"
    line = cli_error(["generate", "--prompts", str(prompts), "--out", str(out)] + FAST, capsys)
    assert line == f"rettn: error: with --prompts, --out is a folder, not a file ('{out}')"
    assert not out.exists()


def test_generate_mp4_without_imageio_ffmpeg(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import imageio_ffmpeg -> ImportError
    out = tmp_path / "clip.mp4"
    line = cli_error(["generate", "--prompt", "x", "--out", str(out)] + FAST, capsys)
    assert line == "rettn: error: writing MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); or use .gif"
    assert not out.exists()


def test_generate_bad_schedule_value(tmp_path, capsys):
    line = cli_error(["generate", "--prompt", "x", "--warmup", "1.5", "--out", str(tmp_path / "c.gif")] + FAST, capsys)
    assert line.startswith("rettn: error: warmup must be a step count (int >= 0) or a fraction of the steps")


@pytest.mark.parametrize("argv, message", [
    (["--frames", "2", "--out", "{dir}/o.png"], "--frames does not apply to PixArtAlphaPipeline"),
    (["--out", "{dir}/o.gif"], "cannot write an image to '{dir}/o.gif': use one of .png, .jpg, .jpeg"),
])
def test_generate_option_the_pipeline_does_not_take(image_pipeline_folder, tmp_path, argv, message, capsys):
    argv = [a.format(dir=tmp_path) for a in argv]
    line = cli_error(["generate", "--prompt", "x", "--model", str(image_pipeline_folder)] + argv + FAST, capsys)
    assert line == "rettn: error: " + message.format(dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


# ============================================================================ CLI: eval
@pytest.mark.parametrize("argv, message", [
    (["--methods", "rettn-topk", "magic"], "unknown method(s) ['magic']; choose from ['sparse-window', "),
    (["--preset", "nope"], "unknown preset 'nope'; available presets: ["),
    (["--prompts", "{dir}/missing.txt"], "--prompts file '{dir}/missing.txt' does not exist"),
    (["--prompts", "{dir}/empty.txt"], "--prompts file '{dir}/empty.txt' holds no prompt"),
    (["--model", "/no/such/folder"], "'/no/such/folder' is neither an existing folder nor a Hub id"),
] + ([] if torch.cuda.is_available() else [
    (["--device", "cuda"], "--device cuda was asked for, but torch sees no CUDA GPU on this machine")]))
def test_eval_bad_input(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = [a.format(dir=tmp_path) for a in argv]
    line = cli_error(["eval", "--no-progress"] + argv, capsys)
    assert line.startswith("rettn: error: " + message.format(dir=tmp_path)), line
    assert not (tmp_path / "eval_results").exists()


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "unknown device 'tpu'; use cpu or cuda"),
    (["--device", "meta"], "unsupported device 'meta'; use cpu or cuda"),
    (["--out-dir", "{file}/ev"], "cannot write --out-dir '{file}/ev': '{file}' is not a folder"),
    (["--out-dir", "{file}"], "cannot write --out-dir '{file}': '{file}' is not a folder"),
])
def test_eval_device_and_out_dir_fail_before_any_model_loads(argv, message, tmp_path, capsys, no_model_load):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    line = cli_error(["eval", "--no-progress"] + [a.format(file=a_file) for a in argv], capsys)
    assert line == "rettn: error: " + message.format(file=a_file)


@pytest.mark.parametrize("argv, message", [
    (["--block-size", "0"], "argument --block-size: expected a positive integer, got '0'"),
    (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["--seeds", "0", "-1"], "argument --seeds: expected a seed, an integer from 0 to 2**63 - 1, got '-1'"),
    (["--seeds", "x"], "argument --seeds: expected a seed, an integer from 0 to 2**63 - 1, got 'x'"),
    (["--keeps", "0.5", "0"], "argument --keeps: expected a fraction in (0, 1], got '0'"),
])
def test_eval_argument_type_errors(argv, message, capsys):
    line = argparse_error(["eval"] + argv, capsys)
    assert message in line, line


# ============================================================================ CLI: profile
@pytest.mark.parametrize("argv, message", [
    (["--random-weights", "--arch", "flux", "--prompt", "x"],
     "--prompt applies to pipelines; --random-weights runs the bare transformer"),
    (["--text-len", "8"], "--text-len applies to --random-weights only"),
    (["--heads", "2"], "--heads applies to --random-weights only"),
    (["--density-sweep", "0.5,2"], "--density-sweep values must be in (0, 1], got '0.5,2'"),
    (["--device", "tpu"], "unknown device 'tpu'; use cpu or cuda"),
])
def test_profile_bad_input(argv, message, tmp_path, capsys):
    line = cli_error(["profile"] + argv + ["--json", str(tmp_path / "x.json")], capsys)
    assert line == "rettn: error: " + message
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--json", "{file}/x.json"], "cannot write --json '{file}/x.json': '{file}' is not a folder"),
    (["--json", "{dir}"], "cannot write --json '{dir}': it is a folder; give a file name"),
    (["--chart", "{file}/c.png"], "cannot write --chart '{file}/c.png': '{file}' is not a folder"),
] + ([] if torch.cuda.is_available() else [
    (["--backend", "triton"], "--backend triton needs a CUDA device, but this run is on --device cpu: use --device "
                              "cuda on a machine with a GPU, or --backend torch or flex (or set TRITON_INTERPRET=1 "
                              "to run Triton's CPU interpreter)")]))
def test_profile_report_location_and_backend_fail_before_anything_runs(argv, message, tmp_path, capsys, monkeypatch,
                                                                      no_model_load):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [a.format(file=a_file, dir=tmp_path) for a in argv]
    line = cli_error(["profile", "--json", str(tmp_path / "x.json")] + argv, capsys)
    assert line == "rettn: error: " + message.format(file=a_file, dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_profile_option_the_pipeline_does_not_take(image_pipeline_folder, tmp_path, capsys):
    line = cli_error(["profile", "--model", str(image_pipeline_folder), "--frames", "2",
                      "--json", str(tmp_path / "x.json")], capsys)
    assert line == "rettn: error: --frames does not apply to PixArtAlphaPipeline"
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--min-seq-len", "-1"], "argument --min-seq-len: expected an integer >= 0, got '-1'"),
    (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
])
def test_profile_argument_type_errors(argv, message, capsys):
    line = argparse_error(["profile"] + argv, capsys)
    assert message in line, line



# ============================================================================ the table itself
def test_every_test_named_in_docs_errors_md_exists():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "errors.md").read_text()
    refs = set(re.findall(r"(tests/\w+\.py)::(\w+)", doc))
    assert len(refs) > 50
    missing = [f"{path}::{name}" for path, name in sorted(refs)
               if not (root / path).is_file() or not re.search(rf"^def {name}\(", (root / path).read_text(), re.M)]
    assert not missing, missing
    rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert rows and all("tests/" in line.split("|")[-2] for line in rows), "a table row names no test"
