"""``--resume``: where the checkpoint is, and whether it is from the same configuration."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from sgr_ext.trainer.config import CHECKPOINT_NAME, TrainConfig


# Settings that must match for --resume to continue the same run.
_RESUME_KEYS = (
    "arch", "modules", "method", "distance", "lam_warmup", "epochs", "batch_size", "lr",
    "optimizer", "momentum", "weight_decay", "schedule", "amp", "seed", "augment", "image_size",
    "train_subset", "test_subset", "diag_every", "log_every", "grad", "num_tangents",
)
# Keys added after the first checkpoints were written: their value in such a checkpoint.
_RESUME_DEFAULTS = {"grad": "backward", "num_tangents": 1}


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
