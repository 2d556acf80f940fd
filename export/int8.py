"""Optional INT8 variants of the student step and the fused γ-sampling graphs.

Never the default: each variant is a separate file, listed in the manifest's `int8` section with its measured
cost against the float32 graph and its speed ratio on the exporting machine (whose CPU features are recorded,
since the gain depends on them):
- onnxruntime: dynamic quantisation (`quantize_dynamic`): int8 weights, activations quantised per call, integer
  matrix multiplies. Weights are signed 7-bit (`reduce_range`): CPUs without VNNI multiply u8 x s8 pairs into
  int16 sums that saturate at full 8-bit range (measured on the cpu architecture's student step, AVX2: SNR
  against float32 36 dB at 8 bits, 49 dB at 7 bits, same speed);
- OpenVINO: weight-only INT8 (per-output-channel symmetric int8 weights behind a DequantizeLinear, the form
  NNCF's weight compression writes): OpenVINO keeps the weights int8 and decompresses them in its kernels, and on
  CPUs with VNNI or AMX it also quantises activations on the fly.
Both variants' weights go into one shared file per backend (the fused graphs repeat the student's weights).
Only the student is quantised: a fused graph's decoder (VAE bundles) stays float32, and so does the text encoder
(measured on the shipped all-MiniLM-L6-v2 encoder: onnxruntime's dynamic INT8 gives a pooled cosine of 0.69
against float32, far under the 0.99 the compact encoder is held to; it runs once per prompt, then is cached).

Quality, all against the float32 graphs of the same bundle on the same inputs:
- per graph: SNR of every output on the export's parity inputs;
- end to end (`measure_takes`): for fixed prompts and seeds through the Engine, the SNR of the sampled latent
  (host path over `student_step`) and, per fused step count, of the waveform, and the log-mel distance (dB)
  between the float32 and INT8 takes. The embedding metrics (FD, KID, probe adherence) need the evaluation
  data and are measured separately (`soundctm-rt bench int8-quality`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..backends import BackendOptions, open_file_session
from .onnx_io import SharedWeights
from .parity import snr_db

log = logging.getLogger(__name__)

MIN_WEIGHT_ELEMENTS = 4096  # smaller matrices (and every bias) stay float32
QUALITY_PROMPTS = ["Roland TR-808 snare drum", "a dog barking", "rain falling on a roof", "LinnDrum clap"]
QUALITY_SEEDS = (0, 1)


def int8_graphs(names: list[str]) -> list[str]:
    """The graphs that get an INT8 variant: the student's."""
    return [n for n in names if n == "student_step" or n.startswith("fused_")]


