"""``steerport generate`` and ``steerport inspect``: apply steers, look inside a steer file.

Example::

    steerport generate smollm2-135m --steer positive.st:3 -p "The movie was" --jsonl
    steerport inspect positive.st --model smollm2-135m --keywords 10
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from steerport.cli.common import (
    NON_NEGATIVE,
    PROBABILITY_MASS,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    MaxMemoryOpt,
    ModelArg,
    OffloadOpt,
    SteerOpt,
    check_at_least,
    counting,
    echo,
    file_option,
    finite_option,
    load_steers,
    parse_steer_arg,
    print_json,
    read_prompts,
    say,
    show,
    split_options,
    status,
    stdout_console,
    surface,
    table,
)
from steerport.errors import SteerportError


def generate(
    model: ModelArg,
    steer: SteerOpt = [],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt; repeat for several.")] = [],
    prompts: Annotated[Optional[Path], file_option(what="prompts file", help="JSONL (prompt.text / prompt / text) or text file, one "
            "prompt per line.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 40,
    temperature: Annotated[float, finite_option(bound=NON_NEGATIVE, help="0 = greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, finite_option(bound=PROBABILITY_MASS, help="Nucleus sampling mass when sampling.")] = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON object per prompt, one per line.")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = [],
    offload_folder: OffloadOpt = None,
    force: ForceOpt = False,
):
    """Generate continuations, optionally steered: --steer detox.st:5 --steer pos.st:2."""
    from steerport.hooks import generate as do_generate
    from steerport.models import load_model
    from steerport.strength import warn_uncalibrated

    check_at_least("--batch-size", batch_size, 1)
    check_at_least("--max-new-tokens", max_new_tokens, 1)
    texts = list(prompt) + (read_prompts(prompts) if prompts else [])
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise SteerportError("give at least one --prompt or a --prompts file")
    steers = load_steers(steer)
    warn_uncalibrated([s for s, _ in steers], say)
    lm = load_model(model, dtype=dtype, device=device, **split_options(device_map, max_memory, offload_folder))
    with counting("generating", total=len(texts)) as advance:
        outs = do_generate(lm, texts, steers, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           seed=seed, batch_size=batch_size, force=force, progress=advance)
    values = [f"{p}:{v:g}" for p, v in map(parse_steer_arg, steer)]
    for p, o in zip(texts, outs):
        if jsonl:
            print_json({"prompt": p, "continuation": o, "steers": values}, indent=None)
        elif stdout_console().is_terminal:
            from rich.text import Text

            stdout_console().print(Text.assemble((p, "bold"), o))
        else:
            echo(p + o)


def inspect(
    file: Annotated[Path, typer.Argument(help="A .st steer file.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model the steer is for: also list keywords.")] = None,
    keywords: Annotated[int, typer.Option("--keywords", "-k", help="Keywords per list (with --model).")] = 20,
    value: Annotated[float, finite_option("--value", help="Steer value for the raised/lowered tokens.")] = 1.0,
    directions: Annotated[int, typer.Option("--directions", help="Leading singular directions to list.")] = 3,
    neutral: Annotated[Optional[Path], file_option(what="text file", help="Neutral text (one per line / JSONL) for the logit shifts "
            "(default: bundled neutral paragraphs).")] = None,
    dtype: DtypeOpt = "float32",
    force: ForceOpt = False,
    device: DeviceOpt = "cpu",
):
    """Show a steer file's metadata and tensors; with --model also its keywords."""
    from steerport.steer import Steer

    steer = Steer.load(file)
    meta = steer.metadata()
    if model is not None:
        show_keywords(steer, model, k=keywords, value=value, n_directions=directions, neutral=neutral,
                      dtype=dtype, force=force, as_json=as_json, meta=meta, device=device)
        return
    if as_json:
        print_json(meta)
        return
    t = table("field", "value", title=str(file), show_header=False)
    for key, v in meta.items():
        t.add_row(key, v if isinstance(v, str) else json.dumps(v, indent=1))
    for name, tensor in steer.tensors.items():
        t.add_row(f"tensor {name}", f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}")
    t.add_row("steer fingerprint", steer.fingerprint)
    show(t)


def show_keywords(steer, model: str, *, k: int, value: float, n_directions: int, neutral: Optional[Path],
                  dtype: str, force: bool, as_json: bool, meta: dict, device: str = "cpu") -> None:
    """Body of ``inspect --model``: SVD keywords and raised/lowered tokens."""
    from steerport.explain import steer_keywords
    from steerport.models import load_model

    check_at_least("--keywords", k, 1)
    texts = read_prompts(neutral)[:64] if neutral else None
    lm = load_model(model, dtype=dtype, device=device)
    with status("computing keywords"):
        kw = steer_keywords(lm, steer, k=k, n_directions=n_directions, value=value, texts=texts, force=force)
    if as_json:
        print_json({"steer": meta, "model": model, **kw.to_json()})
        return
    pos = steer.positive or "+"
    for d in kw.directions:
        title = (f"singular direction {d.index + 1}: σ = {d.singular_value:.4g} ({d.share:.0%} of ‖W‖²)"
                 + ("" if d.oriented else " [sign arbitrary]"))
        t = table("#", f"+ end (raised at +s, '{pos}')", "proj", "− end", "proj", title=title)
        for i, (a, b) in enumerate(zip(d.positive, d.negative), 1):
            t.add_row(str(i), surface(a.surface), f"{a.score:+.3f}", surface(b.surface), f"{b.score:+.3f}")
        show(t)
    t = table("#", "raised most", "Δ log p", "lowered most", "Δ log p",
              title=f"tokens whose log-prob the steer moves most at s = {value:g} "
                    f"(mean over {kw.n_neutral_texts} neutral texts)")
    for i, (a, b) in enumerate(zip(kw.raised, kw.lowered), 1):
        t.add_row(str(i), surface(a.surface), f"{a.score:+.3f}", surface(b.surface), f"{b.score:+.3f}")
    show(t)


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(inspect)
