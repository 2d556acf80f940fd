"""Data preparation and loading: audio folders + captions -> fixed-length 44.1 kHz mono clips with splits.

`prepare_dataset` reads one or more sources (a folder of audio, optionally a CSV with `path` and `caption`
columns; without a CSV the folder names give the captions), converts every file to mono at the model rate
(scipy's polyphase resampler), cuts it to the clip length of the architecture (dit.latent_frames frames)
and writes a dataset directory:

    dataset.json     sample rate, clip length, split counts and warnings, the split rules, the sources, bad files
    clips.csv        one row per clip: index, split, caption, source file, corpus, group, offset, n_valid
    audio.npy        int16 [n_clips, clip_samples] (memory-mapped when read)
    latents/<id>/    latent cache of one codec (mel code or VAE; written once by `cache_latents`)

Split rules, chosen from the CSV's columns so that declared test sets never reach training:
  * a `split` column: used as given (train / valid / test);
  * a `machine` column (drum-machines): machines in `test_machines` -> test, `valid_machines` -> valid;
  * a `fold` column (ESC-10): folds in `test_folds` -> test, `valid_folds` -> valid;
  * otherwise the top-level folder is the group, and of a source's groups in a stable hash order the first
    round(hash_test_fraction·n) go to test and the next round(hash_valid_fraction·n) to valid (5 % each). When
    a source has too few groups to give each held-out split one and keep one for training (a single folder of
    clips), its files are split that way instead.
Files named in `valid_files` / `test_files` (paths relative to their source folder) go to that split whatever
the rules above say, and naming files for a split turns that split's hash fraction off.
Splitting by group (machine, fold, folder) keeps near-duplicates of one recording in one split.
`prepare_dataset` warns (log, report, dataset.json) when a split is empty or tiny, naming the fix.

Every clip is scaled to a peak of `peak_db` (-1 dBFS) unless `peak_normalise` is off.
Files longer than a clip give their loudest window; training files give up to `max_crops` non-overlapping
windows (loudest first, each within 10 dB of the loudest) so long field recordings are not wasted.
Unreadable, silent, too short or implausibly low-rate files are reported (dataset.json, bad_files.csv) and
skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
TINY_SPLIT_CLIPS = 5  # a held-out split with fewer clips, or under TINY_SPLIT_SHARE of the files, is "tiny"
TINY_SPLIT_SHARE = 0.02
HOLD_OUT_FIX = {
    "train": "hold out less (`train prepare --valid-fraction/--test-fraction`, fewer --valid-files/--test-files)",
    "valid": "hold out more with `train prepare --valid-fraction F` or `--valid-files LIST` (or [data] "
    "valid_machines / valid_folds, or a 'split' column in the --captions CSV)",
    "test": "hold out more with `train prepare --test-fraction F` or `--test-files LIST` (or [data] "
    "test_machines / test_folds, or a 'split' column in the --captions CSV)",
}
SPLIT_USES = {
    "train": "no stage can train on it",
    "valid": "validation reports (VAE reconstructions, teacher valid_loss, probe ridge choice) are skipped",
    "test": "test reports (VAE reconstruction report, eval, eval-control, decoder gate) cannot run",
}
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")
CORPUS_CSV = "metadata.csv"  # a corpus folder's captions (and split columns), as `corpus_sources` finds them


@dataclass(frozen=True)
class DataConfig:
    """The [data] table: split rules and clip selection (see the module docstring)."""

    test_machines: tuple[str, ...] = (
        "RolandTR909",
        "LinnDrum",
        "KorgMinipops",
        "YamahaRX5",
        "EmuDrumulator",
        "RolandCompurhythm78",
    )  # declared by ../shared/data/README.md: never train on them
    valid_machines: tuple[str, ...] = ("RolandTR626", "KorgT3", "AkaiMPC60", "RolandD110", "BossDR55")
    test_folds: tuple[int, ...] = (1,)  # ESC-10 fold 1 is the declared test split
    valid_folds: tuple[int, ...] = (5,)
    hash_valid_fraction: float = 0.05  # of the groups (or files) of sources without split/machine/fold columns
    hash_test_fraction: float = 0.05
    valid_files: tuple[str, ...] = ()  # held out whatever the other rules say (paths relative to the source)
    test_files: tuple[str, ...] = ()
    max_crops: int = 3  # windows taken from one long training file
    crop_min_ratio: float = 0.1  # extra crops need >= this fraction of the loudest window's energy (-10 dB)
    silence_peak: float = 1e-4  # files whose peak is below this (-80 dBFS) are "silent" and skipped
    min_rate: int = 8000  # files below this sample rate are rejected rather than upsampled
    min_seconds: float = 0.01  # shorter files are rejected
    # Every clip is scaled to this peak (dBFS): the corpora's levels are arbitrary (one-shots recorded at
    # -60 to 0 dBFS), so a level learnt from them would be noise; one-shot packs are peak-normalised too.
    peak_normalise: bool = True
    peak_db: float = -1.0

    def __post_init__(self) -> None:
        overlap = set(self.test_machines) & set(self.valid_machines)
        if overlap:
            raise ValueError(f"[data] machines both valid and test: {sorted(overlap)}")
        if set(self.test_folds) & set(self.valid_folds):
            raise ValueError("[data] a fold cannot be both valid and test")
        if not (
            self.hash_valid_fraction >= 0
            and self.hash_test_fraction >= 0
            and self.hash_valid_fraction + self.hash_test_fraction < 1
        ):
            raise ValueError("[data] hash fractions must be >= 0 and sum to < 1")
        both = set(self.valid_files) & set(self.test_files)
        if both:
            raise ValueError(f"[data] files named both valid and test: {sorted(both)[:5]}")
        if self.max_crops < 1:
            raise ValueError("[data] max_crops must be >= 1")
        if not -60.0 <= self.peak_db <= 0.0:
            raise ValueError("[data] peak_db must be in [-60, 0] dBFS")


@dataclass(frozen=True)
class Source:
    """One input corpus: a folder of audio and an optional CSV (path relative to the folder, caption)."""

    audio: Path
    captions: Path | None = None


@dataclass
class FileEntry:
    path: Path
    rel: str
    caption: str
    corpus: str
    group: str
    split: str


@dataclass
class PrepareReport:
    """What `prepare_dataset` did: clip counts per split and the skipped files with reasons."""

    out: Path
    clips: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # empty or tiny splits, with the fix


class DataError(ValueError):
    """A dataset cannot serve what was asked of it (an empty split, unknown named files); one line with the fix."""


def corpus_sources(root: Path) -> list[Source]:
    """Every subfolder of `root` that holds a metadata.csv (path, caption and split columns), as a source read in
    place, in name order (e.g. ../shared/data: drum-machines and esc10).

    Raises:
        DataError: root is not a folder, or none of its subfolders has a metadata.csv.
    """
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder")
    out = [Source(d, d / CORPUS_CSV) for d in sorted(root.iterdir()) if (d / CORPUS_CSV).is_file()]
    if not out:
        raise DataError(f"no subfolder of {root} holds a {CORPUS_CSV}; pass --audio DIR [--captions CSV]")
    return out


def _hash_unit(text: str) -> float:
    """A stable number in [0, 1) from a string (independent of PYTHONHASHSEED)."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16) / float(1 << 48)


