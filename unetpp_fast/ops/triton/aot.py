"""Ahead-of-time compilation of every Triton kernel and block config for sm_80 and sm_90, no GPU needed.

The interpreter accepts code the compiler rejects, so CI compiles everything here: each kernel
with each of its autotune configs (configs.py), for a representative specialisation (bf16,
3x3; the resample mode is a run-time value of the piece table), and reads
from the cubin the registers, shared memory and LOCAL (spill) bytes with `cuobjdump
--dump-resource-usage`; the PTX shows whether the dots became tensor-core instructions (`mma`
on sm_80, `wgmma` or `mma` on sm_90).

    python -m unetpp_fast.ops.triton.aot            # prints the resource table
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.kernel_resources import find_cuobjdump, parse_resource_usage
from unetpp_fast.ops.triton import configs
from unetpp_fast.ops.triton.fused_conv_forward import ACTIVATION_CODES, fused_conv_forward_kernel
from unetpp_fast.ops.triton.fused_conv_forward_packed import fused_conv_forward_packed_kernel
from unetpp_fast.ops.triton.fused_conv_forward_staged import fused_conv_forward_staged_kernel
from unetpp_fast.ops.triton.fused_conv_input_grad import input_grad_kernel, input_grad_up_kernel
from unetpp_fast.ops.triton.fused_conv_weight_grad import preactivation_grad_kernel, weight_grad_kernel

ARCHS = (80, 90)
_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel with the constexprs (other than block sizes) of the specialisation to compile."""

    name: str  # key into configs (which block configs it is tuned over)
    fn: triton.JITFunction
    constexprs: dict
    fp32_pointers: tuple[str, ...] = ()  # pointer arguments that are fp32 whatever the data type


def kernel_specs(quick: bool = False, dims: tuple[int, ...] = (2, 3)) -> list[KernelSpec]:
    """The specialisations a UNet++ compiles, 2D then 3D (the constexpr DIMS; the same kernels): the
    forward (one per k, dtype, activation, bias: the pieces and their modes come from the
    descriptor table at run time) and each backward kernel.

    `quick` is accepted for compatibility (the forward no longer unrolls per piece: one size fits).
    """
    del quick
    specs = []
    for d in dims:
        name = functools.partial(configs.config_name, dims=d)
        forward = dict(
            KSIZE=3,
            DIMS=d,
            HAS_BIAS=True,
            ACT=ACTIVATION_CODES["relu"],
            PRECISION="ieee",
            C_CONTIG=True,
            OUT_DENSE=True,
            VEC=8,
        )
        grad = dict(KSIZE=3, DIMS=d, PRECISION="ieee", C_CONTIG=True)
        # On a GPU the launchers hand the kernels channels_last tensors: the channel stride is 1, which
        # Triton specialises as a constant (so channel accesses vectorise).
        forward.update(so_c=1)
        # The packed forward: the input convolution as UNet++ launches it (2D: RGB, channels_last
        # output; 3D: one channel, so the output stays NCDHW), and the largest reduction it takes
        # (K 63 / 54: two K blocks).
        packed = dict(
            C_IN=3 if d == 2 else 1,
            KSIZE=3,
            DIMS=d,
            HAS_BIAS=True,
            ACT=ACTIVATION_CODES["relu"],
            PRECISION="ieee",
            OUT_DENSE=d == 2,
            OUT_ALIGNED=d == 2,
            BLOCK_K=32,
        )
        specs += [
            KernelSpec(name("forward_packed"), fused_conv_forward_packed_kernel, packed),
            KernelSpec(
                name("forward_packed"),
                fused_conv_forward_packed_kernel,
                dict(packed, C_IN=7 if d == 2 else 2),
            ),
        ]
        if d == 2:  # the staged forward: 2D, 3x3 and 1x1 (the heads)
            staged = dict(
                HAS_BIAS=True, ACT=ACTIVATION_CODES["relu"], PRECISION="ieee", KSIZE=3, VEC=8, BLOCK_K=32
            )
            specs.append(KernelSpec("forward_staged", fused_conv_forward_staged_kernel, staged))
            specs.append(
                KernelSpec("forward_staged_1x1", fused_conv_forward_staged_kernel, dict(staged, KSIZE=1))
            )
        specs += [
            KernelSpec(name("forward"), fused_conv_forward_kernel, forward),
            # The input convolution (1 or 3 channels): no 16-byte channel vectors, own configs.
            KernelSpec(name("forward_scalar"), fused_conv_forward_kernel, dict(forward, VEC=1)),
            KernelSpec(
                name("preactivation_grad"),
                preactivation_grad_kernel,
                dict(ACT=ACTIVATION_CODES["relu"], DIMS=d, s_go_c=1, s_o_c=1),
            ),
            KernelSpec(name("input_grad"), input_grad_kernel, dict(grad, POOL=False)),
            KernelSpec(name("input_grad_maxpool"), input_grad_kernel, dict(grad, POOL=True)),
            KernelSpec(name("input_grad_up"), input_grad_up_kernel, grad),
            KernelSpec(name("weight_grad"), weight_grad_kernel, dict(grad, VEC=8), ("part_ptr",)),
            KernelSpec(name("weight_grad"), weight_grad_kernel, dict(grad, VEC=1), ("part_ptr",)),
        ]
    return specs


