"""A model's output embeddings read by rows from its checkpoint, its identity cached by file stats.

An embeddings-only transfer that reuses a mapping needs, of each model, only its fingerprint,
its hidden size and a few thousand rows of the output-embedding matrix. :func:`open_head` gives
exactly that without loading the tokenizer or the whole matrix:

* the fingerprint (:func:`steerport.models.fingerprint`, which needs the tokenizer's vocabulary),
  the matrix's shape and the safetensors file and key that hold it are found once by a full
  :func:`steerport.embeddings.locate_head` and cached in ``STEERPORT_HOME/fingerprints/<key>.json``
  (key: the model folder's path); the entry is used while the name, size and modification time of
  every file in that folder are unchanged, else recomputed;
* rows are gathered from a memory map of the safetensors file (:func:`read_rows`), so only the
  pages holding the requested rows are read.

Local models only (catalog names, model folders, converted ``.gguf`` files); a hub id gives None
and the caller loads the embeddings the ordinary way.

Example::

    head = open_head("gemma3-270m")
    X = head.rows(torch.tensor([0, 5, 17]))  # (3, 640) float32, equal to load_embeddings(...).embeddings[[0, 5, 17]]
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from steerport.embeddings import ModelEmbeddings, locate_head, read_tensor
from steerport.errors import SteerportError
from steerport.models import fingerprint_of_rows, fingerprint_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_VERSION = 1  # bump when steerport.models.fingerprint (or what is cached here) changes
_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}  # BF16 read as raw 16-bit words


class EmbeddingSource(Protocol):
    """What an embeddings-only transfer needs of a model: :class:`ModelEmbeddings` or :class:`HeadFile`."""

    spec: str
    fingerprint: str

    @property
    def hidden_size(self) -> int: ...

    def rows(self, ids: torch.Tensor) -> torch.Tensor: ...

    def full(self) -> ModelEmbeddings: ...


@dataclass
class HeadFile:
    """A model's output embedding left on disk: identity and shape known, rows read on demand."""

    spec: str
    fingerprint: str
    vocab_size: int
    hidden_size: int
    weight: tuple[Path, str]  # (safetensors file, tensor key)
    bias: tuple[Path, str] | None = None
    tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False)  # kept when a cache miss loaded it
    loaded: ModelEmbeddings | None = field(default=None, repr=False)  # set by full()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (k,) of the output embedding -> (k, d) float32."""
        if self.loaded is not None:
            return self.loaded.rows(ids)
        return read_rows(self.weight[0], self.weight[1], ids)

    def full(self) -> ModelEmbeddings:
        """The whole matrix and the tokenizer (for fitting a mapping or aligning vocabularies)."""
        if self.loaded is None:
            if self.tokenizer is None:
                from steerport.embeddings import load_embeddings

                self.loaded = load_embeddings(self.spec)
            else:
                self.loaded = ModelEmbeddings(spec=self.spec, embeddings=read_tensor(*self.weight), tokenizer=self.tokenizer,
                                              bias=read_tensor(*self.bias) if self.bias else None)
        return self.loaded


