"""What every command shares: printing, the one progress display, option types and the checks
of user input at the boundary.

Printing: results go to stdout (:func:`show` for tables, :func:`print_json` for JSON, :func:`echo`
for lines), messages and errors to stderr (:func:`say`). Neither interprets rich markup or emoji
codes, so a path like ``runs/[bold]:smile:.st`` comes back exactly as typed.

Input checks: :func:`parse_steer_arg` reads ``FILE.st[:VALUE]`` (the value must be a finite
number); float options are built with :func:`finite_option` (finite, optionally within bounds);
input files with :func:`file_option` (must exist); data files are read only through
:mod:`steerport.texts`, which turns a missing or undecodable file into one line.

Nothing heavy is imported here: rich, torch and the library load inside the functions.

Example::

    @app.command()
    def cmd(model: ModelArg, steer: SteerOpt = [], value: Annotated[float, finite_option(help="s")] = 1.0):
        steers = load_steers(steer)
        with counting("scoring", total=10) as advance:
            ...
        say(f"wrote {path}")
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from steerport.errors import SteerportError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from steerport.steer import Steer

# --------------------------------------------------------------------------- printing


@cache
def stdout_console() -> Console:
    """The console for results on stdout: no markup, no emoji codes, no highlighting, no wrapping."""
    from rich.console import Console

    return Console(markup=False, emoji=False, highlight=False, soft_wrap=True)


@cache
def stderr_console() -> Console:
    """The console on stderr that progress displays draw on (same plain settings)."""
    from rich.console import Console

    return Console(stderr=True, markup=False, emoji=False, highlight=False, soft_wrap=True)


def split_options(device_map: str | None, max_memory: list[str], offload_folder: Path | None) -> dict[str, Any]:
    """load_model's keyword arguments for --device-map / --max-memory / --offload-folder."""
    from steerport.models import parse_max_memory

    if device_map is None and (max_memory or offload_folder is not None):
        raise SteerportError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto)")
    if device_map not in (None, "auto", "balanced", "balanced_low_0", "sequential"):
        raise SteerportError(f"--device-map {device_map!r}: use auto, balanced, balanced_low_0 or sequential")
    return {"device_map": device_map, "max_memory": parse_max_memory(max_memory), "offload_folder": offload_folder}


def say(message: str) -> None:
    """A message for the user on stderr, printed as plain text (above a running progress bar)."""
    print(message, file=sys.stderr, flush=True)  # sys.stderr looked up now: rich redirects it under a live bar


def echo(text: str) -> None:
    """A line of results on stdout, plain text."""
    print(text, flush=True)


def show(renderable: Any) -> None:
    """A rich renderable (a table) on stdout; its strings are not parsed as markup."""
    stdout_console().print(renderable)


def print_json(doc: Any, *, indent: int | None = 2) -> None:
    """A JSON document on stdout (``indent=None``: one line, for JSON Lines)."""
    print(json.dumps(doc, indent=indent, ensure_ascii=False, default=float), flush=True)


def table(*columns: str, **kwargs: Any):
    """A rich Table (imported only when a command draws one)."""
    from rich.table import Table

    return Table(*columns, **kwargs)


def surface(s: str) -> str:
    """A token surface for a table: leading/trailing spaces shown as ␣, newlines and tabs escaped."""
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    stripped = s.strip(" ")
    lead, trail = len(s) - len(s.lstrip(" ")), len(s) - len(s.rstrip(" "))
    return "␣" * lead + stripped + "␣" * trail if stripped else repr(s)


# --------------------------------------------------------------------------- progress


def make_progress(*, info: bool = False, remaining: bool = False) -> Progress:
    """THE progress display: a rich Progress on stderr, drawn only when stderr is a terminal.

    ``info`` adds a column for a task's ``info`` field (rates, losses); ``remaining`` an ETA.
    Every task must then be added with ``info=...``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = stderr_console()
    columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns.append(TimeElapsedColumn())
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


@contextmanager
def counting(description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
    """A one-task progress bar; yields ``advance(n=1)``, the library's ``progress`` callback."""
    with make_progress() as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


@contextmanager
def status(description: str) -> Iterator[Callable[[str], None]]:
    """A bar without a total for one long call; yields ``update(message)`` to change its text."""
    with make_progress() as bar:
        task = bar.add_task(description, total=None)
        yield lambda message: bar.update(task, description=message)


# --------------------------------------------------------------------------- checks of user input


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_steer_arg(arg: str) -> tuple[Path, float]:
    """``"toxic.st:-5"`` -> (Path("toxic.st"), -5.0); no value means 1.

    The value is what follows the last ``:`` when that is a number, or when the part before it
    names a ``.st`` file. A value that is not a finite number (``nan``, ``inf``, ``x``) is an error.
    """
    path, sep, value = arg.rpartition(":")
    if not (sep and path) or "/" in value or "\\" in value:
        return Path(arg), 1.0
    number = _number(value)
    if number is None and not path.endswith(".st"):
        return Path(arg), 1.0  # a colon inside a file name
    if number is None or not math.isfinite(number):
        raise SteerportError(f"--steer {arg}: the value {value!r} is not a finite number (FILE.st[:VALUE])")
    return Path(path), number


