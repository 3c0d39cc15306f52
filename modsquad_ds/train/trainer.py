"""The training loop: one DeepSpeed engine, every rank running every task every step.

Per micro step: the task-batched forward (all tasks of the rank's images in one pass), the per-task
losses, and the MI loss of every MoE layer computed on task x expert tables summed over all ranks
(an autograd-aware all-reduce, so the loss and its gradients are those of one process seeing the
whole global batch). DeepSpeed averages gradients, accumulates micro steps and clips.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from modsquad_ds.config.loader import save_config
from modsquad_ds.config.schema import RunConfig
from modsquad_ds.data.loader import build_train_loader
from modsquad_ds.distributed.bootstrap import engine_args
from modsquad_ds.distributed.collectives import all_reduce_sum_autograd, any_rank, is_distributed, step_vote
from modsquad_ds.distributed.ds_config import save_ds_config
from modsquad_ds.distributed.launcher_watch import LauncherWatch
from modsquad_ds.model.factory import build_model
from modsquad_ds.model.objective import MultiTaskObjective
from modsquad_ds.moe.ds_adapter import clip_grad_norm_, convert_to_expert_parallel, moe_param_groups
from modsquad_ds.train import checkpoint
from modsquad_ds.train.epochs import epoch_batches
from modsquad_ds.train.logger import EVAL_RECORD, RunLogger, read_record
from modsquad_ds.train.module import TrainModule
from modsquad_ds.train.schedule import lr_lambda
from modsquad_ds.train.signals import StopRequests
from modsquad_ds.train.skips import SkipTally
from modsquad_ds.train.start_over import set_aside_earlier_run
from modsquad_ds.train.usage import UsageAccumulator, plot_usage, write_usage


class NonFiniteLoss(RuntimeError):
    """Every rank raises it together (the finite check is a collective decision)."""


@dataclass
class RunResult:
    out_dir: Path
    position: checkpoint.TrainPosition
    last_scalars: dict = field(default_factory=dict)
    seconds_to_first_step: float = 0.0
    images_per_second: float = 0.0
    checkpoint: Path | None = None
    steps_run: int = 0
    """Optimizer steps taken by this invocation."""
    stopped_early: bool = False
    """Ended by train.stop_after or SIGTERM before train.steps; resume to continue."""
    stopped_by_signal: bool = False
    """Ended by SIGTERM (saved first): the process exits EXIT_STOPPED, not 0."""
    skipped: dict = field(default_factory=dict)
    """{shard: {reason: count}} of samples the loader skipped, all ranks, this invocation."""


def manual_clip_norm(cfg: RunConfig, ds_config: dict) -> float:
    """The clip norm the trainer must apply itself (0: DeepSpeed clips correctly).

    DeepSpeed 0.19.8 at ZeRO 0 clips with the average of per-rank norms that each miss the other
    ranks' experts, so with ep_size > 1 it clips to the wrong norm (ZeRO 1/2 are right); see
    moe.ds_adapter.clip_grad_norm_ and tests/distributed/test_ep_equivalence.py.
    """
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    clip = float(ds_config.get("gradient_clipping", 0.0))
    return clip if zero == 0 and cfg.train.ep_size > 1 and clip > 0 else 0.0


def build_engine(cfg: RunConfig, ds_config: dict, *, source_weights: bool = True):
    """The DeepSpeed engine of ``cfg``'s model and objective. ``source_weights=False``: a fine-tuning
    model without its source run's weights (same shapes, frozen the same way: the planner's memory
    measurement, which needs no source run)."""
    if manual_clip_norm(cfg, ds_config):
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if cfg.finetune.enabled and source_weights:  # new tasks on a trained run's weights (modsquad_ds/finetune)
        from modsquad_ds.finetune import build_finetune_model

        model = build_finetune_model(cfg)
    else:
        model = build_model(cfg)
    convert_to_expert_parallel(model, cfg.train.ep_size)
    if cfg.model.compile:
        model.compile_blocks()
    module = TrainModule(model, MultiTaskObjective(cfg), all_reduce_sum_autograd)
    if cfg.finetune.enabled:
        from modsquad_ds.finetune import freeze

        module.freeze_report = freeze(module, cfg.finetune.mode)  # before the optimizer sees the params
    optimizer = torch.optim.AdamW(moe_param_groups(module, cfg.train.weight_decay, module.no_weight_decay()),
                                  lr=cfg.train.lr)
    t = cfg.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.steps, t.warmup_steps, t.lr, t.min_lr))
    engine, _, _, _ = deepspeed.initialize(args=engine_args(), model=module, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    _undo_warmup_step(engine.optimizer)
    return engine


def _undo_warmup_step(optimizer) -> None:
    """bf16 without ZeRO (every bf16 router fine-tuning): DeepSpeed 0.19.8's FP16_UnfusedOptimizer
    creates the optimizer state by one step with zero gradients (``initialize_optimizer_states``).
    For AdamW that step counts (each later step's bias correction is one step late, the first
    update about 25% short) and applies weight decay to the fp32 masters once. Start as ZeRO 1/2
    do instead: no state (AdamW creates it at the first real step) and masters equal to the module
    weights, which that step left untouched."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return
    optimizer.optimizer.state.clear()
    optimizer.refresh_fp32_params()


