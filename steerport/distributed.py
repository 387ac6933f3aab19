"""Data-parallel training: several processes share the body pass of one ``steerport train`` run.

Launched by ``accelerate launch`` or ``torchrun``, every process runs the same command; the
launcher tells each one its place through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), read by :func:`current_world`.

* The body pass is dealt out by batch: the run plans its forward-pass batches exactly as one
  process would (:func:`steerport.capture.batch_plan`) and rank ``r`` of ``n`` runs batches
  ``r, r+n, r+2n, …``. Every text is computed in the very batch it would have been in alone,
  so its states are bit-for-bit those of a one-process run.
* Each rank caches its share in its own folder ``shard-R-of-N`` inside the work folder (which
  all ranks must share: one disk, or a network file system across nodes), resumable batch by
  batch like any cache; a rank that dies loses at most its current batch.
* After a barrier, rank 0 gathers the shards into the ordinary cache of the work folder (text
  order, as one process writes it), runs the whole fit (the fit is small) and sends the
  result to the others, so :func:`steerport.train.train` returns the same steer on every rank.

The processes talk over torch.distributed with the gloo backend (barriers and one small
message; the hidden states travel through the shared folder), whatever the device.

Example (what :func:`steerport.train.train` does)::

    world = current_world()                       # World(rank=0, size=1) without a launcher
    join(world)
    cache = cache_hidden_sharded(world, lm, token_lists, workdir=wd, key=cache_key, dtype=torch.bfloat16)
    if cache is None:                             # ranks 1..n-1: rank 0 fits
        return share(world, None)
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from steerport.capture import IN_MEMORY_BYTES, Batch, HiddenCache, batch_plan, cache_hidden, packs_texts, plan_key
from steerport.errors import SteerportError, one_line
from steerport.fileio import atomic_write_json
from steerport.models import LoadedModel

T = TypeVar("T")
TIMEOUT = timedelta(hours=12)  # the other ranks wait this long at most while rank 0 gathers and fits
WORLD_FILE = "world.json"  # rank 0's mark in the work folder: proves the folder is shared
COPY_ROWS = 1 << 16  # rows per copy while gathering the shards


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (rank 0 of 1 when not launched as one)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        return f"rank {self.rank} of {self.size}"


def current_world() -> World:
    """This process's rank and the world size, from the variables accelerate/torchrun set."""
    size, rank, local = (os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if size is None:
        return World()
    try:
        world = World(rank=int(rank or 0), size=int(size), local_rank=int(local or rank or 0))
    except ValueError:
        raise SteerportError(f"bad launcher environment WORLD_SIZE={size!r} RANK={rank!r} LOCAL_RANK={local!r}") from None
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise SteerportError(f"bad launcher environment: rank {world.rank} in a world of {world.size} processes")
    return world


def check_size(world: World, n_texts: int) -> None:
    """Refuse a world larger than the number of texts (some processes would have nothing to do)."""
    if world.size > n_texts:
        raise SteerportError(f"{world.size} processes for {n_texts} texts: launch at most {n_texts} processes "
                             "(or give more texts)")


def rank_device(world: World, device: str) -> str:
    """``cuda`` becomes this rank's own GPU ``cuda:LOCAL_RANK`` in a data-parallel run."""
    return f"cuda:{world.local_rank}" if world.size > 1 and device == "cuda" else device


_group: Any = None  # the gloo process group this module talks over


def join(world: World) -> None:
    """Join the other processes (gloo) unless alone or already joined; idempotent."""
    global _group
    if world.size == 1 or _group is not None:
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise SteerportError("this torch build has no torch.distributed; a data-parallel run needs it")
    try:
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=TIMEOUT)
            atexit.register(_leave)
            _group = dist.group.WORLD
        else:  # the caller (e.g. accelerate) already joined, maybe over nccl: talk over gloo beside it
            _group = dist.new_group(backend="gloo", timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:
        raise SteerportError(f"{world.name}: cannot join the other processes: {one_line(e)}") from None


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _talk(world: World, doing: str, fn: Callable[[], T]) -> T:
    """Run a collective; a peer that died becomes one line."""
    try:
        return fn()
    except RuntimeError as e:  # gloo: connection closed / timeout when another rank is gone
        raise SteerportError(f"{world.name}: another process of this data-parallel run stopped while {doing} "
                             f"({one_line(e)}); run the same command again to resume from the work folder") from None


def barrier(world: World, doing: str) -> None:
    """Wait for every rank (no-op alone)."""
    if world.size > 1:
        import torch.distributed as dist

        _talk(world, doing, lambda: dist.barrier(group=_group))


def share(world: World, obj: T | None, doing: str = "rank 0 fitted the steer") -> T:
    """Rank 0's ``obj`` on every rank (pickled over gloo); alone, ``obj`` itself.

    A barrier follows the broadcast, so no rank goes on (and exits) while another is still receiving:
    gloo aborts a process whose peer closes the connection under a pending receive."""
    if world.size == 1:
        return obj  # type: ignore[return-value]
    import torch.distributed as dist

    box = [obj]
    _talk(world, doing, lambda: dist.broadcast_object_list(box, src=0, group=_group))
    _talk(world, doing, lambda: dist.barrier(group=_group))
    return box[0]  # type: ignore[return-value]


def main_first(world: World, workdir: Path | None, fn: Callable[[], T]) -> T:
    """Rank 0 runs ``fn`` (e.g. preparing the work folder) while the others wait; every rank gets
    its result. Also checks that all ranks see the same work folder."""
    if world.size == 1:
        return fn()
    if workdir is None:
        raise SteerportError("a data-parallel run needs a work folder that every process shares")
    token = None
    if world.is_main:
        result = fn()
        token = uuid.uuid4().hex
        atomic_write_json(workdir / WORLD_FILE, {"token": token, "size": world.size})
    got = share(world, (result, token) if world.is_main else None, "preparing the work folder")
    result, token = got
    if not world.is_main:
        try:
            seen = json.loads((workdir / WORLD_FILE).read_text()).get("token")
        except (OSError, ValueError):
            seen = None
        if seen != token:
            raise SteerportError(f"{world.name}: the work folder {workdir} is not the one rank 0 prepared; put it on a "
                                 "file system every process shares (e.g. --workdir /shared/run.work)")
    barrier(world, "checking the work folder")
    return result


# --------------------------------------------------------------------------- the sharded body pass


def deal(plan: Sequence[Batch], rank: int, size: int) -> tuple[list[int], list[Batch]]:
    """Rank ``rank``'s share of a batch plan: its texts (indices into the full list, batch by
    batch, row by row) and its batches re-indexed into that list of texts."""
    texts: list[int] = []
    batches: list[Batch] = []
    for batch in plan[rank::size]:
        rows: Batch = []
        for row in batch:
            rows.append(list(range(len(texts), len(texts) + len(row))))
            texts.extend(row)
        batches.append(rows)
    return texts, batches


def shard_dir(workdir: Path, rank: int, size: int) -> Path:
    return workdir / f"shard-{rank}-of-{size}"


def remove_shards(workdir: Path) -> None:
    """Delete every shard folder of the work folder (after gathering, or when starting over)."""
    for d in workdir.glob("shard-*-of-*"):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def cache_hidden_sharded(
    world: World,
    lm: LoadedModel,
    token_lists: Sequence[Sequence[int]],
    *,
    workdir: Path | None,
    key: str,
    dtype: torch.dtype = torch.float32,
    tokens_per_batch: int = 4096,
    predicted_only: bool = True,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> HiddenCache | None:
    """:func:`~steerport.capture.cache_hidden` over ``token_lists`` shared by the ranks of
    ``world``: the full cache (identical to one process's) on rank 0, None on the others.

    ``key`` identifies the cache (model, tokens, dtypes); shards of another key or world size
    are ignored. ``progress`` gets this rank's counts scaled to the whole set (an estimate).
    """
    if workdir is None:
        raise SteerportError("a data-parallel run needs a work folder that every process shares")
    args = {"dtype": dtype, "tokens_per_batch": tokens_per_batch, "predicted_only": predicted_only}
    done_path = workdir / "cache.done"
    complete = False
    if world.is_main and done_path.exists():
        try:
            complete = json.loads(done_path.read_text()).get("key") == key
        except (OSError, ValueError):
            complete = False
    if share(world, complete if world.is_main else None, "checking the cache"):
        if not world.is_main:
            return None
        remove_shards(workdir)
        return cache_hidden(lm, token_lists=token_lists, workdir=workdir, **args)  # type: ignore[arg-type]

    plan = batch_plan(token_lists, tokens_per_batch, packed=packs_texts(lm))
    texts, batches = deal(plan, world.rank, world.size)
    mine = shard_dir(workdir, world.rank, world.size)
    _claim_shard(mine, {"key": key, "tokens_per_batch": tokens_per_batch, "texts": len(texts)})
    scale_texts = len(token_lists) / max(len(texts), 1)
    scale_pos = sum(len(t) for t in token_lists) / max(sum(len(token_lists[i]) for i in texts), 1)
    report = (lambda n, k: progress(round(n * scale_texts), round(k * scale_pos))) if progress else None
    cache_hidden(lm, token_lists=[token_lists[i] for i in texts], batches=batches, workdir=mine,
                 progress=report, should_stop=should_stop, **args)  # type: ignore[arg-type]
    barrier(world, "caching its share of the texts")
    if not world.is_main:
        return None
    cache = _gather(world, lm, token_lists, plan, workdir, args)
    atomic_write_json(done_path, {"key": key, "gathered_from": world.size})
    remove_shards(workdir)
    return cache


def _claim_shard(folder: Path, manifest: dict[str, Any]) -> None:
    """Keep a shard folder only if it belongs to this run (same key); else start it afresh."""
    path = folder / "shard.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        old = None
    if old != manifest and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)


def _gather(world: World, lm: LoadedModel, token_lists: Sequence[Sequence[int]], plan: list[Batch],
            workdir: Path, args: dict[str, Any]) -> HiddenCache:
    """Rank 0: copy every rank's shard into the full cache in text order (``hidden.bin``, memory-
    mapped, with ``hidden.json`` marking it complete so a one-process rerun reuses it), one shard
    at a time (memory: one shard, and not even that when the shards are memory-mapped)."""
    dtype: torch.dtype = args["dtype"]
    kept = np.array([max(len(t) - 1, 0) if args["predicted_only"] else len(t) for t in token_lists], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)  # where each text's rows begin
    N, d = int(starts[-1]), lm.hidden_size
    item = torch.tensor([], dtype=dtype).element_size()
    raw_dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[item]
    mapped = np.memmap(workdir / "hidden.bin", dtype=raw_dtype, mode="w+", shape=(max(N, 1), d))
    h = torch.from_numpy(mapped[:N]).view(dtype) if N else torch.zeros(0, d, dtype=dtype)
    targets = torch.full((N,), -1, dtype=torch.long)
    text_id = torch.zeros(N, dtype=torch.long)
    for rank in range(world.size):
        texts, batches = deal(plan, rank, world.size)
        if not texts:
            continue
        # every batch is done (the barrier passed), so this reads; a missing batch would be computed here
        shard = cache_hidden(lm, token_lists=[token_lists[i] for i in texts], batches=batches,
                             workdir=shard_dir(workdir, rank, world.size), **args)
        local = shard.text_id.numpy()  # (n,) rows grouped by the shard's texts, in order
        counts = np.bincount(local, minlength=len(texts))
        if not np.array_equal(counts, kept[texts]):
            raise SteerportError(f"{world.name}: the shard of rank {rank} does not match its texts; "
                                 f"delete {shard_dir(workdir, rank, world.size)} and run again")
        first = np.concatenate([[0], np.cumsum(counts)])[:-1]
        gid = np.asarray(texts, dtype=np.int64)[local]
        dest = torch.from_numpy(starts[gid] + np.arange(len(local)) - first[local])  # (n,) rows of the full cache
        for a in range(0, len(dest), COPY_ROWS):
            h[dest[a : a + COPY_ROWS]] = shard.h[a : a + COPY_ROWS]
        targets[dest] = shard.targets
        text_id[dest] = torch.from_numpy(gid)
        del shard
    mapped.flush()
    atomic_write_json(workdir / "hidden.json", {"shape": [N, d], "dtype": str(dtype), "batches_done": len(plan),
                                                "batches": len(plan), "plan": plan_key(plan)})
    if N * d * item <= IN_MEMORY_BYTES:
        h = h.clone()
    return HiddenCache(h, targets, text_id, len(token_lists))
