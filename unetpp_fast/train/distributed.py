"""Multi-process training under torchrun: process group, per-rank device, DDP wrapping, collectives.

    torchrun --nproc_per_node=4 -m unetpp_fast train --data ../shared/data/dsb2018/96x96 --batch-size 32

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `start` reads them and joins the process group
(nccl on GPUs, gloo on CPUs). A plain process (or WORLD_SIZE=1) gets no group and no DDP at all.
The global batch is --batch-size; every rank takes batch_size / world_size of it (see
`local_batch_size`), so the first step's loss equals the single-process run's.
"""

from __future__ import annotations

import copy
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Rank 0 validates and writes checkpoints while the others wait; a full DSB2018 validation on a
# slow CPU takes minutes, so the default 10-minute collective timeout of some backends is too short.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    owns_group: bool  # we created the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's variables, or None for a single process."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or int(world) <= 1:
        return None
    return int(os.environ.get("RANK", "0")), int(world), int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of one rank: cuda:LOCAL_RANK on GPUs (one GPU per process), the CPU otherwise."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(
            f"--device {device} names one GPU, but under torchrun each process uses cuda:LOCAL_RANK; "
            "pass --device cuda (or auto)"
        )
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
            "use --nproc_per_node <= the GPU count"
        )
    return torch.device("cuda", local_rank)


