#!/usr/bin/env python
"""The summary of scripts/gpu_check.sh: summary.json and one screen of text (summary.txt).

    python scripts/gpu_check_summary.py OUT WORK REHEARSE BUDGET START [--quiet | --env]

Reads what the steps left: WORK/steps.tsv (name, rc, milliseconds, cap), WORK/launches-*.json
(scripts/launch_log.py), WORK/env.json, and the reports in OUT. Imports no torch (it runs after
every step) except with ``--env``, which records the versions and the device once. The JSON has
the same keys in a GPU run and in the rehearsal (``--rehearse``); a value that a step did not
produce is null; keys a newer report adds are passed through or ignored, never required. The
profile numbers and the issue's targets come from scripts/gpu_check_numbers.py. The package
versions come from the installed metadata; diffusers from /tmp/site when the check installed it
there (on PYTHONPATH).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from gpu_check_numbers import LONG_CASE, PROFILE_KEYS, long_numbers, profile_numbers, targets  # noqa: F401 (scripts/)

STEPS = ("install", "bench", "select", "tests", "profile", "compile", "long")
TESTS_FILE = "tests.txt"
FILES = {"bench": "bench_attention.json", "profile": "profile-cogvideox-2b.json", "compile": "bench_compile.json",
         "long": "profile-long.json"}
BENCH_MS = ("sdpa", "sdpa_flash", "sdpa_cudnn", "flex", "flex_mask", "rettn", "rettn_lse", "rettn_rescaled",
            "dense_lse", "dense_lse_triton", "select")
BENCH_RATIOS = ("speedup_vs_sdpa", "speedup_vs_sdpa_with_select", "rescaled_speedup_vs_sdpa", "speedup_vs_flex",
                "flex_speedup_vs_sdpa", "dense_lse_vs_sdpa")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def environment(rehearse: bool) -> dict:
    """Versions (from the installed metadata) and, on a GPU run, the device (imports torch)."""
    import platform
    from importlib import metadata

    env = {"python": platform.python_version()}
    for name in ("torch", "triton", "diffusers"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "missing"
    env.update(cuda=None, device_name="cpu (rehearsal)", capability=None)
    if not rehearse:
        try:
            import torch

            env["cuda"] = torch.version.cuda
            if torch.cuda.is_available():
                env["device_name"] = torch.cuda.get_device_name(0)
                env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            else:
                env["device_name"] = "no CUDA device"
        except Exception as e:  # noqa: BLE001 - recorded, the check goes on
            env["device_name"] = f"unknown ({type(e).__name__}: {e})"
    return env


def _steps(work: Path) -> dict:
    out = {name: {"rc": None, "ok": False, "seconds": None, "cap_s": None, "timed_out": False, "ran": False}
           for name in STEPS}
    try:
        lines = (work / "steps.tsv").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        name, rc, ms, cap = line.split("\t")
        rc = int(rc)
        out[name] = {"rc": rc, "ok": rc == 0, "seconds": int(ms) / 1e3, "cap_s": int(cap),
                     "timed_out": rc in (124, 137), "ran": rc != 125}
    return out


def _bench(report) -> dict:
    if not report:
        return {"rows": [], "targets": None, "shape": None}
    a = report.get("args", {})
    rows = []
    known = {"seq", "keep", "density", "backend", "kv_blocks_per_row", "best_sdpa", "ms", "checks", "errors",
             *BENCH_RATIOS}
    for r in report.get("rows", []):
        ms = r.get("ms") or {}
        rows.append({"seq": r.get("seq"), "keep": r.get("keep"), "density": r.get("density"),
                     "backend": r.get("backend"), "kv_blocks_per_row": r.get("kv_blocks_per_row"),
                     "best_sdpa": r.get("best_sdpa"),
                     # the known columns (null when absent), then any column a newer benchmark adds
                     "ms": {**{k: ms.get(k) for k in BENCH_MS}, **{k: v for k, v in ms.items() if k not in BENCH_MS}},
                     **{k: r.get(k) for k in BENCH_RATIOS},
                     "extra": {k: v for k, v in r.items() if k not in known and isinstance(v, (int, float, str))},
                     "rettn_vs_flex_max_abs": (r.get("checks") or {}).get("rettn_vs_flex_max_abs"),
                     "errors": r.get("errors") or {}})
    shape = {k: a.get(k) for k in ("batch", "heads", "head_dim", "dtype", "block", "text_len")}
    targets = report.get("targets")
    if targets:
        targets = {k: (v if isinstance(v, dict) else {"value": v[0], "bound": v[1], "met": v[2]})
                   for k, v in targets.items()}
    return {"rows": rows, "targets": targets, "shape": shape}


def _tests(text: str | None) -> dict:
    out = {"passed": None, "failed": None, "skipped": None, "errors": None, "summary_line": None, "failures": []}
    if not text:
        return out
    lines = [line.strip("= ").strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error|errors|skipped)\b", line) and " in " in line:
            out["summary_line"] = line
            for key, pat in (("passed", "passed"), ("failed", "failed"), ("skipped", "skipped"),
                             ("errors", "errors?")):
                m = re.search(rf"(\d+) {pat}\b", line)
                out[key] = int(m.group(1)) if m else 0
            break
    out["failures"] = [line for line in lines if line.startswith(("FAILED ", "ERROR "))][:20]
    return out


def _compile(report) -> dict:
    out = {"median_s": None, "first_s": None, "ratios": None, "schedule": None, "layers": None, "seq": None}
    if not report:
        return out
    res = report.get("results", {})
    out.update(median_s={k: v.get("median_s") for k, v in res.items()},
               first_s={k: v.get("first_s") for k, v in res.items()}, ratios=report.get("ratios"),
               schedule=(report.get("schedule") or {}).get("counts"), layers=report.get("layers"),
               seq=report.get("seq"))
    return out


def key_text(key: dict) -> str:
    """One line per specialisation: dtype, head dim, then the constexprs (flags that are True by
    name, the rest as NAME=value) and warps/stages."""
    parts = [str(key.get("kernel")), str(key.get("dtype")), f"d{key.get('head_dim')}"]
    for name, value in key.items():
        if name in ("kernel", "dtype", "head_dim", "num_warps", "num_stages"):
            continue
        if value is True:
            parts.append(name)
        elif value is not False:
            parts.append(f"{name}={value}")
    parts += [f"w{key.get('num_warps')}", f"s{key.get('num_stages')}"]
    return " ".join(parts)


def _kernels(work: Path) -> dict:
    per_step, everything = {}, {}
    for name in STEPS:
        # one file per process (pytest-xdist workers write launches-tests-gwN.json)
        logs = [x for x in (_load(p) for p in sorted(work.glob(f"launches-{name}*.json"))) if x is not None]
        if not logs:
            per_step[name] = {"count": None, "compiled": None, "keys": [], "unmapped": [], "replay_errors": []}
            continue
        keys = sorted({key_text(k) for log in logs for k in log["kernels"]})
        for k in keys:
            everything.setdefault(k, []).append(name)
        counts = [v for log in logs for v in (log.get("compiled") or {}).values() if v is not None]
        per_step[name] = {"count": len(keys), "compiled": sum(counts) if counts else None, "keys": keys,
                          "unmapped": sorted({key_text(k) for log in logs for k in log.get("unmapped", [])}),
                          "replay_errors": sorted({e for log in logs for e in log.get("replay_errors", [])})}
    return {"per_step": per_step, "distinct": len(everything),
            "keys": [{"key": k, "steps": v} for k, v in sorted(everything.items())]}


def build(out: Path, work: Path, rehearse: bool, budget: int, start: int) -> dict:
    steps = _steps(work)
    tests_text = None
    try:
        tests_text = (out / TESTS_FILE).read_text(errors="replace")
    except OSError:
        pass
    summary = {
        "mode": "rehearse" if rehearse else "gpu",
        "complete": all(s["ran"] for s in steps.values()),
        "ok": all(s["ok"] for s in steps.values()),
        "budget_s": budget,
        "elapsed_s": int(time.time()) - start,
        "env": _load(work / "env.json"),
        "steps": steps,
        "bench": _bench(_load(out / FILES["bench"])),
        "tests": _tests(tests_text),
        "profile": profile_numbers(_load(out / FILES["profile"])),
        "compile": _compile(_load(out / FILES["compile"])),
        "long": long_numbers(_load(out / FILES["long"])),
        "kernels": _kernels(work),
        "files": sorted(p.name for p in out.iterdir() if p.is_file()) if out.is_dir() else [],
    }
    summary["targets"] = targets(summary)
    return summary


def _f(x, spec=".2f", unit=""):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "n/a" if x is None else str(x)
    return format(x, spec) + unit


def _status(step: dict) -> str:
    if step["rc"] is None:
        return "not run"
    if step["ok"]:
        return "ok"
    if step["timed_out"]:
        return "TIMEOUT"
    return "skipped" if step["rc"] == 125 else f"FAILED rc={step['rc']}"


def text(summary: dict) -> str:
    env = summary.get("env") or {}
    lines = [f"gpu_check ({summary['mode']}): {'all steps ok' if summary['ok'] else 'NOT all steps ok'}, "
             f"{summary['elapsed_s']} s of {summary['budget_s']} s | {env.get('device_name')} "
             f"(sm {env.get('capability')}), torch {env.get('torch')}, triton {env.get('triton')}, "
             f"diffusers {env.get('diffusers')}, python {env.get('python')}"]
    lines.append("steps: " + ", ".join(f"{n} {_status(s)} {_f(s['seconds'], '.0f', 's')}/{_f(s['cap_s'], 'd', 's')}"
                                       for n, s in summary["steps"].items()))
    b = summary["bench"]
    if b["rows"]:
        sh = b["shape"]
        lines.append(f"bench B={sh['batch']} H={sh['heads']} D={sh['head_dim']} {sh['dtype']} block {sh['block']} "
                     f"text {sh['text_len']}: ms per call (x = best SDPA / rettn)")
        lines.append("  seq    keep   density | sdpa  flash  cudnn |  flex  mask | rettn   +lse  rescl | dnslse dns-tri | select | x sdpa  x flex  flex~rettn")
        for r in b["rows"]:
            m = r["ms"]
            lines.append(f"  {_f(r['seq'], 'd'):<6s} {_f(r['keep'], '.4f')} {_f(r['density'], '.4f')}  | {_f(m['sdpa'])} {_f(m['sdpa_flash'])} "
                         f"{_f(m['sdpa_cudnn'])} | {_f(m['flex'])} {_f(m['flex_mask'])} | {_f(m['rettn'])} "
                         f"{_f(m['rettn_lse'])} {_f(m['rettn_rescaled'])} | {_f(m['dense_lse'])} "
                         f"{_f(m['dense_lse_triton'])} | {_f(m['select'])} | {_f(r['speedup_vs_sdpa'])}x "
                         f"{_f(r['speedup_vs_flex'])}x {_f(r['rettn_vs_flex_max_abs'], '.2g')}")
            more = {**{k: v for k, v in m.items() if k not in BENCH_MS}, **r["extra"]}
            if more:
                lines.append("    also: " + ", ".join(f"{k} {_f(v, '.4g')}" for k, v in more.items()))
            if r["errors"]:
                lines.append(f"    unavailable: {', '.join(r['errors'])}")
        for name, t in (b["targets"] or {}).items():
            lines.append(f"  bench's own target {name}: {_f(t.get('value'))} (bound {t.get('bound')}) "
                         f"{'met' if t.get('met') else 'NOT met'}")
    t = summary["tests"]
    lines.append(f"tests: {t['summary_line'] or 'no result'}")
    lines += [f"  {f}" for f in t["failures"][:6]]
    p = summary["profile"]
    if p["dense_step_ms"] is not None:
        lines.append(f"profile {p['shape']['seq_len']} tokens x {p['shape']['batch']}, {p['steps']} steps "
                     f"{p['schedule']}: dense step {_f(p['dense_step_ms'], '.1f')} ms, cache {_f(p['cache_step_ms'], '.1f')}, "
                     f"sparse {_f(p['sparse_step_ms'], '.1f')} (attention {_f(p['sparse_attention_ms'], '.1f')}) -> "
                     f"sparse step {_f(p['sparse_step_speedup'])}x; run {_f(p['run_dense_s'])} s -> "
                     f"{_f(p['run_rettn_s'])} s = {_f(p['run_speedup'])}x (ceiling {_f(p['ceiling_speedup'])}x), "
                     f"density {_f(p['mean_density'], '.4f')}")
        lines.append(f"  dense baseline {p['dense_backend'] or 'backend not named'}; rettn dense step "
                     f"{_f(p['rettn_dense_step_ms'], '.1f')} ms (attention {_f(p['dense_attention_ms'], '.1f')}); "
                     f"vs the faster dense step {_f(p['reference_dense_step_ms'], '.1f')} ms: cache "
                     f"{_f(p['cache_step_cost'])}x, sparse step ceiling {_f(p['sparse_step_ceiling_ms'], '.1f')} ms, "
                     f"reached {_f(p['sparse_step_vs_ceiling'])}" + (f"; kernels: {p['kernels_note']}" if p["kernels_note"] else ""))
    c = summary["compile"]
    if c["ratios"]:
        lines.append(f"compile ({c['layers']} blocks, {c['schedule']}): "
                     + ", ".join(f"{k} {v:.2f}x" for k, v in c["ratios"].items()))
    for arch, lc in summary["long"].items():
        lines.append(f"long {arch} {_f(lc['seq_len'], 'd')} tokens, {lc['layers']} blocks, {lc['steps']} steps "
                     f"{lc['schedule']}: {lc['status']}" + (f" ({lc['error']})" if lc["error"] else "")
                     + f"; dense baseline {lc['dense_backend'] or 'not named'}")
        if lc["dense_step_ms"] is not None:
            lines.append(f"  dense step {_f(lc['dense_step_ms'], '.0f')} ms (rettn dense {_f(lc['rettn_dense_step_ms'], '.0f')}, "
                         f"attention {_f(lc['dense_attention_share'], '.0%')}), cache {_f(lc['cache_step_ms'], '.0f')} "
                         f"= {_f(lc['cache_step_cost'])}x, sparse {_f(lc['sparse_step_ms'], '.0f')} = "
                         f"{_f(lc['sparse_step_speedup'])}x ({_f(lc['sparse_step_vs_ceiling'])} of its ceiling "
                         f"{_f(lc['sparse_step_ceiling_ms'], '.0f')} ms); run {_f(lc['run_dense_s'])} s -> "
                         f"{_f(lc['run_rettn_s'])} s = {_f(lc['run_speedup'])}x at the faster dense step "
                         f"({_f(lc['run_speedup_vs_baseline_run'])}x vs the baseline's run; ceiling {_f(lc['ceiling_speedup'])}x), "
                         f"density {_f(lc['mean_density'], '.4f')}")
        o = lc["offload"]
        if o:
            lines.append(f"  R in host memory: run {_f(o['run_s'])} s = {_f(o['run_cost'], '.3f')}x on-device rettn; cache step "
                         f"{_f(o['cache_step_ms'], '.0f')} ms ({_f(o['cache_step_cost'], '.3f')}x), sparse "
                         f"{_f(o['sparse_step_ms'], '.0f')} ms ({_f(o['sparse_step_cost'], '.3f')}x); peak memory saved "
                         f"{_f(o['peak_memory_saved_gib'], '.2f')} GiB")
    lines.append("targets (against the faster dense step of the same run):")
    for tg in summary["targets"]:
        verdict = "not measured" if tg["met"] is None else ("met" if tg["met"] else "NOT met")
        lines.append(f"  {tg['where']:<24s} {tg['name']:<36s} {_f(tg['value'], '.3f'):>6s} {tg['op']} {tg['bound']}: {verdict}")
    k = summary["kernels"]
    counts = ", ".join(f"{n} {s['count'] if s['count'] is not None else '-'}"
                       + (f" (compiled {s['compiled']})" if s["compiled"] is not None else "")
                       for n, s in k["per_step"].items() if n != "install")
    lines.append(f"Triton specialisations: {k['distinct']} distinct; per step: {counts}")
    if summary["mode"] == "rehearse":  # the list the GPU run will compile (mapped to its tiles)
        for item in k["keys"]:
            lines.append(f"  {item['key']}  [{', '.join(item['steps'])}]")
    for n, s in k["per_step"].items():
        if s["unmapped"] or s["replay_errors"]:
            lines.append(f"  {n}: {len(s['unmapped'])} launch(es) not mapped to the GPU; replay errors {s['replay_errors']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out, work, rehearse, budget, start = Path(argv[0]), Path(argv[1]), argv[2] == "1", int(argv[3]), int(argv[4])
    flags = set(argv[5:])
    if "--env" in flags:
        env = environment(rehearse)
        (work / "env.json").write_text(json.dumps(env, indent=1))
        print("env:", json.dumps(env))
    summary = build(out, work, rehearse, budget, start)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    screen = text(summary)
    (out / "summary.txt").write_text(screen + "\n")
    if not flags & {"--quiet", "--env"}:
        print(screen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
