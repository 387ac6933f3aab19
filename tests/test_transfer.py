"""Vocabulary alignment, mapping and transfer: exact identities on tiny models, round-trips, errors."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from steerport.embeddings import ModelEmbeddings
from steerport.errors import SteerportError
from steerport.hooks import steered
from steerport.kinds import get_kind
from steerport.linmap import fit_linear, split_pairs
from steerport.mapping import (
    FitOptions,
    Mapping,
    _fit_direction,
    fit_mapping,
    get_mapping,
)
from steerport.models import LoadedModel
from steerport.steer import Steer
from steerport.transfer import (
    TransferOptions,
    carry_lm_steer,
    transfer,
    transfer_steer,
)
from steerport.vocab import (
    BYTE_LEVEL,
    SENTENCEPIECE,
    WORDPIECE,
    align_vocab,
    byte_decoder,
    detect_convention,
    raw_shared_tokens,
    surface,
)
from tests.tiny import CORPUS, D, random_steer_factors, tiny_model, tiny_tokenizer

TEXTS = sorted(set(CORPUS))


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERPORT_HOME", str(tmp_path / "home"))


# --------------------------------------------------------------------------- building targets


def _sp_name(token: str) -> str:
    """A byte-level token renamed the SentencePiece way (▁ for space, <0xNN> for odd bytes)."""
    raw = bytes(byte_decoder()[c] for c in token)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or (len(raw) == 1 and (raw[0] < 0x20 or raw[0] >= 0x7F)):
        assert len(raw) == 1
        return f"<0x{raw[0]:02X}>"
    return text.replace(" ", "\u2581")


def permuted_tokenizer(tok, perm: torch.Tensor, rename: bool) -> PreTrainedTokenizerFast:
    """The same vocabulary under new ids (new id = perm[old id]); ``rename`` writes it SentencePiece-style.

    Without renaming it is a working BPE tokenizer that splits text exactly like ``tok``; renamed,
    it only carries the vocabulary (a word-level model) for alignment.
    """
    eos = tok.eos_token
    if not rename:
        spec = json.loads(tok.backend_tokenizer.to_str())
        spec["model"]["vocab"] = {t: int(perm[i]) for t, i in spec["model"]["vocab"].items()}
        for added in spec["added_tokens"]:
            added["id"] = int(perm[added["id"]])
        backend = Tokenizer.from_str(json.dumps(spec))
    else:
        vocab = {(t if t == eos else _sp_name(t)): int(perm[i]) for t, i in tok.get_vocab().items()}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos))
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        backend.add_special_tokens([eos])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos)


def transformed_model(lm: LoadedModel, P: torch.Tensor, perm: torch.Tensor, rename: bool = False) -> LoadedModel:
    """A target that is ``lm`` in another basis and vocabulary order.

    Final hidden state h_t = P h_s (a linear layer appended after the final norm, i.e. right
    before the LM head); output embeddings E_t[perm[v]] = E_s[v] P⁻¹, so z_t[perm] = z_s exactly;
    input embeddings only permuted (the body still sees the same vectors).
    """
    model = copy.deepcopy(lm.model)
    E_s = lm.output_embeddings.detach()
    W_in = model.get_input_embeddings().weight.detach().clone()
    V, d = E_s.shape
    inp = torch.nn.Embedding(V, d)
    inp.weight.data[perm] = W_in
    model.set_input_embeddings(inp)
    basis = torch.nn.Linear(d, d, bias=False)
    basis.weight.data = P.clone()
    model.model.norm = torch.nn.Sequential(model.model.norm, basis)
    head = torch.nn.Linear(d, V, bias=False)
    head.weight.data[perm] = E_s @ torch.linalg.inv(P)
    model.set_output_embeddings(head)
    model.config.tie_word_embeddings = False
    model.eval().requires_grad_(False)
    return LoadedModel(spec=f"{lm.spec}-transformed", model=model, tokenizer=permuted_tokenizer(lm.tokenizer, perm, rename))


def random_basis(d: int, orthogonal: bool, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    if orthogonal:
        return Q1
    Q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    s = torch.logspace(-0.3, 0.3, d)  # singular values 0.5 .. 2: invertible, clearly not orthogonal
    return Q1 @ torch.diag(s) @ Q2


def source_steer(lm: LoadedModel, epsilon: float = 0.5) -> Steer:
    A, B = random_steer_factors(D, 3)
    return Steer.lm_steer(A, B, epsilon=epsilon, positive="positive",
                          model={"spec": lm.spec, "fingerprint": lm.fingerprint})


@torch.no_grad()
def logit_shift(lm: LoadedModel, steer: Steer, ids: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    base = lm.model(input_ids=ids).logits
    with steered(lm, [(steer, value)]):
        return lm.model(input_ids=ids).logits - base


def _setup(orthogonal: bool, rename: bool):
    src = tiny_model("llama", seed=0)
    V = src.output_embeddings.shape[0]
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(7))
    tgt = transformed_model(src, random_basis(D, orthogonal), perm, rename)
    ids = src.tokenizer(TEXTS[:3], return_tensors="pt", padding=True)["input_ids"]
    return src, tgt, perm, ids


# --------------------------------------------------------------------------- vocab


def test_byte_level_surfaces():
    assert surface("Ġthe", BYTE_LEVEL) == b" the"
    assert surface("Ċ", BYTE_LEVEL) == b"\n"
    assert surface("ĊĠĠ", BYTE_LEVEL) == b"\n  "
    assert surface("Ã©", BYTE_LEVEL) == "é".encode()  # two byte characters -> one UTF-8 character
    assert surface("Ã", BYTE_LEVEL) == b"\xc3"  # a lone byte of a multi-byte character
    assert len(byte_decoder()) == 256 and sorted(byte_decoder().values()) == list(range(256))


def test_sentencepiece_surfaces_and_byte_fallback():
    assert surface("▁the", SENTENCEPIECE) == b" the"
    assert surface("▁▁", SENTENCEPIECE) == b"  "
    assert surface("<0x0A>", SENTENCEPIECE) == b"\n"
    assert surface("<0xC3>", SENTENCEPIECE) == b"\xc3"
    assert surface("ing", SENTENCEPIECE) == b"ing"
    # the same surface from both families
    assert surface("Ġthe", BYTE_LEVEL) == surface("▁the", SENTENCEPIECE)
    assert surface("Ã", BYTE_LEVEL) == surface("<0xC3>", SENTENCEPIECE)


def test_wordpiece_surfaces():
    assert surface("##ing", WORDPIECE) == b"ing"
    assert surface("the", WORDPIECE) == b" the"
    assert surface("##", WORDPIECE) == b" ##"  # a bare "##" is a word, not a continuation marker


@pytest.mark.parametrize("tok", ["<|endoftext|>", "<|im_start|>", "<unused12>", "[unused3]", "[CLS]", "<pad>",
                                 "<eos>", "<mask>", "<start_of_image>", "<extra_id_5>", ""])
def test_control_tokens_have_no_surface(tok):
    for conv in (BYTE_LEVEL, SENTENCEPIECE, WORDPIECE):
        assert surface(tok, conv) is None


def _wordpiece_tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "the": 4, "movie": 5, "##ing": 6, "##s": 7, "great": 8, "<|endoftext|>": 9}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def test_conventions_detected():
    tok = tiny_tokenizer()
    perm = torch.arange(len(tok))
    assert detect_convention(tok) == BYTE_LEVEL
    assert detect_convention(permuted_tokenizer(tok, perm, rename=True)) == SENTENCEPIECE
    assert detect_convention(_wordpiece_tokenizer()) == WORDPIECE


def test_unserializable_backend_falls_back_to_the_vocabulary_and_other_errors_propagate():
    """A custom (Python) pre-tokenizer cannot be serialized: the vocabulary decides. Any other
    failure of the backend is a bug and is not swallowed."""
    from types import SimpleNamespace

    from tokenizers import pre_tokenizers

    class Split:
        def pre_tokenize(self, pretok):
            pass

    tok = tiny_tokenizer()
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.PreTokenizer.custom(Split())
    backend.decoder = decoders.Metaspace()  # the description would say SentencePiece; it cannot be read
    vocab = {**{f"Ġword{i}": i for i in range(40)}, **{f"piece{i}": 40 + i for i in range(20)}}
    custom = SimpleNamespace(backend_tokenizer=backend, get_vocab=lambda: vocab)
    assert detect_convention(custom) == BYTE_LEVEL  # from the Ġ-marked vocabulary

    def broken():
        raise RuntimeError("backend bug")

    with pytest.raises(RuntimeError, match="backend bug"):
        detect_convention(SimpleNamespace(backend_tokenizer=SimpleNamespace(to_str=broken), get_vocab=tok.get_vocab))


def test_alignment_of_renamed_permuted_vocabulary_and_specials_never_aligned():
    tok = tiny_tokenizer()
    V = len(tok)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    sp = permuted_tokenizer(tok, perm, rename=True)
    al = align_vocab(tok, sp)
    eos = tok.eos_token_id
    assert al.n == V - 1  # everything but the special token
    assert eos not in al.src_ids.tolist() and int(perm[eos]) not in al.tgt_ids.tolist()
    assert torch.equal(perm[al.src_ids], al.tgt_ids)  # every pair is the same token
    assert al.raw_matches < al.n  # raw strings alone miss the Ġ/▁ tokens
    assert al.src.convention == BYTE_LEVEL and al.tgt.convention == SENTENCEPIECE
    rep = al.report()
    assert rep["pairs"] == al.n and rep["source"]["dropped_special"] == 1
    assert math.isclose(rep["coverage_src"], round(al.n / V, 4))


def test_wordpiece_aligns_with_byte_level_and_drops_its_specials():
    bl = {"Ġthe": 0, "Ġmovie": 1, "ing": 2, "s": 3, "Ġgreat": 4, "<|endoftext|>": 5, "[CLS]": 6}
    backend = Tokenizer(models.BPE(vocab=bl, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.decoder = decoders.ByteLevel()
    byte_tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    al = align_vocab(byte_tok, _wordpiece_tokenizer())
    pairs = {s.decode(): (int(a), int(b)) for s, a, b in zip(al.surface_strings, al.src_ids, al.tgt_ids)}
    assert pairs == {" the": (0, 4), " movie": (1, 5), "ing": (2, 6), "s": (3, 7), " great": (4, 8)}


def test_raw_shared_tokens_follow_target_vocab_order():
    tok = tiny_tokenizer()
    perm = torch.randperm(len(tok), generator=torch.Generator().manual_seed(2))
    tgt = permuted_tokenizer(tok, perm, rename=False)
    s, t = raw_shared_tokens(tok, tgt)
    assert len(s) == len(tok)
    assert torch.equal(perm[s], t)
    assert t.tolist() == sorted(t.tolist())  # target vocabulary (file / id) order


# --------------------------------------------------------------------------- mapping


def _planted(n=3000, ds=24, dt=40, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Xt = torch.randn(n, dt, generator=g)
    H = torch.randn(ds, dt, generator=g) / math.sqrt(dt)
    Xs = Xt @ H.T + noise * torch.randn(n, ds, generator=g)
    return Xs, Xt, H


@pytest.mark.parametrize("method", ["lstsq", "ridge"])
def test_planted_linear_relation_recovered(method):
    Xs, Xt, H = _planted()
    train, held = split_pairs(len(Xs), 0.1, 0)
    opts = FitOptions(method=method, ridge=1e-8)
    f, diag = _fit_direction(Xt, Xs, train, held, opts, None)
    assert torch.allclose(f.M.T, H, atol=1e-4)
    assert diag["heldout"]["r2"] > 0.99999
    assert diag["heldout"]["cosine"] > 0.99999
    assert diag["heldout"]["nn_acc"] == 1.0


def test_lstsq_on_rank_deficient_rows_is_the_minimum_norm_solution():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(300, 20, generator=g), torch.randn(300, 5, generator=g)
    M, info = fit_linear(X, Y)
    assert "rank" not in info and torch.allclose(M, torch.linalg.lstsq(X, Y).solution, atol=1e-5)
    X[:, 3] = X[:, 2]  # two identical embedding coordinates
    M, info = fit_linear(X, Y)
    assert info["rank"] == 19
    assert torch.allclose(M, (torch.linalg.pinv(X.double()) @ Y.double()).float(), atol=1e-4)


def test_noise_lowers_heldout_r2_as_expected():
    r2 = {}
    for noise in (0.0, 0.3, 1.0):
        Xs, Xt, _ = _planted(noise=noise)
        train, held = split_pairs(len(Xs), 0.1, 0)
        r2[noise] = _fit_direction(Xt, Xs, train, held, FitOptions(), None)[1]["heldout"]["r2"]
    assert r2[0.0] > 0.99999 > r2[0.3] > r2[1.0]
    # signal variance per coordinate ≈ 1 (H has unit-variance rows): R² ≈ 1 / (1 + σ²)
    assert abs(r2[1.0] - 0.5) < 0.05 and abs(r2[0.3] - 1 / 1.09) < 0.03


def test_procrustes_recovers_scaled_rotation():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    Xt = torch.randn(500, 16, generator=g)
    Xs = 2.5 * Xt @ Q.T
    train, held = split_pairs(500, 0.1, 0)
    f, diag = _fit_direction(Xt, Xs, train, held, FitOptions(method="procrustes"), None)
    assert abs(diag["scale"] - 2.5) < 1e-4
    assert torch.allclose(f.M.T, 2.5 * Q, atol=1e-4)


def test_centering_fits_an_affine_relation():
    Xs, Xt, H = _planted()
    Xs = Xs + 3.0  # an offset a linear map without intercept cannot fit
    train, held = split_pairs(len(Xs), 0.1, 0)
    plain = _fit_direction(Xt, Xs, train, held, FitOptions(), None)[1]["heldout"]["r2"]
    centred, diag = _fit_direction(Xt, Xs, train, held, FitOptions(center=True), None)
    assert diag["heldout"]["r2"] > 0.9999 > plain
    assert torch.allclose(centred.M.T, H, atol=1e-4)


def test_top_k_and_weighting_options_fit_and_are_recorded():
    src, tgt, *_ = _setup(orthogonal=False, rename=True)
    se, te = ModelEmbeddings.from_loaded(src), ModelEmbeddings.from_loaded(tgt)
    m = fit_mapping(se, te, FitOptions(top_k=60, weighting="zipf"))
    assert m.n_train == 60 and m.metadata()["options"]["top_k"] == 60
    assert m.diagnostics["H"]["heldout"]["r2"] > 0.9999  # exact relation: any subset recovers it


def test_mapping_file_round_trip(tmp_path):
    src, tgt, *_ = _setup(orthogonal=False, rename=True)
    se, te = ModelEmbeddings.from_loaded(src), ModelEmbeddings.from_loaded(tgt)
    m = fit_mapping(se, te, FitOptions(center=True))
    path = m.save(tmp_path / "m.safetensors")
    back = Mapping.load(path)
    assert torch.equal(back.H, m.H) and torch.equal(back.G, m.G) and torch.equal(back.mean_src, m.mean_src)
    assert back.metadata() == json.loads(json.dumps(m.metadata()))
    assert back.matches(se.fingerprint, te.fingerprint, FitOptions(center=True))
    assert not back.matches(se.fingerprint, te.fingerprint, FitOptions())
    meta = back.metadata()
    assert meta["source"]["fingerprint"] == se.fingerprint and meta["target"]["spec"] == te.spec
    assert meta["n_pairs"] == m.n_pairs and set(meta["coverage"]) == {"src", "tgt"}
    assert tuple(back.H.shape) == (D, D)
    # the exact relation: e_s = H e_t with H = Pᵀ
    assert m.diagnostics["H"]["heldout"]["r2"] > 0.9999


def test_bad_mapping_files_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x05\x00")
    with pytest.raises(SteerportError, match="truncated"):
        Mapping.load(p)
    with pytest.raises(SteerportError, match="no such mapping"):
        Mapping.load(tmp_path / "missing.safetensors")
    steer_file = tmp_path / "s.st"
    Steer.lm_steer(torch.ones(4, 1), torch.ones(4, 1), epsilon=1.0).save(steer_file)
    with pytest.raises(SteerportError, match="not a steerport mapping"):
        Mapping.load(steer_file)


def test_stale_mapping_refused_or_recomputed(tmp_path):
    src, tgt, *_ = _setup(orthogonal=False, rename=True)
    se, te = ModelEmbeddings.from_loaded(src), ModelEmbeddings.from_loaded(tgt)
    path = tmp_path / "m.safetensors"
    m, how = get_mapping(se, te, path=path)
    assert how.startswith("fitted") and path.exists()
    again, how = get_mapping(se, te, path=path)
    assert how.startswith("reused") and torch.equal(again.H, m.H)
    # the target's weights change: its fingerprint changes
    te2 = ModelEmbeddings(spec=te.spec, embeddings=te.embeddings * 1.5, tokenizer=te.tokenizer)
    assert te2.fingerprint != te.fingerprint
    with pytest.raises(SteerportError, match="stale mapping"):
        get_mapping(se, te2, path=path)
    # without an explicit file the cache is keyed by fingerprints: a fresh map is fitted, never the old one
    get_mapping(se, te)  # caches the first
    fresh, how = get_mapping(se, te2)
    assert how.startswith("fitted")
    assert fresh.target["fingerprint"] == te2.fingerprint
    assert torch.allclose(fresh.H, m.H / 1.5, atol=1e-3)
    # transfer with an explicit stale mapping file is refused
    steer = source_steer(src)
    with pytest.raises(SteerportError, match="stale mapping"):
        transfer(steer, se, te2, TransferOptions(calibrate="none"), mapping_path=path)


# --------------------------------------------------------------------------- exact-map identity


def test_logit_form_reproduces_logit_shifts_under_invertible_basis_change():
    src, tgt, perm, ids = _setup(orthogonal=False, rename=True)
    steer = source_steer(src)
    want = logit_shift(src, steer, ids)  # (b, T, V) in source ids
    assert want.abs().max() > 0.1
    for form in ("logit", "logit-pinv"):
        res = transfer(steer, src, tgt, TransferOptions(form=form, calibrate="none"))
        got = logit_shift(tgt, res.steer, perm[ids])[..., perm]  # back to source vocabulary order
        assert torch.allclose(got, want, atol=2e-4 * want.abs().max()), form
    # the paper's HᵀWH is not exact when the change of basis is not orthogonal
    res = transfer(steer, src, tgt, TransferOptions(form="paper", calibrate="none"))
    got = logit_shift(tgt, res.steer, perm[ids])[..., perm]
    assert (got - want).abs().max() > 0.05 * want.abs().max()


def test_all_forms_exact_under_orthogonal_basis_change():
    src, tgt, perm, ids = _setup(orthogonal=True, rename=False)
    steer = source_steer(src)
    want = logit_shift(src, steer, ids)
    for form in ("paper", "logit", "logit-pinv", "hidden"):
        res = transfer(steer, src, tgt, TransferOptions(form=form, calibrate="none", hidden_texts=TEXTS))
        got = logit_shift(tgt, res.steer, perm[ids])[..., perm]
        assert torch.allclose(got, want, atol=2e-4 * want.abs().max()), form
    assert res.lineage["hidden_map"]["heldout"]["r2"] > 0.9999


def test_hidden_form_exact_under_invertible_basis_change():
    src, tgt, perm, ids = _setup(orthogonal=False, rename=False)
    steer = source_steer(src)
    want = logit_shift(src, steer, ids)
    res = transfer(steer, src, tgt, TransferOptions(form="hidden", calibrate="none", hidden_texts=TEXTS))
    got = logit_shift(tgt, res.steer, perm[ids])[..., perm]
    assert torch.allclose(got, want, atol=2e-4 * want.abs().max())


# --------------------------------------------------------------------------- calibration, lineage, refusals


def test_embed_calibration_is_one_for_an_exact_transfer_and_fixes_a_scaled_map():
    src, tgt, *_ = _setup(orthogonal=False, rename=True)
    steer = source_steer(src)
    res = transfer(steer, src, tgt, TransferOptions(calibrate="embed"))
    assert abs(res.lineage["calibration"]["factor"] - 1) < 1e-3
    assert math.isclose(res.steer.epsilon, steer.epsilon, rel_tol=1e-3)
    # a map that is off by a factor 2 in scale: calibration undoes it
    m = fit_mapping(ModelEmbeddings.from_loaded(src), ModelEmbeddings.from_loaded(tgt))
    m.H, m.G = m.H * 2, m.G * 2
    res2 = carry_lm_steer(steer, src, tgt, TransferOptions(calibrate="embed"), mapping=m)
    assert abs(res2.lineage["calibration"]["factor"] - 0.25) < 1e-3


def test_kl_calibration_matches_kappa():
    from steerport.scoring import mean_kl

    src, tgt, *_ = _setup(orthogonal=False, rename=False)
    steer = source_steer(src, epsilon=0.2)
    res = transfer(steer, src, tgt, TransferOptions(form="paper", calibrate="kl", calib_texts=TEXTS, calib_value=2.0))
    cal = res.lineage["calibration"]
    assert cal["method"] == "kl" and cal["factor"] != 1.0 and cal["converged"]
    k_s = mean_kl(src, TEXTS, [(steer, 2.0)])
    k_t = mean_kl(tgt, TEXTS, [(res.steer, 2.0)])
    assert abs(math.log(k_t / k_s)) < 0.05
    # an exact transfer needs no correction
    exact = transfer(steer, src, tgt, TransferOptions(form="logit", calibrate="kl", calib_texts=TEXTS, calib_value=2.0))
    assert abs(exact.lineage["calibration"]["factor"] - 1) < 0.01


def test_lineage_recorded_and_survives_the_file(tmp_path):
    src, tgt, *_ = _setup(orthogonal=False, rename=True)
    steer = source_steer(src)
    res = transfer(steer, src, tgt, TransferOptions(calibrate="embed"), source_path="pos.st")
    path = res.steer.save(tmp_path / "pos.tgt.st")
    back = Steer.load(path)
    lin = back.meta["lineage"]
    assert lin["source_steer"]["fingerprint"] == steer.fingerprint and lin["source_steer"]["path"] == "pos.st"
    assert lin["form"] == "logit" and lin["mapping"]["method"] == "lstsq"
    assert lin["mapping"]["diagnostics"]["H"]["heldout"]["r2"] > 0.99
    assert lin["calibration"]["method"] == "embed" and "factor" in lin["calibration"]
    assert "strength_curve" not in back.meta  # embeddings only: no curve on the target (see test_strength.py)
    assert back.model["fingerprint"] == tgt.fingerprint and back.rank == steer.rank
    with steered(tgt, [(back, 1.0)]):  # applies to the target without --force
        pass


def test_steer_for_another_model_refused():
    src, tgt, *_ = _setup(orthogonal=False, rename=True)
    other = tiny_model("llama", seed=5)
    steer = source_steer(other)
    with pytest.raises(SteerportError, match="give the steer's own model as SRC"):
        transfer(steer, src, tgt)
    transfer(steer, src, tgt, TransferOptions(calibrate="none"), force=True)  # forced: allowed
    actadd = Steer("actadd", {"vector": torch.ones(D)}, 1.0, model={"fingerprint": src.fingerprint})
    with pytest.raises(SteerportError, match="only lm-steer"):
        carry_lm_steer(actadd, src, tgt)


def test_bad_options_refused():
    with pytest.raises(SteerportError, match="unknown transfer form"):
        TransferOptions(form="magic")
    with pytest.raises(SteerportError, match="unknown calibration"):
        TransferOptions(calibrate="loud")
    with pytest.raises(SteerportError, match="unknown mapping method"):
        FitOptions(method="svd")
    with pytest.raises(SteerportError, match="unknown ActAdd transfer method"):
        TransferOptions(actadd_method="guess")
    with pytest.raises(SteerportError, match="calib_count must be positive"):
        TransferOptions(calib_count=0)


# --------------------------------------------------------------------------- exact maps carry the steer exactly


@pytest.mark.parametrize("form", ["paper", "logit", "logit-pinv", "hidden"])
def test_exact_map_carries_the_factors_exactly(form):
    """Identical models, then an orthogonal change of basis P (h_t = P h_s, E_t = E_s Pᵀ): every
    form gives A_t = P A_s and B_t = P B_s, and both calibrations leave the value alone."""
    src = tiny_model("llama", seed=0)
    steer = source_steer(src)
    same = transfer_steer(steer, src, src, TransferOptions(form=form, calibrate="embed", hidden_texts=TEXTS))
    assert torch.allclose(same.steer.A, steer.A, atol=1e-4) and torch.allclose(same.steer.B, steer.B, atol=1e-4)
    assert abs(same.lineage["calibration"]["factor"] - 1) < 1e-4
    V = src.output_embeddings.shape[0]
    P = random_basis(D, orthogonal=True)
    tgt = transformed_model(src, P, torch.randperm(V, generator=torch.Generator().manual_seed(7)))
    res = transfer_steer(steer, src, tgt, TransferOptions(form=form, calibrate="kl", calib_texts=TEXTS[:4],
                                                          hidden_texts=TEXTS))
    assert torch.allclose(res.steer.A, P @ steer.A, atol=1e-4) and torch.allclose(res.steer.B, P @ steer.B, atol=1e-4)
    cal = res.lineage["calibration"]
    assert cal["method"] == "kl" and abs(cal["factor"] - 1) < 1e-3 and len(cal["iterations"]) == 1
    assert math.isclose(res.steer.epsilon, steer.epsilon, rel_tol=1e-3)


def test_dispatcher_calls_the_kinds_transfer(monkeypatch):
    """transfer_steer goes through the registry for every kind (no lm-steer-only refusal)."""
    import dataclasses

    from steerport import kinds
    from steerport.transfer import TransferResult

    calls = []

    def fake(steer, source, target, options, *, mapping_path=None, source_path=None, force=False, log=None,
             progress=None):
        calls.append((steer.kind, source, target, options, mapping_path, source_path, force))
        return TransferResult(steer=steer, mapping=None, lineage={"fake": True})

    monkeypatch.setattr(sys.modules[__name__], "_fake_transfer", fake, raising=False)
    registry = kinds._discover()
    monkeypatch.setitem(registry, "actadd", dataclasses.replace(registry["actadd"],
                                                                transfer=f"{__name__}:_fake_transfer"))
    actadd = Steer("actadd", {"vector": torch.ones(D)}, 1.0, meta={"layer": 1})
    opt = TransferOptions(actadd_method="map", texts=["a neutral text"])
    res = transfer_steer(actadd, "src-spec", "tgt-spec", opt, source_path="a.st", force=True)
    assert res.lineage == {"fake": True}
    assert calls == [("actadd", "src-spec", "tgt-spec", opt, None, "a.st", True)]
    assert transfer is transfer_steer  # the older public name
    assert get_kind("lm-steer").transfer == "steerport.transfer:carry_lm_steer"


# --------------------------------------------------------------------------- bad input: one line each


def test_unloadable_target_for_kl_calibration_names_the_embed_way(tmp_path, monkeypatch):
    import steerport.transfer as tr

    a, b = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    da, db = _save_dir(a, tmp_path / "a"), _save_dir(b, tmp_path / "b")
    steer = source_steer(a)
    steer.model["spec"], steer.model["fingerprint"] = da, tr.load_embeddings(da).fingerprint

    def fail(spec, **kw):
        raise SteerportError(f"could not load model {spec!r}: not enough memory")

    monkeypatch.setattr(tr, "load_model", fail)
    with pytest.raises(SteerportError) as e:
        transfer_steer(steer, da, db, TransferOptions(calibrate="kl"))
    msg = str(e.value)
    assert "--calibrate embed" in msg and "not enough memory" in msg and "\n" not in msg
    with pytest.raises(SteerportError, match="--form logit --calibrate embed"):
        transfer_steer(steer, da, db, TransferOptions(form="hidden"))
    assert transfer_steer(steer, da, db, TransferOptions(calibrate="embed")).steer.hidden_size == D  # the cheap way


def test_nan_in_a_fit_is_a_one_line_error():
    src, tgt, *_ = _setup(orthogonal=False, rename=True)
    steer = source_steer(src)
    te = ModelEmbeddings.from_loaded(tgt)
    bad = te.embeddings.clone()
    bad[5, 3] = float("nan")
    broken = ModelEmbeddings(spec=te.spec, embeddings=bad, tokenizer=te.tokenizer)
    with pytest.raises(SteerportError, match="NaN or infinite") as e:
        transfer_steer(steer, src, broken, TransferOptions(calibrate="none"))
    assert "\n" not in str(e.value)
    src2, tgt2, *_ = _setup(orthogonal=True, rename=False)
    tgt2.model.model.norm[1].weight.data[0, 0] = float("nan")  # NaN hidden states for the hidden-state map
    with pytest.raises(SteerportError, match="NaN or infinite"):
        transfer_steer(source_steer(src2), src2, tgt2, TransferOptions(form="hidden", calibrate="none",
                                                                       hidden_texts=TEXTS))


def test_neutral_texts_too_short_to_align_are_a_one_line_error():
    src, tgt, *_ = _setup(orthogonal=True, rename=False)
    with pytest.raises(SteerportError, match="pair up") as e:
        transfer_steer(source_steer(src), src, tgt, TransferOptions(form="hidden", calibrate="none",
                                                                    hidden_texts=["Hi.", "Ok"]))
    assert "\n" not in str(e.value) and f"need {D + 1}" in str(e.value)


# --------------------------------------------------------------------------- mapping files


def test_mapping_missing_a_metadata_field_is_a_one_line_error(tmp_path):
    from steerport.fileio import read_json_safetensors, write_json_safetensors
    from steerport.mapping import FORMAT

    src, tgt, *_ = _setup(orthogonal=False, rename=True)
    m = fit_mapping(ModelEmbeddings.from_loaded(src), ModelEmbeddings.from_loaded(tgt))
    path = m.save(tmp_path / "m.safetensors")
    meta, tensors = read_json_safetensors(path, FORMAT, "mapping")
    for name in ("n_pairs", "source", "diagnostics"):
        broken = {k: v for k, v in meta.items() if k != name}
        write_json_safetensors(tmp_path / "b.safetensors", tensors, FORMAT, broken)
        with pytest.raises(SteerportError, match=f"lacks the required field '{name}'") as e:
            Mapping.load(tmp_path / "b.safetensors")
        assert "\n" not in str(e.value)


def test_shipped_mappings_are_package_data():
    """The six shipped mapping files live inside the package (so a regular install has them)."""
    import steerport
    from steerport.mapping import shipped_dir, shipped_name

    d = shipped_dir()
    assert d.parent == Path(steerport.__file__).resolve().parent and d.name == "mappings"
    names = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]
    want = {shipped_name(a, b) for a in names for b in names if a != b}
    assert len(want) == 6 and want <= {p.name for p in d.glob("*.safetensors")}
    for name in want:
        m = Mapping.load(d / name)
        assert f"{m.source['spec']}__{m.target['spec']}.safetensors" == name


# --------------------------------------------------------------------------- anchor baseline


def test_anchor_form_is_uncalibrated_and_uses_raw_shared_tokens():
    src, tgt, *_ = _setup(orthogonal=False, rename=False)
    steer = source_steer(src)
    res = transfer(steer, src, tgt, TransferOptions(form="anchor", anchor_steps=20))
    assert res.steer.epsilon == steer.epsilon and res.lineage["calibration"]["method"] == "none"
    assert res.lineage["anchor"]["raw_shared_tokens"] == len(src.tokenizer)
    assert res.mapping is None


# --------------------------------------------------------------------------- CLI on local directories


def _save_dir(lm: LoadedModel, path):
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def saved_pair_and_steer(tmp_path: Path) -> tuple[list[str], Path]:
    """Two tiny models saved as local folders (llama, then qwen2) and a steer file made for the first."""
    from steerport.embeddings import load_embeddings

    src, tgt = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    dirs = [_save_dir(src, tmp_path / "a"), _save_dir(tgt, tmp_path / "b")]
    A, B = random_steer_factors(D, 3)
    path = tmp_path / "pos.st"
    Steer.lm_steer(A, B, epsilon=0.5, model={"spec": dirs[0], "fingerprint": load_embeddings(dirs[0]).fingerprint}).save(path)
    return dirs, path


def test_cli_map_and_transfer_read_only_embeddings(tmp_path, monkeypatch, capsys):
    import sys

    import steerport.models
    import steerport.transfer
    from steerport.cli import main

    a = tiny_model("llama", seed=0)
    b = tiny_model("qwen2", seed=1)
    da, db = _save_dir(a, tmp_path / "a"), _save_dir(b, tmp_path / "b")

    def no_full_model(*args, **kw):
        raise AssertionError("full model loaded")

    monkeypatch.setattr(steerport.models, "load_model", no_full_model)
    monkeypatch.setattr(sys.modules["steerport.transfer"], "load_model", no_full_model)
    monkeypatch.setattr(sys.modules["steerport.transfer"], "fit_hidden_map", no_full_model)
    fp = steerport.embeddings.load_embeddings(da).fingerprint
    steer_file = tmp_path / "pos.st"
    A, B = random_steer_factors(D, 2)
    Steer.lm_steer(A, B, epsilon=0.1, model={"spec": da, "fingerprint": fp}).save(steer_file)

    def run(*args):
        monkeypatch.setattr("sys.argv", ["steerport", *map(str, args)])
        try:
            main()
        except SystemExit as e:
            return e.code
        return 0

    mfile = tmp_path / "ab.safetensors"
    assert run("map", da, db, "--out", mfile) == 0
    assert "fitted" in capsys.readouterr().out
    assert run("map", da, db, "--out", mfile) == 0
    assert "reused" in capsys.readouterr().out
    assert run("transfer", da, db, "--steer", steer_file, "--mapping", mfile, "--calibrate", "embed") == 0
    assert "approximate" in capsys.readouterr().err
    out_file = tmp_path / "pos.b.st"
    assert out_file.exists()
    assert Steer.load(out_file).meta["lineage"]["mapping"]["source"].startswith("reused")
    # user errors: one line, exit 1
    capsys.readouterr()
    assert run("transfer", db, da, "--steer", steer_file) == 1
    err = capsys.readouterr().err
    assert "give the steer's own model as SRC" in err and "Traceback" not in err
    assert run("transfer", da, db, "--steer", steer_file, "--form", "nope") == 1
    # a mapping file made for another pair (here: the reverse direction) is refused in one line
    capsys.readouterr()
    assert run("transfer", db, da, "--steer", steer_file, "--mapping", mfile, "--force", "--calibrate", "embed") == 1
    err = capsys.readouterr().err
    assert "stale mapping" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- real models


@pytest.mark.integration
def test_real_alignment_and_shipped_mapping_smollm2_gemma3(monkeypatch):
    """SmolLM2 (byte-level BPE) vs Gemma-3 (SentencePiece): ~46k normalized pairs, ~15k raw."""
    from steerport.catalog import pull, steerport_home
    from steerport.embeddings import load_embeddings
    from steerport.mapping import shipped_dir, shipped_name
    from tests.conftest import TEST_HOME

    monkeypatch.setenv("STEERPORT_HOME", str(TEST_HOME))  # the test-owned model cache, filled here if empty
    pull("smollm2-135m", progress=False)
    pull("gemma3-270m", progress=False)
    assert steerport_home() == TEST_HOME
    se, te = load_embeddings("smollm2-135m"), load_embeddings("gemma3-270m")
    al = align_vocab(se.tokenizer, te.tokenizer)
    assert 45_000 < al.n < 47_500 and 14_000 < al.raw_matches < 16_000
    assert al.src.convention == BYTE_LEVEL and al.tgt.convention == SENTENCEPIECE
    surf = dict(zip(al.surface_strings, zip(al.src_ids.tolist(), al.tgt_ids.tolist())))
    assert surf[b" the"] == (se.tokenizer.get_vocab()["Ġthe"], te.tokenizer.get_vocab()["▁the"])
    assert surf[b"\n"][1] == te.tokenizer.get_vocab()["\n"]
    for tok in (se.tokenizer, te.tokenizer):
        assert not set(tok.all_special_ids) & set((al.src_ids if tok is se.tokenizer else al.tgt_ids).tolist())
    shipped = shipped_dir() / shipped_name("smollm2-135m", "gemma3-270m")
    m = Mapping.load(shipped)
    assert m.matches(se.fingerprint, te.fingerprint, FitOptions())
    assert m.n_pairs == al.n and m.diagnostics["H"]["heldout"]["r2"] > 0.2
    # the file's stored pairs are today's alignment, and the fast embeddings-only path (identity cached, rows
    # read from the checkpoint, no alignment) carries exactly the steer the fully loaded path carries
    assert m.pairs is not None and torch.equal(m.pairs[0], al.src_ids) and torch.equal(m.pairs[1], al.tgt_ids)
    A, B = random_steer_factors(se.hidden_size, 4)
    steer = Steer.lm_steer(A, B, epsilon=1e-3, model={"spec": "smollm2-135m", "fingerprint": se.fingerprint})
    opt = TransferOptions(calibrate="embed")
    want = carry_lm_steer(steer, se, te, opt)
    for _ in range(2):  # the identity cache cold, then warm
        got = carry_lm_steer(steer, "smollm2-135m", "gemma3-270m", opt)
        assert got.lineage["seconds"]["align"] == 0.0
        assert torch.equal(got.steer.A, want.steer.A) and torch.equal(got.steer.B, want.steer.B)
        assert got.steer.epsilon == want.steer.epsilon


# --------------------------------------------------------------------------- stored pairs, embeddings-only fast path


def test_pairs_encoding_round_trip_and_damage_is_one_line(tmp_path):
    from steerport.mapping import decode_pairs, encode_pairs

    g = torch.Generator().manual_seed(0)
    tgt = torch.randperm(1001, generator=g)[:300].sort().values  # a vocabulary that is no multiple of 8
    src = torch.randperm(70_000, generator=g)[:300]  # ids beyond 16 bits
    enc = encode_pairs(src, tgt, 1001)
    assert enc["pairs_tgt_mask"].shape == (126,) and enc["pairs_src_u24"].shape == (300, 3)
    meta = {"n_pairs": 300, "source": {"vocab_size": 70_000}, "target": {"vocab_size": 1001}}
    s2, t2 = decode_pairs(tmp_path, enc, meta)
    assert torch.equal(s2, src) and torch.equal(t2, tgt)
    with pytest.raises(SteerportError, match="strictly increasing"):
        encode_pairs(src, tgt.flip(0), 1001)
    for bad_meta in ({**meta, "n_pairs": 299}, {**meta, "target": {"vocab_size": 2000}},
                     {**meta, "source": {"vocab_size": 1000}}):
        with pytest.raises(SteerportError, match="damaged aligned token pairs") as e:
            decode_pairs(tmp_path, enc, bad_meta)
        assert "\n" not in str(e.value)


def test_mapping_file_stores_the_alignment_and_old_files_stay_readable(tmp_path):
    from safetensors.torch import load_file

    from steerport.fileio import read_json_metadata, write_json_safetensors
    from steerport.mapping import FORMAT

    src, tgt, *_ = _setup(orthogonal=False, rename=True)
    se, te = ModelEmbeddings.from_loaded(src), ModelEmbeddings.from_loaded(tgt)
    al = align_vocab(se.tokenizer, te.tokenizer)
    path = fit_mapping(se, te).save(tmp_path / "m.safetensors")
    back = Mapping.load(path)
    assert back.pairs is not None
    assert torch.equal(back.pairs[0], al.src_ids) and torch.equal(back.pairs[1], al.tgt_ids)
    # a file from before the pairs were stored (H, G and metadata only) loads without them ...
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("pairs_")}
    meta = read_json_metadata(path, path.read_bytes(), FORMAT, "mapping")
    old = write_json_safetensors(tmp_path / "old.safetensors", tensors, FORMAT, meta)
    assert Mapping.load(old).pairs is None
    # ... and a transfer with it aligns the tokenizers and gives the same steer
    steer = source_steer(src)
    opt = TransferOptions(calibrate="embed", embed_pairs=50)
    a = carry_lm_steer(steer, se, te, opt, mapping_path=path)
    b = carry_lm_steer(steer, se, te, opt, mapping_path=old)
    assert torch.equal(a.steer.A, b.steer.A) and torch.equal(a.steer.B, b.steer.B) and a.steer.epsilon == b.steer.epsilon
    # only one of the two pair tensors: a one-line error
    write_json_safetensors(tmp_path / "half.safetensors", {**tensors, "pairs_tgt_mask": load_file(str(path))["pairs_tgt_mask"]},
                           FORMAT, meta)
    with pytest.raises(SteerportError, match="damaged aligned token pairs"):
        Mapping.load(tmp_path / "half.safetensors")


def test_embeddings_only_transfer_from_files_equals_the_loaded_path(tmp_path, monkeypatch):
    """Model folders given by path: the warm run reads neither tokenizer nor whole matrix, aligns
    nothing, and carries exactly the same steer as the path that loads everything."""
    import steerport.headfile
    import steerport.transfer as tr
    from steerport.headfile import HeadFile

    src, tgt, *_ = _setup(orthogonal=False, rename=True)
    da, db = _save_dir(src, tmp_path / "a"), _save_dir(tgt, tmp_path / "b")
    se, te = tr.load_embeddings(da), tr.load_embeddings(db)
    steer = Steer.lm_steer(*random_steer_factors(D, 3), epsilon=0.5, model={"spec": da, "fingerprint": se.fingerprint})
    mfile = tmp_path / "ab.safetensors"
    for opt in (TransferOptions(calibrate="embed"), TransferOptions(calibrate="embed", embed_pairs=40, embed_proxies=7),
                TransferOptions(form="paper", calibrate="none")):
        want = carry_lm_steer(steer, se, te, opt, mapping_path=mfile)  # everything loaded (fits the mapping once)
        carry_lm_steer(steer, da, db, opt, mapping_path=mfile)  # fills the identity cache
        with monkeypatch.context() as mp:
            def nothing_heavy(*a, **kw):
                raise AssertionError("tokenizer, whole matrix or alignment on the warm path")

            mp.setattr(steerport.headfile, "locate_head", nothing_heavy)
            mp.setattr(tr, "align_vocab", nothing_heavy)
            mp.setattr(tr, "load_embeddings", nothing_heavy)
            assert isinstance(tr._source_of_rows(da, opt.carry_form(), opt), HeadFile)
            got = carry_lm_steer(steer, da, db, opt, mapping_path=mfile)
        assert torch.equal(got.steer.A, want.steer.A) and torch.equal(got.steer.B, want.steer.B)
        assert got.steer.epsilon == want.steer.epsilon and got.steer.model == want.steer.model
        assert got.lineage["calibration"] == want.lineage["calibration"]
    # a mapping fitted for another pair is refused in one line, on the fast path too
    with pytest.raises(SteerportError, match="stale mapping") as e:
        carry_lm_steer(steer, db, da, TransferOptions(calibrate="embed"), mapping_path=mfile, force=True)
    assert "\n" not in str(e.value)


def test_cached_proxy_map_gives_the_same_calibration(tmp_path, monkeypatch):
    import steerport.calibration as cal

    src, tgt, *_ = _setup(orthogonal=False, rename=True)
    se, te = ModelEmbeddings.from_loaded(src), ModelEmbeddings.from_loaded(tgt)
    al = align_vocab(se.tokenizer, te.tokenizer)
    X_s, X_t = se.embeddings[al.src_ids], te.embeddings[al.tgt_ids]
    steer = source_steer(src)
    factors = {"A": steer.A * 0.7, "B": steer.B}
    fresh = cal.embed_calibration(steer, factors, X_s, X_t, max_pairs=60, max_proxies=9)
    rows, _ = cal.calibration_rows(len(X_s), 60)
    T1 = cal.cached_proxy_map(X_s[rows], X_t[rows], "k")  # computed and written
    with monkeypatch.context() as mp:
        mp.setattr(cal, "proxy_map", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
        T2 = cal.cached_proxy_map(X_s[rows], X_t[rows], "k")  # read back
    assert torch.equal(T1, T2)
    cached = cal.embed_calibration(steer, factors, X_s[rows], X_t[rows], max_pairs=60, max_proxies=9,
                                   sampled_from=len(X_s), T=T2)
    # the same up to float rounding: a BLAS kernel may sum in another order for differently aligned
    # copies of the same rows (seen with MKL on an AMD EPYC: 7e-9 relative)
    assert cached.keys() == fresh.keys()
    for k, v in fresh.items():
        assert cached[k] == pytest.approx(v, rel=1e-6), k
    # a damaged cache file is recomputed, not an error
    path = next((tmp_path / "home" / "calibration").glob("k.safetensors"))
    path.write_bytes(b"junk")
    assert torch.equal(cal.cached_proxy_map(X_s[rows], X_t[rows], "k"), T1)
    with pytest.raises(SteerportError, match="expected the 60 sampled"):
        cal.embed_calibration(steer, factors, X_s, X_t, max_pairs=60, sampled_from=len(X_s))
