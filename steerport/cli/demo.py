"""``steerport demo``: the main job end to end on shipped data and offline models.

Example::

    steerport demo --out steerport-demo
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steerport.cli.common import DeviceOpt, DtypeOpt, finite_option, say, show, table
from steerport.cli.train import train_progress


def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the steers and results.json.")] = Path("steerport-demo"),
    source: Annotated[str, typer.Option(help="Model the steer is trained on.")] = "smollm2-135m",
    target: Annotated[str, typer.Option(help="Model the steer is transferred to.")] = "gemma3-270m",
    value: Annotated[float, finite_option(help="Steer value used for scoring and generation.")] = 1.0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
):
    """The main job on shipped data and offline models: train a sentiment steer on SOURCE, transfer it
    to TARGET, and measure both (held-out AUC, steered generations). A few minutes on 2 CPU cores."""
    from steerport.demo import run_demo

    bar, update = train_progress()
    with bar:
        r = run_demo(out_dir, source=source, target=target, value=value, log=say, train_progress=update,
                     dtype=dtype, device=device)
    t = table("model", "steer", "held-out SST-2 ROC AUC (steer as classifier)", title="sentiment steer")
    t.add_row(source, "trained natively", f"{r['source']['auc']:.3f}")
    t.add_row(target, f"transferred ({r['lineage']['form']} form)", f"{r['target']['auc']:.3f}")
    show(t)
    for model, by_value in r["generations"].items():
        gen = table("prompt", *by_value, title=f"{model}: greedy continuations by steer value", show_lines=True)
        for i, prompt in enumerate(r["prompts"]):
            gen.add_row(prompt, *(texts[i] for texts in by_value.values()))
        show(gen)
    say(f"done in {r['seconds']:.0f} s; steers and results.json in {out_dir}/")


def register(app: typer.Typer) -> None:
    app.command()(demo)
