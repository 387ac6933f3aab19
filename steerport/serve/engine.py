"""The batching engine: one worker thread decodes many requests together, each row with its own
steer values, sampling settings and stop conditions, in the same forward passes.

Design::

    HTTP handlers ──submit(rows)──► pending queue ──► worker thread
                                                      │ collect rows arriving within `window_s`
                                                      │ (up to `max_batch`), then one decode loop:
                                                      │   left-pad prompts, attention mask, position ids
                                                      │   prefill, then one token per step with a KV cache
                                                      │   per-row steer values (hooks.steered(rows=...))
                                                      │   per-row temperature / top_p / seed / stop / max_tokens
                                                      │   finished or cancelled rows leave the batch;
                                                      │   rows arriving meanwhile are prefilled and join
                                                      │   it (KV cache left-padded to a common length)
                                                      ▼
    asyncio queue per request ◄── events (text delta, finish) ◄──┘  (Row.emit)

Left padding with a mask and positions counted from each row's first real token makes a row's
computation the same alone or in a batch, so greedy output does not depend on the neighbours
(tested exactly in float32). Jobs that must not overlap a decode loop (explanations, which hook
the model themselves) run on the same thread between batches (:meth:`Engine.call`); background
jobs (keywords) only while no request waits. Joining a running batch needs full-attention
``DynamicCache`` layers; models with sliding-window layers (Gemma-3) fall back to batches that
start together.

Example::

    engine = Engine(lm, {"positive": steer})
    engine.start()
    row = Row(prompt_ids=lm.tokenizer("The movie was")["input_ids"], max_tokens=16,
              values={"positive": 3.0}, emit=print)
    engine.submit([row])              # Event(text=..., tokens=...) per step, the last with finish=...
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from steerport.models import LoadedModel
from steerport.serve.rows import Event, Row, apply_rows, held_back, release_memory, sample_next
from steerport.steer import Steer

log = logging.getLogger("steerport.serve")


class Engine:
    """Owns the model; batches rows from many requests into shared decode loops."""

    def __init__(
        self,
        lm: LoadedModel,
        steers: dict[str, Steer],
        *,
        max_batch: int = 32,
        window_s: float = 0.015,
        tok_lock: threading.RLock | None = None,
    ):
        self.lm = lm
        self.names = list(steers)
        self.steers = [steers[n] for n in self.names]
        self.max_batch = max_batch
        self.window_s = window_s
        self.tok_lock = tok_lock or threading.RLock()  # HF fast tokenizers must not be mutated while in use
        self._pending: queue.Queue = queue.Queue()
        self._background: collections.deque = collections.deque()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        tok: Any = lm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_ids = eos
        self.tokenizer: Any = tok
        import inspect

        params = inspect.signature(lm.model.forward).parameters
        self._keep_arg = "logits_to_keep" in params
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.stats = {"batches": 0, "rows": 0, "joined": 0, "steps": 0, "max_rows_in_batch": 0}
        self._carry: list = []  # items taken from the queue that wait for the current batch to end
        self._dirty = False  # a batch ran since memory was last released

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="steerport-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._pending.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, rows: Sequence[Row]) -> None:
        """Queue rows for generation; their events go to each row's ``emit``."""
        for r in rows:
            self._pending.put(r)

    def call(self, fn: Callable[[], Any], *, background: bool = False) -> Future:
        """Run ``fn`` on the engine thread between batches (it may hook the model); returns a Future.

        ``background`` jobs (e.g. keywords for /v1/steers) run only when no request is waiting.
        """
        fut: Future = Future()
        if background:
            self._background.append((fn, fut))
        else:
            self._pending.put((fn, fut))
        return fut

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        carry = self._carry
        while not self._stop.is_set():
            item = carry.pop(0) if carry else self._next()
            if item is None:
                break
            if isinstance(item, tuple):
                self._run_job(*item)
                continue
            batch = [item]
            end = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                left = end - time.monotonic()
                try:
                    nxt = self._pending.get(timeout=max(left, 0)) if left > 0 else self._pending.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or isinstance(nxt, tuple):
                    carry.append(nxt)
                    break
                batch.append(nxt)
            batch = [r for r in batch if not r.cancelled.is_set()]
            self._dirty = True
            if batch:
                try:
                    self._decode(batch)
                except Exception as e:  # never kill the worker: fail these rows, keep serving
                    log.exception("decode loop failed")
                    for r in batch:
                        if not r.done:
                            r.done = True
                            r.emit(Event(finish="error", error=f"generation failed: {e}", tokens=len(r.ids)))

    def _next(self) -> Any:
        """The next queued item; while none comes, run background jobs one at a time, and once
        idle after a batch hand freed memory back to the system (see :func:`release_memory`)."""
        while True:
            try:
                return self._pending.get(timeout=0.05)
            except queue.Empty:
                if self._background:
                    self._run_job(*self._background.popleft())
                elif self._dirty:
                    self._dirty = False
                    release_memory()

    @staticmethod
    def _run_job(fn: Callable[[], Any], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001  (delivered to the waiting handler)
            fut.set_exception(e)

    # ------------------------------------------------------------------ decoding

    def _values(self, rows: Sequence[Row]) -> torch.Tensor:
        """(b, k): each row's value for every loaded steer (0 where not asked)."""
        return torch.tensor([[r.values.get(n, 0.0) for n in self.names] for r in rows], dtype=torch.float32)

    def _forward(self, **kw) -> tuple[torch.Tensor, Any]:
        if self._keep_arg:
            kw["logits_to_keep"] = 1
        if "cache" in kw:
            kw[self._cache_arg] = kw.pop("cache")
        out = self.lm.model(**kw, use_cache=True)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        return out.logits[:, -1, :].float(), cache  # (b, V)

    def _advance(self, r: Row, token: int) -> None:
        """Record one token for a row, emit the text that is safe to show, finish it if due."""
        finish = None
        if token in self.eos_ids:
            finish = "stop"
        else:
            r.ids.append(token)
        with self.tok_lock:
            text = self.tokenizer.decode(r.ids, skip_special_tokens=True)
        if r.stop:
            hits = [i for i in (text.find(s) for s in r.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and len(r.ids) >= r.max_tokens:
            finish = "length"
        if finish is None and time.monotonic() > r.deadline:
            finish = "length"  # the server's time limit; OpenAI has no finish reason for it
        if finish is None:
            safe = len(text) - held_back(text, r.stop)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                safe = min(safe, len(text.rstrip("\ufffd")))
            if safe > r.sent:
                r.emit(Event(text=text[r.sent : safe], tokens=len(r.ids)))
                r.sent = safe
            return
        r.done = True
        r.emit(Event(text=text[r.sent :], tokens=len(r.ids), finish=finish))
        r.sent = len(text)

    def _prefill(self, rows: Sequence[Row]) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """One forward pass over left-padded prompts: (last logits (b, V), cache, mask (b, L), last positions (b,))."""
        dev = self.lm.device
        b, L = len(rows), max(len(r.prompt_ids) for r in rows)
        ids = torch.full((b, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, L), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            n = len(r.prompt_ids)
            ids[i, L - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, L - n :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, L): positions from each row's first real token
        logits, cache = self._forward(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev))
        return logits, cache, mask, pos[:, -1]

    def _joiners(self, room: int) -> list[Row]:
        """Rows that arrived while a batch is decoding (up to ``room``); jobs wait for the batch to end."""
        out: list[Row] = []
        while len(out) < room and not self._carry:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is None or isinstance(item, tuple):
                self._carry.append(item)
            elif not item.cancelled.is_set():
                out.append(item)
        return out

    @staticmethod
    def _mergeable(cache: Any) -> bool:
        """Only plain full-attention dynamic caches are padded and joined (not sliding windows)."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None) or []
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    @staticmethod
    def _merge(c1: Any, m1: torch.Tensor, c2: Any, m2: torch.Tensor) -> torch.Tensor:
        """Append cache c2's rows to c1, left-padding the shorter one; returns the merged mask.

        Keys/values: (b, heads, T, head_dim); padded slots are masked, so every row attends to
        exactly what it attended to before.
        """
        L1, L2 = m1.shape[1], m2.shape[1]
        L = max(L1, L2)

        def pad(t: torch.Tensor, n: int) -> torch.Tensor:
            return t if n == 0 else torch.cat([t.new_zeros((*t.shape[:-2], n, t.shape[-1])), t], -2)

        for a, b in zip(c1.layers, c2.layers):
            a.keys = torch.cat([pad(a.keys, L - L1), pad(b.keys, L - L2)], 0)
            a.values = torch.cat([pad(a.values, L - L1), pad(b.values, L - L2)], 0)
        z = lambda m, n: torch.cat([m.new_zeros((m.shape[0], n)), m], 1)
        return torch.cat([z(m1, L - L1), z(m2, L - L2)], 0)

    @torch.no_grad()
    def _decode(self, rows: list[Row]) -> None:
        """Decode ``rows`` together until all finish; rows arriving meanwhile join (appended to ``rows``)."""
        lm, dev = self.lm, self.lm.device
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        gens = [torch.Generator().manual_seed(int(r.seed)) if r.temperature > 0 else None for r in rows]
        active = list(range(len(rows)))  # indices into rows of the rows still in the batch
        values = self._values(rows)  # (len(rows), k), grows as rows join
        remove = apply_rows(lm, self.steers, values)
        try:
            logits, cache, mask, last_pos = self._prefill(rows)
            while True:
                self.stats["steps"] += 1
                self.stats["max_rows_in_batch"] = max(self.stats["max_rows_in_batch"], len(active))
                nxt = []
                for j, i in enumerate(active):
                    r = rows[i]
                    if r.cancelled.is_set():
                        r.done = True
                        nxt.append(self.pad_id)
                        continue
                    t = sample_next(logits[j], r.temperature, r.top_p, gens[i])
                    self._advance(r, t)
                    nxt.append(t)
                keep = [j for j, i in enumerate(active) if not rows[i].done]
                if not keep:
                    break  # back to the queue: the next batch is collected with the batching window
                if len(keep) < len(active):  # finished rows leave the batch (and its hooks)
                    sel = torch.tensor(keep, dtype=torch.long)
                    cache.batch_select_indices(sel.to(dev))
                    mask, last_pos = mask[sel], last_pos[sel]
                    nxt = [nxt[j] for j in keep]
                    active = [active[j] for j in keep]
                    remove()
                    remove = apply_rows(lm, self.steers, values[torch.tensor(active)])
                mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], 1)
                last_pos = last_pos + 1
                logits, cache = self._forward(
                    input_ids=torch.tensor(nxt, dtype=torch.long)[:, None].to(dev),
                    attention_mask=mask.to(dev),
                    position_ids=last_pos[:, None].to(dev),
                    cache=cache,
                )
                room = self.max_batch - len(active)
                new = self._joiners(room) if room > 0 and self._mergeable(cache) else []
                if not new:
                    continue
                # rows that arrived meanwhile: prefill them on their own, then join the running batch
                remove()
                first = len(rows)
                rows.extend(new)
                gens.extend(torch.Generator().manual_seed(int(r.seed)) if r.temperature > 0 else None for r in new)
                values = torch.cat([values, self._values(new)], 0)
                remove = apply_rows(lm, self.steers, values[first:])
                logits2, cache2, mask2, last2 = self._prefill(new)
                remove()
                mask = self._merge(cache, mask, cache2, mask2)
                logits = torch.cat([logits, logits2], 0)
                last_pos = torch.cat([last_pos, last2], 0)
                active = active + list(range(first, len(rows)))
                self.stats["joined"] += len(new)
                self.stats["rows"] += len(new)
                remove = apply_rows(lm, self.steers, values[torch.tensor(active)])
        finally:
            remove()
            for r in rows:
                if not r.done and r.cancelled.is_set():
                    r.done = True
                    r.emit(Event(finish="cancelled", tokens=len(r.ids)))
