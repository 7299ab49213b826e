"""The host-path harness (benchmarks/host_path.py) runs the triton backend's GPU path on CPU tensors.

It runs in a fresh process without TRITON_INTERPRET (the harness measures the compiled-kernel
path, with Triton's compile and launch stubbed through launch_common.set_runtime). Checked: the
piece patterns and the model run end to end, every launch hands the kernel all its arguments and a
3-D grid, the compile counts of UNet++ L4 stay within budget (forward <= 8, train step <= 24) and
a new batch and resolution add none, and a second process re-uses the persisted tuning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "host_path.py"


def _run(code: str, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["UNETPP_FAST_CACHE_DIR"] = str(tmp_path / "cache")
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(HARNESS.parent)!r})
        import host_path
        """
    ) + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-P", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_harness_measures_calls_model_and_compiles(tmp_path):
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-P", str(HARNESS), "--repeats", "5", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "per_call_us" in done.stdout
    results = json.loads(out.read_text())
    for key in ("per_call_us", "per_call_nchw_us", "launcher_us", "eager_node_us"):
        assert set(results[key]) == {"2-piece", "5-piece"}, key
        assert all(0 < v < 1e6 for v in results[key].values()), key
    # The operator layer's share is what remains above the launcher (may be noisy, never absurd).
    assert set(results["op_layer_us"]) == {"2-piece", "5-piece"}
    assert all(abs(v) < 1e6 for v in results["op_layer_us"].values())
    assert set(results["model_forward_host_ms"]) == {"accurate", "L1", "L2", "L3", "L4"}
    # One launch per convolution: 34 in accurate mode, 7/13/21/31 at L1-L4 (BatchNorm folded).
    assert results["model_forward_launches"] == {"accurate": 34, "L1": 7, "L2": 13, "L3": 21, "L4": 31}
    compiles = results["compiles"]
    assert 0 < compiles["forward_accurate"] <= 8
    assert 0 < compiles["train_step"] <= 24
    assert compiles["after_resize"] == 0
    assert compiles["train_after_resize"] == 0
    kernels = {r["kernel"] for r in results["compiled"]["train_step"]}
    # The GPU path's forward: the staged kernel (3x3 and the 1x1 heads), the packed one (RGB input).
    assert {"fused_conv_forward_staged_kernel", "weight_grad_kernel", "input_grad_kernel"} <= kernels


def test_second_process_reuses_the_persisted_tuning(tmp_path):
    # The main forward (several configs per class: it tunes); the staged one has one for this call.
    code = """
        import os, torch, unetpp_fast
        os.environ["UNETPP_FAST_TRITON_STAGED"] = "0"
        pieces, modes, weight, bias = host_path.pattern_inputs("5-piece", "cl")
        with torch.no_grad(), host_path.stubbed(os.environ["UNETPP_FAST_CACHE_DIR"]) as stub:
            unetpp_fast.fused_conv(pieces, weight, bias, modes, "relu", backend="triton")
        print(json.dumps({"benchmarks": stub.benchmarks, "compiles": len(stub.compiles)}))
    """
    first = _run(code, tmp_path)
    second = _run(code, tmp_path)
    assert first["benchmarks"] >= 2 and first["compiles"] >= 2  # tuned over its configs
    assert second == {"benchmarks": 0, "compiles": 1}  # the stored choice: one compile, no timing
