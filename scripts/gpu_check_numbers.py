"""The numbers of scripts/gpu_check.sh's profile steps and the issue's targets, for
scripts/gpu_check_summary.py: the CogVideoX-2B profile (``rettn profile``'s JSON), the long
sequences (scripts/profile_long.py's JSON) and each target where it was measured. Imports no
torch; reads every key with ``.get`` (a newer report may add keys, a cut one may lack some)."""

from __future__ import annotations

# The targets (ratios against the fastest dense backend in the same run)
CACHE_STEP_MAX = 1.05  # a cache step costs at most this many dense steps, at every shape measured
SPARSE_VS_CEILING_MIN = 0.85  # a sparse step reaches this share of its ceiling (attention cut to the density)
KERNEL_VS_CEILING_MIN = 0.85  # the sparse kernel reaches this share of its 1/density ceiling
SELECT_MAX_MS = 0.3  # selection at the CogVideoX-2B shape, ms a call
RUN_MIN = 1.35  # CogVideoX-2B whole run, eager, paper schedule
COMPILED_RUN_MIN = 1.40  # compiled rettn vs compiled dense


def step_numbers(dense_step_s, rettn_dense_s, dense_attention_s, cache_s, sparse_s, density) -> dict:
    """The per-step ratios against the reference dense step: the faster of the dense baseline's
    step and rettn's own dense step (both dense attention; the faster backend is the baseline).
    The sparse step's ceiling is the reference step with its attention cut to the counted density."""
    steps = [x for x in (dense_step_s, rettn_dense_s) if x]
    ref = min(steps) if steps else None
    out = {"reference_dense_step_ms": None if ref is None else 1e3 * ref, "cache_step_cost": None,
           "sparse_step_speedup": None, "sparse_step_ceiling_ms": None, "sparse_step_vs_ceiling": None,
           "dense_attention_share": None}
    if ref is None:
        return out
    if dense_attention_s is not None and rettn_dense_s:
        out["dense_attention_share"] = dense_attention_s / rettn_dense_s
    if cache_s:
        out["cache_step_cost"] = cache_s / ref
    if sparse_s:
        out["sparse_step_speedup"] = ref / sparse_s
        if dense_attention_s is not None and density is not None:
            ceiling = ref - min(dense_attention_s, ref) * (1.0 - density)
            out["sparse_step_ceiling_ms"] = 1e3 * ceiling
            out["sparse_step_vs_ceiling"] = ceiling / sparse_s
    return out


def baseline_name(record, fallback=None) -> str | None:
    """The dense baseline as a report names it: ``rettn profile``'s ``dense_baseline`` record
    (``describe``: "dense SDPA (cudnn)", or its note when none was pinned), else ``fallback``."""
    if isinstance(record, dict):
        return record.get("describe") or (f"PyTorch's own SDPA order ({record['note']})" if record.get("note")
                                          else record.get("backend"))
    return record or fallback


PROFILE_KEYS = ("dense_step_ms", "rettn_dense_step_ms", "cache_step_ms", "sparse_step_ms", "sparse_attention_ms",
                "dense_attention_ms", "reference_dense_step_ms", "dense_attention_share", "sparse_step_speedup",
                "cache_step_cost", "sparse_step_ceiling_ms", "sparse_step_vs_ceiling", "run_dense_s", "run_rettn_s",
                "run_speedup", "ceiling_speedup", "mean_density", "dense_backend", "steps", "schedule", "shape",
                "kernel_rows", "kernels_note", "targets")