def start(device: torch.device) -> tuple[DistContext | None, torch.device]:
    """Join the torchrun process group when there is one: (context or None, this rank's device)."""
    ranks = env_ranks()
    if ranks is None:
        return None, device
    import torch.distributed as dist

    rank, world, local_rank = ranks
    device = rank_device(device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # nccl collectives and object broadcasts use the current GPU
        dist.init_process_group(backend, timeout=TIMEOUT)
    return DistContext(rank, world, local_rank, backend, owns), device


def finish(ctx: DistContext | None) -> None:
    if ctx is not None and ctx.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Images per rank and step: --batch-size is the global batch, split evenly across the ranks.

    Each rank's loss is the mean over its share and DDP averages the gradients, so with equal shares
    a step is the single-process step on the global batch (BatchNorm aside: --sync-bn).
    """
    if global_batch % world_size:
        raise ValueError(
            f"--batch-size {global_batch} is the global batch and must be divisible by the "
            f"{world_size} processes (WORLD_SIZE)"
        )
    return global_batch // world_size


def broadcast_from_main(value: Any, ctx: DistContext | None, device: torch.device) -> Any:
    """Rank 0's `value` on every rank (a picklable object); the others block here until rank 0 sends."""
    if ctx is None:
        return value
    import torch.distributed as dist

    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=device if ctx.backend == "nccl" else None)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext | None) -> torch.Tensor:
    """The sum over the ranks (in place), or `tensor` itself for a single process."""
    if ctx is not None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def unused_parameters(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the parameters that a training step leaves without a gradient.

    Decided by running one forward and backward of a copy (so the model's BatchNorm statistics are
    untouched) on `example`: UNet++ with deep supervision uses every head, without it builds only the
    last one, so for the models here the list is empty; a model with a dead branch shows up.
    """
    probe = copy.deepcopy(model).train()
    for p in probe.parameters():
        p.grad = None
    out = probe(example)
    heads = list(out) if isinstance(out, (list, tuple)) else [out]
    sum(h.float().sum() for h in heads).backward()
    return [name for name, p in probe.named_parameters() if p.requires_grad and p.grad is None]


def canonical_strides(model: nn.Module) -> None:
    """Give parameters that are contiguous in both layouts the plain contiguous strides.

    A 1x1 head weight [1, C, 1, 1] in channels_last has strides (C, 1, C, C); the fused op returns its
    gradient with (C, 1, 1, 1) - the same layout, since size-1 dimensions have no meaningful stride.
    Autograd's layout contract ignores those strides, DDP's bucket views compare them literally (and
    copy every step, with a warning). Restriding the parameter costs nothing and matches both.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.is_contiguous() and p.stride() != _contiguous_strides(p.shape):
                p.data = p.data.clone(memory_format=torch.contiguous_format)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def ddp_options(unused: list[str], compiled: bool) -> dict[str, Any]:
    """DDP's settings for a model whose training step leaves `unused` parameters without gradients.

    static_graph: every step runs the same graph (one model, the same heads), so DDP records once
    which parameters are used and skips the per-step search; it also covers unused parameters. Not
    with torch.compile, whose DDP graph splitting expects the default reducer: there
    find_unused_parameters is set when (and only when) a parameter is unused.
    """
    return {
        "gradient_as_bucket_view": True,
        "static_graph": not compiled,
        "find_unused_parameters": bool(unused) and compiled,
    }


def wrap(
    model: nn.Module,
    ctx: DistContext,
    device: torch.device,
    example: torch.Tensor,
    sync_bn: bool = False,
    compiled: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """(DistributedDataParallel model, the DDP options chosen) for one rank.

    sync_bn: BatchNorm statistics over the global batch (see `convert_sync_batchnorm`).
    gradient_as_bucket_view: the gradients live in DDP's buckets (no copy); DDP lays each bucket view
    out with its parameter's strides (channels_last weights included) and autograd accumulates the
    fused op's gradients, whatever their strides, into them. See `ddp_options` for the rest.
    """
    from torch.nn.parallel import DistributedDataParallel

    unused = unused_parameters(model, example)
    canonical_strides(model)
    if sync_bn:
        model = convert_sync_batchnorm(model, device)
    options = ddp_options(unused, compiled)
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **options
    )
    return ddp, {**options, "unused_parameters": unused}


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of a sum taken on every rank is the sum of
    the ranks' gradients (torch.distributed.nn's version of this is deprecated)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class _GlobalBatchNorm:
    """BatchNorm whose training statistics cover every rank's batch, on any device (gloo included).

    torch's SyncBatchNorm runs on GPUs only (DDP refuses it on CPU modules). This one all-reduces the
    per-channel sums with a differentiable collective (its backward all-reduces the gradients, as
    SyncBatchNorm's does), two-pass like the single-process kernel: the mean first, then the
    centred squares. Outside multi-process training it is the plain BatchNorm (same state_dict).
    The same code serves images [N, C, H, W] and volumes [N, C, D, H, W] (mixed into BatchNorm2d
    and BatchNorm3d below).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return super().forward(input)
        self._check_input_dim(input)
        work = torch.promote_types(input.dtype, torch.float32)
        x = input.to(work)
        reduce = (0, *range(2, x.dim()))  # every axis but the channels
        shape = (1, -1) + (1,) * (x.dim() - 2)
        count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=work, device=x.device)
        total = _AllReduceSum.apply(torch.cat([x.sum(dim=reduce), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dim=reduce)) / n  # biased, as used to normalise
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape).to(work) + self.bias.view(shape).to(work)
        return out.to(input.dtype)


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """BatchNorm2d with statistics over every rank's batch (see _GlobalBatchNorm)."""


class GlobalBatchNorm3d(_GlobalBatchNorm, nn.BatchNorm3d):
    """BatchNorm3d with statistics over every rank's batch (see _GlobalBatchNorm): 3D training."""


_GLOBAL_BATCHNORM = {nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d / BatchNorm3d of `model` synchronised across the ranks: torch's SyncBatchNorm
    on CUDA (its fused kernels), GlobalBatchNorm2d / GlobalBatchNorm3d elsewhere. The fused blocks
    call their BatchNorm modules in training and fold them from their attributes (weight, bias,
    running statistics, eps) in eval, so either replacement works in both; parameters and buffers
    are the same objects, state_dict keys unchanged.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_batchnorm(model)


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    if type(module) in _GLOBAL_BATCHNORM:
        new = _GLOBAL_BATCHNORM[type(module)](
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        replaced = _replace_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
