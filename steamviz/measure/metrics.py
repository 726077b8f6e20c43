"""The standard knowledge-editing metrics, as tidy records.

Each ``*_records`` function returns a list of dicts (one per prompt); :func:`evaluate` runs
them all for one request and returns one flat summary row (what a sweep stores).

- **efficacy**: on the rewrite prompt, ``P(target_new) > P(target_true)`` (whole-answer
  probabilities, teacher-forced), plus the margin ``P(new) - P(true)``.
- **paraphrase**: the same on the paraphrase prompts.
- **neighborhood**: on prompts about other subjects, the true answer keeps beating the new
  target (``P(answer) > P(target_new)``); also whether it is still the greedy answer.
- **portability**: probability and greedy accuracy of the answers that follow from the edit.
- **fluency**: ROME's weighted bi-/tri-gram entropy of generations (higher = less
  repetitive). Default: greedy continuations (``max_new_tokens``, 40) of the rewrite and
  paraphrase prompts. ``mode="rome"``: as ROME's ``test_generation`` -- top-k (5) sampling,
  seeded, each text 100 tokens long counting its prompt's tokens, on the request's generation
  prompts (:func:`sample_top_k`).
- **consistency**: TF-IDF cosine between a generation about the subject and reference text
  about the new object (by default: the unedited model's own completions of reference
  facts whose object is the new object, see :func:`reference_text`). The IDF weights are
  fitted once on a corpus (WikiText, :func:`corpus_idf`), as ROME fits its on Wikipedia.

>>> row = evaluate(lm, request)                     # doctest: +SKIP
>>> row["efficacy"], row["paraphrase"], row["neighborhood"]   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..core.memo import memo
from ..core.arch import cache_kwargs, output_cache
from ..core.forward import greedy, left_pad, target_logprobs
from ..data.requests import EditRequest, generation_prompts
from ..core.tokens import token_ids

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


def rome_generation_prompts(req: EditRequest) -> tuple[list[str], str]:
    """``(prompts, where from)`` for ROME-style generation: the request's own
    ``generation_prompts`` (CounterFact's) when it has them, else the rewrite and paraphrase
    prompts (:func:`generation_prompts`; EditRequest has no such field today and the EasyEdit
    CounterFact files lack them)."""
    own = list(getattr(req, "generation_prompts", None) or [])
    if own:
        return own, "generation_prompts"
    return generation_prompts(req), "rewrite+paraphrase"


#: ROME's generation settings (``test_generation``: ``generate_fast(..., max_out_len=100)``,
#: whose default ``top_k`` is 5).
ROME_GENERATION = dict(max_out_len=100, top_k=5)


def _row_seed(seed: int, prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()[:8], "little")


@torch.no_grad()
def sample_top_k(lm, prompts: Sequence[str], max_out_len: int = 100, top_k: int = 5,
                 seed: int = 0, batch_size: int = 16) -> list[dict]:
    """ROME's ``generate_fast`` sampling: at each step keep the ``top_k`` most likely next
    tokens, renormalise their probabilities and draw one; no stop at end-of-text. Each text
    is ``max_out_len`` tokens long *counting the prompt's tokens* (ROME's ``max_out_len``
    bounds the whole sequence), so a prompt of n tokens gets ``max_out_len - n`` new ones.

    Reproducible: each prompt draws from its own generator seeded by ``(seed, prompt)``, so a
    prompt's text depends on the seed and the model only, not on the batch it is in.

    Returns per prompt ``dict(text, prompt_tokens, new_tokens)`` (``text``: the continuation).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    out: list[dict] = []
    dev = lm.device
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        body = [token_ids(lm, p) for p in chunk]
        budget = [max(0, max_out_len - len(b)) for b in body]
        inp, mask, pos = left_pad(lm, [list(lm.prefix_ids) + b for b in body])
        gens = [torch.Generator().manual_seed(_row_seed(seed, p)) for p in chunk]
        past, cur, new = None, inp, []
        for _ in range(max(budget)):
            o = lm.model(input_ids=cur, attention_mask=mask, position_ids=pos,
                         use_cache=True, **cache_kwargs(lm.model, past))
            past = output_cache(o)
            probs = o.logits[:, -1].float().softmax(-1)
            top = probs.topk(top_k, dim=-1)
            w = (top.values / top.values.sum(-1, keepdim=True)).cpu()
            pick = torch.stack([torch.multinomial(w[i], 1, generator=g)
                                for i, g in enumerate(gens)])
            nxt = top.indices.cpu().gather(1, pick)[:, 0]
            new.append(nxt)
            cur = nxt[:, None].to(dev)
            mask = torch.cat([mask, torch.ones_like(cur)], dim=1)
            pos = pos[:, -1:] + 1
        rows = torch.stack(new, 1).tolist() if new else [[] for _ in chunk]
        for b, n, row in zip(body, budget, rows):
            row = row[:n]
            out.append(dict(text=lm.tok.decode(row), prompt_tokens=len(b), new_tokens=len(row)))
    return out


