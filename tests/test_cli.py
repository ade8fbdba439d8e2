"""The command line on the embedded model: outputs, --compare, --prompts over two processes,
bad input (one line, exit code 2), and loading a saved pipeline folder with --model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rettn.tools.cli import main

FAST = ["--steps", "10", "--no-progress"]


def gif_frames(path):
    im = Image.open(path)
    frames = []
    for i in range(im.n_frames):
        im.seek(i)
        frames.append(np.asarray(im.convert("RGB")))
    return np.stack(frames)


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_real_clip(frames, n, h, w):
    assert frames.shape == (n, h, w, 3)
    assert frames.reshape(-1, 3).std(0).max() > 10  # not all one colour


def test_sparse_generation_writes_a_real_clip(tmp_path, capsys):
    out = tmp_path / "clip.gif"
    code, stdout, err = run_cli(["generate", "--prompt", "a red circle moving right", "--out", str(out)] + FAST, capsys)
    assert code == 0, err
    assert_real_clip(gif_frames(out), 4, 32, 32)
    assert "rettn: wrote" in stdout and "mean counted density" in stdout


def test_dense_generation_and_mp4_and_upscale(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code, stdout, err = run_cli(["generate", "--prompt", "a blue square moving up", "--dense", "--upscale", "2",
                                 "--out", str(out)] + FAST, capsys)
    assert code == 0, err
    import imageio.v3 as iio

    assert_real_clip(iio.imread(out), 4, 64, 64)
    assert "[dense]" in stdout


def test_compare_writes_side_by_side_and_prints_metrics(tmp_path, capsys):
    out = tmp_path / "c.gif"
    summary = tmp_path / "s.json"
    code, stdout, err = run_cli(["generate", "--prompt", "a green triangle moving left", "--compare",
                                 "--refresh-interval", "3", "--out", str(out), "--json", str(summary)] + FAST, capsys)
    assert code == 0, err
    both = gif_frames(tmp_path / "c-compare.gif")
    assert both.shape == (4, 32, 2 * 32 + 2, 3)
    assert "PSNR" in stdout and "SSIM" in stdout and "speedup" in stdout
    record = json.loads(summary.read_text())["outputs"][0]
    assert 5 < record["psnr"] < 100 and 0 < record["ssim"] <= 1  # close to dense, not identical
    assert record["dense_seconds"] > 0 and record["speedup"] > 0
    assert record["steps"] == {"dense": 3, "cache": 3, "sparse": 4}  # 10 steps: warm-up 30%, cache every 3


def test_saved_pipeline_folder_loads_with_model_path(tmp_path, capsys):
    from rettn.tiny import load_default_pipeline

    folder = tmp_path / "saved"
    load_default_pipeline().save_pretrained(folder)
    a, b = tmp_path / "a.gif", tmp_path / "b.gif"
    assert run_cli(["generate", "--prompt", "a red square moving down", "--dense", "--out", str(a)] + FAST, capsys)[0] == 0
    assert run_cli(["generate", "--prompt", "a red square moving down", "--dense", "--model", str(folder),
                    "--out", str(b)] + FAST, capsys)[0] == 0
    assert np.array_equal(gif_frames(a), gif_frames(b))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--model", "/no/such/folder/here"], "neither an existing folder nor a Hub id"),
        (["--out", "clip.txt"], "cannot write a video to"),
        (["--height", "31"], "rejected the request"),
        (["--keep", "2"], r"keep must be a fraction in \(0, 1\]"),
        (["--dense", "--keep", "0.1"], "--dense runs without rettn"),
        (["--dense", "--compare"], "cannot be combined"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["generate", "--prompt", "a red circle"] + extra + FAST, capsys)
    assert code == 2
    assert err.startswith("rettn: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


@pytest.mark.parametrize("extra", [["--prompt", "x", "--prompts", "p.txt"], ["--prompt", "x", "--frames", "0"], []])
def test_argument_errors_exit_2(capsys, extra):
    with pytest.raises(SystemExit) as e:
        main(["generate"] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("rettn: error: ") and err.endswith(" (see rettn generate --help)\n") and err.count("\n") == 1


def test_missing_prompts_file(tmp_path, capsys):
    code, _, err = run_cli(["generate", "--prompts", str(tmp_path / "nope.txt")] + FAST, capsys)
    assert code == 2 and "does not exist" in err


def test_local_folder_that_is_not_a_model(tmp_path, capsys):
    code, _, err = run_cli(["generate", "--prompt", "x", "--model", str(tmp_path)] + FAST, capsys)
    assert code == 2 and "is not a diffusers pipeline folder (no model_index.json" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_gpu(capsys):
    code, _, err = run_cli(["generate", "--prompt", "x", "--device", "cuda"] + FAST, capsys)
    assert code == 2 and "torch sees no CUDA GPU" in err


def test_unknown_hub_id_offline(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache, as a user without a network meets it (without
    HF_HUB_OFFLINE: tests/test_cli_checks.py, the Hub client's errors simulated)."""
    model = "nobody/no-such-model"
    root = str(Path(__file__).resolve().parents[1])  # this checkout's rettn, whatever is installed
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "rettn", "generate", "--prompt", "x", "--model", model,
                           "--no-progress"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (  # one line: no "Couldn't connect to the Hub" before it, no local_files_only advice
        f"rettn: error: model '{model}' is not in the local Hugging Face cache ({tmp_path / 'hf' / 'hub'}) and the "
        f"Hub cannot be reached (HF_HUB_OFFLINE is set): download it where there is a network (hf download {model}, "
        f"or huggingface-cli download {model}) into that cache, or pass --model a local pipeline folder "
        "(save_pretrained)\n"), proc.stderr


def test_console_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rettn", "generate", "--prompt", "x", "--preset", "nope"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("rettn: error: unknown preset") and "Traceback" not in proc.stderr


def test_prompts_split_over_two_processes_and_resume(tmp_path):
    prompts = ["a red circle moving right", "a blue square moving up", "", "a green triangle moving left",
               "a yellow circle moving down", "a red triangle moving up"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "rettn", "generate", "--prompts", "p.txt", "--out", "outs", "--json", "s.json"] + FAST
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "outs").iterdir())
    expected = ["0001-a-red-circle-moving-right.gif", "0002-a-blue-square-moving-up.gif",
                "0004-a-green-triangle-moving-left.gif", "0005-a-yellow-circle-moving-down.gif",
                "0006-a-red-triangle-moving-up.gif"]
    assert files == expected
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["written"] == 5 and sorted(Path(o["output"]).name for o in summary["outputs"]) == expected
    # each prompt's seed follows its line, not the process that ran it
    assert {Path(o["output"]).name[:4]: o["seed"] for o in summary["outputs"]}["0004"] == 4
    # resume: everything exists, nothing is generated again
    (tmp_path / "outs" / expected[2]).unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "s.json").read_text())
    assert again["written"] == 1 and again["skipped_existing"] == 4
    assert Path(again["outputs"][0]["output"]).name == expected[2]
