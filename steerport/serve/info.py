"""What ``GET /v1/steers`` tells a client about each loaded steer, computed once at start.

Strength curve: κ(s) = mean over positions of neutral text of KL(p_s ‖ p_0)
at a few values s, on a few of the bundled neutral paragraphs (short, so start-up stays cheap).
Recommended range: the file's ``recommended_range`` if it records one, else the widest probed
values on each side with κ ≤ ``kl_budget``.
"""

from __future__ import annotations

from collections.abc import Sequence

from steerport.errors import SteerportError
from steerport.explain import default_neutral, steer_keywords
from steerport.models import LoadedModel
from steerport.scoring import scorer_for
from steerport.steer import Steer
from steerport.strength import calibration_state, recorded_curve

CURVE_VALUES = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0)
KL_BUDGET = 0.1  # nats/token


def strength_curve(lm: LoadedModel, steer: Steer, values: Sequence[float], texts: Sequence[str],
                   max_tokens: int = 64) -> list[dict]:
    """[{"value": s, "kl": κ(s)}] on ``texts`` (truncated to ``max_tokens``), by the shared scorer: one body
    pass, then only the head per value for steers acting at the head. The steers were checked against the
    model at start (with the user's --force), so no check is repeated here."""
    scorer = scorer_for(lm, texts, [steer], max_tokens=max_tokens, force=True)
    stats = scorer.stats_many([[(steer, float(v))] for v in values])
    return [{"value": float(v), "kl": round(st.kl, 5)} for v, st in zip(values, stats)]


def recorded_for(steer: Steer, lm: LoadedModel) -> dict | None:
    """The strength curve recorded in the steer's file (:mod:`steerport.strength`) when it was measured for this
    steer on this model, else None."""
    try:
        curve = recorded_curve(steer)
    except SteerportError:
        return None
    if curve is None or curve.steer != steer.fingerprint or curve.model.get("fingerprint") != lm.fingerprint:
        return None
    return {"points": curve.rows(), "text": curve.text}


def recommended_range(steer: Steer, curve: list[dict], max_value: float) -> dict:
    rec = steer.meta.get("recommended_range")
    if (isinstance(rec, list) and len(rec) == 2 and all(isinstance(x, (int, float)) for x in rec)):
        return {"range": [float(rec[0]), float(rec[1])], "source": "file"}
    lo = min((p["value"] for p in curve if p["value"] < 0 and p["kl"] <= KL_BUDGET), default=0.0)
    hi = max((p["value"] for p in curve if p["value"] > 0 and p["kl"] <= KL_BUDGET), default=0.0)
    return {"range": [max(lo, -max_value), min(hi, max_value)],
            "source": f"widest probed values with KL <= {KL_BUDGET} nats/token on neutral text"}


def _kw(items) -> list[dict]:
    return [{"token": k.surface, "score": round(k.score, 5)} for k in items]


def describe_steers(lm: LoadedModel, steers: dict[str, Steer], *, max_value: float, curve: bool = True,
                    keywords: bool = True, n_texts: int = 4) -> list[dict]:
    """One JSON-ready record per loaded steer (runs a few forward passes; call before serving)."""
    texts = default_neutral(n_texts)
    out = []
    for name, steer in steers.items():
        values = [v for v in CURVE_VALUES if abs(v) <= max_value]
        pts = strength_curve(lm, steer, values, texts) if curve else []
        rec = {
            "name": name, "object": "steer", "kind": steer.kind, "positive": steer.positive or "",
            "meaning": f"+ means {steer.positive or 'the steer’s positive direction'}; − the opposite",
            "epsilon": steer.epsilon, "rank": steer.rank,
            "allowed_range": [-max_value, max_value],
            "recommended_range": recommended_range(steer, pts, max_value) if pts else
            {"range": steer.meta.get("recommended_range"), "source": "file"},
            "strength_curve": pts,
            "strength_curve_text": f"{len(texts)} bundled neutral paragraphs, 64 tokens each",
            "calibration": calibration_state(steer),  # native, calibrated or uncalibrated (a transferred value is approximate)
            "recorded_strength_curve": recorded_for(steer, lm),
            "model": dict(steer.model), "fingerprint": steer.fingerprint,
        }
        if keywords and steer.kind == "lm-steer":
            kw = steer_keywords(lm, steer, k=12, n_directions=2, value=1.0, texts=texts, force=True)
            rec["keywords"] = {
                "raised": _kw(kw.raised), "lowered": _kw(kw.lowered),
                "directions": [{"share": round(d.share, 4), "positive": _kw(d.positive), "negative": _kw(d.negative)}
                               for d in kw.directions],
            }
        out.append(rec)
    return out
