"""What every training stage shares: distributed setup, data order, per-step randomness, EMA, run directory.

One code path from one CPU process to `torchrun --nproc_per_node K` (gloo on CPU, nccl on GPU):
  * Data order: each epoch is a DistributedSampler permutation (seed, epoch); rank r takes its shard in
    chunks of the per-rank batch. With world size W, step k's global batch is the union of the W shards,
    which is exactly the single-process batch k of global size W·b: a 1-process and a W-process run see
    the same examples in the same steps.
  * Randomness: every random draw of step k comes from a generator seeded by (seed, k) only and is made for
    the whole global batch; each rank takes the rows at its positions (`shard`). There is no hidden RNG state,
    so resuming at step k draws what the uninterrupted run drew, and W processes draw what 1 process does.
  * Checkpoints (rank 0, atomic): model, EMA, optimiser, step. Resume restores them and recomputes the data
    order, so the next step equals the uninterrupted one (bitwise on the same machine and thread count).
  * Run directory: config.json (the resolved config), log.jsonl (one JSON object per logged step),
    ckpt/last.pt, samples/, final/.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def build_table(cls: type, table: dict[str, Any], section: str) -> Any:
    """A frozen dataclass from a TOML table, rejecting unknown keys; lists become tuples."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"[{section}] has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})


