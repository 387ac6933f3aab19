"""A steer's strength curve, recorded in its file, and value calibration against it.

The strength of a steer at value s is its KL budget κ(s): the mean over token positions of
KL(p_steered ‖ p_unsteered) on neutral text (:mod:`steerport.scoring`, one body pass and the head
only per value for head kinds). Every steer file records its own curve when it is made::

    meta["strength_curve"] = {"values": [-1, 0.5, 1, 2], "kappa": [...],          # nats/token
                              "text": {"sha256": ..., "n_texts": 32, "chars": 400, "source": ...},
                              "model": {"spec": ..., "fingerprint": ...}, "steer": <steer fingerprint>}

The text is the same *characters* on every model (the bundled ``neutral("calib")`` paragraphs cut
at a word boundary, never truncated by a tokenizer), so κ on two models is measured on the same
text; its sha256 says which text. ``steer`` is the fingerprint of the tensors and ε₀ the curve
was measured with: a curve whose steer, model or text differs is never used silently.

A carried steer is *calibrated* when its ε₀ is scaled so that κ_target(s) = κ_source(s) at the
reference value (1 by default; :func:`calibrate_to_curve`, solved by
:func:`steerport.metrics.find_value_for_kl`): value s then means the same strength on both models.
Only the target model is needed when the source's curve is recorded.

Example::

    steer = record_curve(lm, steer)                     # measure and store; steer.save(...) keeps it
    curve = curve_for(steer, lm)                        # recorded (if it fits) or measured now
    new, info = calibrate_to_curve(carried, tgt_lm, curve)    # new.epsilon = carried.epsilon * info["factor"]
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from steerport.errors import SteerportError
from steerport.texts import neutral

if TYPE_CHECKING:
    from steerport.models import LoadedModel
    from steerport.steer import Steer

CURVE_VALUES = (-1.0, 0.5, 1.0, 2.0)
CURVE_TEXTS = 16  # bundled neutral calib paragraphs (~1,400 token positions: a few head passes)
CURVE_CHARS = 400  # each cut to at most this many characters, at a word boundary
MAX_TOKENS = 1024  # a token cap the cut texts never reach (checked): both models see every character
MIN_TEXT_CHARS = 200  # total characters below which a strength curve is not measured (too short to align strengths)
REL_TOL = 0.02  # calibration stops when |κ_t − κ_s| ≤ REL_TOL · κ_s
META_KEY = "strength_curve"
Log = Callable[[str], None]


# --------------------------------------------------------------------------- the text


@dataclass(frozen=True)
class CurveText:
    """The neutral texts a curve is measured on and their fingerprint."""

    texts: tuple[str, ...]
    source: str

    @property
    def sha256(self) -> str:
        return text_fingerprint(self.texts)

    def describe(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "n_texts": len(self.texts), "chars": sum(map(len, self.texts)),
                "source": self.source}


def text_fingerprint(texts: Sequence[str]) -> str:
    """sha256 (first 16 hex digits) of the exact texts, in order."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()[:16]


def cut(text: str, chars: int = CURVE_CHARS) -> str:
    """``text`` cut to at most ``chars`` characters, at the last space before the limit when there is one."""
    text = text.strip()
    if len(text) <= chars:
        return text
    head = text[:chars]
    return head[: head.rfind(" ")] if " " in head else head


def curve_text(texts: Sequence[str] | None = None, *, limit: int = CURVE_TEXTS, source: str | None = None) -> CurveText:
    """The default curve text (bundled neutral calib paragraphs, cut) or ``texts`` as given.

    Texts too short to measure a strength on (under :data:`MIN_TEXT_CHARS` characters together) are
    a one-line error.
    """
    if texts is None:
        got = tuple(cut(t) for t in neutral("calib", limit=limit))
        src = source or f"bundled neutral calib, first {limit} paragraphs cut to {CURVE_CHARS} characters"
    else:
        got = tuple(t for t in (str(x).strip() for x in texts) if t)
        src = source or "given texts"
    n = sum(map(len, got))
    if n < MIN_TEXT_CHARS:
        raise SteerportError(f"the neutral text for the strength curve is too short to align two models' strengths: "
                             f"{len(got)} text(s), {n} characters; give at least {MIN_TEXT_CHARS}")
    return CurveText(got, src)


