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
            "--cold-runs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert {"machine", "bundle", "peak_gflops", "results", "torch_eager"} <= set(rep)
    assert rep["peak_gflops"] > 0
    # sampled at the start, before each backend and at the end; the reference is the best sample
    assert len(rep["peak_samples_gflops"]) == 4 and rep["peak_gflops"] == max(rep["peak_samples_gflops"])
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
    for backend in ("onnxruntime", "openvino"):  # per operator type on both backends
        prof = rep["student_step_profile"][backend]
        assert prof["backend"] == backend and abs(sum(prof["op_share"].values()) - 1.0) < 0.01
        assert sum(prof["nodes_per_call"].values()) > 0
    assert "MultiHeadAttention" in rep["student_step_profile"]["onnxruntime"]["op_share"]  # the fused graph
    assert r.stdout.count("student_step profile") == 2
    assert "RTF p50" in r.stdout
    # variations: the same 16 takes one after another and in batches of 1, 4 and 16, per backend
    var = rep["variations"]
    for backend in ("onnxruntime", "openvino"):
        rows = [v for v in var if v["backend"] == backend]
        assert [(v["mode"], v["batch"]) for v in rows] == [
            ("sequential", None),
            ("batch", 1),
            ("batch", 4),
            ("batch", 16),
        ]
        assert all(v["takes"] == 16 and v["takes_per_s"] > 0 and v["sample_ms_per_take"] > 0 for v in rows)
        assert rows[0]["speedup_vs_sequential"] == 1.0
    assert "takes/s" in r.stdout
    # cold start: new generate and serve processes per backend, the take apart from the start-up
    assert [c["backend"] for c in rep["cold_start"]] == ["onnxruntime", "openvino"]
    for c in rep["cold_start"]:
        assert c["runs"] == 1 and c["serve_ready_ms"]["p50"] > 0
        assert 0 < c["generate_take_ms"]["p50"] < c["generate_wall_ms"]["p50"]
    assert "serve to listening" in r.stdout


def test_bench_speedups(tiny_bundle, tmp_path):
    """`bench speedups`: the student step with dynamic and static shapes (the bundle's graph is fused already),
    and OpenVINO's session opening with and without its model cache."""
    out = tmp_path / "s.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "soundctm_rt",
            "bench",
            "speedups",
            "--bundle",
            str(tiny_bundle),
            "--rounds",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["cpu_fusion_in_bundle"] and rep["machine"]["cpu_features"]["avx2"] in (True, False)
    for backend in ("onnxruntime", "openvino"):
        rows = rep["backends"][backend]["variants"]
        assert list(rows) == ["dynamic shapes", "static + CPU fusion (bundle)"]
        assert all(v["cpu_ms_p50"] > 0 and v["max_abs_diff"] < 1e-4 for v in rows.values())
    assert set(rep["backends"]["openvino"]["session_open_ms"]) == {"no_cache", "cache_write", "cache_read"}
    assert "x (CPU)" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "soundctm_rt", "bench", "speedups", "--bundle", str(tiny_bundle), "--backend", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--backend" in r.stderr


def test_bench_bad_variations(tiny_bundle):
    r = subprocess.run(
        [sys.executable, "-m", "soundctm_rt", "bench", "--bundle", str(tiny_bundle), "--variations", "0,4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--variations" in r.stderr


def test_bench_bad_steps(tiny_bundle):
    r = subprocess.run(
        [sys.executable, "-m", "soundctm_rt", "bench", "--bundle", str(tiny_bundle), "--steps", "a"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--steps" in r.stderr


def test_bench_latency_without_jack_is_a_failure(monkeypatch):
    """No jackd is a failure to run (exit 1, one error line), not a wrong command line (2)."""
    from typer.testing import CliRunner

    from soundctm_rt.bench import latency
    from soundctm_rt.cli import app

    monkeypatch.setattr(latency, "jack_available", lambda: "jackd not found")
    r = CliRunner().invoke(app, ["bench", "latency", "--triggers", "1"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and lines == ["error: bench needs JACK: jackd not found"], r.output
