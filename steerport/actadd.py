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
from steerport.hooks import APPLIERS, SteerValue, edit_input, input_of
from steerport.models import LoadedModel
from steerport.steer import Steer

POSITIONS = ("front", "all")


# --------------------------------------------------------------------------- finding layers


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of any transformers causal LM, found without per-architecture names.

    The ModuleList whose length is the config's number of hidden layers (GPT-2 ``transformer.h``,
    Llama/Qwen/Gemma ``model.layers``, NeoX ``gpt_neox.layers``, OPT ``model.decoder.layers``);
    the one holding most parameters if several match.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n is not None:
        matching = [m for m in lists if len(m) == n]
        if matching:
            return max(matching, key=lambda m: sum(p.numel() for p in m.parameters()))
    if lists:  # no usable config field: the biggest list of blocks
        return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    raise SteerportError(f"cannot find the decoder layers of {type(model).__name__}")


def num_layers(lm: LoadedModel) -> int:
    return len(decoder_layers(lm.model))


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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def actadd_layers(steer: Steer, n_layers: int | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Where an ActAdd steer acts, validated: ``vectors[i]`` (float32) is added at layer ``layers[i]``.

    Metadata ``layer`` (an int) with ``vector`` (d,) or (P, d) gives one layer; metadata ``layers``
    (distinct ints) with ``vector`` (len(layers), d) gives one row per layer, all positions.
    Layer L is the stream entering decoder block L, and L = n_layers the stream leaving the last
    block; with ``n_layers`` given, every layer must lie in 0 .. n_layers.

    Example::

        layers, vectors = actadd_layers(steer, num_layers(lm))    # [2, 3], [(d,), (d,)]
    """
    if steer.kind != "actadd":
        raise SteerportError(f"expected an actadd steer, got {steer.kind!r}")
    vec = steer.tensors["vector"].float()
    meta = steer.meta
    if "layers" in meta:
        layers = meta["layers"]
        if not isinstance(layers, list) or not layers or not all(_is_int(x) for x in layers):
            raise SteerportError(f"actadd metadata 'layers' must be a non-empty list of layer indices, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise SteerportError(f"actadd metadata 'layers' repeats a layer: {layers}")
        if meta.get("positions", "all") != "all":
            raise SteerportError(f"a multi-layer actadd steer acts on all positions, but its metadata says {meta['positions']!r}")
        rows = vec.reshape(1, -1) if vec.dim() == 1 else vec  # (len(layers), d)
        if rows.shape[0] != len(layers):
            raise SteerportError(f"actadd steer lists {len(layers)} layers but its vector has {rows.shape[0]} rows")
        vectors = list(rows)
    else:
        layer = meta.get("layer")
        if not _is_int(layer):
            raise SteerportError("actadd steer has no integer 'layer' (nor a 'layers' list) in its metadata")
        layers, vectors = [layer], [vec]
    if n_layers is not None:
        for layer in layers:
            if not 0 <= layer <= n_layers:
                raise SteerportError(
                    f"actadd steer acts at layer {layer}, but this model has {n_layers} decoder layers "
                    f"(valid: 0..{n_layers}, where {n_layers} is the stream after the last one)"
                )
    return list(layers), vectors


def _block_hidden(output):
    """The hidden states in a decoder block's output: a tensor, or a tuple whose first element is one."""
    return output[0] if isinstance(output, tuple) else output


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


@dataclass
class _Window:
    """Which absolute positions the current forward pass covers, per row."""

    offset: int = 0
    starts: torch.Tensor | None = None  # (b,) first real token of each row (left padding)


def _window_pre_hook(window: _Window):
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        T = ids.shape[1] if ids is not None else embeds.shape[1]
        mask = kwargs.get("attention_mask")
        past = kwargs.get("past_key_values")
        if mask is not None and mask.dim() == 2:
            window.offset = mask.shape[1] - T
            real = mask != 0
            window.starts = torch.where(real.any(1), real.int().argmax(1), torch.zeros_like(real[:, 0], dtype=torch.long))
        else:
            window.offset = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
            window.starts = None
        return None

    return hook


def _adder(window: _Window, front: torch.Tensor | None, everywhere: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> h + the vectors; front: (P, d) summed c·v for front positions; everywhere: (d,) summed c·v."""

    def add_to(h: torch.Tensor) -> torch.Tensor:  # h: (b, T, d)
        add = torch.zeros_like(h)
        if everywhere is not None:
            add = add + everywhere.to(h.dtype)
        if front is not None:
            b, T, _ = h.shape
            P = front.shape[0]
            starts = window.starts.to(h.device) if window.starts is not None else torch.zeros(b, dtype=torch.long, device=h.device)
            rel = window.offset + torch.arange(T, device=h.device)[None, :] - starts[:, None]  # (b, T)
            hit = (rel >= 0) & (rel < P)
            if hit.any():
                add[hit] = add[hit] + front.to(h.device, h.dtype)[rel[hit]]
        return h + add

    return add_to


def _post_hook(add_to: Callable[[torch.Tensor], torch.Tensor]):
    """On the last decoder block: change the stream leaving it (layer n_layers)."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (add_to(output[0]), *output[1:])
        return add_to(output)

    return hook


def apply_actadd(lm: LoadedModel, items: Sequence[SteerValue]) -> Callable[[], None]:
    """Register hooks for all ActAdd steers (summed per layer); returns the remover."""
    blocks = decoder_layers(lm.model)
    n = len(blocks)
    per_layer: dict[int, list[torch.Tensor | None]] = {}
    for steer, value in items:
        c = value * steer.epsilon
        layers, vectors = actadd_layers(steer, n)
        all_positions = steer.meta.get("positions", "front") == "all" or "layers" in steer.meta
        for layer, v in zip(layers, vectors):
            v = v * c
            slot = per_layer.setdefault(layer, [None, None])  # [front (P, d), everywhere (d,)]
            if all_positions or v.dim() == 1:
                v = v if v.dim() == 1 else v.mean(0)
                slot[1] = v if slot[1] is None else slot[1] + v
            elif slot[0] is None:
                slot[0] = v
            else:
                P = max(slot[0].shape[0], v.shape[0])
                total = torch.zeros(P, v.shape[1])
                total[: slot[0].shape[0]] += slot[0]
                total[: v.shape[0]] += v
                slot[0] = total
    window = _Window()
    removers = [lm.model.register_forward_pre_hook(_window_pre_hook(window), with_kwargs=True).remove]
    for layer, (front, everywhere) in per_layer.items():
        front = None if front is None else front.to(lm.device)
        everywhere = None if everywhere is None else everywhere.to(lm.device)
        add_to = _adder(window, front, everywhere)
        if layer < n:  # the stream entering block `layer`
            removers.append(edit_input(blocks[layer], add_to))
        else:  # layer n: the stream after the last block, before the final norm
            removers.append(blocks[n - 1].register_forward_hook(_post_hook(add_to)).remove)

    def remove() -> None:
        for r in removers:
            r()

    return remove


APPLIERS["actadd"] = apply_actadd


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
