"""The runtime never imports torch: every runtime module, and a whole generate, in a fresh interpreter."""

import pkgutil
import subprocess
import sys

import soundctm_rt

RUNTIME_EXCLUDE = ("soundctm_rt.train", "soundctm_rt.export", "soundctm_rt.bench")


def runtime_modules():
    mods = []
    for m in pkgutil.walk_packages(soundctm_rt.__path__, "soundctm_rt."):
        if not m.name.startswith(RUNTIME_EXCLUDE) and not m.name.endswith("__main__"):
            mods.append(m.name)
    return mods


def test_runtime_modules_listed():
    mods = runtime_modules()
    assert {"soundctm_rt.engine", "soundctm_rt.bundle", "soundctm_rt.cli"} <= set(mods)


def test_no_torch_in_a_fresh_interpreter(tiny_bundle):
    code = f"""
import importlib, sys
for name in {runtime_modules()!r}:
    importlib.import_module(name)
from soundctm_rt.engine import Engine
Engine({str(tiny_bundle)!r}).generate("a dog barking", steps=2)
from soundctm_rt.cli import app
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not bad, bad
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