def apply_overrides(cfg: Any, **overrides: Any) -> Any:
    """dataclasses.replace with the overrides that are not None."""
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (from torchrun's environment variables; 1 process without them)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(threads: int | None = None) -> DistEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK and join the process group (nccl with CUDA, else gloo)."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistEnv(rank, world, local_rank, device)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    """DistributedDataParallel around a loss module when the job has several processes."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.local_rank] if env.device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=ids)


def mean_across(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average scalar metrics over ranks (for logging only)."""
    if not env.distributed:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return {k: float(v) / env.world for k, v in zip(keys, t.tolist(), strict=True)}


# ------------------------------------------------------------------------------------- order and randomness


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator of one step's random draws: a function of (seed, step, stream) only."""
    state = np.random.SeedSequence([seed, step, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def shard(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Rows of a global-batch tensor that belong to this rank (positions rank, rank + W, ...)."""
    return x[env.rank :: env.world]


def steps_per_epoch(n_items: int, global_batch: int) -> int:
    n = n_items // global_batch
    if n < 1:
        raise ValueError(f"{n_items} training items are fewer than one global batch of {global_batch}")
    return n


def local_batch_size(global_batch: int, env: DistEnv) -> int:
    if global_batch % env.world:
        raise ValueError(f"batch_size {global_batch} is not divisible by the world size {env.world}")
    return global_batch // env.world


def batches(
    items: np.ndarray, global_batch: int, env: DistEnv, seed: int, start_step: int, end_step: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(step, this rank's item indices) for steps start_step+1 .. end_step (steps are 1-based).

    Epoch e's order is DistributedSampler(seed, drop_last) at set_epoch(e); step k is batch (k-1) mod S of
    epoch (k-1) div S, S = steps per epoch. Resuming at any step recomputes the same order.
    """
    from torch.utils.data import Dataset, DistributedSampler

    b = local_batch_size(global_batch, env)
    spe = steps_per_epoch(len(items), global_batch)
    positions = cast("Dataset[int]", range(len(items)))  # the sampler reads only its length
    sampler: DistributedSampler[int] = DistributedSampler(
        positions, num_replicas=env.world, rank=env.rank, shuffle=True, seed=seed, drop_last=True
    )
    epoch, order = -1, np.empty(0, dtype=np.int64)
    for step in range(start_step + 1, end_step + 1):
        e, k = divmod(step - 1, spe)
        if e != epoch:
            sampler.set_epoch(e)
            order, epoch = np.fromiter(iter(sampler), dtype=np.int64), e
        yield step, items[order[k * b : (k + 1) * b]]


def lr_at(step: int, base: float, warmup: int, total: int, final_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to final_ratio·base at `total` (pure in step)."""
    if warmup > 0 and step <= warmup:
        return base * step / warmup
    if total <= warmup:
        return base
    p = min(1.0, (step - warmup) / (total - warmup))
    return base * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


# ------------------------------------------------------------------------------------------------------ EMA


M = TypeVar("M", bound=nn.Module)


class EMA(Generic[M]):
    """Exponential moving average of a module's parameters (buffers copied): θ⁻ ← μ·θ⁻ + (1 − μ)·θ."""

    def __init__(self, model: M, decay: float) -> None:
        self.decay = decay
        self.model: M = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - self.decay)
        for eb, b in zip(self.model.buffers(), model.buffers(), strict=True):
            eb.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(sd)


# ------------------------------------------------------------------------------------------- run directory


class IntervalMeans:
    """The quantities a stage logs, summed per step since the last log record.

    `record(step, env)` turns the sums into means (averaged across ranks), adds `step` and the interval's
    `steps_per_s`, and starts the next interval.
    """

    def __init__(self, step: int) -> None:
        self._sums: dict[str, float] = {}
        self._step = step
        self._t = time.time()

    def add(self, values: dict[str, Any]) -> None:
        """Add one step's values (floats or 0-d tensors)."""
        for name, v in values.items():
            # detach: the loss parts still carry their graph, and float() of such a tensor warns
            v = v.detach() if isinstance(v, torch.Tensor) else v
            self._sums[name] = self._sums.get(name, 0.0) + float(v)

    def record(self, step: int, env: DistEnv) -> dict[str, float]:
        n, dt = step - self._step, time.time() - self._t
        rec = mean_across({name: v / n for name, v in self._sums.items()}, env)
        rec.update(step=step, steps_per_s=n / dt)
        self._sums, self._step, self._t = {}, step, time.time()
        return rec


class RunDir:
    """A run directory: resolved config, JSON-lines log, checkpoints, samples, final weights (rank 0)."""

    def __init__(self, path: str | Path, env: DistEnv) -> None:
        self.path = Path(path)
        self.env = env
        self.ckpt = self.path / "ckpt" / "last.pt"
        self.samples = self.path / "samples"
        self.final = self.path / "final"
        self._t0 = time.time()

    def start(self, resolved: dict[str, Any], resume: bool) -> dict[str, Any] | None:
        """Create the directory, write config.json and return the checkpoint to resume from (or None).

        A run directory that already holds a checkpoint is only continued with resume=True, and only with
        the same resolved config (apart from the stopping step).
        """
        has_ckpt = self.ckpt.is_file()
        if has_ckpt and not resume:
            raise FileExistsError(f"{self.path} already has a checkpoint: pass --resume or choose another --run")
        cfg_path = self.path / "config.json"
        if resume and cfg_path.is_file():
            old = json.loads(cfg_path.read_text())
            resolved = json.loads(json.dumps(resolved))  # tuples -> lists, as stored
            old, extended = _allow_extension(old, resolved)
            diff = sorted(
                k for k in set(old) | set(resolved) if k not in ("max_steps",) and old.get(k) != resolved.get(k)
            )
            if diff:
                raise ValueError(f"--resume with a different config than {cfg_path} (differs in {diff})")
            for stage, (a, b) in extended.items():
                logger.warning(
                    "extending %s from %d to %d steps: a schedule that depends on the length (warm-up/decay) "
                    "now follows %d steps from here on",
                    stage,
                    a,
                    b,
                    b,
                )
        if self.env.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            cfg_path.write_text(json.dumps(resolved, indent=2, sort_keys=True))
        barrier(self.env)
        if resume and has_ckpt:
            logger.info("resuming from %s", self.ckpt)
            state = torch.load(self.ckpt, map_location="cpu", weights_only=False)
            if self.env.is_main:
                self._truncate_log(int(state["step"]))
            return state
        return None

    def _truncate_log(self, step: int) -> None:
        """Drop log records of steps after the checkpoint (a killed run logged them; they will be redone)."""
        log = self.path / "log.jsonl"
        if not log.is_file():
            return
        keep = []
        for line in log.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except (ValueError, TypeError):  # a line cut by the kill
                continue
        log.write_text("".join(k + "\n" for k in keep))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Atomically replace ckpt/last.pt (rank 0), then synchronise."""
        if self.env.is_main:
            self.ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.ckpt.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.ckpt)
        barrier(self.env)

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to log.jsonl (rank 0)."""
        if not self.env.is_main:
            return
        record = {"time": round(time.time() - self._t0, 3), **record}
        with open(self.path / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def progress_bar(total: int, initial: int, env: DistEnv, desc: str):
    """tqdm on rank 0 (sparse updates when stderr is not a terminal, e.g. a background log file)."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not env.is_main,
        mininterval=0.5 if tty else 60.0,
        dynamic_ncols=True,
    )


def configure_logging(env: DistEnv) -> None:
    """The command line's log lines (soundctm_rt.logs, set up by its root callback) tagged with the rank; ranks
    other than 0 log warnings only."""
    from ..logs import FORMAT, tag_lines

    tag_lines(FORMAT.replace("%(asctime)s", f"%(asctime)s [rank {env.rank}]"))
    if not env.is_main:
        log = logging.getLogger("soundctm_rt")
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))


def save_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], dtype: torch.dtype | None = None
) -> Path:
    """Write a state dict as safetensors (floats cast to dtype when given), metadata as JSON strings."""
    from safetensors.torch import save_file

    out = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous()
        for k, v in tensors.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    return path


def _allow_extension(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    """A resumed run may be given more steps than it was planned with (train longer); nothing else may change.

    Returns `old` with those larger step counts taken from `new`, and {stage: (old steps, new steps)}.
    """
    old = json.loads(json.dumps(old))
    extended: dict[str, tuple[int, int]] = {}
    for stage, table in new.items():
        prev = old.get(stage)
        if not (isinstance(table, dict) and isinstance(prev, dict)):
            continue
        a, b = prev.get("steps"), table.get("steps")
        if isinstance(a, int) and isinstance(b, int) and b > a:
            prev["steps"] = b
            extended[stage] = (a, b)
    return old, extended
