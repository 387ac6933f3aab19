"""Carry an LM-Steer steer to another model by an explicit form, then calibrate its value.

A steer on the source is W_s = A_s B_sᵀ (A_s, B_s: d_s x r). Its logit shift is
``Δz_v = ε (hᵀA)(Bᵀe_v)``: B meets output embeddings, A meets final hidden states
(DESIGN.md §3). With the vocabulary maps of :mod:`steerport.mapping` (e_s ≈ H e_t, e_t ≈ G e_s)
every form keeps the rank and writes the target factors as A_t = P_A A_s, B_t = P_B B_s
(P_A, P_B: d_t x d_s)::

    form         P_A              P_B   reads                         assumption about hidden states
    paper        Hᵀ               Hᵀ    embeddings + tokenizers        h_s = H h_t (H near orthogonal)
    logit        G  (fitted)      Hᵀ    embeddings + tokenizers        similar logits on shared tokens
    logit-pinv   H⁺               Hᵀ    embeddings + tokenizers        same, G = H⁺
    hidden       Kᵀ               Hᵀ    both full models, one pass     h_s ≈ K h_t fitted on neutral text
    anchor       N (Adam, unit rows) N  embeddings + tokenizers        the original LM-Steer code's recipe

**Default: ``logit``** (fitted G). DESIGN.md §3 measured, as held-out steer-as-classifier
AUC on Gemma-3 for steers from SmolLM2: paper form 0.51 / 0.42 (chance / inverted), logit
with H⁺ 0.74 / 0.72, logit with fitted G 0.75 / 0.73, hidden-state map 0.85 / 0.74 (native
0.86 / 0.75), anchor 0.39. The hidden-state map is best where measured, but it needs both
full models (for ``transfer gpt2 gpt-j`` that is a 24 GB load) while the logit form needs only
the two output-embedding matrices and tokenizers, and it is the best of those; fitted G edged
out H⁺ on both tasks. So the default keeps transfer cheap and embeddings-only; choose
``--form hidden`` when both models fit. The evaluator's benchmark settles the default.

**Calibration.** The same value s rarely means the same strength on two models. ``kl``
(needs both full models) scales ε₀ so that the mean KL from the unsteered model on neutral
text at a reference value equals the source's (fixed-point iteration on κ ∝ s²). ``embed``
(embeddings only) matches the RMS centred logit shift over the aligned vocabulary at proxy
hidden states: unit aligned source embedding rows p_s and target states p_t = X_t⁺X_s p_s,
which give the same logits on shared tokens — it corrects the shrinkage or mis-scaling of
an imperfect map but knows nothing about the models' real hidden states.
``auto`` = ``kl`` when full models are loaded anyway (hidden form), else ``embed``.
The anchor baseline is never calibrated (as in the original code).

Example::

    steer = Steer.load("positive.st")
    res = transfer(steer, "smollm2-135m", "gemma3-270m")
    res.steer.save("positive.gemma3-270m.st"); print(res.lineage["calibration"])
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerport.errors import SteerportError
from steerport.hooks import input_of
from steerport.linmap import fit_linear, map_quality, split_pairs
from steerport.mapping import FitOptions, Mapping, get_mapping
from steerport.models import LoadedModel, ModelEmbeddings, load_embeddings, load_model
from steerport.steer import Steer
from steerport.vocab import align_vocab, raw_shared_tokens

FORMS = ("logit", "logit-pinv", "paper", "hidden", "anchor")
DEFAULT_FORM = "logit"
CALIBRATIONS = ("auto", "embed", "kl", "none")
NEUTRAL_TEXT = Path(__file__).parent / "data" / "text" / "neutral_360.txt"
Log = Callable[[str], None]


def neutral_texts(part: str = "all") -> list[str]:
    """Bundled neutral paragraphs: ``hidden`` = first 300 (hidden-map fit), ``calib`` = last 60."""
    lines = [ln for ln in NEUTRAL_TEXT.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return {"hidden": lines[:300], "calib": lines[300:], "all": lines}[part]


@dataclass
class TransferOptions:
    """Everything that decides how a steer is carried (recorded in the output's lineage)."""

    form: str = DEFAULT_FORM
    fit: FitOptions = field(default_factory=FitOptions)
    calibrate: str = "auto"
    calib_value: float = 1.0  # reference steer value at which strengths are matched
    calib_texts: Sequence[str] | None = None  # default: neutral_texts("calib")[:32]
    calib_max_tokens: int = 64
    hidden_texts: Sequence[str] | None = None  # default: neutral_texts("hidden")
    hidden_max_tokens: int = 128
    hidden_ridge: float = 0.0  # relative ridge for K (0 = plain least squares)
    anchor_steps: int = 10_000  # the anchor's defaults: Adam, lr 1e-3, 10k steps, top 4000 tokens
    anchor_lr: float = 1e-3
    anchor_top_k: int = 4000
    dtype: str = "float32"  # for full models (hidden form, kl calibration)
    device: str = "cpu"

    def __post_init__(self):
        if self.form not in FORMS:
            raise SteerportError(f"unknown transfer form {self.form!r}; use one of {', '.join(FORMS)}")
        if self.calibrate not in CALIBRATIONS:
            raise SteerportError(f"unknown calibration {self.calibrate!r}; use one of {', '.join(CALIBRATIONS)}")
        if not self.calib_value > 0:
            raise SteerportError(f"calibration value must be positive, got {self.calib_value}")

    def calibration_method(self) -> str:
        if self.form == "anchor":
            return "none"
        if self.calibrate == "auto":
            return "kl" if self.form == "hidden" else "embed"
        return self.calibrate


@dataclass
class TransferResult:
    steer: Steer  # the target steer, lineage in steer.meta["lineage"]
    mapping: Mapping | None
    lineage: dict[str, Any]


# --------------------------------------------------------------------------- the math


def carry_factors(steer: Steer, P_A: torch.Tensor, P_B: torch.Tensor) -> dict[str, torch.Tensor]:
    """A_t = P_A A_s, B_t = P_B B_s for the steer and its domain part; P: (d_t, d_s), A, B: (d_s, r)."""
    out = {"A": P_A @ steer.A, "B": P_B @ steer.B}  # (d_t, r) each
    if "domain.A" in steer.tensors:
        out["domain.A"] = P_A @ steer.tensors["domain.A"]
        out["domain.B"] = P_B @ steer.tensors["domain.B"]
    return out


def rms_logit_shift(P: torch.Tensor, A: torch.Tensor, X: torch.Tensor, B: torch.Tensor) -> float:
    """RMS over proxy hidden states p (rows of P) and tokens (rows of X, centred) of (pᵀA)(Bᵀx).

    ‖(P A)(X̃ B)ᵀ‖²_F = trace[(PA)ᵀ(PA) · (X̃B)ᵀ(X̃B)] with r x r matrices only; never n x n.
    """
    PA = (P.double() @ A.double())  # (m, r)
    XB = X.double() @ B.double()  # (n, r)
    XB = XB - XB.mean(0)  # a shift shared by all tokens does not change the distribution
    sq = torch.trace((PA.T @ PA) @ (XB.T @ XB))
    return math.sqrt(max(float(sq), 0.0) / (len(P) * len(X)))


def embed_calibration(steer: Steer, factors: dict[str, torch.Tensor], X_s: torch.Tensor, X_t: torch.Tensor,
                      max_proxies: int = 4096, max_pairs: int = 16384, seed: int = 0) -> dict[str, Any]:
    """Factor f for ε₀ so the target's RMS logit shift equals the source's (see module doc).

    X_s, X_t: aligned output-embedding rows (n, d_s), (n, d_t). Proxy source hidden states p_s
    are unit aligned source rows; their target partners p_t = T p_s solve X_t p_t ≈ X_s p_s in
    least squares (the same logits on shared tokens), T = X_t⁺ X_s (d_t x d_s) — fitted here,
    independent of the map used to carry the steer, so a mis-scaled map is corrected.
    """
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(X_s), generator=g)[:max_pairs]  # a random subset of pairs is plenty
    X_s, X_t = X_s[rows], X_t[rows]
    idx = torch.randperm(len(X_s), generator=g)[:max_proxies]
    P_s = X_s[idx] / X_s[idx].norm(dim=1, keepdim=True).clamp_min(1e-12)  # (m, d_s)
    T, _ = fit_linear(X_t, X_s, "lstsq")  # (d_t, d_s): X_s ≈ X_t T
    P_t = P_s @ T.T  # (m, d_t)
    rms_s = rms_logit_shift(P_s, steer.A, X_s, steer.B)
    rms_t = rms_logit_shift(P_t, factors["A"], X_t, factors["B"])
    if rms_t <= 0 or not math.isfinite(rms_t):
        raise SteerportError("transferred steer has no effect on the target's logits; cannot calibrate")
    return {"method": "embed", "factor": rms_s / rms_t, "rms_logit_shift_src": rms_s,
            "rms_logit_shift_tgt_uncalibrated": rms_t, "n_proxy_states": len(P_s), "n_pairs": len(X_s)}


