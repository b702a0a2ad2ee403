"""``runner(x, y).loss.backward()`` for ``DataParallelLocalNet`` on 2 gloo ranks: the same gradients
as ``runner.train_step(x, y)`` (float64, 1e-12), with a scale factor and two accumulated micro-batches."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sgr_ext
from sgr_ext import distributed as sd
from _dist_util import check_all_ok, launch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _net(mode):
    torch.manual_seed(0)
    blocks = [sgr_ext.LocalBlock(nn.Sequential(nn.Linear(6 if k == 0 else 7, 7), nn.Tanh()), nn.Linear(7, 3))
              for k in range(3)]
    return sgr_ext.LocalNet(blocks, lam=0.5, mode=mode).double()


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _worker(ctx, modes):
    for mode in modes:
        ref = sd.DataParallelLocalNet(_net(mode))
        runner = sd.DataParallelLocalNet(copy.deepcopy(ref.net))
        micro = [_batch(9, seed=1), _batch(8, seed=2)]  # uneven shards
        for xb, yb in micro:
            want = ref.train_step(xb, yb)
        seen, in_backward = [], [False]
        for p in runner.parameters():  # e.g. a reducer's hooks: they see each backward's gradient
            p.register_hook(lambda g: seen.append(1) if in_backward[0] else None)
        for i, (xb, yb) in enumerate(micro):
            out = runner(xb, yb)
            if i == 0:
                assert all(p.grad is None for p in runner.parameters())  # the forward adds nothing
            in_backward[0] = True
            (2.5 * out.loss / len(micro)).backward()
            in_backward[0] = False
        assert len(seen) == 2 * len(list(runner.parameters()))
        assert out.stats.losses == want.losses  # full-batch statistics, identical on every rank
        assert out.logits.shape[0] == 4  # this rank's shard of the 8 samples
        for p, q in zip(ref.parameters(), runner.parameters()):
            torch.testing.assert_close(q.grad, 1.25 * p.grad, rtol=0, atol=1e-12)
    return True


def test_data_parallel_runner_call_equals_train_step(tmp_path):
    payloads, _ = launch(_worker, 2, tmp_path, modes=["exact", "double_backward"])
    assert check_all_ok(payloads) == [True, True]
