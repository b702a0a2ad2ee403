"""The real-data training loop behind ``sgr-ext train``: global BP, plain local learning, SGR.

``train(TrainConfig(...))`` runs one configuration end to end and returns the results
dict also written to ``<out>/results.json``. With ``dataset=`` a preloaded (device)
``TensorDataset`` is reused, which the study runner does to train many configurations
in one process.

Under ``torchrun`` (``sgr_ext.distributed.setup_from_env``) the run is data parallel
(``DataParallelLocalNet``; DDP for global BP) or module parallel (``PipelineStage``): every
rank builds the same model from the same seed and reads the same global batches in the
same order with the same augmentation (the generators are seeded from ``cfg.seed`` and
the epoch only); only the logging rank (``runner.is_logging_rank``) writes files, prints
or shows a progress bar. Evaluation is sharded over the ranks (counts all-reduced).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sgr_ext import _checks
from sgr_ext import distributed as sgr_dist
from sgr_ext.data import TensorDataset
from sgr_ext.memory import PeakMemory
from sgr_ext.net import NONFINITE_POLICIES, LocalNet, NonFiniteError
from sgr_ext.split import model_units, split
from sgr_ext.trainer import archs, checkpoint, metrics
from sgr_ext.trainer.augment import random_crop_flip
from sgr_ext.trainer.data import load_dataset, match_channels, subset
from sgr_ext.trainer.streaming import LOADERS, ImageSource

METHODS = ("bp", "local", "sgr", "sgr-fast")
SCHEDULES = ("onecycle", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
AUGMENTS = ("auto", "crop-flip", "flip", "none")
GRADS = ("backward", "forward")
PARALLEL = ("auto", "none", "data", "module")
DEFAULT_LAM = 0.1
CHECKPOINT_NAME = "checkpoint.pt"

# Settings that must match for --resume to continue the same run.
_RESUME_KEYS = (
    "arch", "modules", "method", "distance", "lam_warmup", "epochs", "batch_size", "lr",
    "optimizer", "momentum", "weight_decay", "schedule", "amp", "seed", "augment", "image_size",
    "train_subset", "test_subset", "diag_every", "log_every", "grad", "num_tangents",
)
# Keys added after the first checkpoints were written: their value in such a checkpoint.
_RESUME_DEFAULTS = {"grad": "backward", "num_tangents": 1}


class TrainingDiverged(FloatingPointError):
    """A loss or penalty became NaN/Inf during training."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (the CLI flags of ``sgr-ext train``).

    To add an option: add a field here (with a default) and an ``add_argument`` with the
    same dest in ``sgr_ext.trainer.cli``; ``TrainConfig.from_namespace`` picks it up. Options
    that only change how a LocalNet is built go to ``localnet_kwargs``.
    """

    arch: str = "resnet32"
    modules: int = 4
    method: str = "sgr"
    lam: Optional[float] = None  # None: DEFAULT_LAM for sgr methods, 0 for local
    distance: str = "l2"
    lam_warmup: float = 0.0  # epochs of linear lambda warm-up from 0
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    amp: bool = False
    seed: int = 0
    data: str = "digits"
    out: Optional[str] = "runs/train"
    resume: Optional[str] = None  # None, "auto" (= <out>/checkpoint.pt) or a checkpoint path
    device: Optional[str] = None
    deterministic: bool = False
    augment: str = "auto"
    image_size: Optional[int] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    diag_every: int = 1  # plain local learning: measure cos/ratio of A_k vs D_{k-1} every N steps
    log_every: int = 10  # sample per-step stats into steps.csv every N steps
    eval_batch_size: int = 1000
    checkpoint: bool = True
    stop_after: Optional[int] = None  # stop after this many epochs of this invocation (resume later)
    plots: bool = True
    progress: bool = True
    grad: str = "backward"  # "forward": BP-free forward-gradient engine (sgr_ext.engine.forward_grad)
    num_tangents: int = 1  # grad="forward": tangent draws averaged per estimate
    nonfinite: str = "raise"  # LocalNet's policy for NaN/Inf: raise (stop the run), skip (the step), warn
    loader: str = "auto"  # image directories: auto (whole when small), memory or stream (a DataLoader)
    workers: Optional[int] = None  # DataLoader worker processes for a streamed directory (None: CPUs - 1, <= 8)
    # distributed (under torchrun; ignored otherwise except for checks)
    parallel: str = "auto"  # auto: data when WORLD_SIZE > 1, else none
    micro_batches: int = 4  # module parallel: micro-batches per global batch
    placement: Optional[list] = None  # module parallel: blocks per rank, e.g. [3, 2, 3]
    dist_timeout: float = 300.0  # seconds before a missing rank is an error (PeerError)
    extra: dict = field(default_factory=dict)  # free-form tags copied into results.json

    @classmethod
    def from_namespace(cls, ns) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        _checks.choice("--arch", self.arch, tuple(archs.ARCHS))
        _checks.choice("--method", self.method, METHODS)
        _checks.choice("--schedule", self.schedule, SCHEDULES)
        _checks.choice("--optimizer", self.optimizer, OPTIMIZERS)
        _checks.choice("--augment", self.augment, AUGMENTS)
        _checks.choice("--loader", self.loader, LOADERS)
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise ValueError(f"--workers: expected an int >= 0, got {self.workers!r}")
        _checks.distance(self.distance)
        _checks.positive_int("--modules", self.modules)
        _checks.positive_int("--epochs", self.epochs)
        _checks.positive_int("--batch-size", self.batch_size)
        _checks.positive_int("--diag-every", self.diag_every)
        _checks.positive_int("--log-every", self.log_every)
        _checks.positive_int("--eval-batch-size", self.eval_batch_size)
        for name in ("image_size", "train_subset", "test_subset", "stop_after"):
            v = getattr(self, name)
            if v is not None:
                _checks.positive_int("--" + name.replace("_", "-"), v)
        if self.lam is not None:
            _checks.nonneg_finite("--lam", self.lam)
            if self.method in ("bp", "local") and self.lam != 0:
                raise ValueError(f"--lam: only applies to --method sgr/sgr-fast, got --lam {self.lam} with --method {self.method}")
        for name in ("lr", "momentum", "weight_decay", "lam_warmup"):
            _checks.nonneg_finite("--" + name.replace("_", "-"), getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"--lr: expected a number > 0, got {self.lr}")
        if self.method == "sgr-fast":
            from sgr_ext.engine import ENGINES

            if "fast" not in ENGINES:
                raise ValueError(
                    f"--method sgr-fast: this install has no fast engine (LocalNet modes: {tuple(ENGINES)})"
                )
        if self.out is not None and (not isinstance(self.out, (str, os.PathLike)) or not str(self.out).strip()):
            raise ValueError(f"--out: expected a directory path, got {self.out!r}")
        if self.resume is not None and self.out is None and self.resume == "auto":
            raise ValueError("--resume: needs --out (the run directory) or a checkpoint path")
        # BP-free training
        _checks.choice("--grad", self.grad, GRADS)
        _checks.positive_int("--num-tangents", self.num_tangents)
        if self.grad == "forward" and self.method == "bp":
            raise ValueError("--grad forward: needs a local method (--method local or sgr); --method bp is global backprop")
        if self.grad == "forward" and self.method == "sgr-fast":
            raise ValueError("--grad forward: use --method sgr (sgr-fast selects a backprop engine, "
                             "which --grad forward replaces)")
        if self.grad == "backward" and self.num_tangents != 1:
            raise ValueError(f"--num-tangents: only applies to --grad forward, got --num-tangents {self.num_tangents} "
                             "with --grad backward")
        _checks.choice("--nonfinite", self.nonfinite, NONFINITE_POLICIES)
        if self.method == "bp" and self.nonfinite != "raise":
            raise ValueError(f"--nonfinite {self.nonfinite}: applies to the local methods (local, sgr, sgr-fast); "
                             "--method bp stops on a non-finite loss")
        # distributed
        _checks.choice("--parallel", self.parallel, PARALLEL)
        _checks.positive_int("--micro-batches", self.micro_batches)
        if not (isinstance(self.dist_timeout, (int, float)) and not isinstance(self.dist_timeout, bool)
                and math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise ValueError(f"--dist-timeout: expected a finite number of seconds > 0, got {self.dist_timeout!r}")
        if self.placement is not None:
            if self.parallel != "module":
                raise ValueError(f"--placement: only applies to --parallel module, got --parallel {self.parallel}")
            if (not isinstance(self.placement, (list, tuple)) or not self.placement
                    or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.placement)):
                raise ValueError(f"--placement: expected blocks per rank as integers >= 1, e.g. 3,2,3, got {self.placement!r}")
        if self.parallel == "module" and self.method == "bp":
            raise ValueError("--parallel module: needs a local method (--method local/sgr); global BP cannot be "
                             "split into independent stages (use --parallel data)")
        return self

    @property
    def lam_value(self) -> float:
        if self.method in ("bp", "local"):
            return 0.0
        return DEFAULT_LAM if self.lam is None else float(self.lam)

    @property
    def engine_mode(self) -> str:
        return "fast" if self.method == "sgr-fast" else "exact"

    def localnet_kwargs(self) -> dict:
        return {
            "lam": self.lam_value,
            "distance": self.distance,
            "mode": self.engine_mode,
            "track_alignment": self.method == "local",
            "grad": self.grad,
            "num_tangents": self.num_tangents,
            "nonfinite": self.nonfinite,
        }

    def run_name(self) -> str:
        if self.method == "bp":
            return f"{self.arch}-bp-s{self.seed}"
        tag = self.method if self.method == "local" else f"{self.method}-{self.distance}-lam{self.lam_value:g}"
        if self.lam_warmup and self.method != "local":
            tag += f"-warm{self.lam_warmup:g}"
        if self.grad == "forward":
            tag += "-fwdgrad" + (f"x{self.num_tangents}" if self.num_tangents > 1 else "")
        return f"{self.arch}-K{self.modules}-{tag}-s{self.seed}"


# ------------------------------------------------------------------------------ helpers


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected e.g. 'cpu', 'cuda' or 'cuda:1', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device: {name} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return device


def derived_seed(seed: int, *tags) -> int:
    """A 63-bit seed for (seed, tags...), independent across tags (data order, augmentation)."""
    digest = hashlib.sha256(":".join(str(t) for t in (seed, *tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """Deterministic kernels (and cuBLAS workspace config) for the duration of a run."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    # warn_only: a few CUDA backward kernels (e.g. adaptive average pooling) have no
    # deterministic implementation; they warn instead of failing. On CPU every op used is
    # deterministic and a resumed run is bit-identical.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _without_blocks(stats, blocks):
    """``stats`` with the given blocks' statistics replaced by None (their values are NaN/Inf
    or belong to a dropped update), so that epoch means stay over the finite steps."""
    drop = set(blocks)
    fields = ("losses", "penalties", "accuracies", "cosines", "norm_ratios")
    return dataclasses.replace(stats, **{
        f: [None if k in drop else v for k, v in enumerate(getattr(stats, f))] for f in fields})


