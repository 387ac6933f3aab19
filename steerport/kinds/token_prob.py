"""Kind ``token-prob``: move chosen tokens' output-embedding rows (Cho et al., COLING 2025).

Tensors ``token_ids`` (k, int64) and ``delta`` (k x d): the change of those tokens' rows at
value 1. Applied as a forward hook on the LM head that touches only those logits::

    z[..., w] += s · ε₀ · (delta_w · h)         h: (..., d) the head's input

Folded: E'[w] = E[w] + s ε₀ delta_w (before LM-Steer steers act on the rows, as the hooks
compose: the LM-Steer pre-hook changes h, which this hook then sees). Carried by
:func:`steerport.tokenprob.transfer_with_options` (same token surfaces, direction and step
recomputed on the target's detect text).

Example::

    steer = Steer("token-prob", {"token_ids": torch.tensor([42]), "delta": delta[None]}, 1.0)
    with steered(lm, [(steer, 1.0)]): ...        # only logit 42 moves, by delta · h
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steerport.errors import SteerportError
from steerport.kinds import Remover, SteerKind, rows_of


def _validate(steer) -> None:
    ids, delta = steer.tensors["token_ids"], steer.tensors["delta"]
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise SteerportError("token_ids must be a 1-D int64 tensor")
    if (ids < 0).any():
        raise SteerportError("token_ids must be non-negative")
    if delta.dim() != 2 or delta.shape[0] != ids.shape[0]:
        raise SteerportError(f"delta must be k x d with k = len(token_ids) = {ids.shape[0]}, got {tuple(delta.shape)}")


def _rows(steers: Sequence, values: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All steered token ids (K,), their deltas (K, d) and scales (K,) or (b, K)."""
    ids = torch.cat([s.tensors["token_ids"] for s in steers])
    if int(ids.max()) >= V:
        raise SteerportError(f"token-prob steer names token id {int(ids.max())} but the vocabulary has {V} tokens")
    delta = torch.cat([s.tensors["delta"].float() for s in steers])
    owner = torch.cat([torch.full((len(s.tensors["token_ids"]),), j, dtype=torch.long) for j, s in enumerate(steers)])
    eps = torch.tensor([s.epsilon for s in steers], dtype=torch.float32)
    return ids, delta, (values.float() * eps)[..., owner]


def apply(lm, steers: Sequence, values: torch.Tensor, include_domain: bool = False) -> Remover:
    """One forward hook on the LM head: z[..., w] += s · ε₀ · (delta_w · h) for the steered tokens only."""
    ids, delta, scales = _rows(steers, values, lm.output_embeddings.shape[0])
    ids, delta, scales = ids.to(lm.device), delta.to(lm.device), scales.to(lm.device)  # moved once, not per step

    def hook(module, args, kwargs, output):
        h = args[0] if args else kwargs["input"]  # (..., d)
        shift = (h.float() @ delta.T) * rows_of(scales, h.float())  # (..., K)
        return output.index_add(-1, ids, shift.to(output.dtype))

    return lm.lm_head.register_forward_hook(hook, with_kwargs=True).remove


def fold(E: torch.Tensor, steers: Sequence, values: torch.Tensor, include_domain: bool = False) -> torch.Tensor:
    """E' with rows E[w] + s ε₀ delta_w; E (V, d) float32."""
    ids, delta, scales = _rows(steers, values, E.shape[0])
    return E.index_add(0, ids.to(E.device), (scales[:, None] * delta).to(E.device))


KIND = SteerKind(
    name="token-prob",
    required=frozenset({"token_ids", "delta"}),
    optional=frozenset(),
    validate=_validate,
    hidden_size=lambda s: int(s.tensors["delta"].shape[1]),
    rank=lambda s: int(s.tensors["token_ids"].shape[0]),
    apply=apply,
    acts_at_head=True,
    fold=fold,
    fold_order=0,
    transfer="steerport.tokenprob:transfer_with_options",
)
