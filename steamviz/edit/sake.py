"""SAKE: Steering Activations for Knowledge Editing (Scialanga et al., ACL 2025).

No weight changes: the edit is an affine map ``h -> A h + b`` on the lm_head input (the
output of the final norm), applied by forward hooks only where an input is about the edited
fact, and removed by :meth:`~steamviz.edit.edits.Edit.restore`.

>>> from steamviz import sake
>>> edit = sake.apply(lm, request)                     # hooks in place   # doctest: +SKIP
>>> edit.info["fit"]["mapped_p_new"], edit.info["scope"]["query_threshold"]  # doctest: +SKIP
>>> edit.in_scope(["The city of Toronto is located in the country of",
...                "The city of Montreal is located in the country of"])   # doctest: +SKIP
[True, False]
>>> edit.restore()              # hooks removed: the model is exactly as before  # doctest: +SKIP
>>> editors.edit(lm, request, "sake", ridge=30.0)      # through the registry  # doctest: +SKIP

How it works:

0. **Held out** (:func:`fit_prompts`, the one place the fit's prompts come from; issue
   18.1): the fit never reads a prompt evaluation reads (:func:`evaluation_prompts`: the
   request's paraphrase, neighborhood, portability and generation prompts), neither the same
   text nor the same question behind another preamble (:class:`HeldOut`; normalised text).
   The rewrite prompt is the request and is used. So the paraphrase score is out-of-sample.
1. **The fact as a distribution** (:func:`fact_prompts`): the rewrite prompt and, when
   ``relation_id`` names a relation of the project's ``relations.json``, that relation's
   paraphrase templates filled with the subject (those that are not evaluation prompts: on
   the default edit set most paraphrase prompts *are* such templates, which are then left
   out; counts in ``docs/results.md#sake``), each bare and under context prefixes
   (model-written ones from :mod:`steamviz.core.context` plus a few fixed sentences), plus
   prompts that state the old object first (``"... Canada? No, that is outdated. ..."``):
   a few dozen prompts per request. The subject is located from the templates' ``{}``
   slots (in an old-object prompt, the question's), never by searching its text, so a
   context prefix that names the subject does not move the subject gate's reference; only
   the request's own paraphrases (no template; fitted on only with ``use_paraphrases``)
   are searched.
2. **Source activations** ``H_s [n, d]``: the final hidden state (lm_head input) at the
   last token of each fact prompt.
3. **Target activations** ``H_t [n, d]`` (:func:`target_states`): each source state steered
   to the new object, by exact line searches along the gradient of
   ``log P(first token of target_new)`` through the lm_head, from the source state, stopped
   where that probability reaches ``target_prob``. Only the lm_head is involved (cheap and
   exact), every target state predicts the new object, and the move is the shortest along
   the gradient, so what is not about the object is kept. Rejected alternative: states of
   the prompts with the new fact stated in context first (``"{prompt} Japan. {prompt}"``,
   also after "Imagine that"): on SmolLM2-135M those states mostly do not predict the new
   object (``docs/results.md#sake``).
4. **Map** (:func:`fit_transport`, :func:`ot_map`): Gaussians ``N(mu_s, S_s)``, ``N(mu_t, S_t)``
   fitted to ``H_s``, ``H_t`` and the closed-form optimal-transport (Monge) map between
   them, ``A = S_s^-1/2 (S_s^1/2 S_t S_s^1/2)^1/2 S_s^-1/2``, ``b = mu_t - A mu_s`` (matrix
   square roots by eigendecomposition, float64). With tens of prompts in d = 576 both
   covariances are rank-deficient: ``ridge * (tr S_s + tr S_t) / 2d`` is added to both
   diagonals (``ridge`` is relative to the mean variance per dimension). Large ``ridge``
   turns the map into the translation ``mu_t - mu_s`` (difference-of-means steering); small
   ``ridge`` follows the sample covariances and overfits them (held-out paraphrases lose
   the new object). The default, 10, does about as well on held-out paraphrases as a pure
   translation, with the eigenvalues of ``A`` kept moderate (the ridge sweep:
   ``docs/results.md#sake``).
5. **Scope** (:class:`Scope`), decided per token position; two gates must both pass:

   - *subject gate*: some position so far in the sequence has a hidden state at
     ``subject_layer`` (default ~15% of the depth) close to the subject's last token in
     the fact prompts (cosine after centring and scaling each dimension by the negatives'
     mean and standard deviation, max over those references);
   - *query gate*: the position's own hidden state at ``query_layer`` (default ~85% of the
     depth) is close to the fact prompts' last-token states (centred cosine, max over
     them): the position asks this question and the model is about to answer it.

   Why two gates: on SmolLM2, a last-token state alone does not tell "The city of
   Toronto is located in the country of" from the same question about Montreal (the two
   are as close as the fact's own prompts under different context prefixes are to each
   other), while the subject's identity is plain at its own tokens in an early layer
   (the cosines: ``docs/results.md#sake``). Late layers separate the question best from
   other questions about the subject ("... in the state of" is the closest).
   Thresholds are calibrated at edit time against negatives that never include the
   request's evaluation prompts (:func:`negative_prompts`): the fact prompts with other
   subjects (subject gate) and other relations' prompts about other subjects and about the
   subject (query gate), from the project's reference facts, leaving out every subject
   named in an evaluation prompt and every evaluation prompt (e.g. a portability prompt
   that is another relation's template filled with the subject). The subject cut lies
   halfway between the fact prompts (leave-one-out) and the negatives; the query cut just
   above the highest negative, since a few phrasings under context prefixes overrate how
   close a new phrasing gets (``info["scope"]`` has the scores). Both can be set by hand.
6. **Hooks** (:class:`SAKEEdit`): a pre-hook on the decoder stack resets per-forward state,
   hooks on the two blocks compute the gates, and a hook on the stack's output applies
   ``A h + b`` at the positions in scope (everything else is untouched, bit for bit).
   The stack's output is what :func:`~steamviz.core.forward.target_logprobs` gives the lm_head
   row by row and what the full model's forward (:func:`~steamviz.core.forward.greedy`,
   ``generate``) reads, so every path sees the edit. With a KV cache the subject gate carries
   over between calls (kept per cache object); a continuation of a cache this edit did not
   see starts with the subject unseen, and a pass that skips a gate's block (a truncated
   stack, see :func:`~steamviz.core.forward.blocks_from`) is left alone.

Only the position that asks for the object is mapped, so a multi-token target gets help on
its first token; later tokens come from the unedited model given that token (Toronto ->
"New Zealand": the first token becomes likely, the whole answer less so;
``docs/results.md#sake``). Portability prompts (facts implied by the edit) are out of scope
by design, as are other prompt formats than the fact's (``"Q: In which country is
Toronto? A:"``): SAKE would need their own target distributions (the paper writes them
with an LLM).

Scores on the default edit set (efficacy, held-out paraphrase, neighborhood, P(new) and
P(old)) and the commands that made them: ``docs/results.md#sake``. A paraphrase phrased
unlike every fit prompt can fall outside the query gate; prompts outside the scope, such as
the neighborhood prompts, are left bitwise unchanged. Before issue 18.1 the fit read the
evaluation paraphrases (the request's own and the relation templates that coincide with
them), so its paraphrase score was in-sample (``use_paraphrases=True`` reads the request's
paraphrases again).
"""

