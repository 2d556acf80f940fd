"""Data preparation, splits, crops, losses and the loop's data order (train/data.py, losses.py, loop.py)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from soundctm_rt.train.data import (
    ClipDataset,
    DataConfig,
    Source,
    balanced_items,
    choose_crops,
    class_repeat_factors,
    list_files,
)
from soundctm_rt.train.loop import DistEnv, batches, lr_at, step_generator

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DRUM_FILES = {  # machine -> how many of its files the fixture takes
    "YamahaRY30": 3,
    "RolandMC303": 3,  # train
    "RolandTR909": 2,
    "LinnDrum": 1,  # declared test machines
    "AkaiMPC60": 1,  # a validation machine of the default [data] table
}
ESC_FOLDS = {1: 1, 2: 2, 5: 1}


def need_shared_data() -> Path:
    if not (SHARED_DATA / "drum-machines" / "metadata.csv").is_file():
        pytest.skip(f"shared corpus not found at {SHARED_DATA} (tests expect ../shared/data beside the repo)")
    return SHARED_DATA


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def build_corpus(root: Path) -> tuple[list[Source], dict[str, str]]:
    """A small copy of the shared corpora (drum-machines + ESC-10, with their CSV columns) plus bad files.

    Returns the sources and {relative path: expected split or 'bad'}.
    """
    import soundfile as sf

    data = need_shared_data()
    expect: dict[str, str] = {}
    drum = root / "drums"
    rows = read_csv(data / "drum-machines" / "metadata.csv")
    picked = []
    for machine, n in DRUM_FILES.items():
        picked += [r for r in rows if r["machine"] == machine][:n]
    for r in picked:
        dst = drum / r["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "drum-machines" / r["path"], dst)
        expect[r["path"]] = (
            "test"
            if r["machine"] in ("RolandTR909", "LinnDrum")
            else "valid"
            if r["machine"] == "AkaiMPC60"
            else "train"
        )
    # bad files: garbage bytes, digital silence, and a 22.05 kHz file that must be resampled (not bad)
    (drum / "Broken").mkdir(parents=True)
    (drum / "Broken" / "corrupt.flac").write_bytes(b"fLaC\x00\x00garbage" * 50)
    sf.write(drum / "Broken" / "silent.wav", np.zeros(4000, dtype=np.float32), 44100)
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(11025) / 22050).astype(np.float32)
    sf.write(drum / "Broken" / "lowrate.wav", tone, 22050)
    extra = [("Broken/corrupt.flac", "bad"), ("Broken/silent.wav", "bad"), ("Broken/lowrate.wav", "train")]
    for rel, split in extra:
        expect[rel] = split
    with open(drum / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption", "machine"])
        w.writeheader()
        for r in picked:
            w.writerow({"path": r["path"], "caption": r["caption"], "machine": r["machine"]})
        for rel, _ in extra:
            w.writerow({"path": rel, "caption": "broken " + rel, "machine": "Broken"})
    esc = root / "esc"
    erows = read_csv(data / "esc10" / "metadata.csv")
    epicked = []
    for fold, n in ESC_FOLDS.items():
        epicked += [r for r in erows if r["fold"] == str(fold)][:n]
    for r in epicked:
        dst = esc / r["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "esc10" / r["path"], dst)
        expect[r["path"]] = {"1": "test", "5": "valid"}.get(r["fold"], "train")
    with open(esc / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption", "fold"])
        w.writeheader()
        for r in epicked:
            w.writerow({"path": r["path"], "caption": r["caption"], "fold": r["fold"]})
    return [Source(drum, drum / "metadata.csv"), Source(esc, esc / "metadata.csv")], expect


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The fixture corpus prepared through the CLI with the tiny config."""
    from typer.testing import CliRunner

    from soundctm_rt.train.cli import app

    root = tmp_path_factory.mktemp("corpus")
    sources, expect = build_corpus(root)
    out = root / "dataset"
    args = ["prepare", "-c", "tiny", "-o", str(out)]
    for s in sources:
        args += ["--audio", str(s.audio), "--captions", str(s.captions)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return out, expect


def test_prepare_splits_and_bad_files(prepared: tuple[Path, dict[str, str]]) -> None:
    out, expect = prepared
    ds = ClipDataset(out)
    meta = json.loads((out / "dataset.json").read_text())
    assert ds.sample_rate == 44100 and ds.clip_samples == 16 * 1024  # tiny: 16 latent frames
    assert ds.audio.dtype == np.int16 and ds.audio.shape == (len(ds), ds.clip_samples)
    # every file that is not bad is present, in the expected split, and nothing else
    by_file: dict[str, set[str]] = {}
    for r in ds.rows:
        rel = r["source"].split("/drums/")[-1].split("/esc/")[-1]
        by_file.setdefault(rel, set()).add(r["split"])
    assert {rel: s.pop() for rel, s in by_file.items()} == {k: v for k, v in expect.items() if v != "bad"}
    bad = {Path(b["path"]).name: b["reason"] for b in meta["bad_files"]}
    assert set(bad) == {"corrupt.flac", "silent.wav"}
    assert "unreadable" in bad["corrupt.flac"] and "silent" in bad["silent.wav"]
    # declared test material never reaches train or valid
    for r in ds.rows:
        if r["group"] in ("RolandTR909", "LinnDrum", "fold1"):
            assert r["split"] == "test"
    # a 5 s ESC-10 training file gives several non-overlapping crops; test/valid files give one
    esc_train = [r for r in ds.rows if r["corpus"] == "esc" and r["split"] == "train"]
    assert len(esc_train) > 2 and all(int(r["n_valid"]) == ds.clip_samples for r in esc_train)
    for split in ("valid", "test"):
        srcs = [r["source"] for r in ds.rows if r["split"] == split]
        assert len(srcs) == len(set(srcs))
    # the 22.05 kHz tone (0.5 s) was resampled to 44.1 kHz: 22050 valid samples, 440 Hz, amplitude kept
    row = next(r for r in ds.rows if r["source"].endswith("lowrate.wav"))
    x = ds.wave([int(row["index"])])[0]
    n = int(row["n_valid"])
    # clip is shorter than the 0.5 s tone; every clip is peak-normalised to -1 dBFS ([data] peak_db)
    assert n == 16384 and abs(np.abs(x[:n]).max() - 10 ** (-1 / 20)) < 0.01
    peaks = np.abs(ds.wave(np.arange(len(ds)))).max(axis=1)
    np.testing.assert_allclose(peaks, 10 ** (-1 / 20), atol=2e-4)
    spec = np.abs(np.fft.rfft(x[:n]))
    assert abs(np.argmax(spec) * 44100 / n - 440) < 5


def test_folder_names_give_captions(tmp_path: Path) -> None:
    import soundfile as sf

    for folder in ("dog_bark", "rain/heavy"):
        (tmp_path / folder).mkdir(parents=True)
        sf.write(tmp_path / folder / "a.wav", 0.1 * np.ones(2000, dtype=np.float32), 44100)
    files = list_files(Source(tmp_path), DataConfig())
    assert sorted(f.caption for f in files) == ["dog bark", "rain heavy"]
    again = list_files(Source(tmp_path), DataConfig())
    assert [f.split for f in files] == [f.split for f in again]


def test_choose_crops() -> None:
    x = np.zeros(10_000, dtype=np.float32)
    x[6000:6500] = 1.0
    assert choose_crops(x[:900], 1000, 100, 3, 0.1) == [0]
    crops = choose_crops(x, 1000, 100, 3, 0.1)
    assert crops[0] <= 6000 and crops[0] + 1000 >= 6500 and len(crops) == 1  # quieter windows are silent
    x[1000:1500] = 0.8
    crops = choose_crops(x, 1000, 100, 3, 0.1)
    assert len(crops) == 2 and all(abs(a - b) >= 1000 for a in crops for b in crops if a != b)


def test_losses_and_metrics() -> None:
    from soundctm_rt.train.losses import edm_loss, gaussian_kl, mel_filterbank, mel_l1, mr_stft_loss, si_sdr

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 8192, generator=g) * 0.1
    assert float(mr_stft_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    assert float(mr_stft_loss(0.5 * y, y)) > 0.3
    assert float(mel_l1(y, y, 44100)) == pytest.approx(0.0, abs=1e-6)
    assert float(mel_l1(0.5 * y, y, 44100)) == pytest.approx(np.log(2.0), rel=0.02)  # log-mel of half amplitude
    assert torch.all(si_sdr(3.0 * y, y) > 60) and torch.all(si_sdr(torch.randn(2, 8192, generator=g), y) < 0)
    fb = mel_filterbank(44100, 2048, 128)
    assert fb.shape == (128, 1025) and torch.all(fb.sum(1) > 0)
    assert float(gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4))) == 0.0
    x0 = torch.randn(4, 3, 5, generator=g)
    sigma = torch.tensor([0.1, 1.0, 5.0, 20.0])
    eps = torch.randn(4, 3, 5, generator=g)
    assert float(edm_loss(lambda x, s: x0, x0, sigma, eps, 0.5)) == 0.0  # a perfect denoiser