def kl_calibration(steer_s: Steer, steer_t: Steer, src_lm: LoadedModel, tgt_lm: LoadedModel,
                   texts: Sequence[str], value: float, max_tokens: int, iters: int = 5, tol: float = 0.03,
                   log: Log = lambda m: None) -> dict[str, Any]:
    """Factor f with κ_t(f·value) = κ_s(value), κ = mean KL from the unsteered model on ``texts``.

    κ grows about as s² for moderate s, so f ← f·sqrt(κ_s / κ_t(f)) converges in a few steps.
    """
    from steerport.scoring import mean_kl

    k_s = mean_kl(src_lm, texts, [(steer_s, value)], max_tokens=max_tokens)
    f, trace = 1.0, []
    for _ in range(iters):
        k_t = mean_kl(tgt_lm, texts, [(steer_t, value * f)], max_tokens=max_tokens)
        trace.append({"factor": f, "kappa_tgt": k_t})
        log(f"  calibration: factor {f:.4g} -> κ_tgt {k_t:.4g} (κ_src {k_s:.4g})")
        if k_t <= 0:
            raise SteerportError("transferred steer does not change the target's outputs; cannot calibrate")
        if abs(math.log(k_t / k_s)) < tol:
            break
        f *= math.sqrt(k_s / k_t)
    else:
        k_t = mean_kl(tgt_lm, texts, [(steer_t, value * f)], max_tokens=max_tokens)
        trace.append({"factor": f, "kappa_tgt": k_t})
    return {"method": "kl", "factor": f, "reference_value": value, "kappa_src": k_s, "kappa_tgt": k_t,
            "n_texts": len(texts), "max_tokens": max_tokens, "iterations": trace}


