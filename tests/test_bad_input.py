"""Bad input at every public entry point: a clear ValueError/TypeError that names the argument.

``CASES`` is the table: one row per distinct bad input, across ``reconcile``,
``linear_cross_entropy``, ``LocalBlock``, ``LocalNet`` (constructor and ``train_step``),
``split``, the ``sgr-ext demo`` / ``sgr-ext train`` command lines and the trainer's data
loading. Each row: (entry point, call, expected exception type, regex the message must
match). Command-line rows expect exit status 2 and ONE stderr line naming the option; they
are turned into a ``CliError`` carrying that line so that the table stays uniform.

``ACCEPTED`` lists unusual but valid inputs (non-contiguous and channels-last tensors,
int32 labels, ``ignore_index`` rows, integer token inputs) that must work and give the
same result as the plain layout.
"""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgr_ext
from sgr_ext import LocalBlock, LocalNet, reconcile, split
from sgr_ext import cli
from sgr_ext.ops.linear_ce import linear_cross_entropy
from sgr_ext.trainer.data import from_arrays, load_dataset, load_npz

C = 3  # classes of the small nets below


# ----------------------------------------------------------------------------- helpers


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def blocks(dtype=torch.float32, classes=(C, C)):
    return [
        LocalBlock(nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Linear(5, classes[0])),
        LocalBlock(nn.Sequential(nn.Linear(5, 5), nn.Tanh()), nn.Linear(5, classes[1])),
    ]


def conv_head_net(classes):
    """Heads without a Linear layer (1x1 conv + pooling): their class count is found by running them."""
    def head(c):
        return nn.Sequential(nn.Conv2d(4, c, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return LocalNet([LocalBlock(nn.Conv2d(3, 4, 3, padding=1), head(classes[0])),
                     LocalBlock(nn.Conv2d(4, 4, 3, padding=1), head(classes[1]))], lam=0.1)


def net(**kw):
    return LocalNet(blocks(), **{"lam": 0.5, **kw})


def step(x, y, **kw):
    return net().train_step(x, y, **kw)


def labels(n=8, hi=C, dtype=torch.long):
    return torch.randint(0, hi, (n,), dtype=dtype)


def seq_model():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, C))


def bad_head(sample_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(sample_shape), num_classes + 4))


class CliError(Exception):
    """The one stderr line of a command that exited with status 2."""


def run_cli(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse errors
            code = exc.code
    text = err.getvalue()
    lines = [ln for ln in text.strip().splitlines() if ln and not ln.startswith((" ", "usage:"))]
    if code == 2:  # one error line (argparse's usage block before it is allowed)
        assert len(lines) == 1 and "Traceback" not in text, text
        raise CliError(lines[0])
    raise AssertionError(f"exit status {code}, stderr {lines}")


def demo(*argv):
    run_cli("demo", "--epochs", "1", "--out", "/nonexistent/never-written", *argv)


def train_cli(*argv):
    run_cli("train", "--arch", "digits_cnn", "--modules", "2", "--epochs", "1", "--no-progress",
            "--no-plots", "--no-checkpoint", "--out", "/nonexistent/never-written", *argv)


def arrays(n=4, m=2, size=8, **override):
    rng = np.random.default_rng(0)
    a = dict(x_train=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), y_train=rng.integers(0, 10, n),
             x_test=rng.integers(0, 256, (m, size, size, 3), dtype=np.uint8), y_test=rng.integers(0, 10, m))
    a.update(override)
    return a


def npz_file(tmp, **override):
    path = tmp / "data.npz"
    np.savez(path, **arrays(**override))
    return path


def nan_images():
    x = np.random.default_rng(1).random((4, 8, 8, 3)).astype(np.float32)
    x[2, 3, 3, 0] = np.nan
    return x


META = "meta"  # a second device that exists without a GPU

# ----------------------------------------------------------------------------- the table
# (id, entry point, thunk(tmp_path), exception, message regex)

