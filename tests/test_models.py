"""Model specs, loading from local directories, embeddings-only loading and fingerprints."""

import pytest
import torch

from steerport import SteerportError, load_embeddings, load_model, resolve_spec
from steerport.embeddings import ModelEmbeddings
from steerport.models import check_device, cpu_has_fast_bf16, cpu_name, parse_dtype
from tests.tiny import ARCHS, tiny_model


def save_tiny(tmp_path, arch, **kw):
    lm = tiny_model(arch, **kw)
    path = tmp_path / arch
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return lm, path


@pytest.mark.parametrize("arch", ARCHS)
def test_embeddings_only_load_matches_full_model(tmp_path, arch):
    lm, path = save_tiny(tmp_path, arch)
    emb = load_embeddings(str(path))
    torch.testing.assert_close(emb.embeddings, lm.output_embeddings.float(), atol=0, rtol=0)
    full = load_model(str(path))
    assert full.fingerprint == emb.fingerprint == lm.fingerprint
    assert emb.hidden_size == full.hidden_size == lm.hidden_size
    if lm.lm_head_bias is not None:  # GPT-J's head has a bias
        torch.testing.assert_close(emb.bias, lm.lm_head_bias.float())
    else:
        assert emb.bias is None


def test_untied_head_read_from_its_own_tensor(tmp_path):
    lm, path = save_tiny(tmp_path, "llama", tied=False)
    assert not torch.equal(lm.output_embeddings, lm.model.get_input_embeddings().weight)
    emb = load_embeddings(str(path))
    torch.testing.assert_close(emb.embeddings, lm.output_embeddings.float(), atol=0, rtol=0)


def test_fingerprint_stable_across_dtype_and_sensitive_to_weights(tmp_path):
    lm, path = save_tiny(tmp_path, "gpt2")
    bf = load_model(str(path), dtype="bfloat16")
    assert bf.dtype == torch.bfloat16
    # bf16 rounding of the same weights gives the same fingerprint
    assert bf.fingerprint == ModelEmbeddings.from_loaded(bf).fingerprint
    other = tiny_model("gpt2", seed=1)
    assert other.fingerprint != lm.fingerprint


def test_spec_resolution(tmp_path):
    assert resolve_spec("gpt2").kind == "hub" and resolve_spec("gpt2").location == "openai-community/gpt2"
    assert resolve_spec("gpt-j").location == "EleutherAI/gpt-j-6b"
    assert resolve_spec("EleutherAI/pythia-410m").kind == "hub"
    _, path = save_tiny(tmp_path, "gpt2")
    assert resolve_spec(str(path)).kind == "dir"


@pytest.mark.parametrize("spec,fragment", [
    ("not-a-model", "unknown model"),
    ("missing.gguf", "no such .gguf"),
])
def test_bad_specs_give_one_line_errors(spec, fragment):
    with pytest.raises(SteerportError, match=fragment) as e:
        resolve_spec(spec)
    assert "\n" not in str(e.value)


def test_directory_without_config_refused(tmp_path):
    with pytest.raises(SteerportError, match="config.json"):
        load_model(str(tmp_path))


def test_bad_dtype():
    assert parse_dtype("float32") == torch.float32
    with pytest.raises(SteerportError, match="dtype"):
        parse_dtype("int8")


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_device_refused_in_one_line_without_cuda(tmp_path, device):
    """Refused before anything is read (so also for a model that is not there)."""
    with pytest.raises(SteerportError, match="CUDA is not available") as e:
        load_model(str(tmp_path / "no-such-model"), device=device)
    assert "\n" not in str(e.value)
    _, path = save_tiny(tmp_path, "llama")
    with pytest.raises(SteerportError, match="CUDA is not available"):
        load_model(str(path), device=device)


def test_device_names_checked():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(SteerportError, match="unknown device 'gpu0'"):
        check_device("gpu0")


# --------------------------------------------------------------------------- decoder layers, soft-cap


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_found_on_every_architecture(arch):
    from steerport.models import decoder_layers

    lm = tiny_model(arch, n_layers=3)
    layers = decoder_layers(lm.model)
    assert len(layers) == lm.n_layers == 3
    assert isinstance(layers, torch.nn.ModuleList)
    assert all(layer is not lm.lm_head for layer in layers)


