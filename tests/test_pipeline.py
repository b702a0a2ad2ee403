"""The two-stream block pipeline (``sgr_ext.engine.pipeline``), scheduled on a fake stream
layer: which stream each block runs on, what it waits for, which tensors it marks as used
by its stream, and the final join. Runs on CPU; the CUDA backend only forwards these calls."""
import copy
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sgr_ext
from sgr_ext import net as net_module
from sgr_ext.engine import pipeline


class FakeEvent:
    def __init__(self, name: str):
        self.name = name


class FakeStream:
    def __init__(self, name: str, log: list):
        self.name, self.log, self.recorded = name, log, 0

    def record_event(self) -> FakeEvent:
        self.recorded += 1
        ev = FakeEvent(f"{self.name}#{self.recorded}")
        self.log.append(("record", self.name, ev.name))
        return ev

    def wait_event(self, ev: FakeEvent) -> None:
        self.log.append(("wait", self.name, ev.name))

    def wait_stream(self, other: "FakeStream") -> None:
        self.log.append(("wait_stream", self.name, other.name))


class FakeStreams:
    """Stands in for ``pipeline.CudaStreams``; logs every call in order."""

    def __init__(self):
        self.log: list = []
        self.main = FakeStream("main", self.log)
        self.sides = (FakeStream("s0", self.log), FakeStream("s1", self.log))
        self.active = self.main
        self.names: dict = {}  # id(tensor) -> a readable name, filled by the test

    def accepts(self, x):
        return True

    def current(self, device):
        return self.active

    def side(self, device):
        return self.sides

    @contextmanager
    def use(self, stream):
        before, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = before

    def record_stream(self, t, stream):
        self.log.append(("record_stream", stream.name, self.names.get(id(t), "?")))

    def synchronize(self, device):
        self.log.append(("synchronize",))


def _blocks():
    torch.manual_seed(0)
    return [
        sgr_ext.LocalBlock(nn.Sequential(nn.Linear(5, 6), nn.Tanh()), nn.Linear(6, 3)),
        sgr_ext.LocalBlock(nn.Sequential(nn.Linear(6, 6), nn.ReLU()), nn.Linear(6, 3)),
        sgr_ext.LocalBlock(nn.Sequential(nn.Linear(6, 4), nn.Tanh()), nn.Linear(4, 3)),
    ]


def test_localnet_step_schedules_blocks_on_alternating_streams(monkeypatch):
    fake = FakeStreams()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    fake.names.update({id(x): "x", id(y): "y"})
    monkeypatch.setattr(net_module, "BlockPipeline", lambda x, enabled: pipeline.BlockPipeline(x, True, fake))
    net = sgr_ext.LocalNet(copy.deepcopy(_blocks()), lam=0.5, overlap=True)
    engine = net.step_engine()

    def logged_engine(block, h, y_, d, cfg, need_output_grad):
        fake.log.append(("engine", fake.active.name, fake.names.get(id(h), "?"), fake.names.get(id(d), "-")))
        r = engine(block, h, y_, d, cfg, need_output_grad)
        k = len([e for e in fake.log if e[0] == "engine"])
        fake.names.update({id(r.output): f"x{k}", id(r.output_grad): f"d{k}"} if r.output_grad is not None else {id(r.output): f"x{k}"})
        return r

    monkeypatch.setattr(net, "step_engine", lambda: logged_engine)
    watch = net._watch_label_range

    def named_labels(x_, y_, guard):  # the step hands the blocks a range-clamped copy of y
        out = watch(x_, y_, guard)
        fake.names[id(out)] = "y"
        return out

    monkeypatch.setattr(net, "_watch_label_range", named_labels)
    net.train_step(x, y)
    assert fake.log == [
        ("record", "main", "main#1"),  # block 0 starts after everything queued before the step
        ("wait", "s0", "main#1"), ("record_stream", "s0", "x"), ("record_stream", "s0", "y"),
        ("engine", "s0", "x", "-"),
        ("record", "s0", "s0#1"),  # x_1, D_1 ready (CPU engines give no event: recorded after the step)
        ("wait", "s1", "s0#1"), ("record_stream", "s1", "x1"), ("record_stream", "s1", "d1"),
        ("record_stream", "s1", "y"),
        ("engine", "s1", "x1", "d1"),
        ("record", "s1", "s1#1"),
        ("wait", "s0", "s1#1"), ("record_stream", "s0", "x2"), ("record_stream", "s0", "d2"),
        ("record_stream", "s0", "y"),
        ("engine", "s0", "x2", "d2"),
        ("record", "s0", "s0#2"),
        ("wait_stream", "main", "s0"), ("wait_stream", "main", "s1"),  # the caller sees every result
    ]
    # the schedule does not change the arithmetic
    ref = sgr_ext.LocalNet(copy.deepcopy(_blocks()), lam=0.5, overlap=False)
    ref.train_step(x, y)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_next_block_waits_for_the_engines_ready_event_not_the_whole_step():
    fake = FakeStreams()
    pipe = pipeline.BlockPipeline(torch.zeros(2), True, fake)
    early = FakeEvent("ready-after-forward")
    with pipe.block(0):
        pipe.done(SimpleNamespace(ready=early))
    with pipe.block(1):
        pipe.done(SimpleNamespace(ready=None))
    pipe.finish()
    assert ("wait", "s1", "ready-after-forward") in fake.log
    assert ("record", "s0", "s0#1") not in fake.log  # nothing recorded when the engine gave its event


def test_in_place_change_of_a_block_input_raises_after_synchronizing():
    fake = FakeStreams()
    h = torch.zeros(3)
    pipe = pipeline.BlockPipeline(h, True, fake)
    with pytest.raises(RuntimeError, match="overlap=False"):
        with pipe.block(1, h):
            h.add_(1.0)
    assert fake.log[-1] == ("synchronize",)


def test_overlap_is_off_on_cpu_and_checked():
    x = torch.zeros(2, 3)
    assert not pipeline.overlap_enabled(True, x, 3)
    assert not pipeline.overlap_enabled("auto", x, 3)
    assert not pipeline.BlockPipeline(x, True).enabled  # the CUDA backend refuses CPU tensors
    with pytest.raises(ValueError, match="overlap"):
        sgr_ext.LocalNet(_blocks(), lam=0.1, overlap="yes")
