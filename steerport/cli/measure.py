"""Measuring steers: ``evaluate`` (matched-KL comparison), ``score`` (steer as classifier),
``sweep`` (κ and separation against the value), ``explain`` (per-token evidence) and the
judge commands ``judge-train`` / ``judge-score``.

Example::

    steerport score smollm2-135m --steer positive.st:3 --data heldout.jsonl
    steerport sweep smollm2-135m --steer positive.st --values=-5:5:11 --data heldout.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from steerport.cli import common
from steerport.errors import SteerportError

DataOpt = Annotated[Path, common.file_option(what="data file", help="JSONL with a text field (and optional labels) or a text file.")]
PositiveLabelsOpt = Annotated[Optional[list[str]], typer.Option(help="Label value(s) meaning the steer's positive class; default 1. "
        "Repeat for several.")]


def _labeled(path: Path, text_field: str, label_field: str, positive: list[str], *, require: bool):
    from steerport.texts import read_texts_and_labels

    return read_texts_and_labels(path, text_field=text_field, label_field=label_field, positive_labels=positive,
                                 require_labels=require)


def _neutral(path: Optional[Path], n: int) -> list[str]:
    """The user's neutral text, or the bundled ``calib`` split (KL budgets)."""
    from steerport.texts import neutral

    return common.read_lines(path, limit=n) if path else neutral("calib", limit=n)


def _positive_labels(steer, given: Optional[list[str]]) -> list[str]:
    """Label values meaning the steer's positive class: --positive-label, else the trainer's record, else 1."""
    from steerport.sweep import recorded_positive_labels

    return list(given) if given else (recorded_positive_labels(steer) or ["1"])


def _note_mapping(steer, given, positive: list[str], label_field: str) -> None:
    if given:
        return
    source = "as recorded in the steer" if positive != ["1"] or "data" in steer.meta else "by default"
    common.say(f"note: {label_field} in {positive} counts as the steer's positive class "
        f"({steer.positive or '+'}), {source}; pass --positive-label to change it")


def evaluate(
    model: common.ModelArg,
    steer: common.SteerOpt = [],
    data: Annotated[Optional[Path], common.file_option(what="data file", help="Held-out labeled JSONL (fields --text-field / "
            "--label-field).")] = None,
    text_field: str = "text",
    label_field: str = "label",
    positive_label: Annotated[str, typer.Option(help="Label value of the positive class (the steer's + side), e.g. 0 for "
            "non-toxic.")] = "1",
    per_class: Annotated[int, typer.Option(help="Held-out texts per class (seeded sample).")] = 150,
    native: Annotated[Optional[str], typer.Option(help="Which steer is native (index from 0 or its path); default the first.")] = None,
    kappa: Annotated[Optional[float], common.finite_option(bound=common.POSITIVE, help="KL budget in nats; default: κ of "
            "the native steer at its given value.")] = None,
    reference_text: Annotated[Optional[Path], common.file_option(what="text file", help="Neutral text, one paragraph per line (default: "
            "bundled neutral text).")] = None,
    n_reference: Annotated[int, typer.Option(help="Lines of neutral text to use.")] = 64,
    prompts: Annotated[Optional[Path], common.file_option(what="prompts file", help="Prompts for generation metrics (JSONL prompt.text / "
            "prompt / text, or text).")] = None,
    n_prompts: int = 20,
    samples: Annotated[int, typer.Option(help="Samples per prompt.")] = 2,
    max_new_tokens: int = 30,
    judge: Annotated[Optional[str], typer.Option(help="sentiment | toxicity (shipped offline judges), a .judge file, or "
            "hf:MODEL[:LABEL].")] = None,
    reference_model: Annotated[Optional[str], typer.Option(help="Model for perplexity of generations (another model than MODEL).")] = None,
    seed: int = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full report (every number and setting) here.")] = None,
    dtype: common.DtypeOpt = "auto",
    device: common.DeviceOpt = "cpu",
    force: common.ForceOpt = False,
):
    """Compare steers on MODEL at matched KL: separation, retained effect, AUC, agreement, generation."""
    from steerport import __version__
    from steerport.evaluate import EvalSettings, balanced_sample, evaluate_steers, file_info, report_tables
    from steerport.fileio import atomic_write_json
    from steerport.judges import load_judge
    from steerport.models import load_model

    if not steer:
        raise SteerportError("give at least one --steer FILE.st[:VALUE]")
    if data is None:
        raise SteerportError("give held-out labeled data with --data FILE.jsonl")
    parsed = [common.parse_steer_arg(a) for a in steer]
    names = [p.stem if [q.stem for q, _ in parsed].count(p.stem) == 1 else str(p) for p, _ in parsed]
    nat = 0
    if native is not None:
        matches = [i for i, (p, _) in enumerate(parsed) if native in (str(i), str(p), p.name, p.stem)]
        if not matches:
            raise SteerportError(f"--native {native!r} is neither an index nor one of the given steers")
        nat = matches[0]
    loaded = common.load_steers(steer)
    texts, labels = _labeled(data, text_field, label_field, [positive_label], require=True)
    settings = EvalSettings(kappa=kappa, heldout_per_class=per_class, neutral_texts=n_reference, n_prompts=n_prompts,
                            samples_per_prompt=samples, max_new_tokens=max_new_tokens, seed=seed)
    heldout = balanced_sample(texts, labels, per_class, seed)
    neutral = _neutral(reference_text, n_reference)
    prompt_list = common.read_prompts(prompts)[:n_prompts] if prompts else []
    the_judge = load_judge(judge) if judge else None
    lm = load_model(model, dtype=dtype, device=device)
    ref = load_model(reference_model, dtype=dtype, device=device) if reference_model and prompt_list else None
    with common.status("evaluating") as update:
        report = evaluate_steers(lm, list(zip(names, (s for s, _ in loaded))), heldout=heldout, neutral=neutral,
                                 settings=settings, native=nat, native_value=parsed[nat][1], prompts=prompt_list,
                                 judge=the_judge, reference=ref, force=force, progress=update)
    report["steerport_version"] = __version__
    report["files"] = {"data": file_info(data), "reference_text": file_info(reference_text) if reference_text else "bundled neutral text",
                       "prompts": file_info(prompts), "steers": {n: file_info(p) for n, (p, _) in zip(names, parsed)}}
    for t in report_tables(report):
        common.show(t)
    if json_out:
        atomic_write_json(json_out, report)
        common.say(f"wrote {json_out}")


