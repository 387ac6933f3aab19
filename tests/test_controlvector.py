"""llama.cpp control vectors: GGUF export -> import round trips, the file layout, error paths."""

import gguf
import numpy as np
import pytest
import torch

from steerport import Steer, SteerportError
from steerport.controlvector import export_control_vector, import_control_vector
from tests.tiny import D


def actadd(vector, **meta):
    return Steer("actadd", {"vector": vector}, epsilon=0.5, positive="calm",
                 model={"spec": "tiny", "fingerprint": "abcdef0123456789"}, meta={"positions": "all", **meta})


def fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_single_layer_round_trip_and_layout(tmp_path):
    v = torch.randn(D)
    steer = actadd(v, layer=3)
    path = export_control_vector(steer, tmp_path / "calm.gguf", value=4.0, model_hint="llama")
    reader, kv = fields(path)
    assert kv["general.architecture"] == "controlvector"
    assert kv["controlvector.model_hint"] == "llama"
    assert kv["controlvector.layer_count"] == 1
    assert kv["steerport.steer_fingerprint"] == steer.fingerprint
    [t] = reader.tensors
    assert t.name == "direction.2"  # steerport layer 3 (entering block 3) == llama.cpp direction.2 (leaving block 2)
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [D]
    np.testing.assert_allclose(np.asarray(t.data), (4.0 * 0.5 * v).numpy(), rtol=1e-6)

    back = import_control_vector(path)
    assert back.kind == "actadd" and back.epsilon == 1.0
    assert back.meta["layer"] == 3 and back.meta["positions"] == "all"
    assert back.meta["model_type"] == "llama"
    torch.testing.assert_close(back.tensors["vector"], 2.0 * v)
    # and the imported steer exports to the same bytes of direction data
    again = export_control_vector(back, tmp_path / "again.gguf", model_hint="llama")
    np.testing.assert_array_equal(np.asarray(gguf.GGUFReader(str(again)).tensors[0].data), np.asarray(t.data))
    # a .st round trip keeps the layout
    back.save(tmp_path / "calm.st")
    assert Steer.load(tmp_path / "calm.st").meta["layer"] == 3


def test_multi_layer_round_trip(tmp_path):
    vs = torch.randn(3, D)
    steer = actadd(vs, layers=[7, 2, 12])
    path = export_control_vector(steer, tmp_path / "m.gguf", value=-1.0)
    reader, kv = fields(path)
    assert kv["controlvector.layer_count"] == 3
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.6", "direction.11"]
    back = import_control_vector(path)
    assert back.meta["layers"] == [2, 7, 12]
    torch.testing.assert_close(back.tensors["vector"], -0.5 * vs[[1, 0, 2]])


