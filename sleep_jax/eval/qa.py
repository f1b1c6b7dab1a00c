"""Question-answering scores: SQuAD-style answer normalisation, exact match and token F1.

Follows the official SQuAD evaluation script (Rajpurkar et al. 2016; v2.0 script for empty
answers): lowercase, remove punctuation, remove the articles a/an/the, collapse whitespace. A
prediction is scored against every gold answer and the best score is kept.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles (a, an, the), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def _check_golds(golds: Sequence[str]) -> Sequence[str]:
    if isinstance(golds, str):
        raise TypeError(f"golds must be a list of answers, got the string {golds!r}; "
                        f"wrap it: [{golds!r}]")
    if len(golds) == 0:
        raise ValueError("golds is empty: at least one gold answer is needed")
    return golds


CUTS = ("none", "line", "sentence")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def cut_answer(text: str, cut: str = "sentence") -> str:
    """The part of a generated answer that is scored: everything ("none"), its first line
    ("line"), or its first line up to the first sentence end, a ``.``/``!``/``?`` followed by
    whitespace or the end ("sentence"; "3.5" and "e.g" are not ends). A model that answers
    "Paris.\nQuestion: ..." is then scored on "Paris."."""
    if cut not in CUTS:
        raise ValueError(f"answer cut {cut!r}; allowed: {CUTS}")
    if cut == "none":
        return text
    text = text.lstrip("\n").split("\n", 1)[0]
    if cut == "sentence":
        m = _SENTENCE_END.search(text)
        if m:
            text = text[:m.end()]
    return text


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _check_golds(golds)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # SQuAD v2: an empty answer scores 1 only against an empty answer.
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 (bag of normalised words), max over the gold answers."""
    pred = _tokens(prediction)
    return max(_f1(pred, _tokens(g)) for g in _check_golds(golds))


def contains_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if some normalised gold answer occurs in the normalised prediction as whole words
    ("lives in the town of Saltcombe" contains "Saltcombe"), else 0.0: the match for a chat
    model that answers in a sentence. It rewards a prediction that lists many answers, so
    read it beside EM and the predictions."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(g) and f" {normalize_answer(g)} " in pred
                     for g in _check_golds(golds)))


def score(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 over a set of questions.

    Args:
      predictions: N predicted answers.
      golds: N lists of gold answers.

    Returns:
      {"em": mean EM, "f1": mean F1, "contains": mean ``contains_match``, "n": N} (all 0.0
      when N = 0).
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold lists; "
                         "they must pair up one to one")
    n = len(predictions)
    if n == 0:
        return {"em": 0.0, "f1": 0.0, "contains": 0.0, "n": 0}
    em = sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n
    f1 = sum(f1_score(p, g) for p, g in zip(predictions, golds)) / n
    contains = sum(contains_match(p, g) for p, g in zip(predictions, golds)) / n
    return {"em": em, "f1": f1, "contains": contains, "n": n}
