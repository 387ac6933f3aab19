"""``steerport map`` and ``steerport transfer`` (with the aliases ``actadd-transfer`` and
``token-transfer``): fit a vocabulary map, carry a steer of any kind to another model.

Every transfer command makes one call, :func:`steerport.transfer.transfer_steer`, which picks
the method by the steer's kind; the aliases only fill in its options differently.

Example::

    steerport map smollm2-135m gemma3-270m --out s2g.safetensors
    steerport transfer smollm2-135m gemma3-270m --steer positive.st --mapping s2g.safetensors
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from steerport.cli.common import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    DeviceOpt,
    DtypeOpt,
    LinesOpt,
    MethodOpt,
    ModelArg,
    TextOpt,
    check_at_least,
    counting,
    echo,
    file_option,
    finite_option,
    print_json,
    read_lines,
    read_optional,
    say,
    show,
    spec_slug,
    status,
    table,
)
from steerport.errors import SteerportError

if TYPE_CHECKING:
    from steerport.steer import Steer
    from steerport.transfer import TransferOptions, TransferResult

SteerFileOpt = Annotated[Path, file_option("--steer", "-s", what="steer file", help="The source model's .st steer file.")]
RidgeOpt = Annotated[float, finite_option(bound=NON_NEGATIVE, help="Ridge strength, relative to the mean Gram diagonal (method ridge).")]
WeightingOpt = Annotated[str, typer.Option(help="none, or zipf: weight pair k by 1/sqrt(1+frequency rank).")]
TopKOpt = Annotated[Optional[int], typer.Option(help="Fit only on the K most frequent aligned pairs (id order).")]
CenterOpt = Annotated[bool, typer.Option("--center", help="Subtract each side's mean embedding row before fitting.")]
NormalizeOpt = Annotated[bool, typer.Option("--normalize", help="Scale each embedding row to unit length before fitting.")]


def _fit_options(method: str, ridge: float, center: bool, normalize: bool, weighting: str,
                 top_k: Optional[int], holdout: float = 0.1, seed: int = 0):
    from steerport.mapping import FitOptions

    check_at_least("--top-k", top_k, 1)
    return FitOptions(method=method, ridge=ridge, center=center, normalize=normalize, weighting=weighting,
                      top_k=top_k, holdout=holdout, seed=seed)


def map_cmd(
    src: ModelArg,
    tgt: ModelArg,
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Mapping file to write (default: SRC__TGT.safetensors).")] = None,
    method: MethodOpt = "lstsq",
    ridge: RidgeOpt = 1e-2,
    center: CenterOpt = False,
    normalize: NormalizeOpt = False,
    weighting: WeightingOpt = "none",
    top_k: TopKOpt = None,
    holdout: Annotated[float, finite_option(bound=FRACTION, help="Share of aligned pairs held out for diagnostics.")] = 0.1,
    seed: int = 0,
    refit: Annotated[bool, typer.Option("--refit", help="Fit even if --out already holds a fresh mapping.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the mapping metadata as JSON.")] = False,
):
    """Fit the map between two models' output embeddings (reads only embeddings and tokenizers).

    An existing --out file is reused when it matches both models and the options; a stale one
    (made for other weights or tokenizer) is refitted and overwritten.
    """
    from steerport.embeddings import load_embeddings
    from steerport.mapping import Mapping, fit_mapping

    options = _fit_options(method, ridge, center, normalize, weighting, top_k, holdout, seed)
    path = out_file or Path(f"{spec_slug(src)}__{spec_slug(tgt)}.safetensors")
    with status("reading output embeddings and tokenizers"):
        se, te = load_embeddings(src), load_embeddings(tgt)
    m, how = None, "fitted"
    if path.exists() and not refit:
        old = Mapping.load(path)
        if old.matches(se.fingerprint, te.fingerprint, options):
            m, how = old, "reused (fresh)"
        elif not old.matches(se.fingerprint, te.fingerprint):
            say(f"{path} is stale (made for other weights or tokenizer): refitting")
    if m is None:
        with status(f"aligning vocabularies and fitting ({method})"):
            m = fit_mapping(se, te, options)
        m.save(path)
    if as_json:
        print_json(m.metadata())
        return
    t = table("map", "held-out R²", "cosine", "NN acc", "train R²", title=f"{src} -> {tgt}: {how}, {path}")
    for name, label in (("H", "H: e_src ≈ H e_tgt"), ("G", "G: e_tgt ≈ G e_src")):
        d = m.diagnostics[name]
        ho = d.get("heldout", {})  # absent when nothing was held out
        t.add_row(label, f"{ho.get('r2', float('nan')):.4f}", f"{ho.get('cosine', float('nan')):.4f}",
                  f"{ho.get('nn_acc', float('nan')):.4f}", f"{d['train']['r2']:.4f}")
    show(t)
    a = m.alignment
    echo(f"aligned pairs {m.n_pairs} (raw string matches {a['raw_string_matches']}); coverage "
         f"{a['coverage_src']:.1%} of {src} ({a['source']['convention']}), {a['coverage_tgt']:.1%} of {tgt} "
         f"({a['target']['convention']}); train {m.n_train}, held out {m.n_heldout}")


def run_transfer(steer_path: Path, src: str, tgt: str, options: TransferOptions, dest: Path, *,
                 mapping: Optional[Path] = None, force: bool = False, source: Steer | None = None) -> None:
    """The one library call every transfer command makes, then the file and a summary line."""
    from steerport.steer import Steer
    from steerport.transfer import transfer_steer

    source = source or Steer.load(steer_path)
    with counting(f"transferring {steer_path.name} {src} -> {tgt}") as advance:
        res = transfer_steer(source, src, tgt, options, mapping_path=mapping, source_path=str(steer_path),
                             force=force, log=say, progress=advance)
    res.steer.save(dest)
    for line in describe(source, res, dest):
        say(line)


def describe(source: Steer, res: TransferResult, dest: Path) -> list[str]:
    """What a transfer did, in a line, by the steer's kind."""
    new, lin = res.steer, res.lineage
    if new.kind == "actadd":
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in lin.items() if k != "source_model"}
        where = f"layers {new.meta['layers']}" if "layers" in new.meta else f"layer {new.meta['layer']}"
        return [f"wrote {dest}: {where}/{new.meta['n_layers']}, coefficient {new.epsilon:.4g}; {shown}"]
    if new.kind == "token-prob":  # (dropped tokens are reported through log)
        return [f"wrote {dest}: tokens {new.meta['tokens']}, target adjusted R² {new.meta['regression']['adj_r2']:.3f}"]
    cal = lin["calibration"]
    msg = f"wrote {dest}: form {lin['form']}, rank {new.rank}, hidden {new.hidden_size}, "
    msg += f"calibration {cal['method']} x{cal['factor']:.4g} (epsilon {source.epsilon:.4g} -> {new.epsilon:.4g})"
    if "mapping" in lin:
        h = lin["mapping"]["diagnostics"]["H"].get("heldout", {})
        msg += f"; mapping {lin['mapping']['method']} on {lin['mapping']['n_pairs']} pairs, held-out R² {h.get('r2', float('nan')):.3f}"
    if "hidden_map" in lin:
        msg += f"; hidden map R² {lin['hidden_map'].get('heldout', {}).get('r2', float('nan')):.3f}"
    if "steered_texts" in lin:
        msg += f"; {2 * lin['steered_texts']['count']} steered texts at ±{lin['steered_texts']['value']:.3g}"
    if "refine" in lin:
        rec = lin["refine"]
        msg += f"; refined: held-out shift loss {rec['heldout_loss']['init']:.3f} -> {rec['heldout_loss']['final']:.3f}"
        if "heldout_terms" in rec:
            msg += f" (keywords {rec['heldout_terms']['init'][1]:.3f} -> {rec['heldout_terms']['final'][1]:.3f})"
    if "seconds" in lin:
        msg += f"; {lin['seconds']['total']:.1f} s"
    if cal["method"] != "kl":
        return [msg, f"note: the value is approximate ({cal['method']} calibration, the target model not loaded); for a "
                     f"calibrated value: steerport calibrate {dest} --model {new.model.get('spec')}"]
    return [msg]


