"""Carry a steer to another model: one call for every kind, and the LM-Steer forms and calibrations.

:func:`transfer_steer` dispatches on the steer's kind through the registry
(:func:`steerport.kinds.get_kind`, entry ``transfer``); every kind's function takes
``(steer, source, target, options, *, mapping_path, source_path, force, log, progress)`` and
returns a :class:`TransferResult`. This module holds the shared contract
(:class:`TransferOptions`, :class:`TransferResult`) and the LM-Steer kind's function,
:func:`carry_lm_steer`.

**LM-Steer.** A steer on the source is W_s = A_s B_sᵀ (A_s, B_s: d_s x r). Its logit shift is
``Δz_v = ε (hᵀA)(Bᵀe_v)``: B meets output embeddings, A meets final hidden states. With the
vocabulary maps of :mod:`steerport.mapping` (e_s ≈ H e_t, e_t ≈ G e_s) every form keeps the
rank and writes the target factors as A_t = P_A A_s, B_t = P_B B_s (P_A, P_B: d_t x d_s)::

    form         P_A              P_B   reads                         assumption about hidden states
    paper        Hᵀ               Hᵀ    embeddings + tokenizers        h_s = H h_t (H near orthogonal)
    logit        G  (fitted)      Hᵀ    embeddings + tokenizers        similar logits on shared tokens
    logit-pinv   H⁺               Hᵀ    embeddings + tokenizers        same, G = H⁺
    hidden       Kᵀ               Hᵀ    both full models, one pass     h_s ≈ K h_t fitted on neutral text
    refined      (fitted)         (fitted) both full models, one pass  hidden, then fitted to the source's
                                                                       probability-weighted log-prob shifts
    anchor       N (Adam, unit rows) N  embeddings + tokenizers        the original LM-Steer code's recipe

**Default: ``auto``** — ``refined`` whenever the transfer loads the models anyway (KL calibration,
the default), ``logit`` when the user asks for embeddings only (``--calibrate embed`` or ``none``, or
a model given as :class:`~steerport.embeddings.ModelEmbeddings`).
The model ladder chose this default (``benchmarks/results/transfer_ladder.md``: three catalog models,
all six ordered pairs, two tasks): ``refined`` keeps ≥ 0.9 of the weaker side's AUC on more cells than
``logit``. It needs both full models and one pass of each over the neutral text (minutes on a 2-core
CPU for the catalog models); that data does not depend on the steer and is cached per model pair
(:func:`steerport.refine_cache.cached_prepare_refine`). For ``transfer gpt2 gpt-j`` loading both
models is a 24 GB load; the logit form reads only the two output-embedding matrices and tokenizers.

``refined`` (:mod:`steerport.refine`) starts from the hidden form and fits A_t, B_t so the target's
first-order next-token log-prob shifts match the source's on shared tokens at paired positions,
weighted by the tokens' probabilities (the unweighted version of that fit is the hidden form);
optionally also on the tokens the source steer shifts most (``RefineOptions.keywords``, off by default)
and on texts the source model writes under the steer (``steered_texts``, :mod:`steerport.steeredtext`).
Per-form measurements: ``benchmarks/results/refine_check.md`` and ``refine_variants.md``.

The hidden-state map K (:mod:`steerport.hiddenmap`) is fitted on the LM-head inputs of both models
at the positions where the two tokenizations end on the same character, on ``texts.neutral("fit")``.
The anchor baseline's map lives in :mod:`steerport.anchor`.

**Calibration** (:mod:`steerport.strength`, :mod:`steerport.calibration`). The same value s
rarely means the same strength on two models. ``kl`` (the default, ``auto``; needs the full
target model) scales ε₀ so that the mean KL from the unsteered model on neutral text (the
strength-curve text of :mod:`steerport.strength`) at the reference value equals the source's,
read from the source steer's recorded strength curve (measured on the source model only for
old files without one): the target value with κ_t(s) = κ_s(value) comes from
:func:`steerport.metrics.find_value_for_kl`, and the factor is s / value; the output records its
own curve. ``embed`` (embeddings only, approximate)
matches the RMS centred logit shift over the aligned vocabulary at proxy hidden states: unit
aligned source embedding rows p_s and target states p_t = X_t⁺X_s p_s, which give the same
logits on shared tokens — it corrects the shrinkage or mis-scaling of an imperfect map but
knows nothing about the models' real hidden states; such a steer can be calibrated later
(``steerport calibrate``). The anchor baseline is never calibrated.

**Embeddings only, in about a second.** With form logit / logit-pinv / paper and calibration
``embed`` or ``none``, models given as local specs are opened as :class:`~steerport.headfile.HeadFile`:
their fingerprints come from a cache keyed by the model folder's file stats, and a reused mapping
file brings its aligned token pairs, so neither tokenizer is loaded, nothing is re-aligned, and only
the ``embed_pairs`` output-embedding rows the calibration samples are read (memory-mapped). The
calibration's proxy map T depends only on the two models and those pairs and is cached too
(:func:`steerport.calibration.cached_proxy_map`). The result is the same steer, tensor for tensor,
as loading everything; a mapping that must be fitted loads the full matrices and tokenizers.

Example::

    steer = Steer.load("positive.st")
    res = transfer_steer(steer, "smollm2-135m", "gemma3-270m")
    res.steer.save("positive.gemma3-270m.st"); print(res.lineage["calibration"])
"""

