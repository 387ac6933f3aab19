"""Capture hidden states: the one way steerport reads what a model computes inside.

A *point* names a hidden state of a causal LM:

* ``"head"`` — the LM head's input, the final hidden state ``h`` (after the final norm);
* an int ``L`` — the residual stream entering decoder block ``L`` (``L = n_layers``: the stream
  leaving the last block, before the final norm).

:func:`capture` runs one forward pass and returns the states at several points, stopping the
pass as soon as the last one is seen (so the LM head is never computed for ``"head"``).
On top of it:

* :func:`cache_hidden` — states at one point for every token position of a text set, flat over
  texts (:class:`HiddenCache`), optionally memory-mapped in a work folder and resumable batch
  by batch; used by training, scoring, token-probability statistics and explain.
* :mod:`steerport.pairing` — states of two models at positions where both tokenizations end on
  the same character, through the same batches.

Example::

    h, = capture(lm, ["head"], input_ids=ids, attention_mask=mask)          # (b, T, d)
    cache = cache_hidden(lm, ["A neutral sentence."])                       # cache.h: (N, d)
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerport.errors import SteerportError
from steerport.fileio import atomic_write_json
from steerport.models import LoadedModel, decoder_layers

Point = str | int  # "head", or a decoder-layer index 0..n_layers
IN_MEMORY_BYTES = 1 << 30  # a memory-mapped cache up to this size is read into memory after the pass
ROW_TOKENS = 128  # a packed row's length: texts laid end to end up to this many tokens (measured: 128 and 256 tie, 512 loses)
Batch = list[list[int]]  # a forward batch: rows, each the indices of the texts laid end to end in it


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass once every wanted state is in hand."""


def main_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A module's main input: its first positional argument, else ``input`` (the LM head's
    Linear) or ``hidden_states`` (decoder layers) among its keywords."""
    if args:
        return args[0]
    for key in ("input", "hidden_states"):
        if key in kwargs:
            return kwargs[key]
    raise SteerportError(f"cannot find the input of a module called with keywords {sorted(kwargs)}")


def block_output(output: Any) -> torch.Tensor:
    """The hidden states in a decoder block's output: a tensor, or a tuple whose first element is one."""
    return output[0] if isinstance(output, tuple) else output


def edit_input(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """From now on ``module`` sees fn(x) instead of its main input x; returns the remover.

    Example (the LM-Steer hook)::

        remove = edit_input(lm.lm_head, lambda h: h + lm_steer_shift(h, A, B))
    """

    def pre_hook(mod, args, kwargs):
        x = fn(main_input(args, kwargs))
        if args:
            return (x, *args[1:]), kwargs
        key = "input" if "input" in kwargs else "hidden_states"
        return args, {**kwargs, key: x}

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True).remove


