"""The ``head="topk"`` approximation of the steered LM-head loss (the default head).

Instead of the full softmax of every step, keep the base model's top candidates of each cached
position plus a second-order tail term (:class:`TopKStats`). They come out of the head pass
that the body pass runs anyway (:class:`TopKWriter`, fed by :func:`steerport.capture.cache_hidden`
batch by batch), so the fit needs no second pass over the data; steps then cost O(N·K·r + U·d·r)
(U: distinct candidates of the batch) instead of O(N·V·d). The final summary always uses the
exact head (:mod:`steerport.train.headloss`).

Example::

    stats = topk_stats(cache, lm.output_embeddings, lm.lm_head_bias, k=64)   # with the tail's covariance
    loss = topk_token_loss(stats, idx, u, B, lm.output_embeddings)     # (n,)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from steerport.capture import HiddenCache
from steerport.fileio import atomic_write_json
from steerport.train.headloss import vocab_chunk

# Rows of h per vocabulary sweep while computing statistics: with the head's chunks of CHUNK_ELEMENTS logits
# (headloss), 512 rows make 2,048-column blocks. On an Intel Xeon with AMX at 2 threads (2026-12-07, 1,024 real
# states, medians of 5 interleaved runs), 512 × 2,048 blocks took 0.79× (Gemma-3), 1.00× (Qwen2.5) and 1.02×
# (SmolLM2) of the sweep's time with the former 1,024 × 8,192.
ROWS_PER_CHUNK = 512
GROUP = 256  # columns per group whose maximum screens a chunk for new candidates (entries_above)
ROW_BLOCK = 256  # row counts are padded to a multiple of this
TAIL_SAMPLE = 256  # positions that estimate the tail's covariance (tail_covariance)
PENDING_PER_ROW = 8  # entries per row (on average) collected above the thresholds before a merge raises them


@dataclass
class TopKStats:
    """Per-token statistics of the *unsteered* head for ``head="topk"`` (computed once).

    For each cached position: ``ids`` (N, K) = the target followed by the K−1 highest other
    logits, ``z0`` (N, K) their base logits, ``log_tail`` (N,) = log Σ_{v ∉ ids} exp(z0_v) and
    ``e_tail`` (N, d) = Σ_{v ∉ ids} q_v e_v, the tail's probability-weighted mean embedding.
    The tail's logits shift by δ_v = u·(Bᵀ e_v), and the steered normaliser is approximated as::

        logsumexp_v z_v ≈ logsumexp( z0_ids + (E B)_ids u ,  log_tail + u·(Bᵀ e_tail) + ½ uᵀ Bᵀ Σ B u )

    exact on the K candidates and second order on the tail: log E_q[exp δ] ≈ E_q[δ] + ½ Var_q[δ].
    The first-order part alone is a lower bound (Jensen) that a growing steer learns to exploit:
    its held-out loss then reads better than the exact one (by 0.03 nats on SmolLM2 after 60 steps)
    and early stopping picks a steer that the exact head judges worse than none. The variance
    uses one within-tail covariance ``tail_cov`` Σ (d, d) shared by every position
    (:func:`tail_covariance`, from a sample of positions); None leaves the first-order form.
    The per-position tensors may be memory-mapped (:class:`TopKWriter`).
    """

    ids: torch.Tensor
    z0: torch.Tensor
    log_tail: torch.Tensor
    e_tail: torch.Tensor
    tail_cov: torch.Tensor | None = None

    def base_loss(self, idx: torch.Tensor) -> torch.Tensor:
        """The exact *unsteered* loss −log p(y) of positions ``idx`` (n,), free from the statistics."""
        z0 = self.z0[idx]
        return torch.logsumexp(torch.cat([z0, self.log_tail[idx][:, None]], 1), 1) - z0[:, 0]


def block_topk(z: torch.Tensor, k: int, blocks: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``z.topk(k, dim=1)`` of a wide z (n, c), found through strided blocks (same values).

    Columns j ≡ r (mod c // blocks) form block r. A value among a row's k largest lies in one of
    the k blocks with the largest maxima (each other block's maximum is beaten by k of them), so
    the top-k of those k·blocks columns is the top-k of the row. The block maxima are one
    vectorised pass; torch.topk then runs on k + k·blocks values per row instead of c.
    """
    n, c = z.shape
    width = c // blocks  # blocks of `blocks` columns each, strided by `width`
    if width < 4 * k:  # too few blocks to gain anything
        return z.topk(k, dim=1)
    body = width * blocks
    _, best_blocks = z[:, :body].view(n, blocks, width).amax(1).topk(k, dim=1)  # (n, k)
    cols = (best_blocks[:, :, None] + torch.arange(0, body, width)).view(n, k * blocks)
    if body < c:  # the last c mod blocks columns are candidates as they are
        cols = torch.cat([cols, torch.arange(body, c).expand(n, -1)], 1)
    v, j = z.gather(1, cols).topk(k, dim=1)
    return v, cols.gather(1, j)


