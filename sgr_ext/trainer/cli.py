"""``sgr-ext train``: train a model on real data with global BP, plain local learning or SGR.

Adding an option: one ``p.add_argument(...)`` below whose ``dest`` matches a new field of
``TrainConfig`` (``sgr_ext.trainer.config``); ``TrainConfig.from_namespace`` copies it over.

Parsing and ``TrainConfig.validate`` run before torch is imported (this module imports only
torch-free ones; ``run`` imports the training loop), so ``--help`` and every bad argument
answer at once instead of after torch's import (seconds).
"""
from __future__ import annotations

import argparse
import math
import sys
import types

from sgr_ext._options import DISTANCES, GRADS, LAM_MODES, NONFINITE_POLICIES, SIDES
from sgr_ext.trainer import archs
from sgr_ext.trainer.config import (AUGMENTS, DEFAULT_LAM, LOADERS, METHODS, OPTIMIZERS, PARALLEL, SCHEDULES,
                                    TrainConfig, TrainingDiverged)

EXAMPLES = """examples:
  sgr-ext train --arch resnet32 --modules 8 --method sgr --lam 0.1 --data .data/cifar10_subset.npz --out runs/r32-k8-sgr
  sgr-ext train --method local --modules 16 --data /path/to/cifar10 --epochs 30 --amp --out runs/r32-k16-local
  sgr-ext train --method bp --data digits --epochs 5 --out runs/bp
  sgr-ext train --out runs/r32-k8-sgr --resume          # continue from runs/r32-k8-sgr/checkpoint.pt
  sgr-ext train --method sgr --grad forward --num-tangents 4 --data digits --arch digits_cnn --out runs/fg
  torchrun --standalone --nproc_per_node 2 -m sgr_ext.cli train --arch resnet32 --modules 8 --out runs/dp
  torchrun --standalone --nproc_per_node 4 -m sgr_ext.cli train --parallel module --modules 8 \\
      --placement 3,2,2,1 --micro-batches 8 --out runs/mp
"""


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    parse.__name__ = "int"
    return parse