from __future__ import annotations

import datetime
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerport import __version__, steeredtext
from steerport.anchor import carry_anchor
from steerport.calibration import cached_proxy_map, calibration_rows, embed_calibration, require_finite
from steerport.embeddings import ModelEmbeddings, load_embeddings
from steerport.errors import SteerportError, one_line
from steerport.headfile import EmbeddingSource, open_head
from steerport.hiddenmap import fit_hidden_map
from steerport.kinds import get_kind
from steerport.mapping import FitOptions, Mapping, find_mapping, fit_and_save
from steerport.models import LoadedModel, load_model
from steerport.refine import RefineOptions, refined_carry
from steerport.refine_cache import cached_prepare_refine
from steerport.steer import Steer
from steerport.strength import CURVE_TEXTS, calibrate_to_curve, curve_for, curve_text, has_curve_on
from steerport.strength import META_KEY as STRENGTH_KEY
from steerport.texts import neutral
from steerport.vocab import align_vocab

FORMS = ("logit", "logit-pinv", "paper", "hidden", "refined", "anchor")
FULL_MODEL_FORMS = ("hidden", "refined")  # forms that run both full models over neutral text
DEFAULT_FORM = "auto"  # refined when the calibration loads the models, else logit (TransferOptions.carry_form)
CALIBRATIONS = ("auto", "embed", "kl", "none")
ACTADD_METHODS = ("recipe", "map")
Log = Callable[[str], None]
Progress = Callable[[int], None]  # called with the number of work units just done (texts, steps)
ModelLike = str | ModelEmbeddings | LoadedModel