def test_decoder_layers_strict_without_num_hidden_layers():
    from types import SimpleNamespace

    from steerport.models import decoder_layers

    lm = tiny_model("llama")
    model = lm.model
    model.config = SimpleNamespace(vocab_size=10)  # a config that does not say how many layers there are
    with pytest.raises(SteerportError, match="no num_hidden_layers") as e:
        decoder_layers(model)
    assert "\n" not in str(e.value)
    model.config = SimpleNamespace(num_hidden_layers=7)  # says 7, but the model has 2: refused, not guessed
    with pytest.raises(SteerportError, match="no list of 7 decoder layers"):
        decoder_layers(model)


def test_logit_softcap_read_from_the_text_sub_config():
    from types import SimpleNamespace

    from steerport.models import logit_softcap

    text = SimpleNamespace(final_logit_softcapping=30.0, num_hidden_layers=2)
    multimodal = SimpleNamespace(get_text_config=lambda: text)  # e.g. Gemma-3 with vision: cap on the text part
    assert logit_softcap(SimpleNamespace(config=multimodal)) == 30.0
    assert logit_softcap(SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=50))) == 50.0
    assert logit_softcap(SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=None))) is None
    assert tiny_model("llama").softcap is None
    gemma = tiny_model("gemma3_text")
    gemma.model.config.final_logit_softcapping = 12.5
    assert gemma.softcap == 12.5


# --------------------------------------------------------------------------- a model split by a device map

SPLIT_MEMORY = {"cpu": 90_000}  # bytes: the input embedding fits, the decoder layers, norm and (untied) head go to disk
SPLIT_TEXTS = ["The film was wonderful and warm.", "What a waste of time, I hate it.", "Researchers measured the tower."]


def load_split(path, tmp_path):
    split = load_model(str(path), device_map="auto", max_memory=SPLIT_MEMORY, offload_folder=tmp_path / "offload")
    devices = set(split.model.hf_device_map.values())
    assert split.is_split and {"cpu", "disk"} <= devices, split.model.hf_device_map  # a real split, not one device
    return split


@torch.no_grad()
def logits_of(lm, texts):
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    return lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


@pytest.mark.parametrize("tied", [False, True])
def test_split_model_gives_identical_logits_steered_and_unsteered(tmp_path, tied):
    from steerport.hooks import steered
    from steerport.steer import Steer
    from tests.tiny import random_steer_factors

    _, path = save_tiny(tmp_path, "llama", tied=tied)
    whole, split = load_model(str(path)), load_split(path, tmp_path)
    if not tied:
        assert split.model.hf_device_map["lm_head"] == "disk" and split.lm_head.weight.is_meta
    torch.testing.assert_close(split.output_embeddings, whole.output_embeddings, atol=0, rtol=0)  # read back from disk
    assert split.fingerprint == whole.fingerprint and split.hidden_size == whole.hidden_size
    assert split.dtype == whole.dtype and split.device == torch.device("cpu")
    torch.testing.assert_close(logits_of(split, SPLIT_TEXTS), logits_of(whole, SPLIT_TEXTS), atol=0, rtol=0)
    A, B = random_steer_factors()
    steer = Steer.lm_steer(A, B, epsilon=0.5, positive="positive", model={"spec": whole.spec, "fingerprint": whole.fingerprint})
    with steered(whole, (steer, 2.0)):
        want = logits_of(whole, SPLIT_TEXTS)
    with steered(split, (steer, 2.0)):
        got = logits_of(split, SPLIT_TEXTS)
    assert (want - logits_of(whole, SPLIT_TEXTS)).abs().max() > 0.1  # the steer does something
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    from steerport.actadd import make_actadd  # an ActAdd steer, made on either, acts at a layer kept on disk

    act = make_actadd(whole, [(" love", " hate")], layer=0.5, coeff=3.0)
    assert torch.equal(make_actadd(split, [(" love", " hate")], layer=0.5, coeff=3.0).tensors["vector"], act.tensors["vector"])
    with steered(whole, (act, 1.0)):
        want = logits_of(whole, SPLIT_TEXTS)
    with steered(split, (act, 1.0)):
        got = logits_of(split, SPLIT_TEXTS)
    assert (want - logits_of(whole, SPLIT_TEXTS)).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_training_on_a_split_model_gives_the_identical_steer(tmp_path):
    from steerport.data import Dataset, Example
    from steerport.train import TrainConfig, train

    _, path = save_tiny(tmp_path, "llama", tied=False)
    whole, split = load_model(str(path)), load_split(path, tmp_path)
    texts = SPLIT_TEXTS * 4
    ex = [Example(t, 1.0 if i % 2 else -1.0, f"mem:{i}") for i, t in enumerate(texts)]
    data = Dataset(ex[2:], ex[:2], "positive", {"counts": {}})
    config = TrainConfig(rank=2, steps=4, cache_dtype="float32", dtype="float32", eval_every=2)
    a = train(whole, data, config, workdir=tmp_path / "whole.work").steer
    b = train(split, data, config, workdir=tmp_path / "split.work").steer
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        torch.testing.assert_close(b.tensors[k], a.tensors[k], atol=0, rtol=0)


