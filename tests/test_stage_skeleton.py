"""The stage skeleton (train.stage) on a toy stage, and the module layout of train/: stages never import each
other, and every stage table keeps its keys (a run's config.json must match them to be resumed)."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

TRAIN = Path(__file__).resolve().parents[1] / "train"
STAGES = ("teacher_train", "distill_train", "vae_train", "vae_decoder_train")


def _imported_modules(path: Path) -> set[str]:
    """Names of the train modules a file imports relatively (`from .x import`, `from . import x`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(a.name for a in node.names)
    return names


def test_only_the_cli_imports_the_stages() -> None:
    offenders = {
        f.name: sorted(_imported_modules(f) & set(STAGES))
        for f in TRAIN.glob("*.py")
        if f.name != "cli.py" and _imported_modules(f) & set(STAGES)
    }
    assert offenders == {}


def test_stage_tables_keep_their_keys() -> None:
    from soundctm_rt.train.distill_train import DistillConfig
    from soundctm_rt.train.teacher_train import TeacherTrainConfig
    from soundctm_rt.train.vae_decoder_train import VAEDecoderTrainConfig
    from soundctm_rt.train.vae_train import VAETrainConfig

    common = {"steps", "batch_size", "seed", "log_every", "ckpt_every"}
    adamw = common | {"lr", "warmup", "final_lr_ratio", "betas", "weight_decay", "grad_clip", "sample_every"}
    expected = {
        TeacherTrainConfig: adamw
        | {
            "ema_decay",
            "caption_dropout",
            "class_balance",
            "sample_prompts",
            "sample_steps",
            "sample_omega",
            "sample_seed",
        },
        VAETrainConfig: adamw | {"segment_frames", "stft_weight", "mel_weight", "kl_weight", "ema_decay", "eval_clips"},
        VAEDecoderTrainConfig: adamw | {"segment_frames", "stft_weight", "mel_weight", "latent_noise", "eval_clips"},
        DistillConfig: common
        | {
            "lr",
            "betas",
            "ema_decay",
            "caption_dropout",
            "class_balance",
            "N",
            "max_n",
            "distance",
            "omega_min",
            "omega_max",
            "default_omega",
        }
        | {"lambda_dsm", "dsm_karras_r_max", "time_parts", "sample_prompts", "sample_steps", "sample_seed"},
    }
    for cls, keys in expected.items():
        assert set(cls.__dataclass_fields__) == keys, cls.__name__
    t = TeacherTrainConfig()
    assert (t.steps, t.lr, t.warmup, t.betas, t.weight_decay) == (3000, 2e-4, 200, (0.9, 0.99), 0.0)
    v = VAEDecoderTrainConfig()
    assert (v.steps, v.batch_size, v.lr, v.warmup, v.betas, v.weight_decay) == (6000, 16, 2e-4, 100, (0.8, 0.99), 0.01)


class _Toy:
    """y = w·x on fixed items: a stage in a few lines."""

    def __init__(self, cfg, ema_decay: float = 0.9) -> None:
        from soundctm_rt.train.loop import EMA
        from soundctm_rt.train.stage import TrainState

        torch.manual_seed(0)
        self.cfg = cfg
        self.model = torch.nn.Linear(3, 1)
        self.ema = EMA(self.model, ema_decay)
        self.state = TrainState({"model": self.model, "ema": self.ema}, cfg.optimizer(self.model.parameters()))
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
        self.evaluated: list[int] = []

    def step(self, k: int, idx: np.ndarray) -> dict[str, object]:
        i = torch.from_numpy(idx)
        loss = (self.model(self.x[i]) - self.y[i]).pow(2).mean()
        gnorm = self.cfg.optimizer_step(self.state.opt, loss, self.model.parameters(), k)
        self.ema.update(self.model)
        return {"loss": loss, "grad_norm": gnorm}

    def stage(self):
        from soundctm_rt.train.stage import Stage

        return Stage("toy", self.cfg, self.state, self.step, ("clips_per_s", 1.0), self.evaluated.append, 3)


def _run(tmp: Path, cfg, end_step: int, resume: bool = False, max_steps: int | None = None) -> _Toy:
    from soundctm_rt.train.loop import DistEnv, RunDir
    from soundctm_rt.train.stage import run_stage

    toy = _Toy(cfg)
    rd = RunDir(tmp, DistEnv())
    ckpt = rd.start({"stage": "toy", "toy": {"steps": cfg.steps}}, resume)
    run_stage(DistEnv(), rd, toy.stage(), ckpt, np.arange(16), max_steps or end_step)
    return toy


def test_run_stage_logs_checkpoints_evaluates_and_resumes_exactly(tmp_path: Path) -> None:
    from soundctm_rt.train.stage import AdamWStageConfig

    cfg = AdamWStageConfig(steps=7, batch_size=4, log_every=2, ckpt_every=4, lr=0.05, warmup=2)
    full = _run(tmp_path / "full", cfg, 7)
    log = [json.loads(r) for r in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 7]
    assert all(np.isfinite(r["loss"]) and r["clips_per_s"] > 0 for r in log)
    assert [r["lr"] for r in log] == [cfg.lr_at(k) for k in (2, 4, 6, 7)]
    assert full.evaluated == [3, 6]
    ckpt = torch.load(tmp_path / "full" / "ckpt" / "last.pt", weights_only=False)
    assert sorted(ckpt) == ["ema", "model", "opt", "step", "world"] and ckpt["step"] == 7

    _run(tmp_path / "part", cfg, 7, max_steps=4)
    part = _run(tmp_path / "part", cfg, 7, resume=True)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, part.model.state_dict()[k])
    for k, v in full.ema.state_dict().items():
        assert torch.equal(v, part.ema.state_dict()[k])
    resumed = [json.loads(r) for r in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in log]


def test_resume_warns_of_another_world_size(caplog: pytest.LogCaptureFixture) -> None:
    from soundctm_rt.train.loop import DistEnv
    from soundctm_rt.train.stage import AdamWStageConfig

    toy = _Toy(AdamWStageConfig())
    ckpt = toy.state.checkpoint(5, DistEnv(world=2))
    with caplog.at_level(logging.WARNING):
        assert _Toy(AdamWStageConfig()).state.resume(ckpt, DistEnv()) == 5
    assert "data order changes" in caplog.text


def test_a_non_finite_loss_stops_the_stage(tmp_path: Path) -> None:
    from soundctm_rt.train.loop import DistEnv, RunDir
    from soundctm_rt.train.stage import AdamWStageConfig, Stage, run_stage

    toy = _Toy(AdamWStageConfig(steps=3, batch_size=4))
    stage = Stage("toy", toy.cfg, toy.state, lambda k, idx: {"loss": float("nan")})
    rd = RunDir(tmp_path, DistEnv())
    with pytest.raises(FloatingPointError, match="non-finite toy loss at step 1"):
        run_stage(DistEnv(), rd, stage, rd.start({}, False), np.arange(16), 3)