# --------------------------------------------------------------------------- hidden-state map


@torch.no_grad()
def final_hidden_states(lm: LoadedModel, texts: Sequence[str], *, max_tokens: int = 128,
                        batch_size: int = 8) -> list[tuple[torch.Tensor, dict[int, int]]]:
    """Per text: the LM head's inputs (T, d) float32 and {character end offset: position}.

    Special and zero-width tokens (BOS) are left out of the offset index; when several tokens
    end at the same character (a character split into bytes), the last one is kept.
    """
    tok = lm.tokenizer
    if not getattr(tok, "is_fast", False):
        raise SteerportError(f"{lm.spec}: the hidden-state map needs a fast tokenizer (character offsets)")
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens,
                  return_offsets_mapping=True, return_special_tokens_mask=True)
        h = input_of(lm.model, lm.lm_head, input_ids=enc["input_ids"].to(lm.device),
                     attention_mask=enc["attention_mask"].to(lm.device)).float().cpu()  # (b, T, d)
        for b in range(len(chunk)):
            ends: dict[int, int] = {}
            for pos, ((s, e), m, sp) in enumerate(zip(enc["offset_mapping"][b].tolist(),
                                                       enc["attention_mask"][b].tolist(),
                                                       enc["special_tokens_mask"][b].tolist())):
                if m and not sp and e > s:
                    ends[e] = pos
            out.append((h[b], ends))
    return out


