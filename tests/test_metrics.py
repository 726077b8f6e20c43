"""Metrics: values on known facts of the unedited model, and the pieces' arithmetic."""

import json
import math

import pytest

from steamviz import fetch, metrics
from steamviz.edit.edits import Edit
from steamviz.core.guard import EditedModelError
from steamviz.data.requests import EditRequest
from steamviz.core.memo import clear_caches

from conftest import data_missing

needs_wikitext = pytest.mark.skipif(bool(data_missing("wikitext")),
                                    reason=str(data_missing("wikitext")))

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


@needs_wikitext
def test_tfidf_cosine():
    assert metrics.tfidf_cosine("Tokyo is in Japan", "Tokyo is in Japan") == pytest.approx(1.0)
    assert metrics.tfidf_cosine("apples and pears", "rockets to mars") == 0.0
    mid = metrics.tfidf_cosine("Tokyo is a city in Japan", "Osaka is a city in Japan")
    assert 0.1 < mid < 0.9


@pytest.fixture
def fresh_idf(tmp_path, monkeypatch):
    """An empty steamviz cache and no in-process IDF (the mirror, if any, stays)."""
    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path))
    clear_caches("metrics")
    yield tmp_path
    clear_caches("metrics")


@pytest.fixture
def fresh_idf_corpus(fresh_idf):
    """``fresh_idf`` where WikiText can still be read: from the mirror, as the cache is
    empty. A clone with nothing beside it (its data in the user's cache) skips, with why."""
    why = data_missing("wikitext")  # (copies WikiText from the mirror into the empty cache)
    if why:
        pytest.skip(f"with an empty cache: {why}")
    return fresh_idf


@needs_wikitext
def test_tfidf_idf_is_fitted_on_the_corpus_not_the_two_texts(fresh_idf_corpus):
    from sklearn.feature_extraction.text import TfidfVectorizer

    idf = metrics.corpus_idf()
    assert idf.meta["n_documents"] > 3000 and len(idf.terms) > 20000
    # word weights mean something: common words weigh little, rare ones much
    assert idf.weight("the") < 1.5 < 5 < idf.weight("lobster")
    assert idf.weight("of") < idf.weight("capital") < idf.weight("tokyo")
    a, b = "Tokyo is a city in Japan", "Osaka is a city in Japan"
    two_doc = TfidfVectorizer().fit([a, b]).transform([a, b])  # the old fit
    old = float(two_doc[0].multiply(two_doc[1]).sum())
    new = metrics.tfidf_cosine(a, b)
    assert abs(new - old) > 0.1, (new, old)
    # ROME's tfidf_similarity with a vectoriser fitted on the same documents
    vec = TfidfVectorizer().fit(metrics.wikitext_documents())
    e = vec.transform([a, b]).toarray()
    assert new == pytest.approx(float(e[0] @ e[1]), abs=1e-12)


@needs_wikitext
def test_tfidf_idf_is_cached_and_reused(fresh_idf_corpus, monkeypatch):
    fresh_idf = fresh_idf_corpus
    first = metrics.corpus_idf()
    path = metrics.idf_cache_path()
    assert path.is_file() and path.suffix == ".json" and str(path).startswith(str(fresh_idf))
    stored = json.loads(path.read_text())
    assert stored["kind"] == "tfidf-idf" and len(stored["terms"]) == len(stored["idf"])
    assert [f[0] for f in stored["meta"]["files"]] == list(metrics.IDF_CORPUS)

    def no_refit(docs):
        raise AssertionError("refitted although the IDF is cached")

    monkeypatch.setattr(metrics, "_fit_idf", no_refit)
    assert metrics.corpus_idf() is first  # memoised in the process
    clear_caches("metrics")
    again = metrics.corpus_idf()  # from the file
    assert again.terms == first.terms and (again.idf == first.idf).all()
    assert metrics.tfidf_cosine("Paris is in France", "Lyon is in France") == pytest.approx(
        first.cosine("Paris is in France", "Lyon is in France"))
    # a damaged cache file is fitted again, not trusted
    monkeypatch.undo()
    monkeypatch.setenv("STEAMVIZ_CACHE", str(fresh_idf))
    path.write_text('{"kind": "tfidf-idf", "key": "other", "terms": [], "idf": []}')
    clear_caches("metrics")
    with pytest.warns(UserWarning, match="bad IDF cache file"):
        assert metrics.corpus_idf().terms == first.terms
    assert json.loads(path.read_text())["key"] == stored["key"]