def decoder_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes downstream of a fused graph's `latent` output (its fused decoder), which stay float32.
    Names every unnamed node first (the quantiser excludes nodes by name)."""
    for k, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"node_{k}"
    if not {"latent", "audio"} <= {o.name for o in model.graph.output}:
        return set()
    reached = {"latent"}
    names = set()
    for node in model.graph.node:  # topological order
        if any(i in reached for i in node.input):
            reached.update(node.output)
            names.add(node.name)
    return names


def float32_model(path: Path) -> onnx.ModelProto:
    """The model at `path` with its weights loaded and float16-stored initializers folded back to float32
    (compact bundles store them behind a Cast, which the quantisers do not look through)."""
    model = onnx.load(str(path), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    casts = [
        n
        for n in model.graph.node
        if n.op_type == "Cast"
        and n.input[0] in inits
        and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT16
        and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)
    ]
    for node in casts:
        arr = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        model.graph.node.remove(node)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    # value_info of initializers can be stale (the compact int8 word-embedding table keeps a float entry), and the
    # quantiser's strict shape inference refuses it; initializers carry their own types
    names = {i.name for i in keep}
    stale = [vi for vi in model.graph.value_info if vi.name in names]
    for vi in stale:
        model.graph.value_info.remove(vi)
    return model


def quantise_dynamic(src: onnx.ModelProto, dst: Path) -> None:
    """onnxruntime's dynamic quantisation of every MatMul/Gemm with a constant weight (signed 7-bit weights),
    the decoder's nodes excepted."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exclude = decoder_nodes(src)
    tmp = dst.with_suffix(".f32.onnx")
    onnx.save_model(src, str(tmp))
    try:
        quantize_dynamic(
            str(tmp),
            str(dst),
            weight_type=QuantType.QInt8,
            reduce_range=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=sorted(exclude),
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        tmp.unlink(missing_ok=True)


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Values computed from initializers alone (the runtimes fold them at load)."""
    const = {i.name for i in graph.initializer}
    for node in graph.node:  # topological order
        if all(i in const or not i for i in node.input):
            const.update(node.output)
    return const


def compress_weights(model: onnx.ModelProto) -> int:
    """Weight-only INT8 in place: each constant MatMul/Gemm weight [K, N] (>= MIN_WEIGHT_ELEMENTS) becomes
    int8 with a float32 scale per output channel behind a DequantizeLinear. Returns how many weights.

    A weight that also meets a constant input (a fused graph's time embedding of its fixed sigmas) stays float32:
    the runtimes fold that product at load, and OpenVINO's folding fails on a DequantizeLinear inside it.
    """
    inits = {i.name: i for i in model.graph.initializer}
    const = _constants(model.graph)
    decoder = decoder_nodes(model)
    folded = {
        n.input[1]
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and (n.input[0] in const or n.name in decoder)
    }
    done: dict[str, str] = {}
    new_nodes = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in inits or node.input[1] in folded:
            continue
        name = node.input[1]
        if name not in done:
            w = numpy_helper.to_array(inits[name])
            if w.ndim != 2 or w.size < MIN_WEIGHT_ELEMENTS or w.dtype != np.float32:
                continue
            trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            axis = 0 if trans_b else 1  # the output-channel axis of the stored matrix
            scale = (np.abs(w).max(axis=1 - axis) / 127.0).astype(np.float32)
            scale[scale == 0] = 1.0
            q = np.clip(np.round(w / np.expand_dims(scale, 1 - axis)), -127, 127).astype(np.int8)
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(q, f"{name}__int8"),
                    numpy_helper.from_array(scale, f"{name}__scale"),
                    numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}__zero"),
                ]
            )
            done[name] = f"{name}__dq"
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{name}__int8", f"{name}__scale", f"{name}__zero"],
                    [done[name]],
                    name=f"{name}__dequantize",
                    axis=axis,
                )
            )
        node.input[1] = done[name]
    for i, node in enumerate(new_nodes):
        model.graph.node.insert(i, node)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return len(new_nodes)


def _time_pair(ref: Any, got: Any, feeds: dict[str, np.ndarray], rounds: int = 5, per: int = 2) -> dict[str, Any]:
    """Median ms of each session over interleaved rounds (after one warm-up call each), and their ratio."""
    ref.run(feeds)
    got.run(feeds)
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        for times, sess in ((a, ref), (b, got)):
            for _ in range(per):
                t0 = time.perf_counter()
                sess.run(feeds)
                times.append(1e3 * (time.perf_counter() - t0))
    fp32, int8 = float(np.median(a)), float(np.median(b))
    return {"fp32_ms": round(fp32, 3), "int8_ms": round(int8, 3), "speedup": round(fp32 / int8, 3)}


def _quality(outputs: list[str], ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, Any]:
    return {f"{o}_snr_db": round(snr_db(r, g), 2) for o, r, g in zip(outputs, ref, got, strict=True)}


def export_int8(
    out: Path, graphs: list[Any], manifest_graphs: dict[str, Any], openvino: bool = True, threads: int | None = None
) -> dict[str, Any]:
    """Write the INT8 variants of the listed graphs; returns the manifest's `int8` section.

    graphs: the export's graph records (name, inputs, outputs, args: the parity inputs).
    """
    result: dict[str, Any] = {}
    ort_w = SharedWeights(out / "onnx" / "weights.int8.bin")
    ov_w = SharedWeights(out / "onnx" / "weights.int8-ov.bin") if openvino else None
    opts = {b: BackendOptions(backend=b, threads=threads) for b in ("onnxruntime", "openvino")}
    try:
        for gr in graphs:
            if gr.name not in int8_graphs([gr.name]):
                continue
            src_path = out / manifest_graphs[gr.name]["files"]["onnxruntime"]
            feeds = {n: a.numpy() for n, a in zip(gr.inputs, gr.args, strict=True)}
            batch = next((feeds[n].shape[ax] for n, ax in gr.dynamic_batch.items()), None)  # static, as the Engine
            model = float32_model(src_path)
            entry: dict[str, Any] = {"files": {}, "weights": {}, "quality": {}, "speed": {}}
            dst = out / "onnx" / f"{gr.name}.int8.onnx"
            quantise_dynamic(model, dst)
            ort_w.externalize(dst)
            ort_w.f.flush()
            entry["files"]["onnxruntime"] = f"onnx/{gr.name}.int8.onnx"
            entry["weights"]["onnxruntime"] = "onnx/weights.int8.bin"
            entry["method"] = {
                "onnxruntime": "dynamic quantisation: int8 weights (signed 7-bit, per tensor), activations per call"
            }
            if ov_w is not None:
                ov_model = float32_model(src_path)
                n = compress_weights(ov_model)
                ov_dst = out / "onnx" / f"{gr.name}.int8-ov.onnx"
                onnx.save_model(ov_model, str(ov_dst))
                ov_w.externalize(ov_dst)
                ov_w.f.flush()
                entry["files"]["openvino"] = f"onnx/{gr.name}.int8-ov.onnx"
                entry["weights"]["openvino"] = "onnx/weights.int8-ov.bin"
                entry["method"]["openvino"] = f"weight-only int8 ({n} weights, per output channel), float activations"
            for backend, rel in entry["files"].items():
                ref_sess = open_file_session(src_path, opts[backend], batch=batch)
                sess = open_file_session(out / rel, opts[backend], batch=batch)
                ref = ref_sess.run(feeds)
                got = sess.run(feeds)
                entry["quality"][backend] = _quality(gr.outputs, ref, got)
                entry["speed"][backend] = _time_pair(ref_sess, sess, feeds)
                del ref_sess, sess
            entry["file"] = entry["files"]["onnxruntime"]  # read by runtimes before per-backend files
            entry["quality"] = {**entry["quality"]["onnxruntime"], "by_backend": entry["quality"]}
            result[gr.name] = entry
            log.info("int8 %s: %s; speed %s", gr.name, entry["quality"], entry["speed"])
    finally:
        ort_w.close()
        if ov_w is not None:
            ov_w.close()
    return result


def int8_files(section: dict[str, Any]) -> list[str]:
    """Every file the `int8` section names (for the manifest's file table)."""
    files: set[str] = set()
    for v in section.values():
        files |= set(v.get("files", {}).values()) | set(v.get("weights", {}).values())
        if "file" in v:
            files.add(v["file"])
    return sorted(files)


def measure_takes(bundle_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """End-to-end cost of the INT8 variants against float32 on fixed prompts and seeds (module docstring)."""
    from ..bundle import Bundle
    from ..engine import Engine

    backends = ["onnxruntime"]
    b = Bundle.open(bundle_dir)
    if any("openvino" in v.files for v in b.spec.int8.values()):
        backends.append("openvino")
    result: dict[str, Any] = {"prompts": QUALITY_PROMPTS, "seeds": list(QUALITY_SEEDS), "backends": {}}
    for backend in backends:
        fp = Engine(b, backend=backend, threads=threads, warmup=False)
        q = Engine(b, backend=backend, threads=threads, warmup=False, int8=True)
        latent_snr, rows = [], {}
        for prompt in QUALITY_PROMPTS:
            for seed in QUALITY_SEEDS:
                latent_snr.append(
                    snr_db(fp.sample_latent(prompt, seed, steps=1), q.sample_latent(prompt, seed, steps=1))
                )
        for steps in b.fused_steps:
            wave_snr, mel_db = [], []
            for prompt in QUALITY_PROMPTS:
                for seed in QUALITY_SEEDS:
                    a, _ = fp.generate(prompt, seed=seed, steps=steps)
                    c, _ = q.generate(prompt, seed=seed, steps=steps)
                    wave_snr.append(snr_db(a, c))
                    mel_db.append(log_mel_distance_db(a, c, b.sample_rate))
            rows[f"fused_{steps}"] = {
                "waveform_snr_db_median": round(float(np.median(wave_snr)), 2),
                "waveform_snr_db_min": round(float(np.min(wave_snr)), 2),
                "log_mel_l1_db_mean": round(float(np.mean(mel_db)), 3),
            }
        result["backends"][backend] = {
            "latent_snr_db_median": round(float(np.median(latent_snr)), 2),
            "latent_snr_db_min": round(float(np.min(latent_snr)), 2),
            "takes": rows,
        }
    return result


def log_mel_distance_db(a: np.ndarray, b: np.ndarray, sample_rate: int) -> float:
    """Mean absolute difference of two waveforms' 128-bin log-mel spectrograms, in dB (20·log10 magnitude)."""
    from ..melcode import MelCodeConfig, log_mel

    cfg = MelCodeConfig(sample_rate=sample_rate, f_max=sample_rate / 2)
    n = min(len(a), len(b))
    la = log_mel(a[None, :n].astype(np.float32), cfg)
    lb = log_mel(b[None, :n].astype(np.float32), cfg)
    return float(np.mean(np.abs(la - lb)) * 20.0 / math.log(10.0))  # log of magnitudes: 20·log10
