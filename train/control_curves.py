"""Target intensity curves for METHOD §6 control: named presets, CSV/JSON files, resampling to the frame rate.

A curve is a list of (seconds, dB) points, times strictly increasing, levels in dBFS as train.control's
intensity measures them (Hann-weighted frame RMS; -80 dB is its floor). Between points the level is linear in
dB (an exponential in amplitude); before the first and after the last point it holds that point's level. The
target of frame j is the curve at the centre of the frame's samples, (j + ½)·hop / sample_rate.

Presets are defined relative to the clip duration D, so they fit any model's clip length (the cpu model's is
64 latent frames ≈ 1.49 s). Their levels: PRESET_HIGH_DB near the loudest frame of a typical training clip
(median -11 dB on the cpu dataset), PRESET_LOW_DB well audible above the floor.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

PRESET_HIGH_DB = -12.0
PRESET_LOW_DB = -40.0
MAX_DB = 0.0  # frame RMS cannot reach 0 dBFS in practice (a full-scale sine reads -3 dB)
MIN_DB = -80.0  # the intensity floor (train.control.INTENSITY_FLOOR_DB)
PULSES = 4  # hits per clip in the `pulse` preset

Points = list[tuple[float, float]]


class CurveError(ValueError):
    """A malformed target curve; the message says what is wrong and where."""


def preset_points(name: str, duration: float) -> Points:
    """The (seconds, dB) points of a named preset for a clip of `duration` seconds."""
    hi, lo, D = PRESET_HIGH_DB, PRESET_LOW_DB, duration
    if name == "fade-in":
        return [(0.0, lo), (D, hi)]
    if name == "decay":
        return [(0.0, hi), (D, lo)]
    if name == "swell":
        return [(0.0, lo), (D / 2, hi), (D, lo)]
    if name == "pulse":  # PULSES hits, each decaying linearly in dB to lo just before the next one's onset
        period = D / PULSES
        pts: Points = []
        for k in range(PULSES):
            pts += [(k * period, hi), ((k + 1) * period - 1e-6 * period, lo)]
        return pts
    raise CurveError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")


PRESETS = ("fade-in", "swell", "decay", "pulse")


def parse_points(text: str, kind: str, where: str) -> Points:
    """(seconds, dB) points from the text of a CSV ('csv') or JSON ('json') file; `where` names it in errors.

    CSV: two numeric columns per row; a header row and lines starting with '#' are skipped. JSON: a list of
    [seconds, dB] pairs, or {"points": [[seconds, dB], ...]}, or {"seconds": [...], "db": [...]}.
    """
    rows: list[tuple[object, object]] = []
    if kind == "csv":
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        for i, rec in enumerate(csv.reader(io.StringIO("\n".join(lines)))):
            if len(rec) != 2:
                raise CurveError(f"{where}: row {i + 1} has {len(rec)} columns, expected 2 (seconds, dB)")
            if i == 0 and not _is_number(rec[0]):
                continue  # header
            rows.append((rec[0], rec[1]))
    elif kind == "json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise CurveError(f"{where}: not valid JSON ({e})") from None
        if isinstance(doc, dict) and "points" in doc:
            doc = doc["points"]
        elif isinstance(doc, dict) and {"seconds", "db"} <= set(doc):
            if not isinstance(doc["seconds"], list) or not isinstance(doc["db"], list):
                raise CurveError(f"{where}: 'seconds' and 'db' must be lists")
            if len(doc["seconds"]) != len(doc["db"]):
                raise CurveError(f"{where}: 'seconds' has {len(doc['seconds'])} values, 'db' {len(doc['db'])}")
            doc = list(zip(doc["seconds"], doc["db"], strict=True))
        if not isinstance(doc, list):
            raise CurveError(
                f"{where}: expected a list of [seconds, dB] pairs, {{'points': ...}} or {{'seconds', 'db'}}"
            )
        for i, p in enumerate(doc):
            if not isinstance(p, list | tuple) or len(p) != 2:
                raise CurveError(f"{where}: point {i + 1} is {p!r}, expected [seconds, dB]")
            rows.append((p[0], p[1]))
    else:
        raise CurveError(f"{where}: curve files are .csv or .json")
    pts: Points = []
    for i, (t, db) in enumerate(rows):
        if not (_is_number(t) and _is_number(db)):
            raise CurveError(f"{where}: point {i + 1} ({t!r}, {db!r}) is not two numbers")
        pts.append((float(t), float(db)))  # type: ignore[arg-type]
    return pts


def check_points(pts: Points, duration: float, where: str) -> Points:
    """Validate a curve against a clip of `duration` seconds (the reasons are the error messages)."""
    if not pts:
        raise CurveError(f"{where}: the curve has no points")
    for i, (t, db) in enumerate(pts):
        if not (math.isfinite(t) and math.isfinite(db)):
            raise CurveError(f"{where}: point {i + 1} is not finite ({t}, {db})")
        if t < 0:
            raise CurveError(f"{where}: point {i + 1} has a negative time {t} s")
        if not MIN_DB <= db <= MAX_DB:
            raise CurveError(
                f"{where}: point {i + 1} asks for {db} dB; levels are frame RMS in dBFS, in [{MIN_DB:g}, {MAX_DB:g}]"
            )
        if i and t <= pts[i - 1][0]:
            raise CurveError(f"{where}: times must increase strictly (point {i + 1}: {t} s after {pts[i - 1][0]} s)")
    if pts[0][0] >= duration:
        raise CurveError(f"{where}: the curve starts at {pts[0][0]} s, after the clip's end ({duration:.3f} s)")
    return pts


def load_curve(spec: str, duration: float) -> tuple[Points, str]:
    """A preset name or a .csv/.json path -> (validated points, description)."""
    if spec in PRESETS:
        return preset_points(spec, duration), f"preset {spec}"
    path = Path(spec)
    if not path.is_file():
        raise CurveError(f"--intensity {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("csv", "json"):
        raise CurveError(f"{path}: curve files are .csv or .json, not {path.suffix or 'without a suffix'}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CurveError(f"{path}: cannot read it ({e})") from None
    return check_points(parse_points(text, kind, str(path)), duration, str(path)), str(path)


def resample(pts: Points, frames: int, frame_rate: float) -> np.ndarray:
    """Curve -> target level of each frame [frames] dB (frame j at (j + ½)/frame_rate seconds)."""
    t = (np.arange(frames) + 0.5) / frame_rate
    times, dbs = zip(*pts, strict=True)
    return np.interp(t, np.asarray(times), np.asarray(dbs)).astype(np.float32)


def _is_number(v: object) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return True
    try:
        float(str(v).strip())
    except ValueError:
        return False
    return True