def score(
    model: common.ModelArg,
    steer: common.OneSteerOpt,
    data: DataOpt,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Write one JSON line per text here.")] = None,
    text_field: str = "text",
    label_field: str = "label",
    positive_label: PositiveLabelsOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Score only the first N texts.")] = None,
    batch_size: int = 8,
    max_tokens: int = 256,
    dtype: common.DtypeOpt = "float32",
    device: common.DeviceOpt = "cpu",
    force: common.ForceOpt = False,
):
    """The steer as a classifier: score(x) = ℓ_{+s}(x) − ℓ_{−s}(x) per text; ROC AUC when labels are present."""
    from steerport.fileio import atomic_write_text
    from steerport.metrics import roc_auc
    from steerport.models import load_model
    from steerport.scoring import steer_scores
    from steerport.strength import warn_uncalibrated

    common.check_at_least("--batch-size", batch_size, 1)
    st, value, path = common.one_steer(steer)
    warn_uncalibrated([st], common.say)
    positive = _positive_labels(st, positive_label)
    texts, labels = _labeled(data, text_field, label_field, positive, require=False)
    if limit is not None:
        texts, labels = texts[:limit], (labels[:limit] if labels else None)
    if labels:
        _note_mapping(st, positive_label, positive, label_field)
    lm = load_model(model, dtype=dtype, device=device)
    scores: list[float] = []
    with common.counting("scoring", total=len(texts)) as advance:
        for i in range(0, len(texts), 64):  # in chunks, so the bar moves
            chunk = texts[i : i + 64]
            scores += steer_scores(lm, st, chunk, value, batch_size=batch_size, max_tokens=max_tokens, force=force).tolist()
            advance(len(chunk))
    if out_path is not None:
        rows = [{"text": t, "score": s, **({"label": labels[i]} if labels else {})} for i, (t, s) in enumerate(zip(texts, scores))]
        atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        common.say(f"wrote {len(rows)} scores to {out_path}")
    summary = {"steer": str(path), "value": value, "model": model, "n": len(texts), "mean_score": sum(scores) / len(scores)}
    if labels:
        if 0 < sum(labels) < len(labels):
            summary["roc_auc"] = roc_auc(scores, labels)
            summary["n_positive"] = sum(labels)
        else:
            common.say("note: only one class present; no ROC AUC")
    common.print_json(summary)


