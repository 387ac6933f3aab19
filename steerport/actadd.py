"""ActAdd steering vectors (Turner et al., "Activation Addition", arXiv 2308.10248): making,
calibrating and transferring them. Applying them is the kind's job (:mod:`steerport.kinds.actadd`).

A steering vector is the difference of residual-stream activations at decoder layer L
between two prompts, e.g. " Love" and " Hate", padded to the same token length::

    v[p] = h_L(plus)[p] - h_L(minus)[p]          v: (P, d), one row per prompt position p

where h_L is the residual stream entering decoder layer L (TransformerLens ``resid_pre``).
Several pairs are averaged (shorter vectors count as zero at missing positions).
At inference it is added, times the coefficient c = s·ε₀ (user value s times the stored
recommended coefficient ε₀), to the residual stream entering layer L::

    front (paper):  h_L[start + p] += c · v[p]     for p < P, start = first real token of the row
    all:            h_L[t] += c · v                for every position t  (v: (d,), last-token difference)

Several layers (e.g. an imported llama.cpp / repeng control vector): metadata ``layers`` =
[L1, ...] and a (len(layers), d) vector, row i added at every position at layer ``layers[i]``;
layer n_layers is the stream *leaving* the last decoder block (before the final norm).

Transfer to another model (:func:`transfer_actadd`; :func:`transfer_with_options` is the
kind's ``transfer`` entry): ``recipe`` recomputes the vector from the stored prompt pairs on
the target at the layer of matching relative depth; ``map`` fits a least-squares residual map
h_t ≈ h_s K on neutral text at positions both tokenizations end on the same character
(:func:`steerport.pairing.paired_states`, :func:`steerport.linmap.fit_map`) and carries
v_t = v_s K. Calibration matches κ (mean KL from the unsteered model on neutral text,
:func:`steerport.scoring.mean_kl`) with :func:`steerport.metrics.find_value_for_kl`.

Example::

    steer = make_actadd(lm, [(" Love", " Hate")], layer=0.2, coeff=5.0)
    steer.save("love.st")
    print(generate(lm, ["I hate you because"], [(steer, 1.0)])[0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from steerport.capture import capture
from steerport.errors import SteerportError
from steerport.hooks import check_compatible
from steerport.kinds.actadd import actadd_layers
from steerport.linmap import fit_map
from steerport.metrics import find_value_for_kl
from steerport.models import (
    LoadedModel,
    decoder_layers,  # noqa: F401  (re-exported for older imports)
    load_model,
)
from steerport.pairing import paired_states
from steerport.scoring import mean_kl
from steerport.steer import Steer
from steerport.texts import neutral

if TYPE_CHECKING:
    from steerport.transfer import TransferOptions, TransferResult

POSITIONS = ("front", "all")
METHODS = ("recipe", "map")
MAP_RIDGE = 1e-3  # the residual map's ridge, relative to the mean diagonal of the centred Gram matrix
Log = Callable[[str], None]


# --------------------------------------------------------------------------- finding layers


def num_layers(lm: LoadedModel) -> int:
    return lm.n_layers


def resolve_layer(lm: LoadedModel, layer: float | str) -> int:
    """A layer index from an index (``6``, ``-3``) or a fraction of depth (``0.25``, ``"0.25"``).

    A fraction f maps to round(f · n_layers), kept inside 0 .. n_layers-1.
    """
    n = num_layers(lm)
    if isinstance(layer, str):
        try:
            layer = float(layer) if any(c in layer for c in ".eE") else int(layer)
        except ValueError:
            raise SteerportError(f"layer must be an index or a fraction of depth, got {layer!r}") from None
    if isinstance(layer, float):
        if not 0.0 <= layer <= 1.0:
            raise SteerportError(f"a fractional layer must lie in [0, 1], got {layer}")
        return min(round(layer * n), n - 1)
    index = layer + n if layer < 0 else layer
    if not 0 <= index < n:
        raise SteerportError(f"layer {layer} out of range: {lm.spec!r} has {n} decoder layers (0..{n - 1})")
    return index


def matching_layer(layer: int, n_source: int, n_target: int) -> int:
    """The target layer at the relative depth of source ``layer`` (round(layer/n_source · n_target));
    a layer inside the network stays inside (≤ n_target - 1), the stream after the last block
    (layer n_source) maps to the target's (n_target)."""
    if layer >= n_source:
        return n_target
    return min(round(layer / n_source * n_target), n_target - 1)


# --------------------------------------------------------------------------- computing vectors


