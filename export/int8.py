"""Optional INT8 variants (onnxruntime dynamic quantisation) of the text encoder and the student step.

Never the default: each variant is a separate file, listed in the manifest with its measured quality loss
against the fp32 graph on the export's parity inputs (SNR, and for the text encoder the cosine similarity of
the pooled vectors, which must stay >= 0.99).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import BackendOptions, open_file_session
from .parity import snr_db

log = logging.getLogger(__name__)

INT8_GRAPHS = ("text_encoder", "student_step")
MIN_POOLED_COSINE = 0.99


def export_int8(out: Path, graphs: list[Any], manifest_graphs: dict[str, Any]) -> dict[str, Any]:
    """Quantise the listed graphs' weights to INT8; returns the manifest's `int8` section."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    result: dict[str, Any] = {}
    for gr in graphs:
        if gr.name not in INT8_GRAPHS:
            continue
        src = out / manifest_graphs[gr.name]["files"]["onnxruntime"]
        dst = out / "onnx" / f"{gr.name}.int8.onnx"
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        feeds = {n: a.numpy() for n, a in zip(gr.inputs, gr.args, strict=True)}
        opts = BackendOptions(backend="onnxruntime")
        ref = open_file_session(src, opts).run(feeds)
        got = open_file_session(dst, opts).run(feeds)
        quality: dict[str, Any] = {n: round(snr_db(r, g), 2) for n, r, g in zip(gr.outputs, ref, got, strict=True)}
        quality = {f"{k}_snr_db": v for k, v in quality.items()}
        if gr.name == "text_encoder":
            r, g = ref[1], got[1]
            cos = np.sum(r * g, -1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(g, axis=-1) + 1e-12)
            quality["pooled_cosine_min"] = round(float(cos.min()), 5)
            if cos.min() < MIN_POOLED_COSINE:
                log.warning("INT8 text encoder: pooled cosine %.4f < %.2f", cos.min(), MIN_POOLED_COSINE)
        result[gr.name] = {
            "file": f"onnx/{gr.name}.int8.onnx",
            "backend": "onnxruntime",
            "quality": quality,
            "bytes": dst.stat().st_size,
        }
        log.info("int8 %s: %s", gr.name, quality)
    return result
