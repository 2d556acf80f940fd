"""The `soundctm-rt` command line. Each command group lives beside what it drives; heavy imports are lazy,
so `soundctm-rt generate` never imports torch."""

from __future__ import annotations

import logging

import typer

from . import __version__
from .cli_runtime import generate, info
from .daemon.cli import serve

app = typer.Typer(
    name="soundctm-rt",
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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress (INFO)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


app.command()(generate)
app.command()(info)
app.command()(serve)


def _register_groups() -> None:
    from .bench.cli import app as bench_app
    from .export.cli import export
    from .train.cli import app as train_app

    app.command()(export)
    app.add_typer(bench_app, name="bench")
    app.add_typer(train_app, name="train")
    try:
        from .train.eval_cli import eval_command
    except ImportError:  # the evaluation command arrives with the distillation work
        return
    app.command(name="eval")(eval_command)
    from .train.figures import spectrograms_command

    app.command(name="eval-spectrograms")(spectrograms_command)
    from .train.control_cli import eval_control_command

    app.command(name="eval-control")(eval_control_command)


_register_groups()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
