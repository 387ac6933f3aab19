"""Apply one or several steers to a loaded model, and generate text with them.

:func:`steered` hooks every steer onto the model for the duration of a ``with`` block; each
kind (``steerport.kinds``) says where and how it acts. Several steers compose by adding their
terms; each gets its value s (ε = s·ε₀), or — with ``rows`` — one value per batch row, so a
batch can carry different steer settings in one forward pass (the server does this).

Example::

    with steered(lm, [(detox, 5.0), (positive, 2.0)]):
        logits = lm.model(**batch).logits
    with steered(lm, [(positive, 0.0)], rows=torch.tensor([[3.0], [-3.0]])):   # row 0 at +3, row 1 at -3
        logits = lm.model(**two_row_batch).logits
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, cast

import torch

from steerport.capture import edit_input, input_of  # noqa: F401  (re-exported: the hook mechanics)
from steerport.errors import SteerportError
from steerport.kinds import get_kind
from steerport.kinds.lm_steer import lm_steer_shift  # noqa: F401  (re-exported)
from steerport.models import LoadedModel
from steerport.steer import Steer

if TYPE_CHECKING:
    from transformers import GenerationMixin

SteerValue = tuple[Steer, float]


def check_compatible(lm: LoadedModel, steer: Steer, *, force: bool = False) -> None:
    """Refuse a steer made for another hidden size always, for another model unless forced."""
    if steer.hidden_size != lm.hidden_size:
        raise SteerportError(
            f"steer has hidden size {steer.hidden_size} but model {lm.spec!r} has {lm.hidden_size}; "
            "transfer it first (steerport transfer)"
        )
    want = steer.model.get("fingerprint")
    if want and want != lm.fingerprint and not force:
        raise SteerportError(
            f"steer was made for {steer.model.get('spec')!r} (fingerprint {want}) but this model "
            f"{lm.spec!r} has fingerprint {lm.fingerprint}; transfer it, or pass --force"
        )


def as_items(steers: Steer | SteerValue | Sequence[SteerValue]) -> list[SteerValue]:
    """A steer, a (steer, value) pair or a list of pairs, as a list of pairs with float values.

    A value that is not a finite number is a one-line error (NaN would silently ruin every logit).
    """
    if isinstance(steers, Steer):
        steers = [(steers, 1.0)]
    elif isinstance(steers, tuple) and len(steers) == 2 and isinstance(steers[0], Steer):
        steers = [steers]  # type: ignore[list-item]
    items = []
    for steer, value in steers:  # type: ignore[misc]
        v = float(value)
        if not math.isfinite(v):
            raise SteerportError(f"steer value must be a finite number, got {value!r}")
        items.append((steer, v))
    return items


@contextmanager
def steered(
    lm: LoadedModel,
    steers: Steer | SteerValue | Sequence[SteerValue],
    *,
    force: bool = False,
    include_domain: bool = False,
    rows: torch.Tensor | None = None,
) -> Iterator[LoadedModel]:
    """Apply steers (each with its value s) for the duration of the ``with`` block.

    ``rows`` (b, k): value of steer j for batch row i (the values in the pairs are then unused);
    every forward pass inside the block must then have batch size b. ``include_domain`` also
    applies an LM-Steer steer's always-on domain component at its base scale (off by default:
    the steer then measures only the ± direction). Hooks are removed on exit, also on errors.
    """
    items = as_items(steers)
    for steer, _ in items:
        check_compatible(lm, steer, force=force)
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.float32)
        if rows.dim() != 2 or rows.shape[1] != len(items):
            raise SteerportError(f"per-row values must be (batch, {len(items)}), got {tuple(rows.shape)}")
        if not torch.isfinite(rows).all():
            raise SteerportError("per-row steer values must be finite numbers")
    by_kind: dict[str, list[int]] = {}
    for j, (steer, _) in enumerate(items):
        by_kind.setdefault(steer.kind, []).append(j)
    with ExitStack() as stack:
        for kind, js in by_kind.items():
            group = [items[j][0] for j in js]
            values = torch.tensor([items[j][1] for j in js]) if rows is None else rows[:, js]
            stack.callback(get_kind(kind).apply(lm, group, values, include_domain=include_domain))
        yield lm


# --------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(lm: LoadedModel, prompts: Sequence[str], steers: Sequence[SteerValue] = (), *,
             max_new_tokens: int = 40, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             batch_size: int = 8, force: bool = False, progress: Callable[[int], None] | None = None) -> list[str]:
    """Continue each prompt, with the steers applied; returns only the new text.

    ``temperature`` 0 is greedy decoding; otherwise sampling with ``top_p``, seeded so the
    same call gives the same text.
    """
    tok = lm.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    try:
        with steered(lm, list(steers), force=force):
            for i in range(0, len(prompts), batch_size):
                chunk = list(prompts[i : i + batch_size])
                batch = tok(chunk, return_tensors="pt", padding=True).to(lm.device)
                torch.manual_seed(seed + i)
                sample = temperature > 0
                # a LoadedModel is an AutoModelForCausalLM, which generates; PreTrainedModel alone does not declare it
                ids = cast("GenerationMixin", lm.model).generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_p=top_p if sample else None,
                    top_k=None,
                    pad_token_id=tok.pad_token_id,
                )
                new = ids[:, batch["input_ids"].shape[1] :]
                out.extend(tok.batch_decode(new, skip_special_tokens=True))
                if progress:
                    progress(len(chunk))
    finally:
        tok.padding_side = old_side
    return out
