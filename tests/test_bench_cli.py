"""`soundctm-rt bench --device cpu` on the tiny bundle: the report has the documented shape."""

import json
import subprocess
import sys


def test_bench_json_and_plot(tiny_bundle, tmp_path):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "soundctm_rt",
            "bench",
            "--device",
            "cpu",
            "--bundle",
            str(tiny_bundle),
            "--backend",
            "all",
            "--steps",
            "1,2,3",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--profile",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert {"machine", "bundle", "peak_gflops", "results", "torch_eager"} <= set(rep)
    assert rep["peak_gflops"] > 0
    keys = {"backend", "steps", "rtf_p50", "rtf_p95", "rtf_p99", "stages_ms", "audio_seconds"}
    cells = {(row["backend"], row["steps"], row["path"]) for row in rep["results"]}
    for backend in ("onnxruntime", "openvino"):
        assert {(backend, 1, "fused"), (backend, 2, "fused"), (backend, 3, "host")} <= cells
    for row in rep["results"] + rep["torch_eager"]:
        assert keys <= set(row) and row["rtf_p50"] > 0
    assert [row["backend"] for row in rep["torch_eager"]] == ["torch"] * 3
    host = [row for row in rep["results"] if row["path"] == "host"]
    assert all({"text", "step", "decode"} <= set(row["stages_ms"]) for row in host)
    assert png.stat().st_size > 1000
    prof = rep["student_step_profile"]
    assert "MatMul" in prof["op_share"] and abs(sum(prof["op_share"].values()) - 1.0) < 0.01
    assert "student_step profile" in r.stdout
    assert "RTF p50" in r.stdout


def test_bench_bad_steps(tiny_bundle):
    r = subprocess.run(
        [sys.executable, "-m", "soundctm_rt", "bench", "--bundle", str(tiny_bundle), "--steps", "a"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--steps" in r.stderr
