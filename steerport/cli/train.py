"""``steerport train``: fit an LM-Steer steer on labeled texts (resumable).

Example::

    steerport train smollm2-135m --data sst2 --out positive.st
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from steerport.cli.common import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    MaxMemoryOpt,
    ModelArg,
    OffloadOpt,
    file_option,
    finite_option,
    make_progress,
    say,
    split_options,
    status,
    stderr_console,
    table,
)
from steerport.errors import SteerportError

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def train_progress() -> tuple[Progress, Callable[[str, dict], None]]:
    """The progress display for both training phases and the trainer's ``progress(phase, info)`` callback."""
    bar = make_progress(info=True, remaining=True)
    tasks: dict[str, TaskID] = {}
    clock: dict[str, float] = {}

    def update(phase: str, info: dict) -> None:
        if phase == "cache-start":
            tasks["cache"] = bar.add_task("1/2 body pass ", total=info["tokens"], info="")
            clock["cache"] = time.perf_counter()
        elif phase == "cache":
            if "cache_from" not in clock:  # first report: what a resumed pass already had
                clock["cache_from"] = info["tokens"]
                clock["cache"] = time.perf_counter()
            dt = max(time.perf_counter() - clock["cache"], 1e-9)
            rate = (info["tokens"] - clock["cache_from"]) / dt
            bar.update(tasks["cache"], completed=info["tokens"], info=f"{info['texts']} texts  {rate:,.0f} tok/s")
        elif phase == "stats-start":
            tasks["stats"] = bar.add_task("   top-k stats ", total=info["tokens"], info="")
        elif phase == "stats":
            bar.update(tasks["stats"], completed=info["tokens"])
        elif phase == "fit-start":
            tasks["fit"] = bar.add_task("2/2 fit steer  ", total=info["steps"], completed=info["start"], info="")
            clock.update(fit=time.perf_counter(), fit_tokens=0, held=float("nan"))
        elif phase == "fit":
            clock["fit_tokens"] += info["tokens"]
            dt = max(time.perf_counter() - clock["fit"], 1e-9)
            bar.update(tasks["fit"], completed=info["step"],
                       info=f"loss {info['loss']:.4f}  held-out {clock['held']:.4f}  {clock['fit_tokens'] / dt:,.0f} tok/s")
        elif phase == "eval":
            clock["held"] = info["heldout_loss"]

    return bar, update


