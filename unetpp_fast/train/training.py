"""Training on DSB2018 as in the UNet++ paper: Adam (lr 3e-4), BCE + Dice (Eq. 2), early stopping on IoU.

    config = TrainConfig(data="../shared/data/dsb2018/96x96", out_dir="runs/unetpp", epochs=100)
    result = train(config)                       # writes best.pth at each improvement, last.pth each epoch
    result = train(TrainConfig(data="", epochs=120), resume="runs/unetpp/last.pth")  # continues there

A run folder belongs to one run: a new run refuses a folder that holds another one unless
`overwrite=True` (the old files are then moved into `replaced-<time>/`, never deleted), a resumed
run continues in its checkpoint's folder unless `out_dir` names another, and every checkpoint is
written atomically (temporary file + rename), so a kill during a save leaves the previous one.

A checkpoint holds the model's architecture (`model` spec), its weights, the optimizer, the epoch,
the best validation IoU so far, the history, the random-number state and the data settings (so
`eval` uses the same validation split). Batch order and augmentation depend only on (seed, epoch),
so a resumed run sees the same batches as an uninterrupted one.

Under torchrun (`torchrun --nproc_per_node=N -m unetpp_fast train ...`) every process runs `train`:
DistributedDataParallel over `distributed`, `batch_size` the global batch split evenly across the
ranks, rank 0 alone validating and writing the run folder. `amp`, `channels_last`, `compile` and
`workers` set how the steps run (see TrainConfig).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unetpp_fast.compat.checkpoint import load_checkpoint
from unetpp_fast.ops import backend_choice
from unetpp_fast.ops.backends import use_backend
from unetpp_fast.train import data as data_module
from unetpp_fast.train import distributed, volume_data
from unetpp_fast.train.losses import BCEDiceLoss
from unetpp_fast.train.metrics import dice_score, iou_score
from unetpp_fast.train.text import plural

CHECKPOINT_FORMAT = "unetpp-fast-train"
CHECKPOINT_VERSION = 1
ARCHS = ("unetpp", "unet", "wide_unet")
AMP_MODES = ("off", "bf16", "fp16")
# Settings of how a run executes, not of what it learns: --resume takes them from the command line.
RUNTIME_SETTINGS = (
    "epochs",
    "patience",
    "device",
    "backend",
    "progress",
    "amp",
    "channels_last",
    "compile",
    "compile_backend",
    "workers",
    "sync_bn",
)
SPATIAL_DIMS = (2, 3)
DEFAULT_PATCH = 64  # 3D: the paper's 64^3 lung-nodule patches
PAPER_FILTERS = (32, 64, 128, 256, 512)
BEST_NAME = "best.pth"
LAST_NAME = "last.pth"
HISTORY_NAME = "history.json"
HISTORY_PLOT_NAME = "history.png"
RUN_FILES = (BEST_NAME, LAST_NAME, HISTORY_NAME, HISTORY_PLOT_NAME)
DEFAULT_OUT_DIR = os.path.join("runs", "unetpp")


class CheckpointError(ValueError):
    """A file that is not a training checkpoint of this package (or a damaged one)."""


class DeviceError(ValueError):
    """A device that does not exist here (e.g. 'cuda' on a machine without a GPU)."""


class RunExistsError(ValueError):
    """The output folder already holds another training run."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; says where the last completed epoch was saved."""

    def __init__(self, run_dir: str, last_path: str | None, epochs_done: int, epochs: int) -> None:
        super().__init__(f"training interrupted after {plural(epochs_done, 'completed epoch')}")
        self.run_dir, self.last_path, self.epochs_done, self.epochs = run_dir, last_path, epochs_done, epochs


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in its checkpoints)."""

    data: str
    # "" = runs/unetpp for a new run, the checkpoint's own folder for a resumed one
    out_dir: str = ""
    arch: str = "unetpp"
    filters: tuple[int, ...] = PAPER_FILTERS
    deep_supervision: bool = True
    block: str = "conv_bn_relu"
    upsample: str = "bilinear_ac"
    size: int = 96
    # None: images resized to size x size (the paper); S: random S x S crops at native resolution
    crop: int | None = None
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
    # How the steps run (not what is learnt): taken from the command line again on --resume.
    amp: str = "off"  # autocast dtype: off, bf16, fp16 (fp16 with GradScaler, CUDA only)
    channels_last: bool | None = None  # None: channels_last on CUDA, NCHW on the CPU
    compile: bool = False  # torch.compile of the training model (the fused ops stay graph nodes)
    compile_backend: str = "inductor"
    workers: int = 0  # DataLoader worker processes (0: batches made in the training process)
    sync_bn: bool = False  # SyncBatchNorm across torchrun processes
    # 3D: volumes (volume_data layout), trained on random crop^3 patches (crop defaults to 64)
    dims: int = 2
    hu_window: tuple[float, float] | None = None  # CT: clip HU to (low, high), scale to [0, 1]; None: z-score
    foreground: float = volume_data.DEFAULT_FOREGROUND  # share of 3D patches centred on a foreground voxel
    patches_per_volume: int = 1  # 3D training samples per volume and epoch

    def __post_init__(self) -> None:
        self.filters = tuple(int(f) for f in self.filters)
        if self.dims not in SPATIAL_DIMS:
            raise ValueError(f"dims must be one of {SPATIAL_DIMS}, got {self.dims!r}")
        self.hu_window = volume_data.check_hu_window(self.hu_window)
        if self.dims == 3 and self.crop is None:
            self.crop = DEFAULT_PATCH
        if not isinstance(self.patches_per_volume, int) or self.patches_per_volume < 1:
            raise ValueError(f"patches_per_volume must be a positive int, got {self.patches_per_volume!r}")
        if not 0.0 <= self.foreground <= 1.0:
            raise ValueError(f"foreground must be in [0, 1], got {self.foreground!r}")
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
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {self.workers!r}")
        multiple = 2 ** (len(self.filters) - 1)
        name, value = ("crop", self.crop) if self.crop is not None else ("size", self.size)
        if not isinstance(value, int) or value < 1 or value % multiple:
            raise ValueError(
                f"{name} {value} must be a multiple of {multiple} "
                f"(2**depth for {len(self.filters)} filter levels)"
            )

    def model_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "arch": self.arch,
            "in_channels": 3 if self.dims == 2 else 1,
            "num_classes": 1,
            "block": self.block,
            "upsample": self.upsample,
        }
        if self.dims == 3:
            spec["spatial_dims"] = 3
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
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was requested but no CUDA GPU is visible to PyTorch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r}: there are only {plural(torch.cuda.device_count(), 'GPU')}")
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
    out["hu_window"] = list(config.hu_window) if config.hu_window is not None else None
    return out


def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through a temporary file in the same folder, then rename it over `path`.

    os.replace is atomic on POSIX and Windows, so readers (and a kill at any moment) see either the
    old file or the complete new one. fsync first: a rename can reach the disk before the data.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint_atomic(path: str, payload: dict[str, Any]) -> None:
    """torch.save, atomically: a process killed while saving leaves the previous file intact."""
    _atomic_write(path, lambda fh: torch.save(payload, fh))


save_checkpoint = save_checkpoint_atomic  # the name earlier code used


def _remove_stale_temporaries(folder: str) -> None:
    """Temporary files left by a process killed in the middle of a save."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.endswith(".tmp") and any(name.startswith(f".{run_file}.") for run_file in RUN_FILES):
            os.remove(os.path.join(folder, name))


