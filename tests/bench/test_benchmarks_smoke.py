"""The benchmark suites, the report and the GPU check script run end to end in CPU smoke mode.

BENCH_SMOKE=1 makes benchmarks/conftest.py use tiny shapes and 1-2 rounds, so the suites cannot
rot unnoticed on machines without a GPU. Each suite runs in a subprocess (its own conftest and
pytest-benchmark session) and writes its rows to a JSON-lines file that benchmarks/report.py reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("pytest_benchmark", reason="the benchmark suites need pytest-benchmark")


def _run_suite(suite: str, rows: Path, extra_env: dict[str, str], timeout: int = 150) -> list[dict]:
    env = dict(os.environ, BENCH_SMOKE="1", BENCH_DEVICE="cpu", BENCH_ROWS=str(rows), **extra_env)
    # one thread: on a busy shared CPU, OpenMP workers spinning against each other slow tiny ops 100x
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("UNETPP_FAST_BACKEND", None)
    # -P: the checkout's folder must not shadow the installed package (with its compiled extension).
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-disable",
        f"benchmarks/{suite}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]


def _report(rows: Path, tmp_path: Path) -> str:
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/report.py", "--rows", str(rows), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith("# unetpp-fast benchmark report")
    return proc.stdout


def test_operator_suite_smoke(tmp_path: Path) -> None:
    rows_path = tmp_path / "rows.jsonl"
    env = {
        "BENCH_OP_BACKENDS": "eager,reference,cpu",
        "BENCH_CONVS": "X1,0.conv1 (maxpool)|X0,2.conv1 (2+up)",
    }
    rows = _run_suite("test_bench_operator.py", rows_path, env)
    measured = [r for r in rows if r["suite"] == "operator"]
    assert {r["backend"] for r in measured} >= {"eager", "reference"}
    assert {r["pass"] for r in measured} == {"fwd", "fwdbwd"}
    for r in measured:
        assert r["median_ms"] > 0 and r["ratio_vs_eager"] > 0 and r["floor_us"] > 0
        assert r["rel_err_vs_fp32"] < 1e-4, r
    assert any(r["suite"] == "ceilings" for r in rows)
    # the 3D cases (16^3 in smoke mode) and which backend ran each fused call
    assert {r["conv"] for r in measured if r["dims"] == 3} == {
        "3D X1,0.conv1 (maxpool)",
        "3D X0,2.conv1 (2+up)",
    }
    assert {(r["backend"], r["ran"]) for r in measured} == {
        ("eager", "none (plain PyTorch)"),
        ("reference", "reference 1"),
        ("cpu", "cpu 1"),
    }
    table = _report(rows_path, tmp_path)
    assert "operator (geomean speed-up vs eager over convs)" in table


def test_model_suite_smoke(tmp_path: Path) -> None:
    if importlib.util.find_spec("unetpp_fast.nn.unetpp") is None:
        pytest.skip("unetpp_fast.nn.unetpp is not part of this checkout")
    rows_path = tmp_path / "rows.jsonl"
    env = {
        "BENCH_MODELS": "L2,unet",
        "BENCH_LAYOUTS": "cl",
        "BENCH_MODEL_BACKENDS": "eager,fused",
        "BENCH_TRAIN_BACKENDS": "eager,fused",
    }
    rows = _run_suite("test_bench_model.py", rows_path, env)
    inference = [r for r in rows if r["suite"] == "model" and r["dims"] == 2]
    assert {(r["model"], r["backend"]) for r in inference} == {
        (m, b) for m in ("UNet++ L2", "U-Net") for b in ("eager", "fused")
    }
    assert all(r["images_per_s"] > 0 and r["s_per_10k"] > 0 for r in inference)
    assert {r["backend"] for r in rows if r["suite"] == "train"} == {"eager", "fused"}
    saved, saved_3d = sorted((r for r in rows if r["suite"] == "memory"), key=lambda r: r.get("dims", 2))
    assert saved["saved_fused_mib"] < saved["saved_plain_mib"] and saved_3d["saved_ratio"] < 0.6
    # 3D (smoke: L1 and L4 at 16^3): a pruned level runs (L+1)(L+2) node convolutions and its head;
    # 'fused' inference lets `auto` pick per call between the cpu backend and plain PyTorch (reference)
    ran_3d = {(r["model"], r["backend"]): r for r in rows if r["suite"] == "model" and r["dims"] == 3}
    assert set(ran_3d) == {(f"3D UNet++ L{n}", b) for n in (1, 4) for b in ("fused", "eager")}
    for level, convs in ((1, 7), (4, 31)):
        fused = ran_3d[(f"3D UNet++ L{level}", "fused")]
        assert sum(fused["ran_calls"].values()) == convs and set(fused["ran_calls"]) <= {"cpu", "reference"}
        assert ran_3d[(f"3D UNet++ L{level}", "eager")]["ran"] == "none (plain PyTorch)"
    # training: only fused backends compete; the full 3D UNet++ (depth 4) runs 15 nodes x 2 + 4 heads
    train_3d = [r for r in rows if r["suite"] == "train" and r["backend"] == "fused" and r["dims"] == 3]
    assert [r["ran_calls"] for r in train_3d] == [{"cpu": 34}]
    table = _report(rows_path, tmp_path)
    assert "UNet++ L2" in table and "training step" in table and "saved for backward" in table


def test_gpu_check_flow_without_budget(tmp_path: Path) -> None:
    """With no time budget every step is skipped, yet the step log and the report still come out."""
    env = dict(
        os.environ, GPU_CHECK_DRY="1", GPU_CHECK_BUDGET_S="0", OUT=str(tmp_path), PYTHON=sys.executable
    )
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    names = [s[0] for s in steps]
    assert names[:3] == ["environment", "build", "import"] and "model suite (smoke)" in names, names
    assert all(s[1].startswith("skipped") for s in steps), steps
    assert (tmp_path / "report.md").exists()
    last_lines = proc.stdout.strip().splitlines()[-3:]
    assert "no benchmark rows were produced" in last_lines[-1], proc.stdout
    assert proc.returncode == 1  # nothing measured is not a pass
