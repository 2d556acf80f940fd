"""The torch-free Engine on real onnxruntime and OpenVINO sessions of the tiny bundle."""

import math

import numpy as np
import pytest

from soundctm_rt.engine import Engine


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def engine(request, tiny_bundle):
    return Engine(tiny_bundle, backend=request.param)


class CountingSession:
    """Wraps a real session and records the batch size of every call."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def run(self, feeds):
        self.batches.append(next(iter(feeds.values())).shape[0])
        return self.inner.run(feeds)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_host_loop_matches_fused_graph(engine, steps, gamma):
    fused, tf = engine.generate("a dog barking", seed=11, steps=steps, gamma=gamma, fused=True)
    host, th = engine.generate("a dog barking", seed=11, steps=steps, gamma=gamma, fused=False)
    assert tf.path == "fused" and th.path == "host"
    assert len(th.step_ms) == steps
    scale = float(np.abs(host).max())
    assert scale > 0
    np.testing.assert_allclose(fused, host, atol=1e-4 * scale)


def test_stream_concatenates_to_host_audio(engine):
    host, _ = engine.generate("rain on a roof", seed=5, steps=2, gamma=0.3, fused=False)
    chunks = list(engine.stream("rain on a roof", seed=5, steps=2, gamma=0.3))
    assert len(chunks) > 1
    np.testing.assert_allclose(np.concatenate(chunks), host, atol=1e-6)
    assert engine.last_timing.first_chunk_ms is not None


def test_deterministic_for_a_seed(engine):
    a, _ = engine.generate("a dog barking", seed=3)
    b, _ = engine.generate("a dog barking", seed=3)
    c, _ = engine.generate("a dog barking", seed=4)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_first_noise_does_not_depend_on_step_count():
    from soundctm_rt.sampling import draw_noise

    e1, n1 = draw_noise(7, (1, 2, 3), 1)
    e4, n4 = draw_noise(7, (1, 2, 3), 4)
    assert np.array_equal(e1, e4) and n1 == [] and len(n4) == 3


def test_nu_one_skips_the_unconditional_pass(tiny_bundle):
    eng = Engine(tiny_bundle, warmup=False)
    one = eng._sessions["student_step"] = CountingSession(eng.session("student_step"))
    two = eng._sessions["student_step[batch=2]"] = CountingSession(eng.session("student_step", 2))
    eng.generate("a dog barking", steps=3, nu=1.0)
    assert one.batches == [1, 1, 1] and two.batches == []
    eng.generate("a dog barking", steps=2, nu=2.0)
    assert one.batches == [1, 1, 1] and two.batches == [2, 2]  # the ν-guided pair runs as one static batch of 2


def test_nu_guidance_combines_both_passes(tiny_bundle):
    eng = Engine(tiny_bundle, warmup=False)
    x_c = eng.sample_latent("a dog barking", seed=1, steps=1, nu=1.0)
    x_2 = eng.sample_latent("a dog barking", seed=1, steps=1, nu=2.0)
    x_0 = eng.sample_latent("a dog barking", seed=1, steps=1, nu=0.0)  # the unconditional jump alone
    np.testing.assert_allclose(x_2, x_0 + 2.0 * (x_c - x_0), atol=1e-4 * np.abs(x_2).max())


def test_prompt_cache(tiny_bundle):
    eng = Engine(tiny_bundle, warmup=False, prompt_cache=2)
    counting = CountingSession(eng.session("text_encoder"))
    eng._sessions["text_encoder"] = counting
    for p in ["a", "b", "a", "a", "c", "b"]:
        eng.encode_prompt(p)
    # a, b encoded; a hit twice; c evicts b (a was used more recently); b encoded again
    assert len(counting.batches) == 4


def test_timing_record(engine):
    audio, t = engine.generate("a dog barking", steps=2, fused=False)
    assert t.total_ms > 0 and t.decode_ms > 0 and len(t.step_ms) == 2
    assert t.audio_seconds == pytest.approx(len(audio) / engine.sample_rate)
    assert t.rtf == pytest.approx(t.total_ms / 1e3 / t.audio_seconds)
    assert set(t.to_dict()) >= {"text_ms", "step_ms", "decode_ms", "total_ms", "rtf", "audio_seconds"}


def test_duration_trims_with_a_fade(engine):
    audio, _ = engine.generate("a dog barking", duration=0.1)
    assert len(audio) == round(0.1 * engine.sample_rate)
    assert audio[-1] == 0.0


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1000}, "steps"),
        ({"steps": 1.5}, "whole"),
        ({"steps": "x"}, "number"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": math.nan}, "finite"),
        ({"omega": math.inf}, "finite"),
        ({"omega": 50.0}, "trained"),
        ({"nu": -1.0}, "nu"),
        ({"duration": 0.0}, "duration"),
        ({"duration": 100.0}, "duration"),
        ({"duration": -1.0}, "duration"),
        ({"duration": 0.0001}, r"duration must be in \[0\.01, "),  # 4 samples: a click, as the daemon says
        ({"seed": -1}, "seed"),
        ({"seed": 2**70}, r"seed must be in \[0"),
    ],
)
def test_bad_parameters_are_refused_with_the_reason(tiny_engine, kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_engine.check_params(**kw)


def test_pd_style_floats_accepted(tiny_engine):
    p = tiny_engine.check_params(steps=2.0, seed=7.0)
    assert p["steps"] == 2 and isinstance(p["steps"], int) and p["seed"] == 7


def test_fused_request_without_graph_is_refused(tiny_engine):
    with pytest.raises(ValueError, match="no fused graph"):
        tiny_engine.generate("x", steps=3, fused=True)


LONG_PROMPT = "a heavy metal door slams shut in a long stone corridor while rain falls and thunder rolls far away"


@pytest.mark.parametrize(
    "prompt", ["", "   ", "a\x07b", "rain\nthunder", "tab\there", "del\x7f", "x" * 10_000, "\ud800"]
)
def test_engine_refuses_prompts_as_the_daemon_does(prompt):
    """One validation: the CLI's (Engine.check_prompt) and the daemon's refusals are the same words."""
    from soundctm_rt.daemon import addresses as A

    with pytest.raises(ValueError) as engine_refusal:
        Engine.check_prompt(prompt)
    with pytest.raises(A.Refusal) as daemon_refusal:
        A.parse("/soundctm/generate", (prompt,))
    assert str(engine_refusal.value) == str(daemon_refusal.value)


def test_engine_and_daemon_share_the_shortest_duration(tiny_engine):
    from soundctm_rt.daemon import addresses as A
    from soundctm_rt.limits import MIN_DURATION

    assert A.DURATION.lo == MIN_DURATION
    tiny_engine.check_params(duration=MIN_DURATION)
    with pytest.raises(ValueError, match="duration"):
        tiny_engine.check_params(duration=MIN_DURATION / 2)
    with pytest.raises(A.Refusal, match="duration"):
        A.parse("/soundctm/generate", ("x", 1, 1, 0.0, 1.0, MIN_DURATION / 2))


def test_truncation_warning_names_where_the_prompt_is_cut(tiny_engine):
    max_length = tiny_engine.tokenizer.max_length
    assert tiny_engine.truncation_warning("a dog barking") is None
    note = tiny_engine.truncation_warning(LONG_PROMPT)
    assert note is not None and f"text encoder's {max_length} tokens" in note and "\n" not in note
    kept = int(note.split("the first ")[1].split(" of ")[0])
    assert 0 < kept < len(LONG_PROMPT) and "thunder rolls far away" in note  # the tail it does not read
    assert note in (tiny_engine.prompt_warning(LONG_PROMPT) or "")  # what the CLI prints and /warn carries


# Variations: K takes of one prompt as batches -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "nu", "fused", "path"),
    [
        (1, 1.0, None, "fused"),
        (2, 1.0, None, "fused"),
        (2, 1.0, False, "host"),
        (3, 1.0, None, "host"),
        (2, 2.0, None, "host"),
    ],
)
def test_variations_are_the_single_takes(engine, steps, nu, fused, path):
    """Take i of a batch is generate(seed + i): same noise, same graphs, only the batch shapes differ."""
    takes = list(
        engine.generate_variations("a dog barking", 5, seed=3, steps=steps, nu=nu, gamma=0.5, batch=2, fused=fused)
    )
    assert [t.seed for t in takes] == [3, 4, 5, 6, 7]
    assert [t.timing.batch for t in takes] == [2, 2, 2, 2, 1]  # ceil(5 / 2) = 3 batches of near-equal size
    assert {t.timing.path for t in takes} == {path}
    for t in takes:
        ref, _ = engine.generate("a dog barking", seed=t.seed, steps=steps, nu=nu, gamma=0.5, fused=fused)
        scale = float(np.abs(ref).max())
        assert scale > 0 and t.audio.dtype == np.float32
        np.testing.assert_allclose(t.audio, ref, atol=1e-5 * scale)


def test_variations_run_each_batch_in_one_call(tiny_bundle):
    eng = Engine(tiny_bundle, warmup=False)
    sizes = []
    for n in (3, 4):
        key = f"fused_1[batch={n}]"
        eng._sessions[key] = CountingSession(eng.session("fused_1", n))
        sizes.append(eng._sessions[key])
    takes = list(eng.generate_variations("rain", 7, steps=1, batch=4))
    assert len(takes) == 7 and sizes[0].batches == [3] and sizes[1].batches == [4]  # 7 = 4 + 3
    host = eng._sessions["student_step[batch=4]"] = CountingSession(eng.session("student_step", 4))
    list(eng.generate_variations("rain", 4, steps=3))  # no fused_3: the host loop, one batch of 4 per step
    assert host.batches == [4, 4, 4]


def test_variations_yield_takes_as_they_are_decoded_and_stop(tiny_bundle):
    eng = Engine(tiny_bundle, warmup=False)
    gen = eng.generate_variations("rain", 4, seed=10, steps=2)
    first = next(gen)
    assert first.seed == 10 and eng.last_timing is first.timing and first.timing.total_ms > 0
    stop = {"now": False}
    got = []
    for take in eng.generate_variations("rain", 4, seed=10, steps=2, should_stop=lambda: stop["now"]):
        got.append(take.seed)
        stop["now"] = True
    assert got == [10]
    short = list(eng.generate_variations("rain", 2, steps=1, duration=0.1))
    assert all(len(t.audio) == round(0.1 * eng.sample_rate) for t in short)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"k": 0}, "variations must be >= 1"),
        ({"k": 2, "batch": 0}, "batch must be in"),
        ({"k": 2, "batch": 33}, "batch must be in"),
        ({"k": 2, "seed": 2**63 - 1}, "variations must be"),
        ({"k": 2, "steps": 99}, "steps must be in"),
        ({"k": 2, "steps": 3, "fused": True}, "no batched fused graph"),
    ],
)
def test_variations_refuse_bad_parameters_before_any_work(tiny_engine, kw, msg):
    with pytest.raises(ValueError, match=msg):
        next(tiny_engine.generate_variations("rain", **kw))


def test_bundles_with_single_take_fused_graphs_batch_on_the_host(tiny_source, tmp_path):
    """Fused graphs exported for one take (as before batching): variations run the host loop, batched."""
    from soundctm_rt.export.pipeline import ExportOptions, export_bundle

    out = export_bundle(
        tiny_source, tmp_path / "b", ExportOptions(steps=(1,), openvino=False, batched_fused=False, cpu_fusion=False)
    )
    eng = Engine(out, warmup=False)
    assert eng.bundle.graph("fused_1").inputs[0]["shape"][0] == 1 and not eng.fused_takes_batch(1)
    takes = list(eng.generate_variations("rain", 3, seed=1, steps=1))
    assert {t.timing.path for t in takes} == {"host"}
    for t in takes:
        ref, _ = eng.generate("rain", seed=t.seed, steps=1)  # the fused graph, one take
        np.testing.assert_allclose(t.audio, ref, atol=1e-4 * float(np.abs(ref).max()))
    with pytest.raises(ValueError, match="no batched fused graph"):
        next(eng.generate_variations("rain", 2, steps=1, fused=True))


def test_sessions_pin_the_batch(tiny_bundle):
    """Each session is opened for one batch size (static shapes): a batch of 2 runs in its own session."""
    eng = Engine(tiny_bundle, warmup=False)
    eng.generate("rain", steps=2, nu=2.0)
    assert {"text_encoder", "student_step[batch=2]"} <= set(eng._sessions)
    eng.load(steps=1, takes=35)  # 35 takes in batches of at most 16: 12 + 12 + 11
    assert {"fused_1[batch=12]", "fused_1[batch=11]"} <= set(eng._sessions)