def write_raw(path, tensors, arch="controlvector", layer_count_uint=True):
    """A control vector written the way repeng's export_gguf does (uint32 layer_count)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string(f"{arch}.model_hint", "mistral")
    if layer_count_uint:
        w.add_uint32(f"{arch}.layer_count", len(tensors))
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_imports_repeng_style_file(tmp_path):
    dirs = {f"direction.{i}": np.random.default_rng(i).standard_normal(D).astype(np.float32) for i in range(1, 31)}
    steer = import_control_vector(write_raw(tmp_path / "r.gguf", dirs), model={"spec": "m", "fingerprint": "f"}, positive="happy")
    assert steer.meta["layers"] == list(range(2, 32))
    assert steer.tensors["vector"].shape == (30, D)
    assert steer.model == {"spec": "m", "fingerprint": "f"} and steer.positive == "happy"
    np.testing.assert_array_equal(steer.tensors["vector"][4].numpy(), dirs["direction.5"])


@pytest.mark.parametrize("steer,match", [
    (Steer.lm_steer(torch.ones(D, 1), torch.ones(D, 1), epsilon=1.0), "only actadd"),
    (Steer("actadd", {"vector": torch.ones(4, D)}, meta={"layer": 2, "positions": "front"}), "every position"),
    (Steer("actadd", {"vector": torch.ones(D)}, meta={"layer": 2, "positions": "front"}), "every position"),
    (Steer("actadd", {"vector": torch.ones(D)}, meta={"layer": 0, "positions": "all"}), "direction.-1"),
    (Steer("actadd", {"vector": torch.ones(D)}, meta={"layer": 1, "positions": "all"}), "direction.0"),
    (Steer("actadd", {"vector": torch.ones(D)}, meta={"positions": "all"}), "no integer 'layer'"),
    (Steer("actadd", {"vector": torch.ones(2, D)}, meta={"layers": [1, 2, 3], "positions": "all"}), "3 layers"),
    (Steer("actadd", {"vector": torch.ones(2, D)}, meta={"layers": [4, 4], "positions": "all"}), "repeats"),
])
def test_export_errors(tmp_path, steer, match):
    with pytest.raises(SteerportError, match=match):
        export_control_vector(steer, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir()), "nothing written on error"


def test_import_errors(tmp_path):
    v = np.ones(D, dtype=np.float32)
    with pytest.raises(SteerportError, match="no such"):
        import_control_vector(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(SteerportError, match="GGUF"):
        import_control_vector(tmp_path / "junk.gguf")
    with pytest.raises(SteerportError, match="not 'controlvector'"):
        import_control_vector(write_raw(tmp_path / "a.gguf", {"direction.1": v}, arch="llama"))
    with pytest.raises(SteerportError, match="layer index 0"):
        import_control_vector(write_raw(tmp_path / "b.gguf", {"direction.0": v}))
    with pytest.raises(SteerportError, match="no integer layer"):
        import_control_vector(write_raw(tmp_path / "c.gguf", {"direction.x": v}))
    with pytest.raises(SteerportError, match="unexpected tensor"):
        import_control_vector(write_raw(tmp_path / "d.gguf", {"bias.1": v}))
    with pytest.raises(SteerportError, match="F32"):
        import_control_vector(write_raw(tmp_path / "e.gguf", {"direction.1": v.astype(np.float16)}))
    with pytest.raises(SteerportError, match="not 1-D"):
        import_control_vector(write_raw(tmp_path / "f.gguf", {"direction.1": np.ones((2, D), np.float32)}))
    with pytest.raises(SteerportError, match="different size"):
        import_control_vector(write_raw(tmp_path / "g.gguf", {"direction.1": v, "direction.2": np.ones(D + 1, np.float32)}))
    with pytest.raises(SteerportError, match="no direction"):
        import_control_vector(write_raw(tmp_path / "h.gguf", {}))


def test_imported_vector_acts_where_llama_cpp_adds_it(tmp_path):
    """llama.cpp adds direction.N to the output of block N; the imported steer must do the same."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from steerport.hooks import steered
    from steerport.models import LoadedModel
    from tests.tiny import CONFIGS, tiny_tokenizer

    tok = tiny_tokenizer()
    kw = dict(CONFIGS["llama"], num_hidden_layers=4)
    kw.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=len(tok), **kw)).eval()
    lm = LoadedModel("tiny-llama-4", model, tok)
    d = torch.randn(D)
    path = write_raw(tmp_path / "c.gguf", {"direction.2": d.numpy()})
    steer = import_control_vector(path)
    batch = tok(["The movie was wonderful."], return_tensors="pt")

    def add_after_block(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + d, *output[1:])
        return output + d

    handle = model.model.layers[2].register_forward_hook(add_after_block)
    with torch.no_grad():
        expected = model(**batch).logits
    handle.remove()
    with torch.no_grad(), steered(lm, [(steer, 1.0)]):
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma3_text", "gptj"])
def test_multi_layer_file_acts_where_llama_cpp_adds_it(tmp_path, arch):
    """A cvector-generator-style file (directions 1 .. n_layers-1): import -> apply, and export -> import -> apply,
    both equal llama.cpp's semantics, emulated by forward hooks adding direction.N to the output of block N."""
    from steerport.hooks import steered
    from steerport.models import decoder_layers
    from tests.tiny import tiny_model

    lm = tiny_model(arch, n_layers=4)
    rng = np.random.default_rng(0)
    dirs = {N: rng.standard_normal(D).astype(np.float32) for N in (1, 2, 3)}  # 3: after the last block
    steer = import_control_vector(write_raw(tmp_path / "c.gguf", {f"direction.{N}": d for N, d in dirs.items()}))
    assert steer.meta["layers"] == [2, 3, 4] and steer.tensors["vector"].shape == (3, D)
    batch = lm.tokenizer(["The movie was wonderful.", "I hate it."], return_tensors="pt", padding=True)

    def llama_cpp(scale):
        def add(d):
            return lambda m, a, o: (o[0] + d, *o[1:]) if isinstance(o, tuple) else o + d

        blocks = decoder_layers(lm.model)
        handles = [blocks[N].register_forward_hook(add(scale * torch.from_numpy(d))) for N, d in dirs.items()]
        try:
            with torch.no_grad():
                return lm.model(**batch).logits
        finally:
            for h in handles:
                h.remove()

    with torch.no_grad(), steered(lm, [(steer, 1.0)]):
        got = lm.model(**batch).logits
    torch.testing.assert_close(got, llama_cpp(1.0), atol=1e-5, rtol=1e-5)
    again = import_control_vector(export_control_vector(steer, tmp_path / "again.gguf", value=-2.0, model_hint=arch))
    assert again.meta["layers"] == [2, 3, 4]
    with torch.no_grad(), steered(lm, [(again, 1.0)]):
        got = lm.model(**batch).logits
    torch.testing.assert_close(got, llama_cpp(-2.0), atol=1e-5, rtol=1e-5)