@dataclass
class HiddenMap:
    """K (d_s x d_t) with h_s ≈ K h_t on final hidden states at character-aligned positions."""

    K: torch.Tensor
    diagnostics: dict[str, Any]


def fit_hidden_map(src_lm: LoadedModel, tgt_lm: LoadedModel, texts: Sequence[str], *, max_tokens: int = 128,
                   ridge: float = 0.0, holdout: float = 0.1, seed: int = 0) -> HiddenMap:
    """Run both models on the same texts, pair positions whose tokenizations end at the same
    character, and fit h_s ≈ K h_t by least squares (ridge relative, 0 = none)."""
    t0 = time.perf_counter()
    hs = final_hidden_states(src_lm, texts, max_tokens=max_tokens)
    ht = final_hidden_states(tgt_lm, texts, max_tokens=max_tokens)
    rows_s, rows_t = [], []
    for (Hs, es), (Ht, et) in zip(hs, ht):
        common = sorted(set(es) & set(et))
        rows_s.append(Hs[[es[c] for c in common]])
        rows_t.append(Ht[[et[c] for c in common]])
    Ys, Xt = torch.cat(rows_s), torch.cat(rows_t)  # (n, d_s), (n, d_t)
    n = len(Ys)
    if n <= Xt.shape[1]:
        raise SteerportError(f"only {n} aligned positions for a {Xt.shape[1]}-dim hidden map; give more neutral text")
    train, held = split_pairs(n, holdout, seed)
    M, _ = fit_linear(Xt[train], Ys[train], "ridge" if ridge > 0 else "lstsq", ridge=ridge)  # (d_t, d_s) = Kᵀ
    diag: dict[str, Any] = {"n_positions": n, "n_texts": len(texts), "max_tokens": max_tokens, "ridge": ridge,
                            "seconds": None}
    if len(held):
        q = map_quality(Xt[held] @ M, Ys[held])
        diag["heldout"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()}
    diag["seconds"] = round(time.perf_counter() - t0, 2)
    return HiddenMap(K=M.T.contiguous(), diagnostics=diag)


# --------------------------------------------------------------------------- anchor baseline


