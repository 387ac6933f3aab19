"""ActAdd steering vectors (Turner et al., "Activation Addition", arXiv 2308.10248).

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
[L1, ...] and a (len(layers), d) vector, row i added at every position at layer ``layers[i]``.
Layer n_layers is the stream *leaving* the last decoder block (before the final norm); it is
added by a forward hook on that block's output::

    multi-layer:    h_{L_i}[t] += c · v[i]      for every position t and every listed layer L_i

Positions are absolute sequence positions. In cached generation each forward pass covers
positions [offset, offset + T); the hook adds only where that window meets the front
positions, so the prefill pass gets the vector and later one-token passes do not (unless
the prompt is shorter than P) — the same result as recomputing the whole sequence.

Example::

    steer = make_actadd(lm, [(" Love", " Hate")], layer=0.2, coeff=5.0)
    steer.save("love.st")
    print(generate(lm, ["I hate you because"], [(steer, 1.0)])[0])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from steerport.errors import SteerportError
from steerport.capture import input_of
from steerport.kinds.actadd import actadd_layers as actadd_layers  # noqa: F401  (re-exported)
from steerport.models import LoadedModel, decoder_layers
from steerport.steer import Steer

POSITIONS = ("front", "all")


# --------------------------------------------------------------------------- finding layers


def num_layers(lm: LoadedModel) -> int:
    return lm.n_layers


def resolve_layer(lm: LoadedModel, layer: int | float | str) -> int:
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


# --------------------------------------------------------------------------- computing vectors


def padded_pair(tokenizer, plus: str, minus: str) -> tuple[list[int], list[int]]:
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
    return input_of(lm.model, decoder_layers(lm.model)[layer], input_ids=ids.to(lm.device)).float().cpu()


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
    layer: int | float | str,
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


# --------------------------------------------------------------------------- applying




# --------------------------------------------------------------------------- calibration and transfer


@torch.no_grad()
def calibrate_value(
    lm: LoadedModel,
    steer: Steer,
    texts: Sequence[str],
    target_kl: float,
    *,
    start: float = 1.0,
    iters: int = 16,
    tol: float = 0.03,
    max_tokens: int = 64,
    batch_size: int = 8,
) -> tuple[float, float]:
    """The value s at which κ(s) (mean KL from the unsteered model on ``texts``) matches ``target_kl``.

    κ of an additive steer grows like a power of s (≈ s² when small), so we step in log-log
    space: s ← s · (target/κ)^(1/p) with p the measured local exponent (2 at first), bisecting
    the bracket of values seen so far when that step leaves it, until
    |log κ/target| < ``tol``. The unsteered log-probs are computed once. Returns (s, κ(s)).
    """
    from steerport.hooks import steered
    from steerport.scoring import batches, kl_divergence

    if target_kl <= 0:
        raise SteerportError(f"target KL must be positive, got {target_kl}")
    cached = []
    for batch in batches(lm, texts, batch_size, max_tokens):
        cached.append((batch, torch.log_softmax(lm.model(**batch).logits.float(), -1)))

    def kappa(s: float) -> float:
        total, count = 0.0, 0
        with steered(lm, [(steer, s)], force=True):
            for batch, base in cached:
                new = torch.log_softmax(lm.model(**batch).logits.float(), -1)
                mask = batch["attention_mask"].bool()
                total += kl_divergence(new, base)[mask].sum().item()
                count += int(mask.sum())
        return total / max(count, 1)

    s, k = start, kappa(start)
    prev = None
    lo, hi = 0.0, math.inf  # values known to fall short of / overshoot the target
    for _ in range(iters):
        if k > 0 and abs(math.log(k / target_kl)) < tol:
            break
        if k < target_kl:
            lo = max(lo, s)
        else:
            hi = min(hi, s)
        p = 2.0
        if prev is not None and prev[1] > 0 and k > 0 and prev[0] != s:
            p = min(max(math.log(k / prev[1]) / math.log(s / prev[0]), 0.5), 4.0)
        prev = (s, k)
        s = s * (target_kl / max(k, 1e-12)) ** (1 / p)
        if not lo < s < hi and lo > 0 and hi < math.inf:  # the power-law step left the bracket: bisect it
            s = math.sqrt(lo * hi)
        k = kappa(s)
    return s, k


def _leading_special(tokenizer, text: str) -> int:
    ids = tokenizer(text)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []))
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def fit_residual_map(Xs: torch.Tensor, Xt: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, float]:
    """Least squares K (d_s, d_t) with centered rows: Xt - μt ≈ (Xs - μs) K; returns K and held-out R².

    The ridge added to XsᵀXs is ``ridge`` times its mean diagonal. The last 20% of rows are held
    out for R², then K is refit on all rows.
    """

    def solve(xs: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        xs = xs.double() - xs.double().mean(0)
        xt = xt.double() - xt.double().mean(0)
        G = xs.T @ xs  # (d_s, d_s)
        G += ridge * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
        return torch.linalg.solve(G, xs.T @ xt)  # (d_s, d_t)

    n = Xs.shape[0]
    cut = int(n * 0.8)
    K = solve(Xs[:cut], Xt[:cut])
    xs_te = Xs[cut:].double() - Xs[:cut].double().mean(0)
    xt_te = Xt[cut:].double() - Xt[:cut].double().mean(0)
    resid = ((xt_te - xs_te @ K) ** 2).sum()
    total = ((Xt[cut:].double() - Xt[cut:].double().mean(0)) ** 2).sum()
    r2 = float(1 - resid / total)
    return solve(Xs, Xt).float(), r2


def matching_layer(layer: int, n_source: int, n_target: int) -> int:
    """The target layer at the relative depth of source ``layer`` (round(layer/n_source · n_target));
    a layer inside the network stays inside (≤ n_target - 1), the stream after the last block
    (layer n_source) maps to the target's (n_target)."""
    if layer >= n_source:
        return n_target
    return min(round(layer / n_source * n_target), n_target - 1)