def test_tfidf_without_the_corpus_says_how_to_get_it(fresh_idf, monkeypatch):
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    with pytest.raises(fetch.DataError, match="steamviz data get wikitext") as e:
        metrics.tfidf_cosine("Tokyo is a city in Japan", "Osaka is a city in Japan")
    assert fetch.MIRROR_ENV in str(e.value)
    assert not list(fresh_idf.rglob("*.json"))  # no two-document fallback was stored


@needs_wikitext
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


@pytest.mark.model
def test_reference_text_refuses_an_edited_model(lm):
    e = Edit(lm.model, "probe")
    try:
        with pytest.raises(EditedModelError, match="unedited model"):
            metrics.reference_text(lm, "Japan", facts=[])
    finally:
        e.restore()
    assert metrics.reference_text(lm, "Japan", facts=[]) == "Japan"


@pytest.mark.model
def test_fluency_rome_mode_samples_like_rome(lm):
    import inspect

    req = EditRequest(prompt="The capital of {} is", subject="France", target_new="London",
                      target_true="Paris", paraphrase_prompts=["France's capital city is"])
    # ROME's test_generation: generate_fast(max_out_len=100), top_k 5
    sig = inspect.signature(metrics.fluency_records).parameters
    assert (sig["max_out_len"].default, sig["top_k"].default) == (100, 5)
    assert sig["mode"].default == "greedy"  # the default is unchanged
    short = dict(mode="rome", max_out_len=16)  # short texts: CPU time
    a = metrics.fluency_records(lm, req, seed=0, **short)
    assert [r["prompt"] for r in a] == metrics.generation_prompts(req)
    assert all(r["prompts_from"] == "rewrite+paraphrase" and r["top_k"] == 5 for r in a)
    # max_out_len bounds prompt + generation, as ROME's does; no stop at end-of-text
    assert all(r["prompt_tokens"] + r["new_tokens"] == 16 and r["new_tokens"] > 8 for r in a)
    # the same entropy function, on ROME's cleaned prompt + text
    for r in a:
        assert r["value"] == metrics.ngram_entropy(metrics._rome_clean(lm, r["prompt"] + r["text"]))
    # sampled, seeded: the same seed gives the same texts, another seed other texts
    s0 = [r["text"] for r in a]
    assert s0 == [r["text"] for r in metrics.fluency_records(lm, req, seed=0, **short)]
    assert s0 != [r["text"] for r in metrics.fluency_records(lm, req, seed=1, **short)]
    # a prompt's text does not depend on the other prompts of its batch
    one = metrics.sample_top_k(lm, [req.rewrite_prompt], max_out_len=16, seed=0)
    assert one[0]["text"] == s0[0]
    # the request's own generation prompts are used when it has them
    req.generation_prompts = ["France is known for"]
    g = metrics.fluency_records(lm, req, mode="rome", max_out_len=8)
    assert [r["prompt"] for r in g] == ["France is known for"]
    assert g[0]["prompts_from"] == "generation_prompts"
    # the default: greedy tokens of the rewrite and paraphrase prompts
    d = metrics.fluency_records(lm, req, max_new_tokens=6)
    assert [r["prompt"] for r in d] == metrics.generation_prompts(req)
    assert d[0]["text"] == metrics.greedy(lm, [req.rewrite_prompt], 6)[0]
    assert d[0]["value"] == metrics.ngram_entropy(d[0]["prompt"] + d[0]["text"])


@pytest.mark.model
def test_evaluate_rome_fluency_uses_the_sampled_texts(lm, monkeypatch):
    calls = []

    def fake(lm_, prompts, max_out_len=100, top_k=5, seed=0, **kw):
        calls.append((list(prompts), max_out_len, top_k, seed))
        return [dict(text=" a b c a b c", prompt_tokens=5, new_tokens=95) for _ in prompts]

    monkeypatch.setattr(metrics, "sample_top_k", fake)
    recs = []
    row = metrics.evaluate(lm, REQ, fluency="rome", seed=3, records=recs)
    assert calls == [(metrics.generation_prompts(REQ), 100, 5, 3)]
    assert row["fluency_mode"] == "rome" and row["generation"] == " a b c a b c"
    fl = [r for r in recs if r["metric"] == "fluency"]
    assert row["fluency"] == pytest.approx(sum(r["value"] for r in fl) / len(fl))
    with pytest.raises(ValueError, match="fluency mode"):
        metrics.evaluate(lm, REQ, fluency="sampled")
