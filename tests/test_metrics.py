"""Metrics: values on known facts of the unedited model, and the pieces' arithmetic."""

import math

import pytest

from steamviz import metrics
from steamviz.requests import EditRequest

REQ = EditRequest(
    prompt="The capital of {} is", subject="France", target_new="London", target_true="Paris",
    paraphrase_prompts=["France's capital city is"],
    neighborhood_prompts=["The capital of Japan is", "The capital of Italy is"],
    neighborhood_answers=["Tokyo", "Rome"],
    portability_prompts=["The Eiffel Tower is in the city of"], portability_answers=["London"],
    case_id="t1",
)


def test_ngram_entropy_prefers_varied_text():
    rep = "the cat the cat the cat the cat the cat the cat"
    varied = "a quick brown fox jumps over the lazy dog near a quiet river bank"
    assert metrics.ngram_entropy(varied) > metrics.ngram_entropy(rep) + 1.0
    # 3 distinct bigrams equally likely: log2(3) bits * 2/3, plus trigrams weighted 4/3
    h = metrics.ngram_entropy("a b c d")
    assert math.isclose(h, (math.log2(3) * 2 / 3 + 1.0 * 4 / 3) / 2, rel_tol=1e-9)
    assert metrics.ngram_entropy("") == 0.0


def test_tfidf_cosine():
    assert metrics.tfidf_cosine("Tokyo is in Japan", "Tokyo is in Japan") == pytest.approx(1.0)
    assert metrics.tfidf_cosine("apples and pears", "rockets to mars") == 0.0
    mid = metrics.tfidf_cosine("Tokyo is a city in Japan", "Osaka is a city in Japan")
    assert 0.1 < mid < 0.9


@pytest.mark.model
def test_unedited_model_scores(lm):
    recs = []
    row = metrics.evaluate(lm, REQ, generation=True, ref_text="London is the capital of England",
                           records=recs, max_new_tokens=12)
    assert row["efficacy"] == 0.0 and row["p_true"] > 0.5 > row["p_new"]
    assert row["efficacy_margin"] < -0.4
    assert row["neighborhood"] == 1.0  # Tokyo/Rome beat London
    assert row["portability"] == 0.0  # the unedited model says Paris
    assert row["fluency"] > 0 and 0 <= row["consistency"] <= 1
    kinds = {r["metric"] for r in recs}
    assert kinds == {"efficacy", "paraphrase", "neighborhood", "portability", "fluency",
                     "consistency"}
    assert all(r["case_id"] == "t1" for r in recs)
