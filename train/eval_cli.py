"""`soundctm-rt eval`: the student-vs-teacher quality table (train.eval) as JSON and Markdown."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise typer.BadParameter(f"{what}: comma-separated numbers, not {text!r}") from e


def eval_command(
    student: Path = typer.Option(
        None,
        "--student",
        help="`train distill` run directory (or its checkpoint file); omit to judge the teacher alone",
    ),
    teacher: Path = typer.Option(..., "--teacher", help="`train teacher` run directory (or its checkpoint file)"),
    data: Path = typer.Option(..., "--data", help="prepared dataset directory (its test split gives the prompts)"),
    json_path: Path = typer.Option(..., "--json", help="write the result here"),
    markdown_path: Path = typer.Option(None, "--markdown", help="also write the table as Markdown"),
    steps: str = typer.Option("1,2,4,8", "--steps", help="student step counts"),
    gammas: str = typer.Option("0,1", "--gammas", help="γ values of the student's γ-sampling"),
    max_prompts: int = typer.Option(96, "--max-prompts", help="test captions used (evenly spread); 0 = all"),
    seeds: str = typer.Option("0,1,2", "--seeds", help="noise seeds (the CIs are over these)"),
    ablation: Path = typer.Option(
        None, "--ablation", help="a second student run (e.g. distance = l2, same budget) evaluated at γ = 0"
    ),
    embedding: str = typer.Option("birdnet", "--embedding", help="birdnet | logmel | auto"),
    omega: float = typer.Option(0.0, "--omega", help="CFG ω for teacher and student (0: the student's default)"),
    teacher_steps: int = typer.Option(40, "--teacher-steps", help="Karras points of the teacher's Heun sampler"),
    ode_steps: int = typer.Option(40, "--ode-steps", help="points of the student's own Heun ODE sampling (0: skip)"),
    max_train_clips: int = typer.Option(800, "--max-train-clips", help="training clips for probe/memorisation"),
    threads: int = typer.Option(None, "--threads", help="torch and BirdNET threads"),
    level: str = typer.Option(
        "runtime",
        "--level",
        help="runtime: a mel model's takes at the level the runtime writes (each set from its code to a "
        "predicted -1 dBFS peak); raw: the level the model made",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved evaluation config and exit"),
) -> None:
    """Teacher (Heun, CFG) vs student (γ-sampling, own ODE) on the test prompts: FD, KID, probe adherence,
    paired distance to the teacher, memorisation, seconds per clip, with the real-vs-real floor."""
    from .eval import EvalConfig

    if level not in ("runtime", "raw"):
        raise typer.BadParameter(f"--level must be runtime or raw, not {level!r}")
    cfg = EvalConfig(
        steps=tuple(int(s) for s in _floats(steps, "--steps")),
        gammas=_floats(gammas, "--gammas"),
        teacher_steps=teacher_steps,
        ode_steps=ode_steps,
        omega=omega,
        seeds=tuple(int(s) for s in _floats(seeds, "--seeds")),
        max_prompts=max_prompts,
        max_train_clips=max_train_clips,
        embedding=embedding,
        level=level,
    )
    if dry_run:
        typer.echo(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    from .birdnet import make_embedding
    from .checkpoint import STUDENT_CHECKPOINT, TEACHER_CHECKPOINT
    from .cli import evaluation_dataset
    from .eval import evaluate, load_checkpoint_of, markdown, write_result

    ds = evaluation_dataset(
        data,
        threads,
        "eval",
        "its prompts and reference clips",
        "no valid-vs-test floor, and the probe's ridge is not chosen on it",
    )
    embed = make_embedding(cfg.embedding, threads=threads or 1)
    result = evaluate(
        load_checkpoint_of(student, STUDENT_CHECKPOINT) if student else None,
        load_checkpoint_of(teacher, TEACHER_CHECKPOINT),
        ds,
        embed,
        cfg,
        ablation=load_checkpoint_of(ablation, STUDENT_CHECKPOINT) if ablation else None,
        paths={
            "student": str(student.resolve()) if student else None,
            "teacher": str(teacher.resolve()),
            "data": str(data.resolve()),
            "ablation_student": str(ablation.resolve()) if ablation else None,
        },
    )
    write_result(result, json_path, markdown_path)
    typer.echo(markdown(result))
