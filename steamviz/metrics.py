"""The standard knowledge-editing metrics, as tidy records.

Each ``*_records`` function returns a list of dicts (one per prompt); :func:`evaluate` runs
them all for one request and returns one flat summary row (what a sweep stores).

- **efficacy**: on the rewrite prompt, ``P(target_new) > P(target_true)`` (whole-answer
  probabilities, teacher-forced), plus the margin ``P(new) - P(true)``.
- **paraphrase**: the same on the paraphrase prompts.
- **neighborhood**: on prompts about other subjects, the true answer keeps beating the new
  target (``P(answer) > P(target_new)``); also whether it is still the greedy answer.
- **portability**: probability and greedy accuracy of the answers that follow from the edit.
- **fluency**: ROME's weighted bi-/tri-gram entropy of greedy generations (higher = less
  repetitive). Generation length is a parameter (ROME used 100 sampled tokens).
- **consistency**: TF-IDF cosine between a generation about the subject and reference text
  about the new object (by default: the unedited model's own completions of reference
  facts whose object is the new object, see :func:`reference_text`).

>>> row = evaluate(lm, request)                     # doctest: +SKIP
>>> row["efficacy"], row["paraphrase"], row["neighborhood"]   # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

from .forward import greedy, target_logprobs
from .requests import EditRequest

_WORD = re.compile(r"\w+|[^\w\s]")


def _compare(lm, prompts: Sequence[str], good: Sequence[str], bad: Sequence[str | None]):
    pairs_p, pairs_t, idx = [], [], []
    for i, (p, g, b) in enumerate(zip(prompts, good, bad)):
        pairs_p.append(p), pairs_t.append(g), idx.append((i, "good"))
        if b is not None:
            pairs_p.append(p), pairs_t.append(b), idx.append((i, "bad"))
    res = target_logprobs(lm, pairs_p, pairs_t) if pairs_p else []
    out = [dict(prompt=p, good=g, bad=b) for p, g, b in zip(prompts, good, bad)]
    for (i, kind), r in zip(idx, res):
        out[i][f"p_{kind}"] = r["prob"]
        out[i][f"lp_{kind}"] = r["mean_logprob"]
        out[i][f"greedy_{kind}"] = r["greedy"]
    for o in out:
        o["success"] = (
            o["lp_good"] > o["lp_bad"] if o.get("lp_bad") is not None else o["greedy_good"]
        )
        o["margin"] = o["p_good"] - o.get("p_bad", 0.0)
    return out


def efficacy_records(lm, req: EditRequest) -> list[dict]:
    recs = _compare(lm, [req.rewrite_prompt], [req.target_new], [req.target_true])
    return [dict(metric="efficacy", **r) for r in recs]


def paraphrase_records(lm, req: EditRequest) -> list[dict]:
    n = len(req.paraphrase_prompts)
    recs = _compare(lm, req.paraphrase_prompts, [req.target_new] * n, [req.target_true] * n)
    return [dict(metric="paraphrase", **r) for r in recs]


def neighborhood_records(lm, req: EditRequest) -> list[dict]:
    n = len(req.neighborhood_prompts)
    recs = _compare(lm, req.neighborhood_prompts, req.neighborhood_answers,
                    [req.target_new] * n)
    return [dict(metric="neighborhood", **r) for r in recs]


def portability_records(lm, req: EditRequest) -> list[dict]:
    res = target_logprobs(lm, req.portability_prompts, req.portability_answers)
    return [
        dict(metric="portability", prompt=p, good=a, p_good=r["prob"], lp_good=r["mean_logprob"],
             success=r["greedy"], margin=r["prob"])
        for p, a, r in zip(req.portability_prompts, req.portability_answers, res)
    ]


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure of one text: weighted mean of n-gram entropies (bits)."""
    words = _WORD.findall(text.lower())
    ents = []
    for n in ns:
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        if total == 0:
            ents.append(0.0)
            continue
        f = np.array(list(grams.values()), dtype=float) / total
        ents.append(float(-(f * np.log2(f)).sum()))
    return float(np.mean(np.array(ents) * np.array(weights)))


