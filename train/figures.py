"""The model card's picture: spectrograms of a bundle's sounds per class next to real test clips of that class.

Generation goes through the runtime Engine on the bundle itself (what users run), not through torch, so the
picture shows the shipped graphs. One real test clip per class label (drum instrument, ESC-10 class), its
caption as the prompt, and the generated columns at the step counts asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import typer

if TYPE_CHECKING:
    from .data import ClipDataset

# .data, .eval and .report import torch: they are imported inside the functions, because the CLI registers this
# command in every `soundctm-rt` process and the runtime commands must stay torch-free.


def class_examples(ds: ClipDataset, max_classes: int) -> list[tuple[str, int]]:
    """(label, test clip index) for up to max_classes labels: the first test clip of each, corpora interleaved."""
    from .eval import clip_labels

    labels = clip_labels(ds)
    by_corpus: dict[str, list[tuple[str, int]]] = {}
    seen: set[str] = set()
    for i in ds.indices("test"):
        lab = labels[int(i)]
        if lab in seen:
            continue
        seen.add(lab)
        by_corpus.setdefault(ds.rows[int(i)]["corpus"], []).append((lab, int(i)))
    out: list[tuple[str, int]] = []
    j = 0
    while len(out) < max_classes and any(j < len(v) for v in by_corpus.values()):
        for v in by_corpus.values():
            if j < len(v) and len(out) < max_classes:
                out.append(v[j])
        j += 1
    return out


def spectrogram_grid(
    bundle: Path, data: Path, out: Path, steps: tuple[int, ...], max_classes: int, seed: int, backend: str
) -> dict[str, Any]:
    """Write the PNG; returns what it shows (for the model card)."""
    from ..engine import Engine
    from .data import ClipDataset
    from .report import save_spectrograms

    ds = ClipDataset(data)
    ds.require("test", "`soundctm-rt eval-spectrograms` (its real clips and prompts)")
    eng = Engine(bundle, backend=backend)
    if eng.sample_rate != ds.sample_rate:
        raise ValueError(f"bundle rate {eng.sample_rate} Hz differs from the dataset's {ds.sample_rate} Hz")
    rows, titles, shown = [], [], []
    for label, i in class_examples(ds, max_classes):
        prompt = ds.captions[i]
        real = ds.wave(np.array([i]))[0]
        row = [real]
        for n in steps:
            audio, _ = eng.generate(prompt, seed=seed, steps=n, gamma=0.0)
            row.append(audio[: len(real)] if len(audio) >= len(real) else np.pad(audio, (0, len(real) - len(audio))))
        rows.append(row)
        titles.append(f"{prompt} [{label}]")
        shown.append({"label": label, "prompt": prompt, "test_clip": ds.rows[i]["source"]})
    cols = ["real test clip"] + [f"generated, {n} step{'s' if n > 1 else ''}" for n in steps]
    save_spectrograms(rows, titles, cols, out, ds.sample_rate)
    return {"png": str(out), "classes": shown, "steps": list(steps), "seed": seed, "backend": backend}


def spectrograms_command(
    bundle: Path = typer.Option(None, "--bundle", help="bundle directory or zip (default: the shipped model)"),
    data: Path = typer.Option(..., "--data", help="prepared dataset directory (its test split gives the clips)"),
    output: Path = typer.Option(..., "--output", "-o", help="PNG to write"),
    steps: str = typer.Option("1,4", "--steps", help="step counts of the generated columns"),
    max_classes: int = typer.Option(64, "--max-classes", min=1, help="rows: one class label each (64: all here)"),
    seed: int = typer.Option(0, "--seed"),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime | openvino"),
) -> None:
    """Spectrograms of generated sounds per class next to real test clips (the model card's grid)."""
    import json

    from ..bundle import default_bundle_path

    b = bundle or default_bundle_path()
    if b is None:
        raise typer.BadParameter("no --bundle given and no default model is installed", param_hint="--bundle")
    try:
        step_list = tuple(int(s) for s in steps.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"comma-separated integers, not {steps!r}", param_hint="--steps") from None
    from .cli import data_errors

    with data_errors():
        info = spectrogram_grid(Path(b), data, output, step_list, max_classes, seed, backend)
    typer.echo(json.dumps(info, indent=2))