def _split_of(row: dict[str, str], group_default: str, cfg: DataConfig) -> tuple[str | None, str]:
    """(split, group) of a CSV row by the column rules of the module docstring; split None: left to the hash."""
    if row.get("split"):
        split = row["split"].strip().lower()
        if split not in SPLITS:
            raise ValueError(f"split column value {row['split']!r} is not one of {SPLITS}")
        return split, row.get("group") or group_default
    if row.get("machine"):
        m = row["machine"].strip()
        return ("test" if m in cfg.test_machines else "valid" if m in cfg.valid_machines else "train"), m
    if row.get("fold"):
        f = int(row["fold"])
        return ("test" if f in cfg.test_folds else "valid" if f in cfg.valid_folds else "train"), f"fold{f}"
    return None, group_default


def held_out_counts(n: int, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(valid, test) of n units: round(fraction·n) each, cut back (valid first) so that one unit stays for
    training."""
    n_valid = math.floor(valid_fraction * n + 0.5)
    n_test = math.floor(test_fraction * n + 0.5)
    while n > 0 and n_valid + n_test >= n:
        if n_valid:
            n_valid -= 1
        else:
            n_test -= 1
    return n_valid, n_test


def hash_splits(keys: list[str], valid_fraction: float, test_fraction: float) -> dict[str, str]:
    """{key: split} of distinct keys: in a stable hash order the first held_out_counts(...)[1] -> test, the next
    [0] -> valid, the rest -> train (independent of PYTHONHASHSEED and of the order of `keys`)."""
    order = sorted(set(keys), key=lambda k: (_hash_unit(k), k))
    n_valid, n_test = held_out_counts(len(order), valid_fraction, test_fraction)
    return {k: "test" if i < n_test else "valid" if i < n_test + n_valid else "train" for i, k in enumerate(order)}


def _assign_hashed(entries: list[FileEntry], pending: list[bool], cfg: DataConfig, corpus: str) -> None:
    """Splits of the entries left to the hash: whole groups, or single files when the groups are too few."""
    todo = [e for e, p in zip(entries, pending, strict=True) if p]
    if not todo:
        return
    fv = 0.0 if cfg.valid_files else cfg.hash_valid_fraction
    ft = 0.0 if cfg.test_files else cfg.hash_test_fraction
    groups = sorted({e.group for e in todo})
    n_valid, n_test = held_out_counts(len(groups), fv, ft)
    if (n_valid or not fv) and (n_test or not ft):
        by_group = hash_splits(groups, fv, ft)
        for e in todo:
            e.split = by_group[e.group]
        return
    if len(groups) > 1:
        logger.info("%s: %d folders are too few to hold out whole folders: holding out files", corpus, len(groups))
    by_file = hash_splits([e.rel for e in todo], fv, ft)
    for e in todo:
        e.split = by_file[e.rel]


def _named(cfg: DataConfig) -> dict[str, str]:
    """{name: split} of the files named in valid_files / test_files (as given, and as absolute paths)."""
    out: dict[str, str] = {}
    for split, names in (("valid", cfg.valid_files), ("test", cfg.test_files)):
        for name in names:
            out[name] = split
            out[str(Path(name).resolve())] = split
    return out


def _name_of(e: FileEntry, named: dict[str, str]) -> str | None:
    """The key under which a file is named in valid_files / test_files, if it is."""
    if e.rel in named:
        return e.rel
    full = str(e.path.resolve())
    return full if full in named else None


def list_files(src: Source, cfg: DataConfig) -> list[FileEntry]:
    """The files of a source with caption, group and split (CSV rows, or every audio file in the folder)."""
    corpus = src.audio.name
    entries: list[FileEntry] = []
    pending: list[bool] = []
    if src.captions is not None:
        with open(src.captions, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or [])
            if not {"path", "caption"} <= cols:
                raise ValueError(f"{src.captions}: needs columns 'path' and 'caption' (has {sorted(cols)})")
            for row in reader:
                rel = row["path"].strip()
                top = rel.split("/")[0] if "/" in rel else corpus
                split, group = _split_of(row, top, cfg)
                entries.append(FileEntry(src.audio / rel, rel, row["caption"].strip(), corpus, group, split or ""))
                pending.append(split is None)
    else:
        for p in sorted(src.audio.rglob("*")):
            if p.suffix.lower() not in AUDIO_EXTENSIONS or not p.is_file():
                continue
            rel = p.relative_to(src.audio).as_posix()
            parts = rel.split("/")[:-1]
            caption = " ".join(parts).replace("_", " ").replace("-", " ").strip() or corpus
            entries.append(FileEntry(p, rel, caption, corpus, parts[0] if parts else corpus, ""))
            pending.append(True)
    named = _named(cfg)
    if named:  # named files are decided: they take no part in the hash
        keys = [_name_of(e, named) for e in entries]
        for e, k in zip(entries, keys, strict=True):
            if k is not None:
                e.split = named[k]
        pending = [p and k is None for p, k in zip(pending, keys, strict=True)]
    _assign_hashed(entries, pending, cfg, corpus)
    return entries


def unmatched_names(entries: list[FileEntry], cfg: DataConfig) -> list[str]:
    """The names of valid_files / test_files that match no file of `entries` (typos, wrong folder)."""
    named = _named(cfg)
    hit = {_name_of(e, named) for e in entries}
    return [n for n in (*cfg.valid_files, *cfg.test_files) if n not in hit and str(Path(n).resolve()) not in hit]


def split_warnings(files: dict[str, int], clips: dict[str, int]) -> list[str]:
    """One line per empty split, and per tiny held-out split (fewer than TINY_SPLIT_CLIPS clips or under
    TINY_SPLIT_SHARE of the files), saying what it costs and how to fix it."""
    total = sum(files.values())
    out = []
    for split in SPLITS:
        n, nf = clips.get(split, 0), files.get(split, 0)
        if n == 0:
            out.append(f"split {split!r} is empty: {SPLIT_USES[split]}; {HOLD_OUT_FIX[split]}")
        elif split != "train" and (n < TINY_SPLIT_CLIPS or nf < TINY_SPLIT_SHARE * total):
            size = f"{nf} of {total} files, {n} clip{'s' * (n != 1)}"
            out.append(f"split {split!r} is tiny ({size}): its figures will be noise; {HOLD_OUT_FIX[split]}")
    return out


def load_audio(path: Path, sample_rate: int, cfg: DataConfig) -> np.ndarray:
    """Read a file as float32 mono at `sample_rate` [N] in [-1, 1]. Raises ValueError (the reason) if bad."""
    import soundfile as sf
    from scipy.signal import resample_poly

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for broken files
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from e
    if sr < cfg.min_rate:
        raise ValueError(f"sample rate {sr} Hz below {cfg.min_rate} Hz")
    x = data.mean(axis=1)
    if x.size < cfg.min_seconds * sr:
        raise ValueError(f"too short ({x.size} samples)")
    if not np.all(np.isfinite(x)):
        raise ValueError("non-finite samples")
    if sr != sample_rate:
        g = math.gcd(sr, sample_rate)
        x = resample_poly(x.astype(np.float64), sample_rate // g, sr // g).astype(np.float32)
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak < cfg.silence_peak:
        raise ValueError(f"silent (peak {peak:.2e})")
    if peak > 1.0:  # resampling overshoot or float files: keep the clip undistorted
        x = x / peak
    return x


def choose_crops(x: np.ndarray, clip: int, hop: int, max_crops: int, min_ratio: float) -> list[int]:
    """Start offsets of up to max_crops non-overlapping clip-long windows of x, loudest first.

    Candidates lie on a grid of `hop` samples (plus the last possible start). A file no longer than a clip
    gives [0] (it is zero-padded at the end).
    """
    n = x.size
    if n <= clip:
        return [0]
    starts = np.unique(np.append(np.arange(0, n - clip + 1, hop), n - clip))
    c = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    energy = c[starts + clip] - c[starts]
    order = np.argsort(-energy, kind="stable")
    chosen: list[int] = []
    for i in order:
        if len(chosen) == max_crops or energy[i] < min_ratio * energy[order[0]]:
            break
        s = int(starts[i])
        if all(abs(s - o) >= clip for o in chosen):
            chosen.append(s)
    return chosen


def prepare_dataset(
    sources: list[Source],
    out: Path,
    sample_rate: int,
    clip_samples: int,
    hop: int,
    cfg: DataConfig,
    progress: bool = True,
) -> PrepareReport:
    """Build a dataset directory (module docstring). `clip_samples` = dit.latent_frames · vae.latent_hop."""
    from tqdm import tqdm

    out = Path(out)
    entries = [e for s in sources for e in list_files(s, cfg)]
    missing = unmatched_names(entries, cfg)
    if missing:
        raise DataError(
            f"{len(missing)} named held-out file(s) match no file of the sources, e.g. {missing[:3]}: name them "
            "relative to their --audio folder (like the captions CSV's path column) or by a path that exists"
        )
    out.mkdir(parents=True, exist_ok=True)
    report = PrepareReport(out)
    rows: list[dict[str, Any]] = []
    clips: list[np.ndarray] = []
    for e in tqdm(entries, desc="prepare", disable=not progress, mininterval=2.0):
        try:
            if not e.path.is_file():
                raise ValueError("missing file")
            x = load_audio(e.path, sample_rate, cfg)
        except ValueError as err:
            report.bad.append((str(e.path), str(err)))
            logger.warning("skipping %s: %s", e.path, err)
            continue
        crops = choose_crops(x, clip_samples, hop, cfg.max_crops if e.split == "train" else 1, cfg.crop_min_ratio)
        for off in crops:
            seg = x[off : off + clip_samples]
            clip = np.zeros(clip_samples, dtype=np.float32)
            clip[: seg.size] = seg
            if cfg.peak_normalise:
                clip *= 10.0 ** (cfg.peak_db / 20.0) / max(float(np.abs(clip).max()), cfg.silence_peak)
            clips.append(np.round(np.clip(clip, -1.0, 1.0) * 32767.0).astype(np.int16))
            rows.append(
                {
                    "index": len(rows),
                    "split": e.split,
                    "caption": e.caption,
                    "source": str(e.path),
                    "corpus": e.corpus,
                    "group": e.group,
                    "offset": off,
                    "n_valid": int(seg.size),
                }
            )
        report.files[e.split] = report.files.get(e.split, 0) + 1
    if not rows:
        raise ValueError("no usable audio found in the sources")
    audio = np.stack(clips)
    np.save(out / "audio.npy", audio)
    with open(out / "clips.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "bad_files.csv", "w", newline="", encoding="utf-8") as f:
        w2 = csv.writer(f)
        w2.writerow(["path", "reason"])
        w2.writerows(report.bad)
    report.clips = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    report.warnings = split_warnings(report.files, report.clips)
    for line in report.warnings:
        logger.warning("%s: %s", out, line)
    meta = {
        "format": "soundctm-rt-dataset/1",
        "sample_rate": sample_rate,
        "clip_samples": clip_samples,
        "clips": report.clips,
        "files": report.files,
        "data_config": dataclasses.asdict(cfg),
        "sources": [{"audio": str(s.audio), "captions": str(s.captions) if s.captions else None} for s in sources],
        "bad_files": [{"path": p, "reason": r} for p, r in report.bad],
        "warnings": report.warnings,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    logger.info("prepared %s: clips %s, %d bad files", out, report.clips, len(report.bad))
    return report


class ClipDataset:
    """A prepared dataset directory, read-only. `audio` is int16 [n, clip_samples], memory-mapped."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a prepared dataset (no dataset.json): run `train prepare`")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.sample_rate = int(self.meta["sample_rate"])
        self.clip_samples = int(self.meta["clip_samples"])
        self.audio = np.load(self.root / "audio.npy", mmap_mode="r")
        with open(self.root / "clips.csv", newline="", encoding="utf-8") as f:
            self.rows = list(csv.DictReader(f))
        self.captions = [r["caption"] for r in self.rows]
        self.n_valid = np.array([int(r["n_valid"]) for r in self.rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def indices(self, split: str) -> np.ndarray:
        """Clip indices of a split, ascending."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        return np.array([i for i, r in enumerate(self.rows) if r["split"] == split], dtype=np.int64)

    def require(self, split: str, needed_by: str) -> np.ndarray:
        """indices(split), or DataError (one line: who needs it and the fix) when the split is empty."""
        idx = self.indices(split)
        if len(idx) == 0:
            raise DataError(f"split {split!r} of {self.root} is empty and {needed_by} needs it: {HOLD_OUT_FIX[split]}")
        return idx

    def wave(self, idx: np.ndarray | list[int]) -> np.ndarray:
        """float32 [len(idx), clip_samples] in [-1, 1]."""
        return np.asarray(self.audio[np.asarray(idx)], dtype=np.float32) / 32767.0

    def check_matches(self, sample_rate: int, clip_samples: int) -> None:
        """Raise if the dataset was prepared for another rate or clip length than the config asks for."""
        if (self.sample_rate, self.clip_samples) != (sample_rate, clip_samples):
            raise ValueError(
                f"dataset {self.root} has {self.sample_rate} Hz clips of {self.clip_samples} samples, "
                f"the config "
                f"needs {sample_rate} Hz x {clip_samples}: run `train prepare --config` with the same config"
            )


def check_splits(ds: ClipDataset, stage: str, skipped: dict[str, str], batch_size: int = 1) -> None:
    """Before a stage starts: refuse (DataError) a dataset with fewer training clips than one global batch, and
    log once, for each empty held-out split of `skipped` (split -> what the stage leaves out without it), what
    is skipped."""
    n_train = len(ds.require("train", stage))
    if n_train < batch_size:
        raise DataError(
            f"split 'train' of {ds.root} has {n_train} clips, fewer than one global batch of {batch_size}: "
            f"give {stage} a smaller --batch-size, or {HOLD_OUT_FIX['train']}"
        )
    for split, what in skipped.items():
        if len(ds.indices(split)) == 0:
            logger.warning("%s: split %r of %s is empty: %s; %s", stage, split, ds.root, what, HOLD_OUT_FIX[split])


def latent_cache_dir(dataset: str | Path, vae_id: str) -> Path:
    return Path(dataset) / "latents" / vae_id


def cache_latents(ds: ClipDataset, vae: Any, vae_id: str, batch: int = 16, progress: bool = True) -> Path:
    """Encode every clip once with a codec (train.latent: the mel code, or a VAE's posterior mean) ->
    latents/<vae_id>/latents.npy float32 [n, C, T].

    Raw, unnormalised latents: the METHOD §5 statistics are applied by the consumer. Idempotent: an existing
    complete cache is reused.
    """
    import torch
    from tqdm import tqdm

    d = latent_cache_dir(ds.root, vae_id)
    path = d / "latents.npy"
    if path.is_file() and (d / "done").is_file():
        return path
    d.mkdir(parents=True, exist_ok=True)
    out: list[np.ndarray] = []
    vae.eval()
    with torch.no_grad():
        for i in tqdm(range(0, len(ds), batch), desc="latents", disable=not progress, mininterval=5.0):
            wav = torch.from_numpy(ds.wave(np.arange(i, min(i + batch, len(ds)))))
            mean, _ = vae.encode(wav)
            out.append(mean.float().numpy())
    tmp = d / "latents.tmp.npy"
    np.save(tmp, np.concatenate(out))
    tmp.replace(path)
    (d / "done").write_text(vae_id + "\n")
    logger.info("cached latents of %d clips in %s", len(ds), path)
    return path


def clip_labels(ds: ClipDataset) -> list[str]:
    """The class label of every clip: the `label` column of its source CSV when there is one (drum instrument
    code, ESC-10 class), else its caption."""
    by_path: dict[str, str] = {}
    for src in ds.meta.get("sources", []):
        if not src.get("captions") or not Path(src["captions"]).is_file():
            continue
        with open(src["captions"], newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("label"):
                    by_path[os.path.normpath(str(Path(src["audio"]) / row["path"].strip()))] = row["label"].strip()
    return [by_path.get(os.path.normpath(r["source"]), r["caption"]) for r in ds.rows]


def class_repeat_factors(labels: list[str], idx: np.ndarray, power: float) -> np.ndarray:
    """How often each training clip appears in an epoch: (n_max / n_c) ** power, rounded, at least 1.

    Repeat-factor sampling (the LVIS recipe, here by clip label). The corpora are lopsided (344 kick clips,
    23 tambourines, 51 dog barks), and the teacher mistakes the rare classes for the common ones ("perc" is its
    usual wrong label). power 0 keeps the plain order (the configs' default), 0.5 is the square-root balance, 1
    gives every class the same share. Measured: a 5000-step teacher stage at 0.75 did not raise adherence
    (docs/training/teacher_class_balance_eval.md). The factors are a pure function of the labels, so a resumed
    run recomputes the same epochs.
    """
    if power < 0:
        raise ValueError("class balance power must be >= 0")
    names = [labels[i] for i in idx]
    counts = Counter(names)
    if not counts:
        return np.zeros(0, dtype=np.int64)
    n_max = max(counts.values())
    return np.array([max(1, round((n_max / counts[n]) ** power)) for n in names], dtype=np.int64)


def balanced_items(labels: list[str], idx: np.ndarray, power: float) -> np.ndarray:
    """The training items of one epoch under repeat-factor sampling (idx itself when power is 0)."""
    if power == 0:
        return idx
    return np.repeat(idx, class_repeat_factors(labels, idx, power))
