"""Kind ``lm-steer``: a low-rank map W = A Bᵀ of the output embeddings (LM-Steer, Han et al. 2024).

Tensors ``A``, ``B`` (d x r); optional always-on domain component ``domain.A``, ``domain.B``.
Applied at the LM head's input (the final hidden state h, after the final norm)::

    h ← h + Σ_i s_i ε_i B_i (A_iᵀ h)        h: (..., d), A_i, B_i: (d, r_i)

which equals rebuilding the output embeddings as E (I + Σ s_i ε_i W_i)ᵀ, at O(d·r) per token.
With per-row values s (b, k) each batch row gets its own s_i. Folded into a checkpoint:
E' = E + Σ s_i ε_i (E B_i) A_iᵀ. Carried by :func:`steerport.transfer.carry_lm_steer`;
exported as a PEFT / GGUF LoRA on the LM head by :mod:`steerport.lora`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steerport.capture import edit_input
from steerport.errors import SteerportError
from steerport.kinds import Remover, SteerKind, rows_of


def lm_steer_shift(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The LM-Steer term B (Aᵀ h): h (..., d); A, B (d, r) with any scale folded into A. Returns (..., d)."""
    return (h @ A) @ B.T


def _validate(steer) -> None:
    T = steer.tensors
    for prefix in ("", "domain."):
        a, b = T.get(prefix + "A"), T.get(prefix + "B")
        if (a is None) != (b is None):
            raise SteerportError(f"{prefix}A and {prefix}B must come together")
        if a is not None and (a.dim() != 2 or a.shape != b.shape):
            raise SteerportError(f"{prefix}A and {prefix}B must both be d x r, got {tuple(a.shape)} and {tuple(b.shape)}")
    if "domain.A" in T and T["domain.A"].shape[0] != T["A"].shape[0]:
        raise SteerportError("domain factors have a different hidden size than A and B")


def factors(steers: Sequence, values: torch.Tensor, include_domain: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate steers along rank: A (d, R), B (d, R) and the scale of each rank column.

    values (k,) or (b, k) -> scales (R,) or (b, R): s_i ε_i repeated over steer i's r_i columns; a
    domain component (``include_domain``) adds columns at scale ε_i in every row.
    """
    As, Bs, cols, domain = [], [], [], []
    for j, steer in enumerate(steers):
        As.append(steer.A.float())
        Bs.append(steer.B.float())
        cols += [j] * steer.A.shape[1]
        if include_domain and "domain.A" in steer.tensors:
            domain.append((steer.tensors["domain.A"].float(), steer.tensors["domain.B"].float(), steer.epsilon))
    eps = torch.tensor([s.epsilon for s in steers], dtype=torch.float32)
    idx = torch.tensor(cols, dtype=torch.long)
    scales = (values.float() * eps)[..., idx]  # (R,) or (b, R)
    for A, B, e in domain:
        As.append(A)
        Bs.append(B)
        extra = torch.full((*scales.shape[:-1], A.shape[1]), e, dtype=torch.float32)
        scales = torch.cat([scales, extra], dim=-1)
    return torch.cat(As, dim=1), torch.cat(Bs, dim=1), scales


def apply(lm, steers: Sequence, values: torch.Tensor, include_domain: bool = False) -> Remover:
    """One pre-hook on the LM head carrying every LM-Steer steer (concatenated along rank).

    Everything is prepared here, once, on the model's device and in its dtype (scales folded into A
    in float32 before the cast), so each forward pass pays two thin matmuls and one in-place add:
    h (b, T, d) @ A (d, R) @ Bᵀ (R, d), and no tensor creation, cast or transpose.
    """
    A, B, scales = factors(steers, values, include_domain)
    Bt = B.T.contiguous().to(lm.device, lm.dtype)  # (R, d)
    # a split model (device map): the head's input may come from another device; move it where the head computes
    split = lm.is_split
    if scales.dim() == 1:  # one value per steer: fold the scales into A once
        A = (A * scales).to(lm.device, lm.dtype)

        def shift(h: torch.Tensor) -> torch.Tensor:  # h + B (Aᵀ h); a + b == b + a exactly
            if split:
                h = h.to(A.device)
            return ((h @ A) @ Bt).add_(h)

        return edit_input(lm.lm_head, shift)
    A = A.to(lm.device, lm.dtype)
    rows = scales.to(lm.device, lm.dtype)  # (b, R)

    def add(h: torch.Tensor) -> torch.Tensor:  # h (b, T, d); rows (b, R) -> (b, 1, R)
        if split:
            h = h.to(A.device)
        return (((h @ A) * rows_of(rows, h)) @ Bt).add_(h)

    return edit_input(lm.lm_head, add)


def fold(E: torch.Tensor, steers: Sequence, values: torch.Tensor, include_domain: bool = False) -> torch.Tensor:
    """E' = E + Σ s_i ε_i (E B_i) A_iᵀ: E (V, d) float32, the same logits as :func:`apply`."""
    A, B, scales = factors(steers, values, include_domain)
    A, B, scales = A.to(E.device), B.to(E.device), scales.to(E.device)
    return E + ((E @ B) * scales) @ A.T  # (V, R) @ (R, d)


KIND = SteerKind(
    name="lm-steer",
    required=frozenset({"A", "B"}),
    optional=frozenset({"domain.A", "domain.B"}),
    validate=_validate,
    hidden_size=lambda s: int(s.tensors["A"].shape[0]),
    rank=lambda s: int(s.tensors["A"].shape[1]),
    apply=apply,
    acts_at_head=True,
    fold=fold,
    fold_order=1,  # acts on the rows token-prob steers have already moved, as the hooks compose
    transfer="steerport.transfer:carry_lm_steer",
    exports={"peft": "steerport.lora:export_peft", "gguf-lora": "steerport.lora:export_gguf"},
)
