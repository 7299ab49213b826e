"""Training on DSB2018 as in the UNet++ paper: Adam (lr 3e-4), BCE + Dice (Eq. 2), early stopping on IoU.

    config = TrainConfig(data="../shared/data/dsb2018/96x96", out_dir="runs/unetpp", epochs=100)
    result = train(config)                       # writes best.pth at each improvement, last.pth each epoch
    result = train(config, resume="runs/unetpp/last.pth")   # continues where it stopped

A checkpoint holds the model's architecture (`model` spec), its weights, the optimizer, the epoch,
the best validation IoU so far, the history, the random-number state and the data settings (so
`eval` uses the same validation split). Batch order and augmentation depend only on (seed, epoch),
so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unetpp_fast.compat.checkpoint import load_checkpoint
from unetpp_fast.ops.backends import use_backend
from unetpp_fast.train import data as data_module
from unetpp_fast.train.losses import BCEDiceLoss
from unetpp_fast.train.metrics import dice_score, iou_score

CHECKPOINT_FORMAT = "unetpp-fast-train"
CHECKPOINT_VERSION = 1
ARCHS = ("unetpp", "unet", "wide_unet")
PAPER_FILTERS = (32, 64, 128, 256, 512)
BEST_NAME = "best.pth"
LAST_NAME = "last.pth"
HISTORY_NAME = "history.json"


class CheckpointError(ValueError):
    """A file that is not a training checkpoint of this package (or a damaged one)."""


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in its checkpoints)."""

    data: str
    out_dir: str = "runs/unetpp"
    arch: str = "unetpp"
    filters: tuple[int, ...] = PAPER_FILTERS
    deep_supervision: bool = True
    block: str = "conv_bn_relu"
    upsample: str = "bilinear_ac"
    size: int = 96
    epochs: int = 100
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.0
    patience: int = 20
    val_fraction: float = 0.2
    seed: int = data_module.DEFAULT_SEED
    limit: int | None = None
    augment: bool = True
    device: str = "auto"
    backend: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.filters = tuple(int(f) for f in self.filters)
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("epochs", "batch_size", "size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 (0 disables early stopping), got {self.patience}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.size % 2 ** (len(self.filters) - 1):
            raise ValueError(
                f"size {self.size} must be a multiple of {2 ** (len(self.filters) - 1)} "
                f"(2**depth for {len(self.filters)} filter levels)"
            )

    def model_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "arch": self.arch,
            "in_channels": 3,
            "num_classes": 1,
            "block": self.block,
            "upsample": self.upsample,
        }
        if self.arch != "wide_unet":
            spec["filters"] = list(self.filters)
        if self.arch == "unetpp":
            spec["deep_supervision"] = self.deep_supervision
        return spec


@dataclass
class TrainResult:
    best_iou: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    best_path: str = ""
    last_path: str = ""


# ----------------------------------------------------------------------------------------------
# models and devices


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A model from a checkpoint's `model` spec: {'arch': 'unetpp' | 'unet' | 'wide_unet', ...}."""
    from unetpp_fast.nn.unetpp import UNet, UNetPlusPlus, wide_unet

    spec = dict(spec)
    arch = spec.pop("arch", None)
    if arch == "unetpp":
        return UNetPlusPlus(**spec)
    if arch == "unet":
        return UNet(**spec)
    if arch == "wide_unet":
        return wide_unet(**spec)
    raise CheckpointError(f"unknown model arch {arch!r} in checkpoint, expected one of {ARCHS}")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> the GPU when there is one, else the CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was requested but no CUDA GPU is available")
    return device


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# checkpoints


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    out["filters"] = list(config.filters)
    return out


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """Write atomically: a run killed while saving never leaves a truncated checkpoint behind."""
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint as a dict, or CheckpointError / FileNotFoundError with the path."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        for name in (BEST_NAME, LAST_NAME):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"checkpoint folder {path!r} holds neither {BEST_NAME} nor {LAST_NAME}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path!r}: {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path!r} is not an unetpp-fast training checkpoint (written by `unetpp-fast train`); "
            "load plain state_dicts with unetpp_fast.load_checkpoint(model, path)"
        )
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has version {payload['version']}, newer than this package"
        )
    payload["path"] = path
    return payload


