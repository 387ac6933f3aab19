"""One LM-Steer training run: the body pass once, then the fit on the LM head alone.

The model body is frozen, so its output does not change while the steer learns. The run
caches the final hidden states ``h`` (the LM head's input) of every predicted position once
(:func:`steerport.capture.cache_hidden`) and fits the factors on them
(:class:`~steerport.train.fitter.Fitter`), which is exactly the model's loss with the hook
``h ← h + s·ε₀·B(Aᵀh)`` (steerport.hooks). Held-out evaluations drive early stopping; the
kept steer is the best one seen.

Example::

    lm = load_model("smollm2-135m")
    data = load_data(DataOptions(files=["sst2"]))
    result = train(lm, data, TrainConfig(rank=8), workdir="pos.st.work")
    result.steer.save("pos.st")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from steerport import __version__, distributed
from steerport.capture import cache_hidden, tokenize
from steerport.data import Dataset
from steerport.errors import SteerportError
from steerport.fileio import atomic_write_json
from steerport.models import LoadedModel, parse_dtype
from steerport.steer import Steer
from steerport.train.checkpoint import (
    CHECKPOINT,
    StopFlag,
    load_checkpoint,
    prepare_workdir,
    run_key,
    save_checkpoint,
)
from steerport.train.config import TrainConfig
from steerport.train.fitter import Fitter, batch_for_step
from steerport.train.headloss import check_head_matches
from steerport.train.summary import summarize
from steerport.train.topk import TopKWriter

ProgressFn = Callable[[str, dict[str, Any]], None]
NOT_IN_FIT_KEY = ("cache_tokens_per_batch", "checkpoint_every")  # settings that do not change the result


@dataclass
class TrainResult:
    """The trained steer and what the run measured."""

    steer: Steer
    results: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def train(
    lm: LoadedModel,
    data: Dataset,
    config: TrainConfig | None = None,
    *,
    workdir: str | Path | None = None,
    progress: ProgressFn | None = None,
    stop_after_step: int | None = None,
    init: Steer | None = None,
) -> TrainResult:
    """Train an LM-Steer steer on ``data``: cache the body's output once, fit A, B on the head.

    With a ``workdir``, the cache and checkpoints live there and an interrupted run
    (Ctrl-C, SIGTERM, kill) resumes where it stopped; identical data and settings give the
    identical steer either way. ``progress(phase, info)`` receives updates ("cache", "fit",
    "eval"). ``stop_after_step`` simulates an interruption after that step (tests).
    ``init`` starts the fit from an existing steer of this model (a warm start, e.g. from a
    transferred steer) instead of random factors; its rank replaces ``config.rank``. The init is
    evaluated on the held-out subset at step 0 and counts as the best so far, so the run returns it
    unchanged unless a later evaluation beats it (``results["init_heldout_loss"]``).
    """
    config = config or TrainConfig()
    if init is not None:
        _check_init(lm, init)
        config = replace(config, rank=init.rank)
    config.check()
    t_start = time.perf_counter()
    texts = [e.text for e in data.train] + [e.text for e in data.heldout]
    labels = torch.tensor([e.label for e in data.train] + [e.label for e in data.heldout])  # (n_texts,)
    world = distributed.current_world()  # under accelerate launch / torchrun: this process's share of the body pass
    distributed.check_size(world, len(texts))
    distributed.join(world)
    n_train_texts = len(data.train)
    token_lists = tokenize(lm.tokenizer, texts, config.max_tokens)
    if sum(len(t) - 1 for t in token_lists[:n_train_texts] if len(t) > 1) == 0:
        raise SteerportError("the training texts have no tokens to predict (each is a single token)")
    model_dtype = lm.dtype  # the body runs as loaded; config.dtype sets the fit's compute dtype
    cache_key = run_key({"model": lm.fingerprint, "spec": lm.spec, "tokens": run_key(token_lists),
                         "dtype": str(model_dtype), "cache_dtype": config.cache_dtype})
    fit_key = run_key({"cache": cache_key, "labels": labels.tolist(), "n_train": n_train_texts,
                       "init": init.fingerprint if init is not None else None,
                       **{k: v for k, v in asdict(config).items() if k not in NOT_IN_FIT_KEY}})
    wd = Path(workdir) if workdir is not None else None
    resumed = distributed.main_first(world, wd, lambda: prepare_workdir(wd, cache_key, fit_key))
    notify = progress or (lambda phase, info: None)
    timings: dict[str, float] = {}

    compute_dtype = parse_dtype(config.dtype, str(lm.device))
    head = config.head if config.head != "auto" else ("exact" if lm.softcap else "topk")
    if head == "topk" and lm.softcap:
        raise SteerportError(f"{lm.spec}: head='topk' does not support logit softcapping; use head='exact'")
    cache_dtype = parse_dtype(config.cache_dtype)
    n_pos = int(sum(max(len(t) - 1, 0) for t in token_lists))
    writer = None
    if head == "topk" and world.is_main:  # the candidates and tail statistics ride on the body pass (one head pass in all)
        E = lm.output_embeddings.detach().to(dtype=compute_dtype)
        bias = None if lm.lm_head_bias is None else lm.lm_head_bias.detach().float()
        writer = TopKWriter(n_pos, lm.hidden_size, config.topk, E, bias, cache_dtype, path=wd,
                            key=f"{cache_key}:{compute_dtype}")

    def observe(pos: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> None:
        assert writer is not None
        writer(pos, h, y)
        writer.flush()

    with StopFlag() as flag:
        # ---- phase 1: the body, once (and the head once, for the top-k statistics)
        t0 = time.perf_counter()
        check_head_matches(lm, min((t for t in token_lists if len(t) > 1), key=len))
        notify("cache-start", {"texts": len(texts), "tokens": n_pos})
        cache_args: dict[str, Any] = dict(
            predicted_only=True, dtype=cache_dtype, tokens_per_batch=config.cache_tokens_per_batch,
            workdir=wd, progress=lambda n, k: notify("cache", {"texts": n, "tokens": k}), should_stop=lambda: flag.stop)
        if world.size > 1:  # each rank caches its share; rank 0 gathers them, fills the top-k statistics and fits
            shared = distributed.cache_hidden_sharded(world, lm, token_lists, key=cache_key, **cache_args)
            if shared is None:
                return distributed.share(world, None)
            cache = shared
        else:
            cache = cache_hidden(lm, token_lists=token_lists, **cache_args, in_memory_bytes=0,
                                 observe=observe if writer is not None else None)
        timings["cache_s"] = time.perf_counter() - t0
        if wd is not None:
            atomic_write_json(wd / "cache.done", {"key": cache_key, "seconds": timings["cache_s"]})

        # ---- phase 2: the fit on the cache
        fitter = Fitter(lm, cache, labels, config)
        if init is not None:  # the init steer's scale folded into A, at this run's base scale ε₀
            fitter.load_tensors({**fitter.tensors(), "A": init.A * (init.epsilon / config.epsilon), "B": init.B})
        is_train = cache.text_id < n_train_texts
        train_idx = torch.nonzero(is_train).flatten()
        held_idx = torch.nonzero(~is_train).flatten()
        if writer is not None:
            t_stats = time.perf_counter()
            if int((writer.done == 0).sum()):  # a cache made without statistics: one head pass over it now
                notify("stats-start", {"tokens": int((writer.done == 0).sum())})
                writer.fill_missing(cache, progress=lambda n: notify("stats", {"tokens": n}))
            writer.add_tail_covariance(cache, train_idx)  # the tail's second-order term, from a few training positions
            fitter.stats = writer.stats
            timings["topk_stats_s"] = time.perf_counter() - t_stats
        eval_idx = _eval_subset(held_idx, config.eval_tokens, config.seed)
        per_epoch = math.ceil(len(train_idx) / config.tokens_per_batch)
        total_steps = config.steps or max(1, math.ceil(config.epochs * per_epoch))
        # an evaluation (forward only, n_eval positions) costs ~n_eval / (3 T) of a step (forward + backward, T positions):
        # every 4 n_eval / T steps keeps the evaluations under ~10 % of the fit
        eval_every = config.eval_every or max(1, math.ceil(4 * len(eval_idx) / config.tokens_per_batch))
        state: dict[str, Any] = {"step": 0, "best_loss": None, "best_step": 0, "bad_evals": 0, "ref_loss": None,
                                 "history": [], "stopped": None, "fit_seconds": 0.0, "fit_key": fit_key}
        best = fitter.tensors()
        ckpt = wd / CHECKPOINT if wd is not None else None
        if ckpt is not None and ckpt.exists():
            best, state = load_checkpoint(ckpt, fitter)
        base_eval = None
        if len(eval_idx):  # the unsteered held-out loss: what the steer's gain is measured from
            base_eval = (float(fitter.stats.base_loss(eval_idx).double().mean()) if fitter.stats is not None
                         else fitter.mean_loss(eval_idx, sign=0.0, exact=True))
        notify("fit-start", {"steps": total_steps, "start": state["step"], "tokens_per_step": config.tokens_per_batch,
                             "per_epoch": per_epoch})
        if init is not None and len(eval_idx) and state["step"] == 0 and not state["history"]:
            # a warm start's step 0 is a candidate too: the fit returns something else only if it beats the init
            held = fitter.mean_loss(eval_idx)
            state["history"].append({"step": 0, "heldout_loss": held, "seconds": round(time.perf_counter() - t_start, 3)})
            notify("eval", {"step": 0, "heldout_loss": held, "factors": fitter.tensors})
            _early_stopping(state, held, base_eval, config)
        fit_clock = time.perf_counter() - state["fit_seconds"]
        while state["step"] < total_steps and state["stopped"] is None:
            step = state["step"]
            idx = batch_for_step(train_idx, step, config.tokens_per_batch, config.seed)
            last_loss = fitter.step(idx)
            state["step"] = step + 1
            notify("fit", {"step": step + 1, "loss": last_loss, "tokens": len(idx)})
            if len(eval_idx) and (state["step"] % eval_every == 0 or state["step"] == total_steps):
                held = fitter.mean_loss(eval_idx)  # the run's head (top-k: the approximation) on the held-out subset
                state["history"].append({"step": state["step"], "train_loss": last_loss, "heldout_loss": held,
                                         "seconds": round(time.perf_counter() - t_start, 3)})
                notify("eval", {"step": state["step"], "heldout_loss": held, "factors": fitter.tensors})  # factors(): a copy
                _early_stopping(state, held, base_eval, config)
                if state["best_step"] == state["step"]:
                    best = fitter.tensors()
            elif not len(eval_idx):
                best = fitter.tensors()
            state["fit_seconds"] = time.perf_counter() - fit_clock
            interrupted = flag.stop or (stop_after_step is not None and state["step"] >= stop_after_step)
            if ckpt is not None and (interrupted or state["step"] % config.checkpoint_every == 0):
                save_checkpoint(ckpt, fitter, best, state)
            if interrupted and state["step"] < total_steps and state["stopped"] is None:
                raise KeyboardInterrupt
        state["stopped"] = state["stopped"] or "step limit reached"
        timings["fit_s"] = state["fit_seconds"]

    # ---- summary on the held-out texts
    fitter.load_tensors(best)
    t2 = time.perf_counter()
    results = summarize(fitter, held_idx, n_train_texts)
    timings["summary_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t_start
    results.update(steps=state["step"], best_step=state["best_step"], stopped=state["stopped"],
                   epochs=round(state["step"] / per_epoch, 3), resumed=resumed,
                   train_tokens=len(train_idx), heldout_tokens=len(held_idx), head=head,
                   eval_every=eval_every, eval_tokens=len(eval_idx))
    if init is not None and state["history"] and state["history"][0]["step"] == 0:
        results["init_heldout_loss"] = state["history"][0]["heldout_loss"]  # the start, on the evaluation subset
    training = {
        "method": "lm-steer (cached final hidden states, head-only fit)",
        "settings": asdict(config),
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "results": results,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "history": state["history"],
        "init": {"steer": init.fingerprint, "model": dict(init.model), "epsilon": init.epsilon} if init is not None else None,
        "domain": ("always-on domain component domain.A/domain.B at base scale; applied by "
                   "steerport.hooks.steered only with include_domain=True") if config.domain else None,
    }

    steer = Steer(
        "lm-steer", {k: v.float() for k, v in best.items()}, config.epsilon, positive=data.positive_name,
        model={"spec": lm.spec, "fingerprint": lm.fingerprint},
        meta={"training": training, "data": data.summary, "steerport_version": __version__},
    )
    return distributed.share(world, TrainResult(steer, results, state["history"]))


def _check_init(lm: LoadedModel, init: Steer) -> None:
    """Refuse a warm-start steer that is not an lm-steer steer of this very model."""
    if init.kind != "lm-steer":
        raise SteerportError(f"a warm start needs an lm-steer steer, this one is {init.kind!r}")
    if init.hidden_size != lm.hidden_size:
        raise SteerportError(f"the init steer has hidden size {init.hidden_size} but {lm.spec!r} has {lm.hidden_size}; "
                             "transfer it to this model first (steerport transfer)")
    want = init.model.get("fingerprint")
    if want and want != lm.fingerprint:
        raise SteerportError(f"the init steer was made for {init.model.get('spec')!r} (fingerprint {want}), not for "
                             f"{lm.spec!r} ({lm.fingerprint}); transfer it to this model first")


def _eval_subset(held_idx: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A fixed seeded subset of ``n`` held-out positions (all of them when there are fewer), in order."""
    if len(held_idx) <= n:
        return held_idx
    pick = torch.randperm(len(held_idx), generator=torch.Generator().manual_seed(seed + 17))[:n]
    return held_idx[pick.sort().values]


def _early_stopping(state: dict[str, Any], held: float, base: float | None, config: TrainConfig) -> None:
    """Update the loop ``state`` after a held-out evaluation ``held``.

    The best step is the lowest loss seen. Patience resets only on a real improvement: at least
    ``min_improvement`` times the steer's gain so far (``base`` − best) below the loss that last
    reset it, so a fit that creeps on by tiny gains stops after ``patience`` evaluations.
    """
    if state["best_loss"] is None or held < state["best_loss"]:
        state.update(best_loss=held, best_step=state["step"])
    ref = state["ref_loss"]
    gain = max((base if base is not None else held) - state["best_loss"], 0.0)
    if ref is None or held < ref - config.min_improvement * gain:
        state.update(ref_loss=held, bad_evals=0)
    else:
        state["bad_evals"] += 1
        if state["bad_evals"] >= config.patience:
            state["stopped"] = "early stop: held-out loss stopped improving"