def _rome_clean(lm, text: str) -> str:
    """ROME's clean-up of a generated text before scoring (NFKD, paragraph breaks to spaces,
    end-of-text markers removed)."""
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    eos = getattr(lm.tok, "eos_token", None)
    return text.replace(eos, "") if eos else text


def fluency_records(lm, req: EditRequest, max_new_tokens: int = 40, texts=None,
                    mode: str = "greedy", *, prompts: Sequence[str] | None = None,
                    max_out_len: int = 100, top_k: int = 5, seed: int = 0) -> list[dict]:
    """Fluency (:func:`ngram_entropy` of prompt + generation) per generation prompt.

    ``mode="greedy"`` (default): ``max_new_tokens`` greedy tokens of the rewrite and
    paraphrase prompts. ``mode="rome"``: as ROME measures it -- :func:`sample_top_k` texts
    (``top_k``, ``max_out_len`` tokens counting the prompt, ``seed``) of the request's
    generation prompts, or of the rewrite and paraphrase prompts when it has none (the record's
    ``prompts_from`` says which), cleaned as ROME does. ``prompts`` overrides the prompts (e.g.
    CounterFact's ``generation_prompts``); ``texts`` gives the generations instead.
    """
    if mode not in ("greedy", "rome"):
        raise ValueError(f"unknown fluency mode {mode!r}; expected 'greedy' or 'rome'")
    src = "given"
    if prompts is None:
        prompts, src = (rome_generation_prompts(req) if mode == "rome"
                        else (generation_prompts(req), "rewrite+paraphrase"))
    prompts = list(prompts)
    extra: list[dict] = [{} for _ in prompts]
    if texts is None:
        if mode == "rome":
            gen = sample_top_k(lm, prompts, max_out_len=max_out_len, top_k=top_k, seed=seed)
            texts = [g["text"] for g in gen]
            extra = [dict(prompt_tokens=g["prompt_tokens"], new_tokens=g["new_tokens"],
                          top_k=top_k, seed=seed) for g in gen]
        else:
            texts = greedy(lm, prompts, max_new_tokens)
    full = [(_rome_clean(lm, p + t) if mode == "rome" else p + t) for p, t in zip(prompts, texts)]
    return [dict(metric="fluency", mode=mode, prompts_from=src, prompt=p, text=t,
                 value=ngram_entropy(f), **x)
            for p, t, f, x in zip(prompts, texts, full, extra)]


# --------------------------------------------------------------------------------------------
# consistency: TF-IDF with IDF weights fitted once on a corpus (ROME: Wikipedia)
# --------------------------------------------------------------------------------------------
#: The corpus the IDF is fitted on: WikiText-103's validation and test splits (WikiText-2's
#: test split is WikiText-103's test articles; its raw form is used). WikiText-103's train
#: split is not in the data mirror. Every paragraph (a non-empty line that is not a
#: ``= heading =``) is one document, as ROME's Wikipedia snippets are; ``<unk>`` is dropped.
IDF_CORPUS = ("text_corpus/wikitext-103-tokens/wiki.valid.tokens",
              "text_corpus/wikitext-2-raw/wiki.test.raw")
#: sklearn ``TfidfVectorizer`` settings: its defaults, which ROME uses.
TFIDF_SETTINGS = dict(lowercase=True, token_pattern=r"(?u)\b\w\w+\b", smooth_idf=True,
                      norm="l2", sublinear_tf=False)
_IDF_FORMAT = 1
_IDF_MEMO: dict[str, "Idf"] = memo("metrics.idf")
_REFTEXT: dict[str, str] = memo("metrics.reftext")  # reference_text's continuations