def test_transfer_between_split_models_matches_whole_models(tmp_path):
    from steerport.steer import Steer
    from steerport.transfer import TransferOptions, transfer_steer
    from tests.tiny import random_steer_factors

    _, src_path = save_tiny(tmp_path, "llama", tied=False)
    lm_b = tiny_model("qwen2", seed=3)
    tgt_path = tmp_path / "qwen2"
    lm_b.model.save_pretrained(tgt_path)
    lm_b.tokenizer.save_pretrained(tgt_path)
    src, tgt = load_model(str(src_path)), load_model(str(tgt_path))
    src_split, tgt_split = load_split(src_path, tmp_path), load_split(tgt_path, tmp_path)
    A, B = random_steer_factors()
    steer = Steer.lm_steer(A, B, epsilon=0.5, positive="positive", model={"spec": src.spec, "fingerprint": src.fingerprint})
    options = TransferOptions(form="hidden", calibrate="kl", hidden_texts=SPLIT_TEXTS * 3, calib_texts=SPLIT_TEXTS * 3)
    want = transfer_steer(steer, src, tgt, options).steer
    got = transfer_steer(steer, src_split, tgt_split, options).steer
    assert got.epsilon == want.epsilon
    for k in want.tensors:
        torch.testing.assert_close(got.tensors[k], want.tensors[k], atol=0, rtol=0)


def test_device_map_options_checked():
    from steerport.models import parse_max_memory

    assert parse_max_memory(["0=70GiB", "cpu=200GiB", "disk=123"]) == {0: "70GiB", "cpu": "200GiB", "disk": 123}
    assert parse_max_memory([]) is None
    for bad, fragment in [("cpu", "DEVICE=AMOUNT"), ("gpu0=1GB", "GPU index"), ("cpu=lots", "the amount")]:
        with pytest.raises(SteerportError, match=fragment):
            parse_max_memory([bad])
    with pytest.raises(SteerportError, match="need a device map"):
        load_model("whatever", max_memory={"cpu": 1})


def test_cli_device_map_options_reach_the_loader(tmp_path, monkeypatch, capsys, caplog):
    from steerport.steer import Steer
    from tests.test_cli import assert_one_line_error, main_run

    _, path = save_tiny(tmp_path, "llama", tied=False)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "{t}", "label": {i % 2}}}\n' for i, t in enumerate(SPLIT_TEXTS * 4)))
    common = ["train", path, "--data", data, "--positive-label", "1", "--heldout", "0.25", "--steps", "3", "--dtype", "float32",
              "--rank", "2"]
    code, _, err = main_run(monkeypatch, capsys, *common, "--out", tmp_path / "a.st")
    assert code in (0, None), err
    code, _, err = main_run(monkeypatch, capsys, *common, "--out", tmp_path / "b.st", "--device-map", "auto",
                            "--max-memory", "cpu=90000", "--offload-folder", tmp_path / "off")
    assert code in (0, None), err
    assert "offloaded to the" in caplog.text and "disk" in caplog.text  # the model really was split (accelerate says so)
    a, b = Steer.load(tmp_path / "a.st"), Steer.load(tmp_path / "b.st")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    code, _, err = main_run(monkeypatch, capsys, *common, "--out", tmp_path / "c.st", "--max-memory", "cpu=1GB")
    assert_one_line_error(code, err, "--max-memory and --offload-folder need --device-map")
    code, _, err = main_run(monkeypatch, capsys, *common, "--out", tmp_path / "c.st", "--device-map", "everywhere")
    assert_one_line_error(code, err, "--device-map 'everywhere': use auto")


def test_cpu_name_and_bf16_flags_come_from_cpuinfo(monkeypatch):
    info = "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu avx2 avx512_bf16\n"
    monkeypatch.setattr("steerport.models._cpuinfo", lambda: info)
    assert cpu_name() == "Example CPU 9000" and cpu_has_fast_bf16()
    monkeypatch.setattr("steerport.models._cpuinfo", lambda: "")  # no /proc/cpuinfo: the platform's own string
    assert cpu_name() and not cpu_has_fast_bf16()
