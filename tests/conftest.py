"""Shared test configuration: CUDA tests are marked `cuda` and skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch


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