@dataclass
class Idf:
    """A TF-IDF weighting fitted on a corpus: ``terms[i]`` has weight ``idf[i]``."""

    terms: list
    idf: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.index = {t: i for i, t in enumerate(self.terms)}
        kw = {k: v for k, v in TFIDF_SETTINGS.items() if k in ("lowercase", "token_pattern")}
        self._analyze = TfidfVectorizer(**kw).build_analyzer()  # sklearn's own tokenisation

    def weight(self, term: str) -> float:
        i = self.index.get(term)
        return float(self.idf[i]) if i is not None else float("nan")

    def vector(self, text: str) -> dict:
        """``{term index: tf * idf}`` (raw counts, as sklearn; terms outside the corpus
        vocabulary are ignored, as in ROME's vectoriser)."""
        counts = Counter(self.index[w] for w in self._analyze(text) if w in self.index)
        return {i: c * float(self.idf[i]) for i, c in counts.items()}

    def cosine(self, a: str, b: str) -> float:
        va, vb = self.vector(a), self.vector(b)
        num = sum(v * vb.get(i, 0.0) for i, v in va.items())
        den = math.sqrt(sum(v * v for v in va.values()) * sum(v * v for v in vb.values()))
        return num / den if den else 0.0


def _corpus_key() -> tuple[str, dict]:
    from ..data import fetch

    files = {f.path: f.sha256 for f in fetch.sources()["wikitext"]["files"]}
    spec = dict(format=_IDF_FORMAT, data_set="wikitext",
                files=[[p, files[p]] for p in IDF_CORPUS], documents="paragraph", unk="dropped",
                settings=TFIDF_SETTINGS)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16], spec


def idf_cache_path():
    from ..core.paths import cache_dir

    return cache_dir() / "tfidf" / f"wikitext-idf-{_corpus_key()[0]}.json"


def wikitext_documents() -> list[str]:
    """The IDF corpus (:data:`IDF_CORPUS`) as documents, one per paragraph, in file order.
    Raises :class:`steamviz.data.fetch.DataError` naming ``steamviz data get wikitext`` and
    ``$STEAMVIZ_DATA_MIRROR`` when WikiText is not here."""
    from ..data import fetch
    from ..data.corpus import read_text

    docs = []
    for rel in IDF_CORPUS:
        try:
            path = fetch.path("wikitext", rel)
        except fetch.DataError as e:
            raise fetch.DataError(
                "consistency's TF-IDF weights are fitted on WikiText (ROME fits them on "
                "Wikipedia), which is not here: run `steamviz data get wikitext`, or set "
                f"{fetch.MIRROR_ENV} to the data mirror folder. ({e})") from None
        for line in read_text(path).split("\n"):
            line = line.replace("<unk>", " ").strip()
            if line and not (line.startswith("=") and line.endswith("=")):
                docs.append(line)
    return docs


def _fit_idf(docs: list[str]) -> tuple[list, np.ndarray]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(**TFIDF_SETTINGS).fit(docs)
    terms = [None] * len(vec.vocabulary_)
    for t, i in vec.vocabulary_.items():
        terms[i] = t
    return terms, np.asarray(vec.idf_, dtype=np.float64)


def _load_idf(path, key: str) -> Idf | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        ok = (d.get("kind") == "tfidf-idf" and d.get("key") == key
              and len(d["terms"]) == len(d["idf"]) > 0)
        if not ok:
            raise ValueError("not the IDF this key names")
        return Idf(list(d["terms"]), np.asarray(d["idf"], dtype=np.float64), d.get("meta", {}))
    except (ValueError, KeyError, TypeError) as e:
        warnings.warn(f"bad IDF cache file {path} ({e}); fitting again", stacklevel=3)
        return None


def corpus_idf() -> Idf:
    """The IDF weights consistency uses: fitted once on WikiText (:data:`IDF_CORPUS`,
    :data:`TFIDF_SETTINGS`), cached as JSON under ``$STEAMVIZ_CACHE/tfidf/`` keyed by the
    corpus files' sha256 and the settings, and memoised in the process."""
    key, spec = _corpus_key()
    if key in _IDF_MEMO:
        return _IDF_MEMO[key]
    path = idf_cache_path()
    idf = _load_idf(path, key)
    if idf is None:
        docs = wikitext_documents()
        import sklearn.feature_extraction.text  # noqa: F401  (not timed)

        t = time.perf_counter()
        terms, w = _fit_idf(docs)
        meta = dict(spec, n_documents=len(docs), n_terms=len(terms),
                    fit_seconds=round(time.perf_counter() - t, 3))
        from ..core.io import write_json

        write_json(path, dict(kind="tfidf-idf", key=key, meta=meta, terms=terms,
                              idf=[float(x) for x in w]), indent=None)
        idf = Idf(terms, w, meta)
    _IDF_MEMO[key] = idf
    return idf




