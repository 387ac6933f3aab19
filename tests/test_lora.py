"""LoRA export: a PEFT adapter gives the hooks' logits; a GGUF adapter holds the same factors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from steerport.errors import SteerportError
from steerport.hooks import steered
from steerport.lora import export_gguf, export_peft, lora_factors, register
from tests.serve_fixtures import tiny_steers
from tests.tiny import tiny_model

TEXTS = ["The movie was wonderful and the actors were great.", "What a waste"]


def _logits(model, lm):
    enc = lm.tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="left")  # the shared tokenizer stays as is
    return model(**enc).logits, enc["attention_mask"].bool()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("gpt2", True), ("qwen2", False)])
@pytest.mark.parametrize("which", [["pos"], ["pos", "calm"], ["pos", "tok"]])
def test_peft_adapter_equals_hooks(tmp_path, arch, tied, which):
    from peft import PeftModel

    lm = tiny_model(arch, tied=tied)
    steers = tiny_steers(lm)
    items = [(steers[n], v) for n, v in zip(which, (3.0, -2.0))]
    with steered(lm, items):
        want, mask = _logits(lm.model, lm)
    plain, _ = _logits(lm.model, lm)
    assert (want - plain).abs().max() > 0.1  # the steers do something
    out = export_peft(lm, items, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["lm_head"] and config["lora_alpha"] == config["r"]
    assert config["r"] == sum(s.rank for s, _ in items)
    base = tiny_model(arch, tied=tied).model  # a fresh copy of the same weights
    peft_model = PeftModel.from_pretrained(base, out)
    got, _ = _logits(peft_model, lm)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-5)
    if tied:  # the input embeddings are untouched
        assert torch.equal(base.get_input_embeddings().weight, lm.model.get_input_embeddings().weight)


def test_actadd_and_bad_values_refused(tmp_path):
    lm = tiny_model("llama")
    steers = tiny_steers(lm)
    with pytest.raises(SteerportError, match="control vector"):
        export_peft(lm, [(steers["wide"], 1.0)], tmp_path / "a")
    with pytest.raises(SteerportError, match="finite"):
        lora_factors(lm, [(steers["pos"], float("nan"))])
    with pytest.raises(SteerportError, match="nothing to export"):
        lora_factors(lm, [])
    export_peft(lm, [(steers["pos"], 1.0)], tmp_path / "b")
    with pytest.raises(SteerportError, match="not empty"):
        export_peft(lm, [(steers["pos"], 1.0)], tmp_path / "b")


def test_gguf_adapter_holds_the_lora(tmp_path):
    from gguf import GGUFReader

    lm = tiny_model("llama", tied=False)
    steers = tiny_steers(lm)
    items = [(steers["pos"], 2.0), (steers["tok"], -1.0)]
    path = export_gguf(lm, items, tmp_path / "pos.lora.gguf")
    reader = GGUFReader(str(path))
    field = lambda k: reader.fields[k]
    text = lambda k: bytes(field(k).parts[field(k).data[0]]).decode()
    assert text("general.type") == "adapter" and text("adapter.type") == "lora"
    assert text("general.architecture") == "llama"
    R = 3 + 3
    assert float(field("adapter.lora.alpha").parts[-1][0]) == R
    t = {x.name: x for x in reader.tensors}
    a = np.asarray(t["output.weight.lora_a"].data).reshape(R, lm.hidden_size)
    b = np.asarray(t["output.weight.lora_b"].data).reshape(len(lm.tokenizer), R)
    # llama.cpp computes logits + lora_b (lora_a h) * alpha / r: compare with the hooks on real hidden states
    from steerport.capture import input_of

    enc = lm.tokenizer(TEXTS[:1], return_tensors="pt")
    h = input_of(lm.model, lm.lm_head, **enc)[0]  # (T, d)
    with steered(lm, items):
        want = lm.model(**enc).logits[0]
    got = lm.model(**enc).logits[0] + torch.from_numpy(b @ (a @ h.numpy().T)).T
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_gguf_refuses_tied_models(tmp_path):
    lm = tiny_model("llama", tied=True)
    with pytest.raises(SteerportError, match="no output.weight"):
        export_gguf(lm, [(tiny_steers(lm)["pos"], 1.0)], tmp_path / "x.gguf")


def test_export_lora_cli(tmp_path, monkeypatch):
    lm = tiny_model("llama", tied=True)
    steers = tiny_steers(lm)
    steers["pos"].save(tmp_path / "pos.st")
    steers["wide"].save(tmp_path / "wide.st")
    monkeypatch.setattr("steerport.models.load_model", lambda spec, dtype=None, device="cpu": lm)
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands, so typer keeps the command name
    runner = CliRunner()
    r = runner.invoke(app, ["export-lora", f"{tmp_path / 'pos.st'}:3", "--model", "tiny", "--out", str(tmp_path / "ad")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists()
    r = runner.invoke(app, ["export-lora", f"{tmp_path / 'pos.st'}", "--model", "tiny", "--out", str(tmp_path / "ad2")])
    assert isinstance(r.exception, SteerportError) and "STEER.st:VALUE" in str(r.exception)
    r = runner.invoke(app, ["export-lora", f"{tmp_path / 'wide.st'}:1", "--model", "tiny", "--out", str(tmp_path / "ad3")])
    assert isinstance(r.exception, SteerportError) and "control vector" in str(r.exception)
    r = runner.invoke(app, ["export-lora", f"{tmp_path / 'pos.st'}:1", "--model", "tiny", "--format", "gguf",
                            "--out", str(tmp_path / "x.gguf")])
    assert isinstance(r.exception, SteerportError) and "no output.weight" in str(r.exception)


def _tied_gguf(path, V: int, d: int):
    """A small llama.cpp-style model file with tied embeddings (no output.weight), one tensor quantized."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny tied")
    w.add_block_count(1)
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(V)])
    embd = rng.standard_normal((V, d)).astype(np.float32)
    q = gguf.quants.quantize(embd, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(d, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_untie_gguf_copies_everything_and_adds_output(tmp_path):
    from gguf import GGUFReader

    from steerport.lora import untie_gguf

    lm = tiny_model("llama", tied=True)
    V, d = len(lm.tokenizer), lm.hidden_size
    tied = _tied_gguf(tmp_path / "tied.gguf", V, d)
    with pytest.raises(SteerportError, match="--untie"):
        export_gguf(lm, [(tiny_steers(lm)["pos"], 1.0)], tmp_path / "a.gguf", gguf_base=tied)
    untied = untie_gguf(tied, tmp_path / "untied.gguf")
    a, b = GGUFReader(str(tied)), GGUFReader(str(untied))
    for name, f in a.fields.items():
        if name != "GGUF.tensor_count":
            assert b.fields[name].contents() == f.contents(), name
    assert b.fields["GGUF.tensor_count"].contents() == a.fields["GGUF.tensor_count"].contents() + 1
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(tb) == set(ta) | {"output.weight"}
    out, embd = tb["output.weight"], ta["token_embd.weight"]
    assert out.tensor_type == embd.tensor_type and bytes(out.data) == bytes(embd.data)
    assert bytes(tb["blk.0.attn_norm.weight"].data) == bytes(ta["blk.0.attn_norm.weight"].data)
    with pytest.raises(SteerportError, match="not tied"):
        untie_gguf(untied, tmp_path / "again.gguf")
    path = export_gguf(lm, [(tiny_steers(lm)["pos"], 1.0)], tmp_path / "a.gguf", gguf_base=untied)
    assert {t.name for t in GGUFReader(str(path)).tensors} == {"output.weight.lora_a", "output.weight.lora_b"}