def profile_numbers(report) -> dict:
    """The CogVideoX-2B profile (``rettn profile``'s JSON; written before its kernel table, so a
    run cut there still has the step numbers). Row labels: the dense baseline is the row not
    named ``rettn ...``, whatever its label says about its backend."""
    out = dict.fromkeys(PROFILE_KEYS)
    if not report or not isinstance(report.get("summary"), dict):
        return out
    s = report["summary"]
    rows = s.get("rows") or []
    base = next((r for r in rows if not str(r.get("label", "")).startswith("rettn")), {})
    kind = {str(r.get("label", ""))[len("rettn "):]: r for r in rows if str(r.get("label", "")).startswith("rettn ")}

    def sec(row, field="mean_s"):
        return (row or {}).get(field)

    def ms(x):
        return None if x is None else 1e3 * x

    run = s.get("run") or {}
    k = report.get("kernels") or {}
    target = report.get("target") or {}
    out.update(dense_step_ms=ms(sec(base)), rettn_dense_step_ms=ms(sec(kind.get("dense"))),
               cache_step_ms=ms(sec(kind.get("cache"))), sparse_step_ms=ms(sec(kind.get("sparse"))),
               sparse_attention_ms=ms(sec(kind.get("sparse"), "attention_s")),
               dense_attention_ms=ms(sec(kind.get("dense"), "attention_s")),
               run_dense_s=run.get("dense_s"), run_rettn_s=run.get("rettn_s"), run_speedup=run.get("speedup"),
               ceiling_speedup=run.get("ceiling_speedup"), mean_density=s.get("mean_density"),
               dense_backend=baseline_name(report.get("dense_baseline"), s.get("baseline")),
               steps=report.get("steps"), schedule=(report.get("schedule") or {}).get("counts"),
               shape={x: target.get(x) for x in ("seq_len", "batch", "layers", "dtype")},
               kernel_rows=[{"keep": r.get("keep"), "density": r.get("density"), "ms": r.get("ms")}
                            for r in k.get("rows") or []],
               kernels_note=k.get("skipped"), targets=report.get("targets"))
    out.update(step_numbers(sec(base), sec(kind.get("dense")), sec(kind.get("dense"), "attention_s"),
                             sec(kind.get("cache")), sec(kind.get("sparse")), s.get("mean_density")))
    return out


LONG_CASE = ("status", "error", "seq_len", "layers", "steps", "schedule", "dense_backend", "dense_step_ms", "rettn_dense_step_ms",
             "cache_step_ms", "sparse_step_ms", "dense_attention_ms", "reference_dense_step_ms",
             "dense_attention_share", "cache_step_cost", "sparse_step_speedup", "sparse_step_ceiling_ms",
             "sparse_step_vs_ceiling", "run_dense_s", "dense_run_extrapolated_from_steps", "run_rettn_s",
             "run_speedup", "run_speedup_vs_baseline_run", "ceiling_speedup", "mean_density", "peak_memory_gib", "offload")


def long_numbers(report) -> dict:
    """scripts/profile_long.py's JSON, case by case; it is rewritten after every timed run, so a
    cut step leaves the runs that finished (the others are null)."""
    out = {}
    for arch, case in ((report or {}).get("cases") or {}).items():
        c = dict.fromkeys(LONG_CASE)
        summ = case.get("summary") or {}
        target = case.get("target") or {}
        r = summ.get("rettn") or {}
        rows = r.get("rows") or {}

        def sec(kind, field="mean_s", rows=rows):
            return (rows.get(kind) or {}).get(field)

        def ms(x):
            return None if x is None else 1e3 * x

        c.update(status=case.get("status"), error=case.get("error"), seq_len=target.get("seq_len"),
                 dense_backend=baseline_name(case.get("dense_baseline")),
                 layers=target.get("layers"), steps=summ.get("steps"),
                 schedule=(case.get("schedule") or {}).get("counts"), dense_step_ms=ms(summ.get("dense_step_s")),
                 rettn_dense_step_ms=ms(sec("dense")), cache_step_ms=ms(sec("cache")),
                 sparse_step_ms=ms(sec("sparse")), dense_attention_ms=ms(sec("dense", "attention_s")),
                 run_dense_s=summ.get("dense_run_s"),
                 dense_run_extrapolated_from_steps=summ.get("dense_run_extrapolated_from_steps"),
                 run_rettn_s=r.get("run_s"), mean_density=r.get("mean_density"),
                 peak_memory_gib={k: (v / 2**30 if v else None) for k, v in (
                     ("dense", summ.get("dense_peak_memory_bytes")), ("rettn", r.get("peak_memory_bytes")),
                     ("rettn_offload", (summ.get("rettn_offload") or {}).get("peak_memory_bytes")))})
        c.update(step_numbers(summ.get("dense_step_s"), sec("dense"), sec("dense", "attention_s"), sec("cache"),
                               sec("sparse"), r.get("mean_density")))
        if c["run_dense_s"] and c["run_rettn_s"]:
            # against the faster dense step: the dense run scaled to it (the same where the
            # baseline's step is the faster one)
            dense = c["run_dense_s"] * 1e-3 * c["reference_dense_step_ms"] / summ["dense_step_s"]
            c["run_speedup"] = dense / c["run_rettn_s"]
            c["run_speedup_vs_baseline_run"] = c["run_dense_s"] / c["run_rettn_s"]
            if r.get("ceiling_s"):
                c["ceiling_speedup"] = dense / r["ceiling_s"]
        o = summ.get("rettn_offload")
        if o:
            orows = o.get("rows") or {}
            c["offload"] = {"run_s": o.get("run_s"), "run_cost": (summ.get("offload") or {}).get("run_cost"),
                            "cache_step_ms": ms(sec("cache", rows=orows)),
                            "sparse_step_ms": ms(sec("sparse", rows=orows)),
                            "cache_step_cost": (summ.get("offload") or {}).get("cache_step_cost"),
                            "sparse_step_cost": (summ.get("offload") or {}).get("sparse_step_cost"),
                            "peak_memory_saved_gib": ((summ.get("offload") or {}).get("peak_memory_saved_bytes") or 0)
                            / 2**30 or None}
        out[arch] = c
    return out


