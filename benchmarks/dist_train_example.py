"""Data-parallel or module-parallel local learning (SGR) under torchrun, on CPU (gloo) or GPUs (nccl).

    torchrun --standalone --nproc_per_node 2 benchmarks/dist_train_example.py --parallel data
    torchrun --standalone --nproc_per_node 2 benchmarks/dist_train_example.py --parallel module --micro-batches 4
    python benchmarks/dist_train_example.py          # no torchrun: one process, the reference

Trains the small digits CNN (split into --modules local blocks, SGR with --lam) on the
1,797 real 8x8 digits that ship with scikit-learn, for --steps steps of --batch-size
(the GLOBAL batch: data parallel shards it over the ranks, module parallel cuts it into
micro-batches). Every rank reads the same batches (same seed); only the logging rank
(rank 0 for data parallel, the last stage for module parallel) prints. Ends with the
test accuracy and one JSON line. A rank that dies makes the others exit with a
``PeerError`` after at most --timeout seconds (torchrun also stops them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import sgr_ext
from sgr_ext.data import load_digits
from sgr_ext.distributed import PARALLEL_MODES, setup_from_env
from sgr_ext.models import DigitsCNN


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parallel", choices=PARALLEL_MODES, default="data", help="(under torchrun; default %(default)s)")
    p.add_argument("--micro-batches", type=int, default=4, help="module parallel: micro-batches per batch")
    p.add_argument("--placement", default=None, help="module parallel: blocks per rank, e.g. 2,1,1")
    p.add_argument("--modules", type=int, default=4, help="local blocks K (default %(default)s)")
    p.add_argument("--lam", type=float, default=0.1, help="SGR lambda (0: plain local learning)")
    p.add_argument("--mode", default="exact", help="LocalNet engine mode (default %(default)s)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when there is a GPU per rank, else cpu")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a missing rank is an error")
    p.add_argument("--log-every", type=int, default=20)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    ctx = setup_from_env(timeout_s=args.timeout, device=args.device)
    if ctx is not None:
        device = ctx.device
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return _train(args, ctx, device)
    finally:
        if ctx is not None:
            ctx.shutdown()


def _train(args, ctx, device) -> dict:
    data = load_digits()
    torch.manual_seed(args.seed)
    model = DigitsCNN(data.num_classes)
    blocks = sgr_ext.split(model, args.modules, example_input=torch.zeros(2, 1, 8, 8))
    net = sgr_ext.LocalNet(blocks, lam=args.lam, mode=args.mode).to(device)

    if ctx is None or ctx.world_size == 1:
        runner, parallel, logging = net, "none", True
    else:
        placement = [int(c) for c in args.placement.split(",")] if args.placement else None
        runner = ctx.wrap(net, args.parallel, micro_batches=args.micro_batches, placement=placement)
        parallel, logging = args.parallel, runner.is_logging_rank
    opt = torch.optim.SGD(runner.parameters(), lr=args.lr, momentum=0.9)

    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x_all), generator=gen)
    n_batches = len(x_all) // args.batch_size
    losses = []
    net.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        b = step % n_batches
        if b == 0 and step > 0:
            order = torch.randperm(len(x_all), generator=gen)
        idx = order[b * args.batch_size: (b + 1) * args.batch_size].to(device)
        x, y = x_all[idx], y_all[idx]
        opt.zero_grad(set_to_none=True)
        stats = runner.train_step(x, y)
        opt.step()
        if logging:
            losses.append(stats.losses[-1])
            if step % args.log_every == 0 or step == args.steps - 1:
                print(f"[{parallel}] step {step:4d}  loss {stats.losses[-1]:.4f}  "
                      f"penalties {[None if p is None else round(p, 4) for p in stats.penalties]}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0

    if runner is not net:
        runner.sync_for_eval()  # collective: every rank
    result = {"parallel": parallel, "world_size": ctx.world_size if ctx else 1, "steps": args.steps,
              "batch_size": args.batch_size, "samples_per_s": args.steps * args.batch_size / elapsed,
              "device": str(device)}
    if logging:
        net.eval()
        with torch.no_grad():
            pred = net(data.x_test.to(device)).argmax(1).cpu()
        result["test_acc"] = float((pred == data.y_test).float().mean())
        result["final_loss"] = losses[-1]
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
