"""Cross-tokenizer vocabulary alignment: pair tokens of two tokenizers by surface string.

Token ids never agree across tokenizer families, and even the stored token strings differ:
byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM) writes each byte as a printable character
(``Ġ`` = space, ``Ċ`` = newline, via GPT-2's byte-to-unicode table), SentencePiece (Gemma,
Llama-2) writes a space as ``▁`` and raw bytes as ``<0xNN>``, WordPiece (BERT) marks word
continuations with ``##``. :func:`surface` turns each token into the bytes it stands for in
text, so ``Ġthe``, ``▁the`` and ``the`` (WordPiece, word-initial) all become ``b" the"``.
Special, control and unused tokens (``<|endoftext|>``, ``<unused12>``, ``[CLS]``, ...) are
dropped: they have no surface.

Example::

    al = align_vocab(src_tokenizer, tgt_tokenizer)
    print(al.n, al.coverage_src, al.coverage_tgt)   # e.g. 46117 pairs between SmolLM2 and Gemma-3
    E_s[al.src_ids], E_t[al.tgt_ids]                 # aligned output-embedding rows
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

BYTE_LEVEL = "byte-level"
SENTENCEPIECE = "sentencepiece"
WORDPIECE = "wordpiece"
PLAIN = "plain"
CONVENTIONS = (BYTE_LEVEL, SENTENCEPIECE, WORDPIECE, PLAIN)

SP_SPACE = "\u2581"  # ▁
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Token strings that name a control/special/unused slot rather than text.
_CONTROL = re.compile(
    r"^(<\|[^\s]*\|>"  # <|endoftext|>, <|im_start|>, <|fim_prefix|>
    r"|<unused-?\d+>|\[unused\d+\]|<extra_id_\d+>|<mask_\d+>"
    r"|<(pad|eos|bos|unk|mask|s|/s|cls|sep)>|\[(PAD|UNK|CLS|SEP|MASK|BOS|EOS)\]"
    r"|<(start|end)_of_[a-z_]+>|\[multimodal\]|\[@[A-Z]+@\])$",
    re.IGNORECASE,
)


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level table inverted: printable character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _backend_json(tokenizer) -> dict:
    """The fast tokenizer's JSON description, or {} when there is none (then the vocabulary decides).

    A backend with custom Python components (``PreTokenizer.custom(...)``) cannot be serialized:
    ``tokenizers`` raises a bare ``Exception`` ("Custom PreTokenizer cannot be serialized") for
    that, and only that exact type is taken as "no description"; anything else propagates.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}
    try:
        text = backend.to_str()
    except Exception as e:  # the bare type tokenizers raises; any subclass is re-raised below
        if type(e) is not Exception:
            raise
        return {}
    return json.loads(text)