def target(name, where, value, op, bound) -> dict:
    met = None if value is None else (value >= bound if op == ">=" else value <= bound)
    return {"name": name, "where": where, "value": value, "op": op, "bound": bound, "met": met}


def targets(summary: dict) -> list[dict]:
    """The issue's targets, each where it was measured (value null, met null: not measured)."""
    out = []
    for r in summary["bench"]["rows"]:
        where = f"bench keep {r['keep']}"
        # the kernel's share of its 1/density ceiling, two ways: the sparse call with lse against
        # dense attention with lse (the 0.79 on the first H200 run), and the plain sparse
        # call against the best SDPA backend (0.75 there)
        m, d = r["ms"], r.get("density")
        lse = m.get("dense_lse") / m.get("rettn_lse") if m.get("dense_lse") and m.get("rettn_lse") else None
        x = r.get("speedup_vs_sdpa")
        out.append(target("kernel+lse vs 1/density, dense+lse", where, lse * d if lse and d else None, ">=",
                           KERNEL_VS_CEILING_MIN))
        out.append(target("kernel vs 1/density, best SDPA", where, x * d if x and d else None, ">=",
                           KERNEL_VS_CEILING_MIN))
        out.append(target("selection ms a call", where, r["ms"].get("select"), "<=", SELECT_MAX_MS))
        for key in ("cache_vs_dense", "cache_step_vs_dense", "cache_vs_dense_lse"):  # a newer benchmark's column
            value = r.get(key, r["extra"].get(key))
            if value is not None:
                out.append(target(f"cache pass vs dense ({key})", where, value, "<=", CACHE_STEP_MAX))
    p = summary["profile"]
    where = "profile cogvideox-2b"
    out.append(target("cache step vs dense step", where, p["cache_step_cost"], "<=", CACHE_STEP_MAX))
    out.append(target("sparse step vs its ceiling", where, p["sparse_step_vs_ceiling"], ">=", SPARSE_VS_CEILING_MIN))
    out.append(target("whole run speedup, eager", where, p["run_speedup"], ">=", RUN_MIN))
    ratios = summary["compile"]["ratios"] or {}
    out.append(target("whole run speedup, compiled", "compile", ratios.get("rettn speedup, compiled"), ">=",
                       COMPILED_RUN_MIN))
    for arch, c in summary["long"].items():
        out.append(target("cache step vs dense step", f"long {arch}", c["cache_step_cost"], "<=", CACHE_STEP_MAX))
        out.append(target("sparse step vs its ceiling", f"long {arch}", c["sparse_step_vs_ceiling"], ">=",
                           SPARSE_VS_CEILING_MIN))
    return out
