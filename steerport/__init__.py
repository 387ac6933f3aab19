"""steerport: train LM-Steer steers, apply them, and carry them between language models.

Example::

    import steerport as sp
    lm = sp.load_model("smollm2-135m")
    steer = sp.Steer.load("positive.st")
    with sp.steered(lm, [(steer, 3.0)]):
        print(sp.generate(lm, ["The movie was"])[0])
"""

from steerport.errors import SteerportError
from steerport.hooks import generate, steered
from steerport.models import LoadedModel, ModelEmbeddings, load_embeddings, load_model, resolve_spec
from steerport.mapping import FitOptions, Mapping, fit_mapping, get_mapping
from steerport.steer import Steer
from steerport.transfer import TransferOptions  # steerport.transfer stays the module: transfer.transfer(...)
from steerport.vocab import align_vocab

__version__ = "0.1.0"

__all__ = [
    "FitOptions",
    "LoadedModel",
    "Mapping",
    "ModelEmbeddings",
    "Steer",
    "SteerportError",
    "TransferOptions",
    "align_vocab",
    "fit_mapping",
    "generate",
    "get_mapping",
    "load_embeddings",
    "load_model",
    "resolve_spec",
    "steered",
]
