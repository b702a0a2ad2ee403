"""``TrainConfig``: everything that defines a training run (the flags of ``sgr-ext train``),
its validation, and the choices each flag takes.

Torch-free, like everything it imports: ``sgr-ext train`` builds its parser from these choices
and runs ``TrainConfig.validate`` before it imports torch, so a bad argument or combination is
reported at once (``tests/test_cli_fast_errors.py`` keeps it so).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from sgr_ext import _options, defaults
from sgr_ext._options import GRADS, LAM_MODES, NONFINITE_POLICIES, SIDES
from sgr_ext.trainer import archs

METHODS = ("bp", "local", "sgr", "sgr-fast")
SCHEDULES = ("onecycle", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
AUGMENTS = ("auto", "crop-flip", "flip", "none")
LOADERS = ("auto", "memory", "stream")  # image directories (sgr_ext.trainer.streaming)
PARALLEL = ("auto", "none", "data", "module")
DEFAULT_LAM = defaults.LAM  # with --lam-mode/--side left open: the study's setting (sgr_ext.defaults)
CHECKPOINT_NAME = "checkpoint.pt"


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
    lam: Optional[float] = None  # None: the study's default setting (sgr_ext.defaults) for sgr methods
    lam_mode: Optional[str] = None  # None: sgr_ext.defaults.resolve (grad_ratio without --lam, fixed with it)
    side: Optional[str] = None  # None: handback without --lam, input with it
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
    peak_memory: bool = False  # record each step's peak memory (on CUDA: a sync before and after every step)
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
        _options.choice("--arch", self.arch, tuple(archs.ARCHS))
        _options.choice("--method", self.method, METHODS)
        _options.choice("--schedule", self.schedule, SCHEDULES)
        _options.choice("--optimizer", self.optimizer, OPTIMIZERS)
        _options.choice("--augment", self.augment, AUGMENTS)
        _options.choice("--loader", self.loader, LOADERS)
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise ValueError(f"--workers: expected an int >= 0, got {self.workers!r}")
        _options.distance(self.distance)
        if self.lam_mode is not None:
            _options.choice("--lam-mode", self.lam_mode, LAM_MODES)
        if self.side is not None:
            _options.choice("--side", self.side, SIDES)
        if self.parallel in ("data", "module") and self.method.startswith("sgr") and self.reconciliation[2] != "input":
            raise ValueError(f"--side {self.reconciliation[2]}: not supported with --parallel {self.parallel} yet; "
                             "pass --side input (and a --lam)")
        _options.positive_int("--modules", self.modules)
        _options.positive_int("--epochs", self.epochs)
        _options.positive_int("--batch-size", self.batch_size)
        _options.positive_int("--diag-every", self.diag_every)
        _options.positive_int("--log-every", self.log_every)
        _options.positive_int("--eval-batch-size", self.eval_batch_size)
        for name in ("image_size", "train_subset", "test_subset", "stop_after"):
            v = getattr(self, name)
            if v is not None:
                _options.positive_int("--" + name.replace("_", "-"), v)
        if self.lam is not None:
            _options.nonneg_finite("--lam", self.lam)
            if self.method in ("bp", "local") and self.lam != 0:
                raise ValueError(f"--lam: only applies to --method sgr/sgr-fast, got --lam {self.lam} with --method {self.method}")
        for name in ("lr", "momentum", "weight_decay", "lam_warmup"):
            _options.nonneg_finite("--" + name.replace("_", "-"), getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"--lr: expected a number > 0, got {self.lr}")
        if self.out is not None and (not isinstance(self.out, (str, os.PathLike)) or not str(self.out).strip()):
            raise ValueError(f"--out: expected a directory path, got {self.out!r}")
        if self.resume is not None and self.out is None and self.resume == "auto":
            raise ValueError("--resume: needs --out (the run directory) or a checkpoint path")
        # BP-free training
        _options.choice("--grad", self.grad, GRADS)
        _options.positive_int("--num-tangents", self.num_tangents)
        if self.grad == "forward" and self.method == "bp":
            raise ValueError("--grad forward: needs a local method (--method local or sgr); --method bp is global backprop")
        if self.grad == "forward" and self.method == "sgr-fast":
            raise ValueError("--grad forward: use --method sgr (sgr-fast selects a backprop engine, "
                             "which --grad forward replaces)")
        if self.grad == "backward" and self.num_tangents != 1:
            raise ValueError(f"--num-tangents: only applies to --grad forward, got --num-tangents {self.num_tangents} "
                             "with --grad backward")
        _options.choice("--nonfinite", self.nonfinite, NONFINITE_POLICIES)
        if self.method == "bp" and self.nonfinite != "raise":
            raise ValueError(f"--nonfinite {self.nonfinite}: applies to the local methods (local, sgr, sgr-fast); "
                             "--method bp stops on a non-finite loss")
        # distributed
        _options.choice("--parallel", self.parallel, PARALLEL)
        _options.positive_int("--micro-batches", self.micro_batches)
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
        if self.method == "sgr-fast":  # last: the only check that imports torch (the engines)
            from sgr_ext.engine import ENGINES

            if "fast" not in ENGINES:
                raise ValueError(
                    f"--method sgr-fast: this install has no fast engine (LocalNet modes: {tuple(ENGINES)})"
                )
        return self

    @property
    def lam_value(self) -> float:
        if self.method in ("bp", "local"):
            return 0.0
        return self.reconciliation[0]

    @property
    def engine_mode(self) -> str:
        return "fast" if self.method == "sgr-fast" else "exact"

    @property
    def reconciliation(self) -> tuple:
        """(lam, lam_mode, side) of the run (lam 0 for bp and local)."""
        lam = self.lam if self.lam is not None or self.grad == "backward" else defaults.BP_FREE_LAM
        lam, lam_mode, side = defaults.resolve(lam, self.lam_mode, self.side)
        return (0.0 if self.method in ("bp", "local") else float(lam)), lam_mode, side

    def localnet_kwargs(self) -> dict:
        _, lam_mode, side = self.reconciliation
        return {
            "lam": self.lam_value,
            "lam_mode": lam_mode,
            "side": side,
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
        if self.method not in ("bp", "local"):
            _, lam_mode, side = self.reconciliation
            tag += ("" if lam_mode == "fixed" else "-ratio") + ("" if side == "input" else f"-{side}")
        if self.lam_warmup and self.method != "local":
            tag += f"-warm{self.lam_warmup:g}"
        if self.grad == "forward":
            tag += "-fwdgrad" + (f"x{self.num_tangents}" if self.num_tangents > 1 else "")
        return f"{self.arch}-K{self.modules}-{tag}-s{self.seed}"
