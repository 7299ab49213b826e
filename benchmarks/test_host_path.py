"""pytest-benchmark rows for the host cost of the triton backend's GPU path (benchmarks/host_path.py).

Each row times one call with Triton's compile and launch stubbed (launch_common.set_runtime), on
tiny CPU tensors, one thread: what is measured is Python. The eager row (cat + interpolate /
max_pool2d + conv2d + relu) is the comparison, measured in the same session; `extra_info` of the
model row carries the compile counts. Skipped under TRITON_INTERPRET=1 (the interpreter path).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("the host path is the compiled-kernel path: unset TRITON_INTERPRET", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_path  # noqa: E402

import unetpp_fast  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("pattern", list(host_path.PATTERNS))
@pytest.mark.parametrize("path", ["fused_triton", "eager"])
def test_host_cost_per_call(benchmark, pattern, path):
    benchmark.group = f"host path {pattern}"
    benchmark.extra_info.update(pattern=pattern, path=path, threads=1)
    if path == "eager":
        pieces, modes, weight, bias = host_path.pattern_inputs(pattern, "nchw")
        with torch.no_grad():
            benchmark.pedantic(
                host_path.eager_node, (pieces, modes, weight, bias), rounds=200, iterations=5, warmup_rounds=5
            )
        return
    pieces, modes, weight, bias = host_path.pattern_inputs(pattern, "cl")
    with torch.no_grad(), host_path.stubbed() as stub:
        benchmark.pedantic(
            unetpp_fast.fused_conv,
            (pieces, weight, bias, modes, "relu"),
            {"backend": "triton"},
            rounds=200,
            iterations=5,
            warmup_rounds=5,
        )
    assert stub.launches >= 200 * 5


def test_host_cost_model_forward_and_compiles(benchmark):
    results = host_path.measure_compiles()
    benchmark.extra_info.update(threads=1, **results["compiles"])
    model = host_path._model(filters=(4, 8, 8, 8, 8)).eval()
    x = host_path._image(1, 32)
    with torch.no_grad(), unetpp_fast.use_backend("triton"), host_path.stubbed() as stub:
        benchmark.pedantic(model, (x,), rounds=20, iterations=1, warmup_rounds=2)
    assert stub.launches >= 34 * 22  # plus the tuning runs of the first call
    assert results["compiles"]["forward_accurate"] <= 8 and results["compiles"]["train_step"] <= 24