def test_ddp_shards_make_the_single_process_batch() -> None:
    items = np.arange(100, 150)
    single = dict(batches(items, 8, DistEnv(0, 1), seed=3, start_step=0, end_step=14))
    shards = [dict(batches(items, 8, DistEnv(r, 2), seed=3, start_step=0, end_step=14)) for r in range(2)]
    for k in range(1, 15):
        assert sorted(np.concatenate([shards[0][k], shards[1][k]])) == sorted(single[k])
    # resuming recomputes the order: steps 9.. equal the uninterrupted run's
    resumed = dict(batches(items, 8, DistEnv(0, 1), seed=3, start_step=8, end_step=14))
    assert all(np.array_equal(resumed[k], single[k]) for k in range(9, 15))
    epoch0 = np.concatenate([single[k] for k in range(1, 7)])  # 50 items // 8 = 6 steps per epoch
    assert len(set(epoch0.tolist())) == 48
    a = torch.rand(3, generator=step_generator(0, 5))
    assert torch.equal(a, torch.rand(3, generator=step_generator(0, 5)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(0, 6)))
    assert lr_at(0, 1.0, 10, 100, 0.1) == 0.0 and lr_at(10, 1.0, 10, 100, 0.1) == 1.0
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


def test_class_repeat_factors_balance_the_rare_classes():
    labels = ["kick"] * 16 + ["clap"] * 4 + ["bark"] * 1 + ["held-out"] * 3
    idx = np.arange(21)  # the held-out clips are not training clips and do not count
    assert class_repeat_factors(labels, idx, 0.0).tolist() == [1] * 21
    r = class_repeat_factors(labels, idx, 0.5)
    assert r[:16].tolist() == [1] * 16 and r[16:20].tolist() == [2] * 4 and r[20] == 4
    full = balanced_items(labels, idx, 1.0)  # every class the same share
    counts = {lab: sum(labels[i] == lab for i in full) for lab in ("kick", "clap", "bark")}
    assert counts == {"kick": 16, "clap": 16, "bark": 16}
    assert balanced_items(labels, idx, 0.0) is idx
    with pytest.raises(ValueError, match="power"):
        class_repeat_factors(labels, idx, -1.0)