def _per_block_mean(rows: list[list[Optional[float]]], n_blocks: int) -> list[Optional[float]]:
    """Per block, the mean over steps of its non-None values; ``n_blocks`` Nones when no step
    counted (a pipeline stage's rows cover only the blocks up to its own)."""
    return [_mean(r[k] for r in rows) for k in range(len(rows[0]) if rows else n_blocks)]


def evaluate(model: nn.Module, net: Optional[LocalNet], x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
             prepare, autocast) -> tuple[float, list[float]]:
    """Test accuracy of the model and of every block's head (empty list for global BP)."""
    correct = _eval_correct(model, net, _slices(x, y, batch_size), x.device, prepare=prepare, autocast=autocast)
    return _accuracies(correct, len(x), net is not None)


def _slices(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    return ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size))


def _accuracies(correct: torch.Tensor, n: int, local: bool) -> tuple[float, list[float]]:
    accs = (correct.double() / max(1, n)).tolist()
    return accs[-1], (accs if local else [])


@torch.no_grad()
def _eval_correct(model: nn.Module, net: Optional[LocalNet], batches, device: torch.device, *, prepare,
                  autocast) -> torch.Tensor:
    """Correctly classified samples of the (x, y) ``batches``: per block's head (LocalNet) or of the model."""
    trained = net if net is not None else model
    was_training = trained.training
    trained.eval()
    correct = torch.zeros((len(net.blocks) if net is not None else 1,), dtype=torch.long, device=device)
    try:
        for xb, yb in batches:
            xb = prepare(xb)
            with autocast():
                if net is None:
                    correct[0] += (model(xb).argmax(1) == yb).sum()
                else:
                    h = xb
                    for k, block in enumerate(net.blocks):
                        h = block(h)
                        correct[k] += (block.head(h).argmax(1) == yb).sum()
    finally:
        trained.train(was_training)
    return correct


