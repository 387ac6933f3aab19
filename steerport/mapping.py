"""Linear maps between two models' output-embedding spaces, their diagnostics, and mapping files.

With aligned rows ``X_s`` (n x d_s) and ``X_t`` (n x d_t) of the two output-embedding matrices
(same tokens, :mod:`steerport.vocab`), fit::

    H (d_s x d_t):  e_s ≈ H e_t,   i.e.  X_s ≈ X_t Hᵀ      (the paper's map; carries B)
    G (d_t x d_s):  e_t ≈ G e_s,   i.e.  X_t ≈ X_s Gᵀ      (fitted source->target map; carries A)

in closed form: ``lstsq`` (minimum-norm least squares), ``ridge`` (λ relative to the mean
diagonal of the Gram matrix) or ``procrustes`` (semi-orthogonal map times the best global
scale). Options: centering, unit-normalizing rows, Zipf-like frequency weighting or fitting
only on the ``top_k`` most frequent pairs (token id order is the frequency proxy). A random
``holdout`` share of pairs (10 %) is never fitted on; R², mean cosine and nearest-neighbour
retrieval accuracy are reported on it.

A mapping file is a safetensors file: tensors ``H``, ``G`` (and ``mean_src``/``mean_tgt`` when
centered) plus ``__metadata__["steerport.mapping"]``, a JSON document with both models' specs
and fingerprints, the method and options, pair counts, coverage and diagnostics. A mapping is
reused only when both fingerprints and the options match. Files written since steerport 0.1
also store the aligned token pairs (``pairs_tgt_mask``: a bit per target token id, set for the
aligned ones, least significant bit first; ``pairs_src_u24``: each pair's source id as three
little-endian bytes, in target-id order), so a reused mapping needs no vocabulary alignment;
files without them stay readable (the pairs are then aligned from the tokenizers).

Example::

    src, tgt = load_embeddings("smollm2-135m"), load_embeddings("gemma3-270m")
    m = fit_mapping(src, tgt, FitOptions(method="lstsq"))
    print(m.diagnostics["H"]["r2"]); m.save("smollm2__gemma3.safetensors")
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from steerport import __version__
from steerport.embeddings import ModelEmbeddings
from steerport.errors import SteerportError
from steerport.fileio import (
    read_json_safetensors,
    require_fields,
    write_json_safetensors,
)
from steerport.linmap import METHODS, LinearFit, fit_map, split_pairs
from steerport.vocab import Alignment, align_vocab

FORMAT = "steerport.mapping"
VERSION = 1
WEIGHTINGS = ("none", "zipf")
PAIR_TENSORS = ("pairs_tgt_mask", "pairs_src_u24")
CORE_FIELDS = ("format", "version", "source", "target", "method", "options", "n_pairs", "n_train", "n_heldout",
               "coverage", "alignment", "diagnostics")


@dataclass(frozen=True)
class FitOptions:
    """How a map is fitted. ``ridge`` is used by method ``ridge`` only."""

    method: str = "lstsq"
    ridge: float = 1e-2
    center: bool = False
    normalize: bool = False
    weighting: str = "none"
    top_k: int | None = None
    holdout: float = 0.1
    seed: int = 0
    diagnostic_rows: int = 5000  # training rows sampled for the train-side R² / cosine / NN accuracy

    def __post_init__(self):
        if self.method not in METHODS:
            raise SteerportError(f"unknown mapping method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.weighting not in WEIGHTINGS:
            raise SteerportError(f"unknown weighting {self.weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        if not 0 <= self.holdout < 1:
            raise SteerportError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.ridge < 0:
            raise SteerportError(f"ridge must be >= 0, got {self.ridge}")
        if self.top_k is not None and self.top_k < 1:
            raise SteerportError(f"top_k must be positive, got {self.top_k}")

    def to_dict(self) -> dict[str, Any]:
        """The options that decide the fitted maps (the file's ``options``; the cache key)."""
        d = asdict(self)
        d.pop("diagnostic_rows")  # changes only the reported train-side numbers
        if self.method != "ridge":
            d.pop("ridge")
        return d

    def key(self) -> str:
        """Short hash of the options (part of a cached mapping's name)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- the fit


def _prepare(X: torch.Tensor, normalize: bool) -> torch.Tensor:
    X = X.float()
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize else X


@dataclass
class Mapping:
    """A fitted pair of maps between a source and a target model's output-embedding spaces.

    H: (d_s, d_t) with e_s ≈ H e_t.  G: (d_t, d_s) with e_t ≈ G e_s.
    """

    H: torch.Tensor
    G: torch.Tensor
    source: dict[str, Any]  # spec, fingerprint, hidden_size, vocab_size
    target: dict[str, Any]
    options: FitOptions
    n_pairs: int
    n_train: int
    n_heldout: int
    alignment: dict[str, Any]
    diagnostics: dict[str, Any]  # {"H": {...}, "G": {...}}
    mean_src: torch.Tensor | None = None
    mean_tgt: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # aligned (src_ids, tgt_ids), (n,) int64 each, by target id

    # ---------------------------------------------------------------- checks

    def matches(self, src_fingerprint: str, tgt_fingerprint: str, options: FitOptions | None = None) -> bool:
        """True when this mapping was fitted for these two models (and these options, if given)."""
        same = self.source.get("fingerprint") == src_fingerprint and self.target.get("fingerprint") == tgt_fingerprint
        return same and (options is None or options.to_dict() == self.options.to_dict())

    def check(self, src_fingerprint: str, tgt_fingerprint: str, where: str = "mapping") -> None:
        """Refuse a stale mapping: one fitted for other weights/tokenizers than these."""
        for side, want, have in (("source", src_fingerprint, self.source), ("target", tgt_fingerprint, self.target)):
            if have.get("fingerprint") != want:
                raise SteerportError(
                    f"{where}: stale mapping: made for {side} {have.get('spec')!r} with fingerprint "
                    f"{have.get('fingerprint')}, but the {side} model now has fingerprint {want}; "
                    "refit it with steerport map (or drop --mapping to fit a fresh one)"
                )

    # ---------------------------------------------------------------- files

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION,
            "source": self.source, "target": self.target,
            "method": self.options.method, "options": self.options.to_dict(),
            "n_pairs": self.n_pairs, "n_train": self.n_train, "n_heldout": self.n_heldout,
            "coverage": {"src": self.alignment.get("coverage_src"), "tgt": self.alignment.get("coverage_tgt")},
            "alignment": self.alignment, "diagnostics": self.diagnostics, **self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as safetensors + JSON metadata."""
        tensors = {"H": self.H.float().contiguous(), "G": self.G.float().contiguous()}
        if self.mean_src is not None:
            if self.mean_tgt is None:
                raise SteerportError("mapping has mean_src but no mean_tgt; a centred map needs both means")
            tensors["mean_src"] = self.mean_src.float().contiguous()
            tensors["mean_tgt"] = self.mean_tgt.float().contiguous()
        if self.pairs is not None and (not len(self.pairs[0]) or int(self.pairs[0].max()) < 1 << 24):
            tensors.update(encode_pairs(*self.pairs, int(self.target["vocab_size"])))
        return write_json_safetensors(path, tensors, FORMAT, self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Mapping:
        """Read and validate a mapping file; problems become one-line SteerportErrors."""
        path = Path(path)
        if not path.is_file():
            raise SteerportError(f"{path}: no such mapping file")
        meta, tensors = read_json_safetensors(path, FORMAT, "a steerport mapping file")
        require_fields(path, meta, ("format", "version"), "mapping")
        if meta["format"] != FORMAT or not isinstance(meta["version"], int):
            raise SteerportError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta["version"] > VERSION:
            raise SteerportError(f"{path}: written by a newer steerport (mapping format {meta['version']})")
        require_fields(path, meta, CORE_FIELDS, "mapping")
        if "H" not in tensors or "G" not in tensors:
            raise SteerportError(f"{path}: mapping lacks tensor H or G")
        H, G = tensors["H"], tensors["G"]
        if not isinstance(meta["source"], dict) or not isinstance(meta["target"], dict):
            raise SteerportError(f"{path}: mapping metadata 'source' and 'target' must be JSON objects")
        ds, dt = meta["source"].get("hidden_size"), meta["target"].get("hidden_size")
        if tuple(H.shape) != (ds, dt) or tuple(G.shape) != (dt, ds):
            raise SteerportError(f"{path}: H is {tuple(H.shape)} and G is {tuple(G.shape)}, expected ({ds}, {dt}) and ({dt}, {ds})")
        if not (torch.isfinite(H).all() and torch.isfinite(G).all()):
            raise SteerportError(f"{path}: mapping contains NaN or infinite values")
        try:
            options = FitOptions(**meta["options"])
        except TypeError:
            raise SteerportError(f"{path}: unknown mapping options {meta['options']}") from None
        pairs = None
        if any(k in tensors for k in PAIR_TENSORS):
            pairs = decode_pairs(path, tensors, meta)
        return cls(H=H, G=G, source=meta["source"], target=meta["target"], options=options,
                   n_pairs=meta["n_pairs"], n_train=meta["n_train"], n_heldout=meta["n_heldout"],
                   alignment=meta["alignment"], diagnostics=meta["diagnostics"],
                   mean_src=tensors.get("mean_src"), mean_tgt=tensors.get("mean_tgt"),
                   meta={k: v for k, v in meta.items() if k not in CORE_FIELDS}, pairs=pairs)


def encode_pairs(src_ids: torch.Tensor, tgt_ids: torch.Tensor, tgt_vocab: int) -> dict[str, torch.Tensor]:
    """The aligned pairs as two uint8 tensors: a bit mask over target ids (ceil(V_t/8),) and the
    source ids as 3-byte little-endian integers (n, 3), in increasing target-id order.

    ~3 bytes a pair instead of 16; pairs must be sorted by strictly increasing target id (as
    :func:`steerport.vocab.align_vocab` returns them) and source ids below 2²⁴.
    """
    src, tgt = src_ids.long(), tgt_ids.long()
    if len(src) != len(tgt) or (len(tgt) > 1 and not bool((tgt[1:] > tgt[:-1]).all())):
        raise SteerportError("aligned pairs must be sorted by strictly increasing target id")
    if len(tgt) and (int(tgt[-1]) >= tgt_vocab or int(src.max()) >= 1 << 24 or int(min(src.min(), tgt[0])) < 0):
        raise SteerportError("aligned token ids out of range for the mapping's vocabularies")
    import numpy as np

    bits = np.zeros(tgt_vocab, dtype=np.uint8)
    bits[tgt.numpy()] = 1
    mask = torch.from_numpy(np.packbits(bits, bitorder="little"))  # (ceil(V_t/8),) uint8
    src_bytes = torch.stack([(src >> s) & 0xFF for s in (0, 8, 16)], 1).to(torch.uint8)  # (n, 3)
    return {"pairs_tgt_mask": mask, "pairs_src_u24": src_bytes}


def decode_pairs(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(src_ids, tgt_ids) from :func:`encode_pairs`' tensors, checked against the metadata (one-line errors)."""
    mask, src_bytes = tensors.get("pairs_tgt_mask"), tensors.get("pairs_src_u24")
    n, V_s, V_t = meta.get("n_pairs"), meta["source"].get("vocab_size"), meta["target"].get("vocab_size")
    ok = (mask is not None and src_bytes is not None and mask.dtype == torch.uint8 and src_bytes.dtype == torch.uint8
          and isinstance(V_s, int) and isinstance(V_t, int) and mask.dim() == 1 and len(mask) == -(-V_t // 8)
          and src_bytes.dim() == 2 and src_bytes.shape[1] == 3 and len(src_bytes) == n)
    if not ok:
        raise SteerportError(f"{path}: damaged aligned token pairs (pairs_tgt_mask / pairs_src_u24 do not fit the "
                             f"metadata's n_pairs and vocabulary sizes)")
    assert mask is not None and src_bytes is not None
    import numpy as np

    bits = np.unpackbits(mask.numpy(), count=V_t, bitorder="little")
    tgt = torch.from_numpy(np.flatnonzero(bits)).long()
    b = src_bytes.numpy().astype(np.int64)
    src = torch.from_numpy(b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16))
    if len(tgt) != n or (n and int(src.max()) >= V_s):
        raise SteerportError(f"{path}: damaged aligned token pairs ({len(tgt)} target ids for {n} pairs, or a source "
                             f"id beyond the source vocabulary of {V_s})")
    return src, tgt


def _fit_direction(X: torch.Tensor, Y: torch.Tensor, train: torch.Tensor, held: torch.Tensor,
                   options: FitOptions, weights: torch.Tensor | None) -> tuple[LinearFit, dict[str, Any]]:
    """One direction Y ≈ X M of a mapping on rows ``train``, with its diagnostics dict."""
    t0 = time.perf_counter()
    fit = fit_map(X, Y, method=options.method, ridge=options.ridge, center=options.center, weights=weights,
                  train_rows=train, held_rows=held, seed=options.seed, diagnostic_rows=options.diagnostic_rows)
    diag: dict[str, Any] = {"fit_seconds": round(time.perf_counter() - t0, 3), **fit.info, "train": fit.train}
    if fit.heldout:
        diag["heldout"] = fit.heldout
    return fit, diag


def _side(emb: ModelEmbeddings, convention: str) -> dict[str, Any]:
    return {"spec": emb.spec, "fingerprint": emb.fingerprint, "hidden_size": emb.hidden_size,
            "vocab_size": int(emb.embeddings.shape[0]), "convention": convention}


def fit_mapping(src: ModelEmbeddings, tgt: ModelEmbeddings, options: FitOptions = FitOptions(), *,
                alignment: Alignment | None = None) -> Mapping:
    """Align the vocabularies, fit H and G, and measure them on held-out pairs."""
    t0 = time.perf_counter()
    al = alignment if alignment is not None else align_vocab(src.tokenizer, tgt.tokenizer)
    t_align = time.perf_counter() - t0
    if al.n < 2:
        raise SteerportError(f"{src.spec} and {tgt.spec} share only {al.n} tokens after normalization; cannot fit a map")
    Xs = _prepare(src.embeddings[al.src_ids], options.normalize)  # (n, d_s)
    Xt = _prepare(tgt.embeddings[al.tgt_ids], options.normalize)  # (n, d_t)
    for emb, X in ((src, Xs), (tgt, Xt)):
        if not bool(torch.isfinite(X).all()):
            raise SteerportError(f"{emb.spec}: its output embeddings contain NaN or infinite values; cannot fit a map")
    train, held = split_pairs(al.n, options.holdout, options.seed)
    rank = al.frequency_rank()
    if options.top_k is not None:
        train = train[rank[train].argsort()[: options.top_k]].sort().values
    weights = (rank.double() + 1).rsqrt() if options.weighting == "zipf" else None
    fH = _fit_direction(Xt, Xs, train, held, options, weights)  # X_s ≈ X_t M, H = Mᵀ
    fG = _fit_direction(Xs, Xt, train, held, options, weights)  # X_t ≈ X_s M, G = Mᵀ
    return Mapping(
        H=fH[0].M.T.contiguous(), G=fG[0].M.T.contiguous(),
        source=_side(src, al.src.convention), target=_side(tgt, al.tgt.convention),
        options=options, n_pairs=al.n, n_train=len(train), n_heldout=len(held),
        alignment=al.report(), diagnostics={"H": fH[1], "G": fG[1]},
        mean_src=fH[0].mu_y, mean_tgt=fH[0].mu_x,
        meta={"align_seconds": round(t_align, 3), "total_seconds": round(time.perf_counter() - t0, 3),
              "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "steerport_version": __version__},
        pairs=(al.src_ids, al.tgt_ids),
    )



# --------------------------------------------------------------------------- finding / reusing


def cache_path(src_fingerprint: str, tgt_fingerprint: str, options: FitOptions) -> Path:
    """Where an automatically fitted mapping is cached: keyed by both fingerprints and the options."""
    from steerport.catalog import steerport_home

    return steerport_home() / "mappings" / f"{src_fingerprint}_{tgt_fingerprint}_{options.key()}.safetensors"


def shipped_dir() -> Path:
    """The mapping files made for the offline catalog, shipped inside the package (``steerport/mappings``)."""
    return Path(__file__).resolve().parent / "mappings"


def shipped_name(src_spec: str, tgt_spec: str) -> str:
    return f"{src_spec}__{tgt_spec}.safetensors"


class ModelId(Protocol):
    """What finding a mapping needs of a model (:class:`~steerport.embeddings.ModelEmbeddings`, :class:`~steerport.headfile.HeadFile`)."""

    spec: str
    fingerprint: str


def find_mapping(src: ModelId, tgt: ModelId, options: FitOptions = FitOptions(), *,
                 path: str | os.PathLike | None = None, log: Callable[[str], None] = lambda msg: None
                 ) -> tuple[Mapping, str] | None:
    """A fresh mapping for (src, tgt, options) that can be reused, with where it came from; None if one must be fitted.

    ``path`` given: its mapping when the file exists (a stale one is refused: SteerportError), else None.
    ``path`` None: the cache, then the shipped ``mappings/``; stale or differently-fitted files are skipped.
    Needs only the models' specs and fingerprints.
    """
    if path is not None:
        path = Path(path)
        if not path.exists():
            return None
        m = Mapping.load(path)
        m.check(src.fingerprint, tgt.fingerprint, where=str(path))
        return m, f"reused {path}"
    for cand in (cache_path(src.fingerprint, tgt.fingerprint, options), shipped_dir() / shipped_name(src.spec, tgt.spec)):
        if not cand.is_file():
            continue
        try:
            m = Mapping.load(cand)
        except SteerportError as e:
            log(f"ignoring unreadable mapping {e}")
            continue
        if m.matches(src.fingerprint, tgt.fingerprint, options):
            return m, f"reused {cand}"
        if not m.matches(src.fingerprint, tgt.fingerprint):
            log(f"{cand} is stale (made for other weights or tokenizer); fitting a fresh mapping")
    return None


def fit_and_save(src: ModelEmbeddings, tgt: ModelEmbeddings, options: FitOptions = FitOptions(), *,
                 path: str | os.PathLike | None = None, alignment: Alignment | None = None) -> tuple[Mapping, str]:
    """Fit a mapping and save it to ``path`` (None: the cache); returns (mapping, where it went)."""
    m = fit_mapping(src, tgt, options, alignment=alignment)
    if path is not None:
        m.save(path)
        return m, f"fitted, saved to {path}"
    dest = cache_path(src.fingerprint, tgt.fingerprint, options)
    m.save(dest)
    return m, f"fitted, cached at {dest}"


def get_mapping(src: ModelEmbeddings, tgt: ModelEmbeddings, options: FitOptions = FitOptions(), *,
                path: str | os.PathLike | None = None, refit: bool = False,
                log: Callable[[str], None] = lambda msg: None,
                alignment: Alignment | None = None) -> tuple[Mapping, str]:
    """The mapping for (src, tgt, options): reused when fresh, otherwise fitted and saved.

    ``path`` given: reuse it if it matches; if it is stale (fingerprints differ), refuse
    (SteerportError). ``path`` None: look in the cache and in the shipped ``mappings/``; a stale
    or differently-fitted file there is ignored and a fresh mapping is fitted into the cache.
    Returns (mapping, where it came from).
    """
    found = None if refit else find_mapping(src, tgt, options, path=path, log=log)
    if found is not None:
        return found
    return fit_and_save(src, tgt, options, path=path, alignment=alignment)
