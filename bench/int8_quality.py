"""`soundctm-rt bench int8-quality`: the INT8 variants against float32 in the evaluation's audio embedding.

The same held-out prompts (test captions, evenly spread, as `soundctm-rt eval` picks them) and the same seeds run
through the bundle's float32 graphs and its INT8 variants; each set of takes is scored as train/eval.py scores a
student row: Fréchet distance and KID against the real test clips, and the accuracy of the linear probe (fitted on
training clips) on the prompts' labels. The report gives both rows and their differences; `--write-manifest`
records them in the bundle's `int8_report.embedding_metrics` (the file table is re-hashed).
Needs the train extra (the embedding, the dataset reader) and a dataset from `soundctm-rt train prepare`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import typer

from ..bundle import Bundle, BundleError, resolve_bundle


def run_int8_quality(
    bundle_path: Path,
    data: Path,
    backend: str = "onnxruntime",
    steps: int | None = None,
    prompts: int = 48,
    seeds: tuple[int, ...] = (0, 1),
    embedding: str = "birdnet",
    threads: int | None = None,
) -> dict[str, Any]:
    from ..engine import Engine
    from ..train.birdnet import make_embedding
    from ..train.data import ClipDataset
    from ..train.eval import RidgeProbe, clip_labels, frechet_distance, kid, mean_ci, spread

    bundle = Bundle.open(bundle_path)
    if not bundle.spec.int8:
        raise BundleError(f"{bundle.root} has no INT8 variants: export it with --int8")
    ds = ClipDataset(data)
    embed = make_embedding(embedding, threads or 1)
    labels = clip_labels(ds)
    test_idx = ds.indices("test")
    prompt_idx = spread(test_idx, prompts)
    texts = [ds.captions[int(i)] for i in prompt_idx]
    prompt_labels = [labels[int(i)] for i in prompt_idx]
    train_idx = spread(ds.indices("train"), 800)
    valid_idx = ds.indices("valid")

    def emb_of(idx: np.ndarray) -> np.ndarray:
        return np.concatenate([embed(ds.wave(idx[i : i + 64]), ds.sample_rate) for i in range(0, len(idx), 64)])

    e_test, e_train = emb_of(test_idx), emb_of(train_idx)
    e_valid = emb_of(valid_idx) if len(valid_idx) else np.zeros((0, e_test.shape[1]))
    probe, _, _ = RidgeProbe.select(
        e_train,
        [labels[int(i)] for i in train_idx],
        e_valid,
        [labels[int(i)] for i in valid_idx],
        (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    )
    rows: dict[str, dict[str, list[float]]] = {}
    for name, int8 in (("fp32", False), ("int8", True)):
        eng = Engine(bundle, backend=backend, threads=threads, warmup=False, int8=int8)
        per_seed: dict[str, list[float]] = {"fd": [], "kid": [], "adherence": []}
        for seed in seeds:
            rng = np.random.default_rng(seed)
            waves = [eng.generate(p, seed=seed * 100_003 + i, steps=steps)[0] for i, p in enumerate(texts)]
            n = min(len(w) for w in waves)
            emb = embed(np.stack([w[:n] for w in waves]), eng.sample_rate)
            per_seed["fd"].append(frechet_distance(emb, e_test))
            per_seed["kid"].append(kid(emb, e_test, 50, 0, rng))
            per_seed["adherence"].append(probe.accuracy(emb, prompt_labels))
        rows[name] = per_seed
    out: dict[str, Any] = {
        "backend": backend,
        "steps": steps or int(bundle.manifest["guidance"]["default_steps"]),
        "prompts": len(texts),
        "seeds": list(seeds),
        "embedding": embed.name,
        "data": str(data),
    }
    for name, per_seed in rows.items():
        out[name] = {k: mean_ci(v) for k, v in per_seed.items()}
    fd32, fd8 = out["fp32"]["fd"]["mean"], out["int8"]["fd"]["mean"]
    out["difference"] = {
        "fd_relative": (fd8 - fd32) / fd32 if fd32 else None,
        "kid": out["int8"]["kid"]["mean"] - out["fp32"]["kid"]["mean"],
        "adherence": out["int8"]["adherence"]["mean"] - out["fp32"]["adherence"]["mean"],
    }
    return out


def write_to_manifest(bundle_path: Path, result: dict[str, Any]) -> None:
    """Record the result under `int8_report.embedding_metrics[backend]` of the bundle's manifest."""
    from ..bundle import write_manifest

    bundle = Bundle.open(bundle_path)
    m = dict(bundle.manifest)
    report = dict(m.get("int8_report") or {})
    metrics = report.get("embedding_metrics")
    metrics = dict(metrics) if isinstance(metrics, dict) else {}
    metrics[result["backend"]] = result
    report["embedding_metrics"] = metrics
    m["int8_report"] = report
    write_manifest(bundle.root, m)


def int8_quality(
    data: Path = typer.Option(..., help="Dataset from `soundctm-rt train prepare` (its test split is scored)."),
    bundle: Path | None = typer.Option(None, help="Bundle exported with --int8 (default: the shipped model)."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime or openvino."),
    steps: int | None = typer.Option(None, min=1, help="Student steps (default: the bundle's)."),
    prompts: int = typer.Option(48, min=2, help="Test captions, evenly spread."),
    seeds: str = typer.Option("0,1", help="Seeds, comma-separated."),
    embedding: str = typer.Option("birdnet", help="birdnet, logmel or auto."),
    threads: int | None = typer.Option(None, min=1, help="Threads."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the result as JSON."),
    write_manifest: bool = typer.Option(False, "--write-manifest", help="Record the result in the bundle."),
) -> None:
    """FD, KID and probe adherence of the INT8 variants against float32, on the same prompts and seeds."""
    if backend not in ("onnxruntime", "openvino"):
        typer.secho(f"error: --backend must be onnxruntime or openvino, not {backend!r}", err=True, fg="red")
        raise typer.Exit(2)
    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        typer.secho(f"error: --seeds must be integers separated by commas, got {seeds!r}", err=True, fg="red")
        raise typer.Exit(2) from None
    try:
        path = resolve_bundle(bundle)
        res = run_int8_quality(path, data, backend, steps, prompts, seed_list, embedding, threads)
        if write_manifest:
            write_to_manifest(path, res)
    except (BundleError, FileNotFoundError, ValueError, ImportError) as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(1) from None
    for name in ("fp32", "int8"):
        r = res[name]
        typer.echo(
            f"{name}: FD {r['fd']['mean']:.2f}  KID {r['kid']['mean']:.4f}  adherence {r['adherence']['mean']:.3f}"
        )
    d = res["difference"]
    rel = "-" if d["fd_relative"] is None else f"{100 * d['fd_relative']:+.1f} %"
    typer.echo(f"int8 - fp32: FD {rel}, KID {d['kid']:+.4f}, adherence {d['adherence']:+.3f}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res, indent=2) + "\n")