def padded_pair(tokenizer: Any, plus: str, minus: str) -> tuple[list[int], list[int]]:
    """Token ids of both prompts, the shorter padded on the right with the space token (as the paper does)."""
    a = tokenizer(plus)["input_ids"]
    b = tokenizer(minus)["input_ids"]
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    pad = space[0] if len(space) == 1 else tokenizer.pad_token_id
    P = max(len(a), len(b))
    return a + [pad] * (P - len(a)), b + [pad] * (P - len(b))


@torch.no_grad()
def residual_stream(lm: LoadedModel, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Residual stream entering decoder layer ``layer`` for a batch of equal-length ids: (b, T, d) float32."""
    (h,) = capture(lm, [layer], input_ids=ids.to(lm.device))
    return h.float().cpu()


def compute_vector(
    lm: LoadedModel, pairs: Sequence[tuple[str, str]], layer: int, positions: str = "front"
) -> torch.Tensor:
    """The averaged ActAdd vector: (P_max, d) for ``front``, (d,) last-token difference for ``all``."""
    if not pairs:
        raise SteerportError("give at least one (plus, minus) prompt pair")
    if positions not in POSITIONS:
        raise SteerportError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    diffs = []
    for plus, minus in pairs:
        a, b = padded_pair(lm.tokenizer, plus, minus)
        h = residual_stream(lm, torch.tensor([a, b]), layer)  # (2, P, d)
        diffs.append(h[0] - h[1])  # (P, d)
    if positions == "all":
        return torch.stack([d[-1] for d in diffs]).mean(0)  # (d,)
    P = max(d.shape[0] for d in diffs)
    total = torch.zeros(P, diffs[0].shape[1])
    for d in diffs:
        total[: d.shape[0]] += d
    return total / len(diffs)  # (P, d)


def make_actadd(
    lm: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    *,
    layer: float | str,
    coeff: float = 5.0,
    positions: str = "front",
    positive: str = "",
) -> Steer:
    """Compute an ActAdd steer; ``coeff`` is stored as ε₀ (the recommended coefficient)."""
    index = resolve_layer(lm, layer)
    vector = compute_vector(lm, pairs, index, positions)
    n = num_layers(lm)
    return Steer(
        "actadd",
        {"vector": vector.contiguous()},
        epsilon=float(coeff),
        positive=positive or " / ".join(p for p, _ in pairs),
        model={"spec": lm.spec, "fingerprint": lm.fingerprint},
        meta={
            "layer": index,
            "n_layers": n,
            "layer_fraction": index / n,
            "positions": positions,
            "pairs": [[p, m] for p, m in pairs],
            "method": "ActAdd (Turner et al. 2023): residual-stream difference entering decoder layer `layer`",
        },
    )


# --------------------------------------------------------------------------- calibration


def calibrate_value(lm: LoadedModel, steer: Steer, texts: Sequence[str], target_kl: float, *, start: float = 1.0,
                    rel_tol: float = 0.02, max_evals: int = 24, max_tokens: int = 64, batch_size: int = 8,
                    force: bool = False) -> tuple[float, float]:
    """The value s at which κ(s) (mean KL from the unsteered model on ``texts``) matches ``target_kl``.

    κ is :func:`steerport.scoring.mean_kl`; s comes from :func:`steerport.metrics.find_value_for_kl`
    (started at ``start``, stopping when |κ − target| ≤ ``rel_tol`` · target or after ``max_evals``
    evaluations, each one pass over ``texts``). Returns (s, κ(s)). ``force`` applies a steer made
    for another model (as ``steered``).

    Example::

        s, kappa = calibrate_value(lm, replace(steer, epsilon=1.0), neutral("calib", 16), 0.1, start=5.0)
    """
    found = find_value_for_kl(
        lambda s: mean_kl(lm, texts, [(steer, s)], batch_size=batch_size, max_tokens=max_tokens, force=force),
        target_kl, start=start, rel_tol=rel_tol, max_evals=max_evals)
    return found.value, found.kl


# --------------------------------------------------------------------------- transfer


def _leading_special(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []))
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def fit_residual_map(Xs: torch.Tensor, Xt: torch.Tensor, ridge: float = MAP_RIDGE) -> tuple[torch.Tensor, float]:
    """Least squares K (d_s, d_t) with centred rows, Xt - μt ≈ (Xs - μs) K; returns K and held-out R².

    :func:`steerport.linmap.fit_map` with a relative ``ridge``: R² on a seeded random 20 % of the
    rows (fit on the rest), then K refit on all rows.
    """
    fit = fit_map(Xs, Xt, method="ridge", ridge=ridge, center=True, holdout=0.2, seed=0, refit_on_all=True)
    return fit.M, float(fit.heldout["r2"])


def _map_vectors(steer: Steer, source: LoadedModel, target: LoadedModel, texts: Sequence[str],
                 src_layers: list[int], tgt_layers: list[int], *, max_tokens: int, ridge: float,
                 progress: Callable[[int], None] | None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The steer's rows carried by one residual map per layer pair, and what the fits measured."""
    _, vectors = actadd_layers(steer)
    fits = paired_states(source, target, texts, src_layers, tgt_layers, max_tokens=max_tokens, progress=progress)
    pairs = steer.meta.get("pairs") or []
    carried, r2s = [], []
    for (Xs, Xt), v in zip(fits, vectors):
        K, r2 = fit_residual_map(Xs, Xt, ridge)  # (d_s, d_t)
        r2s.append(r2)
        if v.dim() == 1:
            carried.append(v @ K)  # (d_t,)
        else:  # front rows: re-laid after the target's own leading special tokens
            text = pairs[0][0] if pairs else ""
            ns, nt = _leading_special(source.tokenizer, text), _leading_special(target.tokenizer, text)
            body = v[ns:] @ K  # (P - ns, d_t)
            carried.append(torch.cat([torch.zeros(nt, K.shape[1]), body]))
    multi = "layers" in steer.meta
    return carried, {"pairs_fit": int(fits[0][0].shape[0]), "map_heldout_r2": r2s if multi else r2s[0]}


def transfer_actadd(
    steer: Steer,
    source: LoadedModel,
    target: LoadedModel,
    neutral_texts: Sequence[str],
    *,
    method: str = "recipe",
    calibrate: bool = True,
    max_tokens: int = 64,
    ridge: float = MAP_RIDGE,
    force: bool = False,
    log: Log = lambda m: None,
    progress: Callable[[int], None] | None = None,
) -> Steer:
    """Carry an ActAdd steer to ``target``.

    ``recipe``: recompute the vector from the stored prompt pairs on the target at the layer of
    matching relative depth; set ε₀ so the target's κ (mean KL on ``neutral_texts``) at value 1
    matches the source's. Single-layer steers only.
    ``map``: fit K with h_t ≈ h_s K on residual streams of the neutral text at positions where both
    tokenizations end on the same character, and carry v_t = v_s K (front rows re-laid after the
    target's own leading special tokens); ε₀ is kept, or calibrated like ``recipe`` if ``calibrate``;
    ``ridge`` is the map's relative ridge (see :func:`fit_residual_map`). A multi-layer steer gets one
    map per listed layer (all fitted from one forward pass per text and model), each at the target
    layer of matching depth; rows landing on the same target layer are summed (as llama.cpp sums
    directions naming the same layer). A steer made for another model than ``source`` is refused
    unless ``force``. ``progress(1)`` is called per neutral text paired.
    """
    if steer.kind != "actadd":
        raise SteerportError(f"transfer_actadd needs an actadd steer, got {steer.kind!r}")
    if method not in METHODS:
        raise SteerportError(f"actadd transfer method must be recipe or map, got {method!r}")
    check_compatible(source, steer, force=force)
    src_layers, _ = actadd_layers(steer)
    multi = "layers" in steer.meta
    pairs = [tuple(p) for p in steer.meta.get("pairs", [])]
    if method == "recipe" and not pairs:
        raise SteerportError("this actadd steer stores no prompt pairs, so it cannot be recomputed; use method='map'")
    if method == "recipe" and multi:
        raise SteerportError(f"recipe transfer recomputes a single-layer steer; this one acts on {len(src_layers)} "
                             "layers, use method='map'")
    if not neutral_texts:
        raise SteerportError("actadd transfer needs neutral texts (for calibration and position pairing); got none")
    n_src, n_tgt = steer.meta.get("n_layers", num_layers(source)), num_layers(target)
    tgt_layers = [matching_layer(layer, n_src, n_tgt) for layer in src_layers]
    calibrated = calibrate or method == "recipe"
    kappa_src = None
    if calibrated:
        kappa_src = mean_kl(source, neutral_texts, [(steer, 1.0)], max_tokens=max_tokens, force=force)
        if not kappa_src > 0:
            raise SteerportError(f"the steer does not change the source model's predictions on the neutral text "
                                 f"(κ = {kappa_src:g}), so there is no strength to match on the target")
        log(f"source κ at value 1: {kappa_src:.4g} nats/token on {len(neutral_texts)} neutral texts")
    lineage: dict[str, Any] = {
        "source_steer": steer.fingerprint,
        "source_model": dict(steer.model),
        "method": method,
        **({"source_layers": src_layers, "target_layers": tgt_layers} if multi else
           {"source_layer": src_layers[0], "layer_fraction": src_layers[0] / n_src}),
        "neutral_texts": len(neutral_texts),
    }
    if method == "recipe":
        positions = steer.meta.get("positions", "front")
        carried = [compute_vector(target, pairs, tgt_layers[0], positions)]
    else:
        log(f"fitting residual maps at layers {src_layers} -> {tgt_layers} on {len(neutral_texts)} neutral texts")
        carried, facts = _map_vectors(steer, source, target, neutral_texts, src_layers, tgt_layers,
                                      max_tokens=max_tokens, ridge=ridge, progress=progress)
        lineage.update(facts)
    meta = {k: v for k, v in steer.meta.items() if k not in ("lineage", "layer", "layers", "layer_fraction")}
    meta["n_layers"] = n_tgt
    if multi:
        by_layer: dict[int, torch.Tensor] = {}
        for layer, row in zip(tgt_layers, carried):
            by_layer[layer] = by_layer[layer] + row if layer in by_layer else row
        meta["layers"] = sorted(by_layer)
        vector = torch.stack([by_layer[layer] for layer in meta["layers"]])  # (len(layers), d_t)
    else:
        meta.update({"layer": tgt_layers[0], "layer_fraction": tgt_layers[0] / n_tgt})
        vector = carried[0]
    new = Steer("actadd", {"vector": vector.contiguous()}, epsilon=steer.epsilon, positive=steer.positive,
                model={"spec": target.spec, "fingerprint": target.fingerprint}, meta=meta)
    if kappa_src is not None:
        # κ at value 1 of the new steer with ε₀ = 1, then scale ε₀ so κ matches the source's
        unit = Steer(new.kind, new.tensors, 1.0, new.positive, new.model, new.meta)
        s, k = calibrate_value(target, unit, neutral_texts, kappa_src, start=steer.epsilon, max_tokens=max_tokens)
        lineage.update({"calibration": "matched mean KL on neutral text", "kappa_source": kappa_src,
                        "kappa_target": k, "calibration_factor": s / steer.epsilon})
        log(f"target ε₀ {s:.4g} (κ {k:.4g}, source {kappa_src:.4g})")
        new.epsilon = s
    new.meta["lineage"] = lineage
    return new


def _full_model(model: LoadedModel | str, options: TransferOptions) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, str):
        raise SteerportError(f"actadd transfer needs full models (a spec or a LoadedModel), got {type(model).__name__}")
    return load_model(model, dtype=options.dtype, device=options.device)


