"""Shipping a steer: ``merge`` (fold into a plain checkpoint), ``export-cvec`` / ``import-cvec``
(llama.cpp control vectors).

Example::

    steerport merge smollm2-135m --steer positive.st:3 --out smollm2-positive/
    steerport export-cvec love.st:2 --out love.gguf --model-hint llama
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from steerport.cli.common import DeviceOpt, DtypeOpt, ForceOpt, ModelArg, SteerOpt, load_steers, one_steer, parse_steer_arg, say, status
from steerport.errors import SteerportError


def merge(
    model: ModelArg,
    steer: SteerOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the merged checkpoint.")],
    include_domain: Annotated[bool, typer.Option(help="Also fold LM-Steer domain components (as hooks' include_domain).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    verify: Annotated[bool, typer.Option(help="Reload the checkpoint with plain transformers and compare logits with the hooked "
            "model.")] = True,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
):
    """Fold LM-Steer / token-prob steers at fixed values into the LM head; save a plain HF checkpoint."""
    from steerport.merge import merge_to_dir

    if not steer:
        raise SteerportError("give at least one --steer FILE.st:VALUE")
    steers = load_steers(steer)
    paths = [str(p) for p, _ in map(parse_steer_arg, steer)]
    with status("merging"):
        path, diff = merge_to_dir(model, steers, out_dir, paths=paths, dtype=dtype, device=device, force=force,
                                  include_domain=include_domain, overwrite=overwrite, verify=verify)
    say(f"saved merged checkpoint to {path}")
    if diff is not None:
        tol = 1e-3 if dtype == "float32" else 0.25
        if diff > tol:
            raise SteerportError(f"{path}: reloaded logits differ from the hooked model by {diff:.3g} (> {tol}); do not use it")
        say(f"verified: reloaded with AutoModelForCausalLM, max |logit difference| vs hooked = {diff:.2e}")


def export_cvec(
    steer: Annotated[str, typer.Argument(help="An all-positions actadd steer, FILE.st[:VALUE] (value default 1).")],
    out_path: Annotated[Path, typer.Option("--out", help="The .gguf control vector to write.")],
    model_hint: Annotated[Optional[str], typer.Option(help="Architecture name for controlvector.model_hint (e.g. llama).")] = None,
):
    """Export an ActAdd steer as a llama.cpp control vector (llama-cli --control-vector FILE.gguf)."""
    from steerport.controlvector import export_control_vector

    st, value, _ = one_steer(steer)
    path = export_control_vector(st, out_path, value=value, model_hint=model_hint)
    say(f"wrote {path} (direction = {value:g} · ε₀ · vector)")


def import_cvec(
    file: Annotated[Path, typer.Argument(help="A llama.cpp / repeng control vector .gguf.")],
    out_path: Annotated[Path, typer.Option("--out", help="The .st steer to write.")],
    model: Annotated[Optional[str], typer.Option(help="The model it was made for: records spec + fingerprint.")] = None,
    positive: Annotated[str, typer.Option(help="What the positive direction means.")] = "",
):
    """Import a llama.cpp control vector as an all-positions ActAdd steer."""
    from steerport.controlvector import import_control_vector

    made_for, emb = None, None
    if model is not None:
        from steerport.embeddings import load_embeddings

        emb = load_embeddings(model)
        made_for = {"spec": model, "fingerprint": emb.fingerprint}
    st = import_control_vector(file, model=made_for, positive=positive)
    if emb is not None and st.hidden_size != emb.hidden_size:
        raise SteerportError(f"{file}: directions have {st.hidden_size} values but {model} has hidden size {emb.hidden_size}")
    if model is not None:  # the file records its strength curve on that model (loads it in full)
        from steerport.models import load_model
        from steerport.strength import try_record_curve

        with status(f"measuring the strength curve on {model}"):
            try_record_curve(load_model(model, dtype="float32"), st, say)
    st.save(out_path)
    layers = st.meta.get("layers", [st.meta.get("layer")])
    say(f"wrote {out_path}: actadd, layers {layers}, hidden size {st.hidden_size}")


def register(app: typer.Typer) -> None:
    app.command()(merge)
    app.command("export-cvec")(export_cvec)
    app.command("import-cvec")(import_cvec)
