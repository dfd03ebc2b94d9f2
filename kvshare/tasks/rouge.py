"""ROUGE F-measures for lm-eval's generate_until tasks (referenced from summarization.yaml).

lm-eval calls each metric once per document as `fn(references=[gold], predictions=[generated])` and
averages the returned floats. Scores are F1 in [0, 1], with Porter stemming, as usual for XSum.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_scores(reference: str, prediction: str) -> dict[str, float]:
    scores = _scorer().score(reference, prediction)
    return {name: s.fmeasure for name, s in scores.items()}


def _score(name: str, references, predictions) -> float:
    return rouge_scores(references[0], predictions[0])[name]


def rouge1(references, predictions) -> float:
    return _score("rouge1", references, predictions)


def rouge2(references, predictions) -> float:
    return _score("rouge2", references, predictions)


def rougeL(references, predictions) -> float:  # noqa: N802 (the metric's usual name)
    return _score("rougeL", references, predictions)