def _scorer(lm: LoadedModel, steer: Steer, text: CurveText, force: bool = False) -> Any:
    """The shared scorer on the curve text, refusing text that gives the model no next-token positions."""
    from steerport.scoring import scorer_for

    _check_not_truncated(lm, text)
    scorer = scorer_for(lm, list(text.texts), [steer], max_tokens=MAX_TOKENS, force=force)
    if not bool((scorer.targets >= 0).any()):
        raise SteerportError(f"the strength-curve text gives {lm.spec} no token positions to measure on; give longer texts")
    return scorer


def _check_not_truncated(lm: LoadedModel, text: CurveText) -> None:
    """Every text must fit whole (both models see every character) in the token cap and the model's context."""
    config = lm.model.config
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or MAX_TOKENS
    limit = min(MAX_TOKENS, int(context))
    longest = max(len(lm.tokenizer(t)["input_ids"]) for t in text.texts)
    if longest > limit:
        raise SteerportError(f"a strength-curve text has {longest} tokens on {lm.spec}, above {limit} (its context or the "
                             "cap): the models would not see the same text; give shorter texts")


# --------------------------------------------------------------------------- the curve


@dataclass
class StrengthCurve:
    """κ(s) at a few values s of one steer on one model and text."""

    values: list[float]
    kappa: list[float]
    text: dict[str, Any]  # sha256, n_texts, chars, source
    model: dict[str, Any]  # spec, fingerprint
    steer: str  # the steer's fingerprint (tensors and ε₀) when measured

    def to_dict(self) -> dict[str, Any]:
        # 8 significant digits, not 8 decimals: a weak steer's κ (1e-9 per token) must not be written as 0
        return {"values": list(self.values), "kappa": [float(f"{k:.8g}") for k in self.kappa], "text": dict(self.text),
                "model": dict(self.model), "steer": self.steer}

    @classmethod
    def from_dict(cls, doc: Any) -> StrengthCurve:
        """Validate a recorded curve; anything malformed (missing fields, NaN, lengths) is one line."""
        if not isinstance(doc, dict):
            raise SteerportError("the recorded strength curve is not a JSON object")
        missing = [k for k in ("values", "kappa", "text", "model", "steer") if k not in doc]
        if missing:
            raise SteerportError(f"the recorded strength curve lacks {', '.join(missing)}")
        vals, kap = doc["values"], doc["kappa"]
        if not (isinstance(vals, list) and isinstance(kap, list) and len(vals) == len(kap) and vals):
            raise SteerportError("the recorded strength curve's values and kappa must be lists of the same length")
        if not all(_finite_number(x) for x in vals + kap):
            raise SteerportError("the recorded strength curve holds a value or κ that is not a finite number")
        if any(k < 0 for k in kap):
            raise SteerportError("the recorded strength curve holds a negative κ")
        if not isinstance(doc["text"], dict) or not isinstance(doc["text"].get("sha256"), str):
            raise SteerportError("the recorded strength curve has no text fingerprint")
        if not isinstance(doc["model"], dict):
            raise SteerportError("the recorded strength curve's model must be a JSON object")
        return cls([float(v) for v in vals], [float(k) for k in kap], dict(doc["text"]), dict(doc["model"]),
                   str(doc["steer"]))

    def kappa_at(self, value: float) -> float:
        """κ at ``value``: a recorded point, else a power law κ ∝ |s|^p between the two recorded values of the
        same sign around it. Outside the recorded range is a one-line error."""
        for v, k in zip(self.values, self.kappa):
            if math.isclose(v, value, rel_tol=1e-9, abs_tol=1e-12):
                return k
        side = sorted((v, k) for v, k in zip(self.values, self.kappa) if v * value > 0)
        below = [(v, k) for v, k in side if abs(v) < abs(value)]
        above = [(v, k) for v, k in side if abs(v) > abs(value)]
        if not below or not above:
            raise SteerportError(f"value {value:g} is outside the recorded strength curve ({self.values})")
        (v0, k0), (v1, k1) = max(below, key=lambda p: abs(p[0])), min(above, key=lambda p: abs(p[0]))
        if k0 <= 0 or k1 <= 0:
            return k0 + (k1 - k0) * (abs(value) - abs(v0)) / (abs(v1) - abs(v0))
        p = math.log(k1 / k0) / math.log(abs(v1) / abs(v0))
        return k0 * (abs(value) / abs(v0)) ** p

    def rows(self) -> list[dict[str, float]]:
        return [{"value": v, "kl": k} for v, k in zip(self.values, self.kappa)]


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def measure_curve(lm: LoadedModel, steer: Steer, *, values: Sequence[float] = CURVE_VALUES,
                  text: CurveText | None = None, force: bool = False, scorer: Any = None) -> StrengthCurve:
    """κ(s) of ``steer`` on ``lm`` at ``values``, one pass over the text (:func:`steerport.scoring.scorer_for`)."""
    text = text or curve_text()
    scorer = scorer or _scorer(lm, steer, text, force)
    stats = scorer.stats_many([[(steer, float(v))] for v in values])
    kappa = [st.kl for st in stats]
    if not all(math.isfinite(k) for k in kappa):
        raise SteerportError(f"the strength curve of this steer on {lm.spec} is not finite (κ = {kappa}); the model's "
                             "outputs are NaN or infinite (try --dtype float32)")
    return StrengthCurve([float(v) for v in values], [max(k, 0.0) for k in kappa], text.describe(),
                         {"spec": lm.spec, "fingerprint": lm.fingerprint}, steer.fingerprint)


