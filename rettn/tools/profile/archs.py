"""Known model architectures (``configs/archs/<name>.yaml``): build the real diffusers transformer
of a model with random weights, at its real shapes, without downloading anything.

Each file holds the diffusers class name, its constructor config (the public ``config.json``
numbers; the file says where they come from), the default generation shape (pixels, VAE factors,
text tokens, CFG batch, transformer calls per step, steps) and the matching rettn preset.

    spec = load_arch("cogvideox-2b")
    model = build_transformer(spec, layers=2, device="cpu", dtype=torch.float32)
    grid = spec.token_grid()                     # (13, 30, 45) at 49 frames 720x480
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from importlib import resources

import torch

from rettn.errors import UsageError


def arch_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("rettn.configs.archs").iterdir()
                  if p.name.endswith(".yaml"))


@dataclass(frozen=True)
class Shape:
    """A generation's size in pixels and how it maps to tokens."""

    frames: int
    height: int
    width: int
    vae_temporal: int
    vae_spatial: int
    tokens_per_latent: tuple[int, int, int]
    text_len: int
    batch: int
    calls_per_step: int
    steps: int
    dtype: str


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_id: str
    family: str
    class_name: str
    preset: str
    config: dict
    layer_keys: tuple[str, ...]
    shape: Shape
    targets: dict = field(default_factory=dict)

    def token_grid(self, frames: int | None = None, height: int | None = None, width: int | None = None):
        """(frames, height, width) in tokens for a generation of that many pixel frames and
        pixels (defaults: the spec's shape); UsageError (a ValueError) when the sizes do not divide."""
        s = self.shape
        frames, height, width = frames or s.frames, height or s.height, width or s.width
        pt, ph, pw = s.tokens_per_latent
        if s.vae_temporal > 1:
            if (frames - 1) % s.vae_temporal:
                raise UsageError(
                    f"{self.name}: --frames must be {s.vae_temporal}k + 1 (the VAE compresses time "
                    f"{s.vae_temporal}x after the first frame), got {frames}"
                )
            latent_f = (frames - 1) // s.vae_temporal + 1
        else:
            if frames != 1:
                raise UsageError(f"{self.name} is an image model: --frames must be 1, got {frames}")
            latent_f = 1
        if latent_f % pt:
            raise UsageError(f"{self.name}: {latent_f} latent frames do not split into {pt}-frame patches")
        for label, px, p in (("height", height, ph), ("width", width, pw)):
            step = s.vae_spatial * p
            if px <= 0 or px % step:
                raise UsageError(f"{self.name}: --{label} must be a positive multiple of {step} pixels "
                                 f"(VAE {s.vae_spatial}x, patch {p}), got {px}")
        return latent_f // pt, height // (s.vae_spatial * ph), width // (s.vae_spatial * pw)

    def num_layers(self, config: dict | None = None) -> int:
        config = self.config if config is None else config
        return sum(int(config[k]) for k in self.layer_keys)


def load_arch(name: str) -> ArchSpec:
    import yaml

    if not isinstance(name, str) or name not in arch_names():
        raise UsageError(f"unknown architecture {name!r}; known: {arch_names()}")
    data = yaml.safe_load(resources.files("rettn.configs.archs").joinpath(f"{name}.yaml").read_text())
    shape = dict(data["shape"])
    shape["tokens_per_latent"] = tuple(shape["tokens_per_latent"])
    return ArchSpec(
        name=data["name"], model_id=data["model_id"], family=data["family"], class_name=data["class"],
        preset=data["preset"], config=dict(data["config"]), layer_keys=tuple(data["layer_keys"]),
        shape=Shape(**shape), targets=dict(data.get("targets") or {}),
    )


def model_config(spec: ArchSpec, layers: int | None = None, text_len: int | None = None) -> dict:
    """The constructor config, with ``layers`` blocks of each kind at most (``--layers``), and for
    CogVideoX without RoPE a sin-cos table sized for ``text_len`` text tokens."""
    config = dict(spec.config)
    for key in ("patch_size", "rope_axes_dim", "axes_dims_rope"):
        if isinstance(config.get(key), list):
            config[key] = tuple(config[key])
    if layers is not None:
        if layers < 1:
            raise UsageError(f"--layers must be >= 1, got {layers}")
        for key in spec.layer_keys:
            config[key] = min(int(config[key]), layers)
    if text_len is not None and spec.family == "cogvideox" and not config.get("use_rotary_positional_embeddings"):
        config["max_text_seq_length"] = text_len
    return config


def build_transformer(spec: ArchSpec, layers: int | None = None, *, device="cpu", dtype=torch.float32,
                      seed: int = 0, text_len: int | None = None) -> torch.nn.Module:
    """The real diffusers transformer of ``spec`` with seeded random weights, in eval mode.

    The weights are created (and randomly initialised, by the model's own init) directly on
    ``device`` in float32, then cast to ``dtype``: on a GPU a 5B model builds in seconds.
    """
    import diffusers

    cls = getattr(diffusers, spec.class_name, None)
    if cls is None:
        raise UsageError(f"diffusers {diffusers.__version__} has no {spec.class_name} (needed by {spec.name})")
    config = model_config(spec, layers, text_len)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise UsageError(f"{spec.name}: {spec.class_name} in diffusers {diffusers.__version__} does not "
                         f"take {unknown}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            model = cls(**config)
    cast_like_from_pretrained(model, dtype)
    return model.to(device).eval().requires_grad_(False)


def cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers to ``dtype`` in place, keeping the modules a diffusers
    class lists in ``_keep_in_fp32_modules`` (e.g. Wan's norms and time embedder) in float32, as
    ``from_pretrained(torch_dtype=...)`` does."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype in (torch.float16, torch.bfloat16) else ()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        if tensor.dtype != target:
            tensor.data = tensor.data.to(target)