def signature_of(spec: KernelSpec, dtype: str, constexprs: dict) -> dict[str, str]:
    """Argument types by naming convention: table_ptr int64, *_ptr the data type (or fp32 where
    listed), scale*/slope fp32, the rest i32."""
    signature = {}
    for name in spec.fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("table_ptr", "gtable_ptr"):
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in spec.fp32_pointers else f"*{_TRITON_TYPES[dtype]}"
        elif name.startswith("scale") or name.endswith(("scale_h", "scale_w")) or name == "slope":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


# Integer arguments that are not multiples of 16 in a typical call: pixel counts and spatial sizes.
_UNALIGNED_INTS = re.compile(r"M|D|H|W|HP|WP|ph|pw|x\d_[hw]")


def _divisible_by_16(fn: triton.JITFunction, name: str, arg_type: str) -> bool:
    """As a real launch specialises: pointers are 16-byte aligned unless the kernel opts out
    (do_not_specialize_on_alignment); ints the kernel leaves unspecialised get no attribute; other
    channel counts and strides are multiples of 16 (UNet++ channel counts are multiples of 32)."""
    if arg_type.startswith("*"):
        return name not in fn.do_not_specialize_on_alignment
    if name in fn.do_not_specialize:
        return False
    return arg_type == "i32" and not _UNALIGNED_INTS.fullmatch(name)


@dataclass(frozen=True)
class CompiledKernel:
    kernel: str
    dims: int  # 2 or 3: the DIMS constexpr
    mode: str
    shape_class: str
    config: str
    arch: int
    dtype: str
    registers: int
    shared_bytes: int
    local_bytes: int
    stack_bytes: int  # per-thread stack frame: register spills in these kernels (no local arrays)
    dot_instructions: tuple[str, ...]  # tensor-core instructions found in the PTX


def _config_text(config: triton.Config) -> str:
    blocks = ",".join(f"{k[len('BLOCK_') :]}{v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps}s{config.num_stages}"


def _dot_instructions(ptx: str) -> tuple[str, ...]:
    found = []
    for word in ("wgmma.mma_async", "mma.sync"):
        if word in ptx:
            found.append(word)
    return tuple(found)


def compile_one(
    spec: KernelSpec,
    config: triton.Config,
    arch: int,
    dtype: str,
    workdir: str,
    tool: str,
    cubin_name: str | None = None,
):
    """Compile one specialisation; the cubin stays in `workdir` (as `cubin_name`, default
    '<kernel>_<arch>.cubin')."""
    constexprs = dict(spec.constexprs, **config.kwargs)
    signature = signature_of(spec, dtype, constexprs)
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(spec.fn.arg_names)
        if _divisible_by_16(spec.fn, name, signature[name])
    }
    source = ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    path = os.path.join(workdir, cubin_name or f"{spec.fn.__name__}_{arch}.cubin")
    with open(path, "wb") as handle:
        handle.write(compiled.asm["cubin"])
    done = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {path}: {done.stderr.strip() or done.stdout.strip()}")
    usage = parse_resource_usage(done.stdout)
    if len(usage) != 1:
        raise RuntimeError(f"expected one kernel in {path}, cuobjdump reported {len(usage)}")
    mode = spec.constexprs.get("MODE", "")  # "": the mode is a run-time value of the piece table
    return CompiledKernel(
        kernel=spec.name,
        dims=spec.constexprs.get("DIMS", 2),
        mode=conv_spec.RESAMPLE_MODES[mode] if mode != "" else "",
        shape_class="",
        config=_config_text(config),
        arch=arch,
        dtype=dtype,
        registers=usage[0].registers,
        shared_bytes=usage[0].shared_bytes,
        local_bytes=usage[0].local_bytes,
        stack_bytes=usage[0].stack_bytes,
        dot_instructions=_dot_instructions(compiled.asm["ptx"]),
    )


