"""Export steers at fixed values as a LoRA adapter on the LM head: PEFT or llama.cpp GGUF.

An LM-Steer steer at value s is exactly a rank-r LoRA on the LM head.
With output embeddings E (V x d), hidden state h (d) and W = A Bᵀ::

    z' = E (h + s ε₀ B (Aᵀ h)) = E h + (s ε₀ E B)(Aᵀ h)
    lora_A = Aᵀ            (r x d)          lora_B = s ε₀ E B     (V x r)      lora_alpha = r (scaling 1)

Several LM-Steer steers concatenate along rank (M h = Σ s_i ε_i B_i A_iᵀ h). A token-probability
steer adds c_k δ_k · h' to token w_k's logit, h' = h + M h being the LM-Steer-shifted state the
hooks give it, so it is a rank-K LoRA too::

    lora_A = c ⊙ δ (I + M)  = c ⊙ (δ + ((δ B) ⊙ s ε₀) Aᵀ)   (K x d)     lora_B = one-hot(w_k)  (V x K)

ActAdd steers act inside the network, not at the head, and are refused.

Tied embeddings: the adapter wraps only the LM head module, so unmerged inference leaves the
input embeddings alone (PEFT and llama.cpp both add B(A h) beside the base layer). Merging such an
adapter into a tied model would change the input embeddings too; untie first (or use
``steerport merge``). A tied GGUF has no ``output.weight`` for a GGUF LoRA to target, so
``export_gguf`` refuses it.

Example::

    export_peft(lm, [(pos, 3.0), (detox, 2.0)], "adapter/")        # PeftModel.from_pretrained(base, "adapter/")
    export_gguf(lm, [(pos, 1.0)], "pos.lora.gguf")                  # llama-server --lora pos.lora.gguf
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from steerport import __version__
from steerport.errors import SteerportError

if TYPE_CHECKING:  # torch and the model code load on first use: `steerport --help` stays fast
    import torch

    from steerport.hooks import SteerValue
    from steerport.models import LoadedModel
    from steerport.steer import Steer

HEAD_KINDS = ("lm-steer", "token-prob")

# Hugging Face model_type -> llama.cpp general.architecture (for adapters without a base .gguf to read)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3", "gpt2": "gpt2",
             "gpt_neox": "gptneox", "gptj": "gptj", "phi3": "phi3", "olmo": "olmo", "starcoder2": "starcoder2"}


def _check(lm: LoadedModel, items: Sequence[SteerValue], force: bool) -> None:
    from steerport.hooks import check_compatible

    if not items:
        raise SteerportError("nothing to export: give at least one STEER.st:VALUE")
    for steer, value in items:
        if steer.kind not in HEAD_KINDS:
            raise SteerportError(
                f"{steer.kind} steers act inside the network, not at the LM head, so no LM-head LoRA can carry them"
                + ("; export an all-positions ActAdd steer as a llama.cpp control vector (steerport export-cvec)"
                   if steer.kind == "actadd" else ""))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SteerportError(f"steer value must be a finite number, got {value!r}")
        check_compatible(lm, steer, force=force)


def lora_factors(lm: LoadedModel, items: Sequence[SteerValue], *, include_domain: bool = False,
                 force: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (R x d), lora_B (V x R)), float32, with logits E h + lora_B (lora_A h) = the hooks' logits."""
    import torch

    _check(lm, items, force)
    with torch.no_grad():
        return _factors(lm, items, include_domain)