class DataWait:
    """Seconds the host spent waiting for the loader's next batch. By then the model's work of the
    previous micro step is issued (on GPUs) or done (on CPUs), so time here is time the model idles."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, loader):
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - t0
            yield batch

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _mean_over_ranks(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    keys = sorted(sums)
    # reduced where the stats live: NCCL reduces CUDA tensors only
    values = torch.stack([sums[k].float() for k in keys]) / max(count, 1)
    if is_distributed():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: dict, rank: int, world_size: int, progress: bool = True):
        """``progress``: rank 0's progress, a bar or lines (train/logger.py; the study runs dozens of
        runs without it)."""
        self.cfg, self.ds_config = cfg, ds_config
        self.progress = progress
        self.rank, self.world_size = rank, world_size
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.usage = UsageAccumulator(cfg.tasks.names)
        self.position = checkpoint.TrainPosition()
        self.saved_step = -1
        self.skips = SkipTally()

    def _write_run_files(self) -> None:
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out_dir / "config.yaml")
            save_ds_config(self.ds_config, self.out_dir / "ds_config.json")

    def layout(self) -> dict:
        """Settings a resumed run must share with the run that saved (checkpoint.check_layout)."""
        return {**checkpoint.run_layout(self.cfg, self.world_size), **checkpoint.engine_format(self.ds_config)}

    def _save(self, engine) -> Path:
        # The client state lands in rank 0's model-states file only, so it carries the usage summed
        # over all ranks; on resume rank 0 takes those sums back and the other ranks start from zero.
        tables = self.usage.global_tables()
        path = checkpoint.save(engine, self.ckpt_dir, self.position, {"usage": tables},
                               self.cfg.train.keep_checkpoints, self.layout())
        self.saved_step = self.position.step
        if self.rank == 0:
            write_usage(self.out_dir / "usage.json", self.cfg.tasks.names, tables)
            plot_usage(self.out_dir / "usage.png", self.cfg.tasks.names, tables)
        return path

    def _validated(self, step: int) -> bool:
        """Whether ``step``'s validation is on record in the run folder (rank 0 reads; a collective)."""
        found = self.rank == 0 and any(row.get("step") == step for _, row in read_record(self.out_dir / EVAL_RECORD))
        return any_rank(found)

    def _validate(self, engine, logger: RunLogger) -> None:
        """train.eval_every: the evaluation command's metrics on a fixed validation subset (a collective)."""
        from modsquad_ds.eval.report import scalars
        from modsquad_ds.eval.runner import evaluate_model

        cfg = self.cfg
        # Validating leaves the training it watches unchanged: the RNG states it may draw from (router
        # noise under moe.eval_noise) come back as they were.
        device = next(engine.module.parameters()).device  # the model's, as evaluate_model takes it
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            result = evaluate_model(engine.module.model, cfg, cfg.data.val_split, self.rank, self.world_size,
                                    cfg.train.eval_samples)
        if logger.enabled:
            values = scalars(result)
            for key, value in values.items():
                logger.tb.add_scalar(key, value, self.position.step)
            with open(self.out_dir / EVAL_RECORD, "a") as f:
                f.write(json.dumps({"step": self.position.step, **values}) + "\n")

    def run(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        started = time.perf_counter()
        engine = build_engine(cfg, self.ds_config)
        notes: list[str] = []  # checkpoints skipped as damaged, logged once the logger exists
        if t.resume:
            restored = checkpoint.load_latest(engine, self.ckpt_dir, self.layout(), on_skip=notes.append)
            if restored is not None:
                self.position, extra = restored
                self.saved_step = self.position.step
                self.usage.load_state_dict(extra.get("usage", {}), zeroed=self.rank != 0)
        else:
            aside = set_aside_earlier_run(self.out_dir) if self.rank == 0 else None
            if aside is not None:
                notes.append(f"train.resume false: the earlier run's files in {self.out_dir} moved to {aside.name}/")
            if is_distributed():
                dist.barrier()  # no rank writes before the folder is clean
        # after the resume check: a refused resume must not overwrite the saved run's config
        self._write_run_files()
        logger = RunLogger(self.out_dir, t.steps, self.position.step, self.rank == 0, progress=self.progress)
        for note in notes:
            logger.message(note)
        if self.position.step:
            logger.message(f"resumed from {self.ckpt_dir / checkpoint.tag_for(self.position.step)}")
        if cfg.finetune.enabled:
            from modsquad_ds.finetune import zero_note

            logger.message(f"finetune.mode {cfg.finetune.mode} from {cfg.finetune.init_from}: "
                           f"{engine.module.freeze_report.describe()}")
            if zero_note(cfg):
                logger.message(zero_note(cfg))
        result = RunResult(self.out_dir, self.position)
        requests = StopRequests().install()
        # a launcher that ends without stopping its ranks (kill PID of the deepspeed command) stops them
        watch = LauncherWatch(on_gone=requests.request_stop).start()
        try:
            self._loop(engine, logger, result, started, requests)
        finally:
            watch.stop()
            requests.uninstall()
            logger.close()
        if self.saved_step != self.position.step:
            self._save(engine)
        result.skipped = self.skips.summary()
        result.checkpoint = self.ckpt_dir / checkpoint.tag_for(self.position.step)
        return result

    def _loop(self, engine, logger: RunLogger, result: RunResult, started: float,
              requests: StopRequests) -> None:
        cfg, t, pos = self.cfg, self.cfg.train, self.position
        stop_at = min(t.steps, pos.step + t.stop_after) if t.stop_after else t.steps
        clip_norm = manual_clip_norm(cfg, self.ds_config)
        images_per_micro = cfg.data.batch_size * self.world_size
        sums: dict[str, torch.Tensor] = {}
        micro_in_window, bad_steps = 0, 0
        window_start, window_images, data_wait = time.perf_counter(), 0, DataWait()
        cuda = torch.device(engine.device).type == "cuda"
        if pos.step >= stop_at:
            return
        if t.eval_every and pos.step and pos.step % t.eval_every == 0 and not self._validated(pos.step):
            # resumed from a checkpoint saved before its step's validation, which a stop skipped (or
            # a crash cut short): validate it now, so that the curve has every point
            logger.message(f"step {pos.step}: validating first (saved before its validation)")
            self._validate(engine, logger)
        batches = epoch_batches(lambda epoch, start: build_train_loader(cfg, self.rank, self.world_size, epoch, start),
                                pos.epoch, pos.batch_in_epoch)
        for loader, epoch, batch in data_wait.timed(batches):
            if epoch != pos.epoch:
                pos.epoch, pos.batch_in_epoch = epoch, 0
            pos.batch_in_epoch += 1
            self.skips.observe(loader)
            boundary = engine.is_gradient_accumulation_boundary()
            loss, stats, routing = engine(batch)
            # one collective per micro step decides for all ranks: is the loss finite everywhere,
            # and does any rank want to save (1) or save and stop (2); acted on at the boundary
            finite, wish = step_vote(loss, 2.0 if requests.stop else 1.0 if requests.save else 0.0)
            if not finite:
                bad_steps += 1
                logger.message(f"step {pos.step}: non-finite loss on some rank, micro step skipped "
                               f"({bad_steps}/{t.nonfinite_patience})")
                if bad_steps >= t.nonfinite_patience:
                    raise NonFiniteLoss(f"loss was NaN/inf on some rank for {bad_steps} consecutive micro "
                                        f"steps at step {pos.step}; stopping (lower train.lr or check the data)")
                continue
            bad_steps = 0
            engine.backward(loss)
            if boundary and clip_norm:
                clip_grad_norm_(engine.module, clip_norm)
            engine.step()
            self.usage.add(routing)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0) + value.detach()
            micro_in_window += 1
            window_images += images_per_micro
            if not boundary:
                continue
            pos.step += 1
            result.steps_run += 1
            if not result.seconds_to_first_step:
                result.seconds_to_first_step = time.perf_counter() - started
            save, stop = wish >= 1.0, wish >= 2.0
            last = stop or pos.step >= stop_at  # logged too, however short the run
            scalars = None
            if pos.step % t.log_every == 0 or last:
                scalars = _mean_over_ranks(sums, micro_in_window)
                scalars["data/skipped"] = self.skips.sync()
                note = self.skips.due_message(pos.step)
                if note:
                    logger.message(note)
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                scalars["perf/images_per_s"] = window_images / elapsed
                # share of the window rank 0 spent waiting for batches: the loader falls behind
                # the model when it grows (data.workers, make_shards --resize; docs/benchmarks.md)
                scalars["perf/data_wait_pct"] = 100.0 * data_wait.take() / elapsed
                if cuda:
                    scalars["perf/max_memory_gib"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
                scalars["lr"] = engine.get_lr()[0]
                result.last_scalars, result.images_per_second = scalars, scalars["perf/images_per_s"]
                window_start, window_images = time.perf_counter(), 0
                sums, micro_in_window = {}, 0  # logged values average the whole window
            logger.step(pos.step, scalars)
            if save or (t.checkpoint_every and pos.step % t.checkpoint_every == 0):
                requests.save = False
                path = self._save(engine)
                if save:
                    why = "SIGTERM or Ctrl-C: saved, stopping" if stop else "SIGUSR1: saved, going on"
                    logger.message(f"step {pos.step}: checkpoint {path} ({why})")
            # after the checkpoint, which a validation must not delay; not at all when stopping: a
            # scheduler's grace period is for saving (the order is free: validating leaves the RNG
            # streams as they were, see _validate)
            if t.eval_every and pos.step % t.eval_every == 0:
                if stop:
                    logger.message(f"step {pos.step}: validation skipped (stopping)")
                else:
                    self._validate(engine, logger)
            if last:
                result.stopped_early = pos.step < t.steps
                result.stopped_by_signal = stop
                return