def load_steers(args: list[str]) -> list[tuple[Steer, float]]:
    """``--steer`` arguments -> [(Steer, value)]; every value checked before any file is read."""
    from steerport.steer import Steer

    parsed = [parse_steer_arg(a) for a in args]
    return [(Steer.load(p), v) for p, v in parsed]


def one_steer(arg: str) -> tuple[Steer, float, Path]:
    """A single ``--steer FILE.st[:VALUE]`` -> (Steer, value, path)."""
    from steerport.steer import Steer

    path, value = parse_steer_arg(arg)
    return Steer.load(path), value, path


Bound = tuple[str, Callable[[float], bool]]
FINITE: Bound = ("a finite number", lambda v: True)
POSITIVE: Bound = ("a finite number above 0", lambda v: v > 0)
NON_NEGATIVE: Bound = ("a finite number of at least 0", lambda v: v >= 0)
FRACTION: Bound = ("a finite number in [0, 1)", lambda v: 0 <= v < 1)
PROBABILITY_MASS: Bound = ("a finite number in (0, 1]", lambda v: 0 < v <= 1)


def check_float(name: str, value: float | None, bound: Bound = FINITE) -> float | None:
    """``value`` if it is None or finite and within ``bound``; else a one-line SteerportError."""
    if value is not None and not (math.isfinite(value) and bound[1](value)):
        raise SteerportError(f"{name} must be {bound[0]}, got {value:g}")
    return value


def finite_option(*decls: str, bound: Bound = FINITE, **kwargs: Any):
    """A typer Option for a float (or list of floats) that must be finite and within ``bound``."""

    def check(ctx, param, value):  # typer passes (ctx, param, value) by position
        name = param.opts[0] if getattr(param, "opts", None) else f"--{param.name}"
        for v in value if isinstance(value, (list, tuple)) else [value]:
            check_float(name, v, bound)
        return value

    return typer.Option(*decls, callback=check, **kwargs)


def file_option(*decls: str, what: str = "file", **kwargs: Any):
    """A typer Option for an input file that must exist (``what`` names it in the error)."""

    def check(ctx, param, value):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not Path(v).is_file():
                raise SteerportError(f"{v}: no such {what}" if not Path(v).is_dir() else f"{v}: is a folder, not a {what}")
        return value

    return typer.Option(*decls, callback=check, **kwargs)


def check_at_least(name: str, value: int | None, low: int) -> None:
    """An integer option's lower bound, as a one-line error."""
    if value is not None and value < low:
        raise SteerportError(f"{name} must be at least {low}, got {value}")


# --------------------------------------------------------------------------- reading user files (all through steerport.texts)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file (field text, prompt or prompt.text) or one per line of a text file."""
    from steerport.texts import read_texts

    return read_texts(path, min_chars=1)


def read_lines(path: str | Path | None, limit: int | None = None, skip: int = 0, min_chars: int = 40) -> list[str]:
    """Plain texts (neutral / detect text); ``None`` is the bundled neutral text."""
    from steerport.texts import read_texts

    return read_texts(path, limit=limit, skip=skip, min_chars=min_chars)


def read_optional(path: str | Path | None, *, min_chars: int = 1) -> list[str] | None:
    """Texts of a file the user gave, or None (the library then uses its default)."""
    return None if path is None else read_lines(path, min_chars=min_chars)


def spec_slug(spec: str) -> str:
    """A file-name-safe short name of a model spec (catalog/alias as is, paths by their last part)."""
    name = Path(spec).name if ("/" in spec and Path(spec).exists()) or spec.endswith(".gguf") else spec
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix(".gguf")).strip("-") or "target"


# --------------------------------------------------------------------------- shared option types

ModelArg = Annotated[str, typer.Argument(help="Model: alias, catalog name, hub id, local dir or .gguf file.")]
SteerOpt = Annotated[
    list[str],
    typer.Option("--steer", "-s", help="A steer file with an optional value, FILE.st[:VALUE] (default value 1). Repeat to compose."),
]
OneSteerOpt = Annotated[str, typer.Option("--steer", "-s", help="The steer, FILE.st[:VALUE] (value default 1).")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 where the CPU/GPU runs it fast), float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")]
DeviceMapOpt = Annotated[Optional[str], typer.Option("--device-map", help="auto: split a model too large for one device over the "
        "GPUs, the CPU and the disk (accelerate); --device is then ignored.")]
MaxMemoryOpt = Annotated[list[str], typer.Option("--max-memory", help="With --device-map: the most memory a device may hold, "
        "DEVICE=AMOUNT (0=70GiB, cpu=200GiB); repeat per device.")]
OffloadOpt = Annotated[Optional[Path], typer.Option("--offload-folder", help="With --device-map: where layers that fit no device go "
        "(default: a temporary folder).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Apply steers even if made for a model with another fingerprint.")]
TextOpt = Annotated[Optional[Path], file_option(what="text file", help="Text file (.txt/.raw one text per line, or .jsonl with text); "
        "default: the bundled neutral text.")]
LinesOpt = Annotated[int, typer.Option(help="Use at most this many texts.")]
MethodOpt = Annotated[str, typer.Option(help="Mapping fit: lstsq, ridge or procrustes (closed form).")]
