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
from steerport.evaluate import EvalSettings, evaluate_steers
from steerport.judges import HFJudge, TfidfJudge, load_judge
from steerport.scoring import HeadScorer, capture_hidden

__version__ = "0.1.0"

__all__ = [
    "EvalSettings",
    "HFJudge",
    "HeadScorer",
    "TfidfJudge",
    "capture_hidden",
    "evaluate_steers",
    "load_judge",
    "LoadedModel",
    "ModelEmbeddings",
    "Steer",
    "SteerportError",
    "generate",
    "load_embeddings",
    "load_model",
    "resolve_spec",
    "steered",
]