CASES = [
    # --- reconcile(a, d, *, distance, eps, impl)
    ("a-not-tensor", "reconcile", lambda _: reconcile([1.0, 2.0], t(2)), TypeError, r"^a: expected a torch.Tensor"),
    ("a-sparse", "reconcile", lambda _: reconcile(t(2, 3).to_sparse(), t(2, 3).to_sparse()), TypeError,
     r"^a: expected a dense \(strided\) tensor, got layout torch.sparse_coo"),
    ("eps-huge-int", "reconcile", lambda _: reconcile(t(2, 3), t(2, 3), eps=10**400), ValueError,
     r"^eps: expected a finite number >= 0"),
    ("d-not-tensor", "reconcile", lambda _: reconcile(t(2, 3), None), TypeError, r"^d: expected a torch.Tensor"),
    ("a-int-dtype", "reconcile", lambda _: reconcile(torch.ones(2, 3, dtype=torch.long), t(2, 3)), TypeError,
     r"^a: expected a real floating-point tensor"),
    ("a-complex", "reconcile", lambda _: reconcile(t(2, 3, dtype=torch.complex64), t(2, 3, dtype=torch.complex64)),
     TypeError, r"^a: expected a real floating-point"),
    ("a-0dim", "reconcile", lambda _: reconcile(torch.tensor(1.0), torch.tensor(1.0)), ValueError,
     r"^a: expected at least 1 dimension"),
    ("a-empty-batch", "reconcile", lambda _: reconcile(t(0, 5), t(0, 5)), ValueError, r"^a: expected a non-empty batch"),
    ("d-shape", "reconcile", lambda _: reconcile(t(2, 3), t(2, 4)), ValueError, r"^d: expected the same shape as a"),
    ("d-dtype", "reconcile", lambda _: reconcile(t(2, 3), t(2, 3, dtype=torch.float64)), TypeError,
     r"^d: expected the same dtype as a"),
    ("d-device", "reconcile", lambda _: reconcile(t(2, 3), t(2, 3, device=META)), ValueError,
     r"^d: expected the same device as a"),
    ("distance-unknown", "reconcile", lambda _: reconcile(t(2, 3), t(2, 3), distance="l1"), ValueError,
     r"^distance: expected one of \('l2', 'l2_rel', 'cosine'\)"),
    ("distance-none", "reconcile", lambda _: reconcile(t(2, 3), t(2, 3), distance=None), ValueError, r"^distance:"),
    ("eps-negative", "reconcile", lambda _: reconcile(t(2, 3), t(2, 3), eps=-1e-8), ValueError,
     r"^eps: expected a finite number >= 0"),
    ("eps-nan", "reconcile", lambda _: reconcile(t(2, 3), t(2, 3), eps=float("nan")), ValueError, r"^eps:"),
    ("eps-inf", "reconcile", lambda _: reconcile(t(2, 3), t(2, 3), eps=float("inf")), ValueError, r"^eps:"),
    ("eps-string", "reconcile", lambda _: reconcile(t(2, 3), t(2, 3), eps="1e-8"), TypeError,
     r"^eps: expected a real number"),
    ("impl-unknown", "reconcile", lambda _: reconcile(t(2, 3), t(2, 3), impl="cuda"), ValueError,
     r"^impl: expected one of"),
    # --- linear_cross_entropy(x, weight, target, *, bias, reduction, ignore_index, impl)
    ("x-int", "linear_ce", lambda _: linear_cross_entropy(torch.ones(4, 3, dtype=torch.long), t(5, 3), labels(4, 5)),
     TypeError, r"^x: expected a real floating-point"),
    ("x-3d", "linear_ce", lambda _: linear_cross_entropy(t(4, 2, 3), t(5, 3), labels(4, 5)), ValueError,
     r"^x: expected a 2-D tensor"),
    ("x-empty", "linear_ce", lambda _: linear_cross_entropy(t(0, 3), t(5, 3), labels(0, 5)), ValueError,
     r"^x: expected a non-empty batch"),
    ("x-no-features", "linear_ce", lambda _: linear_cross_entropy(t(4, 0), t(5, 0), labels(4, 5)), ValueError,
     r"^x: expected H >= 1"),
    ("weight-H", "linear_ce", lambda _: linear_cross_entropy(t(4, 3), t(5, 2), labels(4, 5)), ValueError,
     r"^weight: expected shape \(V, 3\)"),
    ("weight-dtype", "linear_ce", lambda _: linear_cross_entropy(t(4, 3), t(5, 3, dtype=torch.float64), labels(4, 5)),
     TypeError, r"^weight: expected x's dtype"),
    ("weight-device", "linear_ce", lambda _: linear_cross_entropy(t(4, 3), t(5, 3, device=META), labels(4, 5)),
     ValueError, r"^weight: expected the same device as x"),
    ("bias-shape", "linear_ce", lambda _: linear_cross_entropy(t(4, 3), t(5, 3), labels(4, 5), bias=t(4)), ValueError,
     r"^bias: expected shape \(5,\)"),
    ("bias-dtype", "linear_ce",
     lambda _: linear_cross_entropy(t(4, 3), t(5, 3), labels(4, 5), bias=t(5, dtype=torch.float64)), TypeError,
     r"^bias: expected x's dtype"),
    ("target-float", "linear_ce", lambda _: linear_cross_entropy(t(4, 3), t(5, 3), torch.zeros(4)), TypeError,
     r"^target: expected an integer tensor"),
    ("target-shape", "linear_ce", lambda _: linear_cross_entropy(t(4, 3), t(5, 3), labels(3, 5)), ValueError,
     r"^target: expected shape \(4,\)"),
    ("target-device", "linear_ce", lambda _: linear_cross_entropy(t(4, 3), t(5, 3), labels(4, 5).to(META)),
     ValueError, r"^target: expected the same device as x"),
    ("target-too-big", "linear_ce", lambda _: linear_cross_entropy(t(4, 3), t(5, 3), torch.tensor([0, 1, 5, 2])),
     ValueError, r"^target: expected class indices in \[0, 5\) or ignore_index=-100, found 5"),
    ("target-negative", "linear_ce", lambda _: linear_cross_entropy(t(4, 3), t(5, 3), torch.tensor([0, -1, 2, 2])),
     ValueError, r"^target: expected class indices in \[0, 5\)"),
    ("target-other-ignore-index", "linear_ce",
     lambda _: linear_cross_entropy(t(4, 3), t(5, 3), torch.tensor([0, -100, 2, 2]), ignore_index=-1), ValueError,
     r"^target: .*ignore_index=-1, found -100"),
    ("ignore-index-float", "linear_ce",
     lambda _: linear_cross_entropy(t(4, 3), t(5, 3), labels(4, 5), ignore_index=-100.0), TypeError,
     r"^ignore_index: expected an int"),
    ("ignore-index-bool", "linear_ce",
     lambda _: linear_cross_entropy(t(4, 3), t(5, 3), labels(4, 5), ignore_index=True), TypeError, r"^ignore_index:"),
    ("reduction-unknown", "linear_ce",
     lambda _: linear_cross_entropy(t(4, 3), t(5, 3), labels(4, 5), reduction="avg"), ValueError,
     r"^reduction: expected one of"),
    ("lce-impl-unknown", "linear_ce", lambda _: linear_cross_entropy(t(4, 3), t(5, 3), labels(4, 5), impl="gpu"),
     ValueError, r"^impl: expected one of"),
    ("lce-ignore-index-int64", "linear_ce",
     lambda _: linear_cross_entropy(t(4, 3), t(5, 3), labels(4, 5), ignore_index=2**70), ValueError,
     r"^ignore_index: expected an int64 value"),
    ("lce-meta-cpp", "linear_ce", lambda _: linear_cross_entropy(t(4, 3, device=META), t(5, 3, device=META),
                                                                 labels(4, 5).to(META), impl="cpp"),
     sgr_ext.BackendUnavailable, r"^linear_cross_entropy\(impl='cpp'\): the C\+\+ kernels run on CPU tensors"),
    # --- LocalBlock(module, head)
    ("block-module", "LocalBlock", lambda _: LocalBlock("conv", nn.Linear(2, 2)), TypeError,
     r"^module: expected an nn.Module"),
    ("block-head", "LocalBlock", lambda _: LocalBlock(nn.Linear(2, 2), None), TypeError, r"^head: expected an nn.Module"),
    # --- LocalNet(blocks, *, lam, distance, loss_fn, mode, eps, track_alignment, grad, num_tangents, ...)
    ("blocks-empty", "LocalNet", lambda _: LocalNet([], lam=0.1), ValueError, r"^blocks: expected at least one"),
    ("blocks-not-localblock", "LocalNet", lambda _: LocalNet([nn.Linear(2, 2)], lam=0.1), TypeError,
     r"^blocks\[0\]: expected a LocalBlock"),
    ("lam-negative", "LocalNet", lambda _: net(lam=-0.1), ValueError, r"^lam: expected a finite number >= 0"),
    ("lam-nan", "LocalNet", lambda _: net(lam=float("nan")), ValueError, r"^lam:"),
    ("lam-inf", "LocalNet", lambda _: net(lam=float("inf")), ValueError, r"^lam:"),
    ("lam-string", "LocalNet", lambda _: net(lam="0.1"), TypeError, r"^lam: expected a real number"),
    ("lam-bool", "LocalNet", lambda _: net(lam=True), TypeError, r"^lam: expected a real number"),
    ("lam-tensor", "LocalNet", lambda _: net(lam=torch.tensor(0.1)), TypeError, r"^lam: expected a real number"),
    ("net-distance", "LocalNet", lambda _: net(distance="cos"), ValueError, r"^distance: expected one of"),
    ("net-mode", "LocalNet", lambda _: net(mode="approx"), ValueError, r"^mode: expected one of"),
    ("net-eps", "LocalNet", lambda _: net(eps=-1.0), ValueError, r"^eps:"),
    ("net-loss-fn", "LocalNet", lambda _: net(loss_fn="ce"), TypeError, r"^loss_fn: expected a callable"),
    ("net-grad", "LocalNet", lambda _: net(grad="sideways"), ValueError, r"^grad: expected one of"),
    ("num-tangents-zero", "LocalNet", lambda _: net(num_tangents=0), ValueError, r"^num_tangents: expected an int >= 1"),
    ("num-tangents-float", "LocalNet", lambda _: net(num_tangents=1.5), TypeError, r"^num_tangents: expected an int"),
    ("fg-per-sample", "LocalNet", lambda _: net(fg_per_sample="yes"), TypeError, r"^fg_per_sample: expected a bool"),
    ("nonfinite-policy", "LocalNet", lambda _: net(nonfinite="ignore"), ValueError,
     r"^nonfinite: expected one of \('raise', 'skip', 'warn'\)"),
    ("heads-disagree", "LocalNet", lambda _: LocalNet(blocks(classes=(C, C + 1)), lam=0.1), ValueError,
     r"^blocks\[1\].head: predicts 4 classes, but blocks\[0\].head predicts 3"),
    ("blocks-none", "LocalNet", lambda _: LocalNet(None, lam=0.1), TypeError, r"^blocks: expected a sequence of LocalBlock"),
    ("blocks-two-devices", "LocalNet", lambda _: LocalNet([blocks()[0], blocks()[1].to(META)], lam=0.1), ValueError,
     r"^blocks\[1\].module: parameters on meta, but blocks\[0\].module's are on cpu"),
    ("head-other-device", "LocalNet", lambda _: LocalNet([LocalBlock(nn.Linear(4, 5), nn.Linear(5, C).to(META))], lam=0.1),
     ValueError, r"^blocks\[0\].head: parameters on meta, but blocks\[0\].module's are on cpu"),
    ("track-alignment", "LocalNet", lambda _: net(track_alignment="no"), TypeError, r"^track_alignment: expected a bool"),
    ("lam-huge-int", "LocalNet", lambda _: net(lam=10**400), ValueError, r"^lam: expected a finite number >= 0"),
    # --- LocalNet.train_step(x, y, *, on_block_end)
    ("x-not-tensor", "train_step", lambda _: step([[0.0] * 4] * 8, labels()), TypeError, r"^x: expected a torch.Tensor"),
    ("x-empty-batch", "train_step", lambda _: step(t(0, 4), labels(0)), ValueError, r"^x: expected a non-empty batch"),
    ("x-0dim", "train_step", lambda _: step(torch.tensor(1.0), labels(1)), ValueError, r"^x: expected a non-empty batch"),
    ("x-dtype", "train_step", lambda _: step(t(8, 4, dtype=torch.float64), labels()), TypeError,
     r"^x: expected dtype torch.float32 \(the dtype of blocks\[0\]'s parameters"),
    ("x-device", "train_step", lambda _: step(t(8, 4, device=META), labels().to(META)), ValueError,
     r"^x: expected a tensor on cpu"),
    ("y-device", "train_step", lambda _: step(t(8, 4), labels().to(META)), ValueError,
     r"^y: expected a tensor on x's device"),
    ("y-not-tensor", "train_step", lambda _: step(t(8, 4), [0] * 8), TypeError, r"^y: expected a torch.Tensor"),
    ("y-float", "train_step", lambda _: step(t(8, 4), torch.zeros(8)), TypeError, r"^y: expected an integer tensor"),
    ("y-bool", "train_step", lambda _: step(t(8, 4), torch.zeros(8, dtype=torch.bool)), TypeError,
     r"^y: expected an integer tensor"),
    ("y-batch", "train_step", lambda _: step(t(8, 4), labels(7)), ValueError, r"^y: expected shape \(8,\)"),
    ("y-2d", "train_step", lambda _: step(t(8, 4), labels(8).view(4, 2)), ValueError, r"^y: expected shape \(8,\)"),
    ("y-too-big", "train_step", lambda _: step(t(8, 4), torch.full((8,), C)), ValueError,
     r"^y: expected class indices in \[0, 3\), got values in \[3, 3\]"),
    ("y-negative", "train_step", lambda _: step(t(8, 4), torch.full((8,), -1)), ValueError,
     r"^y: expected class indices in \[0, 3\)"),
    ("y-ignore-index", "train_step", lambda _: step(t(8, 4), torch.tensor([0, 1, -100, 2, 0, 1, 2, 0])), ValueError,
     r"^y: expected class indices in \[0, 3\), got values in \[-100, 2\]"),
    ("conv-heads-disagree", "train_step", lambda _: conv_head_net((C, C + 2)).train_step(t(4, 3, 6, 6), labels(4)),
     ValueError, r"^blocks\[1\].head: predicts 5 classes, but blocks\[0\].head predicts 3"),
    ("conv-heads-y-too-big", "train_step", lambda _: conv_head_net((C, C)).train_step(t(4, 3, 6, 6), torch.full((4,), C)),
     ValueError, r"^y: expected class indices in \[0, 3\)"),
    ("custom-loss-y-batch", "train_step",
     lambda _: net(loss_fn=lambda out, y: F.mse_loss(out, y)).train_step(t(8, 4), t(6, C)), ValueError,
     r"^y: expected a batch of 8 targets"),
    ("on-block-end", "train_step", lambda _: step(t(8, 4), labels(), on_block_end=3), TypeError,
     r"^on_block_end: expected None or a callable"),
    # --- split(model, K, head=None, *, example_input, balance)
    ("split-model", "split", lambda _: split("resnet32", 2), TypeError, r"^model: expected an nn.Module"),
    ("split-no-units", "split", lambda _: split(nn.Linear(4, 3), 1), TypeError,
     r"^model: expected an nn.Sequential or a module with local_units"),
    ("split-no-params", "split", lambda _: split(nn.Sequential(nn.ReLU(), nn.Flatten()), 1), ValueError,
     r"^model: expected at least one child with parameters"),
    ("K-zero", "split", lambda _: split(seq_model(), 0), ValueError, r"^K: expected an int >= 1"),
    ("K-too-big", "split", lambda _: split(seq_model(), 3), ValueError, r"^K: expected at most 2 \(the number of splittable"),
    ("K-float", "split", lambda _: split(seq_model(), 2.0), TypeError, r"^K: expected an int"),
    ("K-bool", "split", lambda _: split(seq_model(), True), TypeError, r"^K: expected an int"),
    ("balance", "split", lambda _: split(seq_model(), 2, balance="flops"), ValueError, r"^balance: expected one of"),
    ("head-not-callable", "split", lambda _: split(seq_model(), 2, head="1c2f"), TypeError,
     r"^head: expected None or a callable"),
    ("head-wrong-classes", "split", lambda _: split(seq_model(), 2, head=bad_head), ValueError,
     r"^head: the head built for block 0 returns \(2, 7\) for a batch of 2; expected \(2, 3\)"),
    ("head-not-module", "split", lambda _: split(seq_model(), 2, head=lambda shape, n: "head"), TypeError,
     r"^head: expected head\(sample_shape, num_classes\) to return an nn.Module"),
    ("example-input-empty", "split", lambda _: split(seq_model(), 2, example_input=t(0, 4)), ValueError,
     r"^example_input: expected a non-empty batch"),
    ("example-input-list", "split", lambda _: split(seq_model(), 2, example_input=[[0.0] * 4]), TypeError,
     r"^example_input: expected a torch.Tensor"),
    ("example-input-shape", "split", lambda _: split(seq_model(), 2, example_input=t(2, 5)), ValueError,
     r"^example_input: the model fails on a batch of shape \(2, 5\)"),
    ("classifier-not-2d", "split",
     lambda _: split(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Unflatten(1, (2, 3))), 1),
     ValueError, r"^model: expected the classifier to return \(B, num_classes\)"),
    # --- sgr-ext demo
    ("demo-epochs", "cli demo", lambda _: demo("--epochs", "0"), CliError, r"^sgr-ext demo: error: --epochs: expected an int >= 1"),
    ("demo-epochs-text", "cli demo", lambda _: demo("--epochs", "ten"), CliError, r"argument --epochs: invalid int value"),
    ("demo-lam", "cli demo", lambda _: demo("--lam", "-1"), CliError, r"--lam: expected a finite number >= 0"),
    ("demo-modules-big", "cli demo", lambda _: demo("--modules", "9"), CliError, r"--modules: expected at most 4"),
    ("demo-modules-zero", "cli demo", lambda _: demo("--modules", "0"), CliError, r"--modules: expected an int >= 1"),
    ("demo-lr-negative", "cli demo", lambda _: demo("--lr", "-0.1"), CliError, r"--lr: expected a finite number >= 0"),
    ("demo-lr-nan", "cli demo", lambda _: demo("--lr", "nan"), CliError, r"--lr: expected a finite number"),
    ("demo-lr-zero", "cli demo", lambda _: demo("--lr", "0"), CliError, r"--lr: expected a (finite )?number > 0"),
    ("demo-batch-zero", "cli demo", lambda _: demo("--batch-size", "0"), CliError, r"--batch-size: expected an int >= 1"),
    ("demo-device", "cli demo", lambda _: demo("--device", "tpu:7x"), CliError, r"--device: expected e.g. 'cpu'"),
    ("demo-distance", "cli demo", lambda _: demo("--distance", "l1"), CliError, r"argument --distance: invalid choice"),
    # --- sgr-ext train
    ("train-lr-zero", "cli train", lambda _: train_cli("--lr", "0"), CliError, r"^sgr-ext train: error: argument --lr: expected a finite number > 0"),
    ("train-momentum", "cli train", lambda _: train_cli("--momentum", "-1"), CliError, r"argument --momentum: expected a finite number >= 0"),
    ("train-weight-decay-nan", "cli train", lambda _: train_cli("--weight-decay", "nan"), CliError, r"argument --weight-decay"),
    ("train-batch-size-text", "cli train", lambda _: train_cli("--batch-size", "abc"), CliError, r"argument --batch-size: expected an integer"),
    ("train-subset-one", "cli train", lambda _: train_cli("--train-subset", "1"), CliError, r"argument --train-subset: expected an integer >= 2"),
    ("train-modules-zero", "cli train", lambda _: train_cli("--modules", "0"), CliError, r"argument --modules/-K: expected an integer >= 1"),
    ("train-lam-warmup", "cli train", lambda _: train_cli("--lam-warmup", "-2"), CliError, r"argument --lam-warmup"),
    ("train-schedule", "cli train", lambda _: train_cli("--schedule", "step"), CliError, r"argument --schedule: invalid choice"),
    ("train-device", "cli train", lambda _: train_cli("--device", "tpu:7x"), CliError, r"--device: expected e.g. 'cpu'"),
    ("train-resume-not-checkpoint", "cli train",
     lambda tmp: train_cli("--resume", str(npz_file(tmp))), CliError, r"checkpoint .*data.npz: not an sgr_ext checkpoint"),
    ("train-data-nan", "cli train", lambda tmp: train_cli("--data", str(npz_file(tmp, x_train=nan_images()))),
     CliError, r"x_train: image 2 contains NaN or infinite values"),
    # --- trainer data loading (load_dataset / load_npz / from_arrays)
    ("data-empty-spec", "data", lambda _: load_dataset(""), ValueError, r"^--data: expected 'digits', an .npz path"),
    ("data-missing-file", "data", lambda tmp: load_dataset(str(tmp / "none.npz")), FileNotFoundError, r"no such file"),
    ("npz-not-zip", "data", lambda tmp: (tmp / "bad.npz").write_bytes(b"not a zip") and load_npz(tmp / "bad.npz"),
     ValueError, r"not a readable .npz file"),
    ("npz-missing-keys", "data",
     lambda tmp: np.savez(tmp / "m.npz", x_train=np.zeros((4, 8, 8))) or load_npz(tmp / "m.npz"), ValueError,
     r"missing arrays \['y_train', 'x_test', 'y_test'\]"),
    ("labels-float", "data", lambda _: from_arrays("t", **arrays(y_train=np.zeros(4))), ValueError,
     r"^y_train: expected integer class labels"),
    ("labels-negative", "data", lambda _: from_arrays("t", **arrays(y_train=np.array([0, 1, -1, 2]))), ValueError,
     r"^y_train: expected labels >= 0"),
    ("labels-count", "data", lambda _: from_arrays("t", **arrays(y_test=np.zeros(3, int))), ValueError,
     r"^y_test: expected 2 labels"),
    ("labels-beyond-classes", "data",
     lambda _: from_arrays("t", **arrays(y_test=np.array([3, 12])), num_classes=10), ValueError,
     r"^labels: expected classes in \[0, 10\)"),
    ("images-5d", "data", lambda _: from_arrays("t", **arrays(x_train=np.zeros((4, 1, 8, 8, 3)))), ValueError,
     r"^x_train: expected images of shape"),
    ("images-channel-axis", "data", lambda _: from_arrays("t", **arrays(x_train=np.zeros((4, 5, 5, 5)))), ValueError,
     r"^x_train: cannot tell the channel axis"),
    ("images-test-shape", "data", lambda _: from_arrays("t", **arrays(x_test=np.zeros((2, 9, 9, 3)))), ValueError,
     r"^x_test: expected images of shape"),
    ("images-one", "data", lambda _: from_arrays("t", **arrays(n=1)), ValueError,
     r"^x_train: expected at least 2 training images"),
    ("images-nan", "data", lambda _: from_arrays("t", **arrays(x_train=nan_images())), ValueError,
     r"^x_train: image 2 contains NaN or infinite values"),
    ("images-inf-test", "data",
     lambda _: from_arrays("t", **arrays(x_test=np.full((2, 8, 8, 3), np.inf, np.float32))), ValueError,
     r"^x_test: image 0 contains NaN or infinite"),
    ("images-bool", "data", lambda _: from_arrays("t", **arrays(x_train=np.zeros((4, 8, 8, 3), bool))), ValueError,
     r"^x_train: expected integer or floating-point pixel values"),
]