def _make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def _make_scheduler(cfg: TrainConfig, opt, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                   cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _batches(n: int, batch_size: int, min_last: int = 2) -> list[tuple[int, int]]:
    """(start, stop) of each batch; a trailing batch of fewer than ``min_last`` samples joins
    the previous one (BatchNorm cannot train on a batch of one; under data or module
    parallelism ``min_last`` keeps every shard or micro-batch at two samples or more)."""
    bounds = [(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        bounds[-2] = (bounds[-2][0], n)
        bounds.pop()
    return bounds


def _resume_path(cfg: TrainConfig) -> Optional[Path]:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        path = Path(cfg.out) / CHECKPOINT_NAME
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path} (start without --resume)")
        return path
    path = Path(cfg.resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"--resume: no such checkpoint: {path}")
    return path


def _check_resume_compatible(cfg: TrainConfig, saved: dict, path: Path, data_fp: dict, parallel: str,
                             placement: Optional[list]) -> None:
    def layout(parallel_mode, placement_) -> str:
        return f"module parallel, placement {placement_}" if parallel_mode == "module" else f"--parallel {parallel_mode}"

    if "module" in (saved.get("parallel"), parallel):
        # Each stage's optimizer state covers its own blocks: the stages must be the same.
        if saved.get("parallel") == "module" and saved.get("stages") is None:
            raise ValueError(f"--resume {path}: a module-parallel checkpoint without per-stage optimizer states "
                             "(written before sgr_ext saved them) cannot be resumed")
        if (saved.get("parallel"), saved.get("placement")) != (parallel, placement):
            raise ValueError(f"--resume {path}: a module-parallel run resumes only as the same pipeline (checkpoint: "
                             f"{layout(saved.get('parallel'), saved.get('placement'))}; now: {layout(parallel, placement)})")
    old = dict(_RESUME_DEFAULTS, **saved.get("config", {}))
    diffs = [f"{k}: checkpoint {old.get(k)!r} vs now {getattr(cfg, k)!r}" for k in _RESUME_KEYS
             if k in old and old.get(k) != getattr(cfg, k)]
    if "lam_value" in saved and saved["lam_value"] != cfg.lam_value:
        diffs.append(f"lam: checkpoint {saved['lam_value']!r} vs now {cfg.lam_value!r}")
    saved_fp = dict(saved.get("dataset") or {})
    if saved_fp.get("name") == "x_test":  # checkpoints from before 2026-11-22 named every .npz/CIFAR set so
        saved_fp["name"] = data_fp["name"]
    if saved_fp and saved_fp != data_fp:
        diffs.append(f"dataset: checkpoint {saved['dataset']} vs now {data_fp}")
    if diffs:
        raise ValueError(f"--resume {path}: the checkpoint is from a different configuration ({'; '.join(diffs)})")


# ------------------------------------------------------------------------------ the run


def train(cfg: TrainConfig, dataset: Optional[TensorDataset] = None) -> dict:
    """Train one configuration; returns the results dict (also ``<out>/results.json``).

    Raises ValueError/TypeError/FileNotFoundError for bad settings or inputs (before any
    training), ``checkpoint.CheckpointError`` for a damaged checkpoint, ``TrainingDiverged``
    when a loss becomes NaN/Inf, ``sgr_ext.distributed.PeerError`` when another rank of a
    ``torchrun`` job died or hangs (after ``cfg.dist_timeout`` seconds).

    Under ``torchrun`` (RANK/WORLD_SIZE set) this joins the process group (and leaves it at
    the end unless it was already initialised); call it on every rank with the same config.
    """
    cfg.validate()
    if cfg.parallel in sgr_dist.PARALLEL_MODES and not sgr_dist.launched_with_torchrun():
        raise ValueError(f"--parallel {cfg.parallel}: needs a torchrun launch, e.g. torchrun --nproc_per_node 2 "
                         f"-m sgr_ext.cli train --parallel {cfg.parallel} ...")
    device = resolve_device(cfg.device)  # checks --device also under torchrun
    resume_path = _resume_path(cfg)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx = sgr_dist.setup_from_env(timeout_s=cfg.dist_timeout, device=cfg.device)
    try:
        if ctx is not None:
            device = ctx.device
        saved = checkpoint.load(resume_path) if resume_path is not None else None
        with deterministic_mode(cfg.deterministic):
            return _Run(cfg, device, dataset, saved, resume_path, ctx).run()
    finally:
        if ctx is not None and owns_group:
            ctx.shutdown()


def _resolve_parallel(cfg: TrainConfig, ctx) -> str:
    if ctx is None:
        return "none"
    if cfg.parallel == "auto":
        return "data" if ctx.world_size > 1 else "none"
    return cfg.parallel


class _Run:
    def __init__(self, cfg: TrainConfig, device: torch.device, dataset: Optional[TensorDataset], saved, resume_path,
                 ctx=None):
        self.cfg = cfg
        self.device = device
        self.ctx = ctx
        self.parallel = _resolve_parallel(cfg, ctx)
        self.rank = ctx.rank if ctx is not None else 0
        self.world = ctx.world_size if ctx is not None else 1
        self.out = Path(cfg.out) if cfg.out else None
        self.saved = saved
        self.resume_path = resume_path
        self.use_amp = bool(cfg.amp) and device.type == "cuda"
        if cfg.amp and device.type != "cuda":
            warnings.warn("--amp: bf16 autocast is only used on CUDA; training in float32 on CPU", stacklevel=3)

        # ---- data: in (device) memory, or an image directory streamed through a DataLoader
        data = dataset if dataset is not None else load_dataset(
            cfg.data, loader=cfg.loader, image_size=cfg.image_size, workers=cfg.workers)
        spec = archs.ARCHS[cfg.arch]
        if isinstance(data, ImageSource):
            self.stream: Optional[ImageSource] = data
            self.n_train = min(data.train_len, cfg.train_subset or data.train_len)
            self.n_test = min(data.test_len, cfg.test_subset or data.test_len)
            if data.shape[0] != spec.channels:
                raise ValueError(f"--arch: {cfg.arch} expects {spec.channels}-channel images, the data has "
                                 f"{data.shape[0]} channels")
            self.data, sample_shape = data, data.shape
        else:
            self.stream = None
            data = match_channels(subset(data, cfg.train_subset, cfg.test_subset), spec.channels)
            self.data = data.to(device) if data.x_train.device != device else data
            self.n_train, self.n_test, sample_shape = len(self.data.x_train), len(self.data.x_test), self.data.x_train.shape[1:]
        if self.n_train < 2:
            raise ValueError(f"--train-subset: expected at least 2 training images, got {self.n_train}")
        h, w = sample_shape[-2:]
        self.image_size = archs.image_size_for(cfg.arch, max(h, w), cfg.image_size)
        self.resize = (h, w) != (self.image_size, self.image_size)
        aug = cfg.augment
        if aug == "auto":  # crop+flip for natural images (CIFAR); none for 8x8 digits, where flips change the class
            aug = "crop-flip" if min(h, w) >= 16 and sample_shape[0] == 3 else "none"
        self.augment = aug
        self.data_fp = {"name": self.data.name, "train": self.n_train, "test": self.n_test,
                        "shape": list(sample_shape), "classes": self.data.num_classes}

        # ---- model
        seed_everything(cfg.seed)
        # Local engines may differentiate attention twice or in forward mode, which fused SDPA
        # kernels cannot; global BP keeps them.
        self.model = archs.build(cfg.arch, self.data.num_classes, self.image_size, plain_attention=cfg.method != "bp")
        self.model.to(device)
        self.net: Optional[LocalNet] = None
        if cfg.method != "bp":
            n_units = len(model_units(self.model)[0])
            if cfg.modules > n_units:
                raise ValueError(f"--modules: {cfg.arch} has {n_units} splittable units, so K must be at most "
                                 f"{n_units}, got {cfg.modules}")
            example = torch.zeros(2, sample_shape[0], self.image_size, self.image_size, device=device)
            blocks = split(self.model, cfg.modules, example_input=example)
            self.net = LocalNet(blocks, **cfg.localnet_kwargs())
            self.net.to(device)
        self.trained: nn.Module = self.net if self.net is not None else self.model
        self.trained.train()

        # ---- distributed: the runner steps (LocalNet, DataParallelLocalNet or PipelineStage);
        # global BP under data parallel runs the model through DDP on this rank's shard.
        self.runner = self.net
        self.ddp: Optional[nn.Module] = None
        min_last = 2
        if self.parallel == "data":
            if cfg.batch_size < self.world:
                raise ValueError(f"--batch-size: a global batch of {cfg.batch_size} cannot be sharded over "
                                 f"{self.world} ranks")
            min_last = 2 * self.world
            if self.net is not None:
                self.runner = ctx.wrap(self.net, "data")
            else:
                from torch.nn.parallel import DistributedDataParallel

                self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        elif self.parallel == "module":
            self._check_placement(len(self.net.blocks))
            min_last = 2 * cfg.micro_batches
            self.runner = ctx.wrap(self.net, "module", micro_batches=cfg.micro_batches, placement=cfg.placement)
        # Only this rank writes files, prints and shows progress (rank 0; the last stage for module parallel).
        if self.parallel == "none":
            self.is_logger = self.rank == 0
            if self.world > 1 and self.is_logger:
                warnings.warn(f"--parallel none under torchrun: each of the {self.world} ranks trains the same model "
                              "on its own (rank 0 writes the results)", stacklevel=3)
        else:
            self.is_logger = bool(getattr(self.runner, "is_logging_rank", self.rank == 0))
        self.batches = _batches(self.n_train, cfg.batch_size, min_last)
        self.total_steps = cfg.epochs * len(self.batches)
        # Module parallel: each stage's optimizer steps its own blocks only.
        self.opt = _make_optimizer(cfg, self.runner.parameters() if self.runner is not None else self.trained.parameters())
        self.sched = _make_scheduler(cfg, self.opt, self.total_steps)
        self.history: list[dict] = []
        self.steps: list[dict] = []
        self.start_epoch = 0
        self.wall_before = 0.0
        if saved is not None:
            self._restore(saved)

    # ------------------------------------------------------------------ pieces
    def _check_placement(self, n_blocks: int) -> None:
        placement = self.cfg.placement
        if placement is None:
            if n_blocks < self.world:
                raise ValueError(f"--parallel module: {n_blocks} modules cannot fill {self.world} ranks "
                                 "(one module at least per rank; raise --modules)")
        elif len(placement) != self.world or sum(placement) != n_blocks:
            raise ValueError(f"--placement: expected {self.world} counts (one per rank) summing to --modules "
                             f"{n_blocks}, got {','.join(map(str, placement))}")

    def _collective(self, op, what: str, *args, **kwargs) -> None:
        """A torch.distributed collective; a broken or timed-out one becomes PeerError."""
        try:
            op(*args, **kwargs)
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise sgr_dist.PeerError(f"rank {self.rank}: {what} failed or timed out; another rank has probably died "
                                     f"or hangs (see its log): {first}") from exc

    def _sync_for_eval(self) -> None:
        """Collective (every rank): make every rank's model the trained one before evaluation/checkpoint."""
        if self.runner is not None and self.runner is not self.net:
            self.runner.sync_for_eval()
        elif self.ddp is not None:  # DDP's buffers (BatchNorm statistics) are rank 0's
            for b in self.model.buffers():
                self._collective(torch.distributed.broadcast, "buffer broadcast", b, src=0)

    def _evaluate(self) -> tuple[float, list[float]]:
        """Test accuracy; under torchrun each rank evaluates its slice of the test set and the counts are summed."""
        n, bs, split = self.n_test, self.cfg.eval_batch_size, self.parallel != "none"
        if self.stream is None:
            x, y = self.data.x_test, self.data.y_test
            if split:
                x, y = x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]
            batches = _slices(x, y, bs)
        else:
            share = torch.arange(n).tensor_split(self.world)[self.rank] if split else torch.arange(n)
            batches = self._streamed("test", [share[i:i + bs].tolist() for i in range(0, len(share), bs)])
        correct = _eval_correct(self.model, self.net, batches, self.device, prepare=self.prepare,
                                autocast=self.autocast)
        if split:
            self._collective(torch.distributed.all_reduce, "evaluation all-reduce", correct)
        return _accuracies(correct, n, self.net is not None)

    def _streamed(self, split: str, index_lists):
        """Batches of the streamed directory on the device (pinned host memory on CUDA)."""
        pin = self.device.type == "cuda"
        for x, y in self.stream.batches(split, index_lists, pin_memory=pin):
            yield x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)

    def _train_batches(self, order: torch.Tensor):
        """(x, y) of each of ``self.batches`` in the epoch's ``order``, on the device."""
        if self.stream is not None:
            yield from self._streamed("train", [order[lo:hi].tolist() for lo, hi in self.batches])
            return
        order = order.to(self.device)
        for lo, hi in self.batches:
            idx = order[lo:hi]
            yield self.data.x_train[idx], self.data.y_train[idx]

    def autocast(self):
        if self.use_amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x

    def _restore(self, saved: dict) -> None:
        placement = list(self.runner.placement) if self.parallel == "module" else None
        _check_resume_compatible(self.cfg, saved, self.resume_path, self.data_fp, self.parallel, placement)
        stage = saved["stages"][self.rank] if self.parallel == "module" else saved
        try:
            self.trained.load_state_dict(saved["model"])
            self.opt.load_state_dict(stage["optimizer"])
            self.sched.load_state_dict(saved["scheduler"])
        except (KeyError, RuntimeError) as exc:
            first = str(exc).splitlines()[0]
            raise checkpoint.CheckpointError(f"checkpoint {self.resume_path}: does not fit this model ({first})") from None
        self.history = list(saved.get("history", []))
        self.steps = list(saved.get("steps", []))
        self.start_epoch = int(saved["epoch"])
        self.wall_before = float(saved.get("wall_time_s", 0.0))
        checkpoint.set_rng_state(stage["rng"])

    def _lam_at(self, step: int) -> float:
        lam = self.cfg.lam_value
        if self.cfg.lam_warmup > 0 and lam > 0:
            ramp = self.cfg.lam_warmup * len(self.batches)
            lam *= min(1.0, (step + 1) / ramp)
        return lam

    def _set_net_config(self, step: int) -> None:
        net = self.net
        if net is None:
            return
        want_track = self.cfg.method == "local" and step % self.cfg.diag_every == 0
        lam = self._lam_at(step)
        if net.config.lam != lam or net.config.track_alignment != want_track:
            net.config = dataclasses.replace(net.config, lam=lam, track_alignment=want_track)

    def _stage_states(self) -> Optional[list]:
        """Module parallel: every stage's optimizer and RNG state, gathered from all ranks
        (a collective); None otherwise (one optimizer state covers every parameter)."""
        if self.parallel != "module":
            return None
        mine = {"optimizer": self.opt.state_dict(), "rng": checkpoint.rng_state()}
        stages: list = [None] * self.world
        self._collective(torch.distributed.all_gather_object, "checkpoint gather of the stages' optimizer states",
                         stages, mine, group=self.runner.group)
        return stages

    def _save_checkpoint(self, epoch: int, wall: float, stages: Optional[list]) -> None:
        state = {
            "format": 1,
            "parallel": self.parallel,
            "world_size": self.world,
            # module parallel: per stage (rank), its optimizer and RNG state; "optimizer"/"rng"
            # below are the logging stage's
            "stages": stages,
            "placement": list(self.runner.placement) if self.parallel == "module" else None,
            "config": {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "extra"},
            "dataset": self.data_fp,
            "lam_value": self.cfg.lam_value,
            "epoch": epoch,
            "model": self.trained.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": checkpoint.rng_state(),
            "history": self.history,
            "steps": self.steps,
            "wall_time_s": wall,
        }
        checkpoint.save(self.out / CHECKPOINT_NAME, state)

    # ------------------------------------------------------------------ epoch
    def _step(self, x, y, step: int, epoch: int, i: int, bp_loss: torch.Tensor, bp_correct: torch.Tensor):
        """One training step's gradient work (no optimizer step): the StepStats of a LocalNet,
        or None under global BP (whose loss and correct count accumulate into ``bp_loss``/``bp_correct``)."""
        if self.net is None:
            xs, ys = x, y
            if self.ddp is not None:
                xs, ys = sgr_dist.shard_batch(x, y, self.rank, self.world)
            with self.autocast():
                logits = (self.ddp if self.ddp is not None else self.model)(xs)
                loss = F.cross_entropy(logits, ys)
            if self.ddp is not None:
                # DDP averages the ranks' gradients; weighting each by its shard's share of the
                # batch makes that average the full-batch gradient also for uneven shards.
                (loss * (len(ys) * self.world / len(y))).backward()
            else:
                loss.backward()
            with torch.no_grad():
                bp_loss += loss.detach().double() * len(ys)
                bp_correct += (logits.argmax(1) == ys).sum()
            return None
        self._set_net_config(step)
        try:
            with self.autocast():
                # every rank passes the same global batch (the runner shards or pipelines it)
                return self.runner.train_step(x, y)
        except NonFiniteError as exc:
            raise TrainingDiverged(f"epoch {epoch + 1}, step {i + 1}: {exc}") from None

    def _train_epoch(self, epoch: int, bar) -> dict:
        cfg, dev = self.cfg, self.device
        n = self.n_train
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(cfg.seed, "order", epoch)))
        aug_gen = torch.Generator(device=dev).manual_seed(derived_seed(cfg.seed, "augment", epoch))
        if self.parallel == "data" and self.rank > 0:
            # The global RNG draws the forward-gradient tangents (and dropout masks) of this rank's
            # shard: independent across ranks; rank 0 keeps the stream that checkpoints save.
            torch.manual_seed(derived_seed(cfg.seed, "rank", self.rank, epoch))
        n_blocks = len(self.net.blocks) if self.net is not None else 0
        losses, penalties, accs, cosines, ratios = [], [], [], [], []
        nonfinite_steps = skipped_steps = 0  # --nonfinite skip/warn
        bp_loss = torch.zeros((), device=dev, dtype=torch.float64)
        bp_correct = torch.zeros((), device=dev, dtype=torch.long)
        peak = PeakMemory(dev)  # per step, DESIGN.md §5; on CPU the bytes saved for backward
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(self._train_batches(order)):
            step = epoch * len(self.batches) + i
            if self.augment == "crop-flip":
                x = random_crop_flip(x, padding=4, flip=True, generator=aug_gen)
            elif self.augment == "flip":
                x = random_crop_flip(x, padding=0, flip=True, generator=aug_gen)
            x = self.prepare(x)
            self.opt.zero_grad(set_to_none=True)
            with peak:
                st = self._step(x, y, step, epoch, i, bp_loss, bp_correct)
            if st is not None and st.nonfinite_blocks:
                nonfinite_steps += 1
                st = _without_blocks(st, range(n_blocks) if st.skipped else st.nonfinite_blocks)
            if st is not None and st.skipped:
                skipped_steps += 1  # no gradient was kept: no optimizer step, no statistics
            elif self.net is not None:
                losses.append(st.losses)
                penalties.append(st.penalties)
                accs.append(st.accuracies)
                cosines.append(st.cosines)
                ratios.append(st.norm_ratios)
                if step % cfg.log_every == 0:
                    self.steps.append({
                        "step": step, "epoch": epoch + 1, "lr": self.sched.get_last_lr()[0],
                        "lam": self.net.config.lam, "loss": st.losses[-1], "block_train_loss": st.losses,
                        "block_penalty": st.penalties, "cosine": st.cosines, "norm_ratio": st.norm_ratios,
                    })
            if st is None or not st.skipped:
                self.opt.step()
            self.sched.step()
            if bar is not None:
                bar.update(1)
                if self.net is not None and i % 5 == 0 and st.losses[-1] is not None:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{st.losses[-1]:.3f}", refresh=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        train_time = time.perf_counter() - t0
        rec: dict = {"epoch": epoch + 1, "lr": self.sched.get_last_lr()[0], "lam": self._lam_at(step)}
        if self.net is None:
            if self.ddp is not None:  # this rank's shards only so far
                totals = torch.stack([bp_loss, bp_correct.double()])
                self._collective(torch.distributed.all_reduce, "statistics all-reduce", totals)
                bp_loss, bp_correct = totals[0], totals[1]
            rec["train_loss"] = float(bp_loss) / n
            rec["train_acc"] = float(bp_correct) / n
            if not math.isfinite(rec["train_loss"]):
                raise TrainingDiverged(f"epoch {epoch + 1}: non-finite training loss under global BP")
            rec.update(block_train_loss=[], block_penalty=[], block_train_acc=[], cosine=[], norm_ratio=[])
        else:
            block_loss = _per_block_mean(losses, n_blocks)
            block_acc = _per_block_mean(accs, n_blocks)
            rec["train_loss"] = block_loss[-1]
            rec["train_acc"] = block_acc[-1]
            rec["block_train_loss"] = block_loss
            rec["block_penalty"] = _per_block_mean(penalties, n_blocks)
            rec["block_train_acc"] = block_acc
            rec["cosine"] = _per_block_mean(cosines, n_blocks)
            rec["norm_ratio"] = _per_block_mean(ratios, n_blocks)
        rec["nonfinite_steps"] = nonfinite_steps
        rec["skipped_steps"] = skipped_steps
        rec["step_time_ms"] = 1000.0 * train_time / len(self.batches)
        rec["train_time_s"] = train_time
        rec["samples_per_s"] = n / train_time if train_time > 0 else None
        rec["peak_mem_mib"] = peak.peak_mb
        rec["memory_metric"] = peak.metric
        return rec

    # ------------------------------------------------------------------ main
    def run(self) -> dict:
        cfg = self.cfg
        writes = self.out is not None and self.is_logger
        if writes:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file in the way, no permission, ...
                raise ValueError(f"--out {self.out}: cannot create the run directory ({exc.strerror or exc})") from None
            if self.saved is None and cfg.checkpoint and (self.out / CHECKPOINT_NAME).exists():
                print(f"sgr-ext train: note: {self.out / CHECKPOINT_NAME} from an earlier run will be overwritten "
                      "(pass --resume to continue it)", file=sys.stderr)
        bar = None
        if cfg.progress and self.is_logger:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.start_epoch * len(self.batches), unit="step",
                       desc=self.cfg.run_name(), dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        wall = self.wall_before
        stopped_early = False
        try:
            done_now = 0
            for epoch in range(self.start_epoch, cfg.epochs):
                t0 = time.perf_counter()
                rec = self._train_epoch(epoch, bar)
                self._sync_for_eval()  # collective: every rank
                acc, block_acc = self._evaluate()
                rec["test_acc"] = acc
                rec["block_test_acc"] = block_acc
                self.history.append(rec)
                wall += time.perf_counter() - t0
                if bar is not None:
                    loss = rec["train_loss"]  # None when no step of the epoch was finite
                    bar.set_postfix(epoch=epoch + 1, loss="n/a" if loss is None else f"{loss:.3f}", test_acc=f"{acc:.4f}")
                if writes:
                    metrics.write_run_files(self.out, self.history, self.steps)
                if cfg.checkpoint and self.out is not None:
                    stages = self._stage_states()  # collective under module parallel
                    if writes:
                        self._save_checkpoint(epoch + 1, wall, stages)
                done_now += 1
                if cfg.stop_after is not None and done_now >= cfg.stop_after and epoch + 1 < cfg.epochs:
                    stopped_early = True
                    break
        finally:
            if bar is not None:
                bar.close()
        results = self.results(wall, complete=not stopped_early)
        if writes:
            metrics.write_json(self.out / "results.json", results)
            if cfg.plots:
                title = self.cfg.run_name()
                metrics.plot_learning_curves(self.history, self.out / "learning_curves.png", title)
                metrics.plot_diagnostics(self.history, self.steps, self.out / "diagnostics.png", title)
        return results

    def _dist_info(self) -> dict:
        info = {"parallel": self.parallel, "world_size": self.world, "rank": self.rank, "logging_rank": self.is_logger}
        if self.parallel == "module":
            info.update(micro_batches=self.cfg.micro_batches, placement=list(self.runner.placement))
        return info

    def results(self, wall: float, complete: bool) -> dict:
        h = self.history
        last = h[-1] if h else {}
        trained_params = sum(p.numel() for p in self.trained.parameters())
        model_params = sum(p.numel() for p in self.model.parameters())
        steps = [r["step_time_ms"] for r in h]
        peaks = [r["peak_mem_mib"] for r in h if r.get("peak_mem_mib") is not None]
        return {
            "name": self.cfg.run_name(),
            "complete": complete,
            "epochs_done": len(h),
            "resumed_at_epoch": self.start_epoch if self.saved is not None else None,
            "config": {**dataclasses.asdict(self.cfg), "lam": self.cfg.lam_value},  # the lambda used, not None
            "lam": self.cfg.lam_value,
            "dataset": self.data_fp,
            "image_size": self.image_size,
            "augment": self.augment,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "final_test_acc": last.get("test_acc"),
            "best_test_acc": max((r["test_acc"] for r in h), default=None),
            "final_train_loss": last.get("train_loss"),
            "final_block_test_acc": last.get("block_test_acc", []),
            "final_cosine": last.get("cosine", []),
            "final_norm_ratio": last.get("norm_ratio", []),
            "mean_cosine": _mean(last.get("cosine", [])[1:]) if last.get("cosine") else None,
            "median_step_time_ms": float(np.median(steps)) if steps else None,
            "peak_mem_mib": max(peaks) if peaks else None,
            "memory_metric": last.get("memory_metric"),
            "params_model": model_params,
            "params_trained": trained_params,
            "blocks": len(self.net.blocks) if self.net is not None else 1,
            "distributed": self._dist_info(),
            "wall_time_s": wall,
            "history": h,
        }