def record_curve(lm: LoadedModel, steer: Steer, *, text: CurveText | None = None, force: bool = False) -> Steer:
    """Measure ``steer``'s curve on ``lm`` and store it in ``steer.meta`` (in place; returned for chaining)."""
    steer.meta[META_KEY] = measure_curve(lm, steer, text=text, force=force).to_dict()
    return steer


def try_record_curve(lm: LoadedModel, steer: Steer, note: Log) -> bool:
    """:func:`record_curve` where a steer is made; when it cannot be measured (a model whose context is shorter than
    the curve text, NaN outputs) the steer is saved without one (measured on demand later) and ``note`` says why."""
    try:
        record_curve(lm, steer)
        return True
    except SteerportError as e:
        note(f"note: no strength curve recorded ({e})")
        return False


def recorded_curve(steer: Steer) -> StrengthCurve | None:
    """The curve recorded in ``steer`` (None when there is none); a malformed one is a one-line error."""
    doc = steer.meta.get(META_KEY)
    return None if doc is None else StrengthCurve.from_dict(doc)


def has_curve_on(steer: Steer, text: CurveText) -> bool:
    """Whether ``steer`` records a strength curve measured on ``text`` (a malformed one is a one-line error)."""
    curve = recorded_curve(steer)
    return curve is not None and curve.text.get("sha256") == text.sha256


def check_curve(curve: StrengthCurve, steer: Steer, *, text: CurveText | None = None, model_fingerprint: str | None = None,
                what: str = "the steer") -> None:
    """Refuse (one line) a curve measured for other tensors / ε₀, another model or other text."""
    if curve.steer != steer.fingerprint:
        raise SteerportError(f"the strength curve recorded for {what} was measured with other tensors or ε₀ (steer "
                             f"{curve.steer}, now {steer.fingerprint}); re-measure it: steerport calibrate STEER --model M")
    want = model_fingerprint or steer.model.get("fingerprint")
    if want and curve.model.get("fingerprint") != want:
        raise SteerportError(f"the strength curve recorded for {what} was measured on another model "
                             f"({curve.model.get('spec')!r}, fingerprint {curve.model.get('fingerprint')}; expected {want})")
    if text is not None and curve.text.get("sha256") != text.sha256:
        raise SteerportError(f"the strength curve recorded for {what} was measured on other neutral text (fingerprint "
                             f"{curve.text.get('sha256')}, this text {text.sha256})")


def curve_for(steer: Steer, lm: LoadedModel | Callable[[], LoadedModel] | None, *, text: CurveText | None = None,
              force: bool = False, log: Log = lambda m: None) -> StrengthCurve:
    """The steer's curve on ``text``: the recorded one when it fits the steer, its model and the text, else measured
    now on ``lm`` (old files without a curve; other text). ``lm`` may be a loader, called only to measure. Without
    ``lm`` a missing curve is a one-line error."""
    text = text or curve_text()
    curve = recorded_curve(steer)
    if curve is not None:
        check_curve(curve, steer)
        if curve.text.get("sha256") == text.sha256:
            return curve
        log(f"the recorded strength curve is on other text ({curve.text.get('sha256')}); measuring on {text.sha256}")
    if lm is None:
        raise SteerportError("the steer records no strength curve on this text and its model is not loaded to measure one")
    from steerport.models import LoadedModel

    if not isinstance(lm, LoadedModel):
        lm = lm()
    log(f"measuring the strength curve on {lm.spec} ({len(text.texts)} neutral texts)")
    return measure_curve(lm, steer, text=text, force=force)


