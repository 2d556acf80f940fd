"""One distribution: train/, export/, bench/ install only as soundctm_rt.* subpackages (wheel and editable)."""

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