@dataclass
class TransferOptions:
    """Everything that decides how a steer is carried (recorded in the output's lineage).

    LM-Steer uses ``form`` … ``anchor_top_k``; ``hidden_texts`` / ``calib_texts`` None mean the
    bundled neutral ``fit`` split and the first ``calib_count`` paragraphs of the ``calib`` split.
    ``actadd_method``, ``texts`` and ``max_tokens`` are for the other kinds: ``texts`` (None:
    ``texts.neutral``) is the neutral text of ActAdd's position pairing and calibration and
    token-prob's detect set, each text cut to ``max_tokens`` tokens.
    """

    form: str = DEFAULT_FORM
    fit: FitOptions = field(default_factory=FitOptions)
    calibrate: str = "auto"
    calib_value: float = 1.0  # reference steer value at which strengths are matched
    calib_texts: Sequence[str] | None = None
    calib_count: int = CURVE_TEXTS  # paragraphs of the strength-curve text (steerport.strength) when calib_texts is None
    calib_max_tokens: int = 64
    kl_rel_tol: float = 0.02  # kl calibration stops when |κ_t − κ_s| ≤ kl_rel_tol · κ_s
    kl_max_evals: int = 12  # at most this many κ_t evaluations (each a pass over calib_texts)
    embed_proxies: int = 4096  # embed calibration: proxy hidden states
    embed_pairs: int = 16384  # embed calibration: aligned token pairs sampled
    hidden_texts: Sequence[str] | None = None  # (with steered_texts, also where the steered texts' openings come from)
    hidden_max_tokens: int = 128
    hidden_ridge: float = 0.0  # relative ridge for K (0 = plain least squares)
    hidden_holdout: float = 0.1  # share of paired positions held out to measure K
    steered_texts: int = 0  # hidden / refined: add 2·N texts the source writes under the steer (steerport.steeredtext)
    steered_kl: float = steeredtext.DEFAULT_KL  # ... sampled at ±v where the source's κ(v) is this
    steered_neutral: int = steeredtext.KEEP_NEUTRAL  # ... beside the first N neutral texts (about as many positions of each)
    steered_seed: int = steeredtext.SEED  # ... and their sampling seed
    anchor_steps: int = 10_000  # the anchor's defaults: Adam, lr 1e-3, 10k steps, top 4000 tokens
    anchor_lr: float = 1e-3
    anchor_top_k: int = 4000
    refine: RefineOptions = field(default_factory=RefineOptions)  # the refined form's fit
    actadd_method: str = "recipe"
    texts: Sequence[str] | None = None
    max_tokens: int = 128
    dtype: str = "float32"  # for full models (hidden form, kl calibration, other kinds)
    device: str = "cpu"

    def __post_init__(self):
        if self.form not in FORMS + ("auto",):
            raise SteerportError(f"unknown transfer form {self.form!r}; use auto or one of {', '.join(FORMS)}")
        if self.calibrate not in CALIBRATIONS:
            raise SteerportError(f"unknown calibration {self.calibrate!r}; use one of {', '.join(CALIBRATIONS)}")
        if self.actadd_method not in ACTADD_METHODS:
            raise SteerportError(f"unknown ActAdd transfer method {self.actadd_method!r}; use one of "
                                 f"{', '.join(ACTADD_METHODS)}")
        for name in ("calib_value", "steered_kl"):
            if not getattr(self, name) > 0:
                raise SteerportError(f"{name} must be a positive number, got {getattr(self, name)}")
        if self.steered_texts < 0:
            raise SteerportError(f"steered_texts must not be negative, got {self.steered_texts}")
        for name in ("calib_count", "steered_neutral", "calib_max_tokens", "hidden_max_tokens", "max_tokens", "kl_max_evals",
                     "embed_proxies", "embed_pairs"):
            if getattr(self, name) < 1:
                raise SteerportError(f"{name} must be positive, got {getattr(self, name)}")

    def carry_form(self, embeddings_given: bool = False) -> str:
        """The LM-Steer form used: ``form`` itself, or for ``auto`` the benchmark's best where both models
        are loaded anyway (``refined``, when the calibration is kl) and the best embeddings-only form
        otherwise (``logit``: with calibration embed or none, or when a model is given only as its
        embeddings, ``embeddings_given``)."""
        if self.form != "auto":
            return self.form
        return "refined" if self.calibrate in ("auto", "kl") and not embeddings_given else "logit"

    def calibration_method(self) -> str:
        if self.carry_form() == "anchor":
            return "none"
        if self.calibrate == "auto":
            return "kl"  # on the target model, against the source's strength curve (steerport.strength)
        return self.calibrate

    def lineage(self) -> dict[str, Any]:
        """The options as JSON-able numbers and names (texts and the fit options left out)."""
        return {k: v for k, v in asdict(self).items() if k not in ("calib_texts", "hidden_texts", "texts", "fit")}


@dataclass
class TransferResult:
    """What every kind's transfer returns: the target steer, the vocabulary map used (LM-Steer's
    map forms; else None) and the lineage (also stored in ``steer.meta["lineage"]``)."""

    steer: Steer  # the target steer, lineage in steer.meta["lineage"]
    mapping: Mapping | None
    lineage: dict[str, Any]


def transfer_steer(steer: Steer, source: ModelLike, target: ModelLike, options: TransferOptions | None = None,
                   **how: Any) -> TransferResult:
    """Carry ``steer`` from ``source`` to ``target`` (specs or loaded models) by its kind's transfer.

    ``how`` are the keywords every kind's transfer takes (see :func:`carry_lm_steer`): ``mapping_path``,
    ``source_path`` (recorded in the lineage), ``force`` (carry a steer made for another model),
    ``log`` (a line of progress text) and ``progress`` (units of work done).

    Example::

        res = transfer_steer(Steer.load("love.st"), "smollm2-135m", "gemma3-270m")
    """
    res = get_kind(steer.kind).transfer_steer(steer, source, target, options or TransferOptions(), **how)
    doc = res.steer.meta.get(STRENGTH_KEY)
    if isinstance(doc, dict) and doc.get("steer") != res.steer.fingerprint:  # the source's curve, copied with its meta
        del res.steer.meta[STRENGTH_KEY]
    return res


transfer = transfer_steer  # the older public name


# --------------------------------------------------------------------------- the math


