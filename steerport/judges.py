"""Judges: score texts for an attribute, as the probability of its positive side.

Two kinds:

* :class:`HFJudge` wraps any Hugging Face text-classification model (a DistilBERT SST-2
  sentiment model, a RoBERTa toxicity model, ...) — what users with the hub will want.
* :class:`TfidfJudge` is the offline judge: TF-IDF features + logistic regression, fitted with
  scikit-learn on a labeled split that is disjoint from the steer's training data, and saved
  **without pickle**: one safetensors file holding ``idf``, ``coef`` and ``intercept``, with the
  vocabulary, the vectorizer settings, the training data summary and the judge's own held-out
  accuracy as JSON in its metadata.

Example::

    judge = TfidfJudge.fit(texts, labels, positive="positive sentiment")
    judge.save("sentiment.judge")
    p = TfidfJudge.load("sentiment.judge").score(["What a lovely film."])   # array of P(positive)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from steerport.errors import SteerportError, one_line
from steerport.fileio import (
    read_json_safetensors,
    require_fields,
    sha256_file,
    write_json_safetensors,
)
from steerport.texts import read_texts_and_labels

JUDGE_FORMAT = "steerport.judge"
JUDGE_VERSION = 1
BUILTIN_DIR = Path(__file__).parent / "data" / "judges"


@runtime_checkable
class Judge(Protocol):
    """Anything that maps texts to P(positive attribute), one float in [0, 1] per text."""

    positive: str

    def score(self, texts: Sequence[str]) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def attribute_rate(judge: Judge, texts: Sequence[str], threshold: float = 0.5) -> dict[str, float]:
    """Share of texts the judge calls positive, and the mean probability."""
    p = judge.score(texts)
    return {"rate": float((p > threshold).mean()) if len(p) else math.nan, "mean_prob": float(p.mean()) if len(p) else math.nan}


# --------------------------------------------------------------------------- offline judge

# The vectorizer settings stored in the file; the analyzer is rebuilt from them on load.
TFIDF_DEFAULTS: dict[str, Any] = {
    "lowercase": True, "ngram_range": [1, 2], "min_df": 2, "max_features": 20000, "sublinear_tf": True,
    "token_pattern": r"(?u)\b\w\w+\b|[!?]",
}


@dataclass
class TfidfJudge:
    """TF-IDF + logistic regression; P(positive) = σ(w · tfidf(x) + b)."""

    vocabulary: list[str]  # feature index -> term
    idf: np.ndarray  # (F,)
    coef: np.ndarray  # (F,)
    intercept: float
    positive: str = "positive"
    settings: dict[str, Any] = field(default_factory=lambda: dict(TFIDF_DEFAULTS))
    meta: dict[str, Any] = field(default_factory=dict)  # training data, held-out accuracy, ...

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        labels: Sequence[int],
        *,
        positive: str = "positive",
        C: float = 4.0,
        settings: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> TfidfJudge:
        """Fit on texts with labels 1 (positive attribute) / 0."""
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(labels).astype(int)
        if len(texts) != len(y) or len(set(y.tolist())) != 2:
            raise SteerportError(f"a judge needs texts of both labels 0 and 1 (got {len(texts)} texts, labels {sorted(set(y.tolist()))})")
        opts = {**TFIDF_DEFAULTS, **(settings or {})}
        vec = _vectorizer(opts)
        X = vec.fit_transform(list(texts))
        clf = LogisticRegression(C=C, max_iter=2000).fit(X, y)
        terms = [term for term, _ in sorted(vec.vocabulary_.items(), key=lambda kv: kv[1])]  # vocabulary_: term -> 0..n-1
        return cls(terms, vec.idf_.astype(np.float32), clf.coef_[0].astype(np.float32), float(clf.intercept_[0]),
                   positive=positive, settings=opts, meta={"C": C, **(meta or {})})

    def _vec(self):
        if not hasattr(self, "_cached_vec"):
            vec = _vectorizer(self.settings, vocabulary={t: i for i, t in enumerate(self.vocabulary)})
            vec.idf_ = self.idf.astype(np.float64)
            self._cached_vec = vec
        return self._cached_vec

    def decision(self, texts: Sequence[str]) -> np.ndarray:
        """w · tfidf(x) + b for each text."""
        X = self._vec().transform(list(texts))
        return np.asarray(X @ self.coef.astype(np.float64)).ravel() + self.intercept

    def score(self, texts: Sequence[str]) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.decision(texts)))

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        return float(((self.score(texts) > 0.5).astype(int) == np.asarray(labels).astype(int)).mean())

    def describe(self) -> dict[str, Any]:
        return {"kind": "tfidf-logreg", "positive": self.positive, "features": len(self.vocabulary), **self.meta}

    # ------------------------------------------------------------ files (no pickle)

    def save(self, path: str | Path) -> Path:
        """One safetensors file, written atomically: tensors idf/coef/intercept, JSON metadata with
        vocabulary and settings."""
        doc = {"format": JUDGE_FORMAT, "version": JUDGE_VERSION, "kind": "tfidf-logreg", "positive": self.positive,
               "settings": self.settings, "vocabulary": self.vocabulary, "meta": self.meta}
        tensors = {"idf": torch.from_numpy(self.idf.astype(np.float32)), "coef": torch.from_numpy(self.coef.astype(np.float32)),
                   "intercept": torch.tensor([self.intercept], dtype=torch.float64)}
        return write_json_safetensors(path, tensors, JUDGE_FORMAT, doc)

    @classmethod
    def load(cls, path: str | Path) -> TfidfJudge:
        path = Path(path)
        if not path.is_file():
            raise SteerportError(f"{path}: no such judge file")
        doc, t = read_json_safetensors(path, JUDGE_FORMAT, "a steerport judge file")
        require_fields(path, doc, ("format", "positive", "settings", "vocabulary"), "judge")
        missing = [k for k in ("idf", "coef", "intercept") if k not in t]
        if missing:
            raise SteerportError(f"{path}: not a steerport judge file (no tensor {missing[0]!r})")
        if doc.get("format") != JUDGE_FORMAT or doc.get("version", 99) > JUDGE_VERSION:
            raise SteerportError(f"{path}: unsupported judge format {doc.get('format')!r} version {doc.get('version')!r}")
        vocab = doc["vocabulary"]
        if not (len(vocab) == t["idf"].numel() == t["coef"].numel()):
            raise SteerportError(f"{path}: vocabulary of {len(vocab)} terms but {t['idf'].numel()} idf / {t['coef'].numel()} weights")
        return cls(vocab, t["idf"].numpy(), t["coef"].numpy(), float(t["intercept"][0]), positive=doc["positive"],
                   settings=doc["settings"], meta=doc.get("meta", {}))


def _vectorizer(opts: dict[str, Any], vocabulary: dict[str, int] | None = None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    kw = dict(opts)
    kw["ngram_range"] = tuple(kw["ngram_range"])
    if vocabulary is not None:  # loading: fixed vocabulary, nothing to fit
        kw.pop("min_df", None)
        kw.pop("max_features", None)
    return TfidfVectorizer(vocabulary=vocabulary, **kw)


# --------------------------------------------------------------------------- Hugging Face classifiers


class HFJudge:
    """Any Hugging Face sequence-classification model as a judge.

    ``positive_label`` names (or indexes) the class whose probability is returned;
    ``negate`` returns 1 − that probability (e.g. a toxicity model judging "non-toxic").
    Multi-label models (``problem_type == "multi_label_classification"``) use a sigmoid.

    Example::

        judge = HFJudge("distilbert-base-uncased-finetuned-sst-2-english", positive_label="POSITIVE")
        judge = HFJudge("s-nlp/roberta_toxicity_classifier", positive_label="toxic", negate=True, positive="non-toxic")
    """

    def __init__(self, spec: str, *, positive_label: str | int = 1, negate: bool = False, positive: str | None = None,
                 batch_size: int = 16, max_tokens: int = 256, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec)
            self.model = AutoModelForSequenceClassification.from_pretrained(spec).to(device).eval()
        except (OSError, ValueError) as e:
            raise SteerportError(f"could not load judge model {spec!r}: {one_line(e)}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        labels = {str(v).lower(): int(k) for k, v in self.model.config.id2label.items()}
        if isinstance(positive_label, int) or str(positive_label).isdigit():
            self.index = int(positive_label)
        elif str(positive_label).lower() in labels:
            self.index = labels[str(positive_label).lower()]
        else:
            raise SteerportError(f"judge {spec!r} has labels {sorted(labels)}; {positive_label!r} is not one of them")
        if not 0 <= self.index < self.model.config.num_labels:
            raise SteerportError(f"judge {spec!r} has {self.model.config.num_labels} labels; index {self.index} is out of range")
        self.spec, self.negate, self.batch_size, self.max_tokens, self.device = spec, negate, batch_size, max_tokens, device
        self.label_name = self.model.config.id2label.get(self.index, str(self.index))
        self.positive = positive or (f"not {self.label_name}" if negate else str(self.label_name))
        self.multi_label = self.model.config.problem_type == "multi_label_classification"

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i : i + self.batch_size]), return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_tokens).to(self.device)
            logits = self.model(**enc).logits.float()
            p = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, -1)
            out.append(p[:, self.index].cpu())
        probs = torch.cat(out).numpy() if out else np.zeros(0)
        return 1.0 - probs if self.negate else probs

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf-classifier", "model": self.spec, "label": self.label_name, "negate": self.negate, "positive": self.positive}


# --------------------------------------------------------------------------- lookup


def builtin_judges() -> dict[str, Path]:
    """Offline judges shipped with steerport, by task name (``sentiment``, ``toxicity``)."""
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.judge"))} if BUILTIN_DIR.is_dir() else {}


def load_judge(spec: str, **hf_kw) -> Judge:
    """A judge from a name: a shipped task name, a ``.judge`` file, or ``hf:MODEL[:LABEL]`` / a classifier dir."""
    shipped = builtin_judges()
    if spec in shipped:
        return TfidfJudge.load(shipped[spec])
    if spec.endswith(".judge") or Path(spec).is_file():
        return TfidfJudge.load(spec)
    if spec.startswith("hf:"):
        model, _, label = spec[3:].partition(":")
        if label:
            hf_kw.setdefault("positive_label", label)
        return HFJudge(model, **hf_kw)
    if Path(spec).is_dir():
        return HFJudge(spec, **hf_kw)
    raise SteerportError(f"unknown judge {spec!r}: give {', '.join(shipped) or 'a shipped task name'}, a .judge file, or hf:MODEL[:LABEL]")


# --------------------------------------------------------------------------- training from labeled JSONL


def read_jsonl_labeled(path: str | Path, *, text_field: str = "text", label_field: str = "label",
                       positive_label: str = "1", rows: slice | None = None) -> tuple[list[str], list[int]]:
    """Texts and 1/0 labels (1 where the label equals ``positive_label``) of a JSONL/CSV file:
    :func:`steerport.texts.read_texts_and_labels` with one positive label, labels required."""
    texts, labels = read_texts_and_labels(path, text_field=text_field, label_field=label_field,
                                          positive_labels=(str(positive_label),), rows=rows)
    assert labels is not None  # require_labels
    return texts, labels


def parse_data_spec(spec: str) -> tuple[Path, slice | None]:
    """``"train.jsonl@3000:"`` -> (Path("train.jsonl"), slice(3000, None)); no ``@`` means every row."""
    path, sep, rng = spec.rpartition("@")
    if not sep:
        return Path(spec), None
    try:
        a, _, b = rng.partition(":")
        return Path(path), slice(int(a) if a else None, int(b) if b else None)
    except ValueError:
        raise SteerportError(f"{spec!r}: row range after @ must look like START:STOP (e.g. train.jsonl@3000:)") from None


def train_judge(
    train: Sequence[str],
    heldout: Sequence[str],
    *,
    positive: str,
    positive_label: str = "1",
    text_field: str = "text",
    label_field: str = "label",
    C: float = 4.0,
    max_features: int = 20000,
) -> TfidfJudge:
    """Fit an offline judge on data specs (``FILE[@START:STOP]``) and record its held-out accuracy per file.

    Example::

        judge = train_judge(["sst2/train.jsonl@3000:", "sst2/dev.jsonl"], ["sst2/test.jsonl"], positive="positive sentiment")
    """
    texts, labels, sources = [], [], []
    for spec in train:
        path, rows = parse_data_spec(spec)
        t, y = read_jsonl_labeled(path, text_field=text_field, label_field=label_field, positive_label=positive_label, rows=rows)
        texts += t
        labels += y
        sources.append({"file": str(path), "rows": spec.rpartition("@")[2] if "@" in spec else "all", "n": len(t),
                        "sha256": sha256_file(path)})
    judge = TfidfJudge.fit(texts, labels, positive=positive, C=C, settings={"max_features": max_features},
                           meta={"train": sources, "positive_label": positive_label, "label_field": label_field})
    acc = []
    for spec in heldout:
        path, rows = parse_data_spec(spec)
        t, y = read_jsonl_labeled(path, text_field=text_field, label_field=label_field, positive_label=positive_label, rows=rows)
        acc.append({"file": str(path), "rows": spec.rpartition("@")[2] if "@" in spec else "all", "n": len(t),
                    "sha256": sha256_file(path), "accuracy": judge.accuracy(t, y)})
    judge.meta["heldout"] = acc
    return judge
