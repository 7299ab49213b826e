"""Shared test configuration: CUDA tests are marked `cuda` and skipped on machines without a GPU."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before any kernel module is imported (triton.jit reads it when decorating); a GPU run keeps
# the compiled kernels. An explicit TRITON_INTERPRET in the environment wins.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


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
