"""The ``steerport`` command line: a thin shell over the library.

Every command takes a MODEL spec: an alias (gpt2, gpt-j), a catalog name (smollm2-135m),
a hub id (org/name), a local model directory or a .gguf file.

Layout: one module per group of commands, each with a ``register(app)`` that adds its commands
(:mod:`~steerport.cli.models` models/pull, :mod:`~steerport.cli.steer` generate/inspect,
:mod:`~steerport.cli.train`, :mod:`~steerport.cli.transfer` map/transfer and its aliases,
:mod:`~steerport.cli.measure` evaluate/score/sweep/explain/judge-*, :mod:`~steerport.cli.seeds`
actadd/token-steer/analyze, :mod:`~steerport.cli.ship` merge/export-cvec/import-cvec,
:mod:`~steerport.cli.demo`, :mod:`~steerport.cli.strength` calibrate); what they share is in :mod:`~steerport.cli.common`.
Command modules import nothing heavy at module level (torch, transformers and the library load
inside each command), so ``steerport --help`` stays fast.

Example::

    steerport generate smollm2-135m --steer positive.st:3 --prompt "The movie was"
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import sys
import threading

import click
import typer

from steerport.cli.common import parse_steer_arg, read_prompts  # noqa: F401  (public helpers, used by benchmarks)
from steerport.errors import SteerportError

app = typer.Typer(
    help="Train LM-Steer steers, apply them, and carry them between language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "FILE[@START:STOP]" must not be read as a rich tag
)

COMMAND_GROUPS = (
    "steerport.cli.models",
    "steerport.cli.steer",
    "steerport.cli.train",
    "steerport.cli.transfer",
    "steerport.cli.measure",
    "steerport.cli.seeds",
    "steerport.cli.ship",
    "steerport.cli.demo",
    "steerport.cli.strength",
)

# Optional command groups that live with their feature. Each is a module with a
# ``register(app: typer.Typer) -> None`` that adds its commands; it is imported only when it is
# present in this installation, and must itself import nothing heavy at module level (so that
# ``steerport --help`` stays fast): ``serve`` (the HTTP server) and ``export-lora``.
OPTIONAL_GROUPS = (
    "steerport.serve.command",
    "steerport.lora",
)


def _present(module: str) -> bool:
    """Whether ``module`` exists, without importing it (its parent packages are imported)."""
    parts = module.split(".")
    return all(importlib.util.find_spec(".".join(parts[: i + 1])) is not None for i in range(len(parts)))


def register_groups(target: typer.Typer) -> None:
    """Add every command group (and each optional group that is installed) to ``target``."""
    for module in COMMAND_GROUPS:
        importlib.import_module(module).register(target)
    for module in OPTIONAL_GROUPS:
        if _present(module):
            importlib.import_module(module).register(target)


register_groups(app)


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """click's exception class ``name``, and typer's vendored copy of it where there is one
    (typer ≥ 0.26 parses with its own copy of click, whose exceptions are not click's)."""
    try:
        from typer._click import exceptions as vendored

        theirs = getattr(vendored, name, None)
    except ImportError:
        theirs = None
    return (getattr(click.exceptions, name),) + ((theirs,) if isinstance(theirs, type) else ())


_USAGE_ERRORS, _EXITS, _ABORTS = (_click_classes(n) for n in ("ClickException", "Exit", "Abort"))


def main() -> None:
    """Entry point: bad input becomes one plain line on stderr and exit code 1."""
    try:
        app(standalone_mode=False)
    except SteerportError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except _USAGE_ERRORS as e:  # usage errors: click's own message
        e.show()  # type: ignore[attr-defined]
        sys.exit(getattr(e, "exit_code", 1))
    except _EXITS as e:
        sys.exit(getattr(e, "exit_code", 0))
    except _ABORTS:
        print("interrupted", file=sys.stderr)
        sys.exit(1)


def run() -> None:
    """The ``steerport`` command: :func:`main`, then an exit without Python's module teardown.

    A finished command has nothing left for the interpreter's shutdown to do but tear down every
    module, which for torch alone takes ~0.3 s (of a ~2 s warm ``steerport transfer``). Here
    non-daemon threads are waited for, the exit handlers run (logging, temporary folders) and
    stdout/stderr are flushed, as at a normal exit; then the process ends. Everything steerport
    writes is closed (atomic writes) or a flushed memory map before that. An exception other than
    SystemExit takes the normal path (traceback included).
    """
    try:
        main()
        status = 0
    except SystemExit as e:
        status = _exit_status(e.code)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(status)


def _exit_status(code: object) -> int:
    """The process status for ``sys.exit(code)``, as Python computes it (a message prints, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
