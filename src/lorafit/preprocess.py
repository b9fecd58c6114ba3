"""Optional text preprocessing, applied in a fixed order so that a run predicts exactly as it was trained.

Everything here works offline: stop words come from scikit-learn's English list, stemming is NLTK's
Porter stemmer (no corpus download), lemmatisation is simplemma (its data ships in the wheel).
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

from .config import PREPROCESS_STEPS

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_WORD = re.compile(r"\S+")


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import PorterStemmer

    return PorterStemmer()


def _map_words(text: str, fn) -> str:
    return " ".join(w for w in (fn(w) for w in _WORD.findall(text)) if w)


def lowercase(text: str) -> str:
    return text.lower()


def strip_punctuation(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text).split())


def remove_stopwords(text: str) -> str:
    stop = _stopwords()
    return _map_words(text, lambda w: "" if w.lower().strip(string.punctuation) in stop else w)


def stem(text: str) -> str:
    st = _stemmer()
    return _map_words(text, st.stem)


def lemmatize(text: str) -> str:
    import simplemma

    return _map_words(text, lambda w: simplemma.lemmatize(w, lang="en"))


STEPS = {name: globals()[name] for name in PREPROCESS_STEPS}


def apply(texts: list[str], steps: list[str]) -> list[str]:
    """Apply the configured steps in the canonical order of PREPROCESS_STEPS."""
    ordered = [s for s in PREPROCESS_STEPS if s in steps]
    if not ordered:
        return list(texts)
    out = []
    for t in texts:
        for s in ordered:
            t = STEPS[s](t)
        out.append(t)
    return out
