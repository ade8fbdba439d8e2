"""One call makes a diffusers pipeline (or its transformer) sparse; one call undoes it.

How it plugs in, without replacing anything process-wide:

- every attention module of each patched transformer (a pipeline's ``transformer`` and, for Wan
  2.2, ``transformer_2``) gets its processor wrapped by a :class:`RettnProcessor` that keeps the
  original's call signature (``Attention.forward`` drops keyword arguments a processor does not
  declare; Wan, Flux and LTX pass them positionally) and delegates to it, so every family keeps
  its own projections, norms, RoPE and concatenation;
- around the wrapped call of a self-attention module, the wrapper enters :class:`_Intercept`, a
  ``torch.overrides.TorchFunctionMode``: it sees that call's ``F.scaled_dot_product_attention``
  (diffusers' ``dispatch_attention_fn`` reaches it too, with the native backends) and hands it to
  the engine. Torch function modes are per thread and last for the one call, so SDPA called
  anywhere else (a VAE, a text encoder, another thread or pipeline) is torch's own function,
  untouched; ``F.scaled_dot_product_attention`` is never rebound. A processor set to a backend
  that does not call torch's SDPA (``set_attention_backend("flash")``, ``"flex"``, ...) is
  switched to diffusers' native backend for the call, and rettn's dense calls go to the user's
  backend;
- every call is recorded with its decision: sparse, or dense with a reason (``handle.stats()``,
  ``handle.describe()``); a model none of whose attention reaches the engine is an error at its
  first call, not a dense run;
- the step and CFG branch come from the pipeline's own signals (its scheduler, diffusers'
  ``cache_context``; :mod:`rettn.diffusers.steps`), the timestep for a bare transformer; a forward hook
  folds each call's statistics and checks its outputs were finite. Both hooks run eagerly in a
  compiled model.

``handle.remove()`` restores the exact original processor objects and removes the hooks.
"""

from __future__ import annotations

import warnings

import torch

from rettn.core.config import RettnConfig
from rettn.errors import ConfigError, InputTypeError, StateError
from rettn.diffusers import families as fam
from rettn.diffusers.handle import Description, RettnHandle, plan
from rettn.diffusers.parallel import context_parallel
from rettn.diffusers.processor import RettnProcessor, attention_modules


def transformers_of(target) -> tuple[list, object]:
    """([(label, transformer), ...], pipeline or None) from a pipeline or a transformer model.
    A pipeline's denoisers are its components named ``transformer`` and ``transformer_<n>``."""
    components = getattr(target, "components", None)
    if isinstance(components, dict) and not isinstance(target, torch.nn.Module):
        found = [(name, m) for name, m in components.items()
                 if (name == "transformer" or name.startswith("transformer_")) and isinstance(m, torch.nn.Module)
                 and attention_modules(m)]
        if found:
            return sorted(found, key=lambda x: (x[0] != "transformer", x[0])), target
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module) and attention_modules(transformer):
        return [("transformer", transformer)], target
    if isinstance(target, torch.nn.Module) and attention_modules(target):
        return [("transformer", target)], None
    raise InputTypeError(
        "apply_rettention expects a diffusers pipeline with a `transformer` or a diffusers "
        f"transformer model (with attention processors), got {type(target).__name__}"
    )


def resolve_config(target, models, families, config, preset, overrides):
    if config is not None and preset is not None:
        raise ConfigError("pass either config or preset, not both")
    if config is not None and not isinstance(config, RettnConfig):
        raise InputTypeError(f"config must be a RettnConfig, got {type(config).__name__}")
    if config is not None:
        return (config.replace(**overrides) if overrides else config), None
    if preset is None:
        preset = fam.default_preset(families[0], models[0], target)
    if preset is not None:
        return RettnConfig.from_preset(preset, **overrides), preset
    return RettnConfig.from_dict(overrides), None


def _check_schedule_without_steps(config: RettnConfig, pipeline):
    if pipeline is None and config.num_inference_steps is None and isinstance(config.dense_final, int) \
            and config.dense_final > 0:
        raise ConfigError(
            f"dense_final={config.dense_final} counts steps from the end, so it needs the number of steps, "
            "which a bare transformer does not tell: apply rettn to the pipeline, or set "
            "RettnConfig(num_inference_steps=N) / handle.set_num_inference_steps(N), or give dense_final "
            "as a fraction (read against the timestep's progress)"
        )


def apply_rettention(target, config: RettnConfig | None = None, *, preset: str | None = None,
                     **overrides) -> RettnHandle:
    """Make a diffusers pipeline's (or transformer's) attention sparse with Re-ttention.

    Args:
        target: a diffusers pipeline (its ``transformer``, and ``transformer_2`` where it has
            one, are patched, under one schedule) or a transformer model.
        config: a :class:`RettnConfig`; or ``preset`` names a YAML preset in ``configs/``
            (``rettn.core.config.preset_names()``); keyword ``overrides`` replace single fields.
            With neither, the preset of the model's variant (``handle.preset`` says which; a
            model without one gets ``RettnConfig()``'s defaults).

    Returns a :class:`RettnHandle`; ``handle.remove()`` restores the model exactly.
    """
    models, pipeline = transformers_of(target)
    families = [fam.detect_family(m) for _, m in models]
    config, preset = resolve_config(target, [m for _, m in models], families, config, preset, overrides)
    for _, model in models:
        for module in attention_modules(model).values():
            if isinstance(module.processor, RettnProcessor):
                raise StateError(
                    f"rettn is already applied to this {type(model).__name__}; call remove() on the "
                    "first handle before applying it again"
                )
        context_parallel(getattr(model, "_parallel_config", None))  # ring attention: a clear error now
    _check_schedule_without_steps(config, pipeline)
    for family, (_, model) in zip(families, models):
        if family.generic:
            warnings.warn(fam.generic_warning(model), UserWarning, stacklevel=2)
    return RettnHandle(models, pipeline, config, families, preset)


def describe(target, config: RettnConfig | None = None, *, preset: str | None = None, **overrides) -> Description:
    """What :func:`apply_rettention` would do with ``target``, without patching it: the family,
    the preset, and each attention module's role and static decision. For a patched model,
    ``handle.describe()`` adds what each module's calls did."""
    models, pipeline = transformers_of(target)
    families = [fam.detect_family(m) for _, m in models]
    config, preset = resolve_config(target, [m for _, m in models], families, config, preset, overrides)
    rows = []
    for (label, model), family in zip(models, families):
        rows += [dict(model=label, **{k: v for k, v in r.items()}) for r in plan(model, family, config)]
    return Description(rows, [f.name for f in families], preset)
