"""Real-data training for sgr_ext: ``sgr-ext train`` and the functions behind it.

``train(TrainConfig(...))`` trains one configuration (global BP, plain local learning or
SGR) on CIFAR-10 / an ``.npz`` / the embedded digits, logs per-epoch metrics and the
A_k-vs-D_{k-1} alignment diagnostics, writes plots, results and crash-safe checkpoints.

The configuration (``config``, torch-free) is imported here; the rest on first use
(``sgr_ext._lazy``), so that ``sgr-ext train`` checks its arguments before importing torch.
"""
from typing import TYPE_CHECKING

from sgr_ext import _lazy
from sgr_ext.trainer.config import METHODS, TrainConfig, TrainingDiverged

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from sgr_ext.trainer.augment import random_crop_flip
    from sgr_ext.trainer.checkpoint import CheckpointError
    from sgr_ext.trainer.data import load_dataset
    from sgr_ext.trainer.evaluation import evaluate
    from sgr_ext.trainer.loop import train

__getattr__, __dir__ = _lazy.attach(__name__, {
    "CheckpointError": "sgr_ext.trainer.checkpoint",
    "evaluate": "sgr_ext.trainer.evaluation",
    "load_dataset": "sgr_ext.trainer.data",
    "random_crop_flip": "sgr_ext.trainer.augment",
    "train": "sgr_ext.trainer.loop",
})

__all__ = ["CheckpointError", "METHODS", "TrainConfig", "TrainingDiverged", "evaluate", "load_dataset",
           "random_crop_flip", "train"]
