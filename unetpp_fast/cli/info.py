"""`unetpp-fast info`: versions, usable backends, GPU, and what the extension was built with."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

from unetpp_fast.cli.options import plural

NAME = "info"
HELP = "versions, usable backends, GPU, and what the extension was built with"
DESCRIPTION = (
    "Print versions (Python, PyTorch, CUDA, Triton), the GPU, the fused-convolution backends usable for "
    "CPU and CUDA tensors, and the build information of the compiled extension."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the information as JSON")


def _gpus() -> list[dict[str, Any]]:
    import torch

    gpus = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return gpus


def collect_info() -> dict[str, Any]:
    import torch

    from unetpp_fast import __version__, available_backends, build_info
    from unetpp_fast.ops.backends import why_unusable

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed, or broken on this platform
        triton_version = None
    backends: dict[str, Any] = {}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        unusable = {name: why_unusable(name, device) for name in ("reference", "triton", "cuda", "cpu")}
        backends[device] = {
            "available": available_backends(device),
            "unavailable": {k: v for k, v in unusable.items() if v},
        }
    if "cuda" not in backends:
        backends["cuda"] = {"available": [], "unavailable": {"all": "no CUDA GPU is visible to PyTorch"}}
    return {
        "unetpp_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cpu_threads": torch.get_num_threads(),
        "gpus": _gpus(),
        "backends": backends,
        "build": build_info(),
    }


def run(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"unetpp-fast {info['unetpp_fast']}  (python {info['python']}, {info['platform']})")
    print(
        f"torch {info['torch']}  CUDA {info['torch_cuda'] or '-'}  triton {info['triton'] or 'not installed'}"
    )
    print(f"CPU: {plural(info['cpu_threads'], 'thread')}")
    for gpu in info["gpus"]:
        capability = gpu["capability"].replace(".", "")
        print(f"GPU {gpu['index']}: {gpu['name']} (sm_{capability}, {gpu['memory_gib']} GiB)")
    if not info["gpus"]:
        print("GPU: none visible to PyTorch")
    for device, entry in info["backends"].items():
        print(f"backends for {device} tensors: {', '.join(entry['available']) or 'none'}")
        for name, reason in entry["unavailable"].items():
            print(f"  {name}: {reason}")
    _print_build(info["build"])
    return 0


def _print_build(build: dict[str, Any]) -> None:
    reason = build["extension_unavailable_reason"]
    print(
        f"extension: {'loaded' if build['extension_loaded'] else 'not loaded'}"
        + (f" ({reason})" if reason else "")
    )
    archs = f" (archs {', '.join(build['cuda_archs'])})" if build["cuda_archs"] else ""
    print(
        f"  built with C++: {build['cxx']}, CUDA: {build['cuda']}{archs}; "
        f"against torch {build['built_against_torch']}, running torch {build['running_torch']}"
    )
    if build["kernels"]:
        print(f"  kernels: {', '.join(build['kernels'])}")
