"""Shared test configuration: CUDA tests are marked `cuda` and skipped on machines without a GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before any kernel module is imported (triton.jit reads it when decorating); a GPU run keeps
# the compiled kernels. An explicit TRITON_INTERPRET in the environment wins.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Tuned kernel configs and measured backend choices persist in a cache directory; the tests use a
# fresh one per session, so they neither read nor overwrite the user's (an explicit setting wins).
if "UNETPP_FAST_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["UNETPP_FAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="unetpp_fast_test_cache_")
    atexit.register(shutil.rmtree, os.environ["UNETPP_FAST_CACHE_DIR"], True)

# The tests exercise the installed package (with its compiled extension). `python -m pytest` from
# the checkout puts the checkout first on sys.path, where `unetpp_fast/` is the bare source folder:
# take it off before anything imports the package.
_CHECKOUT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _CHECKOUT]
try:
    import unetpp_fast  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise pytest.UsageError(
        f"unetpp_fast is not installed ({exc}). The tests run against the installed package: "
        'pip install --no-build-isolation ".[test]"  then  pytest -q'
    ) from exc


def pytest_collection_modifyitems(config, items):
    # Query CUDA lazily here, never at import time of a test module.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False, help="run the long fuzzing campaigns")
