"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU, without spills, with tensor-core dots,
in 2D and in 3D (the DIMS constexpr; 3D under its own config lists, configs.config_name).

The compiler rejects code the interpreter accepts, so this runs `unetpp_fast.ops.triton.aot` in a
fresh process (no TRITON_INTERPRET, an empty Triton cache: a real compile). CI compiles the first
config of each kernel; `pytest --long` compiles every autotune config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _compile(tmp_path, quick: bool) -> list[dict]:
    from unetpp_fast.ops.kernel_resources import find_cuobjdump

    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel's copy)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    command = [sys.executable, "-P", "-m", "unetpp_fast.ops.triton.aot", "--json"] + (
        ["--quick"] if quick else []
    )
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3000, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check(results: list[dict]) -> None:
    from unetpp_fast.ops.triton import aot

    kernels = {spec.name for spec in aot.kernel_specs()}
    assert {r["kernel"] for r in results} == kernels
    assert {r["arch"] for r in results} == {80, 90}
    assert {r["dims"] for r in results} == {2, 3}
    for r in results:
        where = f"{r['kernel']} {r['dims']}D {r['mode']} {r['config']} sm_{r['arch']}"
        assert 0 < r["registers"] <= 255, where
        assert r["local_bytes"] == 0, f"{where}: {r['local_bytes']} B of local memory"
        assert r["stack_bytes"] == 0, f"{where}: {r['stack_bytes']} B stack frame (register spills)"
        if r["kernel"].startswith("preactivation_grad"):  # elementwise: no dot
            continue
        if r["arch"] == 80:
            assert "mma.sync" in r["dot_instructions"], f"{where}: the bf16 dot did not become mma"
        else:
            assert r["dot_instructions"], f"{where}: the bf16 dot became neither wgmma nor mma"


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    _check(_compile(tmp_path, quick=True))


def test_every_autotune_config_compiles_without_spills(tmp_path, request):
    if not request.config.getoption("--long"):
        pytest.skip("compiles every config (minutes on two cores): run with --long")
    _check(_compile(tmp_path, quick=False))
