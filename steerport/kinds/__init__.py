"""The registry of steer kinds: what each kind stores, how it is checked, applied, folded,
carried to another model and exported — declared once, in the kind's own module.

Every module in this package that defines a module-level ``KIND`` (a :class:`SteerKind`) is a
kind; adding a kind means adding one file here. ``steerport.hooks.steered``, ``merge``,
``transfer``, the ``.st`` reader and the CLI all dispatch through :func:`get_kind`.

Operations that need the heavier parts of steerport (transfer, export) are named as
``"module:function"`` strings and imported when first used, so this package stays at the
bottom of the import graph (it imports only torch and :mod:`steerport.capture`).

Example::

    kind = get_kind("lm-steer")
    remove = kind.apply(lm, [steer], torch.tensor([3.0]))     # hook on; remove() takes it off
    sorted(kind_names())                                     # ['actadd', 'lm-steer', 'token-prob']
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from steerport.errors import SteerportError

if TYPE_CHECKING:
    from steerport.models import LoadedModel
    from steerport.steer import Steer

Remover = Callable[[], None]


class Applier(Protocol):
    """apply(lm, steers, values) -> remover; values (k,) one per steer, or (b, k) one per batch row and steer."""

    def __call__(self, lm: LoadedModel, steers: Sequence[Steer], values: torch.Tensor,
                 include_domain: bool = False) -> Remover: ...


class Folder(Protocol):
    """fold(E, steers, values) -> E' for output embeddings E (V, d); values (k,)."""

    def __call__(self, E: torch.Tensor, steers: Sequence[Steer], values: torch.Tensor,
                 include_domain: bool = False) -> torch.Tensor: ...


@dataclass(frozen=True)
class SteerKind:
    """One kind of steer.

    ``required`` / ``optional``: tensor names in a ``.st`` file. ``validate(steer)`` checks
    shapes and metadata beyond the generic checks (floating, finite) and raises SteerportError.
    ``acts_at_head``: the steer leaves the model body untouched, so its effect can be measured on
    cached final hidden states by recomputing only the head (``steerport.scoring.HeadScorer``).
    ``hidden_size`` / ``rank`` read them off the tensors. ``apply`` hooks the model; ``fold``
    (None: cannot be folded, ``fold_refusal(steer)`` says why) rewrites the output embeddings,
    in ``fold_order`` across kinds (lower first, as the hooks compose). ``transfer`` and
    ``exports`` name functions ``"module:function"``.
    """

    name: str
    required: frozenset[str]
    optional: frozenset[str]
    validate: Callable[["Steer"], None]
    hidden_size: Callable[["Steer"], int]
    rank: Callable[["Steer"], int]
    apply: Applier
    acts_at_head: bool = False  # True when the steer only changes the LM head's input/output (body untouched)
    fold: Folder | None = None
    fold_order: int = 0
    fold_refusal: Callable[["Steer"], str] | None = None
    transfer: str | None = None
    exports: dict[str, str] = field(default_factory=dict)

    def call(self, target: str, *args: Any, **kwargs: Any) -> Any:
        """Import ``"module:function"`` and call it."""
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    def transfer_steer(self, *args: Any, **kwargs: Any) -> Any:
        if self.transfer is None:
            raise SteerportError(f"steers of kind {self.name!r} cannot be transferred by this steerport version")
        return self.call(self.transfer, *args, **kwargs)

    def export(self, fmt: str, *args: Any, **kwargs: Any) -> Any:
        if fmt not in self.exports:
            have = ", ".join(self.exports) or "none"
            raise SteerportError(f"steers of kind {self.name!r} cannot be exported as {fmt!r} (formats: {have})")
        return self.call(self.exports[fmt], *args, **kwargs)


_KINDS: dict[str, SteerKind] | None = None


def _discover() -> dict[str, SteerKind]:
    global _KINDS
    if _KINDS is None:
        found: dict[str, SteerKind] = {}
        for info in pkgutil.iter_modules(__path__):
            module = importlib.import_module(f"{__name__}.{info.name}")
            kind = getattr(module, "KIND", None)
            if isinstance(kind, SteerKind):
                found[kind.name] = kind
        _KINDS = found
    return _KINDS


def kind_names() -> list[str]:
    """The names of all known kinds."""
    return list(_discover())


def get_kind(name: str) -> SteerKind:
    """The kind called ``name``; an unknown name is a one-line error listing the known ones."""
    kinds = _discover()
    if name not in kinds:
        raise SteerportError(f"unknown steer kind {name!r}; known: {', '.join(sorted(kinds))}")
    return kinds[name]


def rows_of(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row values shaped to broadcast against a hidden-state tensor ``like`` (b, ..., d).

    ``values``: (k,) -> (k,) unchanged; (b, k) -> (b, 1, ..., 1, k) with as many middle axes as ``like``
    has between its batch and feature axes. A batch size that does not match is an error.
    """
    if values.dim() == 1:
        return values.to(like.device, like.dtype)
    if like.dim() < 2 or like.shape[0] != values.shape[0]:
        raise SteerportError(f"per-row steer values for {values.shape[0]} rows, but the batch has "
                             f"{like.shape[0] if like.dim() else 0}")
    return values.to(like.device, like.dtype).reshape(values.shape[0], *([1] * (like.dim() - 2)), values.shape[1])