def value_for_kl(lm: LoadedModel, steer: Steer, kl: float, *, text: CurveText | None = None,
                 rel_tol: float = REL_TOL, force: bool = False) -> float:
    """The positive value at which ``steer``'s κ on ``lm`` (on ``text``, default the curve text) is ``kl``."""
    from steerport.metrics import find_value_for_kl

    scorer = _scorer(lm, steer, text or curve_text(), force)
    return find_value_for_kl(lambda s: scorer.stats([(steer, s)]).kl, kl, rel_tol=rel_tol).value


# --------------------------------------------------------------------------- calibration


def calibrate_to_curve(steer: Steer, lm: LoadedModel, source: StrengthCurve, *, value: float = 1.0,
                       text: CurveText | None = None, rel_tol: float = REL_TOL, max_evals: int = 12,
                       log: Log = lambda m: None) -> tuple[Steer, dict[str, Any]]:
    """Scale ``steer``'s ε₀ so that κ on ``lm`` at ``value`` equals the source curve's κ at ``value``.

    ``source`` must be measured on ``text`` (default: the bundled curve text). Returns the calibrated
    steer (a copy, with its own curve on ``lm`` recorded) and the calibration record for the lineage:
    ``factor`` (new ε₀ / old ε₀), ``kappa_src``, ``kappa_tgt``, ``converged``, the text fingerprint.
    """
    from steerport.metrics import find_value_for_kl

    text = text or curve_text()
    if source.text.get("sha256") != text.sha256:
        raise SteerportError(f"the source's strength curve was measured on other neutral text (fingerprint "
                             f"{source.text.get('sha256')}, calibration text {text.sha256}); measure both on one text")
    if not (value > 0 and math.isfinite(value)):
        raise SteerportError(f"the calibration value must be a positive number, got {value}")
    k_s = source.kappa_at(value)
    if not k_s > 0:
        raise SteerportError("the source steer does not change its model's outputs at the reference value "
                             f"(κ = {k_s:g}); there is no strength to match")
    scorer = _scorer(lm, steer, text)

    seen: dict[float, float] = {}  # the solver may ask for a value twice (a bracket's end)

    def kl_at(s: float) -> float:
        if s not in seen:
            seen[s] = scorer.stats([(steer, s)]).kl
            log(f"  calibration: value {s:.4g} -> κ_tgt {seen[s]:.4g} (κ_src {k_s:.4g})")
        return seen[s]

    found = find_value_for_kl(kl_at, k_s, start=value, rel_tol=rel_tol, max_evals=max_evals)
    factor = found.value / value
    if not (factor > 0 and math.isfinite(factor)):
        raise SteerportError(f"calibration gave a factor that is not a positive number ({factor})")
    converged = abs(found.kl - k_s) <= rel_tol * k_s
    if not converged:
        log(f"note: calibration did not reach κ {k_s:.4g} within {max_evals} evaluations (closest {found.kl:.4g})")
    new = replace(steer, epsilon=steer.epsilon * factor, meta=dict(steer.meta))
    new.meta[META_KEY] = measure_curve(lm, new, text=text, scorer=scorer).to_dict()
    info = {"method": "kl", "against": "source strength curve", "factor": factor, "reference_value": value,
            "kappa_src": k_s, "kappa_tgt": found.kl, "converged": converged, "text": text.describe(),
            "source_curve_model": dict(source.model),
            "iterations": [{"factor": s / value, "kappa_tgt": k} for s, k in found.history]}
    return new, info


# --------------------------------------------------------------------------- is a steer calibrated?