def read_checkpoint(
    path: str, map_location: str | torch.device = "cpu", prefer: str = BEST_NAME
) -> dict[str, Any]:
    """A training checkpoint as a dict, or CheckpointError / FileNotFoundError with the path.

    path: a checkpoint file, or a run folder (then `prefer`, best.pth or last.pth, is read first).
    """
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        for name in (prefer, LAST_NAME if prefer == BEST_NAME else BEST_NAME):
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
        raise CheckpointError(f"cannot read checkpoint {path!r}: {_why_unreadable(path, exc)}") from None
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


def _why_unreadable(path: str, exc: Exception) -> str:
    """What a file that torch.load rejected is not, in words (its exceptions are often just a number)."""
    import zipfile

    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return "the file is incomplete (a PyTorch zip archive without its end, e.g. a save that was cut off)"
    if not head.startswith(b"PK") and head[:1] != b"\x80":  # torch.save: zip, or a legacy pickle
        return "it is not a PyTorch file (torch.save writes a zip archive; this is something else)"
    if "weights_only" in str(exc) or "Unsupported global" in str(exc):
        return "it holds Python objects other than tensors and plain values, so it was not written by train"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return "the file is damaged" + (f" ({first})" if first and not first.isdigit() else "")


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
    model: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 32,
    on_done: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Eval-mode logits [N, 1, H, W] (on the CPU) of uint8 images [N, 3, H, W].

    on_done: called with the number of images of each finished batch (progress bars).
    """
    model.eval()
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        x = data_module.normalize(images[start : start + batch_size].to(device))
        out = model(x)
        if isinstance(out, (list, tuple)):  # a model left in training form: average the heads
            out = torch.stack(list(out)).mean(dim=0)
        outputs.append(out.float().cpu())
        if on_done is not None:
            on_done(x.shape[0])
    return torch.cat(outputs)


def score(logits: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Mean per-image IoU and Dice (threshold 0.5 on the probability)."""
    target = masks.float()
    return {
        "iou": float(iou_score(logits, target, reduction="none").mean()),
        "dice": float(dice_score(logits, target, reduction="none").mean()),
    }


