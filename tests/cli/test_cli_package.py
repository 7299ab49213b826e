"""The CLI package: a thin dispatcher, one module per subcommand, --help without torch, one-line errors."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from unetpp_fast import cli
from unetpp_fast.cli import bench, options
from unetpp_fast.train.synthetic_data import write_synthetic_dataset

CLI_DIR = Path(cli.__file__).resolve().parent


def test_every_subcommand_module_has_the_same_shape():
    modules = cli.subcommands()
    assert {"info", "bench", "train", "eval", "predict"} <= set(modules)  # and any added since
    for name, module in modules.items():
        assert module.NAME == name and module.HELP and module.DESCRIPTION
        assert callable(module.add_arguments) and callable(module.run)


def test_no_cli_function_is_longer_than_60_lines():
    long = []
    for path in sorted(CLI_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long, long


def test_a_new_subcommand_is_one_module_and_one_registration(monkeypatch, capsys):
    module = types.ModuleType("unetpp_fast.cli.hello")
    module.NAME, module.HELP, module.DESCRIPTION = "hello", "say hello to someone", "Print a greeting."

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("who", help="whom to greet")

    def run(args: argparse.Namespace) -> int:
        print(f"hello {args.who}")
        return 0

    module.add_arguments, module.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "unetpp_fast.cli.hello", module)
    monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, "hello"))
    assert cli.main(["hello", "world"]) == 0
    assert capsys.readouterr().out == "hello world\n"


# The package facade (unetpp_fast/__init__.py) imports torch; a stand-in package object lets the
# CLI modules load on their own, which is what a lazy facade would give the console script.
HELP_WITHOUT_TORCH = textwrap.dedent(
    """
    import importlib.util, sys, time, types
    began = time.perf_counter()
    spec = importlib.util.find_spec("unetpp_fast")
    package = types.ModuleType("unetpp_fast")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["unetpp_fast"] = package
    from unetpp_fast.cli import main
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["predict", "--help"],
                 ["bench", "--help"], ["info", "--help"]):
        try:
            main(argv)
        except SystemExit as exit:
            assert exit.code == 0, argv
    assert "torch" not in sys.modules, "the CLI imported torch to print its help"
    print(f"{time.perf_counter() - began:.3f}", file=sys.stderr)
    """
)


def test_help_does_not_import_torch():
    done = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "usage: unetpp-fast train" in done.stdout and "--save-probabilities" in done.stdout
    assert float(done.stderr.strip().splitlines()[-1]) < 2.0  # torch alone takes seconds to import


def _one_line_error(capsys, argv, match: str) -> str:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], err
    # no exception class names in what the user reads
    assert not any(word in lines[0] for word in ("Error:", "Exception", "RuntimeError", "ValueError")), err
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_missing_gpu_is_a_usage_error(capsys):
    _one_line_error(capsys, ["bench", "--device", "cuda", "--plot", ""], "no CUDA GPU")
    _one_line_error(capsys, ["train", "--data", ".", "--device", "cuda"], "no CUDA GPU")
    _one_line_error(capsys, ["bench", "--device", "tpu", "--plot", ""], "unknown device 'tpu'")


def test_checkpoint_errors_say_what_the_file_is_not(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("these are my notes")
    _one_line_error(capsys, ["eval", str(tmp_path / "notes.pth")], "not a PyTorch file")
    (tmp_path / "empty.pth").write_bytes(b"")
    _one_line_error(capsys, ["eval", str(tmp_path / "empty.pth")], "the file is empty")


def test_numbers_in_the_bench_table_have_thousands_separators():
    rows = bench.format_rows([{"model": "UNet++ L4", "params_used": 9_163_329, "images_per_s": 12345.6}])
    assert rows[0]["params"] == "9,163,329" and rows[0]["images / s"] == "12,346"


def test_plurals():
    assert options.plural(1, "epoch") == "1 epoch" and options.plural(2, "epoch") == "2 epochs"
    assert options.plural(1, "thread") == "1 thread" and options.plural(1_024, "mask") == "1,024 masks"


def test_progress_bars_are_off_when_stderr_is_not_a_terminal(tmp_path, capsys):
    write_synthetic_dataset(str(tmp_path / "ds"), n=6, size=32)
    argv = ["train", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), "--size", "32"]
    assert cli.main(argv + ["--epochs", "1", "--filters", "4,8,16", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err  # no bar redraws in a log
    assert "epoch 1/1" in captured.out and "(1 epoch);" in captured.out  # per-epoch lines instead


def test_predict_defaults_match_the_inference_module():
    from unetpp_fast.cli import predict
    from unetpp_fast.train import inference

    # cli/predict.py repeats the number so that --help need not import torch
    assert predict.DEFAULT_TILE == inference.DEFAULT_TILE


def test_an_output_path_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    write_synthetic_dataset(str(tmp_path / "ds"), n=4, size=16)
    (tmp_path / "taken").write_text("a file where the run folder should go")
    argv = ["train", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "taken"), "--size", "16"]
    argv += ["--filters", "4,8,16", "--threads", "1", "--no-progress"]
    line = _one_line_error(capsys, argv, "exists")
    assert "taken" in line and "Errno" not in line


def test_only_rank_zero_prints_a_usage_error(monkeypatch, capsys):
    # Under torchrun every rank hits the same bad argument; one line is enough.
    from unetpp_fast.cli import main

    for rank, expected_lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert main(["eval", "/nonexistent/run"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == expected_lines
