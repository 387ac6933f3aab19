"""The other steer kinds: ``actadd`` (residual-stream difference of prompt pairs),
``token-steer`` (scale tokens' average probability) and ``analyze`` (the regression of
-log average probability on the output embeddings that ``token-steer`` builds on).

Example::

    steerport actadd gpt2 --plus " Love" --minus " Hate" --layer 6 --out love.st
    steerport token-steer smollm2-135m --token " great" --scale 3 --out great.st
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from steerport.cli.common import (
    FINITE,
    POSITIVE,
    DeviceOpt,
    DtypeOpt,
    LinesOpt,
    ModelArg,
    TextOpt,
    check_at_least,
    counting,
    file_option,
    finite_option,
    read_lines,
    read_prompts,
    say,
    show,
    status,
    table,
)
from steerport.errors import SteerportError

MaxTokensOpt = Annotated[int, typer.Option(help="Tokens per text.")]


def actadd_cmd(
    model: ModelArg,
    plus: Annotated[list[str], typer.Option("--plus", help="Positive prompt, e.g. ' Love'; repeat for several pairs.")],
    minus: Annotated[list[str], typer.Option("--minus", help="Negative prompt, e.g. ' Hate'; one per --plus, in order.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .st steer.")],
    layer: Annotated[str, typer.Option(help="Decoder layer: an index (6, -3) or a fraction of depth (0.25).")] = "0.2",
    coeff: Annotated[float, finite_option(bound=FINITE, help="Recommended coefficient c (stored as the base scale; the paper uses 5 for "
            "Love-Hate).")] = 5.0,
    positions: Annotated[str, typer.Option(help="front (paper: the prompt's first P positions) or all.")] = "front",
    kappa: Annotated[Optional[float], finite_option(bound=POSITIVE, help="Instead of --coeff: the coefficient at which the mean KL from "
            "the unsteered model on neutral text (bundled) is KAPPA nats/token, e.g. 0.1. Recommended for --positions all.")] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
):
    """ActAdd: the residual-stream difference of prompt pairs at a decoder layer, as a steer."""
    from steerport.actadd import calibrate_value, make_actadd
    from steerport.models import load_model
    from steerport.strength import try_record_curve
    from steerport.texts import neutral

    if len(plus) != len(minus):
        raise SteerportError(f"give one --minus per --plus (got {len(plus)} --plus and {len(minus)} --minus)")
    lm = load_model(model, dtype=dtype, device=device)
    steer = make_actadd(lm, list(zip(plus, minus)), layer=layer, coeff=coeff, positions=positions)
    note = ""
    if kappa is not None:
        texts = neutral("calib", limit=16)
        with status(f"finding the coefficient for κ = {kappa:g} nats/token"):
            unit = replace(steer, epsilon=1.0)
            steer.epsilon, reached = calibrate_value(lm, unit, texts, kappa, start=coeff)
        steer.meta["coefficient_for_kappa"] = {"kappa": kappa, "reached": reached, "neutral_texts": len(texts)}
        note = f" (κ = {reached:.3g} nats/token on neutral text)"
        if abs(math.log(reached / kappa)) > 0.1:
            say(f"note: κ = {kappa:g} was not reached (closest {reached:.3g}); this vector's effect "
                "may saturate below it at this layer")
    with status("measuring the strength curve on neutral text"):
        try_record_curve(lm, steer, say)
    steer.save(out_path)
    v = steer.tensors["vector"]
    say(f"wrote {out_path}: layer {steer.meta['layer']}/{steer.meta['n_layers']}, "
        f"vector {tuple(v.shape)}, |v| {v.norm():.3g}, coefficient {steer.epsilon:.4g}{note}, {len(plus)} pair(s)")


def analyze_cmd(
    model: ModelArg,
    text: TextOpt = None,
    lines: LinesOpt = 100,
    max_tokens: MaxTokensOpt = 128,
    png: Annotated[Optional[Path], typer.Option(help="PCA picture of the output embeddings coloured by probability rank.")] = None,
    prune_curve: Annotated[bool, typer.Option("--prune-curve", help="Also remove dims progressively and measure KL + generation "
            "similarity.")] = False,
    prune_png: Annotated[Optional[Path], typer.Option(help="PNG of the prune curve (default: next to --png).")] = None,
    prompts: Annotated[Optional[Path], file_option(what="prompts file", help="Prompts for the generation-similarity measure (default: "
            "16 texts' first words).")] = None,
    rank_by: Annotated[str, typer.Option(help="Dimension importance: slope (standardized |A_i|), t, or random.")] = "slope",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full result (slopes, t, log p, curve) as JSON.")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
):
    """Regress -log(average probability) on the output embeddings (Cho et al.): R², slopes, significance."""
    from steerport import tokenprob as tp
    from steerport.fileio import atomic_write_json
    from steerport.models import load_model

    check_at_least("--max-tokens", max_tokens, 1)
    texts = read_lines(text, lines)
    lm = load_model(model, dtype=dtype, device=device)
    with counting("average distribution", total=len(texts)) as advance:
        stats = tp.collect_head_stats(lm, texts, max_tokens=max_tokens, progress=advance)
    enc = tp.fit_encoding(lm.output_embeddings, stats.log_alpha)
    summary = enc.summary()
    t = table(title=f"{model}: -log α ≈ A·e + B over {enc.n_tokens} tokens, {stats.positions} positions")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("R²", f"{enc.r2:.4f}")
    t.add_row("adjusted R²", f"{enc.adj_r2:.4f}")
    t.add_row("dims with p < 0.05", f"{summary['significant_dims_p<0.05']} / {enc.hidden_size}")
    t.add_row("dims significant after Bonferroni", f"{summary['significant_dims_bonferroni']} / {enc.hidden_size}")
    show(t)
    dims = table("dim", "slope A_i", "t", "log10 p", title="most significant dimensions")
    for row in summary["top_dims"]:
        dims.add_row(str(row["dim"]), f"{row['slope']:.4g}", f"{row['t']:.1f}", f"{row['log10_p']:.1f}")
    show(dims)
    result = {"model": model, "texts": len(texts), "positions": stats.positions, **summary,
              "slopes": enc.slopes.tolist(), "t": enc.t.tolist(), "log_p": enc.log_p.tolist()}
    if png:
        tp.plot_pca(lm.output_embeddings, stats.log_alpha, png, title=f"{model}: output embeddings (PCA)")
        say(f"wrote {png}")
    if prune_curve:
        gen_prompts = read_prompts(prompts) if prompts else [" ".join(t.split()[:8]) for t in texts[:16]]
        with counting("removing dims", total=10) as advance:
            rows = tp.prune_curve(lm, enc, stats, gen_prompts, rank_by=rank_by, progress=advance)
        curve = table("removed", "dims", "KL avg dist", "mean KL per position", "generation similarity",
                      title=f"dimension removal (rank by {rank_by})")
        for r in rows:
            curve.add_row(f"{r['fraction']:.0%}", str(r["dims_removed"]), f"{r['kl_avg']:.2e}", f"{r['kl_pos']:.3g}", f"{r['gen_sim']:.3f}")
        show(curve)
        result["prune_curve"] = rows
        where = prune_png or (png.with_name(png.stem + "_prune.png") if png else None)
        if where:
            tp.plot_prune(rows, where, title=f"{model}: dimension removal")
            say(f"wrote {where}")
    if json_out:
        atomic_write_json(json_out, result)


def token_steer_cmd(
    model: ModelArg,
    token: Annotated[list[str], typer.Option("--token", help="A single token's text, e.g. ' great'; repeat.")],
    scale: Annotated[list[float], finite_option("--scale", bound=POSITIVE, help="Factor r for its average probability; one per --token.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .st steer.")],
    detect: Annotated[Optional[Path], file_option(what="text file", help="Detect text for the regression; default: the bundled neutral "
            "text.")] = None,
    lines: LinesOpt = 100,
    max_tokens: MaxTokensOpt = 128,
    b: Annotated[float, finite_option(bound=FINITE, help="Softness of Ω (0 = uniform over dims).")] = 2.0,
    step: Annotated[str, typer.Option(help="corrected (solve the step so r̂ = r on the detect text) or paper (Algorithm 1's "
            "step log r).")] = "corrected",
    direction: Annotated[str, typer.Option(help="steady (Σ⁻¹μ of the detect text's head inputs: the same logit offset at every "
            "position) or regression (the paper's -Ω⊙A⁻¹).")] = "steady",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
):
    """Scale tokens' average probability by moving only their output-embedding rows (Cho et al.); by default the
    step is solved so the detect text's average probability changes by exactly r (--step paper: Algorithm 1)."""
    from steerport.models import load_model
    from steerport.strength import try_record_curve
    from steerport.tokenprob import token_steer

    if len(token) != len(scale):
        raise SteerportError(f"give one --scale per --token (got {len(token)} --token and {len(scale)} --scale)")
    check_at_least("--max-tokens", max_tokens, 1)
    wanted = dict(zip(token, scale))
    texts = read_lines(detect, lines)
    lm = load_model(model, dtype=dtype, device=device)
    with counting("average distribution", total=len(texts)) as advance:
        steer, _, enc = token_steer(lm, texts, wanted, b=b, step=step, direction_rule=direction, max_tokens=max_tokens,
                                    detect={"file": str(detect or "bundled neutral text")}, progress=advance)
    with status("measuring the strength curve on neutral text"):
        try_record_curve(lm, steer, say)
    steer.save(out_path)
    t = table("token", "id", "r asked", "r̂ on detect text", "|log r - log r̂|",
              title=f"adjusted R² {enc.adj_r2:.3f}, {direction} direction, {step} step")
    for (text, r), tid, r_hat in zip(wanted.items(), steer.tensors["token_ids"].tolist(), steer.meta["detect_r_hat"]):
        t.add_row(repr(text), str(tid), f"{r:g}", f"{r_hat:.3g}", f"{abs(math.log(r) - math.log(r_hat)):.3f}")
    show(t)
    say(f"wrote {out_path}")


def register(app: typer.Typer) -> None:
    app.command("actadd")(actadd_cmd)
    app.command("token-steer")(token_steer_cmd)
    app.command("analyze")(analyze_cmd)