def generation_prompts(req: EditRequest) -> list[str]:
    return [req.rewrite_prompt] + list(req.paraphrase_prompts)


def fluency_records(lm, req: EditRequest, max_new_tokens: int = 40, texts=None) -> list[dict]:
    prompts = generation_prompts(req)
    texts = texts if texts is not None else greedy(lm, prompts, max_new_tokens)
    return [dict(metric="fluency", prompt=p, text=t, value=ngram_entropy(p + t))
            for p, t in zip(prompts, texts)]


def tfidf_cosine(a: str, b: str) -> float:
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not a.strip() or not b.strip():
        return 0.0
    vec = TfidfVectorizer().fit([a, b])
    m = vec.transform([a, b])
    num = float(m[0].multiply(m[1]).sum())
    den = math.sqrt(float(m[0].multiply(m[0]).sum()) * float(m[1].multiply(m[1]).sum()))
    return num / den if den else 0.0


def reference_text(lm, obj: str, facts=None, relations=None, limit: int = 8,
                   max_new_tokens: int = 20) -> str:
    """Text about ``obj``: the (unedited) model's completions of reference facts whose
    object is ``obj``, each prompt followed by the object. Compute it before editing: raises
    :class:`~steamviz.edits.EditedModelError` while an edit is in place."""
    from .datasets import load_reference_facts
    from .edits import require_unedited

    require_unedited(lm.model, f"the reference text of {obj!r}")
    facts = facts if facts is not None else load_reference_facts()
    mine = [f for f in facts if f.object == obj][:limit]
    if not mine:
        return obj
    prompts = [f"{f.prompt} {obj}" for f in mine]
    gens = greedy(lm, prompts, max_new_tokens)
    return " ".join(p + g for p, g in zip(prompts, gens))


def consistency_records(lm, req: EditRequest, ref_text: str, texts=None,
                        max_new_tokens: int = 40) -> list[dict]:
    prompts = generation_prompts(req)
    texts = texts if texts is not None else greedy(lm, prompts, max_new_tokens)
    return [dict(metric="consistency", prompt=p, text=t, value=tfidf_cosine(p + t, ref_text))
            for p, t in zip(prompts, texts)]


def evaluate(
    lm,
    req: EditRequest,
    generation: bool = True,
    ref_text: str | None = None,
    max_new_tokens: int = 40,
    records: list | None = None,
) -> dict:
    """One summary row of every metric for ``req`` on the model as it is now.

    ``records``: pass a list to also collect the per-prompt records.
    """
    recs = efficacy_records(lm, req) + paraphrase_records(lm, req)
    recs += neighborhood_records(lm, req) + portability_records(lm, req)
    row: dict = {"case_id": req.case_id, "subject": req.subject, "target_new": req.target_new,
                 "target_true": req.target_true}
    for m in ("efficacy", "paraphrase", "neighborhood", "portability"):
        rs = [r for r in recs if r["metric"] == m]
        row[m] = float(np.mean([r["success"] for r in rs])) if rs else float("nan")
        row[f"{m}_margin"] = float(np.mean([r["margin"] for r in rs])) if rs else float("nan")
    eff = recs[0]
    row["p_new"], row["p_true"] = eff["p_good"], eff.get("p_bad", float("nan"))
    row["greedy_new"] = eff["greedy_good"]
    if generation:
        texts = greedy(lm, generation_prompts(req), max_new_tokens)
        fl = fluency_records(lm, req, texts=texts)
        recs += fl
        row["fluency"] = float(np.mean([r["value"] for r in fl]))
        row["generation"] = texts[0]
        if ref_text is not None:
            co = consistency_records(lm, req, ref_text, texts=texts)
            recs += co
            row["consistency"] = float(np.mean([r["value"] for r in co]))
    if records is not None:
        records.extend(dict(case_id=req.case_id, **r) for r in recs)
    return row
