"""BaFT: basis-level representation fine-tuning as a knowledge editor (Liu et al., ICLR 2025).

>>> from steamviz import baft
>>> edit = baft.apply(lm, request)                     # doctest: +SKIP
>>> edit.info["losses"][-1]                             # doctest: +SKIP
{'step': 45, 'loss': 0.02, 'nll': 0.004, 'kl': 0.004, 'p_target': 0.996, ...}
>>> edit.restore()         # hooks removed: the original model   # doctest: +SKIP
>>> edit = editors.edit(lm, request, "baft", rank=8)    # doctest: +SKIP

No weight of the model changes. A small intervention is trained and installed with forward
hooks on the outputs of chosen decoder blocks (residual stream ``h``, ``[batch, seq, d]``):

    Phi(h) = h + R^T diag(w(h)) (W h + b - R h)

``R`` (``[r, d]``) has orthonormal rows (``torch.nn.utils.parametrizations.orthogonal``), so
``R^T R`` projects onto an r-dimensional subspace and the edit replaces each basis
coordinate ``R_i h`` by ``W_i h + b_i``; ``w(h) = sigmoid(U h / rms(h) + c)`` (``[r]``) weights
each basis vector per token. The weighting is what BaFT adds to LoReFT: the intervention
can switch itself off, basis by basis, for inputs unrelated to the edit. The gate reads the
RMS-normalised stream so that the huge attention-sink activations of some tokens
(position 0 of SmolLM2 has a norm orders of magnitude above the other positions';
``docs/results.md#baft``) do not saturate it.
``W = R`` and ``b = 0`` at the start, so the untrained intervention is exactly the identity.

Design choices (what the paper leaves open for single counterfactual edits):

- **Positions: every token.** The hook applies ``Phi`` at every position of every forward
  pass, so the edit acts during cached generation too (each new token is intervened on)
  and with padded batches; locality comes from the learned gate, not from a position rule.
- **Edit loss:** NLL of ``target_new`` (teacher-forced) after the rewrite prompt, bare and
  behind ROME's model-written context prefixes (:func:`steamviz.core.context.context_templates`).
  The request's paraphrase prompts are *not* trained on: paraphrase accuracy stays a
  held-out measure of generalisation.
- **Locality loss:** ``loc_factor`` x KL(unedited || edited) of the next-token distribution
  at the last token (``loc_positions="all"``: every token) of prompts the edit must not
  change: a fixed list of unrelated facts (:data:`LOC_PROMPTS`) and the rewrite template
  filled with ``n_distractors`` other subjects from a fixed pool (:data:`DISTRACTORS`);
  these in-relation negatives teach the gate to tell the edited subject from others in the
  same relation (KL at every token instead of the last was no better, and slower; see
  ``docs/results.md#baft``). The request's
  neighborhood prompts are never trained on (they are the evaluation set); a distractor
  whose prompt equals one of them or one of the paraphrases, or that names the subject or
  a target, is skipped. ROME's essence prompt ``"{subject} is a"`` is available through
  ``kl_prompts`` but off by default: as a negative it teaches the gate to switch off for the
  subject outside the rewrite template, and paraphrase accuracy fell
  (``docs/results.md#baft``).
- **Gate learning rate:** the gate (``U``, ``c``) learns ``gate_lr_scale`` times faster than
  ``W``, ``b``: with one rate the KL on the negatives fell slowly and some edits ended
  at the step budget still moving an in-relation negative (``docs/results.md#baft``).
- **Speed:** the stream leaving the first intervened block is computed once (it does not
  depend on the intervention) and each Adam step runs only the blocks above it
  (:func:`steamviz.core.forward.run_from_block`). Training stops early once
  ``nll + loc_factor * kl < early_stop_loss``.

Defaults for SmolLM2-135M (tuned on the first five requests of the default edit set, so
their scores there are in-sample): block 6's output, rank 4, Adam lr 4e-3 (gate 5x), at most
40 steps, 3 rewrite rows (bare + 2 context prefixes), 6 fixed + 8 distractor negatives with
``loc_factor`` 8. A later block (8 or 12) or fewer distractors leaked more to the neighbors;
block 4 was as good. The scores (:func:`steamviz.measure.metrics.evaluate`, unedited -> edited), the
time per edit and the commands: ``docs/results.md#baft``.

Locality is learned, so it holds only approximately: prompts far from the training
negatives can still move a little (checked in ``tests/test_baft.py``; ``docs/results.md#baft``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..core.arch import get_module, block_module, lm_head_logits
from ..core.hooks import first_tensor, hooks, read, stream
from ..core.context import context_templates
from .edits import Edit
from ..core.forward import run_from_block, space
from .hparams import Hparams
from ..data.requests import EditRequest
from ..core.tokens import pad, token_ids

# Unrelated facts whose next-token distributions the edit must keep (locality negatives).
LOC_PROMPTS = (
    "The Eiffel Tower is located in the city of",
    "The chemical symbol for gold is",
    "Albert Einstein was born in",
    "The largest ocean on Earth is the",
    "Water freezes at a temperature of",
    "The author of Romeo and Juliet is",
)

# Subjects put into the rewrite template as in-relation negatives (a mixed, fixed pool).
DISTRACTORS = (
    "London", "Tokyo", "Chicago", "Cairo", "Sydney", "Madrid", "Mumbai", "Berlin",
    "Barack Obama", "Microsoft", "the Nile", "Mozart",
)


@dataclass
class BaFTHparams(Hparams):
    """BaFT hyperparameters. ``blocks``: decoder blocks whose *output* is intervened on."""

    RENAMED = {"layers": "blocks"}

    blocks: tuple = (6,)
    rank: int = 4
    steps: int = 40
    lr: float = 4e-3
    weight_decay: float = 0.0
    gate_bias: float = 0.0  # initial c: w(h) = sigmoid(0 + c) for every basis at the start
    gate_lr_scale: float = 5.0  # learning rate of the gate (U, c) = lr * gate_lr_scale
    gate_l1: float = 0.0  # penalty on the mean basis weight over every training token
    loc_factor: float = 8.0
    n_distractors: int = 8
    loc_positions: str = "last"  # KL at the "last" token of each locality prompt, or "all"
    loc_prompts: tuple = LOC_PROMPTS
    kl_prompts: tuple = ()  # e.g. ("{} is a",): ROME's essence prompt; off, see above
    context_template_length_params: tuple = ((5, 1), (10, 1))
    early_stop_loss: float = 2e-2
    seed: int = 0

    def __post_init__(self) -> None:
        self.blocks = tuple(int(x) for x in self.blocks)
        self.context_template_length_params = tuple(
            tuple(int(v) for v in x) for x in self.context_template_length_params)
        self.loc_prompts = tuple(self.loc_prompts)
        self.kl_prompts = tuple(self.kl_prompts)
        if not self.blocks or list(self.blocks) != sorted(set(self.blocks)):
            raise ValueError(f"blocks must be increasing and distinct, got {self.blocks}")
        if self.loc_positions not in ("all", "last"):
            raise ValueError(f"loc_positions must be 'all' or 'last', got {self.loc_positions!r}")
        if self.rank < 1 or self.steps < 1 or self.lr <= 0:
            raise ValueError("rank and steps must be >= 1 and lr > 0")

    @classmethod
    def for_model(cls, lm_or_name) -> "BaFTHparams":
        """Per-model defaults; otherwise one block at ~20% of the depth."""
        name = cls.model_name(lm_or_name)
        if name in MODEL_DEFAULTS:
            return cls(**MODEL_DEFAULTS[name])
        n = getattr(lm_or_name, "n_blocks", None)
        if n is None:
            return cls()
        return cls(blocks=(min(n - 1, max(0, round(n * 0.2))),))


MODEL_DEFAULTS: dict[str, dict] = {
    "smollm2-135m": dict(blocks=(6,)),
}


class BasisIntervention(nn.Module):
    """``Phi(h) = h + R^T diag(w(h)) (W h + b - R h)``, ``w(h) = sigmoid(U h / rms(h) + c)``.

    ``h``: ``[..., d]``. ``R`` is ``[rank, d]`` with orthonormal rows (orthogonal
    parametrisation); ``W``: ``[rank, d]``, ``b``: ``[rank]``; gate ``U``: ``[rank, d]``,
    ``c``: ``[rank]``. Computes in float32 whatever the stream's dtype.
    """

    def __init__(self, d: int, rank: int, generator: torch.Generator, gate_bias: float = 0.0):
        super().__init__()
        if not 1 <= rank <= d:
            raise ValueError(f"rank must be in 1..{d}, got {rank}")
        # Linear's default init and the orthogonal parametrisation (it completes R to a
        # square base with torch.randn) draw from the global RNG: seed them from
        # ``generator`` inside a forked RNG, so training is reproducible and the caller's
        # RNG state is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            self.rotate = nn.Linear(d, rank, bias=False)
            self.learned = nn.Linear(d, rank)
            self.gate = nn.Linear(d, rank)
            with torch.no_grad():
                self.rotate.weight.copy_(torch.randn(rank, d, generator=generator))
            nn.utils.parametrizations.orthogonal(self.rotate)  # R's rows: QR of the draw
        with torch.no_grad():
            self.learned.weight.copy_(self.R)  # W = R, b = 0: Phi is the identity at first
            self.learned.bias.zero_()
            self.gate.weight.copy_(torch.randn(rank, d, generator=generator) / d**0.5)
            self.gate.bias.fill_(gate_bias)

    @property
    def R(self) -> torch.Tensor:
        """``[rank, d]``, orthonormal rows."""
        return self.rotate.weight

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """Per-basis weights ``w(h)``: ``[..., d] -> [..., rank]`` in (0, 1)."""
        h = h.float()
        hn = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return torch.sigmoid(self.gate(hn))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        R = self.R
        delta = self.learned(x) - x @ R.T  # [..., rank]
        return (x + (self.weights(x) * delta) @ R).to(h.dtype)


@dataclass
class Rows:
    """One right-padded batch and the stream leaving block ``blocks[0]`` for it."""

    input_ids: torch.Tensor  # [rows, T]
    attention_mask: torch.Tensor  # [rows, T]
    h0: torch.Tensor  # [rows, T, d] (unedited: it does not depend on the intervention)


@dataclass
class TrainingBatches:
    """Training batches (rewrite rows, locality rows) and what does not change."""

    request: EditRequest
    hp: BaFTHparams
    contexts: list[str]
    loc_prompts: list[str]  # every locality prompt actually used
    rw: Rows
    loc: Rows
    tgt_rows: torch.Tensor  # [n_target_tokens] row in ``rw``
    tgt_pos: torch.Tensor  # position that predicts each target token
    tgt_ids: torch.Tensor
    tgt_weight: torch.Tensor  # 1 / (n target tokens of its row * n rewrite rows)
    loc_rows: torch.Tensor  # [n_loc_tokens] every real token of the locality prompts
    loc_pos: torch.Tensor
    loc_weight: torch.Tensor  # 1 / (tokens of its prompt * n locality prompts)
    loc_logp: torch.Tensor  # [n_loc_tokens, vocab] unedited next-token log-probs
    seconds: float = 0.0

    @property
    def n_rewrite(self) -> int:
        return self.rw.input_ids.shape[0]


def _distractor_prompts(request: EditRequest, n: int, seed: int) -> list[str]:
    held_out = set(request.neighborhood_prompts) | set(request.paraphrase_prompts)
    taken = {request.subject.lower(), request.target_new.lower(),
             (request.target_true or "").lower()}
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in torch.randperm(len(DISTRACTORS), generator=g).tolist():
        s = DISTRACTORS[i]
        p = request.prompt.format(s)
        if len(out) >= n:
            break
        if s.lower() in taken or request.subject.lower() in s.lower() or p in held_out:
            continue
        out.append(p)
    return out


@torch.no_grad()
def _stream_after(lm, block: int, input_ids, attention_mask) -> torch.Tensor:
    """Residual stream leaving block ``block`` (``[rows, T, d]``); stops the pass there."""
    return read(lm, input_ids, attention_mask, {"h": stream(lm, block + 1)})[0]["h"]


def _rows(lm, seqs: list[list[int]], block: int) -> Rows:
    b = pad(seqs, lm.tok.pad_token_id, lm.device)
    return Rows(b.input_ids, b.attention_mask, _stream_after(lm, block, b.input_ids, b.attention_mask))


def _run(lm, ivs: dict, first: int, rows: Rows) -> torch.Tensor:
    """Stack output (final norm applied) ``[rows, T, d]`` with the first intervention applied
    to the cached stream; interventions on later blocks act through hooks."""
    return run_from_block(lm, ivs[first](rows.h0) if ivs else rows.h0, first + 1,
                          rows.attention_mask)


def prepare(lm, request: EditRequest, hp: BaFTHparams) -> TrainingBatches:
    """Build the training batches, cache the stream below the edit and the KL reference."""
    bad = [x for x in hp.blocks if not 0 <= x < lm.n_blocks]
    if bad:
        raise ValueError(f"blocks {bad} out of range: this model has blocks 0..{lm.n_blocks - 1}")
    t0 = time.perf_counter()
    contexts = context_templates(lm, hp.context_template_length_params, seed=hp.seed)
    rewrite = [c.format(request.rewrite_prompt) for c in contexts]
    loc = [p.format(request.subject) for p in hp.kl_prompts] + list(hp.loc_prompts)
    loc += _distractor_prompts(request, hp.n_distractors, hp.seed)
    target = token_ids(lm, space(request.target_new))
    if not target:
        raise ValueError(f"target {request.target_new!r} tokenizes to nothing")
    rw_seqs: list[list[int]] = []
    tgt_rows, tgt_pos, tgt_ids, tgt_w = [], [], [], []
    for r, text in enumerate(rewrite):
        ids = list(lm.prefix_ids) + token_ids(lm, text)
        for j, t in enumerate(target):
            tgt_rows.append(r)
            tgt_pos.append(len(ids) - 1 + j)
            tgt_ids.append(t)
            tgt_w.append(1.0 / (len(target) * len(rewrite)))
        rw_seqs.append(ids + target[:-1])
    loc_seqs: list[list[int]] = []
    loc_rows, loc_pos, loc_w = [], [], []
    n_pre = len(lm.prefix_ids)
    for k, text in enumerate(loc):
        ids = list(lm.prefix_ids) + token_ids(lm, text)
        positions = list(range(max(0, n_pre - 1), len(ids)))
        if hp.loc_positions == "last":
            positions = positions[-1:]
        for p in positions:
            loc_rows.append(k)
            loc_pos.append(p)
            loc_w.append(1.0 / (len(positions) * len(loc)))
        loc_seqs.append(ids)
    first = hp.blocks[0]
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=lm.device)  # noqa: E731
    prep = TrainingBatches(
        request=request, hp=hp, contexts=contexts, loc_prompts=loc,
        rw=_rows(lm, rw_seqs, first), loc=_rows(lm, loc_seqs, first),
        tgt_rows=t(tgt_rows), tgt_pos=t(tgt_pos), tgt_ids=t(tgt_ids),
        tgt_weight=t(tgt_w, torch.float32), loc_rows=t(loc_rows), loc_pos=t(loc_pos),
        loc_weight=t(loc_w, torch.float32), loc_logp=torch.empty(0),
    )
    with torch.no_grad():
        h = _run(lm, {}, first, prep.loc)
        prep.loc_logp = lm_head_logits(lm.model, h[prep.loc_rows, prep.loc_pos]).float().log_softmax(-1)
    prep.seconds = time.perf_counter() - t0
    return prep


def _hook(iv: BasisIntervention):
    def fn(m, args, out):
        if isinstance(out, tuple):
            return (iv(out[0]),) + tuple(out[1:])
        return iv(out)

    return fn


def train(lm, prep: TrainingBatches, hp: BaFTHparams | None = None) -> tuple[dict, list[dict], int, float]:
    """Adam on the interventions only. Returns ``(interventions, losses, steps, seconds)``;
    ``interventions`` maps block index -> trained :class:`BasisIntervention` (frozen).

    Loss: ``nll + loc_factor * kl + gate_l1 * mean w(h)`` (the last over every real token of
    every training row, both batches).
    """
    hp = hp or prep.hp
    t0 = time.perf_counter()
    model, dev = lm.model, lm.device
    g = torch.Generator(device="cpu").manual_seed(hp.seed)
    ivs = {
        B: BasisIntervention(lm.d_model, hp.rank, g, hp.gate_bias).to(dev) for B in hp.blocks
    }
    groups = [
        dict(params=[p for iv in ivs.values() for p in iv.gate.parameters()],
             lr=hp.lr * hp.gate_lr_scale),
        dict(params=[p for iv in ivs.values() for n, p in iv.named_parameters()
                     if not n.startswith("gate.")]),
    ]
    opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
    first, rest = hp.blocks[0], hp.blocks[1:]
    gates: dict[int, torch.Tensor] = {}

    def gated(B):
        iv = ivs[B]

        def fn(m, args, out):
            h = first_tensor(out)
            gates[B] = iv.weights(h)
            new = iv(h)
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

        return fn

    def gate_mean(rows: Rows) -> torch.Tensor:
        m = rows.attention_mask.float()[..., None]
        return torch.stack([(gates[B] * m).sum() / (m.sum() * hp.rank) for B in hp.blocks]).mean()

    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    losses, steps = [], 0
    try:
        with hooks([block_module(model, B).register_forward_hook(gated(B)) for B in rest]):
            for it in range(hp.steps):
                opt.zero_grad()
                gates[first] = ivs[first].weights(prep.rw.h0)
                h = _run(lm, ivs, first, prep.rw)
                g_rw = gate_mean(prep.rw)
                logits = lm_head_logits(model, h[prep.tgt_rows, prep.tgt_pos]).float()
                lp = logits.log_softmax(-1).gather(1, prep.tgt_ids[:, None])[:, 0]
                nll = -(lp * prep.tgt_weight).sum()
                gates[first] = ivs[first].weights(prep.loc.h0)
                h = _run(lm, ivs, first, prep.loc)
                g_loc = gate_mean(prep.loc)
                loc_lp = lm_head_logits(model, h[prep.loc_rows, prep.loc_pos]).float().log_softmax(-1)
                kl_tok = (prep.loc_logp.exp() * (prep.loc_logp - loc_lp)).sum(-1)
                kl = (kl_tok * prep.loc_weight).sum()
                loss = nll + hp.loc_factor * kl + hp.gate_l1 * (g_rw + g_loc) / 2
                losses.append(dict(step=it, loss=loss.item(), nll=nll.item(), kl=kl.item(),
                                   p_target=float(torch.exp(-nll.detach())),
                                   gate_rewrite=g_rw.item(), gate_loc=g_loc.item()))
                if nll.item() + hp.loc_factor * kl.item() < hp.early_stop_loss or it == hp.steps - 1:
                    break
                loss.backward()
                opt.step()
                steps += 1
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    for iv in ivs.values():
        iv.requires_grad_(False)
    return ivs, losses, steps, time.perf_counter() - t0


@torch.no_grad()
def locality_kl(lm, prep: TrainingBatches, ivs: dict) -> list[float]:
    """Per locality prompt, mean over its tokens of KL(unedited || edited) next-token."""
    first, rest = prep.hp.blocks[0], [B for B in ivs if B != prep.hp.blocks[0]]
    with hooks([block_module(lm.model, B).register_forward_hook(_hook(ivs[B])) for B in rest]):
        h = _run(lm, ivs, first, prep.loc)
    lp = lm_head_logits(lm.model, h[prep.loc_rows, prep.loc_pos]).float().log_softmax(-1)
    kl_tok = (prep.loc_logp.exp() * (prep.loc_logp - lp)).sum(-1)
    n = len(prep.loc_prompts)
    tot = torch.zeros(n, device=kl_tok.device).index_add_(0, prep.loc_rows, kl_tok)
    cnt = torch.zeros(n, device=kl_tok.device).index_add_(0, prep.loc_rows, torch.ones_like(kl_tok))
    return (tot / cnt).tolist()


class BaFTEdit(Edit):
    """An installed BaFT intervention: forward hooks on decoder blocks, removed on restore.

    ``interventions``: block index -> :class:`BasisIntervention`. The model's parameters are
    never written; :meth:`restore` removes the hooks, so outputs are the original ones again.
    """

    def __init__(self, model: nn.Module, interventions: dict, info: dict | None = None):
        super().__init__(model, "BaFT", info)
        self.interventions = interventions

    def install(self, lm) -> "BaFTEdit":
        for B, iv in self.interventions.items():
            handle = block_module(lm.model, B).register_forward_hook(_hook(iv))
            self.on_restore(handle.remove)
        return self

    def weights(self, lm, prompts) -> dict[int, torch.Tensor]:
        """Per-basis weights ``w(h)`` at every token of ``prompts``: block -> ``[rows, T, r]``
        (padded tokens included; the edit is applied while they are measured)."""
        from ..core.tokens import encode

        b = encode(lm, list(prompts))
        got: dict[int, torch.Tensor] = {}
        handles = [
            block_module(lm.model, B).register_forward_hook(
                lambda m, a, o, B=B, iv=iv: got.__setitem__(B, iv.weights(first_tensor(o))),
                prepend=True)  # before the edit's own hook: w of the block's output
            for B, iv in self.interventions.items()
        ]
        base = get_module(lm.model, lm.adapter.base)
        with hooks(handles), torch.no_grad():
            base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        return got


def apply(lm, request: EditRequest | dict, hparams: BaFTHparams | None = None) -> BaFTEdit:
    """Train a BaFT intervention for ``request`` and install it; returns the undoable edit."""
    if isinstance(request, dict):
        request = EditRequest.from_dict(request)
    hp = hparams or BaFTHparams.for_model(lm)
    t0 = time.perf_counter()
    prep = prepare(lm, request, hp)
    ivs, losses, steps, secs = train(lm, prep, hp)
    info = dict(
        request=request.to_dict(), hparams=hp.to_dict(), blocks=list(hp.blocks), rank=hp.rank,
        steps=steps, losses=losses, n_params=sum(p.numel() for iv in ivs.values()
                                                  for p in iv.parameters()),
        loc_prompts=prep.loc_prompts, loc_kl=locality_kl(lm, prep, ivs),
        seconds_prepare=prep.seconds, seconds_opt=secs,
    )
    edit = BaFTEdit(lm.model, ivs, info)
    with edit.undo_on_error():
        edit.install(lm)
    edit.info["seconds"] = time.perf_counter() - t0
    return edit


def _register() -> None:
    from .editors import register

    @register("baft", params=BaFTHparams, extra=("block",))
    def _baft(lm, request, hparams=None, block: int | None = None, **hp):
        base = hparams if isinstance(hparams, BaFTHparams) else BaFTHparams.for_model(lm)
        if block is not None:
            hp["blocks"] = (block,)
        return apply(lm, request, base.replace(**hp) if hp else base)


_register()
