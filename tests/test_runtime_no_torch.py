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


def _blocked_torch(code: str) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter where `import torch` fails at once, as on a runtime-only install."""
    prelude = "import sys\nsys.modules['torch'] = None  # an import of torch raises ModuleNotFoundError\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300)


def test_runtime_never_imports_train_or_export(tiny_bundle, tmp_path):
    """Every runtime module, and generate and info through the top-level CLI, without torch: none of them
    reaches soundctm_rt.train, soundctm_rt.export or soundctm_rt.bench (the CLI loads those only when named)."""
    out = str(tmp_path / "x.wav")
    code = f"""
import importlib, json
for name in {runtime_modules()!r}:
    importlib.import_module(name)
from typer.testing import CliRunner
from soundctm_rt.cli import app
for args in (["generate", "a dog barking", "-o", {out!r}, "--bundle", {str(tiny_bundle)!r}, "--threads", "1"],
             ["info", {str(tiny_bundle)!r}], ["serve", "--help"]):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (args, r.output)
side = ("soundctm_rt.train", "soundctm_rt.export", "soundctm_rt.bench", "torch")
print(json.dumps(sorted(m for m, v in sys.modules.items() if v is not None and m.startswith(side))))
"""
    r = _blocked_torch(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-2000:]


def test_torch_side_commands_say_when_torch_is_missing(tmp_path):
    """Without torch, the torch-side commands still list their help, and running one ends with one line that says
    what to install (exit 1), not a traceback."""
    ckpt = str(tmp_path / "student.safetensors")
    for argv, command in (
        (["train", "vae-finalize", "--data", str(tmp_path), "--run", str(tmp_path / "run")], "train"),
        (["control", "generate", "x", "--intensity", "swell", "--checkpoint", ckpt, "-o", str(tmp_path / "x.wav")],
         "control"),
    ):  # fmt: skip
        code = f"from soundctm_rt.cli import main\nsys.argv = ['soundctm-rt', *{argv!r}]\nmain()\n"
        r = _blocked_torch(code)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
        assert lines[0].startswith(f"error: `soundctm-rt {command}` needs torch") and "pip install" in lines[0]
    r = _blocked_torch("from soundctm_rt.cli import main\nsys.argv = ['soundctm-rt', 'train', '--help']\nmain()\n")
    assert r.returncode == 0 and "prepare" in r.stdout, r.stderr[-3000:]
