"""What ``rettn calibrate`` writes: the preset YAML, the JSON report, the chart, the summary."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rettn.tools.args import CLIError


def _speedups(s) -> str:
    return ", ".join(f"{name} {x:.2f}x" for name, x in s.costs.items())


def summary(result) -> str:
    st = result.settings
    lines = [f"rettn calibrate: {st['layers']} sparse-eligible layers, {st['num_steps']} steps, "
             f"{len(st['prompts'])} prompt(s) x {len(st['seeds'])} seed(s), floor {st['floor_psnr']} dB; "
             f"{st['candidates']} candidates ranked by {st['ranked_by']}"]
    for name, model in result.costs.items():
        keeps = ", ".join(f"keep {k:g}: cache {model.cache[k]:.2f} sparse {model.sparse[k]:.2f}" for k in model.sparse)
        lines.append(f"  cost ({name}, {model.source}), x a dense step: {keeps}")
    lines.append("  counted density per keep: " + ", ".join(
        f"{k}: {d:.4f} ({1 - d:.1%} sparse)" for k, d in st["densities"].items()))
    if result.hand is not None and result.hand.confirmed:
        h = result.hand
        lines.append(f"  hand preset {result.base_preset or '(config)'} ({h.candidate.label()}): "
                     f"min PSNR {h.confirmed['psnr_min']:.2f} dB, predicted {_speedups(h)}")
    for s in result.confirmed:
        c = s.confirmed
        lines.append(f"  {'HOLDS' if c['holds'] else 'fails'}  {s.candidate.label()}"
                     f"{' (dense layers ' + str(list(s.dense_layers)) + ')' if s.dense_layers else ''}"
                     f"{' (R per layer ' + str(s.layer_residual) + ')' if s.layer_residual else ''}: "
                     f"min PSNR {c['psnr_min']:.2f} dB, density {c['density']:.4f}, predicted {_speedups(s)}")
    if result.chosen is not None:
        lines.append(f"chosen: {result.chosen.candidate.label()}; predicted whole-run speedup {_speedups(result.chosen)}")
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _cfg_dict(config) -> dict:
    out = dataclasses.asdict(config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def report(result) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": result.settings,
        "base_preset": result.base_preset,
        "sparse_pays": result.sparse_pays,
        "cost_models": {name: m.as_dict() for name, m in result.costs.items()},
        "hand_preset": result.hand.as_dict() if result.hand is not None else None,
        "chosen": result.chosen.as_dict() if result.chosen is not None else None,
        "config": _cfg_dict(result.config) if result.config is not None else None,
        "confirmed": [s.as_dict() for s in result.confirmed],
        "candidates": [s.as_dict() for s in result.scored],
        "notes": result.notes,
    }


def preset_yaml(result) -> str:
    import yaml

    if result.config is None:
        raise CLIError("calibration chose no schedule (see the notes): no preset to write")
    st = result.settings
    chosen = result.chosen
    family = _family(result)
    if chosen is not None:
        head = [f"# Written by rettn calibrate on {time.strftime('%Y-%m-%d')}: the cheapest schedule found whose",
                f"# generations kept PSNR >= {st['floor_psnr']} dB against dense on {len(st['prompts'])} prompt(s) x "
                f"{len(st['seeds'])} seed(s) at {st['num_steps']} steps, ranked by {st['ranked_by']}."]
    else:
        head = [f"# Written by rettn calibrate on {time.strftime('%Y-%m-%d')}: no schedule is predicted faster than",
                f"# dense ({st['ranked_by']}), so attention stays dense (min_seq_len above the sequence)."]
    data = {"family": family, "tuned": True,
            "notes": (f"calibrated: {chosen.candidate.label()}; min PSNR {chosen.confirmed['psnr_min']:.2f} dB; "
                      f"predicted speedup {_speedups(chosen)}" if chosen is not None else "; ".join(result.notes)),
            "config": _cfg_dict(result.config)}
    return "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False)


def _family(result):
    from rettn.core.config import load_preset
    from rettn.errors import ConfigError

    try:
        return load_preset(result.base_preset).get("family") if result.base_preset else None
    except ConfigError:  # a preset file that moved: the family is only informative
        return None


def plot(result, path) -> str | None:
    """Predicted cost against PSNR (confirmed) and against predicted attention error (every
    candidate); the hand preset and the chosen schedule marked. A note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart written"
    name = next(iter(result.costs)) if "flops" not in result.costs else "flops"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [s.costs[name] for s in result.scored]
    a2.scatter(xs, [s.error for s in result.scored], s=6, alpha=0.35, label="candidates (predicted)")
    conf = [s for s in result.confirmed if s.confirmed]
    a1.scatter([s.costs[name] for s in conf], [s.confirmed["psnr_min"] for s in conf], label="confirmed")
    for s, marker, label in ((result.hand, "s", "hand preset"), (result.chosen, "*", "chosen")):
        if s is not None and s.confirmed:
            a1.scatter([s.costs[name]], [s.confirmed["psnr_min"]], marker=marker, s=160, label=label)
            a2.scatter([s.costs[name]], [s.error], marker=marker, s=160, label=label)
    a1.axhline(result.settings["floor_psnr"], color="k", linestyle="--", linewidth=1, label="floor")
    a1.set_xlabel(f"predicted whole-run speedup ({name})")
    a1.set_ylabel("min PSNR vs dense (dB)")
    a2.set_xlabel(f"predicted whole-run speedup ({name})")
    a2.set_ylabel("predicted mean attention error")
    a2.set_yscale("log")
    for ax in (a1, a2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("rettn calibrate: cost vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(result, path) -> list:
    """Preset (when one was chosen), report and chart; returns the paths written (and notes)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise CLIError(f"--out must name a .yaml file, got '{path}'")
    written = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if result.config is not None:
            path.write_text(preset_yaml(result))
            written.append(str(path))
        report_path = path.with_suffix(".json")
        report_path.write_text(json.dumps(report(result), indent=1, default=str))
        written.append(str(report_path))
        note = plot(result, path.with_suffix(".png"))
        written.append(note or str(path.with_suffix(".png")))
    except OSError as e:
        raise CLIError(f"cannot write '{path}': {e.strerror or e}") from None
    return written