def anchor_fit(X_s: torch.Tensor, X_t: torch.Tensor, *, steps: int = 10_000, lr: float = 1e-3,
               top_k: int = 4000, seed: int = 0, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """The original LM-Steer transfer map, faithfully: from random starts, Adam fits
    X_s B_f ≈ X_t and X_t B_b ≈ X_s (mean squared error) on the first ``top_k`` shared tokens,
    then B_b's rows are scaled to unit length. Returns N = B_b (d_t x d_s); A_t = N A_s, B_t = N B_s.
    """
    torch.manual_seed(seed)
    Xs, Xt = X_s[:top_k].float(), X_t[:top_k].float()
    B_f = torch.randn(Xs.shape[1], Xt.shape[1], requires_grad=True)
    B_b = torch.randn(Xt.shape[1], Xs.shape[1], requires_grad=True)
    opt = torch.optim.Adam([B_f, B_b], lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss = (Xs @ B_f - Xt).pow(2).mean() + (Xt @ B_b - Xs).pow(2).mean()
        loss.backward()
        opt.step()
        if progress:
            progress(step)
    N = B_b.detach()
    return N / N.norm(dim=1, keepdim=True)


# --------------------------------------------------------------------------- orchestration


def _embeddings(model: str | ModelEmbeddings | LoadedModel) -> ModelEmbeddings:
    if isinstance(model, ModelEmbeddings):
        return model
    if isinstance(model, LoadedModel):
        return ModelEmbeddings.from_loaded(model)
    return load_embeddings(model)


def check_source(steer: Steer, src: ModelEmbeddings, force: bool = False) -> None:
    """Refuse a steer that was not made for the source model (or is not an LM-Steer steer)."""
    if steer.kind != "lm-steer":
        other = {"actadd": "steerport actadd-transfer", "token-prob": "steerport token-transfer"}.get(steer.kind)
        raise SteerportError(f"only lm-steer steers are carried by a vocabulary map; this one is {steer.kind!r}"
                             + (f": use `{other}`" if other else ""))
    if steer.hidden_size != src.hidden_size:
        raise SteerportError(f"steer has hidden size {steer.hidden_size} but source {src.spec!r} has {src.hidden_size}")
    want = steer.model.get("fingerprint")
    if want != src.fingerprint and not force:
        raise SteerportError(
            f"steer was made for {steer.model.get('spec')!r} (fingerprint {want}) but source {src.spec!r} has "
            f"fingerprint {src.fingerprint}; give the steer's own model as SRC (or --force)"
        )


def transfer(
    steer: Steer,
    src: str | ModelEmbeddings | LoadedModel,
    tgt: str | ModelEmbeddings | LoadedModel,
    options: TransferOptions | None = None,
    *,
    mapping: Mapping | None = None,
    mapping_path: str | Path | None = None,
    src_lm: LoadedModel | None = None,
    tgt_lm: LoadedModel | None = None,
    source_path: str | None = None,
    force: bool = False,
    log: Log = lambda m: None,
) -> TransferResult:
    """Carry ``steer`` from ``src`` to ``tgt`` (specs, embeddings or loaded models).

    Reads only embeddings and tokenizers unless the form is ``hidden`` or calibration is
    ``kl``; then both full models are loaded (or taken from ``src_lm``/``tgt_lm``).
    """
    opt = options or TransferOptions()
    t0 = time.perf_counter()
    if isinstance(src, LoadedModel):
        src_lm = src_lm or src
    if isinstance(tgt, LoadedModel):
        tgt_lm = tgt_lm or tgt
    src_e, tgt_e = _embeddings(src), _embeddings(tgt)
    check_source(steer, src_e, force)
    timings: dict[str, float] = {"load_embeddings": round(time.perf_counter() - t0, 3)}
    calib_method = opt.calibration_method()
    lineage: dict[str, Any] = {
        "source_steer": {"fingerprint": steer.fingerprint, "path": source_path, "model": dict(steer.model),
                         "epsilon": steer.epsilon, "rank": steer.rank, "meta": steer.meta},
        "source": {"spec": src_e.spec, "fingerprint": src_e.fingerprint, "hidden_size": src_e.hidden_size},
        "target": {"spec": tgt_e.spec, "fingerprint": tgt_e.fingerprint, "hidden_size": tgt_e.hidden_size},
        "form": opt.form,
    }

    need_models = opt.form == "hidden" or calib_method == "kl"
    if need_models:
        t = time.perf_counter()
        src_lm = src_lm or load_model(src_e.spec, dtype=opt.dtype, device=opt.device)
        tgt_lm = tgt_lm or load_model(tgt_e.spec, dtype=opt.dtype, device=opt.device)
        timings["load_models"] = round(time.perf_counter() - t, 3)

    m: Mapping | None = None
    t = time.perf_counter()
    al = align_vocab(src_e.tokenizer, tgt_e.tokenizer) if opt.form != "anchor" else None
    timings["align"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    if opt.form == "anchor":
        s_ids, t_ids = raw_shared_tokens(src_e.tokenizer, tgt_e.tokenizer)
        if len(s_ids) == 0:
            raise SteerportError(f"{src_e.spec} and {tgt_e.spec} share no token strings; the anchor recipe cannot run")
        log(f"anchor baseline: Adam {opt.anchor_steps} steps on the first {min(opt.anchor_top_k, len(s_ids))} "
            f"of {len(s_ids)} raw shared tokens")
        N = anchor_fit(src_e.embeddings[s_ids], tgt_e.embeddings[t_ids], steps=opt.anchor_steps, lr=opt.anchor_lr,
                       top_k=opt.anchor_top_k)
        P_A = P_B = N
        lineage["anchor"] = {"raw_shared_tokens": len(s_ids), "top_k": opt.anchor_top_k, "steps": opt.anchor_steps,
                             "lr": opt.anchor_lr, "optimizer": "Adam", "init": "randn, seed 0",
                             "rows": "unit-normalized", "form": "W_t = N W_s Nᵀ (paper form with H = Nᵀ)"}
    else:
        if mapping is not None:
            m, how = mapping, "given"
            m.check(src_e.fingerprint, tgt_e.fingerprint)
        else:
            m, how = get_mapping(src_e, tgt_e, opt.fit, path=mapping_path, log=log, alignment=al)
        log(f"mapping: {how}")
        H, G = m.H, m.G  # (d_s, d_t), (d_t, d_s)
        lineage["mapping"] = {"source": how, "method": m.options.method, "options": m.options.to_dict(),
                              "n_pairs": m.n_pairs, "coverage": {"src": m.alignment.get("coverage_src"),
                                                                 "tgt": m.alignment.get("coverage_tgt")},
                              "diagnostics": m.diagnostics}
        P_B = H.T
        if opt.form == "paper":
            P_A = H.T
        elif opt.form == "logit":
            P_A = G
        elif opt.form == "logit-pinv":
            P_A = torch.linalg.pinv(H.double()).float()
        else:  # hidden
            texts = list(opt.hidden_texts) if opt.hidden_texts is not None else neutral_texts("hidden")
            log(f"fitting the hidden-state map on {len(texts)} neutral texts")
            hm = fit_hidden_map(src_lm, tgt_lm, texts, max_tokens=opt.hidden_max_tokens, ridge=opt.hidden_ridge)
            P_A = hm.K.T
            lineage["hidden_map"] = hm.diagnostics
    timings["map"] = round(time.perf_counter() - t, 3)
    factors = carry_factors(steer, P_A, P_B)

    t = time.perf_counter()
    base = Steer("lm-steer", factors, steer.epsilon, positive=steer.positive,
                 model={"spec": tgt_e.spec, "fingerprint": tgt_e.fingerprint})
    if calib_method == "none":
        calib: dict[str, Any] = {"method": "none", "factor": 1.0}
    elif calib_method == "embed":
        calib = embed_calibration(steer, factors, src_e.embeddings[al.src_ids], tgt_e.embeddings[al.tgt_ids])
    else:
        texts = list(opt.calib_texts) if opt.calib_texts is not None else neutral_texts("calib")[:32]
        log(f"calibrating on {len(texts)} neutral texts at reference value {opt.calib_value:g}")
        calib = kl_calibration(steer, base, src_lm, tgt_lm, texts, opt.calib_value, opt.calib_max_tokens, log=log)
    timings["calibrate"] = round(time.perf_counter() - t, 3)
    timings["total"] = round(time.perf_counter() - t0, 3)
    calib = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in calib.items()}
    lineage.update(calibration=calib, options={k: v for k, v in asdict(opt).items()
                                               if k not in ("calib_texts", "hidden_texts", "fit")},
                   seconds=timings, steerport_version=_version(),
                   created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    meta = {"lineage": lineage}  # the source's training metadata lives in lineage.source_steer.meta
    out = Steer("lm-steer", factors, steer.epsilon * calib["factor"], positive=steer.positive,
                model={"spec": tgt_e.spec, "fingerprint": tgt_e.fingerprint}, meta=meta)
    return TransferResult(steer=out, mapping=m, lineage=lineage)


def _version() -> str:
    from steerport import __version__

    return __version__
