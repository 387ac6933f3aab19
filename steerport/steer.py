"""The Steer type and the ``.st`` file format.

A ``.st`` file is a plain safetensors file (never pickle). Its tensors depend on the kind:

==============  ==========================================================================
kind            tensors
==============  ==========================================================================
``lm-steer``    ``A``, ``B`` (d x r each, W = A Bᵀ); optional ``domain.A``, ``domain.B``
``actadd``      ``vector`` (d, or positions x d)
``token-prob``  ``token_ids`` (k, int64) and ``delta`` (k x d)
==============  ==========================================================================

``__metadata__["steerport"]`` holds a JSON document: ``format``, ``version``, ``kind``,
``epsilon`` (base scale ε₀), ``rank``, ``hidden_size``, ``positive``, ``model``
(``spec`` + ``fingerprint``) and any further fields (training, data, lineage, ...).

Example::

    steer = Steer.lm_steer(A, B, epsilon=1e-3, positive="positive sentiment",
                           model={"spec": "smollm2-135m", "fingerprint": lm.fingerprint})
    steer.save("pos.st")
    same = Steer.load("pos.st")
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerport.errors import SteerportError
from steerport.fileio import atomic_write_bytes as atomic_write_bytes  # noqa: F401  (re-exported)
from steerport.fileio import read_json_metadata as read_json_metadata  # noqa: F401  (re-exported)
from steerport.fileio import read_json_safetensors, require_fields, write_json_safetensors
from steerport.kinds import get_kind

FORMAT = "steerport.st"
VERSION = 1
# metadata fields the Steer object holds as attributes; everything else lives in ``meta``
_CORE = ("format", "version", "kind", "epsilon", "rank", "hidden_size", "positive", "model")


@dataclass
class Steer:
    """One steer: its tensors, base scale ε₀, what +1 means, and where it came from."""

    kind: str
    tensors: dict[str, torch.Tensor]
    epsilon: float = 1.0
    positive: str = ""
    model: dict[str, str] = field(default_factory=dict)  # {"spec": ..., "fingerprint": ...}
    meta: dict[str, Any] = field(default_factory=dict)  # training, data, lineage, layer, ...

    def __post_init__(self):
        _check(self, source="steer")

    # ---------------------------------------------------------------- constructors

    @classmethod
    def lm_steer(cls, A: torch.Tensor, B: torch.Tensor, *, epsilon: float, **kw) -> "Steer":
        """An LM-Steer steer with W = A Bᵀ; A, B: (d, r)."""
        return cls("lm-steer", {"A": A.detach().float().cpu(), "B": B.detach().float().cpu()}, epsilon, **kw)

    # ---------------------------------------------------------------- shape facts

    @property
    def A(self) -> torch.Tensor:
        return self.tensors["A"]

    @property
    def B(self) -> torch.Tensor:
        return self.tensors["B"]

    @property
    def hidden_size(self) -> int:
        return get_kind(self.kind).hidden_size(self)

    @property
    def rank(self) -> int:
        return get_kind(self.kind).rank(self)

    @property
    def fingerprint(self) -> str:
        """Hash of the tensors and ε₀: identifies this steer in a transferred steer's lineage."""
        h = hashlib.sha256(f"{self.kind}|{self.epsilon!r}".encode())
        for name in sorted(self.tensors):
            t = self.tensors[name].contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype (bf16 too)
        return h.hexdigest()[:16]

    def metadata(self) -> dict[str, Any]:
        """The JSON document stored in the file."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "epsilon": self.epsilon,
            "rank": self.rank,
            "hidden_size": self.hidden_size,
            "positive": self.positive,
            "model": dict(self.model),
            **self.meta,
        }

    # ---------------------------------------------------------------- files

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, then rename."""
        return write_json_safetensors(path, self.tensors, "steerport", self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Steer":
        """Read and validate a .st file; any problem is a one-line SteerportError."""
        path = Path(path)
        if not path.is_file():
            raise SteerportError(f"{path}: no such steer file")
        meta, tensors = read_json_safetensors(path, "steerport", "a .st steer")
        meta = _check_header(path, meta)
        core = {k: meta[k] for k in _CORE if k in meta}
        try:
            steer = cls(
                kind=core["kind"],
                tensors=tensors,
                epsilon=core["epsilon"],
                positive=core.get("positive", ""),
                model=core.get("model", {}),
                meta={k: v for k, v in meta.items() if k not in _CORE},
            )
            _check_declared(steer, core)
            return steer
        except SteerportError as e:
            raise SteerportError(f"{path}: {e}") from None


def _check_header(path: Path, meta: Any) -> dict[str, Any]:
    """The validated steerport metadata of a .st file."""
    meta = require_fields(path, meta, (), "steer")
    if meta.get("format") != FORMAT:
        raise SteerportError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or version < 1:
        raise SteerportError(f"{path}: bad format version {version!r}")
    if version > VERSION:
        raise SteerportError(f"{path}: written by a newer steerport (format version {version}; this one reads up to {VERSION})")
    require_fields(path, meta, ("kind", "epsilon"), "steer")
    if not isinstance(meta.get("model", {}), dict):
        raise SteerportError(f"{path}: metadata field 'model' must be a JSON object")
    return meta


def _check(steer: Steer, source: str) -> None:
    """Validate kind, tensor names, dtypes and finiteness, then the kind's own shape rules."""
    if not isinstance(steer.kind, str):
        raise SteerportError(f"steer kind must be a string, got {steer.kind!r}")
    kind = get_kind(steer.kind)
    eps = steer.epsilon
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise SteerportError(f"epsilon must be a finite number, got {eps!r}")
    names = set(steer.tensors)
    if missing := kind.required - names:
        raise SteerportError(f"{steer.kind} steer lacks tensor(s) {', '.join(sorted(missing))}")
    if extra := names - kind.required - kind.optional:
        raise SteerportError(f"{steer.kind} steer has unexpected tensor(s) {', '.join(sorted(extra))}")
    for name, t in steer.tensors.items():
        if not isinstance(t, torch.Tensor):
            raise SteerportError(f"tensor {name} is not a tensor")
        if name != "token_ids":
            if not t.is_floating_point():
                raise SteerportError(f"tensor {name} must be floating point, got {t.dtype}")
            if not torch.isfinite(t).all():
                raise SteerportError(f"tensor {name} contains NaN or infinite values")
    kind.validate(steer)


def _check_declared(steer: Steer, core: dict[str, Any]) -> None:
    """The declared rank and hidden size must match the tensors."""
    for key, actual in (("rank", steer.rank), ("hidden_size", steer.hidden_size)):
        if key in core and core[key] != actual:
            raise SteerportError(f"metadata says {key} = {core[key]} but the tensors have {actual}")
