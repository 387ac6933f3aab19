"""Model specs, loading from local directories, embeddings-only loading and fingerprints."""

import pytest
import torch

from steerport import SteerportError, load_embeddings, load_model, resolve_spec
from steerport.models import ModelEmbeddings, check_device, parse_dtype
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