def entries_above(z: torch.Tensor, t: torch.Tensor, groups: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rows, columns) of the entries of z (M, c) above their row's threshold t (M,), in row-major order.

    With ``groups`` (M, G), the maxima of z's G groups of c / G adjacent columns, only the groups
    whose maximum beats t are compared entry by entry (when few entries pass, a small part of z).
    """
    if groups is None:
        rows, cols = torch.nonzero(z > t[:, None], as_tuple=True)
        return rows, cols
    M, G = groups.shape
    zg = z.view(M, G, -1)
    g_row, g_col = torch.nonzero(groups > t[:, None], as_tuple=True)
    i, j = torch.nonzero(zg[g_row, g_col] > t[g_row, None], as_tuple=True)
    return g_row[i], g_col[i] * zg.shape[2] + j


def distinct(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``ids`` (any shape, values in [0, n)) in increasing order, and each
    entry's index into them (ids' shape), without sorting: one mark per possible value."""
    seen = torch.zeros(n, dtype=torch.bool, device=ids.device)
    seen[ids.flatten()] = True
    return torch.nonzero(seen).flatten(), (torch.cumsum(seen, 0) - 1)[ids]


def rows_weighted_sum(rows: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, E: torch.Tensor,
                      n_rows: int) -> torch.Tensor:
    """out[r] = Σ_{j: rows[j] = r} w[j] e_{ids[j]} (n_rows, d) in fp32, for entries rows, ids, w (n,).

    Only the distinct rows of E (V, d) named by ``ids`` are converted to fp32, and no (n, d)
    tensor is built (one embedding bag per output row).
    """
    order = torch.argsort(rows, stable=True)
    rows, ids = rows[order], ids[order]
    uniq, inv = distinct(ids, E.shape[0])
    counts = torch.bincount(rows, minlength=n_rows)
    offsets = torch.cumsum(counts, 0) - counts  # where each output row's bag starts
    return F.embedding_bag(inv, E[uniq].float(), offsets, mode="sum", per_sample_weights=w[order].float())


