"""The command line's own checks, before anything loads: every numeric flag of the four commands
out of range (one table), the one error format of usage errors and rettn's errors, help texts,
a Hub id that is neither cached nor reachable, and LPIPS only when asked for."""

import argparse
import logging
import sys
from pathlib import Path

import pytest

from rettn.tools.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--no-progress"]


def run_cli(argv, capsys):
    """(exit code, stderr) of the CLI in-process: a usage error's SystemExit counts as its code."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading or building a model."""
    import rettn.tiny
    import rettn.tools.models
    import rettn.tools.profile.command as profile

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad value was reported")

    monkeypatch.setattr(rettn.tools.models, "load_pipeline", load)
    monkeypatch.setattr(rettn.tiny, "load_default_pipeline", load)
    monkeypatch.setattr(profile, "setup_pipeline", load)
    monkeypatch.setattr(profile, "setup_arch", load)


# ============================================================================ numbers out of range
GEN = ["generate", "--prompt", "x"]
EVAL = ["eval"]
PROF = ["profile"]
CAL = ["calibrate"]  # --out goes to the test's folder (see the test)

POSITIVE = "expected a positive integer, got"
NONNEG = "expected an integer >= 0, got"
SEED = "expected a seed, an integer from 0 to 2**63 - 1, got"
FINITE = "expected a finite number, got"
NUMBER = "expected a number, got"
AT_LEAST_ONE = "expected at least one argument"
TABLE = [
    # generate: its own flags
    (GEN, ["--steps", "0"], "argument --steps: " + POSITIVE),
    (GEN, ["--seed", "-1"], "argument --seed: " + SEED),
    (GEN, ["--seed", str(2**64)], "argument --seed: " + SEED),
    (GEN, ["--height", "0"], "argument --height: " + POSITIVE),
    (GEN, ["--width", "-32"], "argument --width: " + POSITIVE),
    (GEN, ["--frames", "0"], "argument --frames: " + POSITIVE),
    (GEN, ["--guidance", "nan"], "argument --guidance: " + FINITE),
    (GEN, ["--guidance", "inf"], "argument --guidance: " + FINITE),
    (GEN, ["--guidance", "-1"], "argument --guidance: expected a number >= 0, got '-1'"),
    (GEN, ["--guidance", "strong"], "argument --guidance: " + NUMBER),
    (GEN, ["--fps", "0"], "argument --fps: " + POSITIVE),
    (GEN, ["--upscale", "0"], "argument --upscale: " + POSITIVE),
    # generate: the flags generated from RettnConfig's fields, checked by RettnConfig
    (GEN, ["--keep", "0"], "keep must be a fraction in (0, 1], got 0.0"),
    (GEN, ["--keep", "nan"], "keep must be a fraction in (0, 1], got nan"),
    (GEN, ["--keep", "inf"], "keep must be a fraction in (0, 1], got inf"),
    (GEN, ["--block-size", "0"], "argument --block-size: " + POSITIVE),
    (GEN, ["--warmup", "-1"], "warmup must be a step count (int >= 0)"),
    (GEN, ["--warmup", "1e999"], "warmup must be a step count (int >= 0)"),
    (GEN, ["--warmup", "nan"], "argument --warmup: expected a step count, a fraction or auto, got 'nan'"),
    (GEN, ["--refresh-interval", "sometimes"], "argument --refresh-interval: expected a step count, a fraction or auto"),
    (GEN, ["--tolerance", "0", "--warmup", "auto"], "tolerance must be a positive number (a relative error"),
    (GEN, ["--tolerance", "nan"], "tolerance must be a positive number (a relative error"),
    (GEN, ["--warmup", "auto", "--refresh-interval", "1"], "refresh_interval=1 with warmup='auto' has no meaning"),
    (GEN, ["--dense-final", "auto"], "dense_final must be a step count (int >= 0)"),
    (GEN, ["--refresh-interval", "0"], "refresh_interval must be a step count (int >= 1)"),
    (GEN, ["--dense-final", "1.5"], "dense_final must be a step count (int >= 0)"),
    (GEN, ["--ramp", "-0.1"], "ramp (the paper's lambda) must be a finite number >= 0, got -0.1"),
    (GEN, ["--ramp", "nan"], "ramp (the paper's lambda) must be a finite number >= 0, got nan"),
    (GEN, ["--min-seq-len", "-1"], "argument --min-seq-len: " + NONNEG),
    # eval
    (EVAL, ["--seeds"], "argument --seeds: " + AT_LEAST_ONE),
    (EVAL, ["--seeds", "0", "-1"], "argument --seeds: " + SEED),
    (EVAL, ["--keeps"], "argument --keeps: " + AT_LEAST_ONE),
    (EVAL, ["--keeps", "0.5", "0"], "argument --keeps: expected a fraction in (0, 1], got '0'"),
    (EVAL, ["--keeps", "nan"], "argument --keeps: " + FINITE),
    (EVAL, ["--steps", "0"], "argument --steps: " + POSITIVE),
    (EVAL, ["--block-size", "-16"], "argument --block-size: " + POSITIVE),
    (EVAL, ["--warmup", "2.5"], "warmup must be a step count (int >= 0)"),
    (EVAL, ["--refresh-interval", "-2"], "refresh_interval must be a step count (int >= 1)"),
    (EVAL, ["--dense-final", "1e999"], "dense_final must be a step count (int >= 0)"),
    (EVAL, ["--min-seq-len", "-1"], "argument --min-seq-len: " + NONNEG),
    (EVAL, ["--warmup", "auto"], "rettn eval runs every method on one fixed schedule"),
    # profile
    (PROF, ["--layers", "0"], "argument --layers: " + POSITIVE),
    (PROF, ["--frames", "0"], "argument --frames: " + POSITIVE),
    (PROF, ["--height", "0"], "argument --height: " + POSITIVE),
    (PROF, ["--width", "0"], "argument --width: " + POSITIVE),
    (PROF, ["--text-len", "0"], "argument --text-len: " + POSITIVE),
    (PROF, ["--heads", "0"], "argument --heads: " + POSITIVE),
    (PROF, ["--batch", "0"], "argument --batch: " + POSITIVE),
    (PROF, ["--steps", "0"], "argument --steps: " + POSITIVE),
    (PROF, ["--repeats", "0"], "argument --repeats: " + POSITIVE),
    (PROF, ["--warmup-runs", "-1"], "argument --warmup-runs: " + NONNEG),
    (PROF, ["--seed", "-1"], "argument --seed: " + SEED),
    (PROF, ["--kernel-repeats", "0"], "argument --kernel-repeats: " + POSITIVE),
    (PROF, ["--density-sweep", "0.5,nan"], "--density-sweep values must be in (0, 1], got '0.5,nan'"),
    (PROF, ["--keep", "nan"], "keep must be a fraction in (0, 1], got nan"),
    (PROF, ["--block-size", "0"], "argument --block-size: " + POSITIVE),
    (PROF, ["--warmup", "-3"], "warmup must be a step count (int >= 0)"),
    (PROF, ["--refresh-interval", "0"], "refresh_interval must be a step count (int >= 1)"),
    (PROF, ["--dense-final", "150%"], "dense_final must be a step count (int >= 0)"),
    (PROF, ["--min-seq-len", "-1"], "argument --min-seq-len: " + NONNEG),
    (PROF, ["--tolerance", "inf"], "tolerance must be a positive number"),
    # calibrate
    (CAL, ["--floor-psnr", "-1"], "argument --floor-psnr: expected a number >= 0, got '-1'"),
    (CAL, ["--floor-psnr", "nan"], "argument --floor-psnr: " + FINITE),
    (CAL, ["--floor-psnr", "inf"], "argument --floor-psnr: " + FINITE),
    (CAL, ["--max-attn-error", "0"], "argument --max-attn-error: expected a number > 0, got '0'"),
    (CAL, ["--max-attn-error", "-0.5"], "argument --max-attn-error: expected a number > 0, got '-0.5'"),
    (CAL, ["--max-attn-error", "nan"], "argument --max-attn-error: " + FINITE),
    (CAL, ["--max-attn-error", "inf"], "argument --max-attn-error: " + FINITE),
    (CAL, ["--seeds"], "argument --seeds: " + AT_LEAST_ONE),
    (CAL, ["--seeds", "-3"], "argument --seeds: " + SEED),
    (CAL, ["--keeps"], "argument --keeps: " + AT_LEAST_ONE),
    (CAL, ["--keeps", "2"], "argument --keeps: expected a fraction in (0, 1], got '2'"),
    (CAL, ["--steps", "0"], "argument --steps: " + POSITIVE),
    (CAL, ["--intervals", "0"], "argument --intervals: " + POSITIVE),
    (CAL, ["--intervals"], "argument --intervals: " + AT_LEAST_ONE),
    (CAL, ["--warmups", "1"], "argument --warmups: expected a fraction of the steps in [0, 1), got '1'"),
    (CAL, ["--finals", "-0.1"], "argument --finals: expected a fraction of the steps in [0, 1), got '-0.1'"),
    (CAL, ["--finals", "nan"], "argument --finals: " + FINITE),
    (CAL, ["--max-dense-layers", "-1"], "argument --max-dense-layers: " + NONNEG),
    (CAL, ["--max-cache-bytes", "-5"], "max_cache_bytes must be a byte count or a size such as '8GB' or '512MiB', got '-5'"),
    (CAL, ["--max-cache-bytes", "nan"], "max_cache_bytes must be a byte count or a size such as '8GB'"),
    (CAL, ["--max-confirm", "0"], "argument --max-confirm: " + POSITIVE),
    (CAL, ["--time-budget", "0"], "argument --time-budget: expected a number > 0, got '0'"),
    (CAL, ["--time-budget", "inf"], "argument --time-budget: " + FINITE),
    (CAL, ["--block-size", "0"], "argument --block-size: " + POSITIVE),
    (CAL, ["--ramp", "-1"], "ramp (the paper's lambda) must be a finite number >= 0, got -1.0"),
    (CAL, ["--min-seq-len", "-1"], "argument --min-seq-len: " + NONNEG),
]