def sweep(
    model: common.ModelArg,
    steer: Annotated[str, typer.Option("--steer", "-s", help="The steer file (a value here is ignored).")],
    values: Annotated[str, typer.Option(help="START:STOP:COUNT or a comma list.")] = "-10:10:11",
    prompts: Annotated[Optional[Path], common.file_option(what="prompts file", help="Prompts to continue at each value (samples in the "
            "JSON).")] = None,
    data: Annotated[Optional[Path], common.file_option(what="data file", help="Labeled JSONL for the separation Sep(s).")] = None,
    neutral: Annotated[Optional[Path], common.file_option(what="text file", help="Neutral text for κ, one per line (default: 16 bundled "
            "neutral paragraphs).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for sweep.json and sweep.png.")] = Path("sweep"),
    limit: Annotated[int, typer.Option(help="Use at most N texts of each of data / neutral / prompts.")] = 64,
    samples: Annotated[int, typer.Option(help="Prompts to continue per value (0: none).")] = 3,
    max_new_tokens: int = 30,
    text_field: str = "text",
    label_field: str = "label",
    positive_label: PositiveLabelsOpt = None,
    judge: Annotated[Optional[str], typer.Option(help="Attribute judge for the continuations: sentiment, toxicity (bundled offline "
            "judges), a .judge file or a HF text-classification model.")] = None,
    dtype: common.DtypeOpt = "float32",
    device: common.DeviceOpt = "cpu",
    force: common.ForceOpt = False,
):
    """κ (KL budget) and separation / attribute rate against the steer value: sweep.json + sweep.png."""
    from steerport.fileio import atomic_write_json
    from steerport.models import load_model
    from steerport.sweep import parse_values, plot_sweep, sweep_json
    from steerport.sweep import sweep as do_sweep

    common.check_at_least("--limit", limit, 1)
    grid = parse_values(values)
    st, _, path = common.one_steer(steer)
    judge_fn = None
    if judge is not None:
        from steerport import judges

        judge_model = judges.load_judge(judge)
        judge_fn = lambda texts: judges.attribute_rate(judge_model, texts)["rate"]  # noqa: E731
    labeled = None
    if data is not None:
        positive = _positive_labels(st, positive_label)
        texts, labels = _labeled(data, text_field, label_field, positive, require=True)
        _note_mapping(st, positive_label, positive, label_field)
        # balanced slice: up to limit/2 of each class
        pos = [t for t, y in zip(texts, labels) if y][: limit // 2]
        neg = [t for t, y in zip(texts, labels) if not y][: limit // 2]
        labeled = (pos + neg, [1] * len(pos) + [0] * len(neg))
    prompt_texts = common.read_prompts(prompts)[:limit] if prompts else []
    neutral_texts = common.read_prompts(neutral)[:limit] if neutral else _neutral(None, min(limit, 16))
    if judge_fn is None and labeled is None:
        common.say("note: no --data and no --judge: the sweep shows κ only")
    lm = load_model(model, dtype=dtype, device=device)
    with common.counting("sweeping values", total=len(grid)) as advance:
        rows = do_sweep(lm, st, grid, neutral=neutral_texts, labeled=labeled,
                        prompts=prompt_texts[: (len(prompt_texts) if judge_fn else samples)],
                        max_new_tokens=max_new_tokens, judge=judge_fn, force=force, progress=lambda _value: advance())
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = sweep_json(rows, {
        "steer": str(path), "steer_fingerprint": st.fingerprint, "positive": st.positive, "model": model,
        "model_fingerprint": lm.fingerprint, "epsilon": st.epsilon,
        "neutral": str(neutral) if neutral else "bundled neutral text (calib split)",
        "n_neutral": len(neutral_texts), "data": str(data) if data else None,
        "n_labeled": len(labeled[0]) if labeled else 0, "judge": judge,
    })
    atomic_write_json(out_dir / "sweep.json", doc)
    plot_sweep(rows, out_dir / "sweep.png", title=f"{path.name} on {model}")
    t = common.table("value", "κ (nats/tok)", "Sep(s)", "attribute rate", title=f"{path.name} (+ = {st.positive or '+'})")
    for r in rows:
        t.add_row(f"{r.value:g}", f"{r.kl:.4f}", "" if r.separation is None else f"{r.separation:+.4f}",
                  "" if r.attribute_rate is None else f"{r.attribute_rate:.3f}")
    common.show(t)
    common.say(f"wrote {out_dir / 'sweep.json'} and {out_dir / 'sweep.png'}")


def explain(
    model: common.ModelArg,
    steer: common.OneSteerOpt,
    text: Annotated[Optional[str], typer.Option("--text", "-t", help="The text to explain.")] = None,
    text_file: Annotated[Optional[Path], common.file_option("--file", what="text file",
                                                            help="Read the text from this file instead.")] = None,
    spans: Annotated[int, typer.Option(help="How many evidence spans to find.")] = 3,
    html: Annotated[Optional[Path], typer.Option("--html", help="Also write an HTML page here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-token evidence as JSON.")] = False,
    dtype: common.DtypeOpt = "float32",
    device: common.DeviceOpt = "cpu",
    force: common.ForceOpt = False,
):
    """Which parts of a text carry the steer's verdict: per-token log p(+s) − log p(−s) and the top spans."""
    from steerport.explain import explain_text, render_html, render_rich
    from steerport.fileio import atomic_write_text
    from steerport.models import load_model
    from steerport.texts import read_file_text

    if text is not None and text_file is not None:
        raise SteerportError("give exactly one of --text or --file")
    if text_file is not None:
        text = read_file_text(text_file)
    if text is None:
        raise SteerportError("give exactly one of --text or --file")
    st, value, path = common.one_steer(steer)
    lm = load_model(model, dtype=dtype, device=device)
    ex = explain_text(lm, st, text, value, k=spans, force=force)
    if html is not None:
        atomic_write_text(html, render_html(ex, title=f"{path.name} at ±{value:g} on {model}"))
        common.say(f"wrote {html}")
    if as_json:
        common.print_json(ex.to_json())
        return
    common.echo(f"{path.name} at ±{value:g} (+ = {st.positive or '+'}): score {ex.score:+.4f} nats/token "
         "(green favours +, red favours −; spans underlined)")
    common.show(render_rich(ex))
    t = common.table("#", "span", "Σ Δ", "share of its side")
    for i, sp in enumerate(ex.spans, 1):
        t.add_row(str(i), sp.text, f"{sp.total:+.3f}", f"{sp.share:.0%}")
    common.show(t)


def judge_train(
    train: Annotated[list[str], typer.Option("--train", help="Training JSONL, optionally with a row range: FILE[@START:STOP]. Repeat.")],
    heldout: Annotated[list[str], typer.Option("--heldout", help="Held-out JSONL FILE[@START:STOP] for the judge's own accuracy. Repeat.")],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the .judge file.")],
    positive: Annotated[str, typer.Option(help="What the positive class means, e.g. 'non-toxic'.")] = "positive",
    positive_label: Annotated[str, typer.Option(help="Label value of the positive class.")] = "1",
    text_field: str = "text",
    label_field: str = "label",
    c: Annotated[float, common.finite_option("--C", bound=common.POSITIVE, help="Inverse L2 strength of the logistic regression.")] = 4.0,
    max_features: int = 20000,
):
    """Train the offline TF-IDF + logistic-regression judge (saved without pickle) and report its held-out accuracy."""
    from steerport.judges import train_judge

    judge = train_judge(train, heldout, positive=positive, positive_label=positive_label, text_field=text_field,
                        label_field=label_field, C=c, max_features=max_features)
    judge.save(out_path)
    for h in judge.meta["heldout"]:
        common.echo(f"held-out accuracy on {h['file']} ({h['rows']}, n={h['n']}): {h['accuracy']:.3f}")
    common.say(f"wrote {out_path} ({len(judge.vocabulary)} features)")


def judge_score(
    judge: Annotated[str, typer.Argument(help="sentiment | toxicity | a .judge file | hf:MODEL[:LABEL].")],
    text: Annotated[list[str], typer.Argument(help="Texts to score.")],
):
    """Print the judge's probability of the positive attribute for each text."""
    from steerport.judges import load_judge

    j = load_judge(judge)
    for t, p in zip(text, j.score(text)):
        common.echo(f"{p:.3f}  {t}")


def register(app: typer.Typer) -> None:
    for command in (evaluate, score, sweep, explain):
        app.command()(command)
    app.command("judge-train")(judge_train)
    app.command("judge-score")(judge_score)
