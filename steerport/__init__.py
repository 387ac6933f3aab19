"""steerport: train LM-Steer steers, apply them, and carry them between language models.

Example::

    import steerport as sp
    lm = sp.load_model("smollm2-135m")
    steer = sp.Steer.load("positive.st")
    with sp.steered(lm, [(steer, 3.0)]):
        print(sp.generate(lm, ["The movie was"])[0])
"""

from steerport.data import DataOptions, Dataset, load_data
from steerport.errors import SteerportError
from steerport.hooks import generate, steered
from steerport.models import LoadedModel, ModelEmbeddings, load_embeddings, load_model, resolve_spec
from steerport.steer import Steer
from steerport.train import TrainConfig, TrainResult
from steerport.train import train as train_steer  # not "train": that name is the module

__version__ = "0.1.0"

__all__ = [
    "DataOptions",
    "Dataset",
    "TrainConfig",
    "TrainResult",
    "load_data",
    "train_steer",
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