def transfer_cmd(
    src: ModelArg,
    tgt: ModelArg,
    steer: SteerFileOpt,
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .st (default: STEER.TGT.st next to the steer).")] = None,
    form: Annotated[str, typer.Option(help="auto (default: refined, or logit with --calibrate embed/none), refined (hidden, then "
            "fitted to the source's log-prob shifts; loads both full models, one pass over neutral text, cached per model "
            "pair), logit (fitted G; embeddings and tokenizers only), logit-pinv, paper (HᵀWH), hidden (both full models) or "
            "anchor (baseline).")] = "auto",
    mapping: Annotated[Optional[Path], typer.Option(help="Mapping file to use (refused if stale; fitted and written there if "
            "missing).")] = None,
    method: MethodOpt = "lstsq",
    ridge: RidgeOpt = 1e-2,
    center: CenterOpt = False,
    normalize: NormalizeOpt = False,
    weighting: WeightingOpt = "none",
    top_k: TopKOpt = None,
    calibrate: Annotated[str, typer.Option(help="auto or kl (loads TGT and matches the strength the steer had on SRC), embed "
            "(embeddings only; the value is approximate) or none.")] = "auto",
    calib_value: Annotated[float, finite_option(bound=POSITIVE, help="Reference steer value at which strengths are matched.")] = 1.0,
    calib_text: Annotated[Optional[Path], file_option(what="text file", help="Neutral text for kl calibration, one text per line "
            "(default: bundled neutral text); for ActAdd and token-probability steers the neutral / detect text.")] = None,
    hidden_text: Annotated[Optional[Path], file_option(what="text file", help="Neutral text for the hidden-state map, one text per line "
            "(default: bundled).")] = None,
    lines: Annotated[Optional[int], typer.Option(help="Use at most this many texts of --calib-text / --hidden-text.")] = None,
    keywords: Annotated[int, typer.Option(help="Refined form: also match the source steer's shifts on the N shared tokens it "
            "shifts most (its keywords; see steerport inspect --keywords). Helps when they are the steer's content (a detox "
            "steer's swear words: generation then moves as on the source), hurts when they are a dataset's artifacts "
            "(punctuation); 64 is a good N. Default 0: likely tokens only.")] = 0,
    keywords_words_only: Annotated[bool, typer.Option("--keywords-words-only", help="With --keywords: only tokens whose "
            "text has a letter (drops punctuation and whitespace, a corpus's style rather than its content).")] = False,
    steered_texts: Annotated[int, typer.Option(help="Refined / hidden form: also fit on 2·N texts SRC writes with the steer at "
            "±v (N openings of the neutral text, 48 sampled tokens each; v where its KL budget is --steered-kl), beside "
            "the first 100 neutral texts. Neutral text seldom holds the contexts a steer acts on; these do. Costs a "
            "generation on SRC and an uncached refinement (minutes). Default 0: neutral text only.")] = 0,
    steered_kl: Annotated[float, finite_option(bound=POSITIVE, help="KL budget (nats/token on the strength-curve text) of "
            "the value --steered-texts samples at.")] = 0.3,
    anchor_steps: Annotated[int, typer.Option(help="Adam steps of the anchor baseline (its default 10000).")] = 10_000,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Carry a steer whose model fingerprint differs from SRC.")] = False,
    actadd_method: Annotated[str, typer.Option(help="ActAdd steers: recipe (recompute from the stored prompt pairs on TGT) or map "
            "(residual-stream map; loads both models).")] = "recipe",
):
    """Carry a steer from SRC to TGT: steerport transfer gpt2 gpt-j --steer toxic.st.

    For LM-Steer steers the default loads both models, carries the steer by the refined form (the
    best in the model-ladder benchmark; the first time for a model pair about a minute on 2 CPU cores
    for the catalog's small models, its data then cached) and calibrates the value on TGT to the strength it had on SRC. --calibrate embed
    reads only output embeddings and tokenizers (the logit form, seconds; the value approximate).
    ActAdd steers go by recipe or by a residual-stream map (see --actadd-method); token-probability
    steers keep their token texts and scales and recompute the direction on TGT (--calib-text is
    then the detect text). Both load the full models.
    """
    from steerport.refine import RefineOptions
    from steerport.transfer import TransferOptions

    check_at_least("--lines", lines, 1)
    check_at_least("--keywords", keywords, 0)
    check_at_least("--steered-texts", steered_texts, 0)
    calib = read_optional(calib_text)
    hidden = read_optional(hidden_text)
    options = TransferOptions(
        form=form, fit=_fit_options(method, ridge, center, normalize, weighting, top_k), calibrate=calibrate,
        calib_value=calib_value, calib_texts=calib[:lines] if calib else None,
        hidden_texts=hidden[:lines] if hidden else None, anchor_steps=anchor_steps, dtype=dtype, device=device,
        actadd_method=actadd_method, texts=calib[:lines] if calib else None,
        refine=RefineOptions(keywords=keywords, keyword_words_only=keywords_words_only), steered_texts=steered_texts,
        steered_kl=steered_kl,
    )
    dest = out_file or steer.with_name(f"{steer.stem}.{spec_slug(tgt)}.st")
    run_transfer(steer, src, tgt, options, dest, mapping=mapping, force=force)


