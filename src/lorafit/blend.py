"""The classical TF-IDF model, and blending it with a run's adapter.

A TF-IDF linear model and a fine-tuned encoder make different mistakes: the first reads exact words and word
pairs, the second meaning. Adding the adapter's log-probabilities to the linear model's scores, with a weight chosen
on validation rows (and the sum divided by the temperature of the lowest validation loss, so that its probabilities
stay calibrated), is a product of the two experts whose softmax is again a distribution over the classes. When it
is more accurate on validation than the adapter alone (`eval.blend`, `lorafit blend`), the run keeps the linear
model in `blend/` and `lorafit predict`, `eval` and `serve` classify with the blend (docs/accuracy.md).

The linear model's weights (one per kept term and class) are trained parameters, so they count toward the run's
budget with the adapter's: the vocabulary is cut to the most frequent terms that fit what the adapter leaves.

scikit-learn fits and applies the model; it is saved as JSON and safetensors (never pickle) and rebuilt from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import fsync_dir
from .errors import LorafitError
from .metrics import classification_metrics, cross_entropy

# The recipe: word uni- and bigrams with sublinear term frequency, terms seen in at least two texts, a linear SVM.
# It is the usual strong classical text classifier; on held-out AG News rows it matched logistic regression and
# SGD (docs/accuracy.md) at a third of logistic regression's time.
NGRAMS = (1, 2)
MIN_DF = 2
C = 0.5
# The blend weights tried on validation, 0 (the adapter alone) first: it wins ties, so a blend is kept only when it
# is strictly more accurate on validation.
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
# The temperatures tried on validation once the weight is chosen: the weight is picked for accuracy, and the sum it
# weighs is sharper than a probability should be; dividing it by the temperature of the lowest validation loss makes
# the blend's probabilities calibrated again without changing a single label.
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.5, 16.0, 41))
# Fewer terms than this make a linear model too weak to be worth blending: the budget left is too small.
MIN_TERMS = 1000
FOLDER = "blend"


@dataclass
class TfidfModel:
    """TF-IDF features and one linear score per class (classes never seen in training score -1e9)."""

    vectorizer: object  # sklearn TfidfVectorizer
    coef: np.ndarray  # (classes seen, terms)
    intercept: np.ndarray  # (classes seen,)
    classes: np.ndarray  # the label ids the model saw, in coef's row order
    num_labels: int
    fit_seconds: float = 0.0

    @classmethod
    def fit(cls, texts: list[str], labels: np.ndarray, num_labels: int, max_terms: int | None = None) -> TfidfModel:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.svm import LinearSVC

        start = time.perf_counter()

        def vectorizer(min_df: int):
            return TfidfVectorizer(ngram_range=NGRAMS, min_df=min_df, sublinear_tf=True, max_features=max_terms)

        vec = vectorizer(MIN_DF)
        try:
            features = vec.fit_transform(texts)
        except ValueError:  # too few texts for min_df (a handful of rows): keep every term
            vec = vectorizer(1)
            features = vec.fit_transform(texts)
        classes = np.unique(labels)
        svm = LinearSVC(C=C).fit(features, labels)
        coef, intercept = svm.coef_, svm.intercept_
        if len(classes) == 2:  # LinearSVC keeps one row for two classes: the score of the second
            coef, intercept = np.concatenate([-coef, coef]), np.concatenate([-intercept, intercept])
        # C order: LinearSVC's coef_ is Fortran-ordered, and safetensors writes the raw buffer as if it were C
        coef, intercept = (np.ascontiguousarray(a, dtype=np.float32) for a in (coef, intercept))
        return cls(vec, coef, intercept, classes, num_labels, time.perf_counter() - start)

    @property
    def parameters(self) -> int:
        return int(self.coef.size + self.intercept.size)

    @property
    def terms(self) -> int:
        return int(self.coef.shape[1])

    def scores(self, texts: list[str]) -> np.ndarray:
        seen = np.asarray(self.vectorizer.transform(texts) @ self.coef.T) + self.intercept
        full = np.full((len(texts), self.num_labels), -1e9, dtype=np.float32)
        full[:, self.classes] = seen
        return full

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        vocabulary = {term: int(i) for term, i in self.vectorizer.vocabulary_.items()}
        (folder / "vocabulary.json").write_text(json.dumps(vocabulary, ensure_ascii=False))
        tensors = {
            "idf": self.vectorizer.idf_.astype(np.float64),
            "coef": self.coef,
            "intercept": self.intercept,
            "classes": self.classes.astype(np.int64),
        }
        save_file(tensors, str(folder / "tfidf.safetensors"))

    @classmethod
    def load(cls, folder: Path, num_labels: int) -> TfidfModel:
        from safetensors.numpy import load_file

        tensors = load_file(str(folder / "tfidf.safetensors"))
        vec = _vectorizer((folder / "vocabulary.json").read_bytes(), tensors["idf"])
        return cls(vec, tensors["coef"], tensors["intercept"], tensors["classes"], num_labels)


# Vectorizers loaded so far, by content. The vocabulary (a dict of every term) is most of a loaded blend's memory,
# and runs blended on the same training rows within the same budget have the same one: a server of such runs holds
# it once. A vectorizer is only read once built.
_VECTORIZERS: dict[str, object] = {}


def _vectorizer(vocabulary: bytes, idf: np.ndarray):
    from sklearn.feature_extraction.text import TfidfVectorizer

    key = hashlib.sha256(vocabulary + idf.tobytes()).hexdigest()
    if key not in _VECTORIZERS:
        vec = TfidfVectorizer(ngram_range=NGRAMS, sublinear_tf=True, vocabulary=json.loads(vocabulary))
        vec.idf_ = idf
        vec.transform([""])  # settles the vocabulary check transform makes on first use, so that later calls only read
        _VECTORIZERS[key] = vec
    return _VECTORIZERS[key]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    from scipy.special import log_softmax as scipy_log_softmax  # scipy comes with scikit-learn

    return scipy_log_softmax(logits.astype(np.float64), axis=-1)


@dataclass
class Blend:
    model: TfidfModel
    weight: float
    temperature: float = 1.0

    def logits(self, texts: list[str], adapter_logits: np.ndarray) -> np.ndarray:
        """The blend's logits: the adapter's log-probabilities plus `weight` times the linear model's scores,
        divided by `temperature`."""
        if not len(texts):
            return adapter_logits
        return combine(adapter_logits, self.model.scores(texts), self.weight, self.temperature)


def combine(adapter_logits: np.ndarray, scores: np.ndarray, weight: float, temperature: float = 1.0) -> np.ndarray:
    """The blend of an adapter's logits and the linear model's scores for the same rows (Blend.logits)."""
    return ((log_softmax(adapter_logits) + weight * scores) / temperature).astype(np.float32)


def note(blend: Blend) -> str:
    """What a run with a blend answers with, in a few words, for predict's and eval's output."""
    return (
        f"the run answers with its adapter blended with a TF-IDF model (weight {blend.weight:g}, "
        f"{blend.model.terms:,} terms; blend/)"
    )


def choose_weight(adapter_logits: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> float:
    """The weight of WEIGHTS whose blend is most accurate on these (validation) rows; the smallest among equals."""
    accuracy = [float((combine(adapter_logits, scores, w).argmax(-1) == labels).mean()) for w in WEIGHTS]
    return WEIGHTS[int(np.argmax(accuracy))]


def choose_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature of TEMPERATURES under which these (validation) logits have the lowest cross-entropy."""
    losses = [cross_entropy((logits / t).astype(np.float32), labels) for t in TEMPERATURES]
    return TEMPERATURES[int(np.argmin(losses))]


