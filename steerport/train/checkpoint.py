"""A training run's work folder: what makes it resumable, and how a run is told to stop.

The folder holds ``run.json`` (the keys of the cache and of the fit it belongs to),
``hidden.bin`` / ``hidden.json`` (the body pass, written by :func:`steerport.capture.cache_hidden`),
``cache.done``, ``checkpoint.safetensors`` (factors, best factors, Adam state, loop state) and
``topk{K}.*.npy`` / ``topk{K}.json`` (the top-k statistics, :mod:`steerport.train.topk`). A file belongs to a run only while its
key matches: changed data or settings drop exactly the stale files.

Example::

    resumed = prepare_workdir(wd, cache_key, fit_key)
    if (wd / CHECKPOINT).exists():
        best, state = load_checkpoint(wd / CHECKPOINT, fitter)
    ...
    save_checkpoint(wd / CHECKPOINT, fitter, best, state)
    remove_workdir(wd)                         # after success: only our files go
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from steerport.distributed import WORLD_FILE, remove_shards
from steerport.errors import SteerportError, one_line
from steerport.fileio import atomic_write_json, read_json_safetensors, write_json_safetensors
from steerport.train.fitter import Fitter
from steerport.train.topk import stats_files

FORMAT = 3  # of the work files; part of every key, so files of another format are never read
MANIFEST = "run.json"
CACHE_FILES = ("hidden.bin", "hidden.json", "cache.done")
CHECKPOINT = "checkpoint.safetensors"
WORK_FILES = (MANIFEST, *CACHE_FILES, CHECKPOINT)


def run_key(obj: Any) -> str:
    """A short stable hash of a JSON-able description (what a cache or a fit depends on)."""
    doc = {"work_format": FORMAT, "of": obj}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_workdir(wd: Path | None, cache_key: str, fit_key: str) -> bool:
    """Make the work folder; keep a matching cache/checkpoint, drop stale ones. True if resuming."""
    if wd is None:
        return False
    wd.mkdir(parents=True, exist_ok=True)
    manifest = wd / MANIFEST
    old = _read_manifest(manifest) if manifest.exists() else {}
    resumed = False
    if old.get("cache_key") != cache_key:
        for name in (*CACHE_FILES, CHECKPOINT):
            (wd / name).unlink(missing_ok=True)
        for stale in stats_files(wd):
            stale.unlink()
    else:
        resumed = (wd / "hidden.json").exists()
        if old.get("fit_key") != fit_key:
            (wd / CHECKPOINT).unlink(missing_ok=True)
        else:
            resumed = resumed or (wd / CHECKPOINT).exists()
    atomic_write_json(manifest, {"cache_key": cache_key, "fit_key": fit_key, "written_by": "steerport train"})
    return resumed


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SteerportError(f"{path}: unreadable work-folder manifest ({one_line(e)}); delete the work folder") from None
    if not isinstance(doc, dict):
        raise SteerportError(f"{path}: the work-folder manifest is not a JSON object; delete the work folder")
    return doc


def remove_workdir(wd: str | Path) -> None:
    """Delete a run's work files (only ours), and the folder itself if that leaves it empty."""
    wd = Path(wd)
    if not (wd / MANIFEST).exists():
        return
    for name in WORK_FILES:
        (wd / name).unlink(missing_ok=True)
    for stale in stats_files(wd):
        stale.unlink()
    (wd / WORLD_FILE).unlink(missing_ok=True)  # a data-parallel run's files (steerport.distributed)
    remove_shards(wd)
    try:
        wd.rmdir()
    except OSError:
        pass  # not empty: the user keeps other files there, which are not ours to delete


def save_checkpoint(path: Path, fitter: Fitter, best: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write the current and best factors, Adam's state and the loop ``state``, atomically."""
    opt_t, groups = fitter.optimizer_tensors()
    tensors = {**{f"param.{k}": v for k, v in fitter.tensors().items()},
               **{f"best.{k}": v for k, v in best.items()}, **opt_t}
    write_json_safetensors(path, tensors, "checkpoint", {"state": state, "optimizer": groups})


def load_checkpoint(path: Path, fitter: Fitter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore ``fitter`` (factors and Adam) from ``path``; returns (best factors, loop state)."""
    doc, tensors = read_json_safetensors(path, "checkpoint", "a steerport training checkpoint")
    fitter.load_tensors({k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")})
    fitter.load_optimizer(tensors, doc["optimizer"])
    best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
    return best, doc["state"]


class StopFlag:
    """SIGINT/SIGTERM set :attr:`stop`; the loops finish their current step, checkpoint and stop.

    A second signal raises KeyboardInterrupt at once. Outside the main thread (where signal
    handlers cannot be installed) it is a flag nobody sets.

    Example::

        with StopFlag() as flag:
            while not flag.stop:
                ...
    """

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
