"""Per-row steer values: every row of a batch gets its own value for every loaded steer.

The serving engine decodes many requests in one forward pass, each with its own steer values.
``values`` is a float tensor (b, k): row i applies steer j at value ``values[i, j]``.
The three kinds, per row i (c_ij = values[i, j] · ε₀_j)::

    lm-steer    h_i ← h_i + Σ_j c_ij B_j (A_jᵀ h_i)             head input h: (b, T, d)
    actadd      x_i[t] ← x_i[t] + Σ_j c_ij v_j[t − start_i]     residual stream at layer L_j
                (front positions) or + Σ_j c_ij v_j (all positions, multi-layer vectors)
    token-prob  z_i[..., w] ← z_i[..., w] + Σ_j c_ij (δ_jw · h_i)  logits of the steered tokens

A value of 0 adds exact zeros, so a row's result does not depend on which other steers are
loaded or what the other rows ask for. Positions for front ActAdd come from the 2-D attention
mask of each forward call (left padding: ``start_i`` is the row's first real token; the pass
covers absolute positions [mask_len − T, mask_len)), as in :mod:`steerport.actadd`.

Example::

    remove = apply_rows(lm, [pos, detox], torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    try:
        logits = lm.model(**batch).logits      # row 0 steered by pos·3, row 1 by detox·2
    finally:
        remove()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from steerport.errors import SteerportError
from steerport.hooks import check_compatible, edit_input
from steerport.models import LoadedModel
from steerport.steer import Steer


@dataclass
class _Window:
    """Absolute positions of the current forward pass, per row (set by a pre-hook on the model)."""

    offset: int = 0
    starts: torch.Tensor | None = None  # (b,) index of each row's first real token


def _window_hook(window: _Window):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        T = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        if mask is None or mask.dim() != 2:
            raise SteerportError("per-row ActAdd needs a 2-D attention mask in every forward call")
        window.offset = mask.shape[1] - T
        real = mask != 0
        window.starts = real.int().argmax(1)  # (b,); all-padding rows start at 0
        return None

    return hook


def _lm_steer_rows(lm: LoadedModel, cols: list[tuple[int, Steer]], values: torch.Tensor) -> Callable[[], None]:
    """One pre-hook on the LM head carrying every LM-Steer steer, concatenated along rank."""
    A = torch.cat([s.A for _, s in cols], 1).to(lm.device, lm.dtype)  # (d, R)
    B = torch.cat([s.B for _, s in cols], 1).to(lm.device, lm.dtype)  # (d, R)
    # per-row coefficient of every rank column: (b, R)
    coef = torch.cat([(values[:, j : j + 1] * s.epsilon).expand(-1, s.rank) for j, s in cols], 1)
    coef = coef.to(lm.device, lm.dtype)

    def shift(h: torch.Tensor) -> torch.Tensor:  # h: (b, T, d) or (b, d)
        c = coef[:, None, :] if h.dim() == 3 else coef
        return h + ((h @ A) * c) @ B.T

    return edit_input(lm.lm_head, shift)


def _token_prob_rows(lm: LoadedModel, cols: list[tuple[int, Steer]], values: torch.Tensor) -> Callable[[], None]:
    """One forward hook on the LM head: z[i, ..., w] += c_ij (δ_jw · h_i) for the steered tokens."""
    ids = torch.cat([s.tensors["token_ids"] for _, s in cols]).to(lm.device)  # (K,)
    delta = torch.cat([s.tensors["delta"].float() for _, s in cols]).to(lm.device)  # (K, d)
    coef = torch.cat([(values[:, j : j + 1] * s.epsilon).expand(-1, s.rank) for j, s in cols], 1)  # (b, K)
    coef = coef.to(lm.device, torch.float32)
    V = lm.output_embeddings.shape[0]
    if int(ids.max()) >= V:
        raise SteerportError(f"token-prob steer names token id {int(ids.max())} but the model has {V} tokens")

    def hook(module, args, kwargs, output):
        h = args[0] if args else kwargs["input"]  # (b, T, d): the (possibly LM-Steer-shifted) head input
        c = coef[:, None, :] if h.dim() == 3 else coef
        shift = ((h.float() @ delta.T) * c).to(output.dtype)  # (b, T, K)
        return output.index_add(-1, ids, shift)

    return lm.lm_head.register_forward_hook(hook, with_kwargs=True).remove


def _actadd_rows(lm: LoadedModel, cols: list[tuple[int, Steer]], values: torch.Tensor) -> Callable[[], None]:
    """Hooks adding each row's c_ij · v_j to the residual stream at each steer's layer(s)."""
    from steerport.actadd import actadd_layers, decoder_layers

    blocks = decoder_layers(lm.model)
    n = len(blocks)
    # layer -> [(column j, ε₀_j, vector, front?)]
    per_layer: dict[int, list[tuple[int, float, torch.Tensor, bool]]] = {}
    for j, steer in cols:
        layers, vectors = actadd_layers(steer, n)
        everywhere = steer.meta.get("positions", "front") == "all" or "layers" in steer.meta
        for layer, v in zip(layers, vectors):
            if everywhere or v.dim() == 1:
                v, front = (v if v.dim() == 1 else v.mean(0)), False  # (d,)
            else:
                front = True  # (P, d)
            per_layer.setdefault(layer, []).append((j, steer.epsilon, v.to(lm.device), front))
    vals = values.to(lm.device, torch.float32)
    window = _Window()

    def adder(entries):
        def add_to(x: torch.Tensor) -> torch.Tensor:  # x: (b, T, d)
            b, T, _ = x.shape
            add = torch.zeros_like(x, dtype=torch.float32)
            for j, eps, v, front in entries:
                c = vals[:, j] * eps  # (b,)
                if not front:
                    add += c[:, None, None] * v
                    continue
                rel = window.offset + torch.arange(T, device=x.device)[None, :] - window.starts.to(x.device)[:, None]
                hit = (rel >= 0) & (rel < v.shape[0])  # (b, T)
                if hit.any():
                    rows = hit.nonzero()[:, 0]
                    add[hit] += c[rows, None] * v[rel[hit]]
            return x + add.to(x.dtype)

        return add_to

    removers = [lm.model.register_forward_pre_hook(_window_hook(window), with_kwargs=True).remove]
    for layer, entries in per_layer.items():
        add_to = adder(entries)
        if layer < n:
            removers.append(edit_input(blocks[layer], add_to))
        else:  # layer n: the stream leaving the last block

            def post(module, args, output, add_to=add_to):
                return (add_to(output[0]), *output[1:]) if isinstance(output, tuple) else add_to(output)

            removers.append(blocks[n - 1].register_forward_hook(post).remove)

    def remove() -> None:
        for r in removers:
            r()

    return remove


_ROW_APPLIERS = {"lm-steer": _lm_steer_rows, "actadd": _actadd_rows, "token-prob": _token_prob_rows}


def check_rows(lm: LoadedModel, steers: Sequence[Steer], *, force: bool = False) -> None:
    """Refuse steers this module cannot apply per row, or made for another model (unless forced)."""
    for steer in steers:
        if steer.kind not in _ROW_APPLIERS:
            raise SteerportError(f"steers of kind {steer.kind!r} cannot be applied per row")
        check_compatible(lm, steer, force=force)


def apply_rows(lm: LoadedModel, steers: Sequence[Steer], values: torch.Tensor) -> Callable[[], None]:
    """Hook ``steers`` onto ``lm`` with per-row values (b, k); returns the remover.

    Every later forward call must have batch size b (and, with ActAdd steers, a 2-D
    attention mask). Steers whose column is all zero are not hooked at all.
    """
    if values.dim() != 2 or values.shape[1] != len(steers):
        raise SteerportError(f"values must be (batch, {len(steers)}), got {tuple(values.shape)}")
    values = values.float().cpu()
    by_kind: dict[str, list[tuple[int, Steer]]] = {}
    for j, steer in enumerate(steers):
        if bool((values[:, j] != 0).any()):
            by_kind.setdefault(steer.kind, []).append((j, steer))
    removers = []
    try:
        for kind in ("lm-steer", "token-prob", "actadd"):
            if kind in by_kind:
                removers.append(_ROW_APPLIERS[kind](lm, by_kind[kind], values))
    except BaseException:
        for r in removers:
            r()
        raise

    def remove() -> None:
        for r in removers:
            r()

    return remove
