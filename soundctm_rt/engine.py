"""The torch-free inference engine: bundle -> sessions -> audio, with a timing record per stage.

Two paths give the same result for the same seed (a test holds them to it):
- fused: one call of `fused_N` (the γ-loop unrolled, decode fused in) when ν = 1 and N is exported;
- host: the numpy γ-loop of `sampling.py` over `student_step`, then the decoder — any step count, ν-guidance,
  stoppable between steps, and the streaming decoder so audio can start before the whole clip is decoded.
`generate_variations` runs K takes of one prompt as batches through the same graphs (the fused ones when the
bundle exported them with a batch dimension), and yields each take as soon as it is decoded.
The decoder follows the bundle's latent kind: "mel" (the fixed log-mel code, METHOD §5b) is decoded on the host
by `melcode.MelDecoder` (chunked fast Griffin-Lim); "vae" by the `vae_decoder` / `vae_decoder_stream` graphs.
An Engine is meant for one thread (OpenVINO infer requests are not thread-safe); make one per worker.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .backends import BackendOptions, Session, open_session
from .bundle import Bundle, BundleError, bundle_id, cache_root, resolve_bundle
from .level import normalise_level, soft_limit
from .limits import MIN_DURATION, clean_prompt
from .melcode import MelCodeConfig, MelDecoder, denormalise, preload_fft
from .sampling import Stopped, draw_noise, karras_sigmas, nu_guided, sample_gamma
from .text import PromptTokenizer, bucket_for

log = logging.getLogger(__name__)

MAX_STEPS = 64
MAX_SEED = 2**63 - 1
MAX_BATCH = 32  # takes per graph call in generate_variations (ν-guidance doubles the rows: 64, export's maximum)
DEFAULT_BATCH = 16
FADE_SECONDS = 0.005  # fade-out where a clip is cut short, so the cut does not click


@dataclass
class Timing:
    """Wall-clock figures of one generation, milliseconds; rtf = total time / audio duration."""

    text_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)  # each student jump (host path)
    sample_ms: float = 0.0  # all sampling (the fused call, or the sum of the steps)
    decode_ms: float = 0.0
    total_ms: float = 0.0
    audio_seconds: float = 0.0
    rtf: float = 0.0
    path: str = "host"  # "fused" | "host" | "stream"
    first_chunk_ms: float | None = None  # stream: time to the first decoded chunk
    batch: int = 1  # takes sampled together (generate_variations); sample_ms is then the whole batch's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Take:
    """One take of `Engine.generate_variations`: its seed, mono float32 audio [N] at the engine's sample_rate, and
    its timing (`total_ms`: from the start of its batch to this take decoded)."""

    seed: int
    audio: np.ndarray
    timing: Timing


@dataclass(frozen=True)
class Conditioning:
    tokens: np.ndarray  # [1, L, Dt] float32
    token_mask: np.ndarray  # [1, L] float32
    pooled: np.ndarray  # [1, Dt] float32

    def repeat(self, n: int) -> Conditioning:
        """The same conditioning for a batch of n rows."""
        if n == 1:
            return self
        return Conditioning(*(np.repeat(a, n, axis=0) for a in (self.tokens, self.token_mask, self.pooled)))


class Engine:
    """Loads a bundle on a backend and generates audio from prompts.

    Args:
        bundle: bundle directory or zip (None: the shipped default model), or an opened Bundle.
        backend: "onnxruntime" or "openvino".
        device: "cpu", "gpu" or "npu" where the backend has it.
        threads: intra-op threads (None: all cores, or cores - 1 when audio_active).
        audio_active: a real-time audio callback shares the machine (no spinning, one core left free).
        prompt_cache: how many prompt embeddings to keep (LRU).
        warmup: run every default-path graph once at load, so the first real call is not slow.
        int8: use the bundle's INT8 variants of the graphs that have one for this backend (never the default).
        normalise_level: set each take's level from its mel code before decoding (level.py: its predicted peak
            at −1 dBFS, the level of every training clip); False keeps the level the model made (the soft
            limiter still keeps it within full scale). A VAE bundle's takes are never normalised.
        decoder_iterations: Griffin-Lim iterations of a mel bundle's decoder (None: the bundle's setting). More
            iterations give a more consistent phase at about 4 ms per iteration and clip on one core
            (docs/training/mel_decoder_iterations.json has the curve).
    """

    def __init__(
        self,
        bundle: str | os.PathLike[str] | Bundle | None = None,
        backend: str = "onnxruntime",
        device: str = "cpu",
        threads: int | None = None,
        audio_active: bool = False,
        prompt_cache: int = 256,
        warmup: bool = True,
        verify: bool = True,
        int8: bool = False,
        normalise_level: bool = True,
        decoder_iterations: int | None = None,
    ) -> None:
        self.normalise_level = normalise_level
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(resolve_bundle(bundle), verify=verify)
        self.opts = BackendOptions(
            backend=backend,
            device=device,
            threads=threads,
            audio_active=audio_active,
            cache_dir=_openvino_cache(self.bundle) if backend == "openvino" else None,
        )
        m = self.bundle.manifest
        self.sample_rate = int(m["audio"]["sample_rate"])
        lat = m["latent"]
        self.latent_shape = (1, int(lat["channels"]), int(lat["frames"]))
        self.hop = int(lat["hop"])
        self.latent_kind = str(lat.get("kind", "vae"))
        self.mel_decoder: MelDecoder | None = None
        if self.latent_kind == "mel":
            # one FFT thread: a chunk's transforms are small (~40 frames of 2048), so more threads per take measured
            # slower (clip decode p50 50.3 vs 46.9 ms on 2 cores), and variations decode takes side by side instead
            mel = dict(lat["mel"])
            if decoder_iterations is not None:
                mel["iterations"] = decoder_iterations  # a decoder setting: the code stays the same
            self.mel_decoder = MelDecoder(MelCodeConfig.from_dict(mel), workers=1)
            self._mean = np.asarray(lat["mean"], np.float32)
            self._std = np.asarray(lat["std"], np.float32)
        else:
            self.context = int(lat["decoder_context"])
        self.max_duration = self.latent_shape[2] * self.hop / self.sample_rate
        e = m["edm"]
        self.sigma_min, self.sigma_max, self.rho = (
            float(e["sigma_min"]),
            float(e["sigma_max"]),
            float(e["rho"]),
        )
        gd = m["guidance"]
        self.omega_range = (float(gd["omega_min"]), float(gd["omega_max"]))
        self.defaults: dict[str, Any] = {
            "steps": int(gd["default_steps"]),
            "gamma": float(gd["default_gamma"]),
            "omega": float(gd["default_omega"]),
            "nu": float(gd["default_nu"]),
        }
        self.tokenizer = PromptTokenizer(self.bundle.path(m["text"]["tokenizer"]), int(m["text"]["max_length"]))
        self._sessions: dict[str, Session] = {}
        self._text_buckets = _length_buckets(self.bundle)
        self.int8 = int8
        if int8 and not any(backend in v.files for v in self.bundle.spec.int8.values()):
            raise BundleError(f"this bundle has no INT8 variants for {backend}: re-export it with --int8")
        self._cache: OrderedDict[str, Conditioning] = OrderedDict()
        self._cache_size = prompt_cache
        self.last_timing: Timing | None = None
        self._pool: ThreadPoolExecutor | None = None
        if self.mel_decoder is not None:
            # the backend's package is imported here, on this thread, so that the decoder's FFT import can run
            # beside the session builds without two threads importing at once (melcode.preload_fft)
            with contextlib.suppress(ImportError):  # a missing backend is reported when its session opens
                importlib.import_module("onnxruntime" if backend == "onnxruntime" else "openvino")
            preload_fft()
        if warmup:
            self.warmup()

    # Sessions ---------------------------------------------------------------------------------------
    def session(self, graph: str, batch: int = 1) -> Session:
        """The session of `graph` with its batch dimension pinned to `batch` (static shapes; backends.py).

        One session per graph and batch size, opened on first use and kept (`_sessions[graph]` for batch 1,
        `_sessions["graph[batch=n]"]` otherwise).
        """
        key = graph if batch == 1 else f"{graph}[batch={batch}]"
        if key not in self._sessions:
            t0 = time.perf_counter()
            q = self.bundle.spec.int8.get(graph) if self.int8 else None
            if q is not None and self.opts.backend in q.files:
                from .backends import open_file_session

                path = self.bundle.path(q.files[self.opts.backend])
                w = q.weights.get(self.opts.backend) if path.suffix == ".xml" else None  # ONNX files find their own
                self._sessions[key] = open_file_session(path, self.opts, self.bundle.path(w) if w else None, batch)
            else:
                self._sessions[key] = open_session(self.bundle, graph, self.opts, batch)
            log.info("loaded %s on %s in %.0f ms", key, self.opts.backend, 1e3 * (time.perf_counter() - t0))
        return self._sessions[key]

    def fused_takes_batch(self, steps: int) -> bool:
        """Whether `fused_<steps>` takes a batch of takes (bundles exported before batching take one)."""
        if not self.has_fused(steps):
            return False
        eps = next((i for i in self.bundle.graph(f"fused_{steps}").inputs if i["name"] == "eps_T"), None)
        return eps is not None and not isinstance(eps["shape"][0], int)

    def load(self, steps: int | None = None, nu: float | None = None, takes: int = 1) -> None:
        """Open the sessions that `generate(steps=steps, nu=nu)` runs (None: the bundle's defaults), so that the
        timing of that call is generation alone; with takes > 1, those of `generate_variations(k=takes, ...)`.
        A session opens on first use and stays open.

        Raises:
            ValueError: steps or nu out of range.
            BundleError: a graph file the bundle lacks or cannot load.
        """
        p = self.check_params(steps=steps, nu=nu)
        sizes = sorted(set(_batch_sizes(takes, self._variation_batch()))) if takes > 1 else [1]
        graphs = [("text_encoder", 1)]
        decoded = False
        if self.has_fused(p["steps"]) and p["nu"] == 1.0 and (takes == 1 or self.fused_takes_batch(p["steps"])):
            graphs += [(f"fused_{p['steps']}", n) for n in sizes]
            decoded = bool(self.bundle.graph(f"fused_{p['steps']}").attrs.get("decode", False))
        else:
            rows = 1 if p["nu"] == 1.0 else 2  # ν-guidance runs the unconditional and conditional rows together
            graphs += [("student_step", rows * n) for n in sizes]
        if not decoded and self.mel_decoder is None:
            graphs.append(("vae_decoder", 1))
        for g, n in graphs:
            self.session(g, n)

    def has_fused(self, steps: int) -> bool:
        return steps in self.bundle.fused_steps and f"fused_{steps}" in self.bundle.graphs

    def warmup(self) -> None:
        """Load and run the default path once (text, a host step, the fused default, both decoders)."""
        d = self.defaults
        self.generate("warm up", seed=0, steps=d["steps"], fused=self.has_fused(d["steps"]))
        if self.mel_decoder is None:  # a mel code's stream below runs the same step session and decoder
            self.generate("warm up", seed=0, steps=1, fused=False)
        for _ in self.stream("warm up", seed=0, steps=1):
            pass
        self._cache.pop("warm up", None)

    # Validation -------------------------------------------------------------------------------------
    def check_params(
        self,
        steps: Any = None,
        gamma: Any = None,
        omega: Any = None,
        nu: Any = None,
        duration: Any = None,
        seed: Any = 0,
    ) -> dict[str, Any]:
        """Validated generation parameters (None -> the bundle's defaults). Raises ValueError with the reason."""
        d = self.defaults
        steps = d["steps"] if steps is None else _as_int("steps", steps)
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
        gamma = d["gamma"] if gamma is None else _as_float("gamma", gamma)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        omega = d["omega"] if omega is None else _as_float("omega (cfg)", omega)
        lo, hi = self.omega_range
        if not lo <= omega <= hi:
            raise ValueError(f"omega (cfg) must be in the range the student was trained on, [{lo}, {hi}]; got {omega}")
        nu = d["nu"] if nu is None else _as_float("nu", nu)
        if not 0.0 <= nu <= 20.0:
            raise ValueError(f"nu must be in [0, 20], got {nu}")
        duration = self.max_duration if duration is None else _as_float("duration", duration)
        if not MIN_DURATION <= duration <= self.max_duration + 1e-9:
            raise ValueError(
                f"duration must be in [{MIN_DURATION:g}, {self.max_duration:.3f}] seconds for this model, "
                f"got {duration:g}"
            )
        seed = _as_int("seed", seed)
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2^63 - 1], got {seed}")
        return {"steps": steps, "gamma": gamma, "omega": omega, "nu": nu, "duration": duration, "seed": seed}

    @staticmethod
    def check_prompt(prompt: str) -> str:
        """The prompt as generated (stripped). Raises ValueError with the reason (limits.clean_prompt: the CLI and
        the daemon refuse the same prompts with the same words)."""
        return clean_prompt(prompt)

    def truncation_warning(self, prompt: str) -> str | None:
        """One line saying where the text encoder cuts a prompt longer than its max_length tokens; None if it fits."""
        enc = self.tokenizer.tok.encode(prompt)
        if not enc.overflowing:
            return None
        read = [end for (_, end), special in zip(enc.offsets, enc.special_tokens_mask, strict=True) if not special]
        kept = max(read, default=0)
        rest = prompt[kept:].strip()
        rest = rest if len(rest) <= 40 else rest[:40] + "..."
        return (
            f"prompt cut to the text encoder's {self.tokenizer.max_length} tokens: it reads the first {kept} of "
            f"{len(prompt)} characters and ignores '{rest}'"
        )

    # Stages -----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> Conditioning:
        """Text conditioning of one prompt, from the LRU cache when seen before."""
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        hit = self._cache.get(prompt)
        if hit is not None:
            self._cache.move_to_end(prompt)
            return hit
        ids, mask = self.tokenizer([prompt])
        length = ids.shape[1]
        if self._text_buckets:
            # a short prompt runs at a short length: the padding is masked out of the encoder's attention, so its
            # real tokens and pooled vector do not change (bit-identical, tests/test_text_length.py), and the
            # padded positions the student reads are masked out of its cross-attention as well (zeros here)
            length = bucket_for(int(mask.sum()), self._text_buckets)
        feeds = {"input_ids": ids[:, :length], "attention_mask": mask[:, :length]}
        tokens, pooled = self.session("text_encoder").run(feeds)
        if length < ids.shape[1]:
            tokens = np.pad(tokens, [(0, 0), (0, ids.shape[1] - length), (0, 0)])
        cond = Conditioning(tokens.astype(np.float32), mask.astype(np.float32), pooled.astype(np.float32))
        self._cache[prompt] = cond
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return cond

    def prompt_warning(self, prompt: str) -> str | None:
        """Advice on a prompt in one line, or None: that the text encoder reads only part of it
        (`truncation_warning`), and that it is far from every caption the model was trained on, naming the nearest
        ones (known_prompts.py; never when the bundle lists no known prompts). The CLI prints it, the daemon sends
        it in /soundctm/warn."""
        from .known_prompts import KnownPrompts

        notes = [self.truncation_warning(prompt)]
        if not hasattr(self, "_known"):  # loaded on first use: most callers never ask
            self._known = KnownPrompts.from_bundle(self.bundle)
        if self._known is not None:
            far = self._known.check(self.encode_prompt(prompt).pooled[0], prompt)
            notes.append(None if far is None else far.message)
        return "; ".join(n for n in notes if n) or None

    def _jump(
        self, cond: Conditioning, uncond: Conditioning | None, omega: float, nu: float, timing: Timing, n: int = 1
    ) -> Callable[[np.ndarray, float, float], np.ndarray]:
        """The student's jump G_ν(x, t, s) over `student_step` for n takes x [n, C, T] of one prompt; ν = 1 skips
        the unconditional pass, otherwise the unconditional and conditional rows run as one batch of 2n."""
        rows = n if uncond is None else 2 * n
        sess = self.session("student_step", rows)
        c = cond.repeat(n) if uncond is None else _stack(uncond.repeat(n), cond.repeat(n))
        feeds = {"tokens": c.tokens, "token_mask": c.token_mask, "pooled": c.pooled}
        feeds["omega"] = np.full(rows, omega, np.float32)

        def jump(x: np.ndarray, t: float, s: float) -> np.ndarray:
            t0 = time.perf_counter()
            feeds["x"] = x if uncond is None else np.concatenate([x, x])
            feeds["t"] = np.full(rows, t, np.float32)
            feeds["s"] = np.full(rows, s, np.float32)
            out = sess.run(feeds)[0]
            if uncond is not None:
                out = nu_guided(out[:n], out[n:], nu)
            timing.step_ms.append(1e3 * (time.perf_counter() - t0))
            return out

        return jump

    def sample_latent(
        self,
        prompt: str,
        seed: int = 0,
        steps: int | None = None,
        gamma: float | None = None,
        omega: float | None = None,
        nu: float | None = None,
        should_stop: Callable[[], bool] | None = None,
        timing: Timing | None = None,
    ) -> np.ndarray:
        """Host γ-sampling -> normalised latent [1, C, T]."""
        p = self.check_params(steps=steps, gamma=gamma, omega=omega, nu=nu, seed=seed)
        timing = timing if timing is not None else Timing()
        t0 = time.perf_counter()
        cond = self.encode_prompt(prompt)
        uncond = self.encode_prompt("") if p["nu"] != 1.0 else None
        timing.text_ms = 1e3 * (time.perf_counter() - t0)
        eps_T, noises = draw_noise(p["seed"], self.latent_shape, p["steps"])
        sigmas = karras_sigmas(p["steps"] + 1, self.sigma_min, self.sigma_max, self.rho)
        t1 = time.perf_counter()
        x = sample_gamma(
            self._jump(cond, uncond, p["omega"], p["nu"], timing),
            eps_T,
            sigmas,
            p["gamma"],
            noises,
            self.sigma_min,
            should_stop=should_stop,
        )
        timing.sample_ms = 1e3 * (time.perf_counter() - t1)
        return x

    def _mel_code(self, latent: np.ndarray) -> np.ndarray:
        """Normalised latent [1, C, T] -> the decoder's log-mel [1, C, T], at the target level unless that is off
        (one place for the whole-take and the streamed decode, so both get the same gain)."""
        assert self.mel_decoder is not None
        code = denormalise(latent[0], self._mean, self._std)[None]
        return normalise_level(self.mel_decoder, code) if self.normalise_level else code

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """Normalised latent [1, C, T] -> waveform [N] float32."""
        if self.mel_decoder is not None:
            return self.mel_decoder.decode(self._mel_code(latent))[0]
        return self.session("vae_decoder").run({"latent": latent.astype(np.float32)})[0][0]

    def _decode_chunks(self, x: np.ndarray) -> Iterator[np.ndarray]:
        """Normalised latent [1, C, T] -> its waveform in chunks [n] (they concatenate to `decode(x)`)."""
        if self.mel_decoder is not None:
            for piece in self.mel_decoder.stream(self._mel_code(x)):
                yield piece[0]
            return
        sess = self.session("vae_decoder_stream")
        chunk = int(self.bundle.graph("vae_decoder_stream").attrs["chunk"])
        R, T = self.context, x.shape[-1]
        n_chunks = math.ceil(T / chunk)
        tail = n_chunks * chunk - T  # extra replicated frames so the last window is full
        padded = np.concatenate([np.repeat(x[..., :1], R, -1), x, np.repeat(x[..., -1:], R + tail, -1)], -1)
        for i in range(n_chunks):
            win = np.ascontiguousarray(padded[..., i * chunk : i * chunk + chunk + 2 * R])
            yield sess.run({"latent_window": win})[0][0]

    def generate(
        self,
        prompt: str,
        seed: int = 0,
        steps: int | None = None,
        gamma: float | None = None,
        omega: float | None = None,
        nu: float | None = None,
        duration: float | None = None,
        fused: bool | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, Timing]:
        """Prompt -> (mono float32 audio [N] at sample_rate, Timing). Deterministic for a seed.

        fused: None picks the fused graph when it exists for the step count and ν = 1; True requires it.
        """
        p = self.check_params(steps=steps, gamma=gamma, omega=omega, nu=nu, duration=duration, seed=seed)
        timing = Timing()
        t_start = time.perf_counter()
        can_fuse = self.has_fused(p["steps"]) and p["nu"] == 1.0
        if fused and not can_fuse:
            raise ValueError(
                f"no fused graph for steps={p['steps']}, nu={p['nu']} in this bundle "
                f"(fused: {self.bundle.fused_steps}, nu = 1 only)"
            )
        if can_fuse and fused is not False:
            audio = self._generate_fused(prompt, p, timing)
        else:
            x = self.sample_latent(
                prompt,
                p["seed"],
                p["steps"],
                p["gamma"],
                p["omega"],
                p["nu"],
                should_stop=should_stop,
                timing=timing,
            )
            t0 = time.perf_counter()
            audio = self.decode(x)
            timing.decode_ms = 1e3 * (time.perf_counter() - t0)
        audio = soft_limit(self._trim(audio, p["duration"]))  # never beyond full scale (level.py)
        timing.total_ms = 1e3 * (time.perf_counter() - t_start)
        timing.audio_seconds = len(audio) / self.sample_rate
        timing.rtf = timing.total_ms / 1e3 / timing.audio_seconds
        self.last_timing = timing
        return audio, timing

    def _generate_fused(self, prompt: str, p: dict[str, Any], timing: Timing) -> np.ndarray:
        t0 = time.perf_counter()
        cond = self.encode_prompt(prompt)
        timing.text_ms = 1e3 * (time.perf_counter() - t0)
        eps_T, noises = draw_noise(p["seed"], self.latent_shape, p["steps"])
        t1 = time.perf_counter()
        latent, audio = self._fused_batch(cond, eps_T, noises, p)
        timing.path = "fused"
        timing.sample_ms = 1e3 * (time.perf_counter() - t1)  # with the decode when the graph fuses it
        if audio is not None:
            return audio[0]
        t2 = time.perf_counter()
        audio = self.decode(latent)
        timing.decode_ms = 1e3 * (time.perf_counter() - t2)
        return audio

    def generate_variations(
        self,
        prompt: str,
        k: int,
        seed: int = 0,
        steps: int | None = None,
        gamma: float | None = None,
        omega: float | None = None,
        nu: float | None = None,
        duration: float | None = None,
        batch: int | None = None,
        fused: bool | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Take]:
        """K takes of one prompt with seeds seed, seed+1, ..., seed+k-1, sampled `batch` at a time (default 16)
        as one batch through the graphs; yields each take (in seed order) as soon as it is decoded.

        Take i is `generate(prompt, seed + i, ...)` to float rounding: the same noise and graphs, only the matrix
        shapes differ. With int8 the default batch is 1: onnxruntime's INT8 graphs quantise the activations of a
        whole batch with one scale, so in a batch > 1 a take differs from its single render at the INT8 noise
        level. fused: None runs the fused graph when it exists for the step count, ν = 1 and the bundle
        exported it with a batch dimension (otherwise the host loop over `student_step`, batched as well); True
        requires it. should_stop() is polled between steps and between takes; generation then ends quietly.

        Raises:
            ValueError: a parameter out of range (before any work).
        """
        p = self.check_params(steps=steps, gamma=gamma, omega=omega, nu=nu, duration=duration, seed=seed)
        k = _as_int("variations", k)
        if k < 1 or p["seed"] + k - 1 > MAX_SEED:
            raise ValueError(f"variations must be >= 1 with seed + variations - 1 <= 2^63 - 1, got {k}")
        b = self._variation_batch() if batch is None else _as_int("batch", batch)
        if not 1 <= b <= MAX_BATCH:
            raise ValueError(f"batch must be in [1, {MAX_BATCH}], got {b}")
        can_fuse = self.fused_takes_batch(p["steps"]) and p["nu"] == 1.0
        if fused and not can_fuse:
            raise ValueError(
                f"no batched fused graph for steps={p['steps']}, nu={p['nu']} in this bundle "
                f"(fused: {self.bundle.fused_steps}, nu = 1 only, exported with a batch dimension)"
            )
        use_fused = can_fuse and fused is not False
        first = p["seed"]
        for n in _batch_sizes(k, b):
            t_batch = time.perf_counter()
            timing = Timing(path="fused" if use_fused else "host", batch=n)
            t0 = time.perf_counter()
            cond = self.encode_prompt(prompt)
            uncond = self.encode_prompt("") if p["nu"] != 1.0 else None
            timing.text_ms = 1e3 * (time.perf_counter() - t0)
            seeds = list(range(first, first + n))
            first += n
            noise = [draw_noise(sd, self.latent_shape, p["steps"]) for sd in seeds]
            eps_T = np.concatenate([e for e, _ in noise])  # [n, C, T]
            noises = [np.concatenate([ns[i] for _, ns in noise]) for i in range(p["steps"] - 1)]
            t1 = time.perf_counter()
            audio_batch: np.ndarray | None = None
            if use_fused:
                latent, audio_batch = self._fused_batch(cond, eps_T, noises, p)
            else:
                sigmas = karras_sigmas(p["steps"] + 1, self.sigma_min, self.sigma_max, self.rho)
                jump = self._jump(cond, uncond, p["omega"], p["nu"], timing, n)
                try:
                    latent = sample_gamma(
                        jump, eps_T, sigmas, p["gamma"], noises, self.sigma_min, should_stop=should_stop
                    )
                except Stopped:
                    return
            timing.sample_ms = 1e3 * (time.perf_counter() - t1)
            # The host decoder runs one take per core: its FFTs and matrix products release the interpreter, and a
            # take's small transforms gain little from the cores inside one transform. Takes still leave in order.
            pool = self._decode_pool() if audio_batch is None and self.mel_decoder is not None and n > 1 else None
            pending = [pool.submit(self.decode, latent[i : i + 1]) for i in range(n)] if pool else []
            try:
                for i, sd in enumerate(seeds):
                    if should_stop is not None and should_stop():
                        return
                    t2 = time.perf_counter()
                    if audio_batch is not None:
                        audio = audio_batch[i]
                    else:
                        audio = pending[i].result() if pending else self.decode(latent[i : i + 1])
                    audio = soft_limit(self._trim(audio, p["duration"]))
                    t = Timing(**{**timing.to_dict(), "step_ms": list(timing.step_ms)})
                    t.decode_ms = 1e3 * (time.perf_counter() - t2)  # with the pool: the wait for this take
                    t.total_ms = 1e3 * (time.perf_counter() - t_batch)
                    t.audio_seconds = len(audio) / self.sample_rate
                    t.rtf = t.total_ms / 1e3 / t.audio_seconds
                    self.last_timing = t
                    yield Take(sd, audio, t)
            finally:  # stopped, or the caller stopped reading: drop the takes nobody will hear
                for f in pending:
                    f.cancel()

    def _decode_pool(self) -> ThreadPoolExecutor | None:
        """Threads that decode takes side by side (one per intra-op thread; None with a single thread)."""
        workers = self.opts.resolved_threads()
        if workers < 2:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        return self._pool

    def _variation_batch(self) -> int:
        """generate_variations' default batch: 16, or 1 for onnxruntime's INT8 graphs (their docstring)."""
        return 1 if self.int8 and self.opts.backend == "onnxruntime" else DEFAULT_BATCH

    def _fused_batch(
        self, cond: Conditioning, eps_T: np.ndarray, noises: list[np.ndarray], p: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One call of `fused_<steps>` on n takes: (latents [n, C, T], audio [n, N] when decode is fused, or None).
        n = 1 runs the graph's single-take session, so `generate` and `generate_variations` share it."""
        n = eps_T.shape[0]
        name = f"fused_{p['steps']}"
        c = cond.repeat(n)
        feeds = {
            "eps_T": eps_T,
            "tokens": c.tokens,
            "token_mask": c.token_mask,
            "pooled": c.pooled,
            "omega": np.array([p["omega"]], np.float32),
            "gamma": np.array([p["gamma"]], np.float32),
        }
        if p["steps"] > 1:
            feeds["noise"] = np.stack(noises)  # [steps - 1, n, C, T]
        outs = self.session(name, n).run(feeds)
        return outs[0], (outs[1] if self.bundle.graph(name).attrs.get("decode", False) else None)

    def stream(
        self,
        prompt: str,
        seed: int = 0,
        steps: int | None = None,
        gamma: float | None = None,
        omega: float | None = None,
        nu: float | None = None,
        duration: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield decoded audio chunks (float32 [chunk·hop]) as soon as each streaming-decoder window is done.

        The chunks concatenate to `generate(..., fused=False)`'s audio. `last_timing` is set at the end.
        """
        p = self.check_params(steps=steps, gamma=gamma, omega=omega, nu=nu, duration=duration, seed=seed)
        timing = Timing(path="stream")
        t_start = time.perf_counter()
        x = self.sample_latent(
            prompt,
            p["seed"],
            p["steps"],
            p["gamma"],
            p["omega"],
            p["nu"],
            should_stop=should_stop,
            timing=timing,
        )
        remaining = round(p["duration"] * self.sample_rate)
        fade = p["duration"] < self.max_duration - 1e-9
        t_dec = time.perf_counter()
        for audio in self._decode_chunks(x):
            if should_stop is not None and should_stop():
                return
            if timing.first_chunk_ms is None:
                timing.first_chunk_ms = 1e3 * (time.perf_counter() - t_start)
            audio = audio[:remaining].copy()
            remaining -= len(audio)
            if remaining <= 0 and fade:
                audio = _fade_out(audio, int(FADE_SECONDS * self.sample_rate))
            audio = soft_limit(audio)  # as generate() does, after the fade
            yield audio
            if remaining <= 0:
                break
        timing.decode_ms = 1e3 * (time.perf_counter() - t_dec)
        timing.total_ms = 1e3 * (time.perf_counter() - t_start)
        timing.audio_seconds = p["duration"]
        timing.rtf = timing.total_ms / 1e3 / timing.audio_seconds
        self.last_timing = timing

    def _trim(self, audio: np.ndarray, duration: float) -> np.ndarray:
        n = round(duration * self.sample_rate)
        if n >= len(audio):
            return audio.astype(np.float32, copy=False)
        return _fade_out(audio[:n].astype(np.float32, copy=True), int(FADE_SECONDS * self.sample_rate))


def _length_buckets(bundle: Bundle) -> list[int]:
    """The token lengths the text encoder runs at if its length is dynamic; [] (always max_length) for a bundle
    exported with a fixed length."""
    spec = bundle.graph("text_encoder")
    ids = next((i for i in spec.inputs if i["name"] == "input_ids"), None)
    if ids is None or len(ids["shape"]) < 2 or isinstance(ids["shape"][1], int):
        return []
    return [int(b) for b in spec.attrs.get("length_buckets", [])]


def _batch_sizes(k: int, batch: int) -> list[int]:
    """k takes in ceil(k / batch) batches of near-equal size (at most two distinct sizes, so two sessions)."""
    n = math.ceil(k / batch)
    q, r = divmod(k, n)
    return [q + 1] * r + [q] * (n - r)


def _stack(a: Conditioning, b: Conditioning) -> Conditioning:
    """Rows of a, then rows of b."""
    return Conditioning(
        *(
            np.concatenate([x, y])
            for x, y in zip((a.tokens, a.token_mask, a.pooled), (b.tokens, b.token_mask, b.pooled), strict=True)
        )
    )


def _fade_out(audio: np.ndarray, n: int) -> np.ndarray:
    n = min(n, len(audio))
    if n > 0:
        audio[-n:] *= np.linspace(1.0, 0.0, n, dtype=np.float32)
    return audio


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return f


def _as_int(name: str, v: Any) -> int:
    """Ints, and floats with an integral value (Pd and Max send floats)."""
    f = _as_float(name, v) if not isinstance(v, int) or isinstance(v, bool) else v
    if isinstance(f, float):
        if not f.is_integer():
            raise ValueError(f"{name} must be a whole number, got {v!r}")
        if abs(f) > 2**63:
            raise ValueError(f"{name} is out of range: {v!r}")
        return int(f)
    return int(f)


__all__ = ["BundleError", "Engine", "Take", "Timing"]


def _openvino_cache(bundle: Bundle) -> str | None:
    """OpenVINO's compiled-model cache for this bundle, in the user's cache folder (it saves the compile on the
    next start; the blobs hold the weights in compute precision, ~5x the compact bundle). None if not writable."""
    path = cache_root() / "openvino" / bundle_id(bundle)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(path) if os.access(path, os.W_OK) else None
