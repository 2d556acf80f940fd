"""Rebuild the bundle's student in torch from its own ONNX weights (for the torch-eager comparison)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..bundle import Bundle
from ..export.wrappers import StudentStepExport
from ..train.models.config import ModelConfig
from ..train.models.denoiser import CTMDenoiser
from ..train.models.dit import DiT


def load_student_from_bundle(bundle: Bundle) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """(StudentStepExport with the bundle's weights, batch-1 example inputs)."""
    spec = bundle.graph("student_step")
    pmap = spec.attrs.get("torch_params")
    if not pmap or pmap.get("missing"):
        raise ValueError(f"the bundle does not map every student parameter ({(pmap or {}).get('missing')})")
    cfg = ModelConfig.from_dict(bundle.manifest["model"]["config"])
    text_dim = int(bundle.manifest["text"]["hidden"])
    module = StudentStepExport(CTMDenoiser(DiT(cfg.dit, cfg.latent_channels, text_dim), cfg.edm.sigma_data))
    model = onnx.load(str(bundle.path(spec.files["onnxruntime"])), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    want = module.state_dict()
    state: dict[str, Any] = {}
    for key, (name, transposed) in pmap["params"].items():
        a = numpy_helper.to_array(inits[name]).astype(np.float32)  # fp16 storage in compact bundles
        a = np.ascontiguousarray(a.T if transposed else a).copy()
        # matched by content: a folded copy may carry extra unit dims ([1, n] for [n])
        state[key] = torch.from_numpy(a).reshape(want[key].shape)
    module.load_state_dict(state)
    module.eval()
    C, T, L = cfg.latent_channels, cfg.dit.latent_frames, cfg.text.max_length
    g = torch.Generator().manual_seed(0)
    feeds = (
        torch.randn(1, C, T, generator=g) * 10,
        torch.tensor([10.0]),
        torch.tensor([1.0]),
        torch.randn(1, L, text_dim, generator=g),
        torch.ones(1, L),
        torch.randn(1, text_dim, generator=g),
        torch.tensor([3.5]),
    )
    return module, feeds
