"""Builds unetpp_fast._C: C++ always, CUDA sources when a CUDA toolkit and a CUDA build of torch exist.

Environment:
  FORCE_CUDA=1           build the CUDA part or fail loudly.
  UNETPP_FAST_NO_CUDA=1  never build the CUDA part.
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0": A100, H100/H200).
  MAX_JOBS               parallel compile jobs (ninja).
A machine without a working C++ compiler still gets a pure-Python install (Triton and
reference backends) with a clear warning, unless FORCE_CUDA=1.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"
BUILD_META = "_build_meta.json"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> str | None:
    """CUDA_HOME, else /usr/local/cuda, else the folder above nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _sources(pattern: str) -> list[str]:
    # Relative paths keep the build reproducible across checkouts.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extension_setup() -> dict:
    """Return the ext_modules / cmdclass part of setup(), or {} for a pure-Python install."""
    force_cuda = _env_flag("FORCE_CUDA")
    no_cuda = _env_flag("UNETPP_FAST_NO_CUDA")
    if force_cuda and no_cuda:
        raise SystemExit("FORCE_CUDA=1 and UNETPP_FAST_NO_CUDA=1 contradict each other: set one.")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - depends on the build environment
        if force_cuda:
            raise SystemExit(f"FORCE_CUDA=1 but torch cannot be imported at build time: {exc}") from exc
        warnings.warn(f"unetpp_fast: torch not importable at build time ({exc}); installing without _C.")
        return {}

    cuda_home = _find_cuda_home()
    torch_has_cuda = torch.version.cuda is not None
    with_cuda = (not no_cuda) and cuda_home is not None and torch_has_cuda
    if force_cuda and not with_cuda:
        why = []
        if cuda_home is None:
            why.append("no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)")
        if not torch_has_cuda:
            why.append(f"torch {torch.__version__} is a CPU-only build")
        raise SystemExit("FORCE_CUDA=1 but the CUDA part cannot be built: " + "; ".join(why))
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    cxx_flags = ["-O3", "-g0"]  # no debug info: the torch headers make it slow to emit
    define_macros = [("UNETPP_FAST_TORCH_VERSION", f'"{torch.__version__}"')]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if with_cuda:
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        define_macros += [("UNETPP_FAST_WITH_CUDA", "1"), ("UNETPP_FAST_CUDA_ARCHS", f'"{arch_list}"')]
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v"]
        ext = cpp_extension.CUDAExtension(
            "unetpp_fast._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        ext = cpp_extension.CppExtension(
            "unetpp_fast._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )

    meta = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_archs": [a for a in arch_list.replace(",", ";").split(";") if a],
        "cuda_home": cuda_home if with_cuda else None,
    }

    class BuildExt(cpp_extension.BuildExtension):
        """Builds _C, writes the build metadata beside it, and degrades to pure Python if allowed."""

        def run(self) -> None:
            try:
                super().run()
                outcome = dict(meta, extension_built=True)
            except Exception as exc:  # compiler missing or failing
                if force_cuda:
                    raise
                message = (
                    f"building the C++/CUDA extension failed ({exc}). Installed the pure-Python "
                    "package: the 'triton' and 'reference' backends work, 'cpu' and 'cuda' do not. "
                    "Install a C++ compiler (and the CUDA toolkit) and reinstall."
                )
                warnings.warn("unetpp_fast: " + message)
                print(f"WARNING: unetpp_fast: {message}", file=sys.stderr)
                # pip hides build output: the package repeats this warning when imported.
                outcome = dict(meta, extension_built=False, build_error=message)
            target_dir = os.path.dirname(self.get_ext_fullpath("unetpp_fast._C"))
            os.makedirs(target_dir, exist_ok=True)
            with open(os.path.join(target_dir, BUILD_META), "w") as fh:
                json.dump(outcome, fh, indent=1)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)}}


setup(
    packages=find_packages(include=["unetpp_fast", "unetpp_fast.*"]),
    **_extension_setup(),
)
