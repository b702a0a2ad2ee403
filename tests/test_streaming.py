"""Image directories: ImageFolder trees streamed through a DataLoader, or loaded whole when small."""
import numpy as np
import pytest
import torch

from sgr_ext.data import TensorDataset
from sgr_ext.trainer import streaming
from sgr_ext.trainer.data import load_dataset

Image = pytest.importorskip("PIL.Image")

CLASSES = ("cat", "dog", "eel")


def write_image_folder(root, per_class=(5, 2), size=(10, 12), seed=0):
    """root/train/<class>/*.png and root/test/<class>/*.png, RGB, images of ``size`` (W, H)."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_small_tree_loads_whole_and_streams_the_same_images(tmp_path):
    root = write_image_folder(tmp_path / "tiny")
    whole = load_dataset(str(root))  # auto: tiny, so in memory
    assert isinstance(whole, TensorDataset)
    assert whole.x_train.shape == (15, 3, 10, 10) and whole.num_classes == 3  # shorter side 10, centre crop
    assert whole.x_test.shape == (6, 3, 10, 10)
    assert torch.equal(whole.y_train, torch.tensor([0] * 5 + [1] * 5 + [2] * 5))
    src = load_dataset(str(root), loader="stream", workers=0)
    assert isinstance(src, streaming.ImageSource) and (src.train_len, src.test_len) == (15, 6)
    order = [[3, 0, 14], [7, 1], [2]]
    got = list(src.batches("train", order))
    assert [len(y) for _, y in got] == [3, 2, 1]
    for (x, y), ix in zip(got, order):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(y, whole.y_train[ix])
        # 15 training images < STATS_SAMPLES: both paths standardise with the same statistics
        torch.testing.assert_close(x, whole.x_train[ix], rtol=1e-4, atol=1e-4)


def test_workers_decode_in_other_processes(tmp_path):
    src = load_dataset(str(write_image_folder(tmp_path / "tiny")), loader="stream", workers=2)
    xs = torch.cat([x for x, _ in src.batches("test", [[0, 1], [2, 3], [4, 5]])])
    one = torch.cat([x for x, _ in streaming.ImageSource.batches(src, "test", [[0, 1, 2, 3, 4, 5]])])
    torch.testing.assert_close(xs, one, rtol=0, atol=0)


def test_auto_streams_what_does_not_fit(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "tiny")
    monkeypatch.setattr(streaming, "IN_MEMORY_LIMIT", 15 * 3 * 10 * 10 * 4)  # below train + test
    assert isinstance(load_dataset(str(root)), streaming.ImageSource)
    assert isinstance(load_dataset(str(root), loader="memory"), TensorDataset)


def test_image_size_resizes_every_image(tmp_path):
    root = write_image_folder(tmp_path / "tiny", size=(9, 7))
    src = load_dataset(str(root), loader="stream", image_size=5, workers=0)
    assert src.shape == (3, 5, 5)
    (x, _), = src.batches("train", [[0, 1]])
    assert x.shape == (2, 3, 5, 5)


def test_layout_errors_name_the_expected_layouts(tmp_path):
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"ImageFolder tree DIR/train/<class>/<image>.*cifar-10-batches-py"):
        load_dataset(str(tmp_path / "only_train"))
    root = write_image_folder(tmp_path / "extra")
    (root / "test" / "zebra").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "test" / "zebra" / "0.png")
    with pytest.raises(ValueError, match=r"test/ has classes \['zebra'\] that train/ does not have"):
        load_dataset(str(root))
    with pytest.raises(ValueError, match="--loader: expected one of"):
        load_dataset(str(root), loader="disk")


def test_train_streams_an_image_folder_and_matches_the_in_memory_run(tmp_path, monkeypatch):
    from sgr_ext.trainer.loop import TrainConfig, train

    root = write_image_folder(tmp_path / "tiny", size=(8, 8))
    calls = []
    real = streaming.ImageSource.batches

    def counting(self, split, index_lists, pin_memory=False):
        index_lists = [list(ix) for ix in index_lists]
        calls.append((split, index_lists))
        return real(self, split, index_lists, pin_memory)

    monkeypatch.setattr(streaming.ImageSource, "batches", counting)
    common = dict(arch="resnet32", modules=2, method="sgr", epochs=2, batch_size=6, lr=0.05, progress=False,
                  plots=False, checkpoint=False, data=str(root), workers=0, seed=3, deterministic=True)
    streamed = train(TrainConfig(out=str(tmp_path / "s"), loader="stream", **common))
    assert {c[0] for c in calls} == {"train", "test"}
    train_lists = [ix for split, lists in calls if split == "train" for ix in lists]
    assert sorted(i for ix in train_lists[:3] for i in ix) == list(range(15))  # one epoch visits every image once
    assert [len(ix) for ix in train_lists[:3]] == [6, 6, 3]
    calls.clear()
    whole = train(TrainConfig(out=str(tmp_path / "m"), loader="memory", **common))
    assert not calls
    assert streamed["dataset"] == whole["dataset"] == {"name": "tiny", "train": 15, "test": 6, "shape": [3, 8, 8],
                                                       "classes": 3}
    for a, b in zip(streamed["history"], whole["history"]):  # same samples, same order, same augmentation
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_acc"] == b["test_acc"]


def test_cli_train_on_an_image_folder(tmp_path):
    from sgr_ext.cli import main

    root = write_image_folder(tmp_path / "tiny", size=(8, 8))
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--loader", "stream", "--workers", "1", "--arch", "resnet32",
                 "--modules", "2", "--epochs", "1", "--batch-size", "8", "--no-progress", "--no-plots",
                 "--no-checkpoint", "--out", str(out)]) == 0
    assert (out / "results.json").is_file()
