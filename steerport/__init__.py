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
from steerport.controlvector import export_control_vector, import_control_vector
from steerport.explain import explain_text, steer_keywords
from steerport.merge import merge_into_model, merge_to_dir
from steerport.evaluate import EvalSettings, evaluate_steers
from steerport.judges import HFJudge, TfidfJudge, load_judge
from steerport.scoring import HeadScorer, capture_hidden

# further steer kinds register their appliers in steerport.hooks.APPLIERS on import
from steerport.actadd import make_actadd, transfer_actadd  # noqa: E402  (kind "actadd")
from steerport.tokenprob import make_token_steer, transfer_token_prob  # noqa: E402  (kind "token-prob")

__version__ = "0.1.0"

__all__ = [
    "DataOptions",
    "Dataset",
    "EvalSettings",
    "FitOptions",
    "HFJudge",
    "HeadScorer",
    "LoadedModel",
    "Mapping",
    "ModelEmbeddings",
    "Steer",
    "SteerportError",
    "TfidfJudge",
    "TrainConfig",
    "TrainResult",
    "TransferOptions",
    "align_vocab",
    "capture_hidden",
    "evaluate_steers",
    "explain_text",
    "export_control_vector",
    "fit_mapping",
    "generate",
    "get_mapping",
    "import_control_vector",
    "load_data",
    "load_embeddings",
    "load_judge",
    "load_model",
    "make_actadd",
    "make_token_steer",
    "merge_into_model",
    "merge_to_dir",
    "resolve_spec",
    "steer_keywords",
    "steered",
    "train_steer",
    "transfer_actadd",
    "transfer_steer",
    "transfer_token_prob",
]
