"""``python -m steerport.serve MODEL --steer NAME=FILE.st`` (the same as ``steerport serve``)."""

from __future__ import annotations

import sys

import typer

from steerport.errors import SteerportError
from steerport.serve.command import serve_command


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(serve_command)
    try:
        app(standalone_mode=False)
    except SteerportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
