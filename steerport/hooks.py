"""Apply one or several steers to a loaded model, and generate text with them.

LM-Steer acts on the LM head's input (DESIGN.md section 3)::

    h ← h + Σ_i s_i · ε_i · B_i (A_iᵀ h)        h: (..., d), A_i, B_i: (d, r_i)

which equals rebuilding the output embeddings as E (I + Σ s_i ε_i W_i)ᵀ with W = A Bᵀ,
at O(d·r) per token instead of touching the V x d matrix.

Example::

    with steered(lm, [(detox, 5.0), (positive, 2.0)]):
        logits = lm.model(**batch).logits
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch

from steerport.errors import SteerportError
from steerport.models import LoadedModel
from steerport.steer import Steer

SteerValue = tuple[Steer, float]


def lm_steer_shift(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The LM-Steer term B (Aᵀ h) for a batch of hidden states.

    h: (..., d); A, B: (d, r) with any scale already folded into A. Returns (..., d).
    """
    return (h @ A) @ B.T


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the wanted input is in hand."""


def _main_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A module's main input: its first positional argument, else ``input`` (the LM head's
    Linear) or ``hidden_states`` (decoder layers) among its keywords."""
    if args:
        return args[0]
    for key in ("input", "hidden_states"):
        if key in kwargs:
            return kwargs[key]
    raise SteerportError(f"cannot find the input of a module called with keywords {sorted(kwargs)}")


def edit_input(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """From now on ``module`` sees fn(x) instead of its main input x; returns the remover.

    Example (the LM-Steer hook below)::

        remove = edit_input(lm.lm_head, lambda h: h + lm_steer_shift(h, A, B))
    """

    def pre_hook(mod, args, kwargs):
        x = fn(_main_input(args, kwargs))
        if args:
            return (x, *args[1:]), kwargs
        key = "input" if "input" in kwargs else "hidden_states"
        return args, {**kwargs, key: x}

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True).remove


@torch.no_grad()
def input_of(model: torch.nn.Module, module: torch.nn.Module, **forward_kwargs) -> torch.Tensor:
    """``module``'s main input from one forward pass of ``model`` that stops right there.

    Example: the final hidden states (b, T, d), without computing the LM head::

        h = input_of(lm.model, lm.lm_head, input_ids=ids, attention_mask=mask)
    """
    got: list[torch.Tensor] = []

    def pre_hook(mod, args, kwargs):
        got.append(_main_input(args, kwargs))
        raise _StopForward

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        model(**forward_kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not got:
        raise SteerportError(f"the forward pass of {type(model).__name__} never reached {type(module).__name__}")
    return got[0]


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


def _hook_lm_steer(lm: LoadedModel, items: Sequence[SteerValue], include_domain: bool) -> Callable[[], None]:
    """One pre-hook on the LM head carrying every LM-Steer steer, concatenated along rank."""
    As, Bs = [], []
    for steer, value in items:
        As.append(steer.A * (value * steer.epsilon))
        Bs.append(steer.B)
        if include_domain and "domain.A" in steer.tensors:
            As.append(steer.tensors["domain.A"] * steer.epsilon)
            Bs.append(steer.tensors["domain.B"])
    A = torch.cat(As, dim=1).to(lm.device, lm.dtype)  # (d, Σr), scales folded in
    B = torch.cat(Bs, dim=1).to(lm.device, lm.dtype)  # (d, Σr)

    return edit_input(lm.lm_head, lambda h: h + lm_steer_shift(h, A, B))


# kind -> function(lm, [(steer, value), ...]) -> remover. Other steer kinds register here.
APPLIERS: dict[str, Callable[..., Callable[[], None]]] = {}


@contextmanager
def steered(
    lm: LoadedModel,
    steers: Steer | SteerValue | Sequence[SteerValue],
    *,
    force: bool = False,
    include_domain: bool = False,
) -> Iterator[LoadedModel]:
    """Apply steers (each with its value s) for the duration of the ``with`` block.

    ``include_domain`` also applies an LM-Steer steer's always-on domain component at its
    base scale (off by default: the steer then measures only the ± direction).
    Hooks are removed on exit, also when the block raises.
    """
    if isinstance(steers, Steer):
        steers = [(steers, 1.0)]
    elif isinstance(steers, tuple) and len(steers) == 2 and isinstance(steers[0], Steer):
        steers = [steers]
    items = [(s, float(v)) for s, v in steers]
    for steer, _ in items:
        check_compatible(lm, steer, force=force)
    by_kind: dict[str, list[SteerValue]] = {}
    for steer, value in items:
        by_kind.setdefault(steer.kind, []).append((steer, value))
    with ExitStack() as stack:
        for kind, group in by_kind.items():
            if kind == "lm-steer":
                remove = _hook_lm_steer(lm, group, include_domain)
            elif kind in APPLIERS:
                remove = APPLIERS[kind](lm, group)
            else:
                raise SteerportError(f"steers of kind {kind!r} cannot be applied by this steerport version")
            stack.callback(remove)
        yield lm


# --------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    steers: Sequence[SteerValue] = (),
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
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
                ids = lm.model.generate(
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