def test_export_through_the_kind_registry_writes_the_same_file(tmp_path):
    from steerport.kinds import get_kind

    steer = actadd(torch.randn(2, D), layers=[3, 5])
    by_kind = get_kind("actadd").export("gguf-cvec", steer, tmp_path / "kind.gguf", value=2.0, model_hint="llama")
    direct = export_control_vector(steer, tmp_path / "direct.gguf", value=2.0, model_hint="llama")
    assert by_kind == tmp_path / "kind.gguf" and by_kind.read_bytes() == direct.read_bytes()
    back = import_control_vector(by_kind)
    torch.testing.assert_close(back.tensors["vector"], 2.0 * 0.5 * steer.tensors["vector"])


def test_export_is_atomic_with_ordinary_permissions(tmp_path, monkeypatch):
    import os

    steer = actadd(torch.randn(D), layer=3)
    path = export_control_vector(steer, tmp_path / "calm.gguf", value=1.0)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a temporary file's 0600 would hide it from others
    before = path.read_bytes()

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_control_vector(actadd(torch.randn(D), layer=4), path, value=3.0)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["calm.gguf"]
    with pytest.raises(SteerportError, match="finite"):
        export_control_vector(steer, tmp_path / "nan.gguf", value=float("nan"))


def test_damaged_files_are_one_line_errors(tmp_path):
    """Truncated or corrupted GGUF bytes: a one-line SteerportError (or a readable file), never a traceback."""
    import random

    good = export_control_vector(actadd(torch.randn(3, D), layers=[2, 3, 4]), tmp_path / "good.gguf").read_bytes()
    rng = random.Random(0)
    damaged = [good[:4], good[:30], good[: len(good) // 2], good[:-4]]
    for _ in range(40):
        b = bytearray(good)
        for _ in range(5):
            b[rng.randrange(8, 200)] = rng.randrange(256)
        damaged.append(bytes(b))
    errors = 0
    for i, data in enumerate(damaged):
        (tmp_path / f"d{i}.gguf").write_bytes(data)
        try:
            import_control_vector(tmp_path / f"d{i}.gguf")
        except SteerportError as e:
            assert "\n" not in str(e)
            errors += 1
    assert errors >= len(damaged) // 2