def make(
    train_texts: list[str],
    train_labels: np.ndarray,
    val: tuple[list[str], np.ndarray, np.ndarray],
    test: tuple[list[str], np.ndarray, np.ndarray] | None,
    label_names: list[str],
    parameters_left: int,
    fitted: TfidfModel | None = None,
) -> tuple[Blend | None, dict]:
    """Fit the linear model within `parameters_left`, choose the weight on validation, score test with it.

    val and test are (texts, labels, the adapter's logits). `fitted`, where given, is the same recipe already
    trained on these training rows with every term (the run's baseline): it is used when it fits the budget.
    Returns the blend (None when the adapter alone is as accurate on validation, or the budget leaves too few
    terms) and its figures for metrics.json.
    """
    start = time.perf_counter()
    classes = len(label_names)
    max_terms = (parameters_left - classes) // classes
    if max_terms < MIN_TERMS:
        return None, {"skipped": f"the budget leaves room for {max(max_terms, 0):,} terms, fewer than {MIN_TERMS:,}"}
    if fitted is not None and fitted.parameters <= parameters_left:
        model = fitted
    else:
        model = TfidfModel.fit(train_texts, train_labels, classes, max_terms)
    texts, labels, logits = val
    scores = model.scores(texts)  # the validation rows' scores, read by every choice below
    weight = choose_weight(logits, scores, labels)
    out = {"weight": weight, "terms": model.terms, "parameters": model.parameters}
    if weight == 0.0:
        out["skipped"] = "the adapter alone is as accurate on validation"
        return None, out
    blend = Blend(model, weight, choose_temperature(combine(logits, scores, weight), labels))
    out["temperature"] = blend.temperature
    out["val"] = classification_metrics(combine(logits, scores, weight, blend.temperature), labels, label_names)
    if test is not None:
        texts, labels, logits = test
        out["test"] = classification_metrics(blend.logits(texts, logits), labels, label_names)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return blend, out


def save(blend: Blend, run_folder: Path) -> None:
    """Write blend/ in the run folder whole or not at all (a temporary sibling, renamed into place)."""
    final = run_folder / FOLDER
    work = run_folder / f".{FOLDER}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        blend.model.save(work)
        (work / "blend.json").write_text(json.dumps({"weight": blend.weight, "temperature": blend.temperature}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    fsync_dir(run_folder)


def remove(run_folder: Path) -> None:
    shutil.rmtree(run_folder / FOLDER, ignore_errors=True)


def load(run_folder: Path, num_labels: int) -> Blend | None:
    """The run's blend, or None when it has none."""
    folder = Path(run_folder) / FOLDER
    if not folder.is_dir():
        return None
    try:
        settings = json.loads((folder / "blend.json").read_text())
        return Blend(
            TfidfModel.load(folder, num_labels), float(settings["weight"]), float(settings.get("temperature", 1.0))
        )
    except (OSError, ValueError, KeyError) as e:
        raise LorafitError(
            f"{folder}: the run's blend is unreadable ({type(e).__name__}: {e}); expected blend.json, "
            "vocabulary.json and tfidf.safetensors as lorafit writes them; run `lorafit blend` on the run again"
        ) from None


def summary(metrics: dict) -> str | None:
    """One line on the run's blend for the end-of-run summary, or None when the run did not try one."""
    b = metrics.get("blend")
    if b is None:
        return None
    if "skipped" in b:
        return f"blend with a TF-IDF model: not kept ({b['skipped']})"
    line = f"blend with a TF-IDF model ({b['terms']:,} terms, {b['parameters']:,} parameters, weight {b['weight']:g}, temperature {b.get('temperature', 1.0):.2f}): val accuracy {b['val']['accuracy']:.4f}"
    if "test" in b:
        line += f", test accuracy {b['test']['accuracy']:.4f}"
    return line + "; predict, eval and serve use it"