def test_the_table_covers_every_entry_point_with_enough_cases():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES), "case ids must be unique"
    entries = {c[1] for c in CASES}
    assert entries == {"reconcile", "linear_ce", "LocalBlock", "LocalNet", "train_step", "split", "cli demo",
                       "cli train", "data"}


@pytest.mark.parametrize("case_id, entry, thunk, exc, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, entry, thunk, exc, match, tmp_path):
    with pytest.raises(exc, match=match):
        thunk(tmp_path)


# ----------------------------------------------------------------------------- accepted inputs


def _reconcile_impls():
    from sgr_ext.ops import _backends

    impls = ["torch", "triton"]
    if _backends.cpp_ops() is not None:
        impls.append("cpp")
    return impls


@pytest.mark.parametrize("impl", _reconcile_impls())
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_reconcile_accepts_non_contiguous_inputs(impl, distance):
    base_a = t(6, 5, 7, dtype=torch.float64).requires_grad_(True)
    base_d = t(6, 5, 7, dtype=torch.float64)
    views = [
        lambda x: x.transpose(1, 2),                     # permuted
        lambda x: x[::2, :, 1:6],                        # strided slices
        lambda x: x.unsqueeze(0).expand(2, 6, 5, 7)[1],  # expanded
    ]
    for view in views:
        a, d = view(base_a), view(base_d)
        assert not a.is_contiguous() or view is views[2]
        got = reconcile(a, d, distance=distance, impl=impl)
        want = reconcile(a.contiguous(), d.contiguous(), distance=distance, impl="torch")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        (ga,) = torch.autograd.grad(got, base_a)
        (wa,) = torch.autograd.grad(want, base_a)
        torch.testing.assert_close(ga, wa, rtol=1e-10, atol=1e-12)
    cl = t(3, 4, 5, 5).to(memory_format=torch.channels_last)
    dl = t(3, 4, 5, 5).to(memory_format=torch.channels_last)
    torch.testing.assert_close(reconcile(cl, dl, distance=distance, impl=impl),
                               reconcile(cl.contiguous(), dl.contiguous(), distance=distance, impl="torch"))


def test_linear_ce_accepts_non_contiguous_and_ignore_index():
    x = t(12, 6, dtype=torch.float64).t().contiguous().t()[:, :5]  # non-contiguous (N, H)
    w = t(7, 5, dtype=torch.float64).t().contiguous().t()
    target = torch.tensor([0, 3, -100, 6, 2, -100, 1, 1, 0, 5, 4, 3])
    ref = F.cross_entropy(x @ w.t(), target)
    for impl in ("torch", "cpp", "triton"):
        try:
            got = linear_cross_entropy(x, w, target, impl=impl)
        except sgr_ext.ops.reconcile.BackendUnavailable:
            continue
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
        # a custom ignore_index inside the class range, int32 targets
        t32 = target.clamp_min(0).to(torch.int32)
        torch.testing.assert_close(linear_cross_entropy(x, w, t32, ignore_index=3, impl=impl),
                                   F.cross_entropy(x @ w.t(), t32.long(), ignore_index=3), rtol=1e-9, atol=1e-12)


def test_train_step_accepts_non_contiguous_x_and_int32_labels():
    x = t(8, 8)[:, ::2]  # (8, 4), non-contiguous
    y = labels(dtype=torch.int32)
    a, b = net(mode="double_backward"), net(mode="double_backward")
    b.load_state_dict(a.state_dict())
    sa = a.train_step(x, y)
    sb = b.train_step(x.contiguous(), y.long())
    assert sa.losses == sb.losses
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_train_step_accepts_channels_last_images():
    def make():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                              nn.Flatten(), nn.Linear(3 * 4 * 4, C))
        return LocalNet(split(model, 2, example_input=t(2, 2, 4, 4)), lam=0.3, mode="double_backward")

    x, y = t(4, 2, 4, 4), labels(4)
    a, b = make(), make()
    a.train_step(x.to(memory_format=torch.channels_last), y)
    b.train_step(x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_train_step_under_autocast_accepts_float32_input_of_a_bf16_capable_model():
    """Autocast lets x's dtype differ from the parameters' (the dtype check stands aside)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = net(mode="double_backward").train_step(t(8, 4), labels())
    assert all(math.isfinite(v) for v in stats.losses)
