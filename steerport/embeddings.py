"""A model's output embeddings and tokenizer without loading the model: all that mapping and transfer need.

:func:`load_embeddings` reads only the LM head's tensor (and bias) from the model's files
(:func:`locate_head` finds it in a local directory, the offline catalog or the hub);
a model whose files do not name it is loaded whole instead.

Example::

    e = load_embeddings("gemma3-270m")
    e.embeddings.shape          # (V, d)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steerport.errors import SteerportError
from steerport.models import LoadedModel, _local_or_hub, fingerprint, resolve_spec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class ModelEmbeddings:
    """Just the output embeddings and tokenizer of a model: all that mapping and transfer need."""

    spec: str
    embeddings: torch.Tensor  # (V, d) float32
    tokenizer: PreTrainedTokenizerBase
    bias: torch.Tensor | None = None  # (V,) or None
    fingerprint: str = field(default="")

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.embeddings, self.tokenizer.get_vocab())

    @property
    def hidden_size(self) -> int:
        return self.embeddings.shape[1]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Output-embedding rows ``ids`` (k,) -> (k, d) float32 (the interface :class:`steerport.headfile.HeadFile` shares)."""
        return self.embeddings[ids]

    def full(self) -> ModelEmbeddings:
        """Itself: the embeddings and tokenizer are already loaded."""
        return self

    @classmethod
    def from_loaded(cls, lm: LoadedModel) -> ModelEmbeddings:
        bias = lm.lm_head_bias
        return cls(
            spec=lm.spec,
            embeddings=lm.output_embeddings.detach().float().cpu(),
            tokenizer=lm.tokenizer,
            bias=None if bias is None else bias.detach().float().cpu(),
            fingerprint=lm.fingerprint,
        )


def _head_tensor_names(config) -> tuple[list[str], list[str]]:
    """Names of the output-embedding weight (and bias) in this architecture's state dict.

    Builds the model on the meta device (no memory, no weights) and asks it for its output
    embeddings, so it works for any architecture transformers knows.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    weights = [f"{names[id(head)]}.weight"]
    biases = [f"{names[id(head)]}.bias"] if getattr(head, "bias", None) is not None else []
    inp = model.get_input_embeddings()
    if inp is not None and inp.weight is head.weight:  # tied: the checkpoint may store only the input side
        weights.append(f"{names[id(inp)]}.weight")
    return weights, biases


# Checkpoint names that transformers renames on load (e.g. GPT-NeoX stores ``embed_out``).
LEGACY_NAMES = {"lm_head.weight": ["embed_out.weight"], "lm_head.bias": ["embed_out.bias"]}


def _find_key(keys: list[str], candidates: list[str]) -> str | None:
    """The checkpoint key matching a candidate exactly, else by dotted suffix either way."""
    candidates = candidates + [old for c in candidates for old in LEGACY_NAMES.get(c, [])]
    for c in candidates:
        if c in keys:
            return c
    for c in candidates:
        parts = c.split(".")
        for i in range(1, len(parts) - 1):
            tail = ".".join(parts[i:])
            hits = [k for k in keys if k == tail or k.endswith("." + tail)]
            if len(hits) == 1:
                return hits[0]
    return None


def _fetch(where: str, filename: str, hub: bool) -> Path | None:
    if not hub:
        p = Path(where) / filename
        return p if p.exists() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(where, filename))
    except EntryNotFoundError:
        return None


@dataclass
class HeadLocation:
    """Where a model's output embedding (and LM-head bias) is stored: safetensors file and key each.

    ``weight`` is None when the checkpoint has no safetensors (an old pickled checkpoint).
    """

    spec: str
    where: str  # local directory or hub id
    hub: bool
    tokenizer: PreTrainedTokenizerBase
    weight: tuple[Path, str] | None  # (safetensors file, tensor key)
    bias: tuple[Path, str] | None


def locate_head(spec: str) -> HeadLocation:
    """Find the safetensors file and key of the output embedding (and bias), and load the tokenizer."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    resolved = resolve_spec(spec)
    where = _local_or_hub(resolved)
    hub = resolved.kind == "hub"
    try:
        config = AutoConfig.from_pretrained(where)
        tokenizer = AutoTokenizer.from_pretrained(where)
        index = _fetch(where, "model.safetensors.index.json", hub)
        if index is not None:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            single = _fetch(where, "model.safetensors", hub)
            if single is None:  # no safetensors (old pickled checkpoint): only a full load reads it
                return HeadLocation(spec, where, hub, tokenizer, None, None)
            with safe_open(str(single), "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    except OSError as e:
        raise SteerportError(f"could not read model {spec!r} from {where}: {str(e).splitlines()[0]}") from None

    weight_names, bias_names = _head_tensor_names(config)
    keys = list(weight_map)
    wkey = _find_key(keys, weight_names)
    if wkey is None:
        raise SteerportError(f"{spec}: cannot find the output embedding ({weight_names[0]}) in the checkpoint")
    bkey = _find_key(keys, bias_names) if bias_names else None

    def shard(key: str) -> tuple[Path, str]:
        path = _fetch(where, weight_map[key], hub)
        if path is None:
            raise SteerportError(f"{spec}: the checkpoint index names {weight_map[key]} but there is no such file")
        return path, key

    return HeadLocation(spec, where, hub, tokenizer, shard(wkey), shard(bkey) if bkey else None)


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, as float32."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key).float()


def load_embeddings(spec: str) -> ModelEmbeddings:
    """Read only the output embeddings (and LM-head bias) and the tokenizer of a model.

    Reads the one safetensors shard that holds the LM head instead of building the whole
    network: seconds instead of minutes for a 6B model.
    """
    loc = locate_head(spec)
    if loc.weight is None:  # no safetensors (old pickled checkpoint): load the model the slow way
        from steerport.models import load_model  # looked up at call time (tests replace it)

        return ModelEmbeddings.from_loaded(load_model(spec))
    return ModelEmbeddings(spec=spec, embeddings=read_tensor(*loc.weight), tokenizer=loc.tokenizer,
                           bias=read_tensor(*loc.bias) if loc.bias else None)
