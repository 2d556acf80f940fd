"""The OSC address space: one table, the single source of truth for the parser, the replies and docs/osc.md.

`parse(address, args)` turns a decoded message into a `Request` (command name + validated values) or raises
`Refusal(reason)`, which the server answers with `/soundctm/fail <command> <reason>`. Each command names the
server method that runs it (`Command.handler`); the server dispatches through the table. Engine-specific limits
(steps available, clip length) are checked afterwards by `Engine.check_params`, on the keywords `engine_params`
maps the request's values and the /set defaults to.

Argument rules, for patches written in Pd, Max and SuperCollider:
- a number is accepted as int or float where an int is meant, if it is integral (Pd sends only floats);
- a prompt may arrive as several string arguments (unquoted words in Pd/Max): every string argument, and any
  number between two strings, joins the prompt with spaces ("gritty 808 snare" from Pd is s f s); the numbers
  after the last string are the positional parameters. `/render` takes its last string as the file name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..limits import MIN_DURATION, clean_prompt

PREFIX = "/soundctm"


class Refusal(ValueError):
    """A request the daemon refuses; the message is the reason sent in /fail."""


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str  # "int" | "float"
    lo: float
    hi: float
    doc: str


@dataclass(frozen=True)
class Command:
    name: str
    signature: str  # as documented: positional arguments, [optional]
    doc: str
    reply: str
    handler: str  # the server's method that runs it: handler(request, client, t_receipt, timetag)
    prompt: bool = False  # takes a (possibly split) prompt first
    filename: bool = False  # the last string is a file name (render)
    args: tuple[Arg, ...] = field(default_factory=tuple)

    @property
    def address(self) -> str:
        return f"{PREFIX}/{self.name}"


SEED = Arg("seed", "int", 0, 2**31 - 1, "noise seed; the same prompt, seed and parameters give the same sound")
STEPS = Arg("steps", "int", 1, 64, "sampling steps (1 is fastest)")
GAMMA = Arg("gamma", "float", 0.0, 1.0, "CTM gamma: 0 deterministic, 1 fully stochastic")
CFG = Arg("cfg", "float", 0.0, 20.0, "guidance strength omega")
DURATION = Arg("duration", "float", MIN_DURATION, 600.0, "seconds; at most the model's clip length")
GAIN = Arg("gain", "float", 0.0, 4.0, "linear gain")
PAN = Arg("pan", "float", -1.0, 1.0, "-1 left, 0 centre, 1 right (constant power)")
TAKES = Arg("takes", "int", 1, 32, "how many takes (seeds 0..takes-1) to cache")
VOICE = Arg("id", "int", 0, 2**31 - 1, "the id from /ack; omitted or 0: stop every voice")
GEN_ARGS = (SEED, STEPS, GAMMA, CFG, DURATION, GAIN, PAN)

# keys of /soundctm/set and their limits
SET_KEYS: dict[str, Arg] = {a.name: a for a in (SEED, STEPS, GAMMA, CFG, DURATION, GAIN, PAN)}
SET_KEYS["nu"] = Arg("nu", "float", 0.0, 20.0, "nu-guidance strength")
SET_KEYS["latency"] = Arg(
    "latency",
    "float",
    0.0,
    5000.0,
    "ms from receipt to the start (or /stop) of an untimed generate or trigger, sample-accurate; 0: as soon as "
    "possible (the daemon's --latency)",
)
SET_ONLY = ("nu", "latency")  # keys of /set that are not also arguments of a command
# the request values (and /set keys) that are generation parameters, and Engine.check_params' name for each
ENGINE_PARAMS = {"seed": "seed", "steps": "steps", "gamma": "gamma", "cfg": "omega", "nu": "nu", "duration": "duration"}

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "generate",
            "prompt [seed steps gamma cfg duration gain pan]",
            "Generate and play, at the bundle's time tag or receipt + latency (see Timing). Streams: the first block "
            "plays before the clip is fully decoded.",
            "/soundctm/ack id, then /soundctm/done id latency_ms rtf audio_seconds total_ms",
            "handle_job",
            prompt=True,
            args=GEN_ARGS,
        ),
        Command(
            "preload",
            "prompt [takes]",
            "Generate takes (seeds 0..takes-1, current defaults) into the cache for /trigger.",
            "/soundctm/ack id, then /soundctm/done id 0 rtf audio_seconds total_ms when cached",
            "handle_job",
            prompt=True,
            args=(TAKES,),
        ),
        Command(
            "trigger",
            "prompt [gain pan]",
            "Play the next cached take of the prompt (round robin) at the bundle's time tag, receipt + latency, or at "
            "once; generates one if none is cached.",
            "/soundctm/ack id, then /soundctm/done id latency_ms 0 audio_seconds 0",
            "handle_job",
            prompt=True,
            args=(GAIN, PAN),
        ),
        Command(
            "stop",
            "[id]",
            "Stop one job or voice (queued, generating or playing; a short fade) or all of them; at the bundle's time "
            "tag or receipt + latency when either is set.",
            "/soundctm/ack id (the voice's id; 0 for all), or /soundctm/fail stop 'no such voice...'",
            "handle_stop",
            args=(VOICE,),
        ),
        Command(
            "set",
            "key value",
            "Set a default for later requests; keys: " + ", ".join(SET_KEYS) + ".",
            "/soundctm/ack id",
            "handle_set",
        ),
        Command(
            "status",
            "",
            "Report state and counters.",
            "/soundctm/status.reply key value key value ...",
            "handle_status",
        ),
        Command("ping", "", "Liveness check.", "/soundctm/pong", "handle_ping"),
        Command(
            "render",
            "prompt filename [seed steps gamma cfg duration]",
            "Generate to a WAV file inside --render-dir (no audio device needed).",
            "/soundctm/ack id, then /soundctm/done id 0 rtf audio_seconds total_ms path",
            "handle_job",
            prompt=True,
            filename=True,
            args=(SEED, STEPS, GAMMA, CFG, DURATION),
        ),
    )
}

REPLIES = {
    "ack": "/soundctm/ack id — the request was accepted; id names the job (and the voice, for /stop)",
    "done": "/soundctm/done id latency_ms rtf audio_seconds total_ms [path] — latency_ms: OSC receipt to the "
    "DAC time of the voice's first sample (0 for preload/render; nan when the clock mapping cannot support the "
    "figure, counted in /status latencies_flagged)",
    "fail": "/soundctm/fail command reason [id] — refused or failed; id when the job had been acked. Reasons "
    "include 'stopped', 'busy', 'too far ahead' (a time tag beyond --horizon) and 'audio device lost' (the "
    "output died: every job it would have played fails, and later generate/trigger are refused until a restart)",
    "late": "/soundctm/late id seconds — the voice of job id started this long after its requested time (a "
    "time tag or receipt + latency already past, or a generation that took longer); sent before its /done",
    "warn": "/soundctm/warn id reason — the prompt of job id is cut to the text encoder's length (reason says "
    "where), or is far from every caption the model was trained on (reason names the nearest ones); sent before "
    "the job's audio and /done by generate, preload, render and a trigger that generates; the job still runs",
    "status.reply": "/soundctm/status.reply key value ... — see docs/osc.md",
    "pong": "/soundctm/pong",
}


@dataclass(frozen=True)
class Request:
    command: str
    values: dict[str, Any]


Handler = Callable[[Request, tuple[str, int], float, int], None]  # (request, client, t_receipt, timetag)


def fmt_number(x: float) -> str:
    """A range bound as a person writes it: 2147483647, not 2.14748e+09; 0.25, not 0.250000."""
    return str(int(x)) if float(x).is_integer() else f"{x:.10g}"


def _number(a: Any, spec: Arg) -> int | float:
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        raise Refusal(f"{spec.name} must be a number, not {type(a).__name__}")
    x = float(a)
    if not math.isfinite(x):
        raise Refusal(f"{spec.name} must be finite, not {x}")
    if spec.kind == "int":
        if x != int(x):
            raise Refusal(f"{spec.name} must be a whole number, not {x}")
        v: int | float = int(x)
    else:
        v = x
    if not spec.lo <= v <= spec.hi:
        raise Refusal(f"{spec.name} {v} out of range [{fmt_number(spec.lo)}, {fmt_number(spec.hi)}]")
    return v


def _word(a: Any) -> str:
    if isinstance(a, float) and math.isfinite(a) and a == int(a):
        return str(int(a))
    return str(a)


def _split_prompt(args: tuple[Any, ...]) -> tuple[list[str], tuple[Any, ...]]:
    """(words, trailing numbers): strings and numbers between strings are words."""
    last = max((i for i, a in enumerate(args) if isinstance(a, str)), default=-1)
    words = [_word(a) for a in args[: last + 1]]
    for a in args[: last + 1]:
        if not isinstance(a, (str, int, float)) or isinstance(a, bool):
            raise Refusal(f"prompt words must be strings or numbers, not {type(a).__name__}")
    return words, args[last + 1 :]


def _clean_prompt(words: list[str]) -> str:
    """The words as one prompt, refused as the CLI refuses it (limits.clean_prompt)."""
    try:
        return clean_prompt(" ".join(w.strip() for w in words if w.strip()))
    except ValueError as e:
        raise Refusal(str(e)) from None


def parse(address: str, args: tuple[Any, ...]) -> Request:
    """Validate a decoded message against the table. Raises Refusal with the reason."""
    if not address.startswith(PREFIX + "/"):
        raise Refusal(f"unknown address {address[:80]}")
    name = address[len(PREFIX) + 1 :]
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise Refusal(f"unknown address {address[:80]}")
    values: dict[str, Any] = {}
    rest = args
    if cmd.prompt:
        words, rest = _split_prompt(args)
        if cmd.filename:
            if len(words) < 2:
                raise Refusal("render needs a prompt and a file name")
            values["filename"] = words.pop()
        values["prompt"] = _clean_prompt(words)
    elif cmd.name == "set":
        if len(args) != 2 or not isinstance(args[0], str):
            raise Refusal("set needs a key and a value")
        spec = SET_KEYS.get(args[0])
        if spec is None:
            raise Refusal(f"unknown key {args[0][:40]!r}; keys: {', '.join(SET_KEYS)}")
        return Request("set", {"key": args[0], "value": _number(args[1], spec)})
    if len(rest) > len(cmd.args):
        raise Refusal(f"too many arguments ({len(rest)} > {len(cmd.args)}): {cmd.signature}")
    for a, spec in zip(rest, cmd.args, strict=False):
        values[spec.name] = _number(a, spec)
    return Request(cmd.name, values)


def engine_params(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Engine.check_params keywords: each generation parameter from the request's values, else the /set
    default, else None (the bundle's default; seed 0)."""
    p = {engine: values.get(key, defaults.get(key)) for key, engine in ENGINE_PARAMS.items()}
    if p["seed"] is None:
        p["seed"] = 0
    return p


def markdown() -> str:
    """The address table as Markdown (docs/osc.md embeds it; a test keeps them equal)."""
    lines = ["| address | arguments | what it does | replies |", "|---|---|---|---|"]
    for c in COMMANDS.values():
        lines.append(f"| `{c.address}` | `{c.signature}` | {c.doc} | `{c.reply}` |")
    lines += ["", "| argument | type | range | meaning |", "|---|---|---|---|"]
    seen: set[str] = set()
    for c in COMMANDS.values():
        for a in c.args:
            if a.name not in seen:
                seen.add(a.name)
                lines.append(f"| `{a.name}` | {a.kind} | {fmt_number(a.lo)} .. {fmt_number(a.hi)} | {a.doc} |")
    for key in SET_ONLY:
        a = SET_KEYS[key]
        lines.append(f"| `{a.name}` (set only) | {a.kind} | {fmt_number(a.lo)} .. {fmt_number(a.hi)} | {a.doc} |")
    lines += ["", "Replies:", ""] + [f"- `{r}`" for r in REPLIES.values()]
    return "\n".join(lines) + "\n"
