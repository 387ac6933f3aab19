"""Files that are never half-written, and the safetensors + JSON container all steerport files use.

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: a reader
  sees the old file or the new one, never half of it (temporary file in the same folder,
  fsync, rename).
* :func:`atomic_directory`: build a folder under a temporary name, rename it into place when
  the block succeeds (merged checkpoints, converted models).
* :func:`write_json_safetensors` / :func:`read_json_metadata` / :func:`read_json_safetensors`:
  tensors plus one JSON document under a metadata key (``.st`` steers, mapping files);
  pickle and zip files are refused, never opened.
* :func:`sha256_file`: a file's digest, streamed.

Example::

    write_json_safetensors("pos.st", {"A": A, "B": B}, "steerport", {"kind": "lm-steer", ...})
    doc, tensors = read_json_safetensors("pos.st", "steerport", "a .st steer")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steerport.errors import SteerportError, one_line


def _ordinary_permissions(path: str) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the result the permissions of a normal new file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, doc: Any, *, indent: int | None = 1) -> Path:
    """:func:`atomic_write_bytes` for a JSON document (non-ASCII kept, floats as JSON numbers)."""
    return atomic_write_text(path, json.dumps(doc, indent=indent, ensure_ascii=False, default=float) + "\n")


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``dest``; on success it is renamed to ``dest``.

    On an exception the temporary folder is removed and ``dest`` is untouched. With
    ``replace`` an existing ``dest`` is swapped out (the old one is deleted after the rename).

    Example::

        with atomic_directory("merged/") as tmp:
            model.save_pretrained(tmp)
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not replace:
        raise SteerportError(f"{dest}: already exists")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        yield tmp
        _ordinary_permissions(str(tmp))
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------- safetensors + JSON


def write_json_safetensors(path: str | os.PathLike, tensors: dict[str, Any], key: str, doc: Any) -> Path:
    """Write ``tensors`` as safetensors with the JSON document ``doc`` under metadata ``key``,
    atomically (the counterpart of :func:`read_json_safetensors`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(tensors, metadata={key: json.dumps(doc, ensure_ascii=False)}))


PICKLE_OR_ZIP = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK")


def read_json_metadata(path: Path, data: bytes, key: str, what: str) -> Any:
    """The JSON document stored under ``key`` in a safetensors file's metadata, parsed by hand
    from the header so that broken files get precise one-line messages (``what``: "a .st steer")."""
    # a safetensors header length can start with a pickle/zip magic (640 bytes = 80 02, 1408 = 80 05): the JSON
    # header's opening brace tells the two apart
    looks_safetensors = len(data) > 8 and 8 + int.from_bytes(data[:8], "little") <= len(data) and data[8:9] == b"{"
    if data[:2] in PICKLE_OR_ZIP and not looks_safetensors:
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


def read_json_safetensors(path: str | os.PathLike, key: str, what: str) -> tuple[Any, dict[str, Any]]:
    """(JSON document under ``key``, tensors) of a safetensors file; every problem is one line."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise SteerportError(f"{path}: no such file ({what})")
    data = path.read_bytes()
    doc = read_json_metadata(path, data, key, what)
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises several types for broken files
        raise SteerportError(f"{path}: damaged safetensors data ({one_line(e)})") from None
    return doc, tensors


def require_fields(path: str | os.PathLike, doc: Any, fields: tuple[str, ...], what: str) -> dict[str, Any]:
    """``doc`` as a dict that has every one of ``fields``; else a one-line error naming the first missing."""
    if not isinstance(doc, dict):
        raise SteerportError(f"{path}: {what} metadata is not a JSON object")
    for name in fields:
        if name not in doc:
            raise SteerportError(f"{path}: {what} metadata lacks the required field {name!r}")
    return doc
