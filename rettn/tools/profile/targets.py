"""What ``rettn profile`` times: a real architecture's transformer with random weights, or a
pipeline (the embedded tiny model or a loaded one), each with its description for the report."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time

from rettn.errors import UsageError
from rettn.tools.profile.clocks import sync
from rettn.tools.profile.runners import PipelineRunner, TransformerRunner

EMBEDDED = "embedded"
EMBEDDED_PRESET = "tiny-shapes"
EMBEDDED_PROMPT = "a red circle moving right"


def with_heads(spec, heads: int | None):
    """``spec`` with ``heads`` attention heads (same head dim: a narrower model, e.g. for the GPU
    check's CPU rehearsal); ``spec`` itself when ``heads`` is None."""
    if heads is None:
        return spec
    if "num_attention_heads" not in spec.config:
        raise UsageError(f"--heads: {spec.name}'s config has no num_attention_heads")
    return dataclasses.replace(spec, config={**spec.config, "num_attention_heads": heads})


def setup_arch(args, device, dtype, notes):
    from rettn.tools.profile import dummy_inputs
    from rettn.tools.profile.archs import build_transformer, load_arch, model_config

    full_heads = load_arch(args.arch).config.get("num_attention_heads")
    spec = with_heads(load_arch(args.arch), args.heads)
    grid = spec.token_grid(args.frames, args.height, args.width)
    text_len = args.text_len or spec.shape.text_len
    batch = args.batch or spec.shape.batch
    config = model_config(spec, args.layers, text_len)
    t0 = time.perf_counter()
    model = build_transformer(spec, args.layers, device=device, dtype=dtype, seed=args.seed, text_len=text_len)
    sync(device)
    build_s = time.perf_counter() - t0
    inputs = dummy_inputs.forward_inputs(spec.family, model, batch=batch, seed=args.seed, grid=grid,
                                         text_len=text_len, text_padding=0)
    seq = dummy_inputs.sequence_length(spec.family, model.config, grid, text_len)
    layers = "+".join(str(config[k_]) for k_ in spec.layer_keys)
    full = "+".join(str(spec.config[k_]) for k_ in spec.layer_keys)
    frames, height, width = args.frames or spec.shape.frames, args.height or spec.shape.height, args.width or spec.shape.width
    size = f"{frames} frames {width}x{height}" if frames > 1 else f"{width}x{height}"
    f, h, w = grid
    desc = (f"{spec.model_id} transformer ({spec.class_name}, random weights, {layers} of {full} blocks), "
            f"{size} -> {f}x{h}x{w} tokens, text {text_len}, attention seq {seq}, batch {batch} x "
            f"{spec.shape.calls_per_step} call(s) per step")
    full_size = (all(config[k_] == spec.config[k_] for k_ in spec.layer_keys) and args.heads in (None, full_heads)
                 and (frames, height, width) == (spec.shape.frames, spec.shape.height, spec.shape.width)
                 and text_len == spec.shape.text_len and batch == spec.shape.batch)
    target = {"kind": "random-weights", "name": spec.name, "model_id": spec.model_id, "class": spec.class_name,
              "family": spec.family, "layers": layers, "full_layers": full, "grid": list(grid), "text_len": text_len,
              "seq_len": seq, "batch": batch, "calls_per_step": spec.shape.calls_per_step,
              "frames": frames, "height": height, "width": width, "full_size": bool(full_size),
              "build_s": build_s, "description": desc,
              "parameters": sum(p.numel() for p in model.parameters())}
    runner = TransformerRunner(model, spec.family, inputs, spec.shape.calls_per_step)
    return runner, target, spec.preset, args.steps or spec.shape.steps, spec


@contextlib.contextmanager
def _quiet_loading():
    """No loading bars and no deprecation chatter while a pipeline loads (restored after)."""
    import warnings

    modules = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            modules.append(__import__(name, fromlist=["x"]))
        except ImportError:
            pass
    states = [(m.is_progress_bar_enabled(), m.get_verbosity()) for m in modules]
    for m in modules:
        m.disable_progress_bar()
        m.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for m, (bars, verbosity) in zip(modules, states):
            m.set_verbosity(verbosity)
            if bars:
                m.enable_progress_bar()


def setup_pipeline(args, device, dtype, notes):
    with _quiet_loading():
        return _load_pipeline(args, device, dtype, notes)


def _load_pipeline(args, device, dtype, notes):
    from rettn.tools.models import load_pipeline

    if args.model in (None, EMBEDDED):
        from rettn.tiny import load_default_pipeline

        try:
            pipe, weights = load_default_pipeline(device=str(device), dtype=dtype), "trained"
        except FileNotFoundError:
            from rettn.tiny.pipeline import build_pipeline

            from rettn.tools.profile.archs import cast_like_from_pretrained

            pipe, weights = build_pipeline(), "random"
            for part in (pipe.transformer, pipe.text_encoder):
                cast_like_from_pretrained(part, dtype)
            pipe = pipe.to(device)
            notes.append("the embedded model's weights are not in rettn/tiny/weights: profiling the same "
                         "architecture with random weights (the timings do not depend on the weights)")
        name, preset = EMBEDDED, EMBEDDED_PRESET
    else:
        pipe = load_pipeline(args.model, device=str(device), dtype=dtype)  # ModelLoadError: one line
        weights, name = "loaded", args.model
        from rettn.tools.models import default_preset

        preset = default_preset(pipe)
    pipe.set_progress_bar_config(disable=True)
    params = inspect.signature(pipe.__call__).parameters
    kwargs = {"prompt": args.prompt or EMBEDDED_PROMPT}
    if "output_type" in params:
        kwargs["output_type"] = "np"
    for flag, pname in (("frames", "num_frames"), ("height", "height"), ("width", "width")):
        value = getattr(args, flag)
        if value is None:
            continue
        if pname not in params:
            raise UsageError(f"--{flag} does not apply to {type(pipe).__name__}")
        kwargs[pname] = value
    default_steps = params["num_inference_steps"].default if "num_inference_steps" in params else None
    steps = args.steps or (default_steps if isinstance(default_steps, int) else 30)
    shape = ", ".join(f"{k_} {v}" for k_, v in kwargs.items() if k_ in ("num_frames", "height", "width"))
    desc = (f"{'embedded tiny model' if name == EMBEDDED else name} ({type(pipe).__name__}, {weights} weights, "
            f"{type(pipe.transformer).__name__}), whole pipeline{', ' + shape if shape else ' at its default size'}, "
            f"prompt {kwargs['prompt']!r}")
    target = {"kind": "pipeline", "name": name, "pipeline": type(pipe).__name__,
              "class": type(pipe.transformer).__name__, "weights": weights, "call": {k_: v for k_, v in kwargs.items()},
              "full_size": False, "description": desc,
              "parameters": sum(p.numel() for p in pipe.transformer.parameters())}
    return PipelineRunner(pipe, kwargs), target, preset, steps, None

