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
from steerport.steer import Steer

# further steer kinds register their appliers in steerport.hooks.APPLIERS on import
from steerport.actadd import make_actadd, transfer_actadd  # noqa: E402  (kind "actadd")
from steerport.tokenprob import make_token_steer, transfer_token_prob  # noqa: E402  (kind "token-prob")

__version__ = "0.1.0"

__all__ = [
    "LoadedModel",
    "ModelEmbeddings",
    "Steer",
    "SteerportError",
    "generate",
    "make_actadd",
    "make_token_steer",
    "transfer_actadd",
    "transfer_token_prob",
    "load_embeddings",
    "load_model",
    "resolve_spec",
    "steered",
]