def first_candidates(z: torch.Tensor, top_v: torch.Tensor, top_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill each row's K−1 candidates (``top_v``, ``top_i`` (M, K−1), in place) from the first chunk z (M, c) of the
    vocabulary (a wide top-k); returns the (rows, token ids, logits) that entered."""
    best, chosen = block_topk(z, min(top_v.shape[1], z.shape[1]))
    top_v[:, : best.shape[1]], top_i[:, : best.shape[1]] = best, chosen
    rows = torch.arange(len(z))[:, None].expand_as(chosen).flatten()
    return rows, chosen.flatten(), best.flatten()


def merge_entries(top_v: torch.Tensor, top_i: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                  vals: torch.Tensor) -> None:
    """Merge entries (``rows``, token ``ids``, logits ``vals``, each (n,)) into the candidates (``top_v``, ``top_i``
    (M, K−1), in place): per row, a top-k over K−1 + that row's entries."""
    if not len(rows):
        return
    k1 = top_v.shape[1]
    order = torch.argsort(rows, stable=True)
    rows, ids, vals = rows[order], ids[order], vals[order]
    merge, counts = torch.unique_consecutive(rows, return_counts=True)
    slot = torch.arange(len(rows)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    at = (torch.repeat_interleave(torch.arange(len(merge)), counts), slot)
    new_v = torch.full((len(merge), int(counts.max())), -math.inf)
    new_i = torch.zeros(new_v.shape, dtype=torch.long)
    new_v[at], new_i[at] = vals, ids
    best, pick = torch.cat([top_v[merge], new_v], 1).topk(k1, dim=1)
    top_v[merge], top_i[merge] = best, torch.cat([top_i[merge], new_i], 1).gather(1, pick)


@torch.no_grad()
def rows_stats(h: torch.Tensor, y: torch.Tensor, E: torch.Tensor, bias: torch.Tensor | None,
               k: int, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`TopKStats` fields of the rows h (M, d) with targets y (M,): one sweep over E (V, d).

    The vocabulary is swept in chunks (``chunk`` columns; default
    :func:`~steerport.train.headloss.vocab_chunk`) with a running max m, top-(K−1), tail sum
    S = Σ exp(z_v − m) and tail accumulator Q = Σ exp(z_v − m) e_v, so the (M, V) logits never
    exist at once; the matmuls run in E's dtype and accumulate in fp32. The first chunk gives every
    row its K−1 best; after it, only the entries above a row's current (K−1)-th best can enter, and
    they are few (on SmolLM2, a handful per row and chunk after the first chunks: most of a large
    vocabulary is improbable), so they are found through column-group maxima
    (:func:`entries_above`) and collected; a top-k over K−1 + the collected values per row merges
    them into the candidates (:func:`merge_entries`) whenever ``PENDING_PER_ROW`` per row have
    gathered, which raises the thresholds, and at the end. (A merge at every chunk made the whole
    sweep 10–12 % slower on the catalog models: a dozen small operations per chunk.)

    The target and the tokens that may enter a row's candidates are *set aside* (left out of S and Q),
    so the low-precision products carry the tail alone; set-aside tokens that are not among the
    final candidates go back to the tail at the end, exactly. (Taking the candidates out of a
    sum over all tokens instead would cancel most of the bf16 product's digits when the tail is
    a small share of the mass.)
    """
    M, d = h.shape
    V = E.shape[0]
    k = min(k, V)
    hc, y = h.to(E.dtype), y.long()
    m = torch.full((M,), -math.inf)
    S = torch.zeros(M)
    Q = torch.zeros(M, d)
    top_v = torch.full((M, max(k - 1, 0)), -math.inf)
    top_i = torch.zeros((M, max(k - 1, 0)), dtype=torch.long)
    c = chunk or vocab_chunk(M, V)
    rows = torch.arange(M)
    zy = torch.zeros(M)  # the target's logit, read from the same matmul as the rest
    aside: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, token ids, logits) set aside
    merged, pending = 1, 0  # aside[:merged] are among the candidates (aside[0]: the first chunk's); entries after it
    for v0 in range(0, V, c):
        Ec = E[v0 : v0 + c]
        z = (hc @ Ec.T).float()  # (M, c)
        if bias is not None:
            z += bias[v0 : v0 + c].float()
        inside = (y >= v0) & (y < v0 + z.shape[1])
        r_in, c_in = rows[inside], y[inside] - v0
        zy[inside] = z[r_in, c_in]
        z[r_in, c_in] = -math.inf  # the target: neither another candidate nor tail
        groups = z.view(M, -1, GROUP).amax(2) if z.shape[1] % GROUP == 0 else None  # (M, c / GROUP)
        z_max = z.amax(1) if groups is None else groups.amax(1)
        m_new = torch.maximum(m, torch.where(inside, torch.maximum(z_max, zy), z_max))
        if k > 1:  # tokens that may enter a row's candidates are set aside (out of S and Q) until the end decides
            if v0 == 0:
                r_new, i_new, v_new = first_candidates(z, top_v, top_i)
            else:  # entries above a row's current (K−1)-th best: merged into the candidates now and then
                r_new, c_new = entries_above(z, top_v[:, -1], groups)
                i_new, v_new = c_new + v0, z[r_new, c_new]
                pending += len(r_new)
            aside.append((r_new, i_new, v_new))
            z[r_new, i_new - v0] = -math.inf
            if pending > PENDING_PER_ROW * M or (pending and v0 + c >= V):  # raises the thresholds
                merge_entries(top_v, top_i, *(torch.cat(t) for t in zip(*aside[merged:])))
                merged, pending = len(aside), 0
        scale = torch.exp(m - m_new)
        w = z.sub_(m_new[:, None]).exp_()  # in place: z is not needed any more
        S = S * scale + w.sum(1)
        Q = Q * scale[:, None] + (w.to(E.dtype) @ Ec).float()
        m = m_new
    ids = torch.cat([y[:, None], top_i], 1)  # (M, k), target first
    z0 = torch.cat([zy[:, None], top_v], 1)
    if aside:  # set-aside tokens that are not among the final candidates belong to the tail
        r_a, i_a, z_a = (torch.cat(t) for t in zip(*aside))
        back = ~torch.isin(r_a * V + i_a, (rows[:, None] * V + ids).flatten())
        r_a, i_a = r_a[back], i_a[back]
        w_a = torch.exp(z_a[back] - m[r_a])
        S = S.index_add(0, r_a, w_a)
        Q = Q + rows_weighted_sum(r_a, i_a, w_a, E, M)
    tail = S
    total = S + torch.exp(z0 - m[:, None]).sum(1)
    # a tail below 1e-5 of the normaliser (all of V among the candidates, or a near-certain token)
    # is noise: drop it (log_tail −inf, e_tail 0)
    small = tail <= 1e-5 * total
    tail = torch.where(small, torch.zeros_like(tail), tail)
    e_tail = torch.where(small[:, None], torch.zeros_like(Q), Q / torch.where(small, 1.0, tail)[:, None])
    return ids.int(), z0, m + torch.log(tail), e_tail


@torch.no_grad()
def topk_stats(cache: HiddenCache, E: torch.Tensor, bias: torch.Tensor | None, k: int,
               progress: Callable[[int], None] | None = None) -> TopKStats:
    """The statistics of a whole cache at once, in memory (the trainer uses :class:`TopKWriter`)."""
    writer = TopKWriter(cache.n_positions, cache.h.shape[1], k, E, bias, cache.h.dtype)
    writer.fill_missing(cache, progress)
    writer.add_tail_covariance(cache, torch.arange(cache.n_positions))
    return writer.stats


def spread(idx: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` entries of ``idx``, evenly spaced (all of them when there are fewer)."""
    if len(idx) <= n:
        return idx
    return idx[torch.linspace(0, len(idx) - 1, n).round().long()]


@torch.no_grad()
def tail_covariance(h: torch.Tensor, stats: TopKStats, pos: torch.Tensor, E: torch.Tensor, bias: torch.Tensor | None,
                    mass: float = 0.999, max_tokens: int = 16384) -> torch.Tensor:
    """Σ (d, d): the tails' covariance of output embeddings, averaged over the positions ``pos``.

    Σ = mean_p [ Σ_{v ∉ ids_p} q_pv e_v e_vᵀ − e_tail,p e_tail,pᵀ ], q_p the tail's own distribution
    at position p (states ``h`` (n, d) of those positions). One head sweep over the sample, in
    vocabulary chunks, gives a_v = Σ_p q_pv with q_pv = exp(z_pv − log_tail_p) (the statistics'
    tail mass, so no softmax over whole rows); the second moment uses the most probable tokens
    holding ``mass`` of Σ a (at most ``max_tokens``); the result is projected onto the positive
    semi-definite matrices. Positions whose tail was dropped (log_tail −inf) are left out; with
    none left, Σ = 0.
    """
    keep = torch.isfinite(stats.log_tail[pos])
    pos, h = pos[keep], h[keep]
    V, d = E.shape
    n = len(pos)
    if n == 0:
        return torch.zeros(d, d)
    hc, ids, log_tail = h.to(E.dtype), stats.ids[pos].long(), stats.log_tail[pos].float()
    a = torch.zeros(V)
    c = vocab_chunk(n, V)
    for v0 in range(0, V, c):
        z = (hc @ E[v0 : v0 + c].T).float()  # (n, c)
        if bias is not None:
            z += bias[v0 : v0 + c].float()
        r, j = torch.nonzero((ids >= v0) & (ids < v0 + z.shape[1]), as_tuple=True)
        z[r, ids[r, j] - v0] = -math.inf  # the candidates are not tail
        a[v0 : v0 + z.shape[1]] = z.sub_(log_tail[:, None]).exp_().sum(0)
    order = a.argsort(descending=True)
    cut = int(torch.searchsorted(a[order].cumsum(0), mass * float(a.sum()))) + 1
    top = order[: min(cut, max_tokens, V)]
    Et = E[top].float()
    e_tail = stats.e_tail[pos].float()
    cov = (Et.T * a[top]) @ Et / n - e_tail.T @ e_tail / n
    w, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    return (vecs * w.clamp_min(0)) @ vecs.T


class TopKWriter:
    """:class:`TopKStats` filled batch by batch while the body pass runs (``cache_hidden(observe=...)``).

    With a ``path`` (the work folder) the fields live in memory-mapped ``.npy`` files next to a
    small JSON that names the cache they belong to, plus a per-position ``done`` flag, so an
    interrupted pass resumes and memory does not grow with the data. Positions the pass did not
    see (statistics asked for after the cache was made) are filled by :meth:`fill_missing`.
    """

    def __init__(self, n: int, d: int, k: int, E: torch.Tensor, bias: torch.Tensor | None,
                 tail_dtype: torch.dtype, path: Path | None = None, key: str = ""):
        self.k, self.E, self.bias = min(k, E.shape[0]), E, bias
        shapes = {"ids": ((n, self.k), np.int32), "z0": ((n, self.k), np.float32), "log_tail": ((n,), np.float32),
                  "e_tail": ((n, d), {2: np.uint16, 4: np.float32}[torch.tensor([], dtype=tail_dtype).element_size()]),
                  "done": ((n,), np.uint8)}
        self.tail_dtype = tail_dtype
        self.path = path
        arrays: dict[str, np.ndarray] = {}
        reuse = False
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            meta = path / f"topk{k}.json"
            want = {"key": key, "k": self.k, "n": n, "d": d, "tail_dtype": str(tail_dtype)}
            try:
                reuse = json.loads(meta.read_text()) == want and all((path / f"topk{k}.{f}.npy").exists() for f in shapes)
            except (OSError, ValueError):
                reuse = False
            for f, (shape, dt) in shapes.items():
                file = path / f"topk{k}.{f}.npy"
                if reuse:
                    arrays[f] = np.load(file, mmap_mode="r+")
                else:
                    arrays[f] = np.lib.format.open_memmap(file, mode="w+", dtype=dt, shape=shape if n else (1, *shape[1:]))[:n]
            if not reuse:
                atomic_write_json(meta, want)
        else:
            arrays = {f: np.zeros(shape, dtype=dt) for f, (shape, dt) in shapes.items()}
        self.arrays = arrays
        t = {f: torch.from_numpy(a) for f, a in arrays.items()}
        self.done = t["done"]
        e_tail = t["e_tail"].view(tail_dtype) if tail_dtype != torch.float32 else t["e_tail"]
        self.stats = TopKStats(t["ids"], t["z0"], t["log_tail"], e_tail)

    def __call__(self, pos: torch.Tensor, h: torch.Tensor, targets: torch.Tensor) -> None:
        """Statistics of positions ``pos`` (M,) whose states are h (M, d), next tokens ``targets``."""
        for i in range(0, len(pos), ROWS_PER_CHUNK):
            p = pos[i : i + ROWS_PER_CHUNK]
            hp, yp = h[i : i + ROWS_PER_CHUNK], targets[i : i + ROWS_PER_CHUNK]
            pad = -len(p) % ROW_BLOCK  # a few fixed matmul shapes: oneDNN keeps a compiled kernel per shape, and
            if pad:  # one per batch length would make memory grow with the number of texts
                hp = torch.cat([hp, hp.new_zeros(pad, hp.shape[1])])
                yp = torch.cat([yp, yp.new_zeros(pad)])
            ids, z0, log_tail, e_tail = (t[: len(p)] for t in rows_stats(hp, yp, self.E, self.bias, self.k))
            self.stats.ids[p], self.stats.z0[p], self.stats.log_tail[p] = ids, z0, log_tail
            self.stats.e_tail[p] = e_tail.to(self.tail_dtype)
            self.done[p] = 1

    def add_tail_covariance(self, cache: HiddenCache, positions: torch.Tensor) -> None:
        """Set ``stats.tail_cov`` from at most TAIL_SAMPLE of ``positions``, evenly spaced (:func:`tail_covariance`)."""
        sample = spread(positions, TAIL_SAMPLE)
        self.stats.tail_cov = tail_covariance(cache.h[sample], self.stats, sample, self.E, self.bias)

    def flush(self) -> None:
        for a in self.arrays.values():
            if isinstance(a, np.memmap):
                a.flush()

    def fill_missing(self, cache: HiddenCache, progress: Callable[[int], None] | None = None) -> int:
        """Compute the statistics of every position not done yet (from the cache); returns how many."""
        missing = torch.nonzero(self.done == 0).flatten()
        for i in range(0, len(missing), ROWS_PER_CHUNK):
            p = missing[i : i + ROWS_PER_CHUNK]
            self(p, cache.h[p], cache.targets[p])
            if progress:
                progress(min(i + ROWS_PER_CHUNK, len(missing)))
        self.flush()
        return len(missing)


def topk_token_loss(stats: TopKStats, idx: torch.Tensor, u: torch.Tensor, B: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """Per-token loss under the :class:`TopKStats` approximation; u (n, R), B (d, R).

    Only the distinct candidate rows of E are multiplied by B (U·d·R, not V·d·R).
    """
    ids = stats.ids[idx].long()  # (n, K)
    uniq, inv = distinct(ids, E.shape[0])  # inv (n, K): rows of uniq
    EB = E.index_select(0, uniq).float() @ B.float()  # (U, R); index_select: faster than E[uniq] on CPU
    # F.embedding, not EB[inv]: its backward sums rows in a fixed order (indexing's uses atomic adds on
    # CPU, so the same run would give steers that differ in the last bits); bmm, not a product summed
    # over R: no (n, K, R) temporary
    z = stats.z0[idx] + torch.bmm(F.embedding(inv, EB), u.float()[:, :, None]).squeeze(2)  # (n, K)
    tail = stats.log_tail[idx] + (u * (stats.e_tail.index_select(0, idx).float() @ B.float())).sum(-1)  # (n,)
    if stats.tail_cov is not None:  # ½ Var_q[δ] = ½ uᵀ (Bᵀ Σ B) u
        tail = tail + 0.5 * ((u @ (B.float().T @ stats.tail_cov @ B.float())) * u).sum(-1)
    return torch.logsumexp(torch.cat([z, tail[:, None]], 1), 1) - z[:, 0]


# --------------------------------------------------------------------------- kept in the work folder


def stats_files(workdir: Path) -> list[Path]:
    """The statistics files of a work folder (any K)."""
    return sorted([*workdir.glob("topk*.npy"), *workdir.glob("topk*.json"), *workdir.glob("topk*.safetensors")])
