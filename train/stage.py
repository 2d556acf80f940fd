"""The stage skeleton: the one training loop that every stage runs (NVlabs/edm's `training_loop`).

A stage builds its networks and optimiser into a `TrainState` and hands `run_stage` a `Stage`: that state, its
table and a step function `step(k, idx) -> metrics` (one optimiser step on this rank's items `idx` of step k).
`run_stage` owns the rest, the same for every stage:
  * resume: the checkpoint's entries loaded into the state's named parts and the optimiser, the step restored
    (train.loop explains why the next step then equals the uninterrupted one);
  * the data order (train.loop.batches) and the progress bar;
  * interval logging: the means of the step metrics since the last record, the learning rate and a throughput;
  * the checkpoint cadence (every `ckpt_every` steps and at the end) and the evaluation cadence (rank 0).
`distributed_job` joins the torchrun job (or runs alone), configures logging and always leaves the group.

Checkpoint format (ckpt/last.pt): {"step", "opt", "world"} and one entry per named part of the state
(e.g. "model" and "ema"; a part that is None is stored as None).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from .loop import (
    DistEnv,
    IntervalMeans,
    RunDir,
    apply_overrides,
    batches,
    build_table,
    configure_logging,
    init_distributed,
    lr_at,
    progress_bar,
    shutdown,
)
from .models.config import load_toml

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageConfig:
    """The keys every stage table has: what run_stage reads."""

    steps: int = 1000  # optimiser steps: the length of the run and of its lr schedule
    batch_size: int = 32  # global batch (clips or crops) over all processes
    seed: int = 0  # data order, per-step draws and initial weights
    log_every: int = 25  # steps per log.jsonl record
    ckpt_every: int = 250  # steps per checkpoint (and one at the end)


@dataclass(frozen=True)
class AdamWStageConfig(StageConfig):
    """A stage optimised by AdamW with linear warm-up, cosine decay (train.loop.lr_at) and gradient-norm clipping."""

    lr: float = 2e-4
    warmup: int = 200  # linear warm-up steps
    final_lr_ratio: float = 0.1  # cosine decay to this fraction of lr at `steps`
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm

    def lr_at(self, step: int) -> float:
        """The learning rate of (1-based) step `step`."""
        return lr_at(step, self.lr, self.warmup, self.steps, self.final_lr_ratio)

    def optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def optimizer_step(
        self, opt: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[nn.Parameter], k: int
    ) -> torch.Tensor:
        """Step k of the optimiser on `loss`: its lr, backward, clip the norm of `params`' gradient, update.

        Returns the gradient norm before clipping.
        """
        for g in opt.param_groups:
            g["lr"] = self.lr_at(k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        opt.step()
        return gnorm


C = TypeVar("C", bound=StageConfig)


def stage_table(config: str | Path, cls: type[C], section: str, **overrides: Any) -> C:
    """The [section] table of a config (name or TOML path) as `cls`, with the overrides that are not None."""
    return apply_overrides(build_table(cls, load_toml(config).get(section, {}), section), **overrides)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass
class TrainState:
    """What a stage trains and checkpoints: its named parts (a module, an EMA, or None) and their optimiser."""

    parts: dict[str, Stateful | None]
    opt: torch.optim.Optimizer

    def checkpoint(self, step: int, env: DistEnv) -> dict[str, Any]:
        parts = {name: p.state_dict() if p is not None else None for name, p in self.parts.items()}
        return {"step": step, **parts, "opt": self.opt.state_dict(), "world": env.world}

    def resume(self, ckpt: dict[str, Any], env: DistEnv) -> int:
        """Load a checkpoint written by `checkpoint`; returns its step."""
        for name, p in self.parts.items():
            if p is not None:
                p.load_state_dict(ckpt[name])  # (copies onto the module's device)
        self.opt.load_state_dict(ckpt["opt"])
        if ckpt.get("world") != env.world:
            logger.warning(
                "resuming a %s-process run with %d processes: the data order changes", ckpt.get("world"), env.world
            )
        return int(ckpt["step"])


StepFn = Callable[[int, np.ndarray], dict[str, Any]]


@dataclass
class Stage:
    """What a stage hands run_stage.

    Attributes:
        name: the stage's name on the progress bar and in errors.
        cfg: its table (the StageConfig keys: length, batch, seed, cadences).
        state: what it trains and checkpoints.
        step: one optimiser step `step(k, idx)` on this rank's items idx of step k; its metrics (floats or 0-d
            tensors, "loss" among them) are averaged per log interval.
        throughput: (log key, that unit per item of the global batch): ("audio_s_per_s", crop seconds).
        evaluate: called on rank 0 after the checkpoint of every `evaluate_every`-th step (and of the last step
            with `evaluate_at_end`); it may log to the run directory.
    """

    name: str
    cfg: StageConfig
    state: TrainState
    step: StepFn
    throughput: tuple[str, float] = ("clips_per_s", 1.0)
    evaluate: Callable[[int], None] | None = None
    evaluate_every: int = 0
    evaluate_at_end: bool = False


@contextmanager
def distributed_job(threads: int | None) -> Iterator[DistEnv]:
    """This process's place in the job (train.loop.init_distributed), logging configured; the process group is
    left however the stage ends."""
    env = init_distributed(threads)
    configure_logging(env)
    try:
        yield env
    finally:
        shutdown(env)


def run_stage(
    env: DistEnv, rd: RunDir, stage: Stage, ckpt: dict[str, Any] | None, items: np.ndarray, end_step: int
) -> None:
    """Train a stage from the checkpoint `ckpt` (None: from its state as built) to step `end_step`.

    `items`: the training items (dataset indices) that train.loop.batches orders.
    """
    cfg, state = stage.cfg, stage.state
    k0 = state.resume(ckpt, env) if ckpt is not None else 0
    key, per_item = stage.throughput
    bar = progress_bar(end_step, k0, env, stage.name)
    means = IntervalMeans(k0)
    for k, idx in batches(items, cfg.batch_size, env, cfg.seed, k0, end_step):
        metrics = stage.step(k, idx)
        loss = metrics["loss"]
        if not math.isfinite(float(loss.detach() if isinstance(loss, torch.Tensor) else loss)):
            raise FloatingPointError(f"non-finite {stage.name} loss at step {k}")
        means.add(metrics)
        bar.update(1)
        if k % cfg.log_every == 0 or k == end_step:
            rec = means.record(k, env)
            rec.update(lr=state.opt.param_groups[0]["lr"])
            rec[key] = rec["steps_per_s"] * cfg.batch_size * per_item
            rd.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if k % cfg.ckpt_every == 0 or k == end_step:
            rd.save_checkpoint(state.checkpoint(k, env))
        every, at_end = stage.evaluate_every, stage.evaluate_at_end
        due = (every > 0 and k % every == 0) or (at_end and k == end_step)
        if stage.evaluate is not None and env.is_main and due:
            stage.evaluate(k)
    bar.close()
