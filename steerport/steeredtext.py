"""Contexts a steer writes itself: text its own model samples under it, for the refined transfer.

The refined form (:mod:`steerport.refine`) fits the carried steer to the source steer's next-token
log-prob shifts at positions of neutral text. Neutral encyclopedic text seldom holds the contexts
where a steer's effect depends on what came before (an insult under way, a review turning sour):
``benchmarks/retained_parts.py`` measured that carried detox steers keep 0.12–0.31 of their native's
context-dependent separation. These texts add such contexts: the source model continues the opening
words of neutral texts with the steer at +v and at −v, v being the value at which the steer's KL
budget on the strength-curve text is ``kl`` (:func:`steerport.strength.value_for_kl`)::

    opening_i = the first WORDS words of neutral text i          (i < count, cycling)
    text_i^± = opening_i + sample(source model, steer at ±v, NEW_TOKENS tokens, T = 1, top-p 0.9)

The refinement then fits on the first ``KEEP_NEUTRAL`` neutral texts and these (about as many token
positions of each; with all 300 bundled neutral texts the one cell tried did worse). Sampling is seeded,
so the same steer and model give the same texts; they are kept in ``STEERPORT_HOME/steered-texts/<key>.json``
(keyed by the model's weights, the steer and every setting), so carrying one steer to several targets
samples once. Costs one generation of 2·count continuations on the source model (2–5 min on a 2-core
CPU for the catalog models) and a refinement pass over new text (1–2.5 min).

Example::

    extra, info = steered_texts(src_lm, steer, neutral("fit"), count=96)   # 192 texts, info["value"] = v
    texts = neutral("fit", limit=KEEP_NEUTRAL) + extra                     # what the refined transfer fits on
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from steerport.errors import SteerportError
from steerport.fileio import atomic_write_json
from steerport.hooks import generate
from steerport.models import LoadedModel
from steerport.refine_cache import weights_digest
from steerport.steer import Steer
from steerport.strength import CurveText, curve_text, value_for_kl

WORDS = 10  # words of each neutral text the source continues
NEW_TOKENS = 48  # tokens it writes
TEMPERATURE = 1.0
TOP_P = 0.9
SEED = 0
DEFAULT_KL = 0.3  # nats/token on the curve text: well past the usable range, so the steer's side shows in the text
KEEP_NEUTRAL = 100  # neutral texts the refinement keeps beside them (all 300 bundled ones did worse on one cell)


def openings(texts: Sequence[str], count: int, words: int = WORDS) -> list[str]:
    """The first ``words`` words of the first ``count`` non-empty texts, cycling when there are fewer."""
    heads = [" ".join(t.split()[:words]) for t in texts if t.strip()]
    if not heads:
        raise SteerportError("steered texts need at least one non-empty neutral text to open from")
    return [heads[i % len(heads)] for i in range(count)]


def steered_texts(lm: LoadedModel, steer: Steer, neutral_texts: Sequence[str], *, count: int,
                  kl: float = DEFAULT_KL, text: CurveText | None = None, seed: int = SEED, force: bool = False,
                  log: Callable[[str], None] = lambda m: None,
                  progress: Callable[[int], None] | None = None) -> tuple[list[str], dict[str, Any]]:
    """``2·count`` texts that ``lm`` writes with ``steer`` at −v and +v (κ(v) = ``kl``), each opened by a neutral
    text's first words, and the record for the lineage. κ is measured on ``text`` (default: the strength-curve
    text); ``seed`` seeds the sampling. ``count`` < 1 or a non-positive ``kl``: a one-line error."""
    if count < 1:
        raise SteerportError(f"the number of steered texts must be positive, got {count}")
    if not kl > 0:
        raise SteerportError(f"the steered texts' KL budget must be a positive number, got {kl}")
    heads = openings(neutral_texts, count)
    text = text or curve_text()
    settings = {"count": count, "kl": kl, "words": WORDS, "new_tokens": NEW_TOKENS, "temperature": TEMPERATURE,
                "top_p": TOP_P, "seed": seed}
    path = _cache_path(lm, steer, heads, text, settings)
    cached = _read_cache(path, 2 * count)
    if cached is not None:
        log(f"steered texts: reused {path}")
        return cached
    value = value_for_kl(lm, steer, kl, text=text, force=force)
    log(f"sampling {2 * count} continuations from {lm.spec} with the steer at ±{value:.3g} (κ {kl:g})")
    out: list[str] = []
    for k, s in enumerate((-value, value)):
        tails = generate(lm, heads, [(steer, s)], max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P,
                         seed=seed + k * count, batch_size=16, force=force, progress=progress)
        out += [" ".join((h + t).split()) for h, t in zip(heads, tails)]  # newlines and runs of spaces to one space
    info = {**settings, "value": round(value, 6)}
    try:
        atomic_write_json(path, {"texts": out, "info": info})
    except OSError:
        pass  # an unwritable cache only costs time
    return out, info


def _cache_path(lm: LoadedModel, steer: Steer, heads: list[str], text: CurveText, settings: dict[str, Any]) -> Path:
    """Where the texts of this model (its weights, dtype and device), steer, openings, curve text and settings live."""
    from steerport.catalog import steerport_home

    key = json.dumps([lm.fingerprint, weights_digest(lm), str(lm.dtype), lm.device.type, steer.fingerprint, heads,
                      text.sha256, settings])
    return steerport_home() / "steered-texts" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _read_cache(path: Path, n: int) -> tuple[list[str], dict[str, Any]] | None:
    """The cached texts and record, or None when the file is missing or not what :func:`steered_texts` writes."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    texts, info = (doc.get("texts"), doc.get("info")) if isinstance(doc, dict) else (None, None)
    if not (isinstance(texts, list) and len(texts) == n and all(isinstance(t, str) for t in texts)
            and isinstance(info, dict)):
        return None
    return texts, info
