"""The reference-fact pool: public triples as anchor candidates, and the coverage report."""

import json

import pytest

from steamviz import pool
from steamviz.datasets import Fact
from steamviz.requests import EditRequest, RequestError


def test_polyglot_rows_become_facts_with_the_subject_slot(tmp_path):
    p = tmp_path / "pg.jsonl"
    rows = [dict(stem="Trailer Park Boys was from", true="Canada", relation="P495",
                 subject="Trailer Park Boys"),
            dict(stem="The mother tongue of X is", true="French", relation="P103", subject="Y"),
            dict(stem="{weird} Z is in", true="A", relation="P17", subject="Z")]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts = pool.load_polyglot(p)
    assert facts == [Fact("Trailer Park Boys", "P495", "Canada", "{} was from")]


def test_user_facts_extend_the_pool_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps(dict(subject="Zog", relation="P17", object="Atlantis",
                                    template="{} is a city in")) + "\n")
    assert pool.load_user_facts(good)[0].object == "Atlantis"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"subject": "Zog", "relation": "P17", "object": "A"}\n')
    with pytest.raises(RequestError, match="bad.jsonl: line 1: not a fact"):
        pool.load_user_facts(bad)


def test_candidates_cap_each_object_and_relation_deterministically():
    facts = [Fact(f"s{i}", "P37", "English", "{} speaks") for i in range(100)] + [
        Fact("t", "P17", "France", "{} is in")]
    a, b = pool.candidates(facts, 10, seed=1), pool.candidates(facts, 10, seed=1)
    assert a == b and len(a) == 11
    assert pool.candidates(facts, 10, seed=2) != a
    assert len(pool.candidates(facts, None)) == 101


def test_relation_names_map_to_wikidata_ids():
    assert pool.RELATION_IDS["city_in_country"] == pool.RELATION_IDS["city_country"] == "P17"


def test_coverage_reports_every_request_with_its_reason(tiny):
    facts = [Fact(s, "P17", "Japan", "{} is a city in") for s in ("Osaka", "Kyoto", "Nara")]
    reqs = [EditRequest(prompt="{} is a city in", subject="Paris", target_new="Japan",
                        case_id=1),
            EditRequest(prompt="{} is a city in", subject="Lima", target_new="Mars", case_id=2)]
    rep = pool.coverage(tiny, reqs, facts)  # a random tiny model recalls nothing
    assert rep["requests"] == 2 and rep["anchored"] == 0 and len(rep["rows"]) == 2
    by = {r["case_id"]: r["reason"] for r in rep["rows"]}
    assert by[1] == "0 of 3 candidate facts recalled (need 3)"
    assert by[2] == "no candidate facts for 'Mars'"


@pytest.mark.model
def test_coverage_of_the_default_edit_set_with_the_project_facts(lm):
    from steamviz.datasets import load_edits

    reqs = load_edits(limit=20)
    rep = pool.coverage(lm, reqs, pool.load_pool(sources=("project",)))
    assert rep["share"] >= 0.8, rep


def test_the_published_parquet_and_the_mirror_conversion_give_the_same_facts():
    from conftest import data_missing

    from steamviz import fetch

    why = data_missing("polyglot")
    if why:
        pytest.skip(why)
    root = "polyglot_fact_completion_en/en-fact-completion-3-21-23"
    a = pool.load_polyglot(fetch.path("polyglot", root + ".parquet"))
    b = pool.load_polyglot(fetch.path("polyglot", root + ".jsonl"))
    assert a == b and len(a) > 20_000