def carry_factors(steer: Steer, P_A: torch.Tensor, P_B: torch.Tensor) -> dict[str, torch.Tensor]:
    """A_t = P_A A_s, B_t = P_B B_s for the steer and its domain part; P: (d_t, d_s), A, B: (d_s, r)."""
    out = {"A": P_A @ steer.A, "B": P_B @ steer.B}  # (d_t, r) each
    if "domain.A" in steer.tensors:
        out["domain.A"] = P_A @ steer.tensors["domain.A"]
        out["domain.B"] = P_B @ steer.tensors["domain.B"]
    return out


# --------------------------------------------------------------------------- LM-Steer orchestration


def _embeddings(model: ModelLike) -> ModelEmbeddings:
    if isinstance(model, ModelEmbeddings):
        return model
    if isinstance(model, LoadedModel):
        return ModelEmbeddings.from_loaded(model)
    return load_embeddings(model)


def _source_of_rows(model: ModelLike, form: str, opt: TransferOptions) -> EmbeddingSource:
    """The model's output embeddings as needed by ``form`` and ``opt``: for an embeddings-only transfer
    of a local model spec, a :class:`~steerport.headfile.HeadFile` (cached identity, rows read on demand);
    otherwise (or when the checkpoint has no safetensors) the loaded :class:`ModelEmbeddings`."""
    embeddings_only = form in ("logit", "logit-pinv", "paper") and opt.calibration_method() in ("embed", "none")
    if embeddings_only and isinstance(model, str):
        head = open_head(model)
        if head is not None:
            return head
    return _embeddings(model)


def check_source(steer: Steer, src: EmbeddingSource, force: bool = False) -> None:
    """Refuse a steer that was not made for the source model (or is not an LM-Steer steer)."""
    if steer.kind != "lm-steer":
        raise SteerportError(f"only lm-steer steers are carried by a vocabulary map; this one is {steer.kind!r} "
                             "(transfer_steer carries every kind)")
    if steer.hidden_size != src.hidden_size:
        raise SteerportError(f"steer has hidden size {steer.hidden_size} but source {src.spec!r} has {src.hidden_size}")
    want = steer.model.get("fingerprint")
    if want != src.fingerprint and not force:
        raise SteerportError(
            f"steer was made for {steer.model.get('spec')!r} (fingerprint {want}) but source {src.spec!r} has "
            f"fingerprint {src.fingerprint}; give the steer's own model as SRC (or --force)"
        )


def _full_model(model: ModelLike, spec: str, opt: TransferOptions, why: str) -> LoadedModel:
    """``model`` itself when loaded, else the full model of ``spec``; a failure names the cheaper way."""
    if isinstance(model, LoadedModel):
        return model
    try:
        return load_model(spec, dtype=opt.dtype, device=opt.device)
    except (SteerportError, MemoryError, torch.OutOfMemoryError) as e:
        cheaper = ("use --calibrate embed (embeddings only)" if why == "kl calibration"
                   else "use --form logit --calibrate embed (embeddings only)")
        raise SteerportError(f"{why} needs the full model {spec!r}, which could not be loaded "
                             f"({one_line(e)}); {cheaper}") from None


