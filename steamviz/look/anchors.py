"""Semantic anchors (STEAM's latent positioning): where the model keeps an object.

For a new object o*: take the reference facts whose object is o*, keep those the unedited
model recalls (by default greedy: every answer token is the argmax; see
:func:`recall_rule_ok` for the looser ``topK`` rules), sample them
stratified by relation (``n_per_relation``, seeded), read the residual stream at the token
that predicts o* (each prompt's last token) at every layer, and average per layer: phi^l.

>>> a = build_anchor(lm, "Japan")              # doctest: +SKIP
>>> a.phi.shape                                 # [layer, hidden]    # doctest: +SKIP
torch.Size([31, 576])
>>> a.report                                    # found / recalled / used per relation  # doctest: +SKIP

Anchors are cached per (model fingerprint, object, sampling settings, facts) in memory and
in the cache dir. :func:`reference_bank` captures many reference facts once, for centring
(``bank.mean``) and nearest-neighbour integration scores.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass, field

import torch

from ..core.memo import memo
from .capture import capture
from ..data.datasets import Fact
from ..core.guard import require_unedited
from ..core.forward import target_logprobs
from ..core.io import load_tensors, save_tensors
from ..core.paths import cache_dir


class AnchorError(ValueError):
    """Too few recalled reference facts to build an anchor."""


@dataclass
class Anchor:
    object: str
    phi: torch.Tensor  # [layer, hidden], layers 0..n_blocks
    facts: list  # the Facts averaged
    report: list[dict]  # per relation: found, recalled, used
    settings: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.facts)

    def __repr__(self) -> str:
        return f"Anchor({self.object!r}, facts={self.n}, layers={self.phi.shape[0]})"


#: per model fingerprint: (prompt, object) -> (greedy, rank of the answer's first token)
_RECALL: dict[str, dict[tuple[str, str], tuple[bool, int]]] = memo("anchors.recall")
_ANCHORS: dict[tuple, Anchor] = memo("anchors.anchors")

#: recall rules (see :func:`recall_rule_ok`)
RECALL_RULES = ("greedy", "top3", "top5", "top10")


def recall_rule_ok(rule: str) -> str | None:
    """Why ``rule`` is not a recall rule, or None. ``"greedy"``: every answer token is the
    model's argmax (it would generate the object). ``"topK"``: the answer's first token is
    among the model's K most likely next tokens (a looser reading of "knows", for small
    models whose first choice is often an article)."""
    if rule == "greedy" or (isinstance(rule, str) and rule.startswith("top")
                            and rule[3:].isdigit() and int(rule[3:]) >= 1):
        return None
    return f"recall rule {rule!r}: use 'greedy' or 'topK' (e.g. 'top3')"


def _recall_file(lm):
    return cache_dir() / "recall" / f"{lm.fingerprint}.jsonl"


def _known(lm) -> dict[tuple[str, str], tuple[bool, int]]:
    """This model's recall results, read from the disk cache once per process (an append-only
    JSON-lines file; a torn last line from a killed process is skipped)."""
    import json

    if lm.fingerprint in _RECALL:
        return _RECALL[lm.fingerprint]
    known: dict[tuple[str, str], tuple[bool, int]] = {}
    try:
        lines = _recall_file(lm).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            prompt, obj, greedy, rank = json.loads(line)
            known[(str(prompt), str(obj))] = (bool(greedy), int(rank))
        except (ValueError, TypeError):
            continue
    _RECALL[lm.fingerprint] = known
    return known


def recalled(lm, facts, batch_size: int = 64, rule: str = "greedy") -> list[bool]:
    """Whether the unedited model recalls each fact's object after its prompt, under
    ``rule`` (:func:`recall_rule_ok`; default ``"greedy"``). One teacher-forced pass per new
    fact; results are kept per model fingerprint, in memory and in the cache dir.
    Raises :class:`~steamviz.core.guard.EditedModelError` while an edit is in place."""
    why = recall_rule_ok(rule)
    if why:
        raise ValueError(why)
    require_unedited(lm.model, "a recall check")
    known = _known(lm)
    todo = list({(f.prompt, f.object): f for f in facts
                 if (f.prompt, f.object) not in known}.values())
    if todo:
        import json
        import os

        res = target_logprobs(lm, [f.prompt for f in todo], [f.object for f in todo], batch_size)
        lines = []
        for f, r in zip(todo, res):
            known[(f.prompt, f.object)] = (bool(r["greedy"]), int(r["first_rank"]))
            lines.append(json.dumps([f.prompt, f.object, bool(r["greedy"]),
                                     int(r["first_rank"])]) + "\n")
        path = _recall_file(lm)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:  # whole lines, one write
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
    k = None if rule == "greedy" else int(rule[3:])
    return [known[(f.prompt, f.object)][0] if k is None else known[(f.prompt, f.object)][1] < k
            for f in facts]


def _facts_key(facts) -> str:
    h = hashlib.sha256()
    for f in facts:
        h.update(f"{f.subject}\t{f.relation}\t{f.object}\t{f.template}\n".encode())
    return h.hexdigest()[:12]


def build_anchor(
    lm,
    obj: str,
    facts=None,
    n_per_relation: int = 8,
    seed: int = 0,
    require_recall: bool = True,
    recall_rule: str = "greedy",
    min_facts: int = 3,
    warn_below: int = 6,
    exclude_subjects: tuple = (),
    use_cache: bool = True,
) -> Anchor:
    """The anchor phi of ``obj`` (see module docstring).

    ``exclude_subjects``: leave these subjects out (e.g. the edited subject itself).
    Raises :class:`AnchorError` with fewer than ``min_facts`` usable facts; warns below
    ``warn_below``. Raises :class:`~steamviz.core.guard.EditedModelError` while an edit is in
    place (also for a cached anchor: build references before the first edit).
    """
    from ..data.datasets import load_reference_facts

    facts = load_reference_facts() if facts is None else facts
    mine = [f for f in facts if f.object == obj and f.subject not in exclude_subjects]
    settings = dict(n_per_relation=n_per_relation, seed=seed, require_recall=require_recall,
                    exclude=sorted(exclude_subjects))
    if recall_rule != "greedy":  # (the default keeps the keys of anchors cached before)
        settings["recall_rule"] = recall_rule
    key = (lm.fingerprint, obj, repr(sorted(settings.items())), _facts_key(mine))
    require_unedited(lm.model, f"the anchor of {obj!r}")
    if use_cache and key in _ANCHORS:
        return _ANCHORS[key]
    path = cache_dir() / "anchors" / (
        hashlib.sha256(repr(key).encode()).hexdigest()[:20] + ".safetensors")
    if use_cache and path.exists():
        a = _read_anchor(path, repr(key), lm)
        if a is not None:
            _ANCHORS[key] = a
            return a
    ok = recalled(lm, mine, rule=recall_rule) if require_recall else [True] * len(mine)
    by_rel: dict[str, list] = {}
    for f, r in zip(mine, ok):
        by_rel.setdefault(f.relation, []).append((f, r))
    rng = random.Random(seed)
    used, report = [], []
    for rel in sorted(by_rel):
        good = [f for f, r in by_rel[rel] if r]
        pick = good if len(good) <= n_per_relation else rng.sample(good, n_per_relation)
        used += pick
        report.append(dict(object=obj, relation=rel, found=len(by_rel[rel]),
                           recalled=len(good), used=len(pick)))
    if len(used) < min_facts:
        raise AnchorError(
            f"only {len(used)} usable reference facts for object {obj!r} "
            f"({len(mine)} found, {sum(ok)} recalled by the model); need >= {min_facts}. "
            "Add facts with this object to data/reference_facts.jsonl, pass facts=..., or "
            "lower min_facts / set require_recall=False."
        )
    if len(used) < warn_below:
        warnings.warn(f"anchor for {obj!r} averages only {len(used)} facts", stacklevel=2)
    cap = capture(lm, [f.prompt for f in used], positions=("last",))
    phi = cap.get("last").mean(0)  # [layer, hidden]
    a = Anchor(obj, phi, used, report, settings)
    if use_cache:
        _ANCHORS[key] = a
        save_tensors(path, {"phi": phi}, dict(
            kind="anchor", key=repr(key), object=obj, settings=settings, report=report,
            facts=[[f.subject, f.relation, f.object, f.template] for f in used]))
    return a


def _read_anchor(path, key: str, lm) -> Anchor | None:
    """The cached anchor at ``path`` if it is one, for this key and model shape; else None
    (the file is removed and the anchor rebuilt)."""
    try:
        t, meta = load_tensors(path, expect={"phi": (lm.n_blocks + 1, lm.d_model)})
        if meta.get("kind") != "anchor" or meta.get("key") != key:
            raise ValueError(f"{path}: written for another anchor")
        facts = [Fact(*f) for f in meta["facts"]]
        return Anchor(meta["object"], t["phi"], facts, list(meta["report"]),
                      dict(meta["settings"]))
    except (ValueError, KeyError, TypeError) as e:
        warnings.warn(f"ignoring a bad anchor cache file, rebuilding: {e}", stacklevel=3)
        path.unlink(missing_ok=True)
        return None


@dataclass
class Bank:
    """Residual streams of many reference facts (unedited model, last position)."""

    facts: list
    tensor: torch.Tensor  # [fact, layer, hidden]

    @property
    def mean(self) -> torch.Tensor:
        """``[layer, hidden]``: the common component removed before centred cosines."""
        return self.tensor.mean(0)

    @property
    def objects(self) -> list[str]:
        return [f.object for f in self.facts]


_BANKS: dict[tuple, Bank] = memo("anchors.banks")


def reference_bank(lm, facts=None, limit: int | None = None, seed: int = 0,
                   use_cache: bool = True) -> Bank:
    """Capture the last-position residual stream of reference facts at every layer."""
    from ..data.datasets import load_reference_facts

    facts = load_reference_facts() if facts is None else list(facts)
    if limit is not None and len(facts) > limit:
        facts = random.Random(seed).sample(facts, limit)
    key = (lm.fingerprint, _facts_key(facts))
    require_unedited(lm.model, "the reference bank")
    if use_cache and key in _BANKS:
        return _BANKS[key]
    path = cache_dir() / "banks" / f"{lm.fingerprint}-{key[1]}.safetensors"
    if use_cache and path.exists():
        try:
            t, meta = load_tensors(path, expect={
                "streams": (len(facts), lm.n_blocks + 1, lm.d_model)})
            if meta.get("kind") != "bank" or meta.get("key") != key[1]:
                raise ValueError(f"{path}: written for another bank")
            bank = Bank(facts, t["streams"])
            _BANKS[key] = bank
            return bank
        except ValueError as e:
            warnings.warn(f"ignoring a bad reference-bank cache file, rebuilding: {e}",
                          stacklevel=2)
            path.unlink(missing_ok=True)
    t = capture(lm, [f.prompt for f in facts], positions=("last",), batch_size=64).get("last")
    bank = Bank(facts, t)
    if use_cache:
        _BANKS[key] = bank
        save_tensors(path, {"streams": t}, dict(kind="bank", key=key[1], n_facts=len(facts)))
    return bank


