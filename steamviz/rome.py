"""ROME: rank-one model editing (Meng et al., 2022), fast on a CPU.

The contract of the ROME repo, kept: a request in, the edited model plus what undoes it out.

>>> from steamviz import rome
>>> edit = rome.apply(lm, request)            # doctest: +SKIP
>>> edit.info["efficacy_after_opt"]            # doctest: +SKIP
>>> edit.restore()                # bitwise the original weights again  # doctest: +SKIP

How it works (``layer`` = the edited block, its MLP output projection ``W``):

1. key ``k*``: input of ``W`` at the subject's last token, averaged over model-written
   context prefixes (:mod:`steamviz.context`); ``k`` also on the bare prompt.
2. value ``v*``: a delta added to ``W``'s output at the subject's last token, optimised
   with Adam for the target's NLL over the context prompts + ``kl_factor`` x
   KL(P_edited || P_init) on "{subject} is a" (ROME's order) + weight decay, norm-clamped,
   early-stopped.
   Speed: the blocks below ``layer`` run once (their stream does not depend on the delta),
   the tokens before the subject's last one come from a key/value cache, block ``layer``'s
   output is computed once, and each step runs the remaining tokens through blocks
   ``layer+1..`` only -- via :mod:`steamviz.lean` on Llama-family models --; logits are
   computed only where a loss reads them. STEAM adds its alignment term through
   ``compute_v(..., align=...)``.
3. rank-one update ``W += (v* - W k) u^T / (u . k)`` with ``u = C^-1 k*`` (``C`` the
   keys' second moment, identity by default as EasyEdit's shipped ROME configs).

SmolLM2's tokenizer adds no BOS: steamviz puts the model's start token before every prompt
(:mod:`steamviz.tokens`), so the bare rewrite prompt sees the same start as the contexts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from .memo import memo
from .arch import as_out_in, cache_kwargs, get_module, lm_head_logits, mlp_out_module
from .hooks import Tap, hooks, read, stream
from .context import context_templates
from .edits import WeightEdit, active_edits
from .forward import layers_from, space
from .hparams import Hparams
from .lean import LeanStack
from .lean import unsupported as lean_unsupported
from .requests import EditRequest
from .tokens import fill, pad, subject_last, token_ids


@dataclass
class ROMEHparams(Hparams):
    """ROME hyperparameters (names follow the ROME/EasyEdit YAML files)."""

    layer: int = 5
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    context_template_length_params: tuple = ((5, 10), (10, 10))
    kl_prompts: tuple = ("{} is a",)
    # where the KL ("essence") distribution is read in the KL prompts: "subject_last" (ROME's
    # and EasyEdit's choice: the subject's last token) or "last" (the prompt's last token)
    kl_position: str = "subject_last"
    mom2_adjustment: bool = False  # False: C = I (EasyEdit's shipped configs)
    mom2_corpus: str | None = None  # folder of .txt files, or "model"
    mom2_n_tokens: int = 100_000
    mom2_ridge: float = 0.0
    seed: int = 0
    # dtype of the matrix products above the edited layer during the v* optimisation
    # (None: the model's). "bfloat16" is faster on CPUs with AMX-BF16, at a small cost in
    # precision (measured: docs/results.md#rome).
    v_matmul_dtype: str | None = None

    def __post_init__(self) -> None:
        self.context_template_length_params = tuple(
            tuple(int(v) for v in x) for x in self.context_template_length_params)
        self.kl_prompts = tuple(self.kl_prompts)
        if self.v_num_grad_steps < 1 or self.v_lr <= 0:
            raise ValueError("v_num_grad_steps must be >= 1 and v_lr > 0")
        if self.kl_position not in ("subject_last", "last"):
            raise ValueError(f"kl_position must be 'subject_last' (ROME) or 'last', got "
                             f"{self.kl_position!r}")
        if self.v_matmul_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"v_matmul_dtype must be null, 'float32', 'bfloat16' or 'float16', "
                             f"got {self.v_matmul_dtype!r}")

    @classmethod
    def for_model(cls, lm_or_name: Any) -> "ROMEHparams":
        """Per-model defaults (edited layer by depth, EasyEdit's LLaMA settings otherwise)."""
        name = cls.model_name(lm_or_name)
        n = getattr(lm_or_name, "n_layers", None)
        if name in MODEL_DEFAULTS:
            return cls(**MODEL_DEFAULTS[name])
        hp = cls()
        if n is not None:
            hp.layer = max(1, round(n * 0.17))  # early-middle MLP, as ROME's causal traces
        return hp

    @classmethod
    def from_dict(cls, d: dict, source: str = "hparams") -> "ROMEHparams":
        """From an EasyEdit / ROME hparams mapping (``layers: [5]``, ``v_lr``...; read
        from a YAML file by ``from_yaml``).

        Module-name templates (``rewrite_module_tmp``...) are ignored: steamviz finds
        modules through its architecture adapters. Unknown keys are an error.
        """
        def layers(v):
            if not isinstance(v, list) or len(v) != 1:
                raise ValueError(f"{source}: ROME edits one layer; 'layers' must be [L], got {v!r}")
            return {"layer": int(v[0])}

        return cls(**easyedit_kwargs(cls, d, source, "ROME", {"layers": layers}))


#: EasyEdit / ROME YAML keys that steamviz does not need (modules are found by adapters)
EASYEDIT_IGNORED = {
    "alg_name", "model_name", "stats_dir", "device", "rewrite_module_tmp", "layer_module_tmp",
    "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "model_parallel",
    "fp16", "mom2_dtype", "fact_token", "v_loss_layer", "mom2_dataset", "max_length",
    "batch_size", "layer_selection",
}


def easyedit_kwargs(cls, d: dict, source: str, alg: str, special: dict | None = None) -> dict:
    """Dataclass keyword arguments from an EasyEdit / ROME hparams mapping.

    Numbers are coerced to the field's type (PyYAML reads ``5e-1`` as a string), lists of
    pairs become tuples, ``mom2_n_samples`` is ``mom2_n_tokens``; keys in ``special`` map
    through their function. Unknown keys are an error naming the key.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{source}: hparams must be a mapping, got {type(d).__name__}")
    if d.get("fact_token", "subject_last") != "subject_last":
        raise ValueError(f"{source}: only fact_token 'subject_last' is supported")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw: dict = {}
    for k, v in d.items():
        if special and k in special:
            kw.update(special[k](v))
            continue
        if k == "mom2_n_samples":
            k = "mom2_n_tokens"
        if k in fields:
            default = fields[k].default
            try:
                if isinstance(default, bool):
                    v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
                elif isinstance(default, int) and not isinstance(v, bool):
                    v = int(float(v))
                elif isinstance(default, float) or (default is None and isinstance(v, str)
                                                    and _is_number(v)):
                    v = float(v)
                elif isinstance(v, list):
                    v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: {alg} hyperparameter {k!r} must be a number, "
                                 f"got {v!r}") from None
            kw[k] = v
        elif k not in EASYEDIT_IGNORED:
            raise ValueError(f"{source}: unknown {alg} hyperparameter {k!r}; known: "
                             f"{sorted(set(fields) | set(special or {}))}")
    return kw


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


MODEL_DEFAULTS: dict[str, dict] = {
    "smollm2-135m": dict(layer=5),
    "gpt2-xl": dict(layer=17, v_num_grad_steps=20, v_weight_decay=0.5, mom2_adjustment=True),
    "EleutherAI/gpt-j-6B": dict(layer=5, v_weight_decay=0.5, mom2_adjustment=True),
}


class Align(Protocol):
    """An extra loss on residual streams (STEAM's L_LA): see :mod:`steamviz.steam`."""

    lam: float
    layers: Sequence[int]  # residual-stream layers (output of block l - 1)

    def loss(self, streams: dict[int, torch.Tensor]) -> torch.Tensor: ...


@dataclass
class Prepared:
    """Everything ROME computes before optimising v*; reusable across grid points.

    Rows are the rewrite prompts (one per context, + target tokens but the last), then the
    KL prompts. Only tokens from the subject's last token on depend on the delta: the rest
    (the *prefix*) is kept as a key/value cache of every block at and above ``layer``, and
    each optimisation step runs only the *suffix* tokens through blocks ``layer..``.
    """

    request: EditRequest
    hp: ROMEHparams
    contexts: list[str]
    k_star: torch.Tensor  # [d_in] mean key over contexts
    k_bare: torch.Tensor  # [d_in] key on the bare prompt
    v_init: torch.Tensor  # [d_out] W's output at the subject's last token, bare prompt
    u: torch.Tensor  # [d_in] unit left vector (C^-1 k*)
    n_rewrite: int
    # full rows (for the reference implementation and captures)
    ids: list[list[int]]
    subj_pos: list[int]
    # suffix view: tokens from the subject's last token on, right-padded
    h_suffix: torch.Tensor  # [rows, S, d] stream entering block `layer`
    pos_suffix: torch.Tensor  # [rows, S] absolute positions
    mask4d: torch.Tensor  # [rows, 1, S, P + S] additive attention mask
    prefix_kv: list  # per block: (keys, values) [rows, heads, P, hd] (None below `layer`)
    tgt_rows: torch.Tensor  # [n_target_tokens]
    tgt_pos: torch.Tensor  # position in the suffix that predicts the token
    tgt_ids: torch.Tensor
    tgt_weight: torch.Tensor  # 1 / n target tokens of the row, so prompts weigh equally
    pred_pos: torch.Tensor  # [n_rewrite] suffix position predicting the first target token
    kl_pos: torch.Tensor  # [n_kl] suffix position of the KL prompts' last token
    kl_logp_init: torch.Tensor  # [n_kl, vocab]
    seconds: float = 0.0


@dataclass
class VResult:
    delta: torch.Tensor
    target: torch.Tensor
    losses: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def keys_and_outputs(lm, layer: int, prompts: list[str], subjects: list[str], starts=None):
    """Input and output of the edited projection at each prompt's subject-last token
    (``starts``: the subjects' character offsets, :func:`steamviz.tokens.fill`)."""
    mod = mlp_out_module(lm.model, layer)
    ids = [list(lm.prefix_ids) + token_ids(lm, p) for p in prompts]
    starts = starts or [None] * len(prompts)
    pos = torch.tensor([subject_last(lm, p, s, i) for p, s, i in zip(prompts, subjects, starts)])
    b = pad(ids, lm.tok.pad_token_id, lm.device)
    rows = torch.arange(len(ids), device=lm.device)
    at = pos.to(lm.device)
    got, _ = read(lm, b.input_ids, b.attention_mask,
                  {"kv": Tap(mod, "both", keep=lambda kv: (kv[0][rows, at], kv[1][rows, at]))})
    return got["kv"]


def _prefix_cache(lm, ids: list[list[int]], cut: list[int], layer: int):
    """Key/value cache of every block for the tokens before ``cut`` (left-padded to P)
    and the residual stream entering block ``layer`` for the tokens from ``cut`` on
    (right-padded to S). One forward pass of the unedited model, which also gives the
    edited projection's input and output at each row's cut and the final hidden states of
    the suffix tokens (second dict)."""
    dev = lm.device
    B = len(ids)
    P = max(cut)
    S = max(len(x) - c for x, c in zip(ids, cut))
    T = P + S
    # lay every row out as [pad.. prefix | suffix ..pad] so prefixes end at P
    inp = torch.full((B, T), int(lm.tok.pad_token_id), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    real = torch.zeros((B, T), dtype=torch.bool)
    for i, (x, c) in enumerate(zip(ids, cut)):
        inp[i, P - c : P - c + len(x)] = torch.tensor(x)
        pos[i, P - c : P - c + len(x)] = torch.arange(len(x))
        real[i, P - c : P - c + len(x)] = True
    # additive mask: causal by layout index, padded keys hidden, every query sees itself
    idx = torch.arange(T)
    allow = (idx[None, :] <= idx[:, None])[None] & real[:, None, :]
    allow |= torch.eye(T, dtype=torch.bool)[None]
    dtype = next(lm.model.parameters()).dtype
    neg = torch.finfo(dtype).min
    full_mask = torch.zeros((B, 1, T, T), dtype=dtype).masked_fill(~allow[:, None], neg)
    from transformers import DynamicCache

    base = get_module(lm.model, lm.adapter.base)
    cache = DynamicCache()
    taps = {"h": stream(lm, layer),  # entering block ``layer``
            "kv": Tap(mlp_out_module(lm.model, layer), "both",  # the projection at the cut
                      keep=lambda kv: (kv[0][:, P], kv[1][:, P]))}
    got, out = read(lm, inp.to(dev), full_mask.to(dev), taps, stop=False,
                    position_ids=pos.to(dev), use_cache=True, **cache_kwargs(base, cache))
    got["k"], got["v"] = got["kv"]
    kv = []
    for i, lay in enumerate(cache.layers):
        if i < layer:
            kv.append((None, None))
        else:
            kv.append((lay.keys[:, :, :P].detach(), lay.values[:, :, :P].detach()))
    return dict(
        h_suffix=got["h"][:, P:], pos_suffix=pos[:, P:].to(dev),
        mask4d=full_mask[:, :, P:, :].to(dev), prefix_kv=kv,
    ), dict(keys=got["k"], outs=got["v"], last=out.last_hidden_state[:, P:])


_PREP_CACHE: dict[tuple, Prepared] = memo("rome.prepared")
_V_CACHE: dict[tuple, "VResult"] = memo("rome.v")  # v* per (model, request, hparams, objective)


def _check_window(lm, rows: list[list[int]]) -> None:
    """The prefix-cache path uses one causal mask for every block; with sliding-window
    layers that is exact only while every row fits the window."""
    cfg = lm.model.config
    win = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    if win and "sliding_attention" in types and max(len(r) for r in rows) > win:
        raise NotImplementedError(
            f"rows of {max(len(r) for r in rows)} tokens exceed the sliding window ({win}); "
            "use shorter context_template_length_params"
        )


def _left_vector(lm, hp: ROMEHparams, k_star: torch.Tensor) -> torch.Tensor:
    if hp.mom2_adjustment:
        from .stats import inverse, second_moment

        key = ("cinv", lm.fingerprint, hp.layer, str(hp.mom2_corpus), hp.mom2_n_tokens, hp.mom2_ridge)
        if key not in _CINV:
            C = second_moment(lm, hp.layer, corpus=hp.mom2_corpus, n_tokens=hp.mom2_n_tokens,
                              seed=hp.seed)
            _CINV[key] = inverse(C, hp.mom2_ridge).float()
        u = _CINV[key].to(k_star.device) @ k_star
    else:
        u = k_star.clone()
    return u / u.norm()


_CINV: dict[tuple, torch.Tensor] = memo("rome.cinv")


def prepare(lm, request: EditRequest, hp: ROMEHparams | None = None, use_cache: bool = True
            ) -> Prepared:
    """Keys, C^-1 direction, prefix caches and the KL reference for ``request``."""
    hp = hp or ROMEHparams.for_model(lm)
    if not 0 <= hp.layer < lm.n_layers:
        raise ValueError(f"layer {hp.layer} out of range: this model has blocks 0..{lm.n_layers - 1}")
    fields = ("layer", "context_template_length_params", "kl_prompts", "kl_position",
              "mom2_adjustment",
              "mom2_corpus", "mom2_n_tokens", "mom2_ridge", "seed")
    key = (lm.fingerprint, id(lm.model), repr(request.to_rome()),
           tuple(getattr(hp, f) for f in fields))
    clean = not active_edits(lm.model)
    if use_cache and clean and key in _PREP_CACHE:
        return _PREP_CACHE[key]
    t0 = time.perf_counter()
    contexts = context_templates(lm, hp.context_template_length_params, seed=hp.seed)
    subj = request.subject
    # keys over contexts (the subject's last token only sees the text up to the subject)
    # (the subject is located from the templates' slots, not by searching its text: a
    # context prefix may contain the subject too)
    inner, at = fill(request.prompt, subj)
    key_prompts = [(text, j + at) for text, j in (fill(c, inner) for c in contexts)]
    target = token_ids(lm, space(request.target_new))
    rows_ids, subj_pos, tgt_rows, tgt_pos, tgt_ids, tgt_w, pred_pos, kl_pos = ([] for _ in range(8))
    for r, (text, start) in enumerate(key_prompts):
        ids = list(lm.prefix_ids) + token_ids(lm, text)
        sp = subject_last(lm, text, subj, start)
        subj_pos.append(sp)
        pred_pos.append(len(ids) - 1 - sp)
        for j, t in enumerate(target):
            tgt_rows.append(r)
            tgt_pos.append(len(ids) - 1 + j - sp)
            tgt_ids.append(t)
            tgt_w.append(1.0 / len(target))
        rows_ids.append(ids + target[:-1])
    for kp in hp.kl_prompts:
        text, start = fill(kp, subj)
        ids = list(lm.prefix_ids) + token_ids(lm, text)
        sp = subject_last(lm, text, subj, start)
        subj_pos.append(sp)
        kl_pos.append(0 if hp.kl_position == "subject_last" else len(ids) - 1 - sp)
        rows_ids.append(ids)
    dev = lm.device
    _check_window(lm, rows_ids)
    pc, seen = _prefix_cache(lm, rows_ids, subj_pos, hp.layer)
    # keys: the subject's last token only sees the text up to the subject, so the rewrite
    # rows (context + prompt + target) give the same keys as the bare key prompts
    keys, outs = seen["keys"][: len(contexts)], seen["outs"][: len(contexts)]
    k_star = keys.mean(0)
    k_bare, v_init = keys[0], outs[0]  # contexts[0] == "{}": the bare prompt
    u = _left_vector(lm, hp, k_star)
    t = lambda x: torch.tensor(x, device=dev)  # noqa: E731
    prep = Prepared(
        request=request, hp=hp, contexts=contexts, k_star=k_star, k_bare=k_bare, v_init=v_init,
        u=u, n_rewrite=len(contexts), ids=rows_ids, subj_pos=subj_pos, **pc,
        tgt_rows=t(tgt_rows), tgt_pos=t(tgt_pos), tgt_ids=t(tgt_ids), tgt_weight=t(tgt_w),
        pred_pos=t(pred_pos), kl_pos=t(kl_pos), kl_logp_init=torch.empty(0),
    )
    with torch.no_grad():
        kl_rows = torch.arange(prep.n_rewrite, len(rows_ids), device=dev)
        h = seen["last"][kl_rows, prep.kl_pos]
        prep.kl_logp_init = lm_head_logits(lm.model, h).float().log_softmax(-1)
    prep.seconds = time.perf_counter() - t0
    if use_cache and clean:
        _PREP_CACHE[key] = prep
        while len(_PREP_CACHE) > 64:
            _PREP_CACHE.pop(next(iter(_PREP_CACHE)))
    return prep


def _run_suffix(lm, prep: Prepared) -> torch.Tensor:
    """Blocks ``layer..`` on the suffix tokens, with the prefix from the cache."""
    from transformers import DynamicCache

    from .arch import block_input_to_embeds

    base = get_module(lm.model, lm.adapter.base)
    cache = DynamicCache(ddp_cache_data=prep.prefix_kv)
    emb = block_input_to_embeds(lm.model, prep.h_suffix, prep.pos_suffix)
    with layers_from(lm.model, prep.hp.layer):
        out = base(inputs_embeds=emb, attention_mask=prep.mask4d, position_ids=prep.pos_suffix,
                   use_cache=True, **cache_kwargs(base, cache))
    return out.last_hidden_state




def compute_v(lm, prep: Prepared, hp: ROMEHparams | None = None, align: Align | None = None,
              early_stop_on: str = "rome", lean: bool | None = None,
              norm_ref: torch.Tensor | None = None) -> VResult:
    """Optimise the delta at the edited projection's output (v* = v_init + delta).

    ``align``: an extra loss on residual streams at the predicting position of the rewrite
    prompts (STEAM), weighted by ``align.lam``. ``early_stop_on``: ``"rome"`` (default) stops
    when NLL + KL + decay fall below ``hp.early_stop_loss``, so an alignment term does not
    change when the optimisation stops; ``"total"`` includes it. ``hp.early_stop_loss = 0``
    runs exactly ``hp.v_num_grad_steps`` steps (the matched budget sweeps use).

    Each step runs only the suffix tokens through the blocks above the edited one: block
    ``layer`` does not depend on the delta (it is added to its MLP output), so its output is
    computed once. ``lean``: run those blocks through :class:`steamviz.lean.LeanStack`
    (Llama-family models without hooks on the blocks; the same arithmetic with less
    overhead) -- ``None`` uses it where it applies, ``False`` always uses the model's
    modules, ``True`` raises where it does not apply.

    ``norm_ref``: the vector whose norm the clamp (``clamp_norm_factor * |norm_ref|``) and
    the weight decay (``v_weight_decay * |delta| / |norm_ref|^2``) are relative to.
    ``None`` (ROME): ``prep.v_init``, the edited projection's output. MEMIT passes the
    residual stream leaving block ``layer`` at the subject's last token of the bare prompt
    (its ``target_init``); the delta itself is added at the same place either way (adding
    it to block ``layer``'s MLP output or to the block's output is the same for every
    later block).

    Several objectives of one request at once (a lambda sweep, anchor seeds, ROME beside
    STEAM): :func:`compute_vs`.
    """
    return compute_vs(lm, prep, hp, [align], early_stop_on, lean, norm_ref)[0]


def _tile(x, g: int):
    """``x`` repeated ``g`` times along its first dimension (tuples and None kept)."""
    if g == 1 or x is None:
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_tile(t, g) for t in x)
    return x.repeat(g, *([1] * (x.dim() - 1)))


def compute_vs(lm, prep: Prepared, hp: ROMEHparams | None = None, aligns=(None,),
               early_stop_on: str = "rome", lean: bool | None = None,
               norm_ref: torch.Tensor | None = None) -> list[VResult]:
    """:func:`compute_v` for several objectives of one request in one optimisation: one
    delta per entry of ``aligns`` (``None``: plain ROME), each on its own copy of the rows,
    in shared forward and backward passes. The groups do not interact: each has its own
    loss, early stop, norm clamp and Adam state (Adam is elementwise), so each result
    equals :func:`compute_v` with that ``align`` up to float rounding (larger matrix
    products sum in another order). A group that stops early keeps its delta while the
    others go on. ``seconds`` of each result is the shared time divided by the groups.
    """
    hp = hp or prep.hp
    if early_stop_on not in ("total", "rome"):
        raise ValueError(f"early_stop_on must be 'total' or 'rome', got {early_stop_on!r}")
    aligns = list(aligns)
    if not aligns:
        raise ValueError("compute_vs needs at least one objective (None: plain ROME)")
    t0 = time.perf_counter()
    model = lm.model
    dev = lm.device
    L = prep.hp.layer
    G = len(aligns)
    blocks = get_module(model, lm.adapter.layers)
    mod = mlp_out_module(model, L)
    delta = torch.zeros((G, *prep.v_init.shape), dtype=prep.v_init.dtype, device=dev,
                        requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    n_rw = prep.n_rewrite
    R = prep.h_suffix.shape[0]  # rows of one group
    n_kl = R - n_rw
    onehot = torch.zeros((G * R, prep.h_suffix.shape[1]), device=dev)
    onehot[:, 0] = 1.0  # the suffix starts at the subject's last token
    onehot = onehot[..., None]
    if norm_ref is None:
        target_norm = prep.v_init.norm()
    else:
        if tuple(norm_ref.shape) != tuple(prep.v_init.shape):
            raise ValueError(f"norm_ref has shape {tuple(norm_ref.shape)}; the delta has "
                             f"{tuple(prep.v_init.shape)}")
        target_norm = norm_ref.detach().to(prep.v_init.device, prep.v_init.dtype).norm()
    max_norm = hp.clamp_norm_factor * target_norm
    # lam = 0 records L_LA without changing the optimisation
    align_layers = sorted({x for a in aligns if a is not None for x in a.layers})
    bad = [x for x in align_layers if not L + 1 <= x <= lm.n_layers]
    if bad:
        raise ValueError(
            f"alignment layers {bad} are not above the edited block {L}: the delta cannot "
            f"move them; use layers {L + 1}..{lm.n_layers}"
        )
    streams: dict[int, torch.Tensor] = {}
    offs = torch.arange(G, device=dev) * R  # first row of each group
    rw_rows = (offs[:, None] + torch.arange(n_rw, device=dev)).reshape(-1)
    pred_pos = prep.pred_pos.repeat(G)
    kl_rows = (offs[:, None] + torch.arange(n_rw, R, device=dev)).reshape(-1)
    kl_pos = prep.kl_pos.repeat(G)
    tgt_rows = (offs[:, None] + prep.tgt_rows[None]).reshape(-1)
    tgt_pos, tgt_ids = prep.tgt_pos.repeat(G), prep.tgt_ids.repeat(G)
    n_tgt = prep.tgt_rows.shape[0]
    mask4d = _tile(prep.mask4d, G)
    prefix_kv = [_tile(kv, G) for kv in prep.prefix_kv]

    def row_delta():
        return (onehot * delta.repeat_interleave(R, dim=0)[:, None, :])

    why = lean_unsupported(model, L) if lean is not False else "turned off"
    if lean and why:
        raise ValueError(f"lean=True but the lean forward does not apply: {why}")
    if hp.v_matmul_dtype and why:
        raise ValueError(f"v_matmul_dtype={hp.v_matmul_dtype!r} needs the lean forward, which does "
                         f"not apply here ({why}); set v_matmul_dtype to null")
    handles = []
    if why is None:
        md = getattr(torch, hp.v_matmul_dtype) if hp.v_matmul_dtype else None
        stack = LeanStack(model, L, matmul_dtype=md)
        cos, sin = stack.rope(prep.h_suffix, prep.pos_suffix)
        with torch.no_grad():  # block L's output does not depend on the delta
            h_after = stack.block(0, prep.h_suffix, cos, sin, prep.prefix_kv[L], prep.mask4d)
        h_after, cos, sin = _tile(h_after, G), _tile(cos, G), _tile(sin, G)
        wanted = set(align_layers)

        def tap(layer, h):
            if layer in wanted:
                streams[layer] = h[rw_rows, pred_pos]

        def forward():
            h = h_after + row_delta().to(h_after.dtype)
            tap(L + 1, h)
            return stack.run(h, cos, sin, prefix_kv, mask4d, first=1, tap=tap)
    else:
        tiled = dataclasses.replace(prep, h_suffix=_tile(prep.h_suffix, G),
                                    pos_suffix=_tile(prep.pos_suffix, G), mask4d=mask4d,
                                    prefix_kv=prefix_kv)

        def add_delta(m, args, out):
            return out + row_delta().to(out.dtype)

        handles.append(mod.register_forward_hook(add_delta))
        for layer in align_layers:
            handles.append(
                blocks[layer - 1].register_forward_hook(
                    lambda m, a, o, layer=layer: streams.__setitem__(
                        layer, (o[0] if isinstance(o, tuple) else o)[rw_rows, pred_pos]
                    )
                )
            )

        def forward():
            return _run_suffix(lm, tiled)
    losses: list[list[dict]] = [[] for _ in range(G)]
    steps = [0] * G
    active = list(range(G))
    frozen = torch.zeros(G, dtype=torch.bool, device=dev)
    kept = torch.zeros_like(delta)  # the final delta of each stopped group
    with hooks(handles):
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            h = forward()
            logits = lm_head_logits(model, h[tgt_rows, tgt_pos]).float()
            lp = logits.log_softmax(-1).gather(1, tgt_ids[:, None])[:, 0].view(G, n_tgt)
            nll = -(lp * prep.tgt_weight).sum(1) / n_rw  # [G]
            kl_logits = lm_head_logits(model, h[kl_rows, kl_pos]).float()
            # ROME's essence term, argument order as ROME/EasyEdit: KL(P_edited || P_init)
            kl = hp.kl_factor * torch.nn.functional.kl_div(
                _tile(prep.kl_logp_init, G), kl_logits.log_softmax(-1), log_target=True,
                reduction="none",
            ).view(G, n_kl, -1).sum((1, 2)) / n_kl  # [G] ("batchmean" per group)
            wd = hp.v_weight_decay * (delta.norm(dim=-1) / target_norm**2)  # [G]
            loss = nll + kl + wd
            total_all = []
            go = []
            for g in active:
                a = aligns[g]
                rec = dict(step=it, nll=nll[g].item(), kl=kl[g].item(), decay=wd[g].item())
                total = loss[g]
                if a is not None:
                    la = a.loss({x: streams[x][g * n_rw:(g + 1) * n_rw] for x in a.layers})
                    rec["align"] = la.item()
                    if a.lam != 0:
                        total = total + a.lam * la
                rec["loss"] = total.item()
                rec["p_target"] = float(torch.exp(-nll[g].detach()))
                losses[g].append(rec)
                stop_val = total if early_stop_on == "total" else loss[g]
                if stop_val.item() < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                    with torch.no_grad():
                        kept[g] = delta[g]
                    frozen[g] = True
                else:
                    go.append(g)
                    total_all.append(total)
            active = go
            if not active:
                break
            torch.stack(total_all).sum().backward()
            opt.step()
            with torch.no_grad():
                for g in active:
                    steps[g] += 1
                    n = delta[g].norm()
                    if n > max_norm:
                        delta[g].mul_(max_norm / n)
                delta[frozen] = kept[frozen]  # Adam's momentum must not move a stopped group
    delta = delta.detach()
    secs = (time.perf_counter() - t0) / G
    return [VResult(delta=delta[g].clone(), target=prep.v_init + delta[g], losses=losses[g],
                    steps=steps[g], seconds=secs) for g in range(G)]


def _reference_positions(lm, prep: Prepared, hp: ROMEHparams):
    """The oracle's own token positions, found as ROME's ``find_fact_lookup_idx`` does (the
    length of the tokenized text up to the end of the subject), independently of
    :func:`prepare`: the subject's last token per row, each target token's predicting
    position, and where the KL prompts' distribution is read."""
    req, dev, n0 = prep.request, lm.device, len(lm.prefix_ids)
    target = token_ids(lm, space(req.target_new))
    templates = [c.replace("{}", req.prompt) for c in prep.contexts] + list(hp.kl_prompts)
    sp, ends = [], []
    for t in templates:
        head = t[: t.index("{}")] + req.subject
        sp.append(n0 + len(token_ids(lm, head)) - 1)
        ends.append(n0 + len(token_ids(lm, t.replace("{}", req.subject))) - 1)
    n_rw = prep.n_rewrite
    abs_tgt = [ends[r] + j for r in range(n_rw) for j in range(len(target))]
    abs_kl = sp[n_rw:] if hp.kl_position == "subject_last" else ends[n_rw:]
    t = lambda x: torch.tensor(x, device=dev)  # noqa: E731
    return t(sp), t(abs_tgt), t(abs_kl)


def compute_v_reference(lm, prep: Prepared, hp: ROMEHparams | None = None) -> VResult:
    """The plain implementation (as the ROME / EasyEdit code does it): every step runs the
    whole model on the full rows and computes logits at every position. Used as the
    benchmark baseline and as a test oracle for :func:`compute_v`."""
    hp = hp or prep.hp
    t0 = time.perf_counter()
    model, dev = lm.model, lm.device
    mod = mlp_out_module(model, prep.hp.layer)
    batch = pad(prep.ids, lm.tok.pad_token_id, dev)
    n_rw = prep.n_rewrite
    sp = torch.tensor(prep.subj_pos, device=dev)
    rows = torch.arange(len(prep.ids), device=dev)
    delta = torch.zeros_like(prep.v_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    target_norm = prep.v_init.norm()
    max_norm = hp.clamp_norm_factor * target_norm

    def add_delta(m, args, out):
        out = out.clone()
        out[rows, sp] += delta
        return out

    sp, abs_tgt, abs_kl = _reference_positions(lm, prep, prep.hp)
    losses, steps = [], 0
    with hooks([mod.register_forward_hook(add_delta)]):
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           use_cache=False).logits.float()
            lp = logits.log_softmax(-1)[prep.tgt_rows, abs_tgt].gather(1, prep.tgt_ids[:, None])
            nll = -(lp[:, 0] * prep.tgt_weight).sum() / n_rw
            kl_lp = logits[rows[n_rw:], abs_kl].log_softmax(-1)
            kl = hp.kl_factor * torch.nn.functional.kl_div(  # KL(P_edited || P_init)
                prep.kl_logp_init, kl_lp, log_target=True, reduction="batchmean")
            wd = hp.v_weight_decay * (delta.norm() / target_norm**2)
            loss = nll + kl + wd
            losses.append(dict(step=it, nll=nll.item(), kl=kl.item(), loss=loss.item()))
            if loss.item() < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            steps += 1
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    delta = delta.detach()
    return VResult(delta=delta, target=prep.v_init + delta, losses=losses, steps=steps,
                   seconds=time.perf_counter() - t0)


def update_matrix(prep: Prepared, v: VResult) -> torch.Tensor:
    """``[d_out, d_in]`` rank-one update so that ``W' k_bare = v*`` (ROME's closed form)."""
    right = (v.target - prep.v_init) / torch.dot(prep.k_bare, prep.u)
    return torch.outer(right, prep.u)


def _v_key(lm, prep: Prepared, hp: ROMEHparams, align, early_stop_on: str):
    """The cache key of a target vector (None: not cacheable -- an objective without a
    ``key()``). v* depends only on the unedited model, the request, ``hp`` and the
    objective."""
    akey = None
    if align is not None:
        k = getattr(align, "key", None)
        if k is None:
            return None
        akey = k()
    return (lm.fingerprint, id(lm.model), repr(prep.request.to_rome()), repr(hp), early_stop_on,
            akey)


class Collected(Exception):
    """Raised by :func:`target_vector` inside :func:`collect`: the objective was recorded,
    nothing was computed or written."""


_COLLECT: list | None = None


@contextlib.contextmanager
def collect():
    """Record the target vectors that edits *would* optimise, without computing them, to
    optimise them together with :func:`compute_collected`. Inside the block, every ROME and
    STEAM-ROME edit stops with :class:`Collected` before it writes anything::

        with rome.collect() as wanted:
            for lam in (5.0, 20.0, 50.0):
                try:
                    steam.apply(lm, req, lam=lam, anchor=a)
                except rome.Collected:
                    pass
        rome.compute_collected(wanted)     # one optimisation; later edits reuse the results
    """
    global _COLLECT
    prev, _COLLECT = _COLLECT, []
    try:
        yield _COLLECT
    finally:
        _COLLECT = prev


def compute_collected(wanted: list) -> int:
    """Optimise the recorded target vectors, one :func:`compute_vs` per request and
    hyperparameters, into the cache that ROME and STEAM-ROME edits read. Returns how many
    were computed."""
    groups: dict = {}
    for lm, prep, hp, align, early, key in wanted:
        if key in _V_CACHE:
            continue
        g = groups.setdefault((id(prep), repr(hp), early), (lm, prep, hp, early, {}))
        g[4].setdefault(key, align)
    n = 0
    for lm, prep, hp, early, objs in groups.values():
        for key, v in zip(objs, compute_vs(lm, prep, hp, list(objs.values()), early)):
            _V_CACHE[key] = v
            n += 1
    while len(_V_CACHE) > _V_CACHE_MAX:
        _V_CACHE.pop(next(iter(_V_CACHE)))
    return n


_V_CACHE_MAX = 4096


def target_vector(lm, prep: Prepared, hp: ROMEHparams, align=None, early_stop_on: str = "rome"
                  ) -> tuple[VResult, bool]:
    """v* for ``prep`` under ``hp`` and the objective ``align``, and whether it came from the
    cache. On the unedited model results are kept (by request, hparams and objective), so a
    sweep that measures one edit against several anchor seeds, or computed its objectives
    together (:func:`collect`), optimises each once."""
    clean = not active_edits(lm.model)
    key = _v_key(lm, prep, hp, align, early_stop_on) if clean else None
    if _COLLECT is not None:
        if key is not None:
            _COLLECT.append((lm, prep, hp, align, early_stop_on, key))
        raise Collected()
    v = _V_CACHE.get(key) if key is not None else None
    if v is not None:
        return v, True
    v = compute_v(lm, prep, hp, align=align, early_stop_on=early_stop_on)
    if key is not None:
        _V_CACHE[key] = v
        while len(_V_CACHE) > _V_CACHE_MAX:
            _V_CACHE.pop(next(iter(_V_CACHE)))
    return v, False


def apply(
    lm,
    request: EditRequest | dict,
    hparams: ROMEHparams | None = None,
    align: Align | None = None,
    method: str = "ROME",
    early_stop_on: str = "rome",
) -> WeightEdit:
    """Edit ``lm`` in place; returns a :class:`~steamviz.edits.WeightEdit` handle.

    If anything fails before the update is written, the model is untouched; the update
    itself is applied through the handle, which restores bit for bit.
    """
    if isinstance(request, dict):
        request = EditRequest.from_dict(request)
    hp = hparams or ROMEHparams.for_model(lm)
    prep = prepare(lm, request, hp)
    v, reused = target_vector(lm, prep, hp, align, early_stop_on)
    return write_update(lm, prep, v, method=method,
                        extra={"align": _align_info(align), "v_reused": reused})


def _align_info(align) -> dict | None:
    if align is None:
        return None
    return {"lam": align.lam, "layers": list(align.layers)}


def write_update(lm, prep: Prepared, v: VResult, method: str = "ROME", extra=None) -> WeightEdit:
    upd = update_matrix(prep, v)
    W = mlp_out_module(lm.model, prep.hp.layer).weight
    name = lm.adapter.mlp_out.format(prep.hp.layer) + ".weight"
    delta = upd.T if lm.adapter.conv1d else upd
    info = dict(
        request=prep.request.to_dict(), hparams=prep.hp.to_dict(), layer=prep.hp.layer,
        steps=v.steps, losses=v.losses, seconds_prepare=prep.seconds, seconds_opt=v.seconds,
        **(extra or {}),
    )
    if as_out_in(W, lm.adapter).shape != upd.shape:
        raise ValueError(f"update shape {tuple(upd.shape)} does not fit {name} {tuple(W.shape)}")
    edit = WeightEdit(lm.model, method, info)
    with edit.undo_on_error():
        edit.add_delta(name, delta.to(W.dtype))
    return edit
