"""steerport: train LM-Steer steers, apply them, and carry them between language models.

Every public name is imported on first use (PEP 562 module ``__getattr__``), so ``import
steerport`` (and the ``steerport`` command's start) loads neither torch nor transformers.

Example::

    import steerport as sp
    lm = sp.load_model("smollm2-135m")
    steer = sp.Steer.load("positive.st")
    with sp.steered(lm, [(steer, 3.0)]):
        print(sp.generate(lm, ["The movie was"])[0])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from steerport.errors import SteerportError

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    "DataOptions": ("steerport.data", "DataOptions"),
    "Dataset": ("steerport.data", "Dataset"),
    "load_data": ("steerport.data", "load_data"),
    "generate": ("steerport.hooks", "generate"),
    "steered": ("steerport.hooks", "steered"),
    "LoadedModel": ("steerport.models", "LoadedModel"),
    "ModelEmbeddings": ("steerport.embeddings", "ModelEmbeddings"),
    "load_embeddings": ("steerport.embeddings", "load_embeddings"),
    "load_model": ("steerport.models", "load_model"),
    "resolve_spec": ("steerport.models", "resolve_spec"),
    "FitOptions": ("steerport.mapping", "FitOptions"),
    "Mapping": ("steerport.mapping", "Mapping"),
    "fit_mapping": ("steerport.mapping", "fit_mapping"),
    "get_mapping": ("steerport.mapping", "get_mapping"),
    "Steer": ("steerport.steer", "Steer"),
    "TrainConfig": ("steerport.train", "TrainConfig"),
    "TrainResult": ("steerport.train", "TrainResult"),
    "train_steer": ("steerport.train", "train"),  # not "train": that name is the module
    "TransferOptions": ("steerport.transfer", "TransferOptions"),
    "transfer_steer": ("steerport.transfer", "transfer_steer"),  # every kind, by the steer's kind
    "align_vocab": ("steerport.vocab", "align_vocab"),
    "export_control_vector": ("steerport.controlvector", "export_control_vector"),
    "import_control_vector": ("steerport.controlvector", "import_control_vector"),
    "explain_text": ("steerport.explain", "explain_text"),
    "steer_keywords": ("steerport.explain", "steer_keywords"),
    "merge_into_model": ("steerport.merge", "merge_into_model"),
    "merge_to_dir": ("steerport.merge", "merge_to_dir"),
    "EvalSettings": ("steerport.evaluate", "EvalSettings"),
    "evaluate_steers": ("steerport.evaluate", "evaluate_steers"),
    "HFJudge": ("steerport.judges", "HFJudge"),
    "TfidfJudge": ("steerport.judges", "TfidfJudge"),
    "load_judge": ("steerport.judges", "load_judge"),
    "HeadScorer": ("steerport.scoring", "HeadScorer"),
    "capture_hidden": ("steerport.scoring", "capture_hidden"),
    "make_actadd": ("steerport.actadd", "make_actadd"),
    "transfer_actadd": ("steerport.actadd", "transfer_actadd"),
    "make_token_steer": ("steerport.tokenprob", "make_token_steer"),
    "transfer_token_prob": ("steerport.tokenprob", "transfer_token_prob"),
}

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


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and keep the name here."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'steerport' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from steerport.actadd import make_actadd, transfer_actadd
    from steerport.controlvector import export_control_vector, import_control_vector
    from steerport.data import DataOptions, Dataset, load_data
    from steerport.embeddings import ModelEmbeddings, load_embeddings
    from steerport.evaluate import EvalSettings, evaluate_steers
    from steerport.explain import explain_text, steer_keywords
    from steerport.hooks import generate, steered
    from steerport.judges import HFJudge, TfidfJudge, load_judge
    from steerport.mapping import FitOptions, Mapping, fit_mapping, get_mapping
    from steerport.merge import merge_into_model, merge_to_dir
    from steerport.models import LoadedModel, load_model, resolve_spec
    from steerport.scoring import HeadScorer, capture_hidden
    from steerport.steer import Steer
    from steerport.tokenprob import make_token_steer, transfer_token_prob
    from steerport.train import TrainConfig, TrainResult
    from steerport.train import train as train_steer
    from steerport.transfer import TransferOptions, transfer_steer
    from steerport.vocab import align_vocab
