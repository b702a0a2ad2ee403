"""What a new user meets first: messages for wrong data and wrong input, the CLI's help, plots of short runs."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import sgr_ext
from sgr_ext.trainer import metrics
from sgr_ext.trainer.data import load_dataset


def test_a_file_that_is_not_an_npz_is_called_so(tmp_path):
    for name, content in (("text.npz", b"just some text, no archive"), ("array.npz", None)):
        path = tmp_path / name
        if content is None:  # a single pickled object array saved with np.save, named .npz
            with open(path, "wb") as f:
                np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        else:
            path.write_bytes(content)
        with pytest.raises(ValueError, match="not a NumPy .npz archive") as info:
            load_dataset(str(path))
        assert "allow_pickle" not in str(info.value)


def test_an_npz_of_object_arrays_is_refused_without_inviting_pickle(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1), x_test=np.zeros(1), y_test=np.zeros(1))
    with pytest.raises(ValueError, match="object .pickled. arrays, which are never loaded") as info:
        load_dataset(str(path))
    assert "allow_pickle" not in str(info.value)


def test_a_directory_without_cifar_batches_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/ with data_batch_1") as info:
        load_dataset(str(tmp_path))
    assert "download" not in str(info.value).replace("nothing is downloaded", "")
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for f in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (batches / f).write_bytes(b"not a batch")
    with pytest.raises(ValueError, match="fail their checksums") as info:
        load_dataset(str(tmp_path))
    assert "download=True" not in str(info.value)


def _conv_net():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    return sgr_ext.LocalNet(sgr_ext.split(model, 2, example_input=torch.randn(2, 3, 6, 6)), lam=0.1)


@pytest.mark.parametrize("x, exc, match", [
    (torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8), TypeError,
     r"x: expected a floating-point tensor \(blocks\[0\] starts with Conv2d\(3, 4.*got dtype torch.uint8 "
     r"\(images: x.float\(\) / 255"),
    (torch.randn(4, 6, 6, 3), ValueError, r"x: expected \(B, C, H, W\) inputs with C = 3 channels first.*"
     r"got shape \(4, 6, 6, 3\) \(channels last\? use x.movedim\(-1, 1\)\)"),
    (torch.randn(4, 1, 6, 6), ValueError, r"x: expected \(B, C, H, W\) inputs with C = 3 channels first"),
])
def test_step_input_dtype_and_layout_are_named(x, exc, match):
    net = _conv_net()
    y = torch.randint(0, 5, (4,))
    for call in (net.train_step, net):
        with pytest.raises(exc, match=match):
            call(x, y)
    assert all(p.grad is None for p in net.parameters())


def test_linear_first_layer_names_its_features():
    net = sgr_ext.LocalNet([sgr_ext.LocalBlock(nn.Linear(6, 4), nn.Linear(4, 3))], lam=0.0)
    with pytest.raises(ValueError, match=r"x: expected \(B, \.\.\., 6\) inputs"):
        net.train_step(torch.randn(5, 7), torch.randint(0, 3, (5,)))
    net.train_step(torch.randn(5, 6), torch.randint(0, 3, (5,)))  # the right input still trains


def test_demo_help_shows_every_option_with_its_default():
    proc = subprocess.run([sys.executable, "-m", "sgr_ext.cli", "demo", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for option, default in (("--epochs", "15"), ("--batch-size", "64"), ("--lr", "0.05"), ("--seed", "0"),
                            ("--modules", "4")):
        assert option in text and f"(default {default})" in text, option
    assert "--lam LAM strength; default:" in text  # its default is the study's setting, said in words


def test_a_single_point_is_drawn_with_a_marker():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    try:
        metrics._plot_masked(ax, [1], [0.5], label="one epoch")
        metrics._plot_masked(ax, [1, 2], [0.5, 0.4], label="two epochs")
        one, two = ax.get_lines()
        assert one.get_marker() == "o"  # a line through one point is invisible
        assert two.get_marker() in ("None", None, "")  # longer curves stay plain lines
    finally:
        plt.close(fig)
