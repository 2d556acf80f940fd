"""The model bundle: a directory (or a zip of one) with `manifest.json` and the graph files it lists.

This module is the contract between export (writer) and runtime (reader); the manifest's shape is typed in
`manifest.py`. The reader refuses a manifest it cannot use and any file whose size or sha256 differs from the
manifest, naming the file and what to do. The writer checks its manifest against the same schema.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .manifest import BACKENDS, SCHEMA, SCHEMA_VERSION, BundleError, GraphSpec, Manifest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
__all__ = [  # the schema's names are re-exported: callers import the bundle contract from here
    "BACKENDS",
    "MANIFEST",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Bundle",
    "BundleError",
    "GraphSpec",
    "Manifest",
    "bundle_id",
    "cache_root",
    "default_bundle_path",
    "file_table",
    "resolve_bundle",
    "sha256_file",
    "write_manifest",
]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path, rel_paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{relative path: {"sha256", "bytes"}} for the manifest."""
    return {p: {"sha256": sha256_file(root / p), "bytes": (root / p).stat().st_size} for p in sorted(set(rel_paths))}


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json, filling in the schema and the sha256 of every file it references."""
    manifest = dict(manifest)
    manifest["schema"] = SCHEMA
    manifest["schema_version"] = SCHEMA_VERSION
    refs: list[str] = []
    for g in manifest["graphs"].values():
        refs += list(g["files"].values()) + list(g.get("weights", {}).values())
    refs += manifest.get("extra_files", [])
    manifest["files"] = file_table(root, refs)
    path = root / MANIFEST
    Manifest.from_dict(manifest, f"the manifest written to {path}")  # the reader must accept what export writes
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


class Bundle:
    """A validated bundle on disk. `Bundle.open(path)` checks the manifest's shape and every file's sha256.

    `manifest` is the raw JSON (every section, for display); `spec` the typed view of what the runtime reads.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.spec = Manifest.from_dict(manifest, str(root / MANIFEST))
        self.graphs: dict[str, GraphSpec] = self.spec.graphs

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = True) -> Bundle:
        root = Path(path)
        if not root.exists():
            raise BundleError(f"bundle {root} does not exist: pass --bundle DIR (made by `soundctm-rt export`)")
        if root.is_file():
            if not zipfile.is_zipfile(root):
                raise BundleError(f"bundle {root} is neither a directory nor a zip file")
            root = _unzip_cached(root)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{mpath} is missing: {root} is not a bundle (re-export it with `soundctm-rt export`)")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON ({e}): the bundle is corrupt, re-export it") from e
        except OSError as e:
            raise BundleError(f"{mpath} cannot be read ({e.strerror}): check its permissions") from e
        bundle = cls(root, manifest)
        bundle.check_files(verify_hash=verify)
        return bundle

    def check_files(self, verify_hash: bool = True) -> None:
        """Every listed file exists with the recorded size and (optionally) sha256. The manifest's schema makes
        every file a graph, the tokenizer or the known prompts name part of this list."""
        for rel, meta in self.spec.files.items():
            p = self.root / rel
            if not p.is_file():
                raise BundleError(
                    f"bundle file {rel} is missing from {self.root}: copy the whole bundle directory or re-export it"
                )
            size = p.stat().st_size
            if size != meta.bytes:
                raise BundleError(
                    f"bundle file {rel} is {size} bytes, the manifest says {meta.bytes}: it is "
                    "truncated or modified; re-copy or re-export the bundle"
                )
            if verify_hash and sha256_file(p) != meta.sha256:
                raise BundleError(
                    f"bundle file {rel} does not match its sha256 in the manifest: it is corrupt or "
                    "modified; re-copy or re-export the bundle"
                )

    # Convenience views on the manifest --------------------------------------------------------------
    def path(self, rel: str) -> Path:
        return self.root / rel

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise BundleError(f"bundle {self.root} has no graph '{name}' (it has {sorted(self.graphs)})")
        return self.graphs[name]

    @property
    def fused_steps(self) -> list[int]:
        return list(self.spec.fused_steps)

    @property
    def sample_rate(self) -> int:
        return self.spec.audio.sample_rate

    @property
    def name(self) -> str:
        return self.spec.model_name or self.root.name


def cache_root() -> Path:
    """Where soundctm-rt keeps what it derives from bundles (unzipped bundles, OpenVINO's compiled graphs):
    $SOUNDCTM_RT_CACHE, else ~/.cache/soundctm-rt. Never inside a bundle: the shipped one lives in site-packages."""
    return Path(os.environ.get("SOUNDCTM_RT_CACHE", Path.home() / ".cache" / "soundctm-rt"))


def bundle_id(b: Bundle) -> str:
    """A short key of a bundle's content (its manifest holds the sha256 of every file)."""
    return hashlib.sha256(json.dumps(b.manifest, sort_keys=True).encode()).hexdigest()[:16]


def _unzip_cached(zpath: Path) -> Path:
    """Extract a zipped bundle once into a cache folder keyed by the zip's sha256."""
    digest = sha256_file(zpath)[:16]
    cache = cache_root() / "bundles" / digest
    if (cache / MANIFEST).is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent))
    with zipfile.ZipFile(zpath) as z:
        for info in z.infolist():
            target = (tmp / info.filename).resolve()
            if not str(target).startswith(str(tmp.resolve())):
                raise BundleError(f"{zpath} holds a path outside the bundle ({info.filename}); refusing it")
        z.extractall(tmp)
    inner = [p.parent for p in tmp.rglob(MANIFEST)]
    if not inner:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"{zpath} holds no {MANIFEST}: it is not a zipped bundle")
    os.replace(inner[0], cache) if inner[0] != tmp else os.replace(tmp, cache)
    shutil.rmtree(tmp, ignore_errors=True)
    return cache


def default_bundle_path() -> Path | None:
    """The bundle shipped inside the package, if this install has one."""
    p = Path(__file__).resolve().parent / "default_bundle"
    return p if (p / MANIFEST).is_file() else None


def resolve_bundle(path: str | os.PathLike[str] | None) -> Path:
    """An explicit bundle path, else the shipped default model, else a clear error."""
    if path is not None:
        return Path(path)
    default = default_bundle_path()
    if default is None:
        raise BundleError(
            "no bundle given and this install ships no default model: pass --bundle DIR, or make one with "
            "`soundctm-rt export --init random --config tiny -o DIR` (random weights) or from a trained checkpoint"
        )
    return default