def tfidf_cosine(a: str, b: str, idf: Idf | None = None) -> float:
    """Cosine of the TF-IDF vectors of ``a`` and ``b`` (ROME's ``tfidf_similarity``), with
    IDF weights fitted on a corpus (default :func:`corpus_idf`), not on ``a`` and ``b``."""
    if not a.strip() or not b.strip():
        return 0.0
    return (idf or corpus_idf()).cosine(a, b)


def reference_text(lm, obj: str, facts=None, relations=None, limit: int = 8,
                   max_new_tokens: int = 20) -> str:
    """Text about ``obj``: the (unedited) model's completions of reference facts whose
    object is ``obj``, each prompt followed by the object. Compute it before editing: raises
    :class:`~steamviz.core.guard.EditedModelError` while an edit is in place."""
    from ..data.datasets import load_reference_facts
    from ..core.guard import require_unedited

    require_unedited(lm.model, f"the reference text of {obj!r}")
    facts = facts if facts is not None else load_reference_facts()
    mine = [f for f in facts if f.object == obj][:limit]
    if not mine:
        return obj
    prompts = [f"{f.prompt} {obj}" for f in mine]
    # greedy continuations of the unedited model: cached (memory, then disk) by the model,
    # its device type, the prompts and the length
    key = json.dumps([lm.fingerprint, lm.device.type, prompts, max_new_tokens])
    if key in _REFTEXT:
        return _REFTEXT[key]
    from ..core.io import write_json
    from ..core.paths import cache_dir

    path = cache_dir() / "reftext" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("key") == key and isinstance(stored.get("text"), str):
            _REFTEXT[key] = stored["text"]
            return stored["text"]
    except (OSError, ValueError, AttributeError):
        pass  # not cached yet, or unreadable: made again and rewritten
    gens = greedy(lm, prompts, max_new_tokens)
    text = " ".join(p + g for p, g in zip(prompts, gens))
    _REFTEXT[key] = text
    write_json(path, dict(key=key, text=text))
    return text


def consistency_records(lm, req: EditRequest, ref_text: str, texts=None,
                        max_new_tokens: int = 40, prompts: Sequence[str] | None = None
                        ) -> list[dict]:
    """TF-IDF cosine (corpus IDF, :func:`tfidf_cosine`) of each prompt + generation with
    ``ref_text``, which must come from the unedited model (:func:`reference_text`, built
    before any edit, e.g. by :func:`steamviz.measure.references.build_references`)."""
    prompts = list(prompts) if prompts is not None else generation_prompts(req)
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
    fluency: str = "greedy",
    seed: int = 0,
) -> dict:
    """One summary row of every metric for ``req`` on the model as it is now.

    ``records``: pass a list to also collect the per-prompt records. ``fluency``:
    ``"greedy"`` (default: ``max_new_tokens`` greedy tokens of the rewrite and paraphrase
    prompts) or ``"rome"`` (ROME's sampled generations, see :func:`fluency_records`; seeded
    by ``seed``); fluency and consistency are both measured on these generations, as in ROME.
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
        if fluency == "rome":
            fl = fluency_records(lm, req, mode="rome", seed=seed)
            prompts, texts = [r["prompt"] for r in fl], [r["text"] for r in fl]
            row["fluency_mode"] = "rome"
        elif fluency == "greedy":
            prompts = generation_prompts(req)
            texts = greedy(lm, prompts, max_new_tokens)
            fl = fluency_records(lm, req, texts=texts)
        else:
            raise ValueError(f"unknown fluency mode {fluency!r}; expected 'greedy' or 'rome'")
        recs += fl
        row["fluency"] = float(np.mean([r["value"] for r in fl]))
        row["generation"] = texts[0]
        if ref_text is not None:
            co = consistency_records(lm, req, ref_text, texts=texts, prompts=prompts)
            recs += co
            row["consistency"] = float(np.mean([r["value"] for r in co]))
    if records is not None:
        records.extend(dict(case_id=req.case_id, **r) for r in recs)
    return row
