"""One distribution: train/, export/, bench/ install only as soundctm_rt.* subpackages (wheel and editable); the
wheel carries the licence and the metadata users expect."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_subpackages_import_from_this_install():
    import soundctm_rt.bench.cpu
    import soundctm_rt.export.pipeline
    import soundctm_rt.train.models.config

    assert soundctm_rt.train.models.config.available_configs()
    assert soundctm_rt.export.pipeline.ExportOptions().steps == (1, 2, 4, 8)
    assert callable(soundctm_rt.bench.cpu.run_cpu_bench)


def test_licence_and_metadata_are_declared():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert not any("License ::" in c for c in project["classifiers"])  # PEP 639: the SPDX string says it
    deps = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0]: d for d in project["dependencies"]}
    for private_api_user in ("sounddevice", "numba"):  # the audio callback uses their private APIs
        assert "<" in deps[private_api_user], deps[private_api_user]
    assert not any(d.startswith("hypothesis") for d in project["optional-dependencies"]["dev"])


def test_large_file_hook_admits_only_the_shipped_model():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    hooks = {h["id"]: h for repo in config["repos"] for h in repo["hooks"]}
    assert {"ruff-check", "ruff-format", "mypy", "check-added-large-files"} <= set(hooks)
    exclude = re.compile(hooks["check-added-large-files"]["exclude"])
    admitted = ["soundctm_rt/default_bundle/onnx/weights.bin", "models/student_model.safetensors"]
    refused = ["models/student_model.bin", "models/old/student.safetensors", "docs/figure.png", "bundles/x/w.bin"]
    assert all(exclude.search(p) for p in admitted) and not any(exclude.search(p) for p in refused)


@pytest.mark.slow
def test_wheel_holds_only_the_namespaced_packages(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("soundctm_rt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"soundctm_rt", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    dist_info = f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names  # PEP 639: the licence file travels in the wheel
    assert zipfile.ZipFile(wheel).read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata and "Classifier: Typing :: Typed" in metadata
    assert "hypothesis" not in metadata
    for needed in (
        "soundctm_rt/train/configs/tiny.toml",
        "soundctm_rt/export/pipeline.py",
        "soundctm_rt/bench/cpu.py",
        "soundctm_rt/engine.py",
        "soundctm_rt/default_bundle/manifest.json",  # the shipped model travels in the wheel
        "soundctm_rt/default_bundle/onnx/weights.bin",
        "soundctm_rt/default_bundle/LICENSES/all-MiniLM-L6-v2.txt",
    ):
        assert needed in names
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (target / "train").exists() and not (target / "export").exists()
    code = (
        "import soundctm_rt, soundctm_rt.train.models.config as c; assert soundctm_rt.__file__.startswith("
        f"{str(target)!r}); print(c.load_model_config('tiny').name)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert r.returncode == 0 and r.stdout.strip() == "tiny", r.stderr[-2000:]


def test_ci_runs_the_readme_test_command():
    """The README's second command ends in the test command, and .ci/run calls exactly that command."""
    repo = Path(__file__).resolve().parent.parent
    blocks = re.findall(r"```bash\n(.*?)\n```", (repo / "README.md").read_text(), re.S)
    readme_cmd = blocks[1].strip().split("&&")[-1].strip()
    assert readme_cmd.startswith("python -m pytest"), readme_cmd
    ci = (repo / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(readme_cmd)} \|\| rc=\$\?$", ci, re.M), (readme_cmd, "not in .ci/run")