def _float(lo: float = 0.0, strict: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (strict and v == lo):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>' if strict else '>='} {lo:g}, got {text}")
        return v

    parse.__name__ = "float"
    return parse


def _placement(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"expected blocks per rank as integers >= 1, e.g. 3,2,3, got {text!r}")
    return counts


_placement.__name__ = "placement"


def _one_line_error(self, message: str):
    """argparse errors as one line (no usage block), exit status 2."""
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train on real data (CIFAR-10 / .npz / digits) with bp, local or sgr; logs diagnostics",
        description="Train a model split into K gradient-isolated modules with global BP (bp), plain local "
        "learning (local) or Successive Gradient Reconciliation (sgr, sgr-fast). Writes metrics.csv/json, "
        "steps.csv, results.json, learning_curves.png, diagnostics.png and checkpoint.pt into --out.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.error = types.MethodType(_one_line_error, p)
    d = TrainConfig()
    g = p.add_argument_group("model and method")
    g.add_argument("--arch", default=d.arch, choices=tuple(archs.ARCHS), help=f"architecture (default {d.arch})")
    g.add_argument("--modules", "-K", type=_int_at_least(1), default=d.modules, help="number of local modules K (default %(default)s)")
    g.add_argument("--method", default=d.method, choices=METHODS,
                   help="bp: global backprop of the unsplit model; local: plain local learning (lambda 0); "
                   "sgr: SGR, exact engine; sgr-fast: SGR, fast engine (default %(default)s)")
    g.add_argument("--lam", type=_float(0.0), default=None, help=f"strength lambda >= 0 (default {DEFAULT_LAM} with --lam-mode grad_ratio --side handback, the "
                   "accuracy study's choice; a --lam alone gives DESIGN.md's penalty weight)")
    g.add_argument("--distance", default=d.distance, choices=DISTANCES,
                   help="SGR distance (default %(default)s; unused by --side handback)")
    g.add_argument("--lam-mode", default=None, choices=LAM_MODES,
                   help="fixed: lambda weighs the penalty; grad_ratio: lambda is the term's gradient norm over the "
                        "loss gradient's, per block (default: grad_ratio without --lam, fixed with it)")
    g.add_argument("--side", default=None, choices=SIDES,
                   help="which block the boundary-k term trains: input (block k, DESIGN.md), output (block k-1) or "
                        "handback (block k-1 also descends block k's loss); default: handback without --lam "
                        "(the study's choice, sgr_ext.defaults), input with it")
    g.add_argument("--lam-warmup", type=_float(0.0), default=d.lam_warmup, metavar="EPOCHS",
                   help="ramp lambda linearly from 0 over this many epochs (default 0: off)")
    g.add_argument("--image-size", type=_int_at_least(1), default=None,
                   help="resize inputs to this side on the device (default: the data's, rounded up to the patch size)")
    g.add_argument("--grad", default=d.grad, choices=GRADS,
                   help="backward: module-local backprop; forward: BP-free, every gradient (and SGR's D_k, A_k) "
                   "estimated with forward gradients and activity perturbation (local/sgr only) (default %(default)s)")
    g.add_argument("--num-tangents", type=_int_at_least(1), default=d.num_tangents, metavar="N",
                   help="--grad forward: random tangents averaged per estimate (cost and 1/variance grow with N) "
                   "(default %(default)s)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_int_at_least(1), default=d.epochs, help="(default %(default)s)")
    g.add_argument("--batch-size", type=_int_at_least(1), default=d.batch_size, help="(default %(default)s)")
    g.add_argument("--lr", type=_float(0.0, strict=True), default=d.lr, help="peak learning rate (default %(default)s)")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS,
                   help="sgd: momentum 0.9, Nesterov; adamw (default %(default)s)")
    g.add_argument("--momentum", type=_float(0.0), default=d.momentum, help="(default %(default)s)")
    g.add_argument("--weight-decay", type=_float(0.0), default=d.weight_decay, help="(default %(default)s)")
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help="per-step LR schedule (default %(default)s)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    g.add_argument("--peak-memory", action="store_true",
                   help="record each step's peak memory in metrics (on CUDA it synchronises before and after "
                   "every step, so it is off by default)")
    g.add_argument("--seed", type=int, default=d.seed, help="(default %(default)s)")
    g.add_argument("--nonfinite", default=d.nonfinite, choices=NONFINITE_POLICIES,
                   help="NaN/Inf in a module's input, loss, penalty, boundary gradient or weight gradients: raise "
                   "stops the run; skip drops that step (no update, not counted in the epoch's statistics); warn "
                   "drops only the affected modules' updates; skip and warn count such steps in metrics.csv "
                   "(local methods only) (default %(default)s)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels; with --resume the run continues bit-identically")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data,
                   help="'digits' (embedded 8x8 digits), an .npz with x_train/y_train/x_test/y_test, or an image "
                   "directory: CIFAR-10's python batches (DIR/cifar-10-batches-py/) or an ImageFolder tree "
                   "(DIR/train/<class>/*, DIR/test/<class>/* or DIR/val/...); nothing is downloaded (default %(default)s)")
    g.add_argument("--loader", default=d.loader, choices=LOADERS,
                   help="image directories: auto loads a set whose decoded images fit in 2 GiB into (device) "
                   "memory and streams a larger one through a DataLoader; memory; stream (default %(default)s)")
    g.add_argument("--workers", type=_int_at_least(0), default=None, metavar="N",
                   help="DataLoader worker processes that decode a streamed directory (default: CPUs - 1, at most 8)")
    g.add_argument("--augment", default=d.augment, choices=AUGMENTS,
                   help="auto: random crop (pad 4) + flip for RGB images >= 16 px, none for digits (default %(default)s)")
    g.add_argument("--train-subset", type=_int_at_least(2), default=None, metavar="N", help="use the first N training images")
    g.add_argument("--test-subset", type=_int_at_least(1), default=None, metavar="N", help="use the first N test images")

    g = p.add_argument_group(
        "distributed (under torchrun)",
        "launch with e.g. 'torchrun --standalone --nproc_per_node N -m sgr_ext.cli train ...'; --batch-size is "
        "the global batch; only the logging rank writes files")
    g.add_argument("--parallel", default=d.parallel, choices=PARALLEL,
                   help="data: every rank trains the whole model on its shard of each batch (DDP for bp); module: "
                   "rank r trains a contiguous group of blocks, pipelined over micro-batches (local/sgr only); "
                   "auto: data when WORLD_SIZE > 1, else none (default %(default)s)")
    g.add_argument("--micro-batches", type=_int_at_least(1), default=d.micro_batches, metavar="M",
                   help="module parallel: micro-batches per batch (default %(default)s)")
    g.add_argument("--placement", type=_placement, default=None, metavar="3,2,3",
                   help="module parallel: blocks per rank, summing to --modules (default: as even as possible)")
    g.add_argument("--dist-timeout", type=_float(0.0, strict=True), default=d.dist_timeout, metavar="SECONDS",
                   help="a rank that waits this long for another one stops with an error (default %(default)g)")

    g = p.add_argument_group("run")
    g.add_argument("--out", default=d.out, help="run directory (default %(default)s)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default <out>/checkpoint.pt)")
    g.add_argument("--stop-after", type=_int_at_least(1), default=None, metavar="EPOCHS",
                   help="stop after this many epochs of this invocation (continue later with --resume)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    g.add_argument("--diag-every", type=_int_at_least(1), default=d.diag_every, metavar="STEPS",
                   help="plain local learning: measure cos/norm ratio of A_k vs D_{k-1} every N steps (default %(default)s)")
    g.add_argument("--log-every", type=_int_at_least(1), default=d.log_every, metavar="STEPS",
                   help="record per-step stats into steps.csv every N steps (default %(default)s)")
    g.add_argument("--eval-batch-size", type=_int_at_least(1), default=d.eval_batch_size, help=argparse.SUPPRESS)
    g.add_argument("--no-checkpoint", dest="checkpoint", action="store_false", help="do not write checkpoints")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="do not write PNG plots")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = TrainConfig.from_namespace(args).validate()  # bad arguments fail here, before the imports below bring torch
    from sgr_ext.distributed import PeerError
    from sgr_ext.trainer.loop import train

    try:
        res = train(cfg)
    except TrainingDiverged as exc:
        print(f"sgr-ext train: training diverged: {exc} (try a smaller --lr or --lam)", file=sys.stderr)
        return 1
    except PeerError as exc:
        print(f"sgr-ext train: distributed error: {exc}", file=sys.stderr)
        return 1
    if not res.get("distributed", {}).get("logging_rank", True):
        return 0  # the logging rank reports
    status = "finished" if res["complete"] else f"stopped after epoch {res['epochs_done']} (continue with --resume)"
    acc = res["final_test_acc"]
    acc_txt = f"{100 * acc:.2f}%" if acc is not None else "n/a"
    print(f"{res['name']}: {status}; test accuracy {acc_txt}; results in {cfg.out}")
    return 0