from __future__ import annotations

import time
import weakref
from typing import Sequence

import torch

from ..core.arch import cache_in_kwargs, get_module, output_cache
from ..core.hooks import first_tensor
from .edits import Edit
from ..core.forward import space
from ..data.requests import EditRequest
from ..core.tokens import encode, token_ids
from .sake_fit import (  # noqa: F401 (re-exported)
    head_parts,
    hidden_states,
    Scope,
    calibrate_scope,
    fit_transport,
    gaussian,
    ot_map,
    psd_sqrt,
    subject_positions,
    target_states,
)
from .sake_hparams import (  # noqa: F401 (re-exported)
    FALLBACK_PROMPTS,
    FALLBACK_SUBJECTS,
    OLD_OBJECT_TEMPLATES,
    PREFIXES,
    SAKEHparams,
)
from .sake_prompts import (  # noqa: F401 (re-exported)
    dedup,
    FitPrompt,
    FitPrompts,
    HeldOut,
    base_prompts,
    evaluation_prompts,
    fact_prompts,
    fit_prompts,
    negative_prompts,
    normalise,
)


# ------------------------------------------------------------------------------------------
# the edit: hooks
# ------------------------------------------------------------------------------------------
class SAKEEdit(Edit):
    """An edit made of forward hooks (no weight changes). ``restore()`` removes them.

    ``last_mask``: ``[batch, seq]`` positions mapped in the latest forward pass;
    ``n_mapped``: positions mapped since the edit was applied.
    """

    def __init__(self, lm, A: torch.Tensor, b: torch.Tensor, scope: Scope,
                 info: dict | None = None, method: str = "SAKE"):
        super().__init__(lm.model, method, info)
        self.lm = lm
        dev = lm.device
        self.A = A.float().to(dev)  # [d, d]
        self.b = b.float().to(dev)  # [d]
        self.scope = scope.to(dev)
        self.last_mask: torch.Tensor | None = None
        self.n_mapped = 0
        self._fwd: dict | None = None
        self._cache: tuple | None = None  # (weakref to a KV cache, subject seen [batch])
        self._handles: list = []
        self._install()

    # -- hooks --------------------------------------------------------------------------
    def _install(self) -> None:
        lm = self.lm
        base = get_module(lm.model, lm.adapter.base)
        blocks = get_module(lm.model, lm.adapter.blocks)
        self.on_restore(self._remove)
        with self.undo_on_error():  # a failed install leaves no hook and no active edit
            self._handles.append(base.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(blocks[self.scope.subject_layer - 1].register_forward_hook(
                self._subject_hook))
            self._handles.append(blocks[self.scope.query_layer - 1].register_forward_hook(
                self._query_hook))
            self._handles.append(base.register_forward_hook(self._post, with_kwargs=True))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._fwd, self._cache = None, None

    def _pre(self, module, args, kwargs) -> None:
        past = cache_in_kwargs(kwargs)
        n_past = 0
        if past is not None:
            try:
                n_past = int(past.get_seq_length())
            except Exception:  # legacy tuple caches
                n_past = int(past[0][0].shape[-2]) if len(past) else 0
        prior = None
        if n_past and self._cache is not None and self._cache[0]() is past:
            prior = self._cache[1]
        mask = kwargs.get("attention_mask")
        mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
        self._fwd = dict(prior=prior, mask=mask)

    @staticmethod
    def _valid(st: dict | None, h: torch.Tensor) -> torch.Tensor | None:
        """Real (not padding) positions of this pass ``[batch, seq]``, when known."""
        m = st.get("mask") if st else None
        if m is None or m.shape[0] != h.shape[0] or m.shape[1] < h.shape[1]:
            return None
        return m[:, -h.shape[1]:].bool()

    def _subject_hook(self, module, args, out) -> None:
        if self._fwd is None:
            return
        h = first_tensor(out)  # [batch, seq, d]
        match = self.scope.subject_sim(h) >= self.scope.subject_threshold
        valid = self._valid(self._fwd, h)
        if valid is not None:
            match &= valid
        seen = match.int().cummax(dim=1).values.bool()
        prior = self._fwd.get("prior")
        if prior is not None and prior.shape[0] == h.shape[0]:
            seen |= prior[:, None].to(seen.device)
        self._fwd["subject"] = seen

    def _query_hook(self, module, args, out) -> None:
        if self._fwd is None:
            return
        h = first_tensor(out)
        self._fwd["query"] = self.scope.query_sim(h) >= self.scope.query_threshold

    def _post(self, module, args, kwargs, out):
        st, self._fwd = self._fwd, None
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if st is None or "subject" not in st or "query" not in st \
                or st["subject"].shape != h.shape[:2] or st["query"].shape != h.shape[:2]:
            self._cache, self.last_mask = None, None  # this pass was not seen whole
            return None
        mask = st["subject"] & st["query"]
        valid = self._valid(st, h)
        if valid is not None:
            mask &= valid
        cache = output_cache(out)
        if cache is None and not hasattr(out, "last_hidden_state") and len(out) > 1:
            cache = out[1]
        self._cache = None
        if cache is not None:
            try:
                self._cache = (weakref.ref(cache), st["subject"][:, -1].clone())
            except TypeError:  # not weak-referenceable: no carry-over
                self._cache = None
        self.last_mask = mask
        if not bool(mask.any()):
            return None
        self.n_mapped += int(mask.sum())
        new = h.clone()
        rows = new[mask].float()
        new[mask] = (rows @ self.A.T + self.b).to(h.dtype)
        if hasattr(out, "last_hidden_state"):
            out.last_hidden_state = new
            return out
        return (new,) + tuple(out[1:])

    def replay(self) -> "SAKEEdit":
        """The same fitted edit installed again (e.g. after ``restore()``): a new
        :class:`SAKEEdit` with this one's map, scope and info; nothing is refitted."""
        return SAKEEdit(self.lm, self.A, self.b, self.scope, dict(self.info), self.method)

    # -- inspection -----------------------------------------------------------------------
    @torch.no_grad()
    def in_scope(self, prompts: Sequence[str]) -> list[bool]:
        """Whether the map applies at each prompt's last token (the one predicting the
        answer)."""
        if not self.active:
            return [False] * len(prompts)
        b = encode(self.lm, list(prompts))
        base = get_module(self.lm.model, self.lm.adapter.base)
        base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        m = self.last_mask
        if m is None:
            return [False] * len(prompts)
        return [bool(m[i, int(n) - 1]) for i, n in enumerate(b.lengths)]


# ------------------------------------------------------------------------------------------
# apply
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def apply(lm, request: EditRequest | dict, hparams: SAKEHparams | None = None,
          negatives: dict[str, list[str]] | None = None,
          exclude: Sequence[str] = ()) -> SAKEEdit:
    """Edit with SAKE; returns an undoable :class:`SAKEEdit` (hooks, no weight change).

    Every prompt the fit reads comes from :func:`fit_prompts`, which leaves out the prompts
    evaluation reads. ``negatives``: override :func:`negative_prompts`
    (``{"near": [...], "other": [...]}``; evaluation prompts among them are left out too).
    ``exclude``: more prompts the fit must not read (e.g. those of other requests evaluated
    with this edit in place). ``info["held_out"]``: how many evaluation prompts were held
    out, how many fit prompts were left out for them (``n_dropped``) and which evaluation
    prompts those would have read (``reads``).
    """
    if isinstance(request, dict):
        request = EditRequest.from_dict(request)
    hp = (hparams or SAKEHparams()).resolved(lm)
    t0 = time.perf_counter()
    fit = fit_prompts(lm, request, hp, negatives=negatives, exclude=exclude)
    prompts = fit.texts("fact")
    per, final = hidden_states(lm, prompts, [hp.subject_layer, hp.query_layer], hp.batch_size)
    Hs = torch.stack([f[-1] for f in final])  # [n, d] lm_head inputs at the last token
    tok = token_ids(lm, space(request.target_new))
    if not tok:
        raise ValueError(f"target_new {request.target_new!r} tokenizes to nothing")
    Ht = target_states(lm, Hs, tok[0], hp.target_prob, hp.target_iters)
    A, b, diag = fit_transport(Hs, Ht, hp.ridge)
    head, soft = head_parts(lm)

    def p_new(H):
        z = soft(head(H.to(head.weight.dtype)).float())
        return float(z.log_softmax(-1)[:, tok[0]].exp().mean())

    diag.update(source_p_new=p_new(Hs), target_p_new=p_new(Ht),
                mapped_p_new=p_new((Hs.double() @ A.T + b).float()))
    scope, calib = calibrate_scope(lm, request, fit, per, hp)
    info = dict(request=request.to_dict(), hparams=hp.to_dict(), n_prompts=len(prompts),
                fit=diag, scope=dict(scope.summary(), **calib), target_token=int(tok[0]),
                n_target_tokens=len(tok),
                held_out=dict(n_evaluation_prompts=len(fit.held_out.prompts),
                              n_dropped=len(fit.dropped),
                              reads=dedup(q for _, q in fit.dropped)))
    edit = SAKEEdit(lm, A, b, scope, info)
    edit.info["seconds"] = time.perf_counter() - t0
    return edit


def _register() -> None:
    from .editors import register

    @register("sake", params=SAKEHparams, extra=("negatives", "exclude"))
    def _sake(lm, request, hparams=None, **kw):
        if isinstance(hparams, dict):
            hparams = SAKEHparams(**hparams)
        elif not isinstance(hparams, SAKEHparams):  # e.g. a sweep's shared ROME settings
            seed = getattr(hparams, "seed", None)
            hparams = SAKEHparams() if seed is None else SAKEHparams(seed=seed)
        negatives = kw.pop("negatives", None)
        exclude = kw.pop("exclude", ())
        if kw:
            hparams = hparams.replace(**kw)
        return apply(lm, request, hparams, negatives=negatives, exclude=exclude)


_register()
