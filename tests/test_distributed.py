"""sgr_ext.distributed on CPU with gloo: 2-3 processes on one machine.

Data parallel: gradients and statistics equal one process's on the full batch. Module
parallel: each stage's gradients (and the last stage's statistics) equal the
single-device step, over two optimizer steps. A rank that dies makes the others raise
``PeerError`` within the timeout. Ranks are launched by ``tests/_dist_util.py``.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import sgr_ext
from sgr_ext import distributed as sd
from _dist_util import TIMEOUT_S, check_all_ok, launch
from _dist_util import free_port as _free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput_model  # noqa: E402  (benchmarks/: the throughput model is benchmark analysis)

EXAMPLE = ROOT / "benchmarks" / "dist_train_example.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# ------------------------------------------------------------------------------ models


def make_net(K=4, lam=0.5, distance="l2", mode="double_backward", track_alignment=False, seed=0):
    torch.manual_seed(seed)
    blocks = []
    for k in range(K):
        body = nn.Sequential(nn.Linear(6 if k == 0 else 10, 10), nn.Tanh())
        blocks.append(sgr_ext.LocalBlock(body, nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))))
    return sgr_ext.LocalNet(blocks, lam=lam, distance=distance, mode=mode, track_alignment=track_alignment).double()


def make_batch(B, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)


def assert_stats_close(got, want, blocks=None):
    blocks = range(len(want.losses)) if blocks is None else blocks
    for field in ("losses", "penalties", "accuracies", "cosines", "norm_ratios"):
        g, w = getattr(got, field), getattr(want, field)
        for k in blocks:
            if w[k] is None:
                assert g[k] is None, (field, k)
            else:
                tol = 1e-9 if field in ("losses", "penalties") else 1e-6  # the others are float32 means
                assert abs(g[k] - w[k]) <= tol * max(1.0, abs(w[k])), (field, k, g[k], w[k])


def assert_grads_close(net, ref, blocks):
    for k in blocks:
        for (name, p), q in zip(net.blocks[k].named_parameters(), ref.blocks[k].parameters()):
            assert p.grad is not None, (k, name)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=f"block {k} {name}")


# ------------------------------------------------------------------------------ workers


def _dp_worker(ctx, cases):
    out = []
    for case in cases:
        net = make_net(**case["net"])
        ref = copy.deepcopy(net)
        dp = sd.DataParallelLocalNet(net)
        opt = torch.optim.SGD(dp.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for step in range(2):
            x, y = make_batch(case["batch"], seed=step)
            opt.zero_grad(set_to_none=True)
            ref_opt.zero_grad(set_to_none=True)
            want = ref.train_step(x, y)
            got = dp.train_step(x, y)
            assert_grads_close(net, ref, range(len(net.blocks)))
            assert_stats_close(got, want)
            opt.step()
            ref_opt.step()
        with dp.no_sync():  # local shard only: differs from the full batch
            x, y = make_batch(case["batch"], seed=7)
            local = dp.train_step(x, y)
        xs, ys = sd.shard_batch(x, y, ctx.rank, ctx.world_size)
        assert_stats_close(local, ref.train_step(xs, ys))
        out.append(case["batch"])
    return out


def _mp_worker(ctx, cases):
    out = []
    for case in cases:
        net = make_net(**case["net"])
        ref = copy.deepcopy(net)
        stage = sd.PipelineStage(net, micro_batches=case["micro_batches"], placement=case.get("placement"))
        opt = torch.optim.SGD(stage.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for step in range(2):  # the second step checks that steps stream without a flush
            x, y = make_batch(case["batch"], seed=step)
            opt.zero_grad(set_to_none=True)
            ref_opt.zero_grad(set_to_none=True)
            want = ref.train_step(x, y)
            got = stage.train_step(x if stage.is_first else None, y)
            assert_grads_close(net, ref, stage.owned)
            assert len(got.losses) == stage.stop
            assert_stats_close(got, want, range(stage.stop))
            opt.step()
            ref_opt.step()
        stage.sync_model()  # every rank now holds the whole trained model
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
        out.append((list(stage.owned), stage.placement))
    return out


def _dying_worker(ctx, parallel, victim, hang_s=None):
    net = make_net(K=3)
    runner = sd.DataParallelLocalNet(net) if parallel == "data" else sd.PipelineStage(net, micro_batches=2)
    t_death = None
    for step in range(1000):
        if step == 2 and ctx.rank == victim:
            if hang_s:  # alive but silent: only the timeout can tell
                time.sleep(hang_s)
                os._exit(18)
            os._exit(17)
        if step == 2:
            t_death = time.monotonic()
        x, y = make_batch(8, seed=step)
        try:
            runner.train_step(x, y)
        except sd.PeerError as exc:
            return {"step": step, "error": str(exc), "after_s": time.monotonic() - (t_death or time.monotonic())}
    return {"step": None}


def _example_worker(runs):
    import importlib.util

    spec = importlib.util.spec_from_file_location("dist_train_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = []
    for argv, port in runs:  # one process group per run, as torchrun would start
        os.environ["MASTER_PORT"] = str(port)
        results.append(mod.main(argv))
    return results


# ------------------------------------------------------------------------------ tests


def test_two_ranks_data_and_module_parallel_equal_single_process(tmp_path):
    dp_cases = [
        {"net": {"lam": 0.5}, "batch": 12},
        {"net": {"lam": 0.3, "distance": "cosine"}, "batch": 13},  # shards of 7 and 6
        {"net": {"lam": 0.0, "track_alignment": True}, "batch": 10},
    ]
    mp_cases = [
        {"net": {"lam": 0.5}, "batch": 12, "micro_batches": 3},
        {"net": {"lam": 0.3, "distance": "cosine"}, "batch": 11, "micro_batches": 4, "placement": [1, 3]},
        {"net": {"lam": 0.0}, "batch": 8, "micro_batches": 2},  # no D travels
    ]
    payloads, _ = launch(_two_rank_worker, 2, tmp_path, dp_cases=dp_cases, mp_cases=mp_cases)
    results = check_all_ok(payloads)
    assert results[0]["mp"][0][0] == [0, 1] and results[1]["mp"][0][0] == [2, 3]
    assert results[1]["mp"][1][0] == [1, 2, 3]


def _two_rank_worker(ctx, dp_cases, mp_cases):
    out = {"dp": _dp_worker(ctx, dp_cases), "mp": _mp_worker(ctx, mp_cases)}
    # A NaN in the last rank's shard: every rank applies LocalNet's nonfinite policy alike,
    # and the group stays usable.
    x, y = make_batch(3 * ctx.world_size, seed=3)
    x[-1, 0] = float("nan")
    dp = sd.DataParallelLocalNet(make_net(K=2))
    with pytest.raises(sgr_ext.NonFiniteError) as info:
        dp.train_step(x, y)
    assert info.value.block == 0
    assert all(p.grad is None for p in dp.parameters())  # left as before the step
    dp.net.nonfinite = "skip"
    with pytest.warns(RuntimeWarning, match="non-finite"):
        st = dp.train_step(x, y)
    assert st.skipped and st.nonfinite_blocks == [0, 1] and all(p.grad is None for p in dp.parameters())
    dp.train_step(*make_batch(3 * ctx.world_size, seed=4))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dp.parameters())
    # Module parallel: the bad input is seen by the first stage and reported forward.
    stage = sd.PipelineStage(make_net(K=ctx.world_size), micro_batches=2)
    x, y = make_batch(4, seed=5)
    x[0, 0] = float("nan")
    with pytest.raises(sgr_ext.NonFiniteError) as info:
        stage.train_step(x, y)
    assert info.value.block == 0 and all(p.grad is None for p in stage.parameters())
    stage.train_step(*make_batch(4, seed=6))
    stage.flush()
    return out


def test_three_ranks_uneven_shards_and_stages(tmp_path):
    dp_cases = [{"net": {"lam": 0.5, "K": 3}, "batch": 10}]  # shards 4, 3, 3
    mp_cases = [
        {"net": {"lam": 0.5, "K": 4}, "batch": 10, "micro_batches": 4, "placement": [2, 1, 1]},  # 3,3,2,2
        {"net": {"lam": 0.4, "K": 5, "track_alignment": True}, "batch": 6, "micro_batches": 8},  # M > B: 6 of 1
    ]
    payloads, _ = launch(_two_rank_worker, 3, tmp_path, dp_cases=dp_cases, mp_cases=mp_cases)
    results = check_all_ok(payloads)
    assert [r["mp"][0][0] for r in results] == [[0, 1], [2], [3]]
    assert [r["mp"][1][0] for r in results] == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("parallel", ["data", "module"])
def test_dead_rank_is_an_error_not_a_hang(tmp_path, parallel):
    victim = 1
    payloads, codes = launch(_dying_worker, 3, tmp_path, deadline_s=4 * TIMEOUT_S + 15, parallel=parallel,
                             victim=victim)
    assert codes[victim] == 17 and payloads[victim] is None
    for r in (0, 2):
        p = payloads[r]
        assert p is not None and p["ok"], p
        res = p["result"]
        assert res["step"] is not None, f"rank {r} never noticed that rank {victim} died"
        assert f"rank {r}:" in res["error"] and "died" in res["error"], res["error"]
        assert res["after_s"] < 3 * TIMEOUT_S + 5, res


def test_hung_rank_times_out(tmp_path):
    victim, timeout = 1, 2.0
    payloads, codes = launch(_dying_worker, 3, tmp_path, deadline_s=6 * timeout + 15, parallel="module",
                             victim=victim, hang_s=2.5 * timeout, _timeout=timeout)
    assert codes[victim] == 18
    for r in (0, 2):
        res = payloads[r]["result"]
        assert res["step"] is not None and "died or hangs" in res["error"], res
        assert res["after_s"] < 2 * timeout + 3, res


def test_example_script_under_torchrun_env(tmp_path):
    argv = ["--steps", "3", "--batch-size", "24", "--log-every", "1", "--timeout", "30", "--mode", "double_backward"]
    runs = [(argv + ["--parallel", "data"], _free_port()),
            (argv + ["--parallel", "module", "--micro-batches", "3", "--placement", "3,1"], _free_port())]
    payloads, _ = launch(_example_worker, 2, tmp_path, _setup=False, runs=runs)
    results = check_all_ok(payloads)
    for i, (parallel, logging_rank) in enumerate((("data", 0), ("module", 1))):
        logger = results[logging_rank][i]
        assert logger["parallel"] == parallel and logger["world_size"] == 2
        assert 0.0 <= logger["test_acc"] <= 1.0 and logger["final_loss"] == logger["final_loss"]


# ------------------------------------------------------------------------------ single process


def test_partition_and_bubble():
    assert sd.partition([1, 1, 1, 1], 2) == [2, 2]
    assert sd.partition([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert sd.partition([1, 2, 3, 4, 5], 3) == [3, 1, 1]  # sums 6, 4, 5
    assert sum(sd.partition([0.3] * 7, 3)) == 7
    with pytest.raises(ValueError):
        sd.partition([1, 2], 3)
    assert sd.pipeline_bubble(1, 8) == 0.0
    assert sd.pipeline_bubble(4, 4) == pytest.approx(3 / 7)


def test_throughput_model():
    # 4 equal blocks, 1 ms each per micro-batch, free links: P=4 stages, M=8.
    m = throughput_model.model_module_parallel([1.0] * 4, [0.0] * 4, 4, 8, link_gbps=1e9, latency_us=0.0)
    assert m["placement"] == [1, 1, 1, 1]
    assert m["step_ms_flushed"] == pytest.approx(11.0)  # (M + P - 1) * t
    assert m["step_ms_streamed"] == pytest.approx(8.0)
    assert m["bubble_flushed"] == pytest.approx(sd.pipeline_bubble(4, 8))
    # A slow link dominates the stage time.
    slow = throughput_model.model_module_parallel([1.0] * 4, [2e6] * 4, 2, 4, link_gbps=1.0, latency_us=0.0)
    assert slow["stage_ms"][0] == pytest.approx(2.0)
    # Data parallel: the reduction of block k overlaps block k+1; only the last one is exposed.
    d = throughput_model.model_data_parallel([1.0, 1.0], [1e6, 1e6], 2, link_gbps=1.0, latency_us=0.0)
    assert d["comm_ms"] == pytest.approx(2.0)  # 2 * (1/2) * 1 MB / 1 GB/s = 1 ms per block
    assert d["step_ms"] == pytest.approx(3.0)  # compute 2 ms, then the last reduction (1 ms)
    assert throughput_model.model_data_parallel([1.0, 1.0], [1e6, 1e6], 2, link_gbps=1.0, latency_us=0.0,
                                  overlap=False)["step_ms"] == pytest.approx(4.0)
    assert throughput_model.model_data_parallel([1.0], [1e6], 1, link_gbps=1.0)["step_ms"] == pytest.approx(1.0)


def test_not_launched_and_not_initialised(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not sd.launched_with_torchrun()
    assert sd.setup_from_env() is None
    net = make_net(K=2)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="not initialised"):
            sd.DataParallelLocalNet(net)
        with pytest.raises(RuntimeError, match="not initialised"):
            sd.PipelineStage(net)
    with pytest.raises(TypeError):
        sd.DataParallelLocalNet(nn.Linear(2, 2))
