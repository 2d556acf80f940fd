"""Held-out splits of small folders: `train prepare` chooses and warns, every stage copes or refuses up front.

Synthetic audio only (a folder of 17 noise clips, like a user's first try), the tiny configs, one torch thread.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from soundctm_rt.train.data import DataConfig, Source, list_files, prepare_dataset

N_CLIPS = 17
CLIP = 16 * 1024  # tiny: 16 frames x hop 1024; tiny-mel: 32 frames x hop 512


def write_clips(folder: Path, names: list[str]) -> None:
    import soundfile as sf

    rng = np.random.default_rng(len(names))
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(folder / name, (0.3 * rng.standard_normal(6000)).astype(np.float32), 44100)


def clip_names(n: int = N_CLIPS) -> list[str]:
    return [f"hit{i:02d}.wav" for i in range(n)]


def train_cli(args: list[str]) -> tuple[int, str, BaseException | None]:
    from soundctm_rt.train.cli import app

    res = CliRunner().invoke(app, args)
    return res.exit_code, res.output, res.exception


def root_cli(args: list[str]) -> tuple[int, str, BaseException | None]:
    from soundctm_rt.cli import app

    res = CliRunner().invoke(app, args)
    return res.exit_code, res.output, res.exception


def splits_of(dataset: Path) -> dict[str, str]:
    """{source file name: split} of a prepared dataset."""
    with open(dataset / "clips.csv", newline="") as f:
        return {Path(r["source"]).name: r["split"] for r in csv.DictReader(f)}


def assert_one_line_error(code: int, output: str, exc: BaseException | None, *needles: str) -> None:
    assert code == 1 and (exc is None or isinstance(exc, SystemExit)), output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in output, output
    for needle in needles:
        assert needle in lines[0], output


@contextlib.contextmanager
def data_warnings() -> Iterator[list[str]]:
    """The warnings of train.data while the block runs (the stages' logging setup replaces the root handlers,
    caplog's among them, so the handler sits on the module's logger)."""
    seen: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Handler(logging.WARNING)
    log = logging.getLogger("soundctm_rt.train.data")
    log.addHandler(handler)
    try:
        yield seen
    finally:
        log.removeHandler(handler)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """17 clips in one folder, no CSV."""
    root = tmp_path_factory.mktemp("small") / "hits"
    write_clips(root, clip_names())
    return root


@pytest.fixture(scope="module")
def no_held_out(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder prepared with nothing held out: no valid and no test clips."""
    out = tmp_path_factory.mktemp("none") / "dataset"
    cfg = DataConfig(hash_valid_fraction=0.0, hash_test_fraction=0.0)
    prepare_dataset([Source(folder)], out, 44100, CLIP, 1024, cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def vae_run(no_held_out: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from soundctm_rt.train.vae_train import train_vae

    torch.set_num_threads(1)
    return train_vae("tiny", no_held_out, tmp_path_factory.mktemp("vae") / "run", threads=1)


@pytest.fixture(scope="module")
def teacher_run(no_held_out: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from soundctm_rt.train.teacher_train import train_teacher

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("teacher") / "run"
    return train_teacher("tiny-mel", no_held_out, None, run, threads=1, sample_prompts=())


# ------------------------------------------------------------------------------------------------ prepare


def test_a_single_folder_holds_out_files_and_prepare_warns_of_tiny_splits(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    with data_warnings() as logged:
        code, output, _ = train_cli(["prepare", "-c", "tiny", "--audio", str(folder), "-o", str(out)])
    assert code == 0, output
    counts = json.loads((out / "dataset.json").read_text())["clips"]
    assert counts == {"train": 15, "valid": 1, "test": 1}  # 5 % of 17 files, rounded, for each held-out split
    for split in ("valid", "test"):
        printed = [line for line in output.splitlines() if line.startswith(f"warning: split '{split}' is tiny")]
        assert len(printed) == 1 and f"--{split}-fraction" in printed[0] and f"--{split}-files" in printed[0]
        assert [m for m in logged if f"split '{split}' is tiny" in m], split
    assert len(json.loads((out / "dataset.json").read_text())["warnings"]) == 2


def test_prepare_warns_of_empty_splits(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    args = ["prepare", "-c", "tiny", "--audio", str(folder), "-o", str(out), "--valid-fraction", "0"]
    with data_warnings() as logged:
        code, output, _ = train_cli([*args, "--test-fraction", "0"])
    assert code == 0, output
    assert set(splits_of(out).values()) == {"train"}
    for split in ("valid", "test"):
        assert f"warning: split '{split}' is empty" in output
        assert [m for m in logged if f"split '{split}' is empty" in m], split
    # a comfortable split says nothing
    code, output, _ = train_cli([*args[:-1], "0.3", "--test-fraction", "0.3", "-o", str(tmp_path / "ok")])
    assert code == 0 and "warning" not in output, output
    assert sorted(splits_of(tmp_path / "ok").values()).count("valid") == 5  # round(0.3 x 17)


def test_split_fractions_hold_out_exact_shares_by_folder_or_by_file(tmp_path: Path) -> None:
    from soundctm_rt.train.data import held_out_counts

    cfg = DataConfig(hash_valid_fraction=0.25, hash_test_fraction=0.25)
    write_clips(tmp_path / "flat", clip_names(20))
    flat = list_files(Source(tmp_path / "flat"), cfg)
    assert sorted(e.split for e in flat).count("valid") == 5 and sorted(e.split for e in flat).count("test") == 5
    assert [e.split for e in flat] == [e.split for e in list_files(Source(tmp_path / "flat"), cfg)]  # stable
    # enough folders: whole folders are held out (near-duplicates stay together)
    write_clips(tmp_path / "nested", [f"kit{k:02d}/{n}" for k in range(20) for n in ("a.wav", "b.wav")])
    nested = list_files(Source(tmp_path / "nested"), cfg)
    by_folder: dict[str, set[str]] = {}
    for e in nested:
        by_folder.setdefault(e.group, set()).add(e.split)
    assert all(len(s) == 1 for s in by_folder.values())
    assert sorted(s.pop() for s in by_folder.values()).count("test") == 5
    # held-out counts never take the last training unit
    assert held_out_counts(2, 0.45, 0.45) == (0, 1) and held_out_counts(17, 0.05, 0.05) == (1, 1)


def test_named_files_are_held_out(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "valid.txt").write_text("# the validation hits\nhit03.wav\n\nhit04.wav\n")
    (tmp_path / "test.txt").write_text(f"{folder / 'hit05.wav'}\n")  # a path that exists works too
    out = tmp_path / "dataset"
    args = [
        "prepare",
        "-c",
        "tiny",
        "--audio",
        str(folder),
        "-o",
        str(out),
        "--valid-files",
        str(tmp_path / "valid.txt"),
    ]
    code, output, _ = train_cli([*args, "--test-files", str(tmp_path / "test.txt")])
    assert code == 0, output
    held = {name: split for name, split in splits_of(out).items() if split != "train"}
    assert held == {"hit03.wav": "valid", "hit04.wav": "valid", "hit05.wav": "test"}  # naming turns the hash off
    # a name that matches nothing stops prepare before any work, in one line
    (tmp_path / "typo.txt").write_text("hit99.wav\n")
    bad = [*args[:5], "-o", str(tmp_path / "bad"), "--test-files", str(tmp_path / "typo.txt")]
    assert_one_line_error(*train_cli(bad), "hit99.wav")
    assert not (tmp_path / "bad").exists()
    code, output, _ = train_cli([*args, "--test-files", str(tmp_path / "valid.txt")])
    assert code == 2 and "both valid and test" in output


# ------------------------------------------------------------------------------------------------- stages


def test_vae_without_held_out_splits_trains_skips_the_reports_and_says_so(
    vae_run: Path, no_held_out: Path, tmp_path: Path
) -> None:
    from soundctm_rt.train.vae_train import train_vae

    assert (vae_run / "final" / "latent_stats.safetensors").is_file() and not (vae_run / "report").exists()
    assert not [r for r in map(json.loads, (vae_run / "log.jsonl").read_text().splitlines()) if "valid_mel_l1" in r]
    with data_warnings() as logged:
        train_vae("tiny", no_held_out, tmp_path / "again", threads=1, steps=1)
    said = [m for m in logged if m.startswith("train vae:")]
    assert len(said) == 2 and "'valid'" in said[0] and "'test'" in said[1]


def test_vae_decoder_without_held_out_splits(vae_run: Path, no_held_out: Path, tmp_path: Path) -> None:
    from soundctm_rt.train.vae_decoder_train import train_vae_decoder

    run = train_vae_decoder("tiny", no_held_out, vae_run, tmp_path / "dec", threads=1, steps=2, sample_every=2)
    assert (run / "final" / "vae.safetensors").is_file() and not (run / "report").exists()


def test_teacher_without_valid_split_logs_no_nan_and_samples_training_captions(
    teacher_run: Path, no_held_out: Path, tmp_path: Path
) -> None:
    from soundctm_rt.train.teacher_train import train_teacher

    records = [json.loads(line) for line in (teacher_run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    assert not [r for r in records if "valid_loss" in r]
    samples = teacher_run / "samples" / "teacher_0000006"
    assert json.loads((samples / "prompts.json").read_text()) == ["hits"]  # the folder's caption
    assert (samples / "spectrograms.png").is_file()
    with data_warnings() as logged:  # the configured prompts this time
        again = train_teacher("tiny-mel", no_held_out, None, tmp_path / "t", threads=1, steps=1)
    assert len([m for m in logged if m.startswith("train teacher:")]) == 2
    assert "valid_loss" not in (again / "log.jsonl").read_text()


def test_distill_without_test_split_samples_training_captions(
    teacher_run: Path, no_held_out: Path, tmp_path: Path
) -> None:
    from soundctm_rt.train.distill_train import train_distill

    run = train_distill("tiny-mel", teacher_run, no_held_out, tmp_path / "s", threads=1, steps=2, sample_prompts=())
    samples = run / "samples" / "student_0000002"
    assert json.loads((samples / "prompts.json").read_text()) == ["hits"]
    assert (samples / "0_steps1.wav").is_file()


def test_stages_refuse_before_training_without_enough_training_clips(no_held_out: Path, tmp_path: Path) -> None:
    everything_held_out = tmp_path / "held"
    shutil.copytree(no_held_out, everything_held_out, ignore=shutil.ignore_patterns("latents"))
    rows = list(csv.DictReader(open(everything_held_out / "clips.csv", newline="")))
    with open(everything_held_out / "clips.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "split": "valid"} for r in rows)
    args = ["-c", "tiny", "--data", str(everything_held_out), "--threads", "1", "--run"]
    assert_one_line_error(*train_cli(["vae", *args, str(tmp_path / "v")]), "split 'train'", "empty")
    assert not (tmp_path / "v").exists()
    # 17 training clips cannot fill a batch of 32
    small = [
        "teacher",
        "-c",
        "tiny-mel",
        "--data",
        str(no_held_out),
        "--batch-size",
        "32",
        "--run",
        str(tmp_path / "t"),
    ]
    assert_one_line_error(*train_cli(small), "17 clips", "batch of 32", "--batch-size")
    assert not (tmp_path / "t").exists()


def test_test_split_reports_refuse_up_front_without_test_clips(no_held_out: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "not-there")  # never opened: the refusal comes first
    data = ["--data", str(no_held_out)]
    json_out = ["--json", str(tmp_path / "out.json")]
    for args in (
        ["eval", "--teacher", missing, *data, *json_out],
        ["eval-control", "--checkpoint", missing, *data, *json_out],
        ["eval-spectrograms", "--bundle", missing, *data, "-o", str(tmp_path / "x.png")],
        ["train", "vae-embedding-report", *data, *json_out],
        ["train", "baseline-sweep", *data, *json_out],
    ):
        assert_one_line_error(*root_cli(args), "split 'test'", "empty", "--test-fraction")
    assert not (tmp_path / "out.json").exists()
