"""Shared fixtures: one tiny random bundle per test session (exported through the real pipeline)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# unzipped bundles and OpenVINO's compiled graphs go to a throwaway folder, not the user's ~/.cache
os.environ.setdefault("SOUNDCTM_RT_CACHE", tempfile.mkdtemp(prefix="soundctm-rt-test-cache-"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow", action="store_true", help="also run the tests marked slow (the README's test command and CI do)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow are skipped unless --slow, or unless a -m expression chooses by marks itself: a local
    `python -m pytest` stays quick, and the README's command (`python -m pytest --slow`, CI's) runs everything."""
    if config.getoption("--slow") or config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (CI and the README's test command do)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_source():
    """The tiny architecture, randomly initialised (seed 0), as a ModelSource (torch)."""
    from soundctm_rt.train.checkpoint import init_random
    from soundctm_rt.train.models.config import load_model_config

    return init_random(load_model_config("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_source) -> Path:
    """A bundle of the tiny random model with fused graphs for 1, 2 and 4 steps, ONNX and OpenVINO."""
    from soundctm_rt.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return export_bundle(tiny_source, out, ExportOptions(steps=(1, 2, 4)))


@pytest.fixture(scope="session")
def tiny_engine(tiny_bundle):
    from soundctm_rt.engine import Engine

    return Engine(tiny_bundle, backend="onnxruntime")
