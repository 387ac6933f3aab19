"""Fold steers at fixed values into the LM head and save a plain Hugging Face checkpoint.

A merged checkpoint runs the steered model at zero runtime cost in any engine that reads
HF checkpoints (transformers, vLLM, llama.cpp after conversion, ...).

The math, for output embeddings E (V x d) and hidden state h (d)::

    LM-Steer    z' = E (h + Σ s ε₀ B (Aᵀ h))        = E' h,   E' = E (I + Σ s ε₀ W)ᵀ
                                                           = E + Σ s ε₀ (E B) Aᵀ     (V x r · r x d)
    token-prob  z'_k = z_k + s ε₀ δ_k · h          ->  E'[k] += s ε₀ δ_k         (k x d)

The bias b (if any) is kept: z' = E' h + b. When the input and output embeddings were
tied, the output side gets its own copy (``tie_word_embeddings = False``) so the input
embeddings stay untouched. With both kinds, the hooks apply the token-prob shift to the
LM-Steer-shifted h, so the fold is E' = (E + D)(I + Σ s ε₀ W)ᵀ, D holding the δ rows.

ActAdd steers add a vector to the residual stream inside the network, not at the head:
front-position ActAdd acts only at the first prompt positions, which no weight can do, and
is refused; all-positions ActAdd (one layer or several, e.g. an imported llama.cpp control
vector) is refused too (folding it would need a bias on the previous layer's last residual
write, which most architectures lack); export it as a llama.cpp control vector instead
(``steerport export-cvec``).

Example::

    lm = load_model("smollm2-135m")
    merge_into_model(lm, [(Steer.load("pos.st"), 5.0)])        # edits lm.model in place
    save_merged(lm, "smollm2-pos5", card=model_card(...))        # or all at once, verified: merge_to_dir(...)
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from steerport import __version__
from steerport.errors import SteerportError
from steerport.fileio import atomic_directory
from steerport.hooks import SteerValue, check_compatible, steered
from steerport.kinds import get_kind
from steerport.models import LoadedModel, fingerprint
from steerport.steer import Steer

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class MergeRecord:
    """What was folded: one entry per steer, for the model card."""

    path: str
    kind: str
    value: float
    epsilon: float
    scale: float  # value * epsilon
    positive: str
    steer_fingerprint: str
    made_for: dict


def check_foldable(steer: Steer, name: str = "steer") -> None:
    """Raise a clear SteerportError for steers that cannot be folded into the head."""
    kind = get_kind(steer.kind)
    if kind.fold is not None:
        return
    why = kind.fold_refusal(steer) if kind.fold_refusal else f"steers of kind {steer.kind!r} cannot be folded into a checkpoint"
    raise SteerportError(f"{name}: {why}")


def _output_is_tied(model: PreTrainedModel) -> bool:
    inp, head = model.get_input_embeddings(), model.get_output_embeddings()
    return inp is not None and inp.weight is head.weight


def _set_untied(model: PreTrainedModel) -> None:
    """Record in the config (and the text sub-config) that input and output embeddings differ."""
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for config in configs:
        config.tie_word_embeddings = False


@torch.no_grad()
def merged_head(lm: LoadedModel, steers: Sequence[SteerValue], *, include_domain: bool = False) -> torch.Tensor:
    """E' (V x d, float32): the output embeddings with the steers folded in (model untouched).

    Kinds fold in their ``fold_order`` (token-prob rows first, then the LM-Steer map acts on all
    rows), matching the hooks, where the token-prob shift δ·h sees the LM-Steer-shifted h.
    """
    E = lm.output_embeddings.detach().float()  # (V, d)
    by_kind: dict[str, list[SteerValue]] = {}
    for steer, value in steers:
        check_foldable(steer)
        by_kind.setdefault(steer.kind, []).append((steer, value))
    for name in sorted(by_kind, key=lambda k: get_kind(k).fold_order):
        group = by_kind[name]
        fold = get_kind(name).fold
        assert fold is not None  # check_foldable above
        E = fold(E, [s for s, _ in group], torch.tensor([v for _, v in group], dtype=torch.float32),
                 include_domain=include_domain)
    return E


def merge_into_model(
    lm: LoadedModel, steers: Sequence[SteerValue], *, force: bool = False, include_domain: bool = False
) -> LoadedModel:
    """Fold the steers into ``lm``'s LM head in place (untying it from the input embeddings)."""
    if not steers:
        raise SteerportError("nothing to merge: give at least one --steer FILE.st:VALUE")
    for steer, _ in steers:
        check_foldable(steer)
        check_compatible(lm, steer, force=force)
    head = lm.lm_head
    new = merged_head(lm, steers, include_domain=include_domain).to(lm.dtype)  # lm.dtype: the head weight's dtype
    if _output_is_tied(lm.model):
        _set_untied(lm.model)
    head.weight = nn.Parameter(new, requires_grad=False)  # a new tensor: the input side keeps the old one
    lm.__dict__.pop("fingerprint", None)  # cached_property: the head changed
    return lm