def calibration_state(steer: Steer) -> str:
    """``native`` (made on its model), ``calibrated`` (carried, value matched by KL) or ``uncalibrated``
    (carried with an approximate value: embeddings-only or no calibration)."""
    lin = steer.meta.get("lineage")
    if not isinstance(lin, dict):
        return "native"
    if steer.kind == "token-prob":
        return "calibrated"  # its value is a probability ratio, recomputed on the target
    cal = lin.get("calibration")
    if isinstance(cal, dict):
        return "calibrated" if cal.get("method") == "kl" else "uncalibrated"
    return "calibrated" if isinstance(cal, str) and cal else "uncalibrated"  # actadd records a sentence


_warned: set[str] = set()


def warn_uncalibrated(steers: Sequence[Steer], warn: Log) -> None:
    """Once per process and steer: say that a carried steer's value is approximate."""
    for steer in steers:
        if steer.fingerprint in _warned or calibration_state(steer) != "uncalibrated":
            continue
        _warned.add(steer.fingerprint)
        spec = steer.model.get("spec", "its model")
        warn(f"warning: this steer was transferred without calibration on {spec}; its value is approximate "
             f"(calibrate it: steerport calibrate STEER.st --model {spec})")


# --------------------------------------------------------------------------- a file's steer, on its model


def source_curve_of(steer: Steer, source: Steer | None = None, source_lm: Callable[[], LoadedModel] | None = None,
                    *, text: CurveText | None = None, force: bool = False, log: Log = lambda m: None) -> StrengthCurve:
    """The strength curve of the steer a transferred ``steer`` was carried from.

    From ``source`` (the source steer itself: its recorded curve, else measured on ``source_lm()``), else from the
    source steer's metadata kept in ``steer``'s lineage. A source that is not the one in the lineage, or no curve
    anywhere, is a one-line error.
    """
    text = text or curve_text()
    lin = steer.meta.get("lineage")
    if not isinstance(lin, dict):
        raise SteerportError("this steer was not transferred (it has no lineage), so it has no source strength to match")
    src_info = lin.get("source_steer")
    src_fp = src_info.get("fingerprint") if isinstance(src_info, dict) else src_info
    if source is not None:
        if src_fp and source.fingerprint != src_fp:
            raise SteerportError(f"the given source steer (fingerprint {source.fingerprint}) is not the one this steer was "
                                 f"transferred from ({src_fp})")
        return curve_for(source, source_lm, text=text, force=force, log=log)
    meta = src_info.get("meta") if isinstance(src_info, dict) else None
    doc = meta.get(META_KEY) if isinstance(meta, dict) else None
    if doc is None:
        raise SteerportError("this steer's lineage records no strength curve of its source steer (an older file); give "
                             "the source steer with --source SRC.st")
    curve = StrengthCurve.from_dict(doc)
    if src_fp and curve.steer != src_fp:
        raise SteerportError(f"the source strength curve in this steer's lineage was measured for another steer "
                             f"({curve.steer}, source {src_fp})")
    if curve.text.get("sha256") != text.sha256:
        raise SteerportError(f"the source strength curve in this steer's lineage was measured on other neutral text "
                             f"(fingerprint {curve.text.get('sha256')}, this steerport's {text.sha256}); give --source SRC.st")
    return curve


def calibrate_steer(steer: Steer, lm: LoadedModel, *, source: Steer | None = None,
                    source_lm: Callable[[], LoadedModel] | None = None, value: float = 1.0, force: bool = False,
                    log: Log = lambda m: None) -> tuple[Steer, dict[str, Any]]:
    """``steer`` (a file's, on its model ``lm``) with its strength curve recorded and, when it was transferred, its
    ε₀ calibrated against its source's curve. Returns the new steer and what was done (``action``)."""
    from steerport.hooks import check_compatible

    check_compatible(lm, steer, force=force)
    text = curve_text()
    if not isinstance(steer.meta.get("lineage"), dict):
        new = replace(steer, meta=dict(steer.meta))
        record_curve(lm, new, text=text, force=force)
        return new, {"action": "recorded", "curve": new.meta[META_KEY]}
    curve = source_curve_of(steer, source, source_lm, text=text, force=force, log=log)
    new, info = calibrate_to_curve(steer, lm, curve, value=value, text=text, log=log)
    lineage = dict(new.meta["lineage"])
    info = {**info, "epsilon_before": steer.epsilon, "by": "steerport calibrate", "previous": lineage.get("calibration")}
    lineage["calibration"] = info
    new.meta["lineage"] = lineage
    return new, {"action": "calibrated", **info}
