"""Real-data training for sgr_ext: ``sgr-ext train`` and the functions behind it.

``train(TrainConfig(...))`` trains one configuration (global BP, plain local learning or
SGR) on CIFAR-10 / an ``.npz`` / the embedded digits, logs per-epoch metrics and the
A_k-vs-D_{k-1} alignment diagnostics, writes plots, results and crash-safe checkpoints.
"""
from sgr_ext.trainer.augment import random_crop_flip
from sgr_ext.trainer.checkpoint import CheckpointError
from sgr_ext.trainer.data import load_dataset
from sgr_ext.trainer.config import METHODS, TrainConfig, TrainingDiverged
from sgr_ext.trainer.evaluation import evaluate
from sgr_ext.trainer.loop import train

__all__ = ["CheckpointError", "METHODS", "TrainConfig", "TrainingDiverged", "evaluate", "load_dataset",
           "random_crop_flip", "train"]