def carry_lm_steer(
    steer: Steer,
    source: ModelLike,
    target: ModelLike,
    options: TransferOptions | None = None,
    *,
    mapping_path: str | Path | None = None,
    source_path: str | None = None,
    force: bool = False,
    log: Log = lambda m: None,
    progress: Progress | None = None,
    mapping: Mapping | None = None,
) -> TransferResult:
    """Carry an LM-Steer ``steer`` from ``source`` to ``target`` (specs, embeddings or loaded models).

    Reads only embeddings and tokenizers unless the form is ``hidden`` / ``refined`` (the default
    ``auto`` with kl calibration) or calibration is ``kl``; then the full models are loaded (or
    taken as given). ``mapping`` (a fitted :class:`Mapping`) or ``mapping_path`` (reused if fresh,
    else fitted and saved there) pick the vocabulary map; by default it is reused from the cache or
    the shipped mappings, or fitted.

    Example::

        res = carry_lm_steer(steer, "smollm2-135m", "gemma3-270m", TransferOptions(form="hidden"))
    """
    opt = options or TransferOptions()
    form = opt.carry_form(embeddings_given=isinstance(source, ModelEmbeddings) or isinstance(target, ModelEmbeddings))
    if opt.steered_texts and form not in FULL_MODEL_FORMS:
        raise SteerportError(f"steered texts are for the hidden and refined forms, not {form}")
    t0 = time.perf_counter()
    src_e, tgt_e = _source_of_rows(source, form, opt), _source_of_rows(target, form, opt)
    check_source(steer, src_e, force)
    timings: dict[str, float] = {"load_embeddings": round(time.perf_counter() - t0, 3), "align": 0.0}
    calib_method = opt.calibration_method()
    lineage: dict[str, Any] = {
        "source_steer": {"fingerprint": steer.fingerprint, "path": source_path, "model": dict(steer.model),
                         "epsilon": steer.epsilon, "rank": steer.rank, "meta": steer.meta},
        "source": {"spec": src_e.spec, "fingerprint": src_e.fingerprint, "hidden_size": src_e.hidden_size},
        "target": {"spec": tgt_e.spec, "fingerprint": tgt_e.fingerprint, "hidden_size": tgt_e.hidden_size},
        "form": form,
    }
    src_lm = tgt_lm = None
    if form in FULL_MODEL_FORMS or calib_method == "kl":  # kl needs the source model only when its curve is not recorded
        why = f"the {form} form" if form in FULL_MODEL_FORMS else "kl calibration"
        t = time.perf_counter()
        tgt_lm = _full_model(target, tgt_e.spec, opt, why)
        if form in FULL_MODEL_FORMS or isinstance(source, LoadedModel):
            src_lm = _full_model(source, src_e.spec, opt, why)
        timings["load_models"] = round(time.perf_counter() - t, 3)
    texts = (list(opt.hidden_texts) if opt.hidden_texts is not None else neutral("fit")) if form in FULL_MODEL_FORMS else []
    if opt.steered_texts:  # only with the full-model forms (checked above), whose source model is loaded
        assert src_lm is not None
        t = time.perf_counter()
        extra, lineage["steered_texts"] = steeredtext.steered_texts(
            src_lm, steer, texts, count=opt.steered_texts, kl=opt.steered_kl, seed=opt.steered_seed, force=force, log=log,
            progress=progress, text=curve_text(opt.calib_texts, limit=opt.calib_count))
        texts, timings["steered_texts"] = texts[: opt.steered_neutral] + extra, round(time.perf_counter() - t, 3)

    m: Mapping | None = None
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # aligned (src_ids, tgt_ids)
    refined: dict[str, torch.Tensor] | None = None  # the refined form's factors
    t = time.perf_counter()
    if form == "anchor":
        P_A, lineage["anchor"] = carry_anchor(src_e.full(), tgt_e.full(), steps=opt.anchor_steps, lr=opt.anchor_lr,
                                             top_k=opt.anchor_top_k, log=log, progress=progress)
        P_B = P_A
    else:
        if mapping is not None:
            m, how = mapping, "given"
            m.check(src_e.fingerprint, tgt_e.fingerprint)
        else:
            found = find_mapping(src_e, tgt_e, opt.fit, path=mapping_path, log=log)
            if found is None:  # fit one: needs the whole matrices, the tokenizers and the alignment
                ta = time.perf_counter()
                al = align_vocab(src_e.full().tokenizer, tgt_e.full().tokenizer)
                timings["align"] = round(time.perf_counter() - ta, 3)
                found = fit_and_save(src_e.full(), tgt_e.full(), opt.fit, path=mapping_path, alignment=al)
            m, how = found
        pairs = m.pairs
        if pairs is None and (form == "refined" or calib_method == "embed"):  # a mapping file without its pairs
            ta = time.perf_counter()
            al = align_vocab(src_e.full().tokenizer, tgt_e.full().tokenizer)
            pairs, timings["align"] = (al.src_ids, al.tgt_ids), round(time.perf_counter() - ta, 3)
        log(f"mapping: {how}")
        H, G = m.H, m.G  # (d_s, d_t), (d_t, d_s)
        lineage["mapping"] = {"source": how, "method": m.options.method, "options": m.options.to_dict(),
                              "n_pairs": m.n_pairs, "coverage": {"src": m.alignment.get("coverage_src"),
                                                                 "tgt": m.alignment.get("coverage_tgt")},
                              "diagnostics": m.diagnostics}
        P_B = H.T
        if form == "paper":
            P_A = H.T
        elif form == "logit":
            P_A = G
        elif form == "logit-pinv":
            P_A = torch.linalg.pinv(H.double()).float()
        elif form == "refined":
            assert src_lm is not None and tgt_lm is not None  # loaded above
            assert pairs is not None  # aligned above
            log(f"fitting the hidden-state map and refining on {len(texts)} texts")
            data = cached_prepare_refine(src_lm, tgt_lm, pairs[0], pairs[1], texts, max_tokens=opt.hidden_max_tokens,
                                  ridge=opt.hidden_ridge, opts=opt.refine, log=log, progress=progress)
            rc = refined_carry(steer, H, data, opt.refine, (src_lm, tgt_lm, pairs[0], pairs[1]))
            P_A, refined = rc.K.T, rc.factors
            lineage["hidden_map"], lineage["refine"] = rc.hidden_map, rc.refine
        else:  # hidden
            log(f"fitting the hidden-state map on {len(texts)} texts")
            assert src_lm is not None and tgt_lm is not None  # loaded above for the hidden form
            hm = fit_hidden_map(src_lm, tgt_lm, texts, max_tokens=opt.hidden_max_tokens, ridge=opt.hidden_ridge,
                                holdout=opt.hidden_holdout, progress=progress)
            P_A = hm.K.T
            lineage["hidden_map"] = hm.diagnostics
    timings["map"] = round(time.perf_counter() - t, 3)
    factors = refined if refined is not None else carry_factors(steer, P_A, P_B)
    require_finite("the carried steer", *factors.values())

    t = time.perf_counter()
    calibrated: Steer | None = None
    model_id = {"spec": tgt_e.spec, "fingerprint": tgt_e.fingerprint}
    base = Steer("lm-steer", factors, steer.epsilon, positive=steer.positive, model=model_id)
    if calib_method == "none":
        calib: dict[str, Any] = {"method": "none", "factor": 1.0}
    elif calib_method == "embed":
        assert m is not None  # only the anchor form has no mapping, and it is never calibrated
        assert pairs is not None  # aligned above
        rows, _ = calibration_rows(len(pairs[0]), opt.embed_pairs)  # read only the rows calibration uses
        s_ids, t_ids = pairs[0][rows], pairs[1][rows]
        X_s, X_t = src_e.rows(s_ids), tgt_e.rows(t_ids)
        digest = hashlib.sha256(s_ids.numpy().tobytes() + t_ids.numpy().tobytes()).hexdigest()[:16]
        T = cached_proxy_map(X_s, X_t, f"{src_e.fingerprint}_{tgt_e.fingerprint}_{digest}")
        calib = embed_calibration(steer, factors, X_s, X_t, max_proxies=opt.embed_proxies, max_pairs=opt.embed_pairs,
                                  sampled_from=len(pairs[0]), T=T)
    else:
        assert tgt_lm is not None  # loaded above for kl calibration
        calibrated, calib = calibrate_carried(steer, base, src_lm or (lambda: _full_model(source, src_e.spec, opt,
                                              "kl calibration")), tgt_lm, opt, force=force, log=log)
    timings["calibrate"] = round(time.perf_counter() - t, 3)
    timings["total"] = round(time.perf_counter() - t0, 3)
    calib = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in calib.items()}
    lineage.update(calibration=calib, options=opt.lineage(), seconds=timings, steerport_version=__version__,
                   created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    meta = {"lineage": lineage}  # the source's training metadata lives in lineage.source_steer.meta
    eps = calibrated.epsilon if calibrated is not None else steer.epsilon * calib["factor"]
    out = Steer("lm-steer", factors, eps, positive=steer.positive, model=model_id, meta=meta)
    if calibrated is not None:  # the target's own strength curve, measured after calibration
        out.meta[STRENGTH_KEY] = calibrated.meta[STRENGTH_KEY]
    return TransferResult(steer=out, mapping=m, lineage=lineage)


def calibrate_carried(steer: Steer, carried: Steer, source: LoadedModel | Callable[[], LoadedModel],
                      target: LoadedModel, opt: TransferOptions, *, force: bool = False,
                      log: Log = lambda m: None) -> tuple[Steer, dict[str, Any]]:
    """KL calibration of ``carried`` on ``target`` against the source steer's strength curve
    (:mod:`steerport.strength`): the recorded one when it fits, else measured on the source model
    (``source`` may be a loader, called only then). Returns the calibrated steer and the lineage record."""
    text = curve_text(opt.calib_texts, limit=opt.calib_count)
    recorded = has_curve_on(steer, text)
    curve = curve_for(steer, source, text=text, force=force, log=log)  # an old file: measured on the source now
    log(f"calibrating on {len(text.texts)} neutral texts at reference value {opt.calib_value:g} "
        f"(source κ from {'the recorded curve' if recorded else 'the source model'})")
    return calibrate_to_curve(carried, target, curve, value=opt.calib_value, text=text, rel_tol=opt.kl_rel_tol,
                              max_evals=opt.kl_max_evals, log=log)
