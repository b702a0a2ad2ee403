"""``TrainConfig``: everything that defines a training run (the flags of ``sgr-ext train``),
its validation, and the choices each flag takes."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from sgr_ext import _checks, defaults
from sgr_ext.net import NONFINITE_POLICIES
from sgr_ext.trainer import archs


METHODS = ("bp", "local", "sgr", "sgr-fast")
SCHEDULES = ("onecycle", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
AUGMENTS = ("auto", "crop-flip", "flip", "none")
GRADS = ("backward", "forward")
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
        _checks.distance(self.distance)
        if self.lam_mode is not None:
            _checks.choice("--lam-mode", self.lam_mode, ("fixed", "grad_ratio"))
        if self.side is not None:
            _checks.choice("--side", self.side, ("input", "output", "handback"))
        if self.parallel in ("data", "module") and self.method.startswith("sgr") and self.reconciliation[2] != "input":
            raise ValueError(f"--side {self.reconciliation[2]}: not supported with --parallel {self.parallel} yet; "
                             "pass --side input (and a --lam)")
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