def score_images(logits: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> dict[str, float]:
    """Mean per-image IoU and Dice of images of different sizes (logits and masks [1, H, W] each)."""
    ious = [float(iou_score(lg[None], m[None].float(), reduction="none")[0]) for lg, m in zip(logits, masks)]
    dices = [
        float(dice_score(lg[None], m[None].float(), reduction="none")[0]) for lg, m in zip(logits, masks)
    ]
    return {"iou": sum(ious) / len(ious), "dice": sum(dices) / len(dices)}


def dataset_logits(
    model: nn.Module,
    dataset: data_module.NucleiDataset,
    device: torch.device,
    batch_size: int,
    on_done: Callable[[int], None] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Eval-mode logits of every image: a tensor for a resized dataset, a list at native resolution.

    on_done: called with the number of images finished, batch by batch (progress bars).
    """
    if isinstance(dataset, volume_data.VolumeDataset):
        from unetpp_fast.train.volume_inference import volume_logits_list

        return volume_logits_list(model, dataset.images, device, on_done=on_done)
    if dataset.native:
        from unetpp_fast.train.inference import native_logits_list

        return native_logits_list(model, dataset.images, device, on_done=on_done)
    return predict_logits(model, dataset.images, device, batch_size, on_done)


def score_dataset(
    logits: torch.Tensor | list[torch.Tensor], dataset: data_module.NucleiDataset
) -> dict[str, float]:
    if dataset.native:
        return score_images(logits, dataset.masks)
    return score(logits, dataset.masks)


def validate(model: nn.Module, val: data_module.NucleiDataset, device: torch.device, batch_size: int) -> dict:
    logits = dataset_logits(model, val, device, batch_size)
    if val.native:
        losses = [float(BCEDiceLoss()(lg[None], m[None].float())) for lg, m in zip(logits, val.masks)]
        loss = sum(losses) / len(losses)
    else:
        loss = float(BCEDiceLoss()(logits, val.masks.float()))
    out = {"val_loss": loss, **{f"val_{k}": v for k, v in score_dataset(logits, val).items()}}
    if isinstance(val, volume_data.VolumeDataset):
        # Volumes without foreground predicted empty score 1 in val_iou: report the others apart.
        found = [(lg, m) for lg, m in zip(logits, val.masks) if m.any()]
        if found:
            out["val_iou_foreground"] = score_images([f[0] for f in found], [f[1] for f in found])["iou"]
    return out


# ----------------------------------------------------------------------------------------------
# training


def load_split(config: TrainConfig) -> tuple[data_module.NucleiDataset, data_module.NucleiDataset]:
    """The (train, val) datasets of `config` (same seed, limit, fraction -> same split)."""
    if config.dims == 3:
        volumes = volume_data.load_volumes(
            config.data, config.hu_window, config.limit, config.seed, progress=config.progress
        )
        return data_module.split_dataset(volumes, config.val_fraction, config.seed)
    data = data_module.load_dataset(
        config.data,
        config.size,
        config.limit,
        config.seed,
        progress=config.progress,
        native=config.crop is not None,
    )
    return data_module.split_dataset(data, config.val_fraction, config.seed)


def _resumed_config(payload: dict[str, Any], overrides: TrainConfig) -> TrainConfig:
    """The checkpoint's config, with the settings that may change between runs taken from `overrides`.

    The run continues in the checkpoint's own folder unless `overrides.out_dir` names another.
    """
    stored = dict(payload["config"])
    for name in RUNTIME_SETTINGS:
        stored[name] = getattr(overrides, name)
    stored["out_dir"] = overrides.out_dir or os.path.dirname(os.path.abspath(payload["path"]))
    if overrides.data:
        stored["data"] = overrides.data
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in stored.items() if k in known})


def resume_path(resume: str) -> str:
    """The checkpoint to resume from: a file as given, or a run folder's last.pth (else its best.pth)."""
    resume = os.path.expanduser(str(resume))
    if os.path.isdir(resume) and os.path.isfile(os.path.join(resume, LAST_NAME)):
        return os.path.join(resume, LAST_NAME)
    return resume


def existing_run(folder: str) -> dict[str, Any] | None:
    """What a folder holds of a previous run ({'files', 'best_iou', 'epoch', 'run_id'}), or None."""
    files = [name for name in RUN_FILES if os.path.isfile(os.path.join(folder, name))]
    if not files:
        return None
    found: dict[str, Any] = {"files": files, "best_iou": None, "epoch": None, "run_id": None}
    for name in (LAST_NAME, BEST_NAME):
        if name in files:
            try:
                payload = read_checkpoint(os.path.join(folder, name))
            except (CheckpointError, OSError):
                continue
            found.update(
                best_iou=payload.get("best_iou"), epoch=payload.get("epoch"), run_id=payload.get("run_id")
            )
            break
    return found


def _same_folder(a: str, b: str) -> bool:
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def prepare_run_folder(
    out_dir: str, resumed: dict[str, Any] | None, overwrite: bool, log: Callable[[str], None]
) -> None:
    """Make sure `out_dir` may take this run's files; with `overwrite`, move another run's files aside.

    A folder holding another run is refused (RunExistsError) unless this run resumes from it, or
    `overwrite` is set: then the old files go into out_dir/replaced-<time>/, so no result is lost.
    """
    prior = existing_run(out_dir)
    if prior is not None:
        resuming_here = resumed is not None and _same_folder(
            os.path.dirname(os.path.abspath(resumed["path"])), out_dir
        )
        if not resuming_here and not overwrite:
            what = ""
            if prior["best_iou"] is not None:
                what = f" (best IoU {prior['best_iou']:.4f}, {plural(prior['epoch'], 'epoch')})"
            raise RunExistsError(
                f"{out_dir!r} already holds a training run{what}; continue it with --resume "
                f"{os.path.join(out_dir, LAST_NAME)}, choose another --out, or pass --overwrite "
                "(the old files are then moved into a replaced-<time> subfolder)"
            )
        if not resuming_here:
            archive = _fresh_folder(os.path.join(out_dir, "replaced-" + time.strftime("%Y%m%d-%H%M%S")))
            for name in prior["files"]:
                os.replace(os.path.join(out_dir, name), os.path.join(archive, name))
            log(f"moved the previous run's {', '.join(prior['files'])} into {archive}")
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale_temporaries(out_dir)


def _fresh_folder(base: str) -> str:
    """Create and return `base`, or `base-2`, `base-3`, ... when taken (never reuse an archive)."""
    candidate, n = base, 1
    while True:
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{base}-{n}"


def _save_best(path: str, checkpoint: dict[str, Any], log: Callable[[str], None], check: bool = True) -> bool:
    """Write best.pth unless it now holds a better model of another run (two runs racing on a folder).

    check=False skips reading the file on disk: this run wrote it last.
    """
    if check and os.path.isfile(path):
        try:
            on_disk = read_checkpoint(path)
        except (CheckpointError, OSError):
            on_disk = None
        if (
            on_disk is not None
            and on_disk.get("run_id") != checkpoint["run_id"]
            and float(on_disk.get("best_iou", -1.0)) >= checkpoint["best_iou"]
        ):
            log(
                f"warning: {path} holds a better model of another run (IoU {on_disk['best_iou']:.4f}); "
                "left it in place"
            )
            return False
    save_checkpoint_atomic(path, checkpoint)
    return True


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of --amp (None: full precision)."""
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def use_channels_last(config: TrainConfig, device: torch.device) -> bool:
    """channels_last unless told otherwise on CUDA (the fused kernels' layout: no conversions per call)."""
    return device.type == "cuda" if config.channels_last is None else bool(config.channels_last)


def check_runtime(config: TrainConfig, device: torch.device) -> None:
    """Refuse settings this device cannot run, in one line (the CLI exits 2 on ValueError)."""
    if config.amp == "fp16" and device.type != "cuda":
        raise ValueError(
            "--amp fp16 needs a CUDA GPU (fp16 training relies on GradScaler loss scaling there); "
            "on the CPU use --amp bf16"
        )


def train(
    config: TrainConfig,
    resume: str | None = None,
    log: Callable[[str], None] | None = None,
    datasets: tuple[data_module.NucleiDataset, data_module.NucleiDataset] | None = None,
    overwrite: bool = False,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train (or continue training) and return the best validation IoU and the history.

    resume: a checkpoint (or its run folder) written by this function; the model, data split and
    optimizer settings come from it, `epochs` (the total), `patience`, `device`, `backend` and the
    execution settings (amp, channels_last, compile, workers, sync_bn) from `config`, and the run
    continues in the checkpoint's folder unless `config.out_dir` names another.
    datasets: (train, val) already loaded, instead of reading `config.data`.
    overwrite: start a new run in a folder that holds another (its files are moved aside, not lost).
    on_start: called with a summary (model, parameters, device, backend, images, folder) before epoch 1.
    Ctrl-C raises TrainingInterrupted, which names the last.pth to resume from.

    Under torchrun (WORLD_SIZE > 1) every process calls this: the model is wrapped in
    DistributedDataParallel, `config.batch_size` is the global batch split evenly across the ranks,
    rank 0 alone validates, logs and writes the run folder while the others wait, and every rank
    returns the same result.
    """
    from tqdm import tqdm

    log = log or (lambda message: tqdm.write(message))
    payload = read_checkpoint(resume_path(resume), prefer=LAST_NAME) if resume else None
    if payload is not None:
        config = _resumed_config(payload, config)
    elif not config.out_dir:
        config = dataclasses.replace(config, out_dir=DEFAULT_OUT_DIR)
    device = resolve_device(config.device)
    check_runtime(config, device)
    ranks = distributed.env_ranks()
    local_batch = distributed.local_batch_size(config.batch_size, ranks[1] if ranks else 1)
    if ranks is not None and ranks[0] != 0:
        # One voice: rank 0 logs, draws the bars and reports; the others only train.
        log, on_start, config = (lambda message: None), None, dataclasses.replace(config, progress=False)
    ctx, device = distributed.start(device)
    try:
        return _train(config, payload, device, ctx, local_batch, log, datasets, overwrite, on_start)
    finally:
        distributed.finish(ctx)


def _train(
    config: TrainConfig,
    payload: dict[str, Any] | None,
    device: torch.device,
    ctx: distributed.DistContext | None,
    local_batch: int,
    log: Callable[[str], None],
    datasets: tuple[data_module.NucleiDataset, data_module.NucleiDataset] | None,
    overwrite: bool,
    on_start: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    main = ctx is None or ctx.is_main
    world = 1 if ctx is None else ctx.world_size
    train_set, val_set = datasets if datasets is not None else load_split(config)
    if len(train_set) == 0 or len(val_set) == 0:
        raise data_module.DatasetError("the training and validation splits must both hold samples")
    # After the data: a mistake in the data is reported first, and no folder is made for a run that
    # cannot start. Rank 0 alone touches the folder; the others learn whether it refused.
    if ctx is None:
        prepare_run_folder(config.out_dir, payload, overwrite, log)
    else:
        refusal: BaseException | None = None
        if main:
            try:
                prepare_run_folder(config.out_dir, payload, overwrite, log)
            except (ValueError, OSError) as exc:
                refusal = exc
        refusal = distributed.broadcast_from_main(refusal, ctx, device)
        if refusal is not None:
            raise refusal

    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's too)
    raw = build_model(config.model_spec())
    if payload is not None:
        load_checkpoint(raw, payload["state_dict"])  # every rank resumes from the same file
    raw = raw.to(device)
    channels_last = use_channels_last(config, device)
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last if config.dims == 2 else torch.channels_last_3d)
    model: nn.Module = raw  # what a training step calls: raw, DDP(raw) and/or compiled
    ddp_options: dict[str, Any] = {}
    if ctx is not None:
        side = config.crop or config.size
        example = torch.zeros(2, 3 if config.dims == 2 else 1, *(side,) * config.dims, device=device)
        model, ddp_options = distributed.wrap(raw, ctx, device, example, config.sync_bn, config.compile)
        raw = model.module  # with SyncBatchNorm when asked; the same parameters
    elif config.sync_bn:
        log("note: --sync-bn has no effect in a single process (it synchronises BatchNorm across ranks)")
    if config.compile:
        model = torch.compile(model, backend=config.compile_backend)
    optimizer = torch.optim.Adam(raw.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    history: list[dict[str, Any]] = []
    run_id = uuid.uuid4().hex
    start_epoch, best_iou, best_epoch, since_best = 0, -1.0, 0, 0
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        if scaler.is_enabled() and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        start_epoch = int(payload["epoch"])
        best_iou, best_epoch = float(payload["best_iou"]), int(payload["best_epoch"])
        since_best = int(payload["epochs_since_best"])
        history = list(payload["history"])
        run_id = payload.get("run_id") or run_id
        _set_rng_state(payload["rng"])
        log(f"resumed from {payload['path']} after epoch {start_epoch} (best IoU {best_iou:.4f})")

    samples = training_samples(config, train_set)
    loader = data_module.train_loader(
        samples,
        local_batch,
        config.seed,
        rank=0 if ctx is None else ctx.rank,
        world_size=world,
        workers=config.workers,
        pin_memory=device.type == "cuda",
    )
    best_path = os.path.join(config.out_dir, BEST_NAME)
    last_path = os.path.join(config.out_dir, LAST_NAME)
    data_info = _data_info(config, train_set, val_set)
    if on_start is not None:
        with use_backend(config.backend):
            backend_name = backend_choice.describe(device, training=True)
        on_start(
            {
                "model": config.model_spec(),
                "params": count_parameters(raw),
                "device": device,
                "backend": backend_name,
                "unmatched_masks": data_module.unmatched_masks(config.data)
                if datasets is None and config.dims == 2
                else [],
                "n_train": len(train_set),
                "n_val": len(val_set),
                "out_dir": config.out_dir,
                "start_epoch": start_epoch,
                "epochs": config.epochs,
                "config": config,
                "processes": world,
                "local_batch": local_batch,
                "channels_last": channels_last,
                "ddp": ddp_options,
            }
        )
    stopped_early = bool(payload is not None and config.patience and since_best >= config.patience)
    if payload is not None and payload.get("data", {}).get("val_ids") not in (None, list(val_set.ids)):
        log(
            "warning: the validation split differs from the checkpoint's (other data folder or files changed)"
        )
    state = {"epochs_done": start_epoch}
    best_written = False  # once this run has written best.pth, no other run's model is in it
    steps = _Steps(model, optimizer, scaler, config, device, ctx, channels_last)
    try:
        with use_backend(config.backend):
            for epoch in range(start_epoch, config.epochs):
                if config.patience and since_best >= config.patience:
                    stopped_early = True
                    break
                began = time.perf_counter()
                stats = steps.epoch(loader, samples, epoch)
                outcome = None
                if main:
                    metrics = validate(raw, val_set, device, max(config.batch_size, 16))
                    record = {
                        "epoch": epoch + 1,
                        "train_loss": stats["train_loss"],
                        **metrics,
                        "seconds": time.perf_counter() - began,
                        "images_per_s": stats["images_per_s"],
                        **({"peak_gpu_mib": stats["peak_gpu_mib"]} if "peak_gpu_mib" in stats else {}),
                        "processes": world,
                        "step_losses": stats["step_losses"],
                    }
                    improved = record["val_iou"] > best_iou
                    outcome = (record, improved)
                # The other ranks wait here while rank 0 validates, then all keep the same history.
                record, improved = distributed.broadcast_from_main(outcome, ctx, device)
                history.append(record)
                if improved:
                    best_iou, best_epoch, since_best = record["val_iou"], epoch + 1, 0
                else:
                    since_best += 1
                if main:
                    checkpoint = {
                        "format": CHECKPOINT_FORMAT,
                        "version": CHECKPOINT_VERSION,
                        "run_id": run_id,
                        "model": config.model_spec(),
                        "params": count_parameters(raw),
                        "state_dict": raw.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
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
                        best_written = _save_best(best_path, checkpoint, log, check=not best_written)
                    save_checkpoint_atomic(last_path, checkpoint)
                    _write_history(config.out_dir, history)
                    log(
                        f"epoch {epoch + 1}/{config.epochs}  train loss {record['train_loss']:.4f}  "
                        f"val loss {record['val_loss']:.4f}  val IoU {record['val_iou']:.4f}  "
                        f"Dice {record['val_dice']:.4f}  {foreground_text(record)}{speed_text(record)}  "
                        f"{record['seconds']:.1f}s" + ("  * best" if improved else "")
                    )
                state["epochs_done"] = epoch + 1
    except KeyboardInterrupt:
        saved = last_path if os.path.isfile(last_path) else None
        raise TrainingInterrupted(config.out_dir, saved, state["epochs_done"], config.epochs) from None
    if stopped_early:
        log(
            f"early stopping: no IoU improvement for {plural(config.patience, 'epoch')} "
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


def foreground_text(record: dict[str, Any]) -> str:
    """'(volumes with foreground: IoU 0.8123)  ' for 3D records, '' otherwise."""
    if record.get("val_iou_foreground") is None:
        return ""
    return f"(volumes with foreground: IoU {record['val_iou_foreground']:.4f})  "


def speed_text(record: dict[str, Any]) -> str:
    """'412.3 img/s, peak GPU 1,234 MiB' (the memory only on CUDA) of an epoch record or bar."""
    text = f"{record['images_per_s']:.1f} img/s"
    if record.get("peak_gpu_mib") is not None:
        text += f", peak GPU {record['peak_gpu_mib']:,.0f} MiB"
    return text


def training_samples(config: TrainConfig, train_set: Any) -> torch.utils.data.Dataset:
    """The epoch's training samples: augmented images (2D), or random patches of volumes (3D)."""
    if config.dims == 3:
        return volume_data.VolumePatches(
            train_set,
            config.seed,
            config.crop,
            config.augment,
            config.batch_size,
            config.foreground,
            config.patches_per_volume,
        )
    return data_module.TrainSamples(train_set, config.seed, config.augment, config.batch_size, config.crop)


def network_input(images: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """A batch as the network takes it: uint8 images normalised (2D); volumes are normalised at load."""
    return data_module.normalize(images) if dims == 2 else images.float()


def _data_info(
    config: TrainConfig, train_set: data_module.NucleiDataset, val_set: data_module.NucleiDataset
) -> dict[str, Any]:
    """The data settings a checkpoint keeps, so that eval rebuilds the same validation split."""
    if config.dims == 3:
        return {
            "root": os.path.abspath(config.data),
            "dims": 3,
            "crop": config.crop,
            "size": config.crop,
            "hu_window": list(config.hu_window) if config.hu_window is not None else None,
            "limit": config.limit,
            "seed": config.seed,
            "val_fraction": config.val_fraction,
            "train_ids": list(train_set.ids),
            "val_ids": list(val_set.ids),
        }
    return {
        "root": os.path.abspath(config.data),
        "size": config.size,
        "crop": config.crop,  # not None: trained at native resolution
        "limit": config.limit,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "train_ids": list(train_set.ids),
        "val_ids": list(val_set.ids),
        "mean": list(data_module.MEAN),
        "std": list(data_module.STD),
    }


class _Steps:
    """The training step (autocast, loss scaling, channels_last inputs) and one epoch of it."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        config: TrainConfig,
        device: torch.device,
        ctx: distributed.DistContext | None,
        channels_last: bool,
    ) -> None:
        self.model, self.optimizer, self.scaler, self.config = model, optimizer, scaler, config
        self.device, self.ctx, self.channels_last = device, ctx, channels_last
        self.criterion = BCEDiceLoss()
        self.cast = amp_dtype(config.amp)
        # DDP's gradients are views into its buckets: zeroing them in place keeps the views (setting
        # them to None makes DDP copy each fresh gradient back into its bucket).
        self.grads_to_none = ctx is None

    def step(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch (uint8 images, bool masks); returns the detached loss."""
        x = network_input(images.to(self.device, non_blocking=True), self.config.dims)
        if self.channels_last:
            layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=layout)
        y = masks.to(self.device, non_blocking=True).float()
        self.optimizer.zero_grad(set_to_none=self.grads_to_none)
        with torch.autocast(self.device.type, dtype=self.cast, enabled=self.cast is not None):
            loss = self.criterion(self.model(x), y)  # the loss itself is computed in float32
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def epoch(self, loader: Any, samples: data_module.TrainSamples, epoch: int) -> dict[str, Any]:
        """One pass over this rank's shard: the global mean loss, per-step losses, images/s, peak memory."""
        from tqdm import tqdm

        config, device = self.config, self.device
        world = 1 if self.ctx is None else self.ctx.world_size
        samples.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        self.model.train()
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        bar = tqdm(
            total=len(loader),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=not config.progress,
        )
        losses, counts = [], []
        began = time.perf_counter()
        for index, (images, masks) in enumerate(loader):
            losses.append(self.step(images, masks))
            counts.append(images.shape[0])
            bar.update()
            # float() waits for the GPU: refresh the bar's figures every few steps only
            if not bar.disable and (index % 10 == 0 or index + 1 == len(loader)):
                seen = sum(counts) * world
                postfix = {
                    "loss": f"{float(torch.stack(losses).mean()):.4f}",
                    "img/s": f"{seen / max(time.perf_counter() - began, 1e-9):.1f}",
                }
                if cuda:
                    postfix["GPU"] = f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB"
                bar.set_postfix(postfix)
        bar.close()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        # Each rank's batch losses weighted by its images, summed over the ranks: the global batch
        # losses of this epoch in one collective (the single-process figures when world == 1).
        n = torch.tensor(counts, dtype=torch.float64, device=device)
        sums = torch.stack([torch.stack(losses).to(torch.float64) * n, n])
        sums = distributed.all_reduce_sum(sums, self.ctx).cpu()
        out: dict[str, Any] = {
            "train_loss": float(sums[0].sum() / sums[1].sum()),
            "step_losses": (sums[0] / sums[1]).tolist(),
            "images_per_s": float(sums[1].sum()) / max(seconds, 1e-9),
        }
        if cuda:
            out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        return out


def _write_history(out_dir: str, history: Sequence[dict[str, float]]) -> None:
    """history.json and history.png, rewritten after every epoch (atomically: a kill leaves the last)."""
    from unetpp_fast.bench.plots import plot_history

    text = json.dumps(list(history), indent=1)
    _atomic_write(os.path.join(out_dir, HISTORY_NAME), lambda fh: fh.write(text), mode="w")
    plot_history(history, os.path.join(out_dir, HISTORY_PLOT_NAME))
