"""Resolve a model spec, load the model, and expose the pieces steers act on.

A *model spec* is any of: a short alias (``gpt2``, ``gpt-j``), an offline catalog name
(``smollm2-135m``), a Hugging Face hub id (``EleutherAI/pythia-410m``), a local model
directory, or a ``.gguf`` file.

Steers act on the input of the LM head: the final hidden state ``h`` (after the final
norm). We find that place generically as ``model.get_output_embeddings()`` and hook it,
so no per-architecture code is needed.

Example::

    lm = load_model("smollm2-135m")
    E = lm.output_embeddings          # (V, d)
    print(lm.hidden_size, lm.fingerprint)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from steerport.errors import SteerportError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has AMX-BF16 or AVX512-BF16 (bf16 matmuls faster than fp32)."""
    flags = _cpuinfo()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere), for benchmark records."""
    import platform

    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def default_dtype(device: str = "cpu") -> torch.dtype:
    """bf16 where the hardware runs it fast, else fp32."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def check_device(device: str | torch.device) -> torch.device:
    """The torch device ``device`` names, refused in one line when it is malformed or not on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SteerportError(f"unknown device {str(device)!r} ({str(e).splitlines()[0]}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SteerportError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                                 "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SteerportError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SteerportError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return dev


def parse_dtype(name: str | torch.dtype | None, device: str = "cpu") -> torch.dtype:
    """``"auto"``/None -> :func:`default_dtype`; else one of float32, bfloat16, float16."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise SteerportError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a spec points. ``kind`` is one of catalog, hub, dir, gguf."""

    spec: str
    kind: str
    location: str  # hub id, directory, or .gguf path


def resolve_spec(spec: str, *, pull: bool = True) -> ResolvedSpec:
    """Turn a user's model spec into a location, pulling catalog models on first use."""
    from steerport import catalog

    if spec in catalog.CATALOG:
        if not catalog.is_cached(spec):
            if not pull:
                raise SteerportError(f"catalog model {spec!r} is not cached; run: steerport pull {spec}")
            catalog.pull(spec)
        return ResolvedSpec(spec, "catalog", str(catalog.model_dir(spec)))
    if spec in catalog.ALIASES:
        return ResolvedSpec(spec, "hub", catalog.ALIASES[spec])
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SteerportError(f"{spec}: directory has no config.json, so it is not a Hugging Face model directory")
        return ResolvedSpec(spec, "dir", str(path))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SteerportError(f"{spec}: no such .gguf file")
        return ResolvedSpec(spec, "gguf", str(path))
    if path.exists():
        raise SteerportError(f"{spec}: not a model directory or .gguf file")
    parts = spec.split("/")
    if len(parts) == 2 and all(parts):
        return ResolvedSpec(spec, "hub", spec)
    raise SteerportError(
        f"unknown model {spec!r}: not an alias, catalog name, local directory or .gguf file "
        "(hub ids look like org/name; `steerport models` lists the names)"
    )