def load_trained(path: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on `device` with the checkpoint's weights, the checkpoint dict)."""
    payload = read_checkpoint(path)
    model = build_model(payload["model"])
    load_checkpoint(model, payload["state_dict"])
    return model.to(device).eval(), payload


# ----------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 32
) -> torch.Tensor:
    """Eval-mode logits [N, 1, H, W] (on the CPU) of uint8 images [N, 3, H, W]."""
    model.eval()
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        x = data_module.normalize(images[start : start + batch_size].to(device))
        out = model(x)
        if isinstance(out, (list, tuple)):  # a model left in training form: average the heads
            out = torch.stack(list(out)).mean(dim=0)
        outputs.append(out.float().cpu())
    return torch.cat(outputs)


def score(logits: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Mean per-image IoU and Dice (threshold 0.5 on the probability)."""
    target = masks.float()
    return {
        "iou": float(iou_score(logits, target, reduction="none").mean()),
        "dice": float(dice_score(logits, target, reduction="none").mean()),
    }


def validate(model: nn.Module, val: data_module.NucleiDataset, device: torch.device, batch_size: int) -> dict:
    logits = predict_logits(model, val.images, device, batch_size)
    loss = float(BCEDiceLoss()(logits, val.masks.float()))
    return {"val_loss": loss, **{f"val_{k}": v for k, v in score(logits, val.masks).items()}}


# ----------------------------------------------------------------------------------------------
# training


def load_split(config: TrainConfig) -> tuple[data_module.NucleiDataset, data_module.NucleiDataset]:
    """The (train, val) datasets of `config` (same seed, limit, fraction -> same split)."""
    data = data_module.load_dataset(
        config.data, config.size, config.limit, config.seed, progress=config.progress
    )
    return data_module.split_dataset(data, config.val_fraction, config.seed)


def _resumed_config(payload: dict[str, Any], overrides: TrainConfig) -> TrainConfig:
    """The checkpoint's config, with the settings that may change between runs taken from `overrides`."""
    stored = dict(payload["config"])
    for name in ("epochs", "patience", "out_dir", "device", "backend", "progress"):
        stored[name] = getattr(overrides, name)
    if overrides.data:
        stored["data"] = overrides.data
    return TrainConfig(**stored)


def train(
    config: TrainConfig,
    resume: str | None = None,
    log: Callable[[str], None] | None = None,
    datasets: tuple[data_module.NucleiDataset, data_module.NucleiDataset] | None = None,
) -> TrainResult:
    """Train (or continue training) and return the best validation IoU and the history.

    resume: a checkpoint (or its folder) written by this function; the model, data split and
    optimizer settings come from it, `epochs` (the total), `patience`, `out_dir`, `device` and
    `backend` from `config`.
    datasets: (train, val) already loaded, instead of reading `config.data`.
    """
    from tqdm import tqdm

    log = log or (lambda message: tqdm.write(message))
    payload = read_checkpoint(resume) if resume else None
    if payload is not None:
        config = _resumed_config(payload, config)
    device = resolve_device(config.device)
    train_set, val_set = datasets if datasets is not None else load_split(config)
    if len(train_set) == 0 or len(val_set) == 0:
        raise data_module.DatasetError("the training and validation splits must both hold samples")

    torch.manual_seed(config.seed)
    model = build_model(config.model_spec()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    criterion = BCEDiceLoss()
    history: list[dict[str, float]] = []
    start_epoch, best_iou, best_epoch, since_best = 0, -1.0, 0, 0
    if payload is not None:
        load_checkpoint(model, payload["state_dict"])
        optimizer.load_state_dict(payload["optimizer"])
        start_epoch = int(payload["epoch"])
        best_iou, best_epoch = float(payload["best_iou"]), int(payload["best_epoch"])
        since_best = int(payload["epochs_since_best"])
        history = list(payload["history"])
        _set_rng_state(payload["rng"])
        log(f"resumed from {payload['path']} after epoch {start_epoch} (best IoU {best_iou:.4f})")

    os.makedirs(config.out_dir, exist_ok=True)
    best_path = os.path.join(config.out_dir, BEST_NAME)
    last_path = os.path.join(config.out_dir, LAST_NAME)
    data_info = {
        "root": os.path.abspath(config.data),
        "size": config.size,
        "limit": config.limit,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "train_ids": list(train_set.ids),
        "val_ids": list(val_set.ids),
        "mean": list(data_module.MEAN),
        "std": list(data_module.STD),
    }
    stopped_early = bool(payload is not None and config.patience and since_best >= config.patience)
    if payload is not None and payload.get("data", {}).get("val_ids") not in (None, list(val_set.ids)):
        log(
            "warning: the validation split differs from the checkpoint's (other data folder or files changed)"
        )
    with use_backend(config.backend):
        for epoch in range(start_epoch, config.epochs):
            if config.patience and since_best >= config.patience:
                stopped_early = True
                break
            began = time.perf_counter()
            model.train()
            batches = data_module.iterate_batches(
                train_set,
                config.batch_size,
                shuffle=True,
                augment=config.augment,
                seed=config.seed,
                epoch=epoch,
            )
            steps = (len(train_set) + config.batch_size - 1) // config.batch_size
            bar = tqdm(
                batches,
                total=steps,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                unit="batch",
                leave=False,
                disable=not config.progress,
            )
            total_loss, seen = 0.0, 0
            for images, masks in bar:
                x = data_module.normalize(images.to(device, non_blocking=True))
                y = masks.to(device, non_blocking=True).float()
                loss = criterion(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach()) * images.shape[0]
                seen += images.shape[0]
                bar.set_postfix(loss=f"{total_loss / seen:.4f}")
            bar.close()
            metrics = validate(model, val_set, device, max(config.batch_size, 16))
            record = {
                "epoch": epoch + 1,
                "train_loss": total_loss / max(seen, 1),
                **metrics,
                "seconds": time.perf_counter() - began,
            }
            history.append(record)
            improved = record["val_iou"] > best_iou
            if improved:
                best_iou, best_epoch, since_best = record["val_iou"], epoch + 1, 0
            else:
                since_best += 1
            checkpoint = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "model": config.model_spec(),
                "params": count_parameters(model),
                "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "best_iou": best_iou,
                "best_epoch": best_epoch,
                "epochs_since_best": since_best,
                "history": history,
                "rng": _rng_state(),
                "config": _config_dict(config),
                "data": data_info,
            }
            if improved:
                save_checkpoint(best_path, checkpoint)
            save_checkpoint(last_path, checkpoint)
            _write_history(config.out_dir, history)
            log(
                f"epoch {epoch + 1}/{config.epochs}  train loss {record['train_loss']:.4f}  "
                f"val loss {record['val_loss']:.4f}  val IoU {record['val_iou']:.4f}  "
                f"Dice {record['val_dice']:.4f}  {record['seconds']:.1f}s" + ("  * best" if improved else "")
            )
    if stopped_early:
        log(
            f"early stopping: no IoU improvement for {config.patience} epochs "
            f"(best {best_iou:.4f} at epoch {best_epoch})"
        )
    return TrainResult(
        best_iou=best_iou,
        best_epoch=best_epoch,
        epochs_run=len(history),
        stopped_early=stopped_early,
        history=history,
        best_path=best_path,
        last_path=last_path,
    )


def _write_history(out_dir: str, history: Sequence[dict[str, float]]) -> None:
    with open(os.path.join(out_dir, HISTORY_NAME), "w") as fh:
        json.dump(list(history), fh, indent=1)