def actadd_transfer_cmd(
    source: Annotated[str, typer.Argument(help="Model the steer was made on.")],
    target: Annotated[str, typer.Argument(help="Model to carry it to.")],
    steer: Annotated[Path, file_option("--steer", what="steer file", help="The source .st (kind actadd).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the target .st.")],
    method: Annotated[str, typer.Option(help="recipe (recompute on the target, KL-calibrated) or map (least-squares residual "
            "map).")] = "recipe",
    neutral: TextOpt = None,
    lines: LinesOpt = 64,
    calibrate: Annotated[bool, typer.Option(help="For map: also calibrate the coefficient to the source's KL.")] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
):
    """Carry an ActAdd steer to another model (an alias of `transfer` for ActAdd steers)."""
    from steerport.transfer import TransferOptions

    options = TransferOptions(actadd_method=method, texts=read_lines(neutral, lines), calibrate="kl" if calibrate else "none",
                              dtype=dtype, device=device)
    run_transfer(steer, source, target, options, out_path)


def token_transfer_cmd(
    steer: Annotated[Path, file_option("--steer", what="steer file", help="The source .st (kind token-prob).")],
    target: Annotated[str, typer.Argument(help="Model to carry it to.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the target .st.")],
    detect: Annotated[Optional[Path], file_option(what="text file", help="Detect text on the target; default: the bundled neutral "
            "text.")] = None,
    lines: LinesOpt = 100,
    max_tokens: Annotated[int, typer.Option(help="Tokens per text.")] = 128,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
):
    """Carry a token-probability steer to another model (an alias of `transfer` for token-prob steers):
    same token texts and scales, direction recomputed there."""
    from steerport.steer import Steer
    from steerport.transfer import TransferOptions

    check_at_least("--max-tokens", max_tokens, 1)
    texts = read_lines(detect, lines)
    source = Steer.load(steer)
    made_on = source.model.get("spec")
    if not made_on:
        raise SteerportError(f"{steer}: records no source model; use `steerport transfer SRC {target} --steer {steer}`")
    options = TransferOptions(texts=texts, max_tokens=max_tokens, dtype=dtype, device=device)
    run_transfer(steer, made_on, target, options, out_path, source=source)


def register(app: typer.Typer) -> None:
    app.command("map")(map_cmd)
    app.command("transfer")(transfer_cmd)
    app.command("actadd-transfer")(actadd_transfer_cmd)
    app.command("token-transfer")(token_transfer_cmd)
