"""Kind ``actadd``: a vector added to the residual stream (ActAdd, Turner et al. 2023; control vectors).

Tensor ``vector``: (d,) or (P, d) with metadata ``layer`` (one layer), or (len(layers), d) with
metadata ``layers`` (one row per layer, all positions — imported llama.cpp / repeng control
vectors). Layer L is the stream entering decoder block L; L = n_layers the stream leaving the
last block (a forward hook on it). At value s the coefficient is c = s·ε₀::

    front (paper):  h_L[start + p] += c · v[p]     for p < P, start = first real token of the row
    all:            h_L[t] += c · v                for every position t  (v: (d,))
    multi-layer:    h_{L_i}[t] += c · v[i]          for every position t and listed layer L_i

Positions are absolute: in cached generation each pass covers [offset, offset + T) and the
front rows are added only where that window meets them, as if the whole sequence were
recomputed. Per-row values (b, k) give each batch row its own coefficients.
Cannot be folded into a checkpoint (:func:`fold_refusal` says why); exported as a llama.cpp
control vector; carried by recipe or by a residual-stream map (:mod:`steerport.actadd`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from steerport.capture import block_output, edit_input
from steerport.errors import SteerportError
from steerport.kinds import Remover, SteerKind
from steerport.models import decoder_layers


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def actadd_layers(steer, n_layers: int | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Where an ActAdd steer acts, validated: ``vectors[i]`` (float32) is added at layer ``layers[i]``.

    Metadata ``layer`` (an int) with ``vector`` (d,) or (P, d) gives one layer; metadata ``layers``
    (distinct ints) with ``vector`` (len(layers), d) gives one row per layer, all positions.
    With ``n_layers`` given, every layer must lie in 0 .. n_layers.

    Example::

        layers, vectors = actadd_layers(steer, lm.n_layers)    # [2, 3], [(d,), (d,)]
    """
    if steer.kind != "actadd":
        raise SteerportError(f"expected an actadd steer, got {steer.kind!r}")
    vec = steer.tensors["vector"].float()
    meta = steer.meta
    if "layers" in meta:
        layers = meta["layers"]
        if not isinstance(layers, list) or not layers or not all(_is_int(x) for x in layers):
            raise SteerportError(f"actadd metadata 'layers' must be a non-empty list of layer indices, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise SteerportError(f"actadd metadata 'layers' repeats a layer: {layers}")
        if meta.get("positions", "all") != "all":
            raise SteerportError(f"a multi-layer actadd steer acts on all positions, but its metadata says {meta['positions']!r}")
        rows = vec.reshape(1, -1) if vec.dim() == 1 else vec  # (len(layers), d)
        if rows.shape[0] != len(layers):
            raise SteerportError(f"actadd steer lists {len(layers)} layers but its vector has {rows.shape[0]} rows")
        vectors = list(rows)
    else:
        layer = meta.get("layer")
        if not _is_int(layer):
            raise SteerportError("actadd steer has no integer 'layer' (nor a 'layers' list) in its metadata")
        layers, vectors = [layer], [vec]
    if n_layers is not None:
        for layer in layers:
            if not 0 <= layer <= n_layers:
                raise SteerportError(
                    f"actadd steer acts at layer {layer}, but this model has {n_layers} decoder layers "
                    f"(valid: 0..{n_layers}, where {n_layers} is the stream after the last one)"
                )
    return list(layers), vectors


def _validate(steer) -> None:
    if steer.tensors["vector"].dim() not in (1, 2):
        raise SteerportError("actadd vector must be d or positions x d")


def acts_everywhere(steer) -> bool:
    """True when the steer adds its vector at every position (``all`` or multi-layer), not the front ones."""
    return steer.meta.get("positions", "front") == "all" or "layers" in steer.meta or steer.tensors["vector"].dim() == 1


# --------------------------------------------------------------------------- applying


@dataclass
class _Window:
    """Which absolute positions the current forward pass covers, per row."""

    offset: int = 0
    starts: torch.Tensor | None = None  # (b,) first real token of each row (left padding)


def _window_pre_hook(window: _Window):
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        T = ids.shape[1] if ids is not None else embeds.shape[1]
        mask = kwargs.get("attention_mask")
        past = kwargs.get("past_key_values")
        if mask is not None and mask.dim() == 2:
            window.offset = mask.shape[1] - T
            real = mask != 0
            window.starts = torch.where(real.any(1), real.int().argmax(1), torch.zeros_like(real[:, 0], dtype=torch.long))
        else:
            window.offset = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
            window.starts = None

    return hook


def _weighted_sum(values: torch.Tensor, parts: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Σ_j values[..., j] · v_j over ``parts`` [(j, v_j)], elementwise and in a fixed order.

    values (k,) -> shape of v; values (b, k) -> (b, *shape of v). Row i of the per-row result is
    bit for bit the result for values[i] alone (no matmul whose kernel could depend on b).
    """
    terms = [values[..., j].reshape(*values.shape[:-1], *([1] * v.dim())) * v for j, v in parts]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


@dataclass
class _LayerAdds:
    """What one layer adds: c_j · everywhere_j at every position and c_j · front_j at the front."""

    everywhere: list[tuple[int, torch.Tensor]]  # (steer index j, (d,))
    front: list[tuple[int, torch.Tensor]]  # (steer index j, (P_j, d))

    def adder(self, window: _Window, values: torch.Tensor, device, dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """h (b, T, d) -> h + the scaled vectors; ``values`` (k,) or (b, k)."""
        per_row = values.dim() == 2
        ev = fr = None
        if self.everywhere:
            ev = _weighted_sum(values, self.everywhere).to(device, dtype)  # (d,) or (b, d)
        if self.front:
            P = max(v.shape[0] for _, v in self.front)
            padded = [(j, torch.cat([v, v.new_zeros(P - v.shape[0], v.shape[1])])) for j, v in self.front]
            fr = _weighted_sum(values, padded).to(device, dtype)  # (P, d) or (b, P, d)

        if fr is None and ev is not None:  # the common case (all positions): one add per forward pass
            ev_b = ev[:, None, :] if per_row else ev

            def add_everywhere(h: torch.Tensor) -> torch.Tensor:
                if per_row and h.shape[0] != values.shape[0]:
                    raise SteerportError(f"per-row actadd values for {values.shape[0]} rows, but this forward pass "
                                         f"has {h.shape[0]}")
                return h + ev_b

            return add_everywhere

        def add_to(h: torch.Tensor) -> torch.Tensor:
            if per_row and h.shape[0] != values.shape[0]:
                raise SteerportError(f"per-row actadd values for {values.shape[0]} rows, but this forward pass has "
                                     f"{h.shape[0]}")
            add = torch.zeros_like(h)
            if ev is not None:  # .to: on a split model (device map) this layer's stream may sit on another GPU
                add = add + (ev[:, None, :] if per_row else ev).to(h.device)
            if fr is not None:
                b, T, _ = h.shape
                starts = window.starts.to(h.device) if window.starts is not None else torch.zeros(b, dtype=torch.long, device=h.device)
                rel = window.offset + torch.arange(T, device=h.device)[None, :] - starts[:, None]  # (b, T)
                hit = (rel >= 0) & (rel < fr.shape[-2])
                if hit.any():
                    fr_here = fr.to(h.device)
                    if per_row:
                        row = torch.arange(b, device=h.device)[:, None].expand(b, T)
                        add[hit] = add[hit] + fr_here[row[hit], rel[hit]]
                    else:
                        add[hit] = add[hit] + fr_here[rel[hit]]
            return h + add

        return add_to


def apply(lm, steers: Sequence, values: torch.Tensor, include_domain: bool = False) -> Remover:
    """Hooks for all ActAdd steers, per layer; ``values`` (k,) or (b, k) times each steer's ε₀."""
    blocks = decoder_layers(lm.model)
    n = len(blocks)
    values = values.float() * torch.tensor([s.epsilon for s in steers], dtype=torch.float32)
    per_layer: dict[int, _LayerAdds] = {}
    for j, steer in enumerate(steers):
        layers, vectors = actadd_layers(steer, n)
        everywhere = acts_everywhere(steer)
        for layer, v in zip(layers, vectors):
            slot = per_layer.setdefault(layer, _LayerAdds([], []))
            if everywhere or v.dim() == 1:
                slot.everywhere.append((j, v if v.dim() == 1 else v.mean(0)))
            else:
                slot.front.append((j, v))
    window = _Window()
    removers: list[Remover] = []
    if any(adds.front for adds in per_layer.values()):  # only front vectors need to know the positions
        removers.append(lm.model.register_forward_pre_hook(_window_pre_hook(window), with_kwargs=True).remove)
    for layer, adds in per_layer.items():
        add_to = adds.adder(window, values, lm.device, lm.dtype)
        if layer < n:  # the stream entering block `layer`
            removers.append(edit_input(blocks[layer], add_to))
        else:  # layer n: the stream after the last block, before the final norm
            def post(module, args, output, add_to=add_to):
                return (add_to(output[0]), *output[1:]) if isinstance(output, tuple) else add_to(block_output(output))

            removers.append(blocks[n - 1].register_forward_hook(post).remove)

    def remove() -> None:
        for r in removers:
            r()

    return remove


def fold_refusal(steer) -> str:
    """Why an ActAdd steer cannot become weights of a checkpoint, and what to do instead."""
    layers = steer.meta.get("layers")
    multi = isinstance(layers, list)
    positions = steer.meta.get("positions", "all" if multi or steer.tensors["vector"].dim() == 1 else "front")
    where = f"layers {', '.join(map(str, layers))}" if multi else f"layer {steer.meta.get('layer', '?')}"
    why = (
        "Front-position ActAdd acts only on the first prompt positions; weights act the same "
        "at every position, so no checkpoint can reproduce it. "
        if positions == "front"
        else "An all-positions vector would have to become a bias on the previous layer's last residual "
        "write, which most architectures lack, so steerport does not fold it. "
    )
    return (f"ActAdd steers cannot be folded into the LM head: they add a vector to the residual stream entering "
            f"decoder {where} ({positions} positions), inside the network. {why}Apply it with hooks "
            "(steerport generate --steer) or export it as a llama.cpp control vector (steerport export-cvec).")


KIND = SteerKind(
    name="actadd",
    required=frozenset({"vector"}),
    optional=frozenset(),
    validate=_validate,
    hidden_size=lambda s: int(s.tensors["vector"].shape[-1]),
    rank=lambda s: 1,
    apply=apply,
    fold_refusal=fold_refusal,
    transfer="steerport.actadd:transfer_with_options",
    exports={"gguf-cvec": "steerport.controlvector:export_control_vector"},
)
