"""``steerport demo``: the main job end to end on shipped data and offline models.

Example::

    steerport demo --out steerport-demo
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from steerport.cli.common import POSITIVE, DeviceOpt, DtypeOpt, check_at_least, finite_option, say, show, table
from steerport.cli.train import train_progress


def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the steers and results.json.")] = Path("steerport-demo"),
    source: Annotated[str, typer.Option(help="Model the steer is trained on.")] = "smollm2-135m",
    target: Annotated[str, typer.Option(help="Model the steer is transferred to.")] = "gemma3-270m",
    value: Annotated[Optional[float], finite_option(bound=POSITIVE, help="Steer value s for generation (at -s, 0, +s "
                     "on both models). Default: where the source steer's KL budget on neutral text is --kappa.")] = None,
    kappa: Annotated[float, finite_option(bound=POSITIVE, help="KL budget (nats/token) that picks the default value.")] = 0.1,
    prompts: Annotated[int, typer.Option(help="Shipped neutral prompts judged per value and model (at most 50).")] = 50,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
):
    """The main job on shipped data and offline models: train a sentiment steer on SOURCE, transfer it
    to TARGET (value calibrated to the source's strength), and show both at work: held-out AUC, the
    strength ratio, and the offline judge's positive share of steered continuations on both models.
    A few minutes on 2 CPU cores."""
    from steerport.demo import run_demo

    check_at_least("--prompts", prompts, 4)
    bar, update = train_progress()
    with bar:
        r = run_demo(out_dir, source=source, target=target, value=value, kappa=kappa, n_prompts=prompts, log=say,
                     train_progress=update, dtype=dtype, device=device)
    print_results(r)
    say(f"done in {r['seconds']:.0f} s; steers and results.json in {out_dir}/")


def print_results(r: dict) -> None:
    """The demo's tables: AUC, strength ratio and judge shares per value, then examples."""
    source, target, value, st = r["source_model"], r["target_model"], r["value"], r["strength"]
    t = table("model", "steer", "held-out SST-2 AUC", title=f"sentiment steer as a classifier ({r['test_texts']} test sentences)")
    t.add_row(source, "trained natively", f"{r['source']['auc']:.3f}")
    t.add_row(target, f"transferred ({r['lineage']['form']} form)", f"{r['target']['auc']:.3f}")
    show(t)
    g = r["generation_settings"]
    keys = [f"{s:+g}" for s in g["values"]]
    t = table("steer value", f"{source} (native)", f"{target} (transferred)",
              title=f"judged positive: share of {g['prompts']} sampled continuations [95 % Wilson interval]",
              caption=f"strength ratio {st['ratio_at_1']:.2f} at s = 1, {st['ratio_at_value']:.2f} at s = {value:g} "
                      f"({target} value giving {source}'s KL budget at s, divided by s; 1 = equally strong)")
    for k in keys:
        cells = [r["generation"][spec][k]["judge"] for spec in (source, target)]
        t.add_row(k, *(f"{j['share']:.2f} [{j['low']:.2f}, {j['high']:.2f}]" for j in cells))
    by_share, by_prob = r["swing"], r.get("swing_mean_prob")

    def with_interval(swing: dict, key: str, fmt: str) -> str:
        x, (lo, hi) = swing[key], swing.get("interval_95", {}).get(key, (math.nan, math.nan))
        return f"{x:{fmt}}" + (f" [{lo:{fmt}}, {hi:{fmt}}]" if not (math.isnan(lo) or math.isnan(hi)) else "")

    t.add_row(f"swing {keys[-1]} vs {keys[0]}", *(with_interval(by_share, spec, "+.2f") for spec in (source, target)))
    if by_prob is not None:
        t.add_row("same, by mean P(positive)", *(with_interval(by_prob, spec, "+.2f") for spec in (source, target)))
    show(t)

    def ratio(swing: dict, what: str) -> str:
        if swing["target_over_source"] is None:
            return f"(the native steer does not move {source}'s {what} up)"
        return f"{with_interval(swing, 'target_over_source', '.2f')}x as much as the native steer moves {source}'s"

    say(f"the transferred steer moves {target}'s judged-positive share {ratio(by_share, 'judged-positive share')}"
        + (f", and its mean P(positive) {ratio(by_prob, 'mean P(positive)')}" if by_prob is not None else "")
        + f" (95 % paired bootstrap over prompts); value ±{value:g} chosen by {st['value_chosen_by']}; strength ratio "
        "measured on neutral text the calibration did not use; sampled with a fixed seed; judge: the shipped offline "
        "TF-IDF sentiment judge")
    for spec in (source, target):
        for kind in ("greedy", "sampled"):
            rows = r["generation"][spec]
            ex = table("prompt", *keys, title=f"{spec}: {kind} continuations by steer value", show_lines=True)
            for i, prompt in enumerate(r["prompts"][: g["examples"]]):
                ex.add_row(prompt, *(rows[k][kind][i] for k in keys))
            show(ex)


def register(app: typer.Typer) -> None:
    app.command()(demo)