@torch.no_grad()
def input_of(model: torch.nn.Module, module: torch.nn.Module, **forward_kwargs: Any) -> torch.Tensor:
    """``module``'s main input from one forward pass of ``model`` that stops right there.

    Example: the final hidden states (b, T, d), without computing the LM head::

        h = input_of(lm.model, lm.lm_head, input_ids=ids, attention_mask=mask)
    """
    got: list[torch.Tensor] = []

    def pre_hook(mod, args, kwargs):
        got.append(main_input(args, kwargs))
        raise _StopForward

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        model(**forward_kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not got:
        raise SteerportError(f"the forward pass of {type(model).__name__} never reached {type(module).__name__}")
    return got[0]


def _hook_point(lm: LoadedModel, point: Point, keep: Callable[[torch.Tensor], None]):
    """Register ``keep(state)`` at ``point``; returns the handle."""
    if point == "head":
        if lm.is_split:  # a device map may put the final norm on another GPU than the head: states come where E is
            return lm.lm_head.register_forward_pre_hook(lambda m, a, kw: keep(main_input(a, kw).to(lm.device)),
                                                        with_kwargs=True)
        return lm.lm_head.register_forward_pre_hook(lambda m, a, kw: keep(main_input(a, kw)), with_kwargs=True)
    blocks = decoder_layers(lm.model)
    if isinstance(point, bool) or not isinstance(point, int) or not 0 <= point <= len(blocks):
        raise SteerportError(f"capture point must be 'head' or a layer 0..{len(blocks)}, got {point!r}")
    if point == len(blocks):
        return blocks[-1].register_forward_hook(lambda m, a, out: keep(block_output(out)))
    return blocks[point].register_forward_pre_hook(lambda m, a, kw: keep(main_input(a, kw)), with_kwargs=True)


@torch.no_grad()
def capture(lm: LoadedModel, points: Sequence[Point], **forward_kwargs: Any) -> list[torch.Tensor]:
    """The states (b, T, d) at each of ``points`` from one forward pass of ``lm.model``, which
    stops once all are seen. ``forward_kwargs`` go to the model (input_ids, attention_mask, ...)."""
    unique = list(dict.fromkeys(points))
    got: dict[Point, torch.Tensor] = {}

    def keeper(point: Point) -> Callable[[torch.Tensor], None]:
        def keep(state: torch.Tensor) -> None:
            got.setdefault(point, state.detach())
            if len(got) == len(unique):
                raise _StopForward

        return keep

    handles = [_hook_point(lm, p, keeper(p)) for p in unique]
    try:
        lm.model(**forward_kwargs, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [p for p in unique if p not in got]
    if missing:
        raise SteerportError(f"the forward pass of {lm.spec} never reached {missing}")
    return [got[p] for p in points]


# --------------------------------------------------------------------------- token batches


def tokenize(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text (the tokenizer's own special tokens), truncated to ``max_tokens``."""
    if max_tokens < 2:
        raise SteerportError(f"max tokens per text must be at least 2, got {max_tokens}")
    enc = tokenizer(list(texts), truncation=True, max_length=max_tokens)
    return [list(ids) for ids in enc["input_ids"]]


def pack_by_length(lengths: Sequence[int], tokens_per_batch: int, max_texts: int = 64) -> list[list[int]]:
    """Group text indices into batches of similar length with at most ``tokens_per_batch``
    padded tokens (longest first, so memory peaks show up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > tokens_per_batch or len(current) >= max_texts):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Text indices laid end to end in rows of at most ``row_tokens`` tokens (a longer text gets a
    row of its own): best-fit decreasing, so nearly every row is full. Deterministic."""
    open_rows: list[list[int]] = [[] for _ in range(row_tokens + 1)]  # open_rows[room]: rows with that many tokens free
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        room = next((r for r in range(n, row_tokens + 1) if open_rows[r]), None)
        if room is None:
            rows.append([i])
            k, left = len(rows) - 1, row_tokens - n
        else:
            k = open_rows[room].pop()
            rows[k].append(i)
            left = room - n
        if left > 0:
            open_rows[left].append(k)
    return rows


def batch_plan(token_lists: Sequence[Sequence[int]], tokens_per_batch: int, packed: bool = True) -> list[Batch]:
    """The forward-pass batches :func:`cache_hidden` runs over these token lists: each batch a list
    of rows, each row the texts laid end to end in it.

    ``packed``: rows of ``max(min(ROW_TOKENS, tokens_per_batch), longest text)`` tokens at most
    (:func:`pack_rows`), as many per batch as fit in ``tokens_per_batch``; else one text per row,
    padded, in batches of similar length (:func:`pack_by_length`). A data-parallel run
    (steerport.distributed) deals out the same batches, so each text's states are computed
    exactly as in one process."""
    lengths = [len(t) for t in token_lists]
    if not packed or not lengths:
        return [[[i] for i in batch] for batch in pack_by_length(lengths, tokens_per_batch)]
    row_tokens = max(min(ROW_TOKENS, tokens_per_batch), max(lengths))
    rows = pack_rows(lengths, row_tokens)
    per_batch = max(1, tokens_per_batch // row_tokens)
    return [rows[k : k + per_batch] for k in range(0, len(rows), per_batch)]


def plan_key(batches: Sequence[Batch]) -> str:
    """A short fingerprint of a batch plan (``hidden.json`` records it, so a resumed pass runs the same batches)."""
    return hashlib.sha256(json.dumps([[list(row) for row in b] for b in batches]).encode()).hexdigest()[:16]


def padded_batch(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (b, T) and attention mask (b, T) of several token lists."""
    T = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), T), dtype=torch.long)
    for row, t in enumerate(token_lists):
        ids[row, : len(t)] = torch.tensor(list(t), dtype=torch.long)
        mask[row, : len(t)] = 1
    return ids, mask


def packed_batch(rows: Sequence[Sequence[Sequence[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (b, T) and position ids (b, T) of rows of token lists laid end to end.

    Each text's positions count from 0, and so do a row's trailing pads (a sequence of their
    own). With no attention mask, Hugging Face models read the restarts as sequence boundaries
    and keep each text's attention to itself (a block-diagonal causal mask).
    """
    T = max(sum(len(t) for t in row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for t in row:
            ids[r, at : at + len(t)] = torch.tensor(list(t), dtype=torch.long)
            positions[r, at : at + len(t)] = torch.arange(len(t))
            at += len(t)
        positions[r, at:] = torch.arange(T - at)
    return ids, positions


_PACKS: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()
PACK_CHECK_TOL = 0.1  # packed vs alone, relative: bf16 rounding 0.013-0.017 on real models; ignored restarts 0.15-0.6


def packs_texts(lm: LoadedModel) -> bool:
    """Whether ``lm`` computes texts laid end to end in one row (:func:`packed_batch`) as it does
    each text alone. Checked once per model on two short texts: a model that ignores the position
    restarts (its texts would attend to each other) gets padded batches instead."""
    if lm.model not in _PACKS:
        tok = lm.tokenizer
        texts = tokenize(tok, ["The weather was mild and the streets were quiet.", "A second text, in a row of its own."], 32)
        point: Point = "head"
        alone = [capture(lm, [point], input_ids=torch.tensor([t], device=lm.device))[0][0].float() for t in texts]
        ids, positions = packed_batch([texts], tok.pad_token_id or 0)
        try:
            (row,) = capture(lm, [point], input_ids=ids.to(lm.device), position_ids=positions.to(lm.device))
        except (TypeError, ValueError, RuntimeError):  # a model that takes no position ids: padding it is
            _PACKS[lm.model] = False
            return False
        together = row[0].float().split([len(t) for t in texts])
        err = max(float((a - b).norm() / a.norm().clamp_min(1e-12)) for a, b in zip(alone, together))
        _PACKS[lm.model] = err < PACK_CHECK_TOL
    return _PACKS[lm.model]


def batch_inputs(lm: LoadedModel, rows: Sequence[Sequence[Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """The model inputs (on ``lm``'s device) of a batch of rows of token lists (a :data:`Batch`, with the
    token lists in place of their indices): rows of one text each right-padded with an attention mask,
    texts laid end to end with restarting position ids (:func:`packed_batch`)."""
    if all(len(row) == 1 for row in rows):
        ids, mask = padded_batch([row[0] for row in rows], pad_id)
        return {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device)}
    ids, positions = packed_batch(rows, pad_id)
    return {"input_ids": ids.to(lm.device), "position_ids": positions.to(lm.device)}


def forward_rows(lm: LoadedModel, rows: Sequence[Sequence[Sequence[int]]], points: Sequence[Point], pad_id: int,
                 dtype: torch.dtype) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """One forward pass over a batch of rows of token lists (:func:`batch_inputs`): for each text, in
    row order, its position in the batch (0, 1, ...) and its states (n_tokens, d) at each of
    ``points``, on the CPU in ``dtype`` (converted once per batch)."""
    states = [h.to("cpu", dtype) for h in capture(lm, points, **batch_inputs(lm, rows, pad_id))]  # each (b, T, d)
    k = 0
    for r, row in enumerate(rows):
        at = 0
        for t in row:
            yield k, [h[r, at : at + len(t)] for h in states]
            at, k = at + len(t), k + 1


def text_batches(lm: LoadedModel, texts: Sequence[str], batch_size: int, max_tokens: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded token batches (input_ids, attention_mask on the model's device), in text order."""
    tok = lm.tokenizer
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
        yield {k: v.to(lm.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


# --------------------------------------------------------------------------- a cache of states


@dataclass
class HiddenCache:
    """States at one point for token positions of a text set, flat over texts in text order.

    ``h`` (N, d) maybe memory-mapped; ``targets`` (N,) the next token id at each position (-1 at
    a text's last position); ``text_id`` (N,) which text each position belongs to.
    """

    h: torch.Tensor
    targets: torch.Tensor
    text_id: torch.Tensor
    n_texts: int

    @property
    def n_positions(self) -> int:
        return int(self.h.shape[0])

    @property
    def n_targets(self) -> int:
        return int((self.targets >= 0).sum())

    # older names, kept for readers of the public API
    @property
    def hidden(self) -> torch.Tensor:
        return self.h

    @property
    def text(self) -> torch.Tensor:
        return self.text_id

    @property
    def n_tokens(self) -> int:
        return self.n_positions


def cache_hidden(
    lm: LoadedModel,
    texts: Sequence[str] | None = None,
    *,
    token_lists: Sequence[Sequence[int]] | None = None,
    point: Point = "head",
    max_tokens: int = 128,
    predicted_only: bool = False,
    dtype: torch.dtype = torch.float32,
    tokens_per_batch: int = 4096,
    workdir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    batches: Sequence[Sequence[Sequence[int]]] | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    in_memory_bytes: int = IN_MEMORY_BYTES,
) -> HiddenCache:
    """Run the model once over the texts (or ``token_lists``) and keep the state at ``point`` for
    every position (``predicted_only``: only positions that have a next token).

    With a ``workdir`` the states go to a memory-mapped file there (``hidden.bin``), written batch
    by batch with the progress recorded (``hidden.json``), so an interrupted pass resumes at the
    next batch; a cache up to 1 GiB is read into memory at the end. ``progress(texts_done,
    positions_done)`` is called after each batch; ``should_stop()`` true raises KeyboardInterrupt
    after the current batch (the work folder keeps what is done). ``batches`` replaces the
    :func:`batch_plan` (rows of indices into the token lists, covering each once). Texts share rows
    (laid end to end) when the model computes them so exactly as alone (:func:`packs_texts`).

    ``observe(positions (M,), states (M, d), targets (M,))`` sees each batch's new rows (as
    stored, in ``dtype``) before the batch counts as done: a hook for statistics that ride on the
    same pass (the trainer's top-k head statistics). A memory-mapped cache larger than
    ``in_memory_bytes`` stays on disk (0: always).
    """
    if token_lists is None:
        if texts is None:
            raise SteerportError("cache_hidden needs texts or token lists")
        token_lists = tokenize(lm.tokenizer, texts, max_tokens)
    lengths = [len(t) for t in token_lists]
    kept = [max(n - 1, 0) if predicted_only else n for n in lengths]  # positions kept per text
    starts = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    N, d = int(starts[-1]), lm.hidden_size
    targets = np.full(N, -1, dtype=np.int64)
    for i, t in enumerate(token_lists):
        if len(t) > 1:
            targets[starts[i] : starts[i] + len(t) - 1] = t[1:]
    text_id = np.repeat(np.arange(len(token_lists), dtype=np.int64), kept)
    batches = ([[list(row) for row in batch] for batch in batches] if batches is not None
               else batch_plan(token_lists, tokens_per_batch, packed=packs_texts(lm)))
    key = plan_key(batches)  # a resumed pass must run the same batches
    item = torch.tensor([], dtype=dtype).element_size()
    raw_dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[item]  # raw bits, viewed as dtype
    done = 0
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        path, state_path = workdir / "hidden.bin", workdir / "hidden.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else None
        if (state and state.get("shape") == [N, d] and state.get("dtype") == str(dtype) and state.get("plan") == key
                and path.exists()):
            done = int(state["batches_done"])
            raw = np.memmap(path, dtype=raw_dtype, mode="r+", shape=(max(N, 1), d))[:N]
        else:
            raw = np.memmap(path, dtype=raw_dtype, mode="w+", shape=(max(N, 1), d))[:N]
    else:
        raw = np.zeros((N, d), dtype=raw_dtype)
    h_all = torch.from_numpy(raw).view(dtype) if N else torch.zeros(0, d, dtype=dtype)
    pad = lm.tokenizer.pad_token_id or 0
    texts_done = sum(len(row) for b in batches[:done] for row in b)
    pos_done = int(sum(kept[i] for b in batches[:done] for row in b for i in row))
    if progress:
        progress(texts_done, pos_done)
    for bi in range(done, len(batches)):
        order = [i for row in batches[bi] for i in row]  # the batch's texts, in the order forward_rows gives them
        parts: list[torch.Tensor] = []
        for k, (h,) in forward_rows(lm, [[token_lists[i] for i in row] for row in batches[bi]], [point], pad, dtype):
            i = order[k]
            parts.append(h[: kept[i]])
            h_all[starts[i] : starts[i + 1]] = parts[-1]
        if observe is not None:
            pos = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i in order])
            observe(pos, torch.cat(parts), torch.from_numpy(targets[pos.numpy()]))
        texts_done += len(order)
        pos_done += int(sum(kept[i] for i in order))
        if workdir is not None:
            if isinstance(raw, np.memmap):
                raw.flush()
            atomic_write_json(workdir / "hidden.json", {"shape": [N, d], "dtype": str(dtype), "batches_done": bi + 1,
                                                        "batches": len(batches), "plan": key})
        if progress:
            progress(texts_done, pos_done)
        if should_stop() and bi + 1 < len(batches):
            raise KeyboardInterrupt
    if workdir is not None and N * d * item <= in_memory_bytes:
        h_all = h_all.clone()  # small: read it into memory; large: stay memory-mapped
    return HiddenCache(h_all, torch.from_numpy(targets), torch.from_numpy(text_id), len(token_lists))