def _calibrates_map(calibrate: str) -> bool:
    """Whether a map transfer calibrates ε₀, from ``TransferOptions.calibrate``."""
    if calibrate == "embed":
        raise SteerportError("actadd steers are calibrated by KL on neutral text (--calibrate kl or auto) or not "
                             "at all (none); embed calibration is for LM-Steer steers")
    return calibrate in ("auto", "kl")


def transfer_with_options(
    steer: Steer,
    source: LoadedModel | str,
    target: LoadedModel | str,
    options: TransferOptions,
    *,
    mapping_path: str | None = None,
    source_path: str | None = None,
    force: bool = False,
    log: Log = lambda m: None,
    progress: Callable[[int], None] | None = None,
) -> TransferResult:
    """The actadd kind's ``transfer``: :func:`transfer_actadd` driven by :class:`~steerport.transfer.TransferOptions`.

    ``source``/``target``: specs (loaded with ``options.dtype`` / ``options.device``) or loaded models.
    ``options.actadd_method``: ``recipe`` (always KL-calibrated) or ``map`` (calibrated when
    ``options.calibrate`` is ``auto`` or ``kl``, ε₀ kept for ``none``); ``options.texts`` (default the
    first 64 paragraphs of ``texts.neutral("fit")``) cut to ``options.max_tokens`` tokens. ActAdd uses no
    vocabulary mapping, so a ``mapping_path`` is an error. ``source_path`` is recorded in the lineage.

    Example::

        res = transfer_with_options(steer, "smollm2-135m", "gemma3-270m", TransferOptions(actadd_method="map"))
        res.steer.save("love.gemma3-270m.st")
    """
    from steerport.transfer import TransferResult

    if mapping_path is not None:
        raise SteerportError("actadd steers are carried without a vocabulary mapping; do not give one")
    method = options.actadd_method
    if method not in METHODS:
        raise SteerportError(f"actadd transfer method must be recipe or map, got {method!r}")
    calibrate = method == "recipe" or _calibrates_map(options.calibrate)
    texts = list(options.texts) if options.texts is not None else neutral("fit", 64)
    src, tgt = _full_model(source, options), _full_model(target, options)
    new = transfer_actadd(steer, src, tgt, texts, method=method, calibrate=calibrate, max_tokens=options.max_tokens,
                          force=force, log=log, progress=progress)
    if source_path is not None:
        new.meta["lineage"]["source_path"] = str(source_path)
    return TransferResult(steer=new, mapping=None, lineage=new.meta["lineage"])
