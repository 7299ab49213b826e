"""The `unetpp-fast` command line: help, info, bench, train -> eval -> predict, and one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import io

from unetpp_fast import cli
from unetpp_fast.train.synthetic_data import write_synthetic_dataset

DSB_ROOT = Path(
    os.environ.get("UNETPP_FAST_DSB2018", Path(__file__).resolve().parents[2].parent / "shared/data/dsb2018")
)
TINY = ["--filters", "4,8,16", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _real(sub: str) -> Path:
    path = DSB_ROOT / sub
    if not (path / "images").is_dir():
        pytest.skip(f"DSB2018 data not found at {path} (set UNETPP_FAST_DSB2018 to the dsb2018 folder)")
    return path


def _fails_cleanly(capsys, argv, match: str) -> str:
    """The command exits 2 with one line on stderr naming the problem, and no traceback."""
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    assert match in errors[0], err
    return errors[0]


# ----------------------------------------------------------------------------------------------
# help and info


def test_help_explains_every_option():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"info", "bench", "train", "eval", "predict"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        assert sub.description, name
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 10, (name, action.dest)
            for option in action.option_strings:
                assert option in text, (name, option)


def test_python_dash_m_help():
    out = subprocess.run(
        [sys.executable, "-P", "-m", "unetpp_fast", "--help"],  # -P: import the installed package
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for command in ("info", "bench", "train", "eval", "predict"):
        assert command in out


def test_info(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert "reference" in info["backends"]["cpu"]["available"]
    assert "extension_loaded" in info["build"]
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backends for cpu tensors" in text and "extension" in text


# ----------------------------------------------------------------------------------------------
# bench


def test_bench_table_json_and_plot(tmp_path, capsys):
    plot, rows_file = tmp_path / "bench.png", tmp_path / "bench.json"
    argv = ["bench", "--device", "cpu", "--size", "32", "--batch", "1", "--levels", "1,2", "--warmup", "0"]
    argv += ["--rounds", "1", "--plot", str(plot), "--json", str(rows_file), "--filters", "4,8,16,32"]
    argv += ["--threads", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| UNet++ L1 |" in out and "| U-Net |" in out and "reference (PyTorch)" in out
    report = json.loads(rows_file.read_text())
    rows = report["rows"]
    models = {r["model"] for r in rows}
    assert models == {"UNet++ L1", "UNet++ L2", "U-Net"}
    assert all(r["error"] is None and r["ms_per_batch"] > 0 for r in rows)
    # a pruned level runs only its sub-network's parameters
    used = {r["model"]: r["params_used"] for r in rows}
    assert used["UNet++ L1"] < used["UNet++ L2"] < rows[0]["params"]
    assert plot.stat().st_size > 5000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_json_on_stdout(capsys, tmp_path):
    argv = ["bench", "--device", "cpu", "--size", "32", "--batch", "1", "--levels", "1", "--no-unet"]
    argv += ["--warmup", "0", "--rounds", "1", "--json", "--plot", ""] + TINY
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in report["rows"]][0] == "UNet++ L1"


def test_bench_bad_options(capsys):
    _fails_cleanly(capsys, ["bench", "--backends", "warp-drive"], "unknown backend")
    _fails_cleanly(capsys, ["bench", "--size", "40"], "multiple of 16")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--levels", "one"])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------------------------
# train -> eval -> predict


def test_train_eval_predict_on_dsb2018(tmp_path, capsys):
    """The issue's command with a small network: train --epochs 1 --limit 64, then eval and predict."""
    run = tmp_path / "run"
    argv = ["train", "--data", str(_real("96x96")), "--epochs", "1", "--limit", "64", "--out", str(run)]
    argv += [
        "--filters",
        "8,16,32,64",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--no-progress",
        "--threads",
        "1",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "best validation IoU" in out
    for name in ("best.pth", "last.pth", "history.json", "history.png"):
        assert (run / name).is_file(), name

    assert cli.main(["eval", str(run), "--rounds", "1", "--threads", "1"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    modes = [m["mode"] for m in metrics["modes"]]
    assert modes == ["L1", "L2", "L3", "accurate"] and metrics["n_val"] == 13
    for entry in metrics["modes"]:
        assert 0.0 < entry["iou"] <= entry["dice"] <= 1.0 and entry["ms_per_image"] > 0
    params = [m["params"] for m in metrics["modes"]]
    assert params[0] < params[1] < params[2] == params[3]
    overlay = run / "eval" / "overlays.png"
    assert overlay.read_bytes()[:4] == b"\x89PNG" and overlay.stat().st_size > 20_000

    # predict: masks at each input's own size (full-resolution images)
    full = _real("full") / "images"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in sorted(os.listdir(full))[:2]:
        (inputs / name).write_bytes((full / name).read_bytes())
    assert (
        cli.main(
            ["predict", str(run / "best.pth"), str(inputs), "--out", str(tmp_path / "masks"), "--level", "2"]
        )
        == 0
    )
    for name in os.listdir(inputs):
        mask = io.imread(str(tmp_path / "masks" / name))
        assert mask.shape == io.imread(str(inputs / name)).shape[:2]
        assert set(np.unique(mask)) <= {0, 255}


def test_train_resume_and_eval_on_kaggle_layout(tmp_path, capsys):
    root = tmp_path / "stage1_train"
    write_synthetic_dataset(str(root), n=8, size=32, layout="kaggle", rgba=True)
    run = tmp_path / "run"
    base = ["--out", str(run), "--size", "32", "--batch-size", "4", "--no-progress"] + TINY
    assert cli.main(["train", "--data", str(tmp_path), "--epochs", "1"] + base) == 0
    assert cli.main(["train", "--resume", str(run / "last.pth"), "--epochs", "2"] + base) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "epoch 2/2" in out
    assert cli.main(["eval", str(run / "last.pth"), "--samples", "2", "--rounds", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["epoch"] == 2 and report["modes"][-1]["mode"] == "accurate"
    assert cli.main(["predict", str(run), str(root), "--out", str(tmp_path / "masks")]) == 0
    assert len(os.listdir(tmp_path / "masks")) == 8


# ----------------------------------------------------------------------------------------------
# errors: one line, exit 2


def test_bad_paths_and_corrupt_images(tmp_path, capsys):
    _fails_cleanly(capsys, ["train", "--data", str(tmp_path / "missing")], "does not exist")
    _fails_cleanly(capsys, ["train"], "needs --data")
    write_synthetic_dataset(str(tmp_path / "ds"), n=4, size=32)
    (tmp_path / "ds" / "images" / "sample002.png").write_bytes(b"\x89PNG broken")
    _fails_cleanly(capsys, ["train", "--data", str(tmp_path / "ds"), "--size", "32"], "sample002.png")
    os.remove(tmp_path / "ds" / "masks" / "sample001.png")
    _fails_cleanly(capsys, ["train", "--data", str(tmp_path / "ds")], "has no mask")
    _fails_cleanly(capsys, ["eval", str(tmp_path / "nothing.pth")], "does not exist")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pth")
    _fails_cleanly(capsys, ["eval", str(tmp_path / "plain.pth")], "not an unetpp-fast training checkpoint")
    _fails_cleanly(
        capsys,
        ["predict", str(tmp_path / "plain.pth"), str(tmp_path / "ds"), "--out", str(tmp_path / "o")],
        "not an unetpp-fast training checkpoint",
    )
    _fails_cleanly(capsys, ["train", "--data", str(tmp_path / "ds"), "--size", "40"], "multiple of 16")


def test_predict_bad_input(tmp_path, capsys):
    write_synthetic_dataset(str(tmp_path / "ds"), n=4, size=32)
    run = tmp_path / "run"
    base = ["--out", str(run), "--size", "32", "--epochs", "1", "--no-progress"] + TINY
    assert cli.main(["train", "--data", str(tmp_path / "ds")] + base) == 0
    capsys.readouterr()
    _fails_cleanly(
        capsys, ["predict", str(run), str(tmp_path / "none"), "--out", str(tmp_path / "o")], "does not exist"
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"nope")
    _fails_cleanly(capsys, ["predict", str(run), str(bad), "--out", str(tmp_path / "o")], "cannot read image")