@pytest.mark.parametrize("command, flags, message", TABLE, ids=[f"{c[0]} {' '.join(f)}" for c, f, _ in TABLE])
def test_numbers_out_of_range_are_one_line_and_exit_2_before_any_model_loads(command, flags, message, tmp_path,
                                                                             capsys, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    extra = ["--out", str(tmp_path / "x.yaml")] if command == CAL else []
    code, err = run_cli(command + extra + flags, capsys)
    assert code == 2, err
    assert err.startswith("rettn: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_the_table_covers_every_numeric_flag():
    """Each option of the four commands whose value is a number has a row above (a new numeric
    flag needs its out-of-range row)."""
    from rettn.tools import args as common

    numeric = {int, float, common.positive_int, common.nonneg_int, common.seed, common.positive_float,
               common.nonneg_float, common.fraction, common.step_fraction, common.schedule_value}
    seen = {(c[0], f[0]) for c, f, _ in TABLE}
    missing = [f"{name} {a.option_strings[0]}" for name, sub in _subparsers().items() for a in sub._actions
               if a.option_strings and a.type in numeric and (name, a.option_strings[0]) not in seen]
    assert len(seen) > 40
    assert not missing, missing


@pytest.mark.parametrize("kwargs, message", [
    (dict(floor_psnr=-1), "floor_psnr must be a finite number of dB >= 0, got -1"),
    (dict(floor_psnr=float("nan")), "floor_psnr must be a finite number of dB >= 0, got nan"),
    (dict(floor_psnr=float("inf")), "floor_psnr must be a finite number of dB >= 0, got inf"),
    (dict(max_attn_error=0), "max_attn_error must be a finite number > 0 or None, got 0"),
    (dict(max_attn_error=float("inf")), "max_attn_error must be a finite number > 0 or None, got inf"),
    (dict(max_attn_error=float("nan")), "max_attn_error must be a finite number > 0 or None, got nan"),
])
def test_calibrate_api_rejects_floors_out_of_range(kwargs, message):
    """rettn.calibrate checks what the command line checks, before it touches the pipeline."""
    from rettn.errors import ConfigError
    from rettn.tools.calibrate import calibrate

    with pytest.raises(ConfigError) as e:
        calibrate(object(), ["a red circle moving right"], **kwargs)
    assert str(e.value) == message


# ============================================================================ one error format
def _subparsers() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("argv, start, prog", [
    ([], "rettn: error: the following arguments are required: COMMAND", "rettn"),
    (["generate", "--prompt", "x", "--frames", "0"],
     "rettn: error: argument --frames: expected a positive integer, got '0'", "rettn generate"),
    (["generate"], "rettn: error: one of the arguments --prompt --prompts is required", "rettn generate"),
    (["eval", "--methods"], "rettn: error: argument --methods: expected at least one argument", "rettn eval"),
    (["profile", "--pattern", "diagonal"], "rettn: error: argument --pattern: invalid choice: 'diagonal'", "rettn profile"),
    (["calibrate", "--reselects", "always"], "rettn: error: argument --reselects: invalid choice: 'always'",
     "rettn calibrate"),
    (["nonsense"], "rettn: error: argument COMMAND: invalid choice: 'nonsense'", "rettn"),
])
def test_usage_errors_are_one_line_in_rettns_format(argv, start, prog, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(start) and err.endswith(f" (see {prog} --help)\n") and err.count("\n") == 1, err


def test_every_subcommand_parser_uses_the_format():
    from rettn.tools.args import HelpFormatter, Parser

    for name, sub in _subparsers().items():
        assert isinstance(sub, Parser) and sub.formatter_class is HelpFormatter, name


# ============================================================================ help texts
def test_help_has_no_markup_and_every_option_says_what_it_does():
    helps = {"rettn": build_parser().format_help()} | {name: sub.format_help() for name, sub in _subparsers().items()}
    for name, text in helps.items():
        assert "``" not in text and ":class:" not in text, name
    undocumented = [f"{name} {a.option_strings[0]}" for name, sub in _subparsers().items() for a in sub._actions
                    if a.option_strings and not (a.help or "").strip()]
    assert not undocumented, undocumented


def test_help_shows_the_defaults():
    subs = _subparsers()

    def help_of(command, flag):
        action = next(a for a in subs[command]._actions if flag in a.option_strings)
        return subs[command]._get_formatter()._expand_help(action)

    assert help_of("calibrate", "--floor-psnr").endswith("(default: 30.0)")
    assert help_of("calibrate", "--keeps").endswith("(default: 0.125 0.0625 0.03125)")
    assert help_of("generate", "--fps").endswith("(default: 8)")
    assert help_of("generate", "--seed").endswith("(default: 0)")
    assert "(default" not in help_of("generate", "--dense")  # a switch: no default to show
    assert help_of("eval", "--methods").endswith("(default: all)")  # said once, by the help itself
    for name, sub in subs.items():  # every option with a default value shows it
        for a in sub._actions:
            if a.option_strings and a.default not in (None, argparse.SUPPRESS) and not isinstance(a.default, bool):
                assert "default" in help_of(name, a.option_strings[0]), f"{name} {a.option_strings[0]}"


def test_profile_arch_help_names_the_folder_that_holds_the_architectures():
    action = next(a for a in _subparsers()["profile"]._actions if "--arch" in a.option_strings)
    assert "configs/archs/*.yaml" in action.help
    names = sorted(p.stem for p in (ROOT / "configs" / "archs").glob("*.yaml"))
    assert names and all(n in action.help for n in names)


# ============================================================================ Hub ids offline
HUB_ID = "nobody/no-such-model"


def _hub_errors():
    from huggingface_hub.utils import httpx  # the Hub client's HTTP library
    from huggingface_hub.errors import LocalEntryNotFoundError

    def connect_error():  # diffusers' path without a network: model_info fails, the cache is empty
        try:
            raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")
        except httpx.ConnectError as e:
            raise OSError(f"Cannot load model {HUB_ID}: the model is not fully cached locally (...) and an error "
                          "occurred while trying to fetch metadata from the Hub. Please check out the root cause "
                          "in the stacktrace above.") from e

    def local_entry():
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the specified revision "
                                      "on the local disk and outgoing traffic has been disabled. To enable repo "
                                      "look-ups and downloads online, pass 'local_files_only=False' as input.")

    return {"connect": connect_error, "local-entry": local_entry}


@pytest.mark.parametrize("kind", ["connect", "local-entry"])
def test_hub_id_neither_cached_nor_reachable_without_offline_mode(kind, monkeypatch):
    """No HF_HUB_OFFLINE, no network: the download raises the Hub client's errors (simulated, no
    real network call), after diffusers' "Couldn't connect to the Hub" warning."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    from rettn.tools.models import ModelLoadError, load_pipeline

    raise_it = _hub_errors()[kind]

    def download(cls, *args, **kwargs):
        logging.getLogger("diffusers.pipelines.pipeline_utils").warning(
            "Couldn't connect to the Hub: [Errno -3] Temporary failure in name resolution.\n"
            "Will try to load from local cache.")
        raise_it()

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.seen = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    records = Records()
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(download))
    logger.addHandler(records)
    try:
        with pytest.raises(ModelLoadError) as e:
            load_pipeline(HUB_ID)
    finally:
        logger.removeHandler(records)
    text = str(e.value)
    assert text.startswith(f"model '{HUB_ID}' is not in the local Hugging Face cache (") and "\n" not in text
    assert f"the Hub cannot be reached: download it where there is a network (hf download {HUB_ID}" in text
    assert "local_files_only" not in text and "stacktrace" not in text
    assert not any("Couldn't connect" in m for m in records.seen)  # the warning is dropped, the error says it


def test_hub_id_the_hub_does_not_know(monkeypatch):
    from huggingface_hub.utils import httpx  # the Hub client's HTTP library
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import RepositoryNotFoundError

    from rettn.tools.models import ModelLoadError, load_pipeline

    def download(cls, *args, **kwargs):
        response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/models/{HUB_ID}"))
        raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response)

    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(download))
    with pytest.raises(ModelLoadError, match=rf"^the Hugging Face Hub has no model '{HUB_ID}' that this machine may "
                                             r"read: check the id, or log in \(hf auth login\) for a private or gated "
                                             r"model$"):
        load_pipeline(HUB_ID)


def test_other_load_failures_keep_the_librarys_first_line(monkeypatch):
    from diffusers import DiffusionPipeline

    from rettn.tools.models import ModelLoadError, load_pipeline

    def download(cls, *args, **kwargs):
        raise ValueError("the first line\nthe second line")

    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(download))
    with pytest.raises(ModelLoadError, match=rf"^could not load model '{HUB_ID}': the first line$"):
        load_pipeline(HUB_ID)


# ============================================================================ LPIPS only when asked
def test_compare_says_nothing_about_lpips_unless_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # not installed
    code = main(["generate", "--prompt", "a red circle moving right", "--compare", "--out", str(tmp_path / "c.gif")]
                + FAST)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "PSNR" in out and "LPIPS" not in out + err


def test_lpips_asked_for_but_unavailable_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch,
                                                                            no_model_load):
    monkeypatch.setitem(sys.modules, "lpips", None)
    for argv in (["generate", "--prompt", "x", "--compare", "--lpips", "--out", str(tmp_path / "c.gif")] + FAST,
                 ["eval", "--lpips", "--out-dir", str(tmp_path / "ev"), "--no-progress"]):
        code, err = run_cli(argv, capsys)
        assert code == 2
        assert err == "rettn: error: LPIPS not available: the lpips package is not installed (pip install lpips)\n"
    code, err = run_cli(["generate", "--prompt", "x", "--lpips"] + FAST, capsys)
    assert (code, err) == (2, "rettn: error: --lpips compares rettn's output with the dense one: add --compare\n")