def train(
    model: ModelArg,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the steer (.st).")],
    data: Annotated[list[str], typer.Option("--data", "-d", help="Labeled JSONL/CSV/TSV file, or a built-in slice: sst2, paradetox. "
            "Repeatable.")] = [],
    positive: Annotated[Optional[Path], file_option("--positive", what="text file", help="Plain-text file of positive texts, one per "
            "line (with --negative).")] = None,
    negative: Annotated[Optional[Path], file_option("--negative", what="text file", help="Plain-text file of negative texts, one per "
            "line (with --positive).")] = None,
    text_field: Annotated[str, typer.Option(help="Field (JSONL) or column (CSV) holding the text.")] = "text",
    label_field: Annotated[str, typer.Option(help="Field or column holding the label.")] = "label",
    positive_label: Annotated[list[str], typer.Option("--positive-label", help="Label value(s) trained at +1 (e.g. 0 for non-toxic); "
            "all others at -1 unless --negative-label is given.")] = [],
    negative_label: Annotated[list[str], typer.Option("--negative-label", help="Label value(s) trained at -1; rows with other labels "
            "are skipped.")] = [],
    real_labels: Annotated[bool, typer.Option("--real-labels", help="Use numeric labels as the steer value itself, e.g. SST-5's "
            "lmsteer_label in [-1, 1].")] = False,
    positive_name: Annotated[str, typer.Option(help="What +1 means, stored in the file (e.g. 'non-toxic').")] = "",
    limit_per_class: Annotated[Optional[int], typer.Option(help="Use at most N texts per class (after a seeded shuffle).")] = None,
    heldout: Annotated[float, finite_option(bound=FRACTION, help="Fraction of texts held out for early stopping and the summary.")] = 0.1,
    max_tokens: Annotated[int, typer.Option(help="Truncate each text to this many tokens.")] = 128,
    rank: Annotated[int, typer.Option(help="Rank r of W = A Bᵀ.")] = 8,
    epsilon: Annotated[float, finite_option(bound=POSITIVE, help="Base scale ε₀ stored in the file (steer value s gives ε = "
            "s·ε₀).")] = 1e-3,
    lr: Annotated[float, finite_option(bound=POSITIVE, help="Adam learning rate.")] = 1e-2,
    epochs: Annotated[float, finite_option(bound=POSITIVE, help="Most passes over the cached tokens (early stopping usually ends "
            "sooner).")] = 8.0,
    steps: Annotated[Optional[int], typer.Option(help="Exact number of optimizer steps (overrides --epochs).")] = None,
    tokens_per_batch: Annotated[int, typer.Option(help="Tokens per optimizer step (batches are packed by tokens).")] = 512,
    weight_decay: Annotated[float, finite_option(bound=NON_NEGATIVE, help="L2 weight decay on A and B.")] = 0.0,
    domain: Annotated[bool, typer.Option("--domain/--no-domain", help="Also learn the always-on domain component (anchor's "
            "dummy_steer), saved as domain.A/domain.B.")] = False,
    patience: Annotated[int, typer.Option(help="Held-out evaluations without a real improvement before stopping early.")] = 3,
    min_improvement: Annotated[float, finite_option(bound=NON_NEGATIVE, help="An improvement counts (resets the patience) when "
            "it is at least this share of the steer's gain so far (held-out loss unsteered minus best).")] = 0.02,
    eval_every: Annotated[Optional[int], typer.Option(help="Steps between held-out evaluations (default: so that they cost about "
            "a tenth of the fit).")] = None,
    eval_tokens: Annotated[int, typer.Option(help="Held-out positions per evaluation (a fixed subset; the final summary uses "
            "all).")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed for the split, initialisation and batch order.")] = 0,
    dtype: DtypeOpt = "auto",
    cache_dtype: Annotated[str, typer.Option(help="Storage dtype of the cached hidden states: bfloat16, float16 or float32.")] = "bfloat16",
    head: Annotated[str, typer.Option(help="topk: normaliser over the base model's top candidates plus a second-order tail term, "
            "computed during the body pass (fast). exact: full softmax at every step. auto: topk, or exact for heads with a logit "
            "soft-cap. The summary is always exact.")] = "auto",
    topk: Annotated[int, typer.Option(help="Candidates per token for the top-k head. Fewer make each fit step cheaper "
            "(32: about 0.65x the fit time of 64) but carry less of the tail exactly: on a strong detox steer, 32 reached "
            "12 % less held-out gain.")] = 64,
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = [],
    offload_folder: OffloadOpt = None,
    workdir: Annotated[Optional[Path], typer.Option(help="Folder for the cache and checkpoints (default OUT.work); rerun the same "
            "command to resume.")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard saved progress in the work folder and start over.")] = False,
    keep_cache: Annotated[bool, typer.Option("--keep-cache", help="Keep the work folder (cache, checkpoint) after success.")] = False,
    init: Annotated[Optional[Path], file_option("--init", what="steer file", help="Warm start: begin from this steer of MODEL (e.g. one "
            "transferred from another model) instead of random factors; its rank is used. The init is scored on the held-out "
            "texts first and returned unchanged unless the fit beats it.")] = None,
):
    """Train an LM-Steer steer: one pass of the frozen model caches its final hidden states, then
    the low-rank steer is fitted on the LM head alone. Ctrl-C (or a kill) keeps the progress:
    run the same command again to resume.

    Examples:

      steerport train smollm2-135m --data sst2 --out positive.st

      steerport train smollm2-135m --data paradetox_train.jsonl --positive-label 0 --positive-name non-toxic --out detox.st

      steerport train smollm2-135m --data sst5_train.jsonl --label-field lmsteer_label --real-labels --out sst5.st

      steerport train smollm2-135m --positive happy.txt --negative sad.txt --out mood.st

      steerport train gemma3-270m --data sst2 --init positive.gemma3.st --steps 20 --out positive.native.st

    Data-parallel (each process caches a share of the texts; the same steer as one process;
    docs/scale.md): accelerate launch --multi_gpu --num_processes 8 -m steerport.cli train MODEL --device cuda ...
    """
    from steerport.data import DataOptions, load_data
    from steerport.distributed import check_size, current_world, rank_device
    from steerport.models import load_model
    from steerport.steer import Steer
    from steerport.train import TrainConfig, remove_workdir
    from steerport.train import train as do_train

    if out_path.suffix != ".st":
        raise SteerportError(f"{out_path}: the output should be a .st file")
    init_steer = Steer.load(init) if init is not None else None
    config = TrainConfig(rank=rank, epsilon=epsilon, lr=lr, epochs=epochs, steps=steps, tokens_per_batch=tokens_per_batch,
                         weight_decay=weight_decay, seed=seed, domain=domain, max_tokens=max_tokens, eval_every=eval_every,
                         patience=patience, min_improvement=min_improvement, eval_tokens=eval_tokens, dtype=dtype,
                         cache_dtype=cache_dtype, head=head, topk=topk)
    config.check()
    world = current_world()  # rank 0 of 1 unless started by accelerate launch / torchrun
    split = split_options(device_map, max_memory, offload_folder)
    tell = say if world.is_main else (lambda message: None)  # one voice: rank 0 speaks, writes and cleans up
    dataset = load_data(DataOptions(
        files=data, text_field=text_field, label_field=label_field, positive_labels=positive_label,
        negative_labels=negative_label, real=real_labels, positive_file=positive, negative_file=negative,
        positive_name=positive_name, limit_per_class=limit_per_class, heldout_fraction=heldout, seed=seed,
    ))
    c = dataset.summary["counts"]
    tell(f"data: train {c['train']['positive']} positive / {c['train']['negative']} negative, "
        f"held out {c['heldout']['positive']} / {c['heldout']['negative']}; +1 means {dataset.positive_name!r}")
    check_size(world, len(dataset.train) + len(dataset.heldout))  # before loading the model
    wd = workdir or out_path.with_name(out_path.name + ".work")
    if restart and wd.exists() and world.is_main:
        remove_workdir(wd)
    lm = load_model(model, dtype=dtype, device=rank_device(world, device), **split)
    bar, update = train_progress()
    if not world.is_main:
        bar.disable = True
    if world.size > 1:
        tell(f"data-parallel: {world.size} processes share the body pass; rank 0 gathers the shards and fits")
    try:
        with bar:
            result = do_train(lm, dataset, config, workdir=wd, progress=update, init=init_steer)
    except KeyboardInterrupt:
        say(f"stopped{'' if world.size == 1 else f' ({world.name})'}: progress saved in {wd}; "
            "run the same command again to resume")
        raise SystemExit(130) from None
    if not world.is_main:
        return
    from steerport.strength import try_record_curve

    with status("measuring the strength curve on neutral text"):
        try_record_curve(lm, result.steer, say)
    result.steer.save(out_path)
    if not keep_cache:
        remove_workdir(wd)
    r, t = result.results, result.steer.meta["training"]["timings"]
    summary = table(title=f"steer saved to {out_path}", show_header=False)
    rows = [
        ("held-out loss, unsteered", r.get("heldout_loss_unsteered")),
        ("held-out loss, steered (each text at its label)", r.get("heldout_loss_steered")),
        ("held-out loss, steered + domain", r.get("heldout_loss_steered_with_domain")),
        ("separation Sep(1), nats/token", r.get("separation")),
        ("steer-as-classifier ROC AUC (held out)", r.get("heldout_auc")),
        ("steps (best at)", f"{r['steps']} ({r['best_step']}), {r['epochs']} epochs; {r['stopped']}"),
        ("tokens train / held out", f"{r['train_tokens']} / {r['heldout_tokens']}"),
        ("head; held-out evaluation", f"{r.get('head')}; {r.get('eval_tokens')} positions every {r.get('eval_every')} steps"),
        ("time: body pass / fit / this run", f"{t['cache_s']:.1f} s / {t.get('topk_stats_s', 0) + t['fit_s']:.1f} s / {t['total_s']:.1f} s"
         + ("  (resumed: the fit time counts every session)" if r.get("resumed") else "")),
    ]
    for k, v in rows:
        if v is not None:
            summary.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    stderr_console().print(summary)


def register(app: typer.Typer) -> None:
    app.command()(train)
