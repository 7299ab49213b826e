"""Registers, shared memory and spills of the compiled CUDA kernels, per kernel and architecture.

Read from the built extension with `cuobjdump --dump-resource-usage` (CUDA toolkit, or the copy
that ships inside the Triton wheel), or parsed from captured `nvcc -Xptxas -v` output. A kernel
with LOCAL (spill) bytes is a defect in a hot loop: `spilling_kernels` lists them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelResource:
    kernel: str  # demangled where possible, e.g. "fused_conv_fwd_wmma_kernel<__half, 3>"
    arch: str  # "sm_80"
    registers: int
    shared_bytes: int  # static shared memory
    local_bytes: int  # spill / local memory per thread
    stack_bytes: int


def find_cuobjdump() -> str | None:
    """cuobjdump from $CUDA_HOME, PATH or the Triton wheel; None when there is none."""
    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "bin", "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(on_path)
    try:
        import triton

        candidates.append(
            os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        )
    except ImportError:
        pass
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def extension_library_path() -> str | None:
    """Path of the built unetpp_fast._C shared library, without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("unetpp_fast._C")
    return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    done = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False)
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled C++ names (c++filt; the names themselves when it is missing)."""
    return _demangle(names)


def short_name(demangled: str) -> str:
    """'void ns::(anonymous namespace)::kernel<T, 3>(ns::Params)' -> 'kernel<T, 3>'."""
    return _short_name(demangled)


def _short_name(demangled: str) -> str:
    """'void ns::(anonymous namespace)::kernel<T, 3>(ns::Params)' -> 'kernel<T, 3>'."""
    name = demangled
    if name.startswith("void "):
        name = name[len("void ") :]
    depth = 0
    for index, char in enumerate(name):  # cut the parameter list: the first '(' outside template args
        if char == "<":
            depth += 1
        elif char == ">":
            depth -= 1
        elif char == "(" and depth == 0 and not name.startswith("(anonymous", index):
            name = name[:index]
            break
    name = name.replace("(anonymous namespace)::", "")
    return name.split("::")[-1] if "<" not in name else name[name.rfind("::", 0, name.find("<")) + 2 :]


_FUNCTION = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_USAGE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
_ARCH = re.compile(r"^\s*arch\s*=\s*(sm_\d+a?)")


def parse_resource_usage(text: str) -> list[KernelResource]:
    """Parse `cuobjdump --dump-resource-usage` output."""
    arch = "unknown"
    pending: str | None = None
    raw: list[tuple[str, str, dict[str, int]]] = []
    for line in text.splitlines():
        match = _ARCH.match(line)
        if match:
            arch = match.group(1)
            continue
        match = _FUNCTION.match(line)
        if match:
            pending = match.group(1)
            continue
        if pending is not None and "REG:" in line:
            raw.append((pending, arch, {k: int(v) for k, v in _USAGE.findall(line)}))
            pending = None
    names = _demangle(sorted({name for name, _, _ in raw}))
    return [
        KernelResource(
            kernel=_short_name(names[name]),
            arch=arch,
            registers=usage.get("REG", 0),
            shared_bytes=usage.get("SHARED", 0),
            local_bytes=usage.get("LOCAL", 0),
            stack_bytes=usage.get("STACK", 0),
        )
        for name, arch, usage in raw
    ]


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_verbose(text: str) -> list[KernelResource]:
    """Parse captured `nvcc -Xptxas -v` output (spill bytes = max of spill stores and loads)."""
    raw: list[tuple[str, str, int, int, int, int]] = []
    name = arch = None
    stack = spill = 0
    for line in text.splitlines():
        match = _PTXAS_ENTRY.search(line)
        if match:
            name, arch = match.group(1), match.group(2)
            stack = spill = 0
            continue
        match = _PTXAS_SPILL.search(line)
        if match and name is not None:
            stack, spill = int(match.group(1)), max(int(match.group(2)), int(match.group(3)))
            continue
        match = _PTXAS_USED.search(line)
        if match and name is not None:
            raw.append((name, arch, int(match.group(1)), int(match.group(2) or 0), spill, stack))
            name = None
    names = _demangle(sorted({r[0] for r in raw}))
    return [
        KernelResource(_short_name(names[n]), a, regs, smem, spill, stack)
        for n, a, regs, smem, spill, stack in raw
    ]


def kernel_resources(library: str | None = None) -> list[KernelResource]:
    """Resource usage of every CUDA kernel in the built extension (or in `library`).

    Raises RuntimeError when there is no library with CUDA code or no cuobjdump to read it.
    """
    library = library or extension_library_path()
    if library is None:
        raise RuntimeError("unetpp_fast._C is not built: no CUDA kernels to report")
    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (set CUDA_HOME or install the CUDA toolkit or triton)")
    done = subprocess.run(
        [tool, "--dump-resource-usage", library], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {library}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_resource_usage(done.stdout)


def spilling_kernels(resources: list[KernelResource]) -> list[KernelResource]:
    """Kernels that use local memory (register spills or local arrays)."""
    return [r for r in resources if r.local_bytes > 0]


def format_table(resources: list[KernelResource]) -> str:
    """A plain-text table: kernel, arch, registers, shared bytes, local (spill) bytes."""
    header = ("kernel", "arch", "regs", "smem B", "local B")
    rows = [(r.kernel, r.arch, str(r.registers), str(r.shared_bytes), str(r.local_bytes)) for r in resources]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


if __name__ == "__main__":
    print(format_table(kernel_resources()))
