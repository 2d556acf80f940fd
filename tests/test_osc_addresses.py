"""The address table: argument rules for Pd/Max/SC patches, refusals, and docs/osc.md kept in sync."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from soundctm_rt.daemon import addresses as A

DOCS = Path(__file__).resolve().parent.parent / "docs" / "osc.md"


def test_pd_style_split_prompt_with_float_numbers() -> None:
    r = A.parse("/soundctm/generate", ("gritty", 808.0, "snare", 7.0, 2.0))
    assert r.values == {"prompt": "gritty 808 snare", "seed": 7, "steps": 2}


def test_render_takes_last_string_as_filename() -> None:
    r = A.parse("/soundctm/render", ("metal", "door", "slam", "takes/door.wav", 3))
    assert r.values == {"prompt": "metal door slam", "filename": "takes/door.wav", "seed": 3}


@pytest.mark.parametrize(
    "address,args,reason",
    [
        ("/soundctm/nope", (), "unknown address"),
        ("/other/generate", ("x",), "unknown address"),
        ("/soundctm/generate", (), "prompt is empty"),
        ("/soundctm/generate", ("x", math.nan), "finite"),
        ("/soundctm/generate", ("x", math.inf), "finite"),
        ("/soundctm/generate", ("x", 1.5), "whole number"),
        ("/soundctm/generate", ("x", -1), "out of range"),
        ("/soundctm/generate", ("x", 1, 10_000), "out of range"),
        ("/soundctm/generate", ("x", 1, 1, 0.0, 1.0, -3.0), "out of range"),
        ("/soundctm/generate", ("x", 1, 1, 0.0, 1.0, 1e9), "out of range"),
        ("/soundctm/generate", ("x", 1, 1, 0.0, 1.0, 0.1, 1.0, 0.0, 9), "too many"),
        ("/soundctm/generate", ("x", b"blob"), "number"),
        ("/soundctm/generate", ("x" * 600,), "too long"),
        ("/soundctm/generate", ("a\x07b",), "control"),
        ("/soundctm/set", ("bogus", 1), "unknown key"),
        ("/soundctm/set", ("steps",), "key and a value"),
        ("/soundctm/render", ("only",), "file name"),
    ],
)
def test_refusals(address: str, args: tuple, reason: str) -> None:
    with pytest.raises(A.Refusal, match=reason):
        A.parse(address, args)


def test_docs_embed_the_table() -> None:
    assert A.markdown() in DOCS.read_text(), "docs/osc.md is out of date: paste addresses.markdown() into it"


def test_every_command_names_a_handler_of_the_daemon() -> None:
    import inspect

    from soundctm_rt.daemon.server import Daemon

    for c in A.COMMANDS.values():
        handler = getattr(Daemon, c.handler, None)
        assert callable(handler), f"{c.address}: Daemon has no {c.handler}"
        assert list(inspect.signature(handler).parameters) == ["self", "req", "client", "t_receipt", "timetag"]


def test_engine_params_map_request_values_over_set_defaults() -> None:
    req = A.parse("/soundctm/generate", ("x", 7, 2, 0.5, 3.0))
    defaults = {"cfg": 1.0, "nu": 2.0, "duration": 1.5, "gain": 0.5, "latency": 20.0}
    assert A.engine_params(req.values, defaults) == {
        "seed": 7,
        "steps": 2,
        "gamma": 0.5,
        "omega": 3.0,  # the request's cfg wins over the default
        "nu": 2.0,
        "duration": 1.5,
    }
    # nothing given: the bundle's defaults (None) and seed 0; only generation parameters pass
    assert A.engine_params({}, {}) == dict.fromkeys(("steps", "gamma", "omega", "nu", "duration")) | {"seed": 0}
    assert set(A.ENGINE_PARAMS) <= set(A.SET_KEYS)