def transfer_actadd(
    steer: Steer,
    source: LoadedModel,
    target: LoadedModel,
    neutral_texts: Sequence[str],
    *,
    method: str = "recipe",
    calibrate: bool = True,
    max_tokens: int = 64,
    ridge: float = 1e-3,
    progress: Callable[[int], None] | None = None,
) -> Steer:
    """Carry an ActAdd steer to ``target``.

    ``recipe``: recompute the vector from the stored prompt pairs on the target at the layer of
    matching relative depth; set ε₀ so the target's κ (mean KL on ``neutral_texts``) at value 1
    matches the source's. Single-layer steers only.
    ``map``: fit K with h_t ≈ h_s K on residual streams of the neutral text at positions where both
    tokenizations end on the same character, and carry v_t = v_s K (front rows re-laid after the
    target's own leading special tokens); ε₀ is kept, or calibrated like ``recipe`` if ``calibrate``;
    ``ridge`` is the map's relative ridge (see ``fit_residual_map``). A multi-layer steer gets one map per listed layer (all fitted from one forward pass per text
    and model), each at the target layer of matching depth; rows landing on the same target layer
    are summed (as llama.cpp sums directions naming the same layer).
    """
    if steer.kind != "actadd":
        raise SteerportError(f"transfer_actadd needs an actadd steer, got {steer.kind!r}")
    if method not in ("recipe", "map"):
        raise SteerportError(f"actadd transfer method must be recipe or map, got {method!r}")
    src_layers, vectors = actadd_layers(steer)
    multi = "layers" in steer.meta
    pairs = [tuple(p) for p in steer.meta.get("pairs", [])]
    if method == "recipe" and not pairs:
        raise SteerportError("this actadd steer stores no prompt pairs, so it cannot be recomputed; use method='map'")
    if method == "recipe" and multi:
        raise SteerportError(f"recipe transfer recomputes a single-layer steer; this one acts on {len(src_layers)} layers, use method='map'")
    n_src, n_tgt = steer.meta.get("n_layers", num_layers(source)), num_layers(target)
    tgt_layers = [matching_layer(layer, n_src, n_tgt) for layer in src_layers]
    positions = steer.meta.get("positions", "front")
    kappa_src = None
    if calibrate or method == "recipe":
        from steerport.scoring import mean_kl

        kappa_src = mean_kl(source, neutral_texts, [(steer, 1.0)], max_tokens=max_tokens)
    lineage = {
        "source_steer": steer.fingerprint,
        "source_model": dict(steer.model),
        "method": method,
        **({"source_layers": src_layers, "target_layers": tgt_layers} if multi else
           {"source_layer": src_layers[0], "layer_fraction": src_layers[0] / n_src}),
        "neutral_texts": len(neutral_texts),
    }
    if method == "recipe":
        carried = [compute_vector(target, pairs, tgt_layers[0], positions)]
    else:
        from steerport.align_positions import paired_hidden_states_at

        fits = paired_hidden_states_at(source, target, neutral_texts, layers_a=src_layers, layers_b=tgt_layers,
                                       max_tokens=max_tokens, progress=progress)
        carried, r2s = [], []
        for (Xs, Xt), v in zip(fits, vectors):
            K, r2 = fit_residual_map(Xs, Xt, ridge)  # (d_s, d_t)
            r2s.append(r2)
            if v.dim() == 1:
                carried.append(v @ K)  # (d_t,)
            else:
                text = pairs[0][0] if pairs else ""
                ns, nt = _leading_special(source.tokenizer, text), _leading_special(target.tokenizer, text)
                body = v[ns:] @ K  # (P - ns, d_t)
                carried.append(torch.cat([torch.zeros(nt, K.shape[1]), body]))
        lineage.update({"pairs_fit": int(fits[0][0].shape[0]), "map_heldout_r2": r2s if multi else r2s[0]})
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
    new = Steer(
        "actadd",
        {"vector": vector.contiguous()},
        epsilon=steer.epsilon,
        positive=steer.positive,
        model={"spec": target.spec, "fingerprint": target.fingerprint},
        meta=meta,
    )
    if calibrate or method == "recipe":
        # κ at value 1 of the new steer with ε₀ = 1, then scale ε₀ so κ matches the source's
        unit = Steer(new.kind, new.tensors, 1.0, new.positive, new.model, new.meta)
        s, k = calibrate_value(target, unit, neutral_texts, kappa_src, start=steer.epsilon, max_tokens=max_tokens)
        lineage.update({"calibration": "matched mean KL on neutral text", "kappa_source": kappa_src,
                        "kappa_target": k, "calibration_factor": s / steer.epsilon})
        new.epsilon = s
    new.meta["lineage"] = lineage
    return new
