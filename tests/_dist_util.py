"""Launch a test function on several gloo ranks on one CPU machine (shared by the distributed tests).

``launch(fn, world, tmp_path, **kwargs)`` runs ``fn(ctx, **kwargs)`` (``ctx`` from
``sgr_ext.distributed.setup_from_env``; with ``_setup=False``: ``fn(**kwargs)`` with only the
torchrun environment set) in ``world`` processes and returns each rank's pickled payload
and exit code. ``fn`` must be a module-level function of an importable (test) module.
Workers are forked from a forkserver that imported torch and sgr_ext once, so a launch
costs about a second, not an import per process; each runs with one intra-op thread.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback

import torch

TIMEOUT_S = 6.0  # default process-group timeout inside the workers

_PRELOAD = ["torch", "sgr_ext", "sgr_ext.distributed", "sgr_ext.data", "sgr_ext.trainer.loop", "sgr_ext.cli",
            "sklearn.datasets"]
_CTX = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mp_context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
        from multiprocessing import forkserver

        # Start it outside the checkout: from the repository root, '' on its sys.path would import
        # the source tree's sgr_ext, which lacks the installed package's sgr_ext.kernels/.csrc.
        cwd = os.getcwd()
        os.chdir(tempfile.gettempdir())
        try:
            forkserver.ensure_running()  # the imports happen here once, outside the tests' deadlines
        finally:
            os.chdir(cwd)
    return _CTX


def _entry(module, fn_name, rank, world, port, out_dir, kwargs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        fn = getattr(importlib.import_module(module), fn_name)
        if kwargs.pop("_setup", True):
            from sgr_ext import distributed as sd

            ctx = sd.setup_from_env(timeout_s=kwargs.pop("_timeout", TIMEOUT_S))
            result = fn(ctx, **kwargs)
        else:
            result = fn(**kwargs)
        payload = {"ok": True, "result": result}
    except BaseException as exc:  # reported to the parent test
        payload = {"ok": False, "type": type(exc).__name__, "error": str(exc), "tb": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no teardown: a broken process group must not hang the exit


def launch(fn, world, tmp_path, *, deadline_s=45.0, **kwargs):
    """Run ``fn`` on ``world`` gloo ranks (see the module docstring); returns (payloads, exit codes)."""
    ctx = _mp_context()
    port = free_port()
    out = tmp_path / f"{fn.__name__}-{port}"
    out.mkdir()
    procs = [ctx.Process(target=_entry, args=(fn.__module__, fn.__name__, r, world, port, str(out), dict(kwargs)))
             for r in range(world)]
    for p in procs:
        p.start()
    t_end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.1, t_end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {deadline_s} s: a hang"
    payloads = []
    for r in range(world):
        f = out / f"rank{r}.pkl"
        payloads.append(pickle.loads(f.read_bytes()) if f.exists() else None)
    return payloads, [p.exitcode for p in procs]


def check_all_ok(payloads):
    for r, p in enumerate(payloads):
        assert p is not None, f"rank {r} wrote no result"
        assert p["ok"], f"rank {r} failed: {p['type']}: {p['error']}\n{p['tb']}"
    return [p["result"] for p in payloads]