def _factors(lm: LoadedModel, items: Sequence[SteerValue], include_domain: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    E = lm.output_embeddings.detach().float().cpu()  # (V, d)
    V, d = E.shape
    lm_items = [(s, v) for s, v in items if s.kind == "lm-steer"]
    tp_items = [(s, v) for s, v in items if s.kind == "token-prob"]
    As, Bs, scales = [], [], []  # the LM-Steer map M = B diag(scales) Aᵀ
    for steer, value in lm_items:
        As.append(steer.A.float())
        Bs.append(steer.B.float())
        scales.append(torch.full((steer.rank,), value * steer.epsilon))
        if include_domain and "domain.A" in steer.tensors:
            As.append(steer.tensors["domain.A"].float())
            Bs.append(steer.tensors["domain.B"].float())
            scales.append(torch.full((steer.tensors["domain.A"].shape[1],), steer.epsilon))
    A = torch.cat(As, 1) if As else torch.zeros(d, 0)  # (d, R)
    B = torch.cat(Bs, 1) if Bs else torch.zeros(d, 0)  # (d, R)
    c = torch.cat(scales) if scales else torch.zeros(0)  # (R,)
    lora_A = [A.T]  # (R, d)
    lora_B = [(E @ B) * c]  # (V, R)
    for steer, value in tp_items:
        ids = steer.tensors["token_ids"]  # (K,)
        if int(ids.max()) >= V:
            raise SteerportError(f"token-prob steer names token id {int(ids.max())} but the vocabulary has {V} tokens")
        delta = steer.tensors["delta"].float()  # (K, d)
        shifted = delta + ((delta @ B) * c) @ A.T  # δ (I + M): (K, d)
        lora_A.append(value * steer.epsilon * shifted)
        onehot = torch.zeros(V, ids.shape[0])
        onehot[ids, torch.arange(ids.shape[0])] = 1.0
        lora_B.append(onehot)  # (V, K)
    return torch.cat(lora_A, 0).contiguous(), torch.cat(lora_B, 1).contiguous()


def head_module_name(lm: LoadedModel) -> str:
    """The LM head's module path inside the model (``lm_head``, ``embed_out``, ...)."""
    for name, module in lm.model.named_modules():
        if module is lm.lm_head:
            return name
    raise SteerportError(f"{lm.spec}: cannot find the LM head among the model's modules")


def _record(lm: LoadedModel, items: Sequence[SteerValue], paths: Sequence[str] | None, rank: int) -> dict:

    return {
        "made_by": f"steerport {__version__}",
        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        "base": {"spec": lm.spec, "fingerprint": lm.fingerprint},
        "rank": rank,
        "steers": [{"path": paths[i] if paths else f"steer {i + 1}", "kind": s.kind, "value": float(v),
                    "epsilon": s.epsilon, "positive": s.positive, "steer_fingerprint": s.fingerprint}
                   for i, (s, v) in enumerate(items)],
    }


def export_peft(lm: LoadedModel, items: Sequence[SteerValue], out_dir: str | os.PathLike, *,
                paths: Sequence[str] | None = None, include_domain: bool = False, force: bool = False,
                overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors + README.md) on the LM head."""
    from safetensors.torch import save as st_save

    from steerport.fileio import atomic_directory

    lora_A, lora_B = lora_factors(lm, items, include_domain=include_domain, force=force)
    R = lora_A.shape[0]
    name = head_module_name(lm)
    record = _record(lm, items, paths, R)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": lm.spec,
        "r": R, "lora_alpha": R, "lora_dropout": 0.0, "target_modules": [name], "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    tensors = {f"base_model.model.{name}.lora_A.weight": lora_A, f"base_model.model.{name}.lora_B.weight": lora_B}
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise SteerportError(f"{out_dir}: directory exists and is not empty (pass --overwrite to replace it)")
    with atomic_directory(out_dir, replace=True) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "adapter_model.safetensors").write_bytes(
            st_save(tensors, metadata={"format": "pt", "steerport": json.dumps(record, ensure_ascii=False)}))
        (tmp / "README.md").write_text(_card(record, name), encoding="utf-8")
    return out_dir


def _card(record: dict, module: str) -> str:
    rows = "\n".join(f"| `{s['path']}` | {s['kind']} | {s['positive'] or '?'} | {s['value']:g} | {s['epsilon']:g} |"
                     for s in record["steers"])
    return f"""---
library_name: peft
tags: [steerport, lm-steer, lora]
---

# LM-head LoRA for `{record['base']['spec']}` made from steers

{record['made_by']}, {record['date']}. A rank-{record['rank']} LoRA on `{module}` (lora_alpha = r, so
scaling 1) whose logits equal the base model with these steers applied at these values:

| steer file | kind | what + means | value | ε₀ |
|---|---|---|---|---|
{rows}

Base model fingerprint `{record['base']['fingerprint']}`. Load with
`peft.PeftModel.from_pretrained(base_model, this_dir)`. For a model with tied input/output embeddings, use
the adapter unmerged (merging would change the shared matrix).

```json
{json.dumps(record, indent=2, ensure_ascii=False)}
```
"""


def _gguf_base_facts(path: Path) -> tuple[str, bool, tuple[int, ...] | None]:
    """(general.architecture, has output.weight, its shape) of a llama.cpp model file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  (the reader raises several types for non-GGUF files)
        raise SteerportError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise SteerportError(f"{path}: GGUF without general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    out = [t for t in reader.tensors if t.name == "output.weight"]
    return arch, bool(out), (tuple(int(x) for x in out[0].shape) if out else None)


def untie_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Copy a tied llama.cpp model file, adding ``output.weight`` = ``token_embd.weight`` (same quantization).

    llama.cpp uses ``output.weight`` when present, so the copy computes the same logits as the
    original and gives a GGUF LoRA on the LM head a tensor to target. Metadata and every tensor
    are copied byte for byte.
    """
    import gguf

    from steerport.fileio import atomic_write_bytes

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise SteerportError(f"{dst}: already exists (pass --overwrite to replace it)")
    arch, has_output, _ = _gguf_base_facts(src)
    if has_output:
        raise SteerportError(f"{src}: already has output.weight (not tied); use it as it is")
    reader = gguf.GGUFReader(str(src))
    embd = [t for t in reader.tensors if t.name == "token_embd.weight"]
    if not embd:
        raise SteerportError(f"{src}: no token_embd.weight to copy as the output layer")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        w = gguf.GGUFWriter(str(tmp), arch, endianess=reader.endianess)
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue  # written by the writer itself
            kind = f.types[0]
            sub = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), kind, sub_type=sub)
        tensors = [*reader.tensors, embd[0]]
        for i, t in enumerate(tensors):
            name = "output.weight" if i == len(tensors) - 1 else t.name
            w.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            w.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        w.close()
        atomic_write_bytes(dst, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def export_gguf(lm: LoadedModel, items: Sequence[SteerValue], out_path: str | os.PathLike, *,
                gguf_base: str | os.PathLike | None = None, paths: Sequence[str] | None = None,
                include_domain: bool = False, force: bool = False, overwrite: bool = False) -> Path:
    """Write a llama.cpp GGUF LoRA adapter on ``output.weight`` (alpha = rank, so scale 1 = the given values).

    ``gguf_base``: the llama.cpp model the adapter is for; its architecture is read and a tied
    model (no ``output.weight``) is refused. Without it the architecture comes from the HF config
    and a tied HF model is refused the same way.
    """
    import gguf

    from steerport.fileio import atomic_write_bytes

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise SteerportError(f"{out_path}: already exists (pass --overwrite to replace it)")
    model: Any = lm.model
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    V, d = lm.output_embeddings.shape
    tied_refusal = (
        "{what} ties its output layer to the token embeddings (no output.weight), so llama.cpp has no output "
        "tensor for a LoRA to target; write an untied copy of the model file with --untie UNTIED.gguf "
        "(together with --gguf-base), or use the PEFT format or `steerport merge`"
    )
    if gguf_base is not None:
        arch, has_output, shape = _gguf_base_facts(Path(gguf_base))
        if not has_output:
            raise SteerportError(tied_refusal.format(what=f"{gguf_base}"))
        if shape is not None and tuple(sorted(shape)) != tuple(sorted((V, d))):
            raise SteerportError(f"{gguf_base}: output.weight is {shape}, but {lm.spec} has a {V} x {d} LM head")
    else:
        inp = model.get_input_embeddings()
        if getattr(text_cfg, "tie_word_embeddings", False) or (inp is not None and inp.weight is lm.output_embeddings):
            raise SteerportError(tied_refusal.format(what=f"{lm.spec}"))
        known = GGUF_ARCH.get(getattr(text_cfg, "model_type", ""))
        if known is None:
            raise SteerportError(f"no llama.cpp architecture known for model type {text_cfg.model_type!r}; "
                                 "pass --gguf-base MODEL.gguf to read it from the model file")
        arch = known
    lora_A, lora_B = lora_factors(lm, items, include_domain=include_domain, force=force)
    R = lora_A.shape[0]
    record = _record(lm, items, paths, R)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(R))
        w.add_name(f"steerport LM-head LoRA for {lm.spec}")
        w.add_string("steerport.record", json.dumps(record, ensure_ascii=False))
        # numpy shapes as llama.cpp's converter writes them: lora_a (r, d) -> ne [d, r]; lora_b (V, r) -> ne [r, V]
        w.add_tensor("output.weight.lora_a", lora_A.numpy())
        w.add_tensor("output.weight.lora_b", lora_B.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        atomic_write_bytes(out_path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


# --------------------------------------------------------------------------- CLI


def parse_steer_value(arg: str) -> tuple[Path, float]:
    """``"pos.st:3"`` -> (Path("pos.st"), 3.0); a value is required here (it is baked in)."""
    path, sep, value = arg.rpartition(":")
    if not sep or not path:
        raise SteerportError(f"{arg!r}: expected STEER.st:VALUE (the value is baked into the adapter)")
    try:
        v = float(value)
    except ValueError:
        raise SteerportError(f"{arg!r}: value {value!r} is not a number") from None
    if not math.isfinite(v):
        raise SteerportError(f"{arg!r}: value must be finite")
    return Path(path), v


def export_lora_command(
    steer: list[str],
    model: str,
    out: Path,
    fmt: str = "peft",
    gguf_base: Path | None = None,
    include_domain: bool = False,
    overwrite: bool = False,
    dtype: str = "float32",
    force: bool = False,
    untie: Path | None = None,
    device: str = "cpu",
) -> Path:
    """Load ``model`` and the steers, write the adapter; returns its path.

    ``untie`` (gguf): first write an untied copy of the tied ``gguf_base`` there, and target it.
    """
    from steerport.models import load_model
    from steerport.steer import Steer

    if fmt not in ("peft", "gguf"):
        raise SteerportError(f"--format must be peft or gguf, got {fmt!r}")
    pairs = [parse_steer_value(a) for a in steer]
    items = [(Steer.load(p), v) for p, v in pairs]
    for s, _ in items:  # refuse before the (slow) model load
        if s.kind not in HEAD_KINDS:
            _check_kind_only(s)
    lm = load_model(model, dtype=dtype, device=device)
    paths = [str(p) for p, _ in pairs]
    if fmt == "peft":
        return export_peft(lm, items, out, paths=paths, include_domain=include_domain, force=force, overwrite=overwrite)
    if untie is not None:
        if gguf_base is None:
            raise SteerportError("--untie copies the model file given by --gguf-base; give both")
        gguf_base = untie_gguf(gguf_base, untie, overwrite=overwrite)
    return export_gguf(lm, items, out, gguf_base=gguf_base, paths=paths, include_domain=include_domain,
                       force=force, overwrite=overwrite)


def _check_kind_only(steer: Steer) -> None:
    raise SteerportError(
        f"{steer.kind} steers act inside the network, not at the LM head, so no LM-head LoRA can carry them"
        + ("; export an all-positions ActAdd steer as a llama.cpp control vector (steerport export-cvec)"
           if steer.kind == "actadd" else ""))


def register(app) -> None:
    """Add ``export-lora`` to a typer app."""
    from rich.console import Console

    console = Console(stderr=True)

    @app.command("export-lora")
    def export_lora(
        steer: Annotated[list[str], typer.Argument(
            help="Steers with the value to bake in, STEER.st:VALUE; several compose into one adapter.")],
        model: Annotated[str, typer.Option("--model", "-m", help="The model the steers are for (reads its output embeddings).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="PEFT: the adapter directory; gguf: the .gguf file.")],
        fmt: Annotated[str, typer.Option(
            "--format", help="peft (adapter_config.json + adapter_model.safetensors) or gguf (llama.cpp LoRA).")] = "peft",
        gguf_base: Annotated[Path | None, typer.Option(
            help="gguf: the llama.cpp model file the adapter is for (architecture, tied check).")] = None,
        include_domain: Annotated[bool, typer.Option(help="Also bake in LM-Steer domain components.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
        dtype: Annotated[str, typer.Option(help="dtype to load the model in.")] = "float32",
        force: Annotated[bool, typer.Option("--force", help="Export steers made for a model with another fingerprint.")] = False,
        untie: Annotated[Path | None, typer.Option(
            help="gguf, tied --gguf-base: write an untied copy of the model file here (adds output.weight) and target it.")] = None,
        device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    ):
        """Export steers at fixed values as a LoRA on the LM head (PEFT, or GGUF for llama.cpp)."""
        path = export_lora_command(steer, model, out, fmt, gguf_base, include_domain, overwrite, dtype, force, untie,
                                   device=device)
        if untie is not None:
            console.print(f"wrote {untie} (the model file with its own output.weight)")
        console.print(f"wrote {path} ({fmt} LoRA on the LM head)")