def specs_from_records(records: list[dict]) -> list[tuple[KernelSpec, triton.Config, str]]:
    """(spec, config, dtype) of each compilation a run recorded (benchmarks/host_path.py: StubRuntime
    records {kernel, dtypes, constexprs, config}): exactly the kernels a model launches, for the
    static performance model. Unit channel strides are added as a real launch specialises them."""
    defaults = {
        (spec.fn.__name__, spec.constexprs.get("POOL"), spec.constexprs["DIMS"]): spec
        for spec in kernel_specs(dims=(2, 3))
    }
    found = []
    for record in records:
        key = (record["kernel"], record["constexprs"].get("POOL"), record["constexprs"].get("DIMS", 2))
        base = defaults[key]
        constexprs = {k: v for k, v in base.constexprs.items() if k not in ("MODE",)}
        constexprs.update(record["constexprs"])
        blocks = {k: v for k, v in record["config"].items() if k.startswith("BLOCK_")}
        config = triton.Config(
            blocks, num_warps=record["config"]["num_warps"], num_stages=record["config"]["num_stages"]
        )
        data = [d for d in record["dtypes"] if d not in ("torch.float32", "torch.int64")]
        dtype = data[0].removeprefix("torch.") if data else "float32"
        name = base.name
        if base.fn is fused_conv_forward_kernel:  # two config lists: by the vector width
            name = configs.config_name("forward" if constexprs["VEC"] > 1 else "forward_scalar", key[2])
        spec = KernelSpec(name, base.fn, constexprs, base.fp32_pointers)
        found.append((spec, config, dtype))
    return found


def compile_records(records: list[dict], outdir: str, arch: int = 90) -> list[tuple[CompiledKernel, str]]:
    """Compile what `records` name for `arch` into `outdir`: (resources, cubin path) each; read the
    SASS with `cuobjdump -sass <cubin>`."""
    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships with the CUDA toolkit and inside the triton wheel)")
    os.makedirs(outdir, exist_ok=True)
    results = []
    for index, (spec, config, dtype) in enumerate(specs_from_records(records)):
        name = f"{index:02d}_{spec.fn.__name__}_sm{arch}.cubin"
        results.append(
            (compile_one(spec, config, arch, dtype, outdir, tool, name), os.path.join(outdir, name))
        )
    return results


def jobs(quick: bool = False) -> Iterator[tuple[KernelSpec, str, triton.Config, int]]:
    """Every (kernel specialisation, shape class, config, arch); `quick`: the first config of each
    kernel specialisation only (what CI affords on two cores)."""
    for spec in kernel_specs(quick):
        for arch in ARCHS:
            listed = configs.all_gpu_configs(spec.name, arch=arch)
            for shape_class, config in listed[:1] if quick else listed:
                yield spec, shape_class, config, arch


def compile_all(
    dtype: str = "bfloat16", archs: tuple[int, ...] = ARCHS, quick: bool = False
) -> list[CompiledKernel]:
    """Compile every kernel x config x arch; raises RuntimeError when there is no cuobjdump."""
    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships with the CUDA toolkit and inside the triton wheel)")
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for spec, shape_class, config, arch in jobs(quick):
            if arch not in archs:
                continue
            result = compile_one(spec, config, arch, dtype, workdir, tool)
            results.append(CompiledKernel(**{**result.__dict__, "shape_class": shape_class}))
    return results


def format_table(results: list[CompiledKernel]) -> str:
    header = (
        "kernel",
        "dims",
        "mode",
        "class",
        "config",
        "sm",
        "dtype",
        "regs",
        "smem B",
        "local B",
        "stack B",
        "dot",
    )
    rows = [
        (
            r.kernel,
            f"{r.dims}D",
            r.mode,
            r.shape_class,
            r.config,
            str(r.arch),
            r.dtype,
            str(r.registers),
            str(r.shared_bytes),
            str(r.local_bytes),
            str(r.stack_bytes),
            "+".join(r.dot_instructions) or "-",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first config of each kernel only")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_TRITON_TYPES))
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    results = compile_all(args.dtype, quick=args.quick)
    print(json.dumps([asdict(r) for r in results]) if args.json else format_table(results))


if __name__ == "__main__":
    main()
