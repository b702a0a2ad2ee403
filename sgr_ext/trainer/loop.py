"""The real-data training loop behind ``sgr-ext train``: global BP, plain local learning, SGR.

``train(TrainConfig(...))`` runs one configuration end to end and returns the results
dict also written to ``<out>/results.json``. With ``dataset=`` a preloaded (device)
``TensorDataset`` is reused, which the study runner does to train many configurations
in one process.

Under ``torchrun`` (``sgr_ext.distributed.setup_from_env``) the run is data parallel
(``DataParallelLocalNet``; DDP for global BP) or module parallel (``PipelineStage``): every
rank builds the same model from the same seed and reads the same global batches in the
same order with the same augmentation (the generators are seeded from ``cfg.seed`` and
the epoch only); only the logging rank (``runner.is_logging_rank``) writes files, prints
or shows a progress bar. Evaluation is sharded over the ranks (counts all-reduced).

This module is the run loop (``train``, ``_Run``); the configuration is in ``config``, device,
seeds and optimizer in ``runtime``, evaluation in ``evaluation``, ``--resume`` checks in
``resume``, checkpoint files in ``checkpoint``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sgr_ext import distributed as sgr_dist
from sgr_ext.data import TensorDataset
from sgr_ext.memory import PeakMemory
from sgr_ext.net import LocalNet, NonFiniteError
from sgr_ext.split import model_units, split
from sgr_ext.trainer import archs, checkpoint, metrics
from sgr_ext.trainer.augment import random_crop_flip
from sgr_ext.trainer.data import load_dataset, match_channels, subset
from sgr_ext.trainer.config import CHECKPOINT_NAME, TrainConfig, TrainingDiverged
from sgr_ext.trainer.evaluation import _accuracies, _eval_correct, _mean, _per_block_mean, _without_blocks, evaluate
from sgr_ext.trainer.resume import _check_resume_compatible, _resume_path
from sgr_ext.trainer.runtime import (_batches, _make_optimizer, _make_scheduler, derived_seed, deterministic_mode,
                                     resolve_device, seed_everything)


def train(cfg: TrainConfig, dataset: Optional[TensorDataset] = None) -> dict:
    """Train one configuration; returns the results dict (also ``<out>/results.json``).

    Raises ValueError/TypeError/FileNotFoundError for bad settings or inputs (before any
    training), ``checkpoint.CheckpointError`` for a damaged checkpoint, ``TrainingDiverged``
    when a loss becomes NaN/Inf, ``sgr_ext.distributed.PeerError`` when another rank of a
    ``torchrun`` job died or hangs (after ``cfg.dist_timeout`` seconds).

    Under ``torchrun`` (RANK/WORLD_SIZE set) this joins the process group (and leaves it at
    the end unless it was already initialised); call it on every rank with the same config.
    """
    cfg.validate()
    if cfg.parallel in sgr_dist.PARALLEL_MODES and not sgr_dist.launched_with_torchrun():
        raise ValueError(f"--parallel {cfg.parallel}: needs a torchrun launch, e.g. torchrun --nproc_per_node 2 "
                         f"-m sgr_ext.cli train --parallel {cfg.parallel} ...")
    device = resolve_device(cfg.device)  # checks --device also under torchrun
    resume_path = _resume_path(cfg)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx = sgr_dist.setup_from_env(timeout_s=cfg.dist_timeout, device=cfg.device)
    try:
        if ctx is not None:
            device = ctx.device
        saved = checkpoint.load(resume_path) if resume_path is not None else None
        with deterministic_mode(cfg.deterministic):
            return _Run(cfg, device, dataset, saved, resume_path, ctx).run()
    finally:
        if ctx is not None and owns_group:
            ctx.shutdown()


def _resolve_parallel(cfg: TrainConfig, ctx) -> str:
    if ctx is None:
        return "none"
    if cfg.parallel == "auto":
        return "data" if ctx.world_size > 1 else "none"
    return cfg.parallel


class _Run:
    def __init__(self, cfg: TrainConfig, device: torch.device, dataset: Optional[TensorDataset], saved, resume_path,
                 ctx=None):
        self.cfg = cfg
        self.device = device
        self.ctx = ctx
        self.parallel = _resolve_parallel(cfg, ctx)
        self.rank = ctx.rank if ctx is not None else 0
        self.world = ctx.world_size if ctx is not None else 1
        self.out = Path(cfg.out) if cfg.out else None
        self.saved = saved
        self.resume_path = resume_path
        self.use_amp = bool(cfg.amp) and device.type == "cuda"
        if cfg.amp and device.type != "cuda":
            warnings.warn("--amp: bf16 autocast is only used on CUDA; training in float32 on CPU", stacklevel=3)

        # ---- data
        data = dataset if dataset is not None else load_dataset(cfg.data)
        data = subset(data, cfg.train_subset, cfg.test_subset)
        spec = archs.ARCHS[cfg.arch]
        data = match_channels(data, spec.channels)
        self.data = data.to(device) if data.x_train.device != device else data
        if len(self.data.x_train) < 2:
            raise ValueError(f"--train-subset: expected at least 2 training images, got {len(self.data.x_train)}")
        h, w = self.data.x_train.shape[-2:]
        self.image_size = archs.image_size_for(cfg.arch, max(h, w), cfg.image_size)
        self.resize = (h, w) != (self.image_size, self.image_size)
        aug = cfg.augment
        if aug == "auto":  # crop+flip for natural images (CIFAR); none for 8x8 digits, where flips change the class
            aug = "crop-flip" if min(h, w) >= 16 and self.data.x_train.shape[1] == 3 else "none"
        self.augment = aug
        self.data_fp = {"name": self.data.name, "train": len(self.data.x_train), "test": len(self.data.x_test),
                        "shape": list(self.data.x_train.shape[1:]), "classes": self.data.num_classes}

        # ---- model
        seed_everything(cfg.seed)
        # Local engines may differentiate attention twice or in forward mode, which fused SDPA
        # kernels cannot; global BP keeps them.
        self.model = archs.build(cfg.arch, self.data.num_classes, self.image_size, plain_attention=cfg.method != "bp")
        self.model.to(device)
        self.net: Optional[LocalNet] = None
        if cfg.method != "bp":
            n_units = len(model_units(self.model)[0])
            if cfg.modules > n_units:
                raise ValueError(f"--modules: {cfg.arch} has {n_units} splittable units, so K must be at most "
                                 f"{n_units}, got {cfg.modules}")
            example = torch.zeros(2, self.data.x_train.shape[1], self.image_size, self.image_size, device=device)
            blocks = split(self.model, cfg.modules, example_input=example)
            self.net = LocalNet(blocks, **cfg.localnet_kwargs())
            self.net.to(device)
        self.trained: nn.Module = self.net if self.net is not None else self.model
        self.trained.train()

        # ---- distributed: the runner steps (LocalNet, DataParallelLocalNet or PipelineStage);
        # global BP under data parallel runs the model through DDP on this rank's shard.
        self.runner = self.net
        self.ddp: Optional[nn.Module] = None
        min_last = 2
        if self.parallel == "data":
            if cfg.batch_size < self.world:
                raise ValueError(f"--batch-size: a global batch of {cfg.batch_size} cannot be sharded over "
                                 f"{self.world} ranks")
            min_last = 2 * self.world
            if self.net is not None:
                self.runner = ctx.wrap(self.net, "data")
            else:
                from torch.nn.parallel import DistributedDataParallel

                self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        elif self.parallel == "module":
            self._check_placement(len(self.net.blocks))
            min_last = 2 * cfg.micro_batches
            self.runner = ctx.wrap(self.net, "module", micro_batches=cfg.micro_batches, placement=cfg.placement)
        # Only this rank writes files, prints and shows progress (rank 0; the last stage for module parallel).
        if self.parallel == "none":
            self.is_logger = self.rank == 0
            if self.world > 1 and self.is_logger:
                warnings.warn(f"--parallel none under torchrun: each of the {self.world} ranks trains the same model "
                              "on its own (rank 0 writes the results)", stacklevel=3)
        else:
            self.is_logger = bool(getattr(self.runner, "is_logging_rank", self.rank == 0))
        self.batches = _batches(len(self.data.x_train), cfg.batch_size, min_last)
        self.total_steps = cfg.epochs * len(self.batches)
        # Module parallel: each stage's optimizer steps its own blocks only.
        self.opt = _make_optimizer(cfg, self.runner.parameters() if self.runner is not None else self.trained.parameters())
        self.sched = _make_scheduler(cfg, self.opt, self.total_steps)
        self.history: list[dict] = []
        self.steps: list[dict] = []
        self.start_epoch = 0
        self.wall_before = 0.0
        if saved is not None:
            self._restore(saved)

    # ------------------------------------------------------------------ pieces
    def _check_placement(self, n_blocks: int) -> None:
        placement = self.cfg.placement
        if placement is None:
            if n_blocks < self.world:
                raise ValueError(f"--parallel module: {n_blocks} modules cannot fill {self.world} ranks "
                                 "(one module at least per rank; raise --modules)")
        elif len(placement) != self.world or sum(placement) != n_blocks:
            raise ValueError(f"--placement: expected {self.world} counts (one per rank) summing to --modules "
                             f"{n_blocks}, got {','.join(map(str, placement))}")

    def _collective(self, op, what: str, *args, **kwargs) -> None:
        """A torch.distributed collective; a broken or timed-out one becomes PeerError."""
        try:
            op(*args, **kwargs)
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise sgr_dist.PeerError(f"rank {self.rank}: {what} failed or timed out; another rank has probably died "
                                     f"or hangs (see its log): {first}") from exc

    def _sync_for_eval(self) -> None:
        """Collective (every rank): make every rank's model the trained one before evaluation/checkpoint."""
        if self.runner is not None and self.runner is not self.net:
            self.runner.sync_for_eval()
        elif self.ddp is not None:  # DDP's buffers (BatchNorm statistics) are rank 0's
            for b in self.model.buffers():
                self._collective(torch.distributed.broadcast, "buffer broadcast", b, src=0)

    def _evaluate(self) -> tuple[float, list[float]]:
        """Test accuracy; under torchrun each rank evaluates its slice of the test set and the counts are summed."""
        x, y = self.data.x_test, self.data.y_test
        kw = dict(batch_size=self.cfg.eval_batch_size, prepare=self.prepare, autocast=self.autocast)
        if self.parallel == "none":
            return evaluate(self.model, self.net, x, y, **kw)
        xs, ys = x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]
        correct = _eval_correct(self.model, self.net, xs, ys, **kw)
        self._collective(torch.distributed.all_reduce, "evaluation all-reduce", correct)
        return _accuracies(correct, len(x), self.net is not None)

    def autocast(self):
        if self.use_amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x

    def _restore(self, saved: dict) -> None:
        placement = list(self.runner.placement) if self.parallel == "module" else None
        _check_resume_compatible(self.cfg, saved, self.resume_path, self.data_fp, self.parallel, placement)
        stage = saved["stages"][self.rank] if self.parallel == "module" else saved
        try:
            self.trained.load_state_dict(saved["model"])
            self.opt.load_state_dict(stage["optimizer"])
            self.sched.load_state_dict(saved["scheduler"])
        except (KeyError, RuntimeError) as exc:
            first = str(exc).splitlines()[0]
            raise checkpoint.CheckpointError(f"checkpoint {self.resume_path}: does not fit this model ({first})") from None
        self.history = list(saved.get("history", []))
        self.steps = list(saved.get("steps", []))
        self.start_epoch = int(saved["epoch"])
        self.wall_before = float(saved.get("wall_time_s", 0.0))
        checkpoint.set_rng_state(stage["rng"])

    def _lam_at(self, step: int) -> float:
        lam = self.cfg.lam_value
        if self.cfg.lam_warmup > 0 and lam > 0:
            ramp = self.cfg.lam_warmup * len(self.batches)
            lam *= min(1.0, (step + 1) / ramp)
        return lam

    def _set_net_config(self, step: int) -> None:
        net = self.net
        if net is None:
            return
        want_track = self.cfg.method == "local" and step % self.cfg.diag_every == 0
        lam = self._lam_at(step)
        if net.config.lam != lam or net.config.track_alignment != want_track:
            net.config = dataclasses.replace(net.config, lam=lam, track_alignment=want_track)

    def _stage_states(self) -> Optional[list]:
        """Module parallel: every stage's optimizer and RNG state, gathered from all ranks
        (a collective); None otherwise (one optimizer state covers every parameter)."""
        if self.parallel != "module":
            return None
        mine = {"optimizer": self.opt.state_dict(), "rng": checkpoint.rng_state()}
        stages: list = [None] * self.world
        self._collective(torch.distributed.all_gather_object, "checkpoint gather of the stages' optimizer states",
                         stages, mine, group=self.runner.group)
        return stages

    def _save_checkpoint(self, epoch: int, wall: float, stages: Optional[list]) -> None:
        state = {
            "format": 1,
            "parallel": self.parallel,
            "world_size": self.world,
            # module parallel: per stage (rank), its optimizer and RNG state; "optimizer"/"rng"
            # below are the logging stage's
            "stages": stages,
            "placement": list(self.runner.placement) if self.parallel == "module" else None,
            "config": {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "extra"},
            "dataset": self.data_fp,
            "lam_value": self.cfg.lam_value,
            "epoch": epoch,
            "model": self.trained.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": checkpoint.rng_state(),
            "history": self.history,
            "steps": self.steps,
            "wall_time_s": wall,
        }
        checkpoint.save(self.out / CHECKPOINT_NAME, state)

    # ------------------------------------------------------------------ epoch
    def _step(self, x, y, step: int, epoch: int, i: int, bp_loss: torch.Tensor, bp_correct: torch.Tensor):
        """One training step's gradient work (no optimizer step): the StepStats of a LocalNet,
        or None under global BP (whose loss and correct count accumulate into ``bp_loss``/``bp_correct``)."""
        if self.net is None:
            xs, ys = x, y
            if self.ddp is not None:
                xs, ys = sgr_dist.shard_batch(x, y, self.rank, self.world)
            with self.autocast():
                logits = (self.ddp if self.ddp is not None else self.model)(xs)
                loss = F.cross_entropy(logits, ys)
            if self.ddp is not None:
                # DDP averages the ranks' gradients; weighting each by its shard's share of the
                # batch makes that average the full-batch gradient also for uneven shards.
                (loss * (len(ys) * self.world / len(y))).backward()
            else:
                loss.backward()
            with torch.no_grad():
                bp_loss += loss.detach().double() * len(ys)
                bp_correct += (logits.argmax(1) == ys).sum()
            return None
        self._set_net_config(step)
        try:
            with self.autocast():
                # every rank passes the same global batch (the runner shards or pipelines it)
                return self.runner.train_step(x, y)
        except NonFiniteError as exc:
            raise TrainingDiverged(f"epoch {epoch + 1}, step {i + 1}: {exc}") from None

    def _train_epoch(self, epoch: int, bar) -> dict:
        cfg, dev = self.cfg, self.device
        n = len(self.data.x_train)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(cfg.seed, "order", epoch)))
        order = order.to(dev)
        aug_gen = torch.Generator(device=dev).manual_seed(derived_seed(cfg.seed, "augment", epoch))
        if self.parallel == "data" and self.rank > 0:
            # The global RNG draws the forward-gradient tangents (and dropout masks) of this rank's
            # shard: independent across ranks; rank 0 keeps the stream that checkpoints save.
            torch.manual_seed(derived_seed(cfg.seed, "rank", self.rank, epoch))
        n_blocks = len(self.net.blocks) if self.net is not None else 0
        losses, penalties, accs, cosines, ratios = [], [], [], [], []
        nonfinite_steps = skipped_steps = 0  # --nonfinite skip/warn
        bp_loss = torch.zeros((), device=dev, dtype=torch.float64)
        bp_correct = torch.zeros((), device=dev, dtype=torch.long)
        peak = PeakMemory(dev)  # per step, DESIGN.md §5; on CPU the bytes saved for backward
        t0 = time.perf_counter()
        for i, (lo, hi) in enumerate(self.batches):
            step = epoch * len(self.batches) + i
            idx = order[lo:hi]
            x, y = self.data.x_train[idx], self.data.y_train[idx]
            if self.augment == "crop-flip":
                x = random_crop_flip(x, padding=4, flip=True, generator=aug_gen)
            elif self.augment == "flip":
                x = random_crop_flip(x, padding=0, flip=True, generator=aug_gen)
            x = self.prepare(x)
            self.opt.zero_grad(set_to_none=True)
            with peak:
                st = self._step(x, y, step, epoch, i, bp_loss, bp_correct)
            if st is not None and st.nonfinite_blocks:
                nonfinite_steps += 1
                st = _without_blocks(st, range(n_blocks) if st.skipped else st.nonfinite_blocks)
            if st is not None and st.skipped:
                skipped_steps += 1  # no gradient was kept: no optimizer step, no statistics
            elif self.net is not None:
                losses.append(st.losses)
                penalties.append(st.penalties)
                accs.append(st.accuracies)
                cosines.append(st.cosines)
                ratios.append(st.norm_ratios)
                if step % cfg.log_every == 0:
                    self.steps.append({
                        "step": step, "epoch": epoch + 1, "lr": self.sched.get_last_lr()[0],
                        "lam": self.net.config.lam, "loss": st.losses[-1], "block_train_loss": st.losses,
                        "block_penalty": st.penalties, "cosine": st.cosines, "norm_ratio": st.norm_ratios,
                        "penalty_share": st.penalty_shares,
                    })
            if st is None or not st.skipped:
                self.opt.step()
            self.sched.step()
            if bar is not None:
                bar.update(1)
                if self.net is not None and i % 5 == 0 and st.losses[-1] is not None:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{st.losses[-1]:.3f}", refresh=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        train_time = time.perf_counter() - t0
        rec: dict = {"epoch": epoch + 1, "lr": self.sched.get_last_lr()[0], "lam": self._lam_at(step)}
        if self.net is None:
            if self.ddp is not None:  # this rank's shards only so far
                totals = torch.stack([bp_loss, bp_correct.double()])
                self._collective(torch.distributed.all_reduce, "statistics all-reduce", totals)
                bp_loss, bp_correct = totals[0], totals[1]
            rec["train_loss"] = float(bp_loss) / n
            rec["train_acc"] = float(bp_correct) / n
            if not math.isfinite(rec["train_loss"]):
                raise TrainingDiverged(f"epoch {epoch + 1}: non-finite training loss under global BP")
            rec.update(block_train_loss=[], block_penalty=[], block_train_acc=[], cosine=[], norm_ratio=[])
        else:
            block_loss = _per_block_mean(losses, n_blocks)
            block_acc = _per_block_mean(accs, n_blocks)
            rec["train_loss"] = block_loss[-1]
            rec["train_acc"] = block_acc[-1]
            rec["block_train_loss"] = block_loss
            rec["block_penalty"] = _per_block_mean(penalties, n_blocks)
            rec["block_train_acc"] = block_acc
            rec["cosine"] = _per_block_mean(cosines, n_blocks)
            rec["norm_ratio"] = _per_block_mean(ratios, n_blocks)
        rec["nonfinite_steps"] = nonfinite_steps
        rec["skipped_steps"] = skipped_steps
        rec["step_time_ms"] = 1000.0 * train_time / len(self.batches)
        rec["train_time_s"] = train_time
        rec["samples_per_s"] = n / train_time if train_time > 0 else None
        rec["peak_mem_mib"] = peak.peak_mb
        rec["memory_metric"] = peak.metric
        return rec

    # ------------------------------------------------------------------ main
    def run(self) -> dict:
        cfg = self.cfg
        writes = self.out is not None and self.is_logger
        if writes:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file in the way, no permission, ...
                raise ValueError(f"--out {self.out}: cannot create the run directory ({exc.strerror or exc})") from None
            if self.saved is None and cfg.checkpoint and (self.out / CHECKPOINT_NAME).exists():
                print(f"sgr-ext train: note: {self.out / CHECKPOINT_NAME} from an earlier run will be overwritten "
                      "(pass --resume to continue it)", file=sys.stderr)
        bar = None
        if cfg.progress and self.is_logger:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.start_epoch * len(self.batches), unit="step",
                       desc=self.cfg.run_name(), dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        wall = self.wall_before
        stopped_early = False
        try:
            done_now = 0
            for epoch in range(self.start_epoch, cfg.epochs):
                t0 = time.perf_counter()
                rec = self._train_epoch(epoch, bar)
                self._sync_for_eval()  # collective: every rank
                acc, block_acc = self._evaluate()
                rec["test_acc"] = acc
                rec["block_test_acc"] = block_acc
                self.history.append(rec)
                wall += time.perf_counter() - t0
                if bar is not None:
                    loss = rec["train_loss"]  # None when no step of the epoch was finite
                    bar.set_postfix(epoch=epoch + 1, loss="n/a" if loss is None else f"{loss:.3f}", test_acc=f"{acc:.4f}")
                if writes:
                    metrics.write_run_files(self.out, self.history, self.steps)
                if cfg.checkpoint and self.out is not None:
                    stages = self._stage_states()  # collective under module parallel
                    if writes:
                        self._save_checkpoint(epoch + 1, wall, stages)
                done_now += 1
                if cfg.stop_after is not None and done_now >= cfg.stop_after and epoch + 1 < cfg.epochs:
                    stopped_early = True
                    break
        finally:
            if bar is not None:
                bar.close()
        results = self.results(wall, complete=not stopped_early)
        if writes:
            metrics.write_json(self.out / "results.json", results)
            if cfg.plots:
                title = self.cfg.run_name()
                metrics.plot_learning_curves(self.history, self.out / "learning_curves.png", title)
                metrics.plot_diagnostics(self.history, self.steps, self.out / "diagnostics.png", title)
        return results

    def _dist_info(self) -> dict:
        info = {"parallel": self.parallel, "world_size": self.world, "rank": self.rank, "logging_rank": self.is_logger}
        if self.parallel == "module":
            info.update(micro_batches=self.cfg.micro_batches, placement=list(self.runner.placement))
        return info

    def results(self, wall: float, complete: bool) -> dict:
        h = self.history
        last = h[-1] if h else {}
        trained_params = sum(p.numel() for p in self.trained.parameters())
        model_params = sum(p.numel() for p in self.model.parameters())
        steps = [r["step_time_ms"] for r in h]
        peaks = [r["peak_mem_mib"] for r in h if r.get("peak_mem_mib") is not None]
        return {
            "name": self.cfg.run_name(),
            "complete": complete,
            "epochs_done": len(h),
            "resumed_at_epoch": self.start_epoch if self.saved is not None else None,
            "config": dataclasses.asdict(self.cfg),
            "lam": self.cfg.lam_value,
            "dataset": self.data_fp,
            "image_size": self.image_size,
            "augment": self.augment,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "final_test_acc": last.get("test_acc"),
            "best_test_acc": max((r["test_acc"] for r in h), default=None),
            "final_train_loss": last.get("train_loss"),
            "final_block_test_acc": last.get("block_test_acc", []),
            "final_cosine": last.get("cosine", []),
            "final_norm_ratio": last.get("norm_ratio", []),
            "mean_cosine": _mean(last.get("cosine", [])[1:]) if last.get("cosine") else None,
            "median_step_time_ms": float(np.median(steps)) if steps else None,
            "peak_mem_mib": max(peaks) if peaks else None,
            "memory_metric": last.get("memory_metric"),
            "params_model": model_params,
            "params_trained": trained_params,
            "blocks": len(self.net.blocks) if self.net is not None else 1,
            "distributed": self._dist_info(),
            "wall_time_s": wall,
            "history": h,
        }
