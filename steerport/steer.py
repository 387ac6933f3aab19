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
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from steerport.errors import SteerportError

FORMAT = "steerport.st"
VERSION = 1

# kind -> (required tensor names, optional tensor names)
KINDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "lm-steer": (frozenset({"A", "B"}), frozenset({"domain.A", "domain.B"})),
    "actadd": (frozenset({"vector"}), frozenset()),
    "token-prob": (frozenset({"token_ids", "delta"}), frozenset()),
}
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
        if self.kind == "lm-steer":
            return self.tensors["A"].shape[0]
        if self.kind == "actadd":
            return self.tensors["vector"].shape[-1]
        return self.tensors["delta"].shape[1]

    @property
    def rank(self) -> int:
        if self.kind == "lm-steer":
            return self.tensors["A"].shape[1]
        if self.kind == "token-prob":
            return self.tensors["token_ids"].shape[0]
        return 1

    @property
    def fingerprint(self) -> str:
        """Hash of the tensors and ε₀: identifies this steer in a transferred steer's lineage."""
        h = hashlib.sha256(f"{self.kind}|{self.epsilon!r}".encode())
        for name in sorted(self.tensors):
            t = self.tensors[name].contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
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
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        return write_json_safetensors(path, tensors, "steerport", self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Steer":
        """Read and validate a .st file; any problem is a one-line SteerportError."""
        path = Path(path)
        if not path.is_file():
            raise SteerportError(f"{path}: no such steer file")
        data = path.read_bytes()
        meta = _read_metadata(path, data)
        try:
            tensors = st_load(data)
        except Exception as e:  # safetensors raises several types for broken files
            raise SteerportError(f"{path}: damaged safetensors data ({_one_line(e)})") from None
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_json_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], key: str, doc: Any) -> Path:
    """Write ``tensors`` as safetensors with the JSON document ``doc`` under metadata ``key``,
    atomically (the counterpart of :func:`read_json_metadata`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, st_save(tensors, metadata={key: json.dumps(doc, ensure_ascii=False)}))
    return path


def read_json_metadata(path: Path, data: bytes, key: str, what: str) -> Any:
    """The JSON document stored under ``key`` in a safetensors file's metadata, parsed by hand
    from the header so that broken files get precise one-line messages (``what``: "a .st steer")."""
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:2] == b"PK":
        raise SteerportError(f"{path}: this is a pickle/zip file, not safetensors; steerport never unpickles files")
    if len(data) < 8:
        raise SteerportError(f"{path}: file is truncated ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise SteerportError(f"{path}: not a safetensors file, or truncated (header of {n} bytes in a {len(data)}-byte file)")
    try:
        header = json.loads(data[8 : 8 + n])
        doc = header.get("__metadata__", {}).get(key)
    except (ValueError, AttributeError):
        raise SteerportError(f"{path}: corrupted safetensors header") from None
    if doc is None:
        raise SteerportError(f"{path}: a safetensors file without {key} metadata; not {what}")
    try:
        return json.loads(doc)
    except ValueError:
        raise SteerportError(f"{path}: {key} metadata is not valid JSON") from None


def _read_metadata(path: Path, data: bytes) -> dict[str, Any]:
    """The validated steerport metadata of a .st file."""
    meta = read_json_metadata(path, data, "steerport", "a .st steer")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SteerportError(f"{path}: metadata format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or version < 1:
        raise SteerportError(f"{path}: bad format version {version!r}")
    if version > VERSION:
        raise SteerportError(f"{path}: written by a newer steerport (format version {version}; this one reads up to {VERSION})")
    for key in ("kind", "epsilon"):
        if key not in meta:
            raise SteerportError(f"{path}: metadata lacks the required field {key!r}")
    return meta


def _check(steer: Steer, source: str) -> None:
    """Validate kind, tensor names, shapes, dtypes and finiteness."""
    if steer.kind not in KINDS:
        raise SteerportError(f"unknown steer kind {steer.kind!r}; known: {', '.join(KINDS)}")
    eps = steer.epsilon
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise SteerportError(f"epsilon must be a finite number, got {eps!r}")
    required, optional = KINDS[steer.kind]
    names = set(steer.tensors)
    if missing := required - names:
        raise SteerportError(f"{steer.kind} steer lacks tensor(s) {', '.join(sorted(missing))}")
    if extra := names - required - optional:
        raise SteerportError(f"{steer.kind} steer has unexpected tensor(s) {', '.join(sorted(extra))}")
    for name, t in steer.tensors.items():
        if name == "token_ids":
            if t.dtype != torch.int64 or t.dim() != 1:
                raise SteerportError("token_ids must be a 1-D int64 tensor")
            if (t < 0).any():
                raise SteerportError("token_ids must be non-negative")
        else:
            if not t.is_floating_point():
                raise SteerportError(f"tensor {name} must be floating point, got {t.dtype}")
            if not torch.isfinite(t).all():
                raise SteerportError(f"tensor {name} contains NaN or infinite values")
    T = steer.tensors
    if steer.kind == "lm-steer":
        for prefix in ("", "domain."):
            a, b = T.get(prefix + "A"), T.get(prefix + "B")
            if (a is None) != (b is None):
                raise SteerportError(f"{prefix}A and {prefix}B must come together")
            if a is not None and (a.dim() != 2 or a.shape != b.shape):
                raise SteerportError(f"{prefix}A and {prefix}B must both be d x r, got {tuple(a.shape)} and {tuple(b.shape)}")
        if "domain.A" in T and T["domain.A"].shape[0] != T["A"].shape[0]:
            raise SteerportError("domain factors have a different hidden size than A and B")
    elif steer.kind == "actadd":
        if T["vector"].dim() not in (1, 2):
            raise SteerportError("actadd vector must be d or positions x d")
    else:
        ids, delta = T["token_ids"], T["delta"]
        if delta.dim() != 2 or delta.shape[0] != ids.shape[0]:
            raise SteerportError(f"delta must be k x d with k = len(token_ids) = {ids.shape[0]}, got {tuple(delta.shape)}")


def _check_declared(steer: Steer, core: dict[str, Any]) -> None:
    """The declared rank and hidden size must match the tensors."""
    for key, actual in (("rank", steer.rank), ("hidden_size", steer.hidden_size)):
        if key in core and core[key] != actual:
            raise SteerportError(f"metadata says {key} = {core[key]} but the tensors have {actual}")
