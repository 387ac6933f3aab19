"""Real control-vector check: an ActAdd (all positions) steer on smollm2-135m -> llama.cpp GGUF -> back.

Usage: python benchmarks/cvec_roundtrip.py [OUT.gguf]
Compares logits of the original steer, the imported one, and a forward hook that adds the GGUF
direction.N to the output of decoder block N exactly as llama.cpp does (build_cvec after block N).
"""
import json
import sys

import gguf
import torch

from steerport import load_model, steered
from steerport.actadd import make_actadd
from steerport.controlvector import import_control_vector
from steerport.kinds import get_kind
from steerport.models import decoder_layers

torch.set_num_threads(1)
lm = load_model("smollm2-135m")
steer = make_actadd(lm, [(" Love", " Hate")], layer=6, coeff=4.0, positions="all", positive="love")
path = get_kind("actadd").export("gguf-cvec", steer, sys.argv[1] if len(sys.argv) > 1 else "love.gguf", value=1.0,
                                model_hint="llama")
r = gguf.GGUFReader(str(path))
fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
tensors = [(t.name, list(t.shape), t.tensor_type.name) for t in r.tensors]
back = import_control_vector(path)
texts = ["I think that you are", "The weather today is mild with a light breeze from the west."]
enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
mask = enc["attention_mask"].bool()
with torch.no_grad():
    base = lm.model(**enc).logits
    with steered(lm, [(steer, 1.0)]):
        orig = lm.model(**enc).logits
    with steered(lm, [(back, 1.0)], force=True):
        imported = lm.model(**enc).logits
    d = torch.from_numpy(r.tensors[0].data.copy()).float()
    N = int(r.tensors[0].name.split(".")[1])
    def after_block(module, args, output):  # llama.cpp: direction.N added to the output of block N
        return (output[0] + d, *output[1:]) if isinstance(output, tuple) else output + d
    h = decoder_layers(lm.model)[N].register_forward_hook(after_block)
    llamacpp = lm.model(**enc).logits
    h.remove()
print(json.dumps({"gguf_fields": fields, "tensors": tensors, "steer_layer": steer.meta["layer"],
                  "imported_layer": back.meta["layer"],
                  "max_abs_diff_imported_vs_original": float((imported - orig).abs()[mask].max()),
                  "max_abs_diff_llamacpp_semantics_vs_original": float((llamacpp - orig).abs()[mask].max()),
                  "steer_effect_max_abs_logit_shift": float((orig - base).abs()[mask].max())}, indent=1, default=str))
