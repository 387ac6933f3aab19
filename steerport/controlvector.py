"""llama.cpp control vectors (GGUF) <-> steerport ActAdd steers.

A llama.cpp control vector (``llama-cli --control-vector FILE.gguf``, made by llama.cpp's
``cvector-generator`` or by repeng's ``ControlVector.export_gguf``) is a GGUF file with

- ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model's
  architecture name) and ``controlvector.layer_count`` (number of direction tensors);
- one float32 1-D tensor ``direction.N`` (n_embd) per layer.

Layer convention, read from llama.cpp's loader (``common_control_vector_load_one``: "layer 1
at [0]") and graph code (``build_cvec(cur, il)`` at the end of every decoder layer ``il``):
``direction.N`` is added at every position to the residual stream *leaving* decoder layer
``N`` (0-based, its ``l_out``). llama.cpp rejects ``N = 0`` and sums tensors with the same ``N``.
repeng exports ``direction.{i}`` for the output of ``model.layers[i]``: the same convention.
(llama.cpp's own cvector-generator writes directions 1 .. n_layers-1.)

steerport's ActAdd steer (steerport.actadd) adds ``s·ε₀·vector`` to the residual stream
*entering* decoder layer ``layer`` (TransformerLens ``resid_pre``), which is the stream leaving
layer ``layer - 1``. So::

    steerport layer L  <->  llama.cpp direction.(L - 1)          (LAYER_OFFSET = 1)

Layers 0 and 1 cannot be exported (llama.cpp has no direction.-1 / direction.0), and
llama.cpp's last direction (n_layers - 1) imports as layer n_layers: the stream after the last
decoder layer, before the final norm, which the ActAdd applier adds with a forward hook on
the last block. Only all-positions steers (one d-vector per layer) can be exported: llama.cpp
adds the vector at every position. Several layers: metadata ``layers`` = [L1, ...] with
``vector`` of shape (n_layers, d), row i for layer ``layers[i]``; one layer: ``layer`` and a
(d,) vector. Both kinds apply with ``steered`` like any ActAdd steer, and carry to other
models with ``transfer_actadd(..., method="map")`` (an imported file has no prompt pairs to
recompute from).

Example::

    export_control_vector(Steer.load("calm.st"), "calm.gguf", value=4.0, model_hint="llama")
    steer = import_control_vector("calm.gguf")          # an actadd steer, epsilon 1
    get_kind("actadd").export("gguf-cvec", steer, "calm2.gguf", value=1.0)   # the same export, by kind
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from steerport.errors import SteerportError, one_line
from steerport.fileio import atomic_write_bytes
from steerport.kinds.actadd import actadd_layers
from steerport.steer import Steer

ARCH = "controlvector"
LAYER_OFFSET = 1  # steerport layer L (input of block L) == llama.cpp direction.(L - 1) (output of block L - 1)


def control_rows(steer: Steer) -> tuple[list[int], torch.Tensor]:
    """The layers of an all-positions ActAdd steer and its vectors, (n_layers, d) float32."""
    if steer.kind != "actadd":
        raise SteerportError(f"only actadd steers can become control vectors; this steer is {steer.kind!r}")
    layers, vectors = actadd_layers(steer)  # validates 'layer' / 'layers'
    positions = steer.meta.get("positions", "all" if "layers" in steer.meta or vectors[0].dim() == 1 else "front")
    if positions != "all" or any(v.dim() != 1 for v in vectors):
        shape = tuple(steer.tensors["vector"].shape)
        raise SteerportError(
            f"this actadd steer acts on {positions!r} positions ({shape}); llama.cpp adds a control "
            "vector at every position, so only the all-positions variant (one d-vector per layer) can be exported"
        )
    return layers, torch.stack(vectors)


def export_control_vector(
    steer: Steer,
    path: str | os.PathLike,
    *,
    value: float = 1.0,
    model_hint: str | None = None,
) -> Path:
    """Write ``steer`` at ``value`` (direction = value·ε₀·vector) as a llama.cpp control vector.

    ``model_hint`` is the model's architecture name (llama.cpp writes its
    ``general.architecture``, e.g. "llama"); default: the steer's metadata ``model_type`` or its
    model spec. The file is built in a temporary folder, then written with
    :func:`steerport.fileio.atomic_write_bytes` (readers never see half a file). Also the actadd
    kind's export ``gguf-cvec``: ``get_kind("actadd").export("gguf-cvec", steer, path, value=4.0)``.
    """
    import gguf

    if not math.isfinite(float(value)):
        raise SteerportError(f"control-vector value must be a finite number, got {value!r}")
    layers, rows = control_rows(steer)
    for layer in layers:
        if layer - LAYER_OFFSET < 1:
            raise SteerportError(
                f"layer {layer}: steerport adds it to the stream entering decoder layer {layer}, which llama.cpp "
                f"would call direction.{layer - LAYER_OFFSET}; llama.cpp starts at direction.1, so layers 0 and 1 cannot be exported"
            )
    hint = model_hint or steer.meta.get("model_type") or steer.model.get("spec") or "unknown"
    directions = rows * (float(value) * steer.epsilon)  # (n_layers, d)
    with tempfile.TemporaryDirectory(prefix="steerport-cvec-") as tmp:  # GGUFWriter needs a file name
        built = Path(tmp) / "cvec.gguf"
        writer = gguf.GGUFWriter(str(built), ARCH)  # sets general.architecture
        writer.add_string(f"{ARCH}.model_hint", str(hint))
        writer.add_int32(f"{ARCH}.layer_count", len(layers))  # as llama.cpp's cvector-generator
        writer.add_string("steerport.positive", steer.positive)
        writer.add_string("steerport.steer_fingerprint", steer.fingerprint)
        writer.add_float32("steerport.value", float(value))
        writer.add_float32("steerport.epsilon", float(steer.epsilon))
        if steer.model.get("fingerprint"):
            writer.add_string("steerport.model_fingerprint", steer.model["fingerprint"])
        if steer.model.get("spec"):
            writer.add_string("steerport.model_spec", steer.model["spec"])
        for layer, row in sorted(zip(layers, directions), key=lambda lr: lr[0]):
            writer.add_tensor(f"direction.{layer - LAYER_OFFSET}", row.contiguous().numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        data = built.read_bytes()  # small: n_layers x d float32
    return atomic_write_bytes(path, data)


def _field_value(reader, key: str):
    field = reader.get_field(key)
    if field is None or not len(field.parts):
        return None
    if hasattr(field, "contents"):  # newer gguf packages decode values themselves
        return field.contents()
    part = field.parts[-1]  # older gguf packages: decode the last part by hand
    return bytes(part).decode("utf-8", "replace") if part.dtype == np.uint8 else part[0].item()


# what gguf.GGUFReader raises on a file that is not well-formed GGUF (bad magic or version, a
# truncated or corrupted header: ValueError incl. UnicodeDecodeError, IndexError, KeyError,
# OverflowError), or on one the system cannot read (OSError)
_UNREADABLE = (ValueError, IndexError, KeyError, OverflowError, OSError)


def import_control_vector(path: str | os.PathLike, *, model: dict | None = None, positive: str = "") -> Steer:
    """Read a llama.cpp / repeng control vector as an all-positions ActAdd steer (ε₀ = 1).

    ``direction.N`` becomes steerport layer N + 1 (the stream entering block N + 1). One
    direction gives metadata ``layer``; several give ``layers`` and a (n_layers, d) vector.
    Directions that name the same layer are summed, as llama.cpp does.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise SteerportError(f"{path}: no such control-vector file")
    try:
        reader = gguf.GGUFReader(str(path))
    except _UNREADABLE as e:
        raise SteerportError(f"{path}: not a readable GGUF file ({one_line(e)})") from None
    arch = _field_value(reader, "general.architecture")
    if arch != ARCH:
        raise SteerportError(f"{path}: general.architecture is {arch!r}, not {ARCH!r}; not a control vector")
    hint = _field_value(reader, f"{ARCH}.model_hint")
    by_layer: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        name = t.name
        head, _, index = name.partition(".")
        if head != "direction":
            raise SteerportError(f"{path}: unexpected tensor {name!r} (a control vector holds only direction.N tensors)")
        try:
            layer = int(index)
        except ValueError:
            raise SteerportError(f"{path}: tensor {name!r} has no integer layer index") from None
        if layer < 1:
            raise SteerportError(f"{path}: tensor {name!r}: llama.cpp rejects layer index {layer} (layers start at 1)")
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise SteerportError(f"{path}: tensor {name!r} is {t.tensor_type.name}, llama.cpp needs F32")
        data = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if len([d for d in t.shape if d > 1]) > 1:
            raise SteerportError(f"{path}: tensor {name!r} is not 1-D (shape {list(t.shape)})")
        if by_layer and data.shape[0] != next(iter(by_layer.values())).shape[0]:
            raise SteerportError(f"{path}: tensor {name!r} has {data.shape[0]} values, the others a different size")
        by_layer[layer + LAYER_OFFSET] = by_layer.get(layer + LAYER_OFFSET, 0) + data
    if not by_layer:
        raise SteerportError(f"{path}: no direction tensors")
    layers = sorted(by_layer)
    vectors = torch.from_numpy(np.stack([by_layer[layer] for layer in layers])).float()  # (n_layers, d)
    meta: dict = {"positions": "all", "source": {"format": "llama.cpp control vector", "file": path.name, "model_hint": hint}}
    if len(layers) == 1:
        meta["layer"] = layers[0]
        vector = vectors[0]
    else:
        meta["layers"] = layers
        vector = vectors
    if isinstance(hint, str):
        meta["model_type"] = hint
    spec_model = dict(model) if model else {"spec": str(hint or ""), "fingerprint": ""}
    return Steer("actadd", {"vector": vector.contiguous()}, epsilon=1.0, positive=positive, model=spec_model, meta=meta)
