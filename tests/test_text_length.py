"""The text encoder's dynamic token length: a short prompt runs at the smallest length bucket that holds it, with
the same conditioning (real tokens and pooled vector) as at the full length; bundles with a fixed length still
run at it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from soundctm_rt.engine import Engine
from soundctm_rt.text import bucket_for, length_buckets

PROMPTS = ["rain", "a dog barking twice in a small room", "Roland TR-808 snare drum with a long gated reverb tail"]


def test_buckets():
    assert length_buckets(32) == [8, 16, 32]
    assert length_buckets(16) == [8, 16]
    assert length_buckets(77) == [8, 16, 32, 64, 77]
    assert length_buckets(8) == [8] and length_buckets(5) == [5]
    assert [bucket_for(n, [8, 16, 32]) for n in (1, 8, 9, 16, 17, 32, 40)] == [8, 8, 16, 16, 32, 32, 32]


def test_manifest_declares_a_dynamic_length(tiny_bundle):
    spec = json.loads((tiny_bundle / "manifest.json").read_text())["graphs"]["text_encoder"]
    assert [i["shape"] for i in spec["inputs"]] == [["batch", "length"], ["batch", "length"]]
    assert spec["outputs"][0]["shape"][:2] == ["batch", "length"]
    max_length = json.loads((tiny_bundle / "manifest.json").read_text())["text"]["max_length"]
    assert spec["attrs"]["length_buckets"] == length_buckets(max_length)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_bucketed_conditioning_equals_full_length(tiny_bundle, backend):
    eng = Engine(tiny_bundle, backend=backend, warmup=False)
    full = Engine(tiny_bundle, backend=backend, warmup=False)
    full._text_buckets = []  # always max_length, as a bundle with a fixed length runs
    lengths = set()
    for prompt in PROMPTS:
        ids, mask = eng.tokenizer([prompt])
        L = bucket_for(int(mask.sum()), eng._text_buckets)
        lengths.add(L)
        a, b = eng.encode_prompt(prompt), full.encode_prompt(prompt)
        assert a.tokens.shape == b.tokens.shape == (1, ids.shape[1], b.tokens.shape[2])
        np.testing.assert_array_equal(a.token_mask, b.token_mask)
        real = a.token_mask[0] > 0
        np.testing.assert_allclose(a.tokens[0, real], b.tokens[0, real], atol=1e-5)
        assert not a.tokens[0, L:].any()  # beyond the bucket: zeros, masked out of the student's cross-attention
        np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-6)
        x, _ = eng.generate(prompt, seed=3, steps=2)
        y, _ = full.generate(prompt, seed=3, steps=2)
        np.testing.assert_allclose(x, y, atol=1e-4)
    assert len(lengths) > 1  # the prompts ran at different lengths


def test_fixed_length_bundle_runs_at_max_length(tiny_bundle, tmp_path):
    """A bundle whose manifest declares a fixed length (exported before the length was dynamic) gets full-length
    inputs, as its graph requires."""
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    m = json.loads((old / "manifest.json").read_text())
    spec = m["graphs"]["text_encoder"]
    L = m["text"]["max_length"]
    for io in spec["inputs"] + spec["outputs"][:1]:
        io["shape"][1] = L
    spec["attrs"].pop("length_buckets")
    (old / "manifest.json").write_text(json.dumps(m))
    eng = Engine(old, warmup=False)
    assert eng._text_buckets == []
    seen = []
    sess = eng.session("text_encoder")
    run = sess.run
    sess.run = lambda feeds: seen.append(feeds["input_ids"].shape) or run(feeds)  # type: ignore[method-assign]
    eng.encode_prompt("rain")
    assert seen == [(1, L)]