def _tensor_info(path: Path, key: str) -> tuple[dict[str, Any], int]:
    """The safetensors header entry of the 2-D float tensor ``key`` and the header's length."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise SteerportError(f"{path}: cannot read the safetensors header ({e})") from None
    info = header.get(key) if isinstance(header, dict) else None
    if not isinstance(info, dict) or info.get("dtype") not in _NUMPY_DTYPES or len(info.get("shape", ())) != 2:
        raise SteerportError(f"{path}: no 2-D float tensor {key!r} in this safetensors file")
    return info, n


def tensor_shape(path: str | Path, key: str) -> tuple[int, int]:
    """(rows, columns) of the 2-D tensor ``key`` in a safetensors file, from its header alone."""
    info, _ = _tensor_info(Path(path), key)
    return int(info["shape"][0]), int(info["shape"][1])


def read_rows(path: str | Path, key: str, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (k,) of the 2-D tensor ``key`` in a safetensors file -> (k, d) float32.

    Parses the header by hand and gathers the rows from a memory map: only their pages are read.
    Equal to ``safe_open(path).get_tensor(key).float()[ids]``.
    """
    import numpy as np

    path = Path(path)
    info, n = _tensor_info(path, key)
    V, d = info["shape"]
    begin = info["data_offsets"][0]
    idx = ids.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
        raise SteerportError(f"{path}: row ids out of range for {key!r} with {V} rows (a mapping for another model?)")
    mm = np.memmap(path, dtype=_NUMPY_DTYPES[info["dtype"]], mode="r", offset=8 + n + begin, shape=(V, d))
    out = torch.from_numpy(np.ascontiguousarray(mm[idx.numpy()]))
    del mm
    if info["dtype"] == "BF16":
        out = out.view(torch.bfloat16)
    return out.float()


def folder_stats(folder: Path) -> dict[str, list[int]]:
    """Name -> [size, mtime_ns] of every regular file directly in ``folder`` (hidden files left out)."""
    out: dict[str, list[int]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        st = p.stat()
        out[p.name] = [st.st_size, st.st_mtime_ns]
    return out


def cache_file(folder: Path) -> Path:
    """Where the identity of the model in ``folder`` is cached."""
    from steerport.catalog import steerport_home

    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return steerport_home() / "fingerprints" / f"{key}.json"


def _model_folder(spec: str) -> Path | None:
    from steerport.models import _local_or_hub, resolve_spec

    resolved = resolve_spec(spec)
    if resolved.kind == "hub":
        return None
    return Path(_local_or_hub(resolved)).resolve()


def _from_cache(spec: str, folder: Path, stats: dict[str, list[int]]) -> HeadFile | None:
    try:
        doc: Any = json.loads(cache_file(folder).read_text())
        if doc.get("version") != CACHE_VERSION or doc.get("files") != stats:
            return None
        return HeadFile(spec=spec, fingerprint=str(doc["fingerprint"]), vocab_size=int(doc["vocab_size"]),
                        hidden_size=int(doc["hidden_size"]), weight=(folder / doc["weight_file"], str(doc["weight_key"])))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no entry, or an unreadable one: recompute


def open_head(spec: str) -> HeadFile | None:
    """The output embedding of the local model ``spec`` as a :class:`HeadFile`; None for a hub id or a
    checkpoint without safetensors. A cache hit reads no tokenizer and no tensor data; a miss loads the
    tokenizer (kept in the result) and the 256 rows the fingerprint hashes, and writes the cache entry."""
    from steerport.fileio import atomic_write_json

    folder = _model_folder(spec)
    if folder is None:
        return None
    stats = folder_stats(folder)
    cached = _from_cache(spec, folder, stats)
    if cached is not None:
        return cached
    loc = locate_head(spec)
    if loc.weight is None:
        return None
    V, d = tensor_shape(*loc.weight)
    fp = fingerprint_of_rows((V, d), read_rows(*loc.weight, fingerprint_rows(V)), loc.tokenizer.get_vocab())
    head = HeadFile(spec=spec, fingerprint=fp, vocab_size=V, hidden_size=d, weight=loc.weight, bias=loc.bias,
                    tokenizer=loc.tokenizer)
    wfile = Path(loc.weight[0]).resolve()
    if wfile.parent == folder and folder_stats(folder) == stats:  # unchanged while we read it
        doc = {"version": CACHE_VERSION, "spec": spec, "files": stats, "fingerprint": fp,
               "vocab_size": V, "hidden_size": d, "weight_file": wfile.name, "weight_key": loc.weight[1]}
        try:
            atomic_write_json(cache_file(folder), doc)
        except OSError:
            pass  # a read-only cache only costs speed
    return head
