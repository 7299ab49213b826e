"""Loading the compiled extension `unetpp_fast._C` safely, and reporting what was built.

The extension is only imported when the torch it was built against is the torch running now:
a C++ extension built against another torch fails to load (undefined symbols) or worse. On a
mismatch we warn once and the package runs its Triton and reference backends instead.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import warnings
from types import ModuleType
from typing import Any

import torch

# The compiled module and its build record sit in the package root, beside `unetpp_fast/__init__.py`.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_META_FILE = os.path.join(_PACKAGE_DIR, "_build_meta.json")


def _read_build_meta() -> dict[str, Any] | None:
    try:
        with open(_META_FILE) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    """Return (module or None, reason it is unavailable)."""
    if os.environ.get("UNETPP_FAST_NO_EXTENSION", "").strip() in ("1", "true", "yes"):
        return None, "disabled by UNETPP_FAST_NO_EXTENSION=1"
    meta = _read_build_meta()
    if meta is None:
        here = os.path.dirname(_META_FILE)
        if os.path.exists(os.path.join(here, os.pardir, "setup.py")):
            return None, (
                f"unetpp_fast was imported from the source folder {here}, which holds no compiled "
                "extension: run from another directory to use the installed package, or install "
                "with `pip install --no-build-isolation -e .`"
            )
        return None, "the compiled extension unetpp_fast._C is not installed (pure-Python install)"
    if meta.get("extension_built") is False:
        reason = "unetpp_fast was installed without its compiled extension: " + meta.get("build_error", "")
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        return None, reason
    built_for = meta.get("torch_version")
    if built_for != torch.__version__:
        reason = (
            f"unetpp_fast._C was built against torch {built_for} but torch {torch.__version__} is "
            "running; rebuild with `pip install --no-build-isolation .` in this environment"
        )
        warnings.warn(reason + ". Using the Triton/reference backends instead.", RuntimeWarning, stacklevel=3)
        return None, reason
    try:
        module = importlib.import_module("unetpp_fast._C")
    except ImportError as exc:
        reason = f"unetpp_fast._C failed to import: {exc}"
        warnings.warn(reason + ". Using the Triton/reference backends instead.", RuntimeWarning, stacklevel=3)
        return None, reason
    return module, ""


def extension() -> ModuleType | None:
    """The loaded `_C` module, or None when it is missing or unusable."""
    return _load()[0]


def extension_unavailable_reason() -> str:
    """Why `extension()` is None ('' when it loaded)."""
    return _load()[1]


def build_info() -> dict[str, Any]:
    """What was built: C++ and CUDA parts, archs, compiled kernels, and the versions built against.

    Works in every install: without the extension it says so and why.
    """
    meta = _read_build_meta() or {}
    module, reason = _load()
    compiled = module.build_info() if module is not None else {}
    archs = compiled.get("cuda_archs", "")
    return {
        "extension_loaded": module is not None,
        "extension_unavailable_reason": reason,
        "cxx": bool(compiled.get("cxx", False)),
        "cuda": bool(compiled.get("cuda", False)),
        "cuda_archs": [a for a in archs.replace(",", ";").split(";") if a]
        if archs
        else meta.get("cuda_archs", []),
        "kernels": list(compiled.get("kernels", [])),
        "built_against_torch": meta.get("torch_version"),
        "built_against_cuda": meta.get("torch_cuda_version") if meta.get("with_cuda") else None,
        "running_torch": torch.__version__,
        "running_cuda": torch.version.cuda,
    }