def _head_bias_survives(lm: LoadedModel) -> bool:
    """Whether this architecture's class has an LM-head bias slot (so a saved bias reloads)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(lm.model.config)
    return getattr(fresh.get_output_embeddings(), "bias", None) is not None


def model_card(base: LoadedModel, records: list[MergeRecord], base_fingerprint: str, new_fingerprint: str, untied: bool) -> str:
    """README.md for the merged checkpoint: what was folded, at which values, from which files."""

    lines = [
        "---",
        "library_name: transformers",
        "tags: [steerport, lm-steer, merged-steer]",
        "---",
        "",
        f"# {base.spec} with steers merged into the LM head",
        "",
        (f"Made by steerport {__version__} on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}. "
        "The steers below were folded into the output embeddings at fixed values "
        "(E' = E (I + Σ s ε₀ W)ᵀ for LM-Steer; token-prob rows += s ε₀ δ), so this checkpoint "
        "behaves like the base model with the steers applied, at no runtime cost. "
        "Load it with `AutoModelForCausalLM.from_pretrained`."),
        "",
        f"- base model: `{base.spec}` (fingerprint `{base_fingerprint}`)",
        f"- merged output-embedding fingerprint: `{new_fingerprint}`",
        "- input/output embeddings: "
        + ("untied by the merge (the input embeddings are the base model’s)" if untied else "as in the base model"),
        "",
        "| steer file | kind | what + means | value s | ε₀ | s·ε₀ | steer fingerprint | made for |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        made = f"{r.made_for.get('spec', '?')} ({r.made_for.get('fingerprint', '?')})"
        lines.append(
            f"| `{r.path}` | {r.kind} | {r.positive or '?'} | {r.value:g} | {r.epsilon:g} | {r.scale:g} | "
            f"`{r.steer_fingerprint}` | {made} |"
        )
    doc = {
        "base": {"spec": base.spec, "fingerprint": base_fingerprint},
        "fingerprint": new_fingerprint,
        "untied": untied,
        "steers": [r.__dict__ for r in records],
    }
    lines += ["", "Machine-readable record:", "", "```json", json.dumps(doc, indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)


def _write_checkpoint(lm: LoadedModel, folder: Path, card: str) -> None:
    """Model, tokenizer and README.md into ``folder``."""
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(card, encoding="utf-8")


def _check_destination(lm: LoadedModel, out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SteerportError(f"{out}: directory exists and is not empty (pass --overwrite to replace it)")
    if lm.lm_head_bias is not None and not _head_bias_survives(lm):
        raise SteerportError(
            f"{lm.spec}: the LM head has a bias but the {type(lm.model).__name__} checkpoint format has no slot "
            "for it, so the merged checkpoint would lose it"
        )


def save_merged(
    lm: LoadedModel,
    out: str | os.PathLike,
    *,
    card: str,
    overwrite: bool = False,
) -> Path:
    """Save ``lm`` (model + tokenizer + README.md) as a standard HF directory, atomically
    (:func:`steerport.fileio.atomic_directory`: built beside ``out``, renamed into place)."""
    out = Path(out)
    _check_destination(lm, out, overwrite)
    with atomic_directory(out, replace=True) as tmp:
        _write_checkpoint(lm, tmp, card)
    return out


def default_tolerance(dtype: torch.dtype) -> float:
    """The largest max |logit difference| a verified merge may show in ``dtype``.

    In float32 the folded head differs from the hook only by summation order (1e-3 is far above
    that). In half precision (bfloat16 / float16, e.g. ``--dtype auto`` on a GPU or a CPU with
    fast bf16) the folded head E' is rounded to 8 (bf16) or 11 (fp16) mantissa bits once, where
    the hook rounds h + ε B Aᵀh instead; on logits of size ~10-30 that rounding moves a logit by
    up to ~0.1, so 0.25 separates rounding from a wrong fold.
    """
    return 1e-3 if dtype == torch.float32 else 0.25


@torch.no_grad()
def max_logit_difference(a: LoadedModel, b: LoadedModel, texts: Sequence[str], steers_a: Sequence[SteerValue] = (), *,
                         force: bool = False) -> float:
    """max |logits(a with steers_a) − logits(b)| over the tokens of ``texts``."""
    enc = a.tokenizer(list(texts), return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()
    with steered(a, list(steers_a), force=force):
        la = a.model(**{k: v.to(a.device) for k, v in enc.items()}).logits.float().cpu()
    lb = b.model(**{k: v.to(b.device) for k, v in enc.items()}).logits.float().cpu()
    return float((la - lb).abs()[mask].max())


PROBE = ["The weather today is mild.", "I love this place, the food is good and the staff are kind."]


def merge_to_dir(
    spec: str,
    steers: Sequence[tuple[Steer, float]],
    out: str | os.PathLike,
    *,
    paths: Sequence[str] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    force: bool = False,
    include_domain: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    tolerance: float | None = None,
    lm: LoadedModel | None = None,
) -> tuple[Path, float | None]:
    """Load ``spec``, fold ``steers``, save to ``out`` atomically; returns (path, max logit difference).

    With ``verify`` the checkpoint is reloaded with plain transformers before it is renamed into
    place and its logits on a probe text are compared with the hooked base model: a difference
    above ``tolerance`` (default :func:`default_tolerance` of the model's dtype) is a
    SteerportError and nothing is left at ``out``.
    """
    from steerport.models import load_model

    out = Path(out)
    for i, (steer, _) in enumerate(steers):
        check_foldable(steer, name=(paths[i] if paths else f"steer {i + 1}"))
    lm = lm or load_model(spec, dtype=dtype, device=device)
    _check_destination(lm, out, overwrite)
    tol = default_tolerance(lm.dtype) if tolerance is None else float(tolerance)
    base_fp = lm.fingerprint
    # reference logits from the hooked base model, before the head is changed
    enc = lm.tokenizer(PROBE, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()
    reference = None
    if verify:
        with steered(lm, list(steers), force=force, include_domain=include_domain), torch.no_grad():
            reference = lm.model(**{k: v.to(lm.device) for k, v in enc.items()}).logits.float().cpu()
    untied = _output_is_tied(lm.model)
    merge_into_model(lm, steers, force=force, include_domain=include_domain)
    records = [
        MergeRecord(
            path=str(paths[i]) if paths else f"steer {i + 1}",
            kind=s.kind, value=float(v), epsilon=s.epsilon, scale=float(v) * s.epsilon,
            positive=s.positive, steer_fingerprint=s.fingerprint, made_for=dict(s.model),
        )
        for i, (s, v) in enumerate(steers)
    ]
    new_fp = fingerprint(lm.output_embeddings, lm.tokenizer.get_vocab())
    card = model_card(lm, records, base_fp, new_fp, untied)
    diff = None
    with atomic_directory(out, replace=True) as tmp:
        _write_checkpoint(lm, tmp, card)
        if reference is not None:
            from transformers import AutoModelForCausalLM

            # transformers types PreTrainedModel.to through a wrapper whose signature mypy misreads
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=lm.dtype).to(lm.device).eval()  # type: ignore[arg-type]
            with torch.no_grad():
                got = reloaded(**{k: v.to(lm.device) for k, v in enc.items()}).logits.float().cpu()
            diff = float((got - reference).abs()[mask].max())
            if diff > tol:
                raise SteerportError(f"{out}: the reloaded checkpoint's logits differ from the hooked model by "
                                     f"{diff:.3g} (> tolerance {tol:g}); nothing was saved")
    return out, diff
