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
from steerport.mapping import FitOptions, Mapping, fit_mapping, get_mapping
from steerport.steer import Steer
from steerport.train import TrainConfig, TrainResult
from steerport.train import train as train_steer  # not "train": that name is the module
from steerport.transfer import TransferOptions
from steerport.transfer import transfer as transfer_steer  # likewise
from steerport.vocab import align_vocab
from steerport.evaluate import EvalSettings, evaluate_steers
from steerport.judges import HFJudge, TfidfJudge, load_judge
from steerport.scoring import HeadScorer, capture_hidden

__version__ = "0.1.0"

__all__ = [
    "DataOptions",
    "Dataset",
    "FitOptions",
    "EvalSettings",
    "HFJudge",
    "HeadScorer",
    "TfidfJudge",
    "capture_hidden",
    "evaluate_steers",
    "load_judge",
    "LoadedModel",
    "Mapping",
    "ModelEmbeddings",
    "Steer",
    "SteerportError",
    "TrainConfig",
    "TrainResult",
    "TransferOptions",
    "align_vocab",
    "fit_mapping",
    "generate",
    "get_mapping",
    "load_data",
    "load_embeddings",
    "load_model",
    "resolve_spec",
    "steered",
    "train_steer",
    "transfer_steer",
]
