"""The latency profiler (rettn profile / scripts/profile_latency.py) on CPU: the embedded tiny
model, shrunk random-weight architectures, the report's invariants, and bad input."""

import argparse
import json
import sys

import pytest
import torch

from rettn.tools.profile import archs
from rettn.tools.profile import baseline as dense_baseline
from rettn.tools.profile import dummy_inputs
from rettn.tools.profile import command
from rettn.tools.profile import kernels as kernel_level
from rettn.tools.profile.report import write_chart
from tiny_models import FAMILIES, tiny_inputs, tiny_shape, tiny_transformer

# Small and quick: the embedded model at 2 frames (512 video + 16 text tokens), 6 steps with
# dense 0-1, cache 2 and 5, sparse 3-4.
TINY_ARGS = ["--device", "cpu", "--steps", "6", "--warmup", "2", "--refresh-interval", "3", "--frames", "2",
             "--kernel-providers", "sdpa,dense_lse,rettn,rettn_rescaled", "--kernel-repeats", "2",
             "--density-sweep", "0.25"]
# CogVideoX-2B's real blocks (1 of 30), 1 latent frame of 8 x 8 tokens + 16 text tokens.
ARCH_ARGS = ["--device", "cpu", "--random-weights", "--arch", "cogvideox-2b", "--layers", "1", "--frames", "1", "--height", "128",
             "--width", "128", "--text-len", "16", "--batch", "1", "--steps", "4", "--warmup", "1",
             "--refresh-interval", "3", "--min-seq-len", "0", "--block-size", "16",
             "--kernel-providers", "sdpa,rettn", "--kernel-repeats", "2", "--density-sweep", "none"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


def _run(argv, tmp_path, name="p"):
    path = tmp_path / f"{name}.json"
    rc = command.main(argv + ["--json", str(path)])
    assert rc == 0
    return json.loads(path.read_text()), path


def _check_report(report):
    kinds = report["schedule"]["kinds"]
    for run in report["runs"]["rettn"]:
        assert [s["kind"] for s in run["steps"]] == kinds  # step kinds match the schedule
        for s in run["steps"]:
            regions = sum(s["regions"].values())
            assert 0 <= regions <= s["seconds"] + 1e-9  # regions add up to at most the step
            assert s["other"] == pytest.approx(s["seconds"] - regions)
            if s["kind"] != "dense":
                assert s["regions"]["attention"] > 0
        assert run["transformer_s"] <= run["total_s"] + 1e-9
    for run in report["runs"]["dense"]:
        assert len(run["steps"]) == report["steps"]
        assert all(s["regions"] == {} for s in run["steps"])
    summary = report["summary"]
    counts = report["schedule"]["counts"]
    rows = {r["label"]: r for r in summary["rows"]}
    assert rows["dense (no rettn)"]["steps_per_run"] == report["steps"]
    for kind, n in counts.items():
        if n:
            assert rows[f"rettn {kind}"]["steps_per_run"] == n
    run = summary["run"]
    assert run["speedup"] == pytest.approx(run["dense_s"] / run["rettn_s"])
    assert run["ceiling_s"] <= run["rettn_s"]
    assert report["warmup"]["excluded"] is True
    for key in ("device", "torch", "diffusers", "triton"):
        assert key in report["env"]
    assert "profile" in report["command"] or "pytest" in report["command"]
    _check_baseline(report)


def _check_baseline(report):
    """The dense baseline is named, and named next to every speedup."""
    b = report["dense_baseline"]
    on_cpu = report["env"]["device"] == "cpu"
    assert b["backend"] in (("cpu flash", "math") if on_cpu else ("cudnn", "flash", "efficient", "math"))
    assert b["describe"] == f"dense SDPA ({b['backend']})" and b["pinned"] is True
    assert b["verified"] is True  # PyTorch picks it at the shape inside the pinned context
    if b["source"] == "measured":  # the fastest of those timed at the model's attention shape
        assert b["backend"] in b["timings_ms"] and b["timings_ms"][b["backend"]] == min(b["timings_ms"].values())
    shape = report["kernels"].get("shape")
    if shape:
        assert {k: b["shape"][k] for k in shape} == shape  # measured at the shape the kernel table uses
    summary = report["summary"]
    assert summary["baseline"] == b["describe"] and summary["run"]["speedup_vs"] == b["describe"]
    assert all(r["speedup_vs"] == b["describe"] for r in summary["rows"])
    for r in report["kernels"].get("rows", []):
        assert r["sdpa_backend"] == b["backend"]
    for t in (report.get("targets") or {}).values():
        assert t["vs"] == b["describe"]


def test_profile_embedded_model(tmp_path, capsys):
    report, path = _run(TINY_ARGS, tmp_path, "tiny")
    _check_report(report)
    assert report["target"]["kind"] == "pipeline" and report["preset"] == "tiny-shapes"
    assert report["schedule"]["kinds"] == ["dense", "dense", "cache", "sparse", "sparse", "cache"]
    assert report["schedule"]["counts"] == {"dense": 2, "cache": 2, "sparse": 2}
    k = report["kernels"]
    assert k["shape"] == {"batch": 2, "heads": 4, "seq": 2 * 16 * 16 + 16, "head_dim": 32}
    assert [r["keep"] for r in k["rows"]] == [0.125, 0.25]
    for r in k["rows"]:
        assert 0 < r["density"] <= 1 and r["ms"]["sdpa"] > 0 and r["ms"]["rettn"] > 0
        assert r["rettn_vs_sdpa"] == pytest.approx(r["ms"]["sdpa"] / r["ms"]["rettn"])  # > 1: rettn faster
    assert 0 < report["summary"]["mean_density"] < 1
    chart = path.with_suffix(".png")
    assert report["chart"] == str(chart) and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "rettn sparse" in out and "ceiling" in out and "kernel level" in out
    vs = report["dense_baseline"]["describe"]  # e.g. "dense SDPA (cpu flash)"
    assert f"x vs {vs} | ceiling" in out and f"faster than a {vs} step" in out and f"a {vs} step" in out
    assert f"rettn vs sdpa ({report['dense_baseline']['backend']})" in out
    assert f"dense baseline: {vs}, measured fastest" in out


def test_profile_random_weights_arch(tmp_path):
    report, _ = _run(ARCH_ARGS + ["--no-chart"], tmp_path, "arch")
    _check_report(report)
    t = report["target"]
    assert t["kind"] == "random-weights" and t["class"] == "CogVideoXTransformer3DModel"
    assert t["layers"] == "1" and t["full_layers"] == "30" and t["grid"] == [1, 8, 8] and t["seq_len"] == 80
    assert t["full_size"] is False and "targets_note" in report and "targets" not in report
    assert report["preset"] == "cogvideox-2b" and report["config"]["keep"] == 0.03125
    assert report["kernels"]["shape"] == {"batch": 1, "heads": 30, "seq": 80, "head_dim": 64}
    assert report["chart"] is None


def test_profile_two_calls_per_step(tmp_path):
    """Wan runs CFG as two transformer calls per step: one step, two calls, no extra steps."""
    argv = ["--device", "cpu", "--random-weights", "--arch", "wan2.1-1.3b", "--layers", "1", "--frames", "5", "--height", "64",
            "--width", "64", "--text-len", "8", "--steps", "4", "--warmup", "1", "--refresh-interval", "3",
            "--min-seq-len", "0", "--block-size", "16", "--no-kernels", "--no-chart"]
    report, _ = _run(argv, tmp_path, "wan")
    _check_report(report)
    for mode in ("dense", "rettn"):
        assert [s["calls"] for s in report["runs"][mode][0]["steps"]] == [2, 2, 2, 2]
    assert report["kernels"] == {"skipped": "--no-kernels"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_on_cuda(tmp_path):
    """The GPU path: CUDA events, bf16, the Triton kernels, peak memory (the shrunk 2B arch)."""
    argv = ARCH_ARGS + ["--device", "cuda", "--block-size", "64", "--height", "256", "--width", "256",
                        "--kernel-providers", "sdpa,dense_lse,rettn,rettn_rescaled"]  # argparse: the last wins
    report, _ = _run(argv, tmp_path, "cuda")
    _check_report(report)
    assert report["timing"] == "CUDA events" and report["target"]["dtype"] == "bfloat16"
    b = report["dense_baseline"]
    assert b["source"] == "measured" and b["backend"] in ("cudnn", "flash", "efficient", "math")
    assert b["pytorch_default"] in ("cudnn", "flash", "efficient", "math")
    assert report["env"]["device_name"] and report["summary"]["peak_memory_bytes"]["rettn"] > 0
    assert report["kernels"]["rows"][0]["backend"] == "triton"


@pytest.mark.parametrize("name", archs.arch_names())
def test_arch_builds_and_runs(name):
    spec = archs.load_arch(name)
    assert spec.preset in __import__("rettn.core.config", fromlist=["x"]).preset_names()
    model = archs.build_transformer(spec, layers=1)
    config = archs.model_config(spec, layers=1)
    for key in spec.layer_keys:
        assert model.config[key] == min(1, spec.config[key])
    for key, value in config.items():  # every number of the file reached the model
        got = model.config[key]
        assert (tuple(got) if isinstance(got, list) else got) == value, key
    grid = (1, 4, 6) if spec.family in dummy_inputs.IMAGE_FAMILIES else (2, 4, 6)
    kwargs = dummy_inputs.forward_inputs(spec.family, model, batch=1, grid=grid, text_len=8, text_padding=0)
    with torch.no_grad():
        out = model(**kwargs)[0]
    assert out.shape[0] == 1 and torch.isfinite(out).all()


# Parameters of each full-size transformer, built on the meta device (no memory, no init): the
# public sizes are CogVideoX-2B/5B, FLUX.1 12B, HunyuanVideo 13B, PixArt-Sigma 0.6B, Wan 1.3B/14B.
FULL_SIZE_PARAMETERS = {
    "cogvideox-2b": 1_693_783_872, "cogvideox-5b": 5_570_283_072, "flux": 11_901_408_320,
    "hunyuanvideo": 12_821_012_544, "pixart-sigma": 610_856_096, "wan2.1-1.3b": 1_418_996_800,
    "wan2.1-14b": 14_288_491_584,
}


def test_arch_full_size_parameter_counts():
    assert sorted(FULL_SIZE_PARAMETERS) == archs.arch_names()
    for name, expected in FULL_SIZE_PARAMETERS.items():
        model = archs.build_transformer(archs.load_arch(name), device="meta", dtype=torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == expected, name
        kept = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
        assert bool(kept) == name.startswith("wan")  # Wan keeps its norms in fp32, like from_pretrained


def test_arch_default_shapes():
    """The full-size token counts the docs and presets quote."""
    def seq(name):
        spec = archs.load_arch(name)
        cfg = argparse.Namespace(**spec.config)
        return dummy_inputs.sequence_length(spec.family, cfg, spec.token_grid(), spec.shape.text_len)

    assert archs.load_arch("cogvideox-2b").token_grid() == (13, 30, 45)
    assert seq("cogvideox-2b") == seq("cogvideox-5b") == 17776
    assert seq("wan2.1-1.3b") == 21 * 30 * 52 and seq("wan2.1-14b") == 75600
    assert seq("hunyuanvideo") == 33 * 45 * 80 + 256
    assert seq("pixart-sigma") == 4096 and seq("flux") == 4096 + 512
    assert archs.load_arch("cogvideox-2b").shape.batch == 2
    assert archs.load_arch("wan2.1-14b").shape.calls_per_step == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_dummy_inputs_match_tiny_inputs(family):
    """rettn.tools.profile.dummy_inputs is the package's port of tests/tiny_models.tiny_inputs: same tensors."""
    model = tiny_transformer(family)
    shape = tiny_shape(family)
    ref = tiny_inputs(family, model, batch=2, seed=3, t=250.0)
    got = dummy_inputs.forward_inputs(family, model, batch=2, seed=3, grid=shape.grid, text_len=13, t=250.0)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, (tuple, list)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    assert ref.keys() == got.keys()
    for key in ref:
        assert same(ref[key], got[key]), key
    again = dummy_inputs.set_timestep(dict(got), family, 250.0)["timestep"]
    assert same(ref["timestep"], again)


def test_chart_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    note = write_chart({"summary": {}, "target": {"description": "x"}}, tmp_path / "c.png")
    assert "matplotlib is not installed" in note and not (tmp_path / "c.png").exists()


def test_register_adds_profile_subcommand():
    parser = argparse.ArgumentParser(prog="rettn")
    sub = parser.add_subparsers(dest="command", required=True)
    command.register(sub)
    args = parser.parse_args(["profile", "--random-weights", "--arch", "flux", "--layers", "2", "--steps", "3"])
    assert args.command == "profile" and args.handler is command.run
    assert args.random_weights and args.arch == "flux" and args.layers == 2 and args.steps == 3


@pytest.mark.parametrize("argv, message", [
    (["--arch", "cogvideox-2b"], "add --random-weights"),
    (["--random-weights"], "needs --arch"),
    (["--random-weights", "--arch", "cogvideox-9b"], "unknown architecture"),
    (["--random-weights", "--arch", "cogvideox-2b", "--frames", "6"], "4k + 1"),
    (["--random-weights", "--arch", "flux", "--height", "1000"], "multiple of 16"),
    (["--random-weights", "--arch", "cogvideox-2b", "--model", "x/y"], "use one"),
    (["--layers", "2"], "--random-weights only"),
    (["--preset", "no-such-preset"], "unknown preset"),
    (["--keep", "1.5"], "(0, 1]"),
    (["--kernel-providers", "sdpa,cudnn"], "unknown kernel provider"),
    (["--density-sweep", "0.1,abc"], "--density-sweep"),
    (["--model", "./no/such/folder"], "neither an existing folder"),
    (["--frames", "2", "--warmup", "0.5", "--refresh-interval", "2.5", "--steps", "2"], "refresh_interval"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU"),
                                            (["--dense-backend", "cudnn"], "needs CUDA")]))
def test_bad_input_one_line_exit_2(argv, message, capsys, tmp_path):
    rc = command.main(argv + ["--json", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("rettn: error: ") and message in err[0], err
    assert not (tmp_path / "x.json").exists()


def test_argument_syntax_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        command.main(["--steps", "0"])
    assert e.value.code == 2


@pytest.mark.parametrize("family", dummy_inputs.FAMILIES)
def test_dummy_inputs_follow_the_family_row(family):
    """The profiler's inputs read the family table's facts (timestep scale and dtype, the text-mask
    argument, image or video, text in the sequence) instead of keeping their own lists."""
    from rettn.diffusers.families import FAMILIES as TABLE

    row = TABLE[family]
    ts = dummy_inputs.timestep_tensor(family, 1000.0, 2, dtype=torch.bfloat16)
    assert float(ts[0]) == row.timestep_scale
    assert ts.dtype == {"long": torch.long, "float32": torch.float32, "model": torch.bfloat16}[row.timestep_dtype]
    model = tiny_transformer(family)
    grid = tiny_shape(family).grid
    kwargs = dummy_inputs.forward_inputs(family, model, batch=2, grid=grid, text_len=13)
    masks = {k for k in kwargs if k.endswith("mask")}
    assert masks == ({row.text_mask_arg} if row.text_mask_arg else set())
    assert (grid[0] == 1) or not row.image
    seq = dummy_inputs.sequence_length(family, model.config, grid, 13)
    assert (seq > grid[0] * grid[1] * grid[2]) == (row.text is not None)


# ------------------------------------------------------------------ the dense baseline
def test_baseline_keeps_the_fastest_and_pins_it(monkeypatch):
    """auto times SDPA under each backend that runs at the shape and keeps the fastest; its
    context makes PyTorch pick it (here math, made 'fastest' by a stub timer)."""
    def fake_timer(fns, device, windows, warmup=2, **kw):
        assert set(fns) == {"cpu flash", "math"}
        return {n: {"median_s": 0.001 if n == "math" else 0.002} for n in fns}

    monkeypatch.setattr(kernel_level, "time_calls", fake_timer)
    b = dense_baseline.choose("auto", (1, 2, 64, 16), torch.float32, "cpu")
    assert b.source == "measured" and b.name == "math" and b.describe() == "dense SDPA (math)" and b.verified
    assert b.timings_ms == {"cpu flash": 2.0, "math": 1.0}
    q = torch.randn(1, 2, 64, 16)
    assert dense_baseline.default_pick(q, q, q) == torch.nn.attention.SDPBackend.FLASH_ATTENTION
    with b.context():
        assert dense_baseline.default_pick(q, q, q) == torch.nn.attention.SDPBackend.MATH
    assert dense_baseline.default_pick(q, q, q) == torch.nn.attention.SDPBackend.FLASH_ATTENTION  # restored
    assert b.to_json()["pytorch_default"] == "cpu flash"


def test_baseline_really_times_and_skips_math_beyond_its_limit(monkeypatch):
    b = dense_baseline.choose("auto", (1, 2, 64, 16), torch.float32, "cpu", windows=1)
    assert set(b.timings_ms) == {"cpu flash", "math"} and all(ms > 0 for ms in b.timings_ms.values())
    assert b.timings_ms[b.name] == min(b.timings_ms.values())
    monkeypatch.setattr(dense_baseline, "MATH_LIMIT_BYTES", 1024)
    b = dense_baseline.choose("auto", (1, 2, 64, 16), torch.float32, "cpu", windows=1)
    assert b.name == "cpu flash" and "score matrix" in b.skipped["math"] and set(b.timings_ms) == {"cpu flash"}


def test_baseline_named_and_default():
    named = dense_baseline.choose("math", (1, 1, 32, 16), torch.float32, "cpu")
    assert named.source == "named" and named.describe() == "dense SDPA (math)" and not named.timings_ms
    default = dense_baseline.choose("default", (1, 1, 32, 16), torch.float32, "cpu")
    assert default.backend is None and default.describe() == "dense SDPA (cpu flash, PyTorch's default pick)"
    with pytest.raises(Exception, match="--dense-backend must be one of"):
        dense_baseline.choose("fastest", (1, 1, 32, 16), torch.float32, "cpu")


def test_generate_names_its_dense_baseline():
    """rettn generate --compare's speedup says what the dense run attended with."""
    model = tiny_transformer("cogvideox")
    assert dense_baseline.default_description(model) == "dense SDPA (cpu flash, PyTorch's default pick)"
    assert dense_baseline.default_description(None) == "dense SDPA (PyTorch's default pick)"


def test_profile_dense_backend_default_is_unpinned(tmp_path):
    report, _ = _run(ARCH_ARGS + ["--no-chart", "--no-kernels", "--dense-backend", "default", "--warmup-runs", "0"],
                     tmp_path, "default")
    b = report["dense_baseline"]
    assert b["source"] == "default" and b["pinned"] is False and b["backend"] == "cpu flash"
    assert report["summary"]["run"]["speedup_vs"] == "dense SDPA (cpu flash, PyTorch's default pick)"
    assert any("1-step rettn run read the attention shape" in n for n in report["notes"])


def test_kernel_rows_reach_the_json_as_they_finish(tmp_path, monkeypatch):
    """A run cut during the kernel table keeps its step timings and the rows done so far."""
    real = command.kernel_table

    class Cut(Exception):
        pass

    def cut_after_first_row(*a, on_row=None, **kw):
        def row(table):
            on_row(table)
            raise Cut

        return real(*a, on_row=row, **kw)

    monkeypatch.setattr(command, "kernel_table", cut_after_first_row)
    path = tmp_path / "cut.json"
    with pytest.raises(Cut):
        command.main(ARCH_ARGS + ["--no-chart", "--density-sweep", "0.5", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["summary"]["run"]["speedup"] > 0 and report["runs"]["dense"]
    k = report["kernels"]
    assert len(k["rows"]) == 1 and k["partial"].startswith("1 of 2 keep ratios")
    assert k["sdpa_backend"] == report["dense_baseline"]["backend"]


def test_pinned_baseline_reaches_the_models_sdpa_calls():
    """timed_run's ``dense`` context is where the model's own SDPA calls run: pinned to math, no
    call reaches PyTorch's CPU flash kernel; pinned to flash, they do."""
    import contextlib

    from torch.nn.attention import SDPBackend
    from torch.utils._python_dispatch import TorchDispatchMode

    from rettn.tools.profile.runners import TransformerRunner, timed_run

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    model = tiny_transformer("cogvideox")
    runner = TransformerRunner(model, "cogvideox", tiny_inputs("cogvideox", model, batch=1))
    for backend, flash_calls in ((SDPBackend.MATH, False), (SDPBackend.FLASH_ATTENTION, True)):
        pin, ops = dense_baseline.DenseBaseline(backend, "cpu", "named"), Ops()

        def dense(pin=pin, ops=ops):
            stack = contextlib.ExitStack()
            stack.enter_context(pin.context())
            stack.enter_context(ops)
            return stack

        timed_run(runner, 1, torch.device("cpu"), dense=dense)
        assert ("aten._scaled_dot_product_flash_attention_for_cpu" in ops.names) is flash_calls
        assert ("aten._safe_softmax" in ops.names) is not flash_calls  # the math path's softmax