def _gguf_as_dir(gguf_path: str) -> str:
    """Convert a user's .gguf once to a cached safetensors folder (GGUF parsing is slow).

    The copy is keyed by the file's path, size and modification time, and is converted again
    when it was made by another conversion version (e.g. stored in another precision).
    """
    from steerport.catalog import steerport_home
    from steerport.gguf import gguf_to_hf, is_current_conversion

    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{Path(gguf_path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = steerport_home() / "gguf-converted" / key
    if not is_current_conversion(out):
        gguf_to_hf(Path(gguf_path), out)
    return str(out)


def _local_or_hub(resolved: ResolvedSpec) -> str:
    return _gguf_as_dir(resolved.location) if resolved.kind == "gguf" else resolved.location


# --------------------------------------------------------------------------- fingerprint

FINGERPRINT_ROWS = 256


def fingerprint(embeddings: torch.Tensor, vocab: dict[str, int]) -> str:
    """A short hash of the output embeddings and the tokenizer vocabulary.

    Hashes the shape, ``FINGERPRINT_ROWS`` evenly spaced rows rounded to bf16 (so fp32 and
    bf16 copies of the same weights agree) and the vocabulary; cheap even for a 7B model.
    """
    return fingerprint_of_rows(tuple(embeddings.shape), embeddings[fingerprint_rows(embeddings.shape[0])], vocab)


def fingerprint_rows(V: int) -> torch.Tensor:
    """The row ids :func:`fingerprint` hashes: ``FINGERPRINT_ROWS`` evenly spaced over V rows."""
    return torch.linspace(0, V - 1, min(V, FINGERPRINT_ROWS)).long()


def fingerprint_of_rows(shape: tuple[int, ...], sample: torch.Tensor, vocab: dict[str, int]) -> str:
    """:func:`fingerprint` from the matrix's shape (V, d) and only its rows ``fingerprint_rows(V)``."""
    V, d = shape
    sample = sample.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
    h = hashlib.sha256(f"{V}x{d}".encode())
    h.update(sample.numpy().tobytes())
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- full models


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, and the LM head steers attach to."""

    spec: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def lm_head(self) -> nn.Module:
        """The module mapping final hidden states to logits; steers hook its input."""
        head = self.model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise SteerportError(f"{self.spec}: model has no output embedding (LM head) to steer")
        return head

    @property
    def output_embeddings(self) -> torch.Tensor:
        """E, shape (V, d): row v is token v's output embedding (read from the offload store when
        a split model keeps the head on disk)."""
        return cast(torch.Tensor, _module_tensor(self.lm_head, "weight"))  # lm_head checks that the head has a weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        return _module_tensor(self.lm_head, "bias")

    @property
    def is_split(self) -> bool:
        """True when the model was loaded with a device map (its modules may sit on several devices)."""
        return getattr(self.model, "hf_device_map", None) is not None

    @property
    def hidden_size(self) -> int:
        return cast(torch.Tensor, self.lm_head.weight).shape[1]  # an offloaded ('meta') weight has its shape too

    @property
    def device(self) -> torch.device:
        """Where the LM head computes (a split model's head may keep its weight offloaded on 'meta')."""
        return execution_device(self.lm_head)

    @property
    def dtype(self) -> torch.dtype:
        return cast(torch.Tensor, self.lm_head.weight).dtype

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.output_embeddings, self.tokenizer.get_vocab())

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks."""
        return len(decoder_layers(self.model))

    @property
    def softcap(self) -> float | None:
        """The final logit soft-cap, or None (see :func:`logit_softcap`)."""
        return logit_softcap(self.model)


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str = "cpu",
    device_map: str | dict[str, str | int] | None = None,
    max_memory: dict[str | int, str | int] | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM for steering (eval mode, no gradients on its weights).

    ``device_map`` (e.g. ``"auto"``) splits a model that does not fit one device across the
    GPUs, the CPU and the disk (Hugging Face accelerate), within ``max_memory`` per device
    (``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``); layers that do not fit go to
    ``offload_folder`` (default: a temporary folder). ``device`` is then ignored.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_device(device)  # --device cuda on a machine without CUDA: one line, before any loading
    hf_logging.disable_progress_bar()  # steerport draws its own progress; per-tensor bars are noise
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise SteerportError("max_memory and offload_folder need a device map (e.g. device_map='auto')")
    resolved = resolve_spec(spec)
    where = _local_or_hub(resolved)
    torch_dtype = parse_dtype(dtype, "cuda" if device_map is not None and torch.cuda.is_available() else device)
    split: dict = {}
    if device_map is not None:
        split = {"device_map": device_map, "max_memory": max_memory,
                 "offload_folder": str(offload_folder) if offload_folder else _offload_dir()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **split)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SteerportError(f"could not load model {spec!r} from {where}: {first}") from None
    if device_map is None:
        # transformers types PreTrainedModel.to through a wrapper whose signature mypy misreads
        model.to(device)  # type: ignore[arg-type]
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer)


def parse_max_memory(items: list[str] | None) -> dict[str | int, str | int] | None:
    """``["0=70GiB", "cpu=200GiB", "disk=1TB"]`` -> ``{0: "70GiB", "cpu": "200GiB", "disk": "1TB"}``
    (accelerate's ``max_memory``); plain byte counts become ints. None or [] -> None."""
    if not items:
        return None
    out: dict[str | int, str | int] = {}
    for item in items:
        dev, sep, amount = item.partition("=")
        dev, amount = dev.strip(), amount.strip()
        if not sep or not dev or not amount:
            raise SteerportError(f"max memory {item!r}: write DEVICE=AMOUNT, e.g. 0=70GiB, cpu=200GiB or disk=1TB")
        if not (dev.isdigit() or dev in ("cpu", "disk", "mps")):
            raise SteerportError(f"max memory {item!r}: the device is a GPU index, cpu, mps or disk")
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", amount, flags=re.IGNORECASE):
            raise SteerportError(f"max memory {item!r}: the amount is bytes or a size like 500MB or 70GiB")
        out[int(dev) if dev.isdigit() else dev] = int(amount) if amount.isdigit() else amount
    return out


def _offload_dir() -> str:
    """A private temporary folder for the layers a device map sends to disk (removed at exit)."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="steerport-offload-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def execution_device(module: nn.Module) -> torch.device:
    """The device a module computes on: accelerate's execution device for a dispatched module
    (whose weights may be offloaded, on 'meta'), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _module_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` (a weight or bias, or None), read from accelerate's offload store when the
    device map put the module on disk (the parameter itself is then an empty 'meta' tensor)."""
    tensor = getattr(module, name, None)
    if tensor is None or not tensor.is_meta:
        return tensor
    store = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if store is None or name not in store:
        raise SteerportError(f"the LM head's {name} is offloaded and cannot be read back; give it a device in the device map")
    return store[name].to(execution_device(module))


def text_config(model: PreTrainedModel):
    """The config that describes the language model (the text part of a multimodal config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_softcap(model: PreTrainedModel) -> float | None:
    """Gemma-2 style final logit soft-capping ``cap · tanh(z / cap)``, or None: read in one place."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is None:
        cap = getattr(text_config(model), "final_logit_softcapping", None)
    return float(cap) if cap else None


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM, found without per-architecture names.

    The ModuleList whose length is the config's ``num_hidden_layers`` (GPT-2 ``transformer.h``,
    Llama/Qwen/Gemma ``model.layers``, NeoX ``gpt_neox.layers``, OPT ``model.decoder.layers``);
    the one holding most parameters if several match. A model whose config does not give the
    number of layers, or that has no list of that length, is refused rather than guessed at.
    """
    n = getattr(text_config(model), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise SteerportError(f"{type(model).__name__}: its config gives no num_hidden_layers, so its decoder layers cannot be found")
    matching = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not matching:
        raise SteerportError(f"{type(model).__name__}: no list of {n} decoder layers (num_hidden_layers) among its modules")
    return max(matching, key=lambda m: sum(p.numel() for p in m.parameters()))
