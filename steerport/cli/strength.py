"""``steerport calibrate``: record a steer's strength curve on its model and, for a transferred steer,
calibrate its value against its source's curve (:mod:`steerport.strength`).

Example::

    steerport transfer smollm2-135m gemma3-270m --steer pos.st --calibrate embed     # embeddings only
    steerport calibrate pos.gemma3-270m.st --model gemma3-270m                        # value now exact
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from steerport.cli.common import POSITIVE, DeviceOpt, DtypeOpt, ForceOpt, file_option, finite_option, say, status


def calibrate_cmd(
    steer: Annotated[Path, typer.Argument(help="The .st steer file (transferred, or any steer to record its curve).")],
    model: Annotated[str, typer.Option("--model", "-m", help="The model the steer is for.")],
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write (default: overwrite STEER, "
            "atomically).")] = None,
    source: Annotated[Optional[Path], file_option("--source", what="steer file", help="The source steer it was "
            "transferred from (needed when the file's lineage records no source strength curve; its model is loaded "
            "only if that steer records none either).")] = None,
    value: Annotated[float, finite_option(bound=POSITIVE, help="Reference value at which the strengths are matched.")] = 1.0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
):
    """Make value s mean on MODEL the strength it has on the source: scale a transferred steer's ε₀ so its
    KL budget on neutral text matches its source's recorded strength curve, and record its own curve."""
    from steerport.models import load_model
    from steerport.steer import Steer
    from steerport.strength import calibrate_steer

    st = Steer.load(steer)
    src = Steer.load(source) if source is not None else None
    lm = load_model(model, dtype=dtype, device=device)

    def source_lm():
        assert src is not None
        return load_model(src.model.get("spec", ""), dtype=dtype, device=device)

    with status(f"measuring strength on {model}"):
        new, info = calibrate_steer(st, lm, source=src, source_lm=source_lm if src is not None else None, value=value,
                                    force=force)
    dest = out_path or steer
    new.save(dest)
    if info["action"] == "recorded":
        pts = ", ".join(f"κ({v:g}) = {k:.4g}" for v, k in zip(info["curve"]["values"], info["curve"]["kappa"]))
        say(f"wrote {dest}: strength curve on {model} recorded ({pts} nats/token); not transferred, ε₀ unchanged")
    else:
        say(f"wrote {dest}: calibrated on {model}, ε₀ {st.epsilon:.4g} -> {new.epsilon:.4g} (x{info['factor']:.4g}); "
            f"κ at value {value:g} {info['kappa_tgt']:.4g} (source {info['kappa_src']:.4g}) nats/token")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_cmd)