def detect_convention(tokenizer) -> str:
    """Which surface convention a tokenizer's vocabulary uses: one of :data:`CONVENTIONS`.

    Reads the fast tokenizer's model/pre-tokenizer/decoder description where there is one
    (WordPiece model; ByteLevel pre-tokenizer or decoder; Metaspace / ``▁`` replace /
    ByteFallback decoder), else counts marker characters in the vocabulary.
    """
    spec = _backend_json(tokenizer)
    model_type = (spec.get("model") or {}).get("type")
    text = json.dumps({k: spec.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")})
    if model_type == "WordPiece":
        return WORDPIECE
    if '"ByteLevel"' in text:
        return BYTE_LEVEL
    if '"Metaspace"' in text or SP_SPACE in text or '"ByteFallback"' in text:
        return SENTENCEPIECE
    vocab = tokenizer.get_vocab()
    counts = {
        BYTE_LEVEL: sum(t.startswith("Ġ") for t in vocab),
        SENTENCEPIECE: sum(t.startswith(SP_SPACE) for t in vocab),
        WORDPIECE: sum(t.startswith("##") for t in vocab),
    }
    best = max(counts, key=lambda k: counts[k])
    return best if counts[best] >= max(10, len(vocab) // 100) else PLAIN


def surface(token: str, convention: str, *, literal: bool = False) -> bytes | None:
    """The bytes a token stands for in text, or None if it has none (control token, empty).

    ``literal`` marks added tokens, whose stored string is the text itself in every convention.
    """
    if not token or _CONTROL.match(token):
        return None
    if literal or convention == PLAIN:
        return token.encode("utf-8")
    if convention == BYTE_LEVEL:
        table = byte_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode("utf-8")  # not byte-encoded (e.g. a merged-in literal): take it as text
    if convention == SENTENCEPIECE:
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace(SP_SPACE, " ").encode("utf-8")
    if convention == WORDPIECE:
        # "##ing" continues a word; a word-initial piece follows a space in running text
        return token[2:].encode("utf-8") if token.startswith("##") and len(token) > 2 else b" " + token.encode("utf-8")
    raise ValueError(f"unknown convention {convention!r}")


@dataclass
class Surfaces:
    """One tokenizer's vocabulary as surface bytes -> token id, with what was dropped and why."""

    convention: str
    vocab_size: int
    by_surface: dict[bytes, int]
    dropped_special: int = 0
    dropped_empty: int = 0
    duplicates: int = 0  # tokens whose surface another token already has (kept one; see surfaces())


def special_ids(tokenizer) -> set[int]:
    """Ids of special tokens: declared special, special added tokens, and control-looking names."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def surfaces(tokenizer) -> Surfaces:
    """Map each ordinary token of ``tokenizer`` to its surface bytes.

    When two tokens share a surface (SentencePiece's ``▁`` and ``<0x20>``), the ordinary piece
    wins over a byte-fallback piece, then the lower id (the more frequent merge/piece).
    """
    convention = detect_convention(tokenizer)
    vocab = tokenizer.get_vocab()
    added = {tok.content for tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()}
    specials = special_ids(tokenizer)
    out = Surfaces(convention, len(vocab), {})
    fallback: dict[bytes, bool] = {}
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if i in specials:
            out.dropped_special += 1
            continue
        s = surface(token, convention, literal=token in added)
        if s is None:
            if token:
                out.dropped_special += 1
            else:
                out.dropped_empty += 1
            continue
        is_fallback = convention == SENTENCEPIECE and bool(_BYTE_FALLBACK.match(token))
        if s in out.by_surface:
            out.duplicates += 1
            if fallback[s] and not is_fallback:
                out.by_surface[s], fallback[s] = i, False
            continue
        out.by_surface[s], fallback[s] = i, is_fallback
    return out


@dataclass
class Alignment:
    """Aligned token pairs of a source and a target tokenizer, sorted by target id.

    ``src_ids[k]`` and ``tgt_ids[k]`` are the same surface string ``surface_strings[k]``.
    """

    src_ids: torch.Tensor  # (n,) int64
    tgt_ids: torch.Tensor  # (n,) int64
    surface_strings: list[bytes]
    src: Surfaces = field(repr=False)
    tgt: Surfaces = field(repr=False)
    raw_matches: int = 0  # pairs an exact match of stored token strings would find

    @property
    def n(self) -> int:
        return len(self.surface_strings)

    @property
    def coverage_src(self) -> float:
        return self.n / max(self.src.vocab_size, 1)

    @property
    def coverage_tgt(self) -> float:
        return self.n / max(self.tgt.vocab_size, 1)

    def report(self) -> dict:
        """Coverage and bookkeeping as plain JSON-able numbers."""
        side = lambda s: {
            "convention": s.convention, "vocab_size": s.vocab_size, "usable_tokens": len(s.by_surface),
            "dropped_special": s.dropped_special, "duplicate_surfaces": s.duplicates,
        }
        return {
            "pairs": self.n, "raw_string_matches": self.raw_matches,
            "coverage_src": round(self.coverage_src, 4), "coverage_tgt": round(self.coverage_tgt, 4),
            "source": side(self.src), "target": side(self.tgt),
        }

    def frequency_rank(self) -> torch.Tensor:
        """A frequency proxy per pair: max of the two ids' ranks among aligned tokens (low = frequent).

        BPE merges and SentencePiece pieces are numbered roughly by corpus frequency, so an
        id is a usable frequency rank when no token counts are at hand.
        """
        rs = torch.empty_like(self.src_ids)
        rs[self.src_ids.argsort()] = torch.arange(self.n)
        rt = torch.empty_like(self.tgt_ids)
        rt[self.tgt_ids.argsort()] = torch.arange(self.n)
        return torch.maximum(rs, rt)


def align_vocab(src_tokenizer, tgt_tokenizer) -> Alignment:
    """Pair the tokens of two tokenizers whose normalized surfaces are equal."""
    s, t = surfaces(src_tokenizer), surfaces(tgt_tokenizer)
    shared = sorted(set(s.by_surface) & set(t.by_surface), key=lambda b: t.by_surface[b])
    src_vocab = src_tokenizer.get_vocab()
    raw = sum(1 for tok in tgt_tokenizer.get_vocab() if tok in src_vocab)
    return Alignment(
        src_ids=torch.tensor([s.by_surface[b] for b in shared], dtype=torch.long),
        tgt_ids=torch.tensor([t.by_surface[b] for b in shared], dtype=torch.long),
        surface_strings=shared, src=s, tgt=t, raw_matches=raw,
    )


def raw_shared_tokens(src_tokenizer, tgt_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor code's alignment: identical stored token strings, in the target vocabulary's
    iteration order (``[v for v in to_tokenizer.vocab if v in from_vocab]``).

    The anchor ran on GPT-2-family slow tokenizers, whose ``vocab`` dict follows vocab.json, i.e.
    token-id order; a fast tokenizer's ``get_vocab()`` order is arbitrary (it varies between
    calls), so we use target-id order, which reproduces the anchor's list.
    Returns (src_ids, tgt_ids). No normalization and no special-token filtering, as in the anchor.
    """
    src_vocab = src_tokenizer.get_vocab()
    shared = [tok for tok, _ in sorted(tgt_tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if tok in src_vocab]
    tgt_vocab = tgt_tokenizer.get_vocab()
    return (torch.tensor([src_vocab[v] for v in shared], dtype=torch.long),
            torch.tensor([tgt_vocab[v] for v in shared], dtype=torch.long))
