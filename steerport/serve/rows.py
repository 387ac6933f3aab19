"""One generated sequence (a :class:`Row`: one choice of one request) and the per-row mechanics of
the batching engine: what a row reports, its stop strings, its next token, and steer values per
row in a forward pass.

Example::

    row = Row(prompt_ids=ids, max_tokens=16, values={"positive": 3.0}, emit=print)
    remove = apply_rows(lm, steers, torch.tensor([[3.0], [0.0]]))      # row 0 at +3, row 1 unsteered
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from steerport.errors import SteerportError
from steerport.hooks import check_compatible, steered
from steerport.kinds import get_kind
from steerport.models import LoadedModel
from steerport.steer import Steer


@dataclass
class Event:
    """What a row reports: new text, and at the end why it stopped."""

    text: str = ""
    tokens: int = 0  # completion tokens so far
    finish: str | None = None  # "stop" | "length" | "error" (last event only)
    error: str | None = None


@dataclass
class Row:
    """One sequence to generate (one choice of one request)."""

    prompt_ids: list[int]
    max_tokens: int
    values: dict[str, float] = field(default_factory=dict)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    deadline: float = math.inf  # time.monotonic() after which the row is ended
    # set by the caller: where events go
    emit: Callable[[Event], None] = lambda e: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # decoding state (engine only)
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    done: bool = False


def release_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Batches of changing shapes leave freed blocks in the allocator's arenas, which otherwise keeps
    the server's RSS at its high-water mark.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def check_steers(lm: LoadedModel, steers: Sequence[Steer], *, force: bool = False) -> None:
    """Refuse steers of an unknown kind, or made for another model (unless forced)."""
    for steer in steers:
        get_kind(steer.kind)
        check_compatible(lm, steer, force=force)


def apply_rows(lm: LoadedModel, steers: Sequence[Steer], values: torch.Tensor) -> Callable[[], None]:
    """Hook ``steers`` with per-row values (b, k) until the returned remover is called.

    Steers whose column is all zero are left out (a zero adds exact zeros anyway), so a batch
    of unsteered rows runs the plain model.
    """
    if values.dim() != 2 or values.shape[1] != len(steers):
        raise SteerportError(f"per-row values must be (batch, {len(steers)}), got {tuple(values.shape)}")
    cols = [j for j in range(values.shape[1]) if bool((values[:, j] != 0).any())]
    if not cols:
        return lambda: None
    # the steers were checked against the model once, at start, with the user's --force (check_steers)
    ctx = steered(lm, [(steers[j], 0.0) for j in cols], rows=values[:, cols], force=True)
    ctx.__enter__()

    def remove() -> None:
        ctx.__exit__(None, None, None)

    return remove


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """One token from a row of logits (V,): argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        p, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(p, 0) - p) < top_p  # the smallest prefix reaching top_p (at least one)
        p = p * keep
        return int(order[torch.multinomial(p / p.sum(), 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))
