"""A lean forward of decoder blocks (Llama, Mistral, Qwen2, Qwen3, Gemma 3), for optimisation loops.

ROME's v* loop (also STEAM-ROME's and MEMIT's z loop) runs the blocks above the edited
block on a handful of *suffix* tokens per row, with the prefix's keys and values cached,
forward and backward, 25 times per edit. Through transformers' modules part of that time
goes to module dispatch and cache bookkeeping. :class:`LeanStack` does the same arithmetic
as transformers' Llama, Mistral, Qwen2, Qwen3 (q/k norms) and Gemma 3 blocks (four
``(1 + w)`` norms per block, q/k norms, GELU-tanh, a rotary per layer type; only while the
rows are no longer than the sliding window, where local and global attention agree) as
plain tensor operations on the model's own weights -- no copies: fusing q|k|v and gate|up
into one product each bought nothing on this CPU and cost 0.32x of SmolLM2's weight bytes
per edit (docs/results.md) -- with rotary angles from the model's own rotary module and SDPA
with the caller's additive mask. It is an internal fast path: callers check
:func:`unsupported` first and fall back to the modules when it names a reason (another
architecture, hooks on the blocks -- a hook-based edit such as BaFT or SAKE, or a user's
probe --, dropout in training mode).

>>> stack = LeanStack(lm.model, start=5)                               # doctest: +SKIP
>>> cos, sin = stack.rope(h, pos)                                      # doctest: +SKIP
>>> out = stack.run(h, cos, sin, prefix_kv, mask4d)   # == base(..., past_key_values) # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .arch import adapter_for, get_module

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")  # RMSNorm(w), SiLU gate, 2 norms/block
GEMMA3 = ("gemma3_text",)  # RMSNorm(1 + w), GELU-tanh gate, 4 norms/block, q/k norms
SUPPORTED = LLAMA_LIKE + GEMMA3
_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA enable_gqa


def _hooked(m: nn.Module) -> bool:
    return any(
        getattr(m, a, None)
        for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks")
    )


def unsupported(model: nn.Module, start: int, length: int | None = None) -> str | None:
    """Why :class:`LeanStack` cannot stand in for blocks ``start..`` of ``model`` on rows of
    ``length`` tokens (prefix included; None: not checked); ``None`` when it can."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        return f"model_type {mt!r} (lean path covers {SUPPORTED})"
    gemma = mt in GEMMA3
    act = getattr(cfg, "hidden_activation", None) if gemma else getattr(cfg, "hidden_act", "silu")
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        return f"activation {act!r}"
    if gemma and getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    if gemma and getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention"
    window = getattr(cfg, "sliding_window", None)
    sliding = gemma or (mt == "qwen3" and getattr(cfg, "use_sliding_window", False))
    if sliding and window and length is not None and length > window:
        return f"rows of {length} tokens are longer than the sliding window ({window})"
    if (getattr(cfg, "pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    ad = adapter_for(model)
    blocks = get_module(model, ad.blocks)
    base = get_module(model, ad.base)
    if not hasattr(base, "rotary_emb"):
        return "no rotary module on the decoder stack"
    if model.training and getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout in training mode"
    mods = [get_module(model, ad.final_norm)] + list(blocks)[start:]
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks:
        return "global module hooks are registered"
    for top in mods:
        for name, m in top.named_modules():
            if _hooked(m):
                return f"a hook on {type(m).__name__} {name or '(block)'}"
    eps = "eps" if gemma else "variance_epsilon"
    norms = (("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
              "post_feedforward_layernorm") if gemma else ("input_layernorm",
                                                            "post_attention_layernorm"))
    qk = gemma or mt == "qwen3"
    for b in list(blocks)[start:]:
        a, p = getattr(b, "self_attn", None), getattr(b, "mlp", None)
        if a is None or p is None or hasattr(a, "q_norm") != qk:
            return f"block layout differs from {mt}'s"
        if not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            return "attention layout differs from Llama's"
        if not all(hasattr(p, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "MLP layout differs from Llama's"
        if not all(hasattr(getattr(b, n, None), eps) for n in norms):
            return f"norms differ from {mt}'s RMSNorm"
        if qk and not all(hasattr(getattr(a, n, None), eps) for n in ("q_norm", "k_norm")):
            return f"q/k norms differ from {mt}'s RMSNorm"
    return None


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm: statistics in float32, weight applied in the input dtype
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rms1(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' Gemma3RMSNorm: (x * (1 + w)) in float32, then the input dtype
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())
            ).type_as(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@dataclass
class _Proj:
    """Linear maps of the same input: the model's own weights, or copies in ``dtype`` for
    lower-precision products (``v_matmul_dtype``, opt-in)."""

    weights: list
    biases: list

    @classmethod
    def of(cls, linears: list[nn.Linear], dtype: torch.dtype | None = None) -> "_Proj":
        ws = [m.weight.detach() for m in linears]
        bs = [None if m.bias is None else m.bias.detach() for m in linears]
        if dtype is not None and dtype != ws[0].dtype:
            ws = [w.to(dtype) for w in ws]
            bs = [None if b is None else b.to(dtype) for b in bs]
        return cls(ws, bs)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        dt = x.dtype
        if self.weights[0].dtype != dt:  # products in a lower precision, stream kept in dt
            x = x.to(self.weights[0].dtype)
        return [F.linear(x, w, b).to(dt) for w, b in zip(self.weights, self.biases)]


class LeanStack:
    """Blocks ``start..`` of a Llama, Qwen or Gemma 3 causal LM as tensor arithmetic (module doc).

    Build it per optimisation (it holds references to the current weights, and with
    ``matmul_dtype`` copies of them); do not keep it across edits of the model.
    ``matmul_dtype`` (e.g. ``torch.bfloat16``): hold copies of the projection weights in that
    dtype and run the products in it, the residual stream, norms, rotary and attention
    staying in the model's dtype -- on CPUs with AMX-BF16 (or GPUs) this trades about three
    significant digits of the products for speed, and the copies' memory.
    """

    def __init__(self, model: nn.Module, start: int, matmul_dtype: torch.dtype | None = None):
        why = unsupported(model, start)
        if why is not None:
            raise ValueError(f"the lean forward cannot run this model: {why}")
        ad = adapter_for(model)
        blocks = list(get_module(model, ad.blocks))[start:]
        self.start = start
        self.rotary = get_module(model, ad.base).rotary_emb
        self.gemma = model.config.model_type in GEMMA3
        self._norm = _rms1 if self.gemma else _rms
        # one rotary per layer type (Gemma 3: local and global layers); Llama's: one
        types = getattr(model.config, "layer_types", None) if self.gemma else None
        self.types = sorted(set(types)) if types else [None]
        self.norm = get_module(model, ad.final_norm)
        md = matmul_dtype
        self.blocks = []
        eps = "eps" if self.gemma else "variance_epsilon"

        def norm(m):  # (weight, epsilon) of a norm module, or None
            return None if m is None else (m.weight.detach(), getattr(m, eps))

        for j, b in enumerate(blocks):
            a, p = b.self_attn, b.mlp
            hd = a.head_dim
            self.blocks.append(dict(
                qkv=_Proj.of([a.q_proj, a.k_proj, a.v_proj], md),
                o=_Proj.of([a.o_proj], md),
                gu=_Proj.of([p.gate_proj, p.up_proj], md),
                down=_Proj.of([p.down_proj], md),
                n1=norm(b.input_layernorm), n2=norm(b.post_attention_layernorm),
                n3=norm(getattr(b, "pre_feedforward_layernorm", None)),
                n4=norm(getattr(b, "post_feedforward_layernorm", None)),
                qn=norm(getattr(a, "q_norm", None)), kn=norm(getattr(a, "k_norm", None)),
                rt=self.types.index(types[start + j]) if types else 0,
                hd=hd, nq=a.q_proj.weight.shape[0] // hd, nkv=a.k_proj.weight.shape[0] // hd,
                scaling=a.scaling,
            ))

    def rope(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[tuple, tuple]:
        """cos, sin for positions ``pos`` ``[batch, seq]``: one ``[batch, 1, seq, head_dim]``
        tensor per rotary (layer type; Llama's models have one)."""
        with torch.no_grad():
            outs = [self.rotary(h, pos) if t is None else self.rotary(h, pos, t)
                    for t in self.types]
        return tuple(c[:, None] for c, _ in outs), tuple(s[:, None] for _, s in outs)

    def block(self, j: int, h: torch.Tensor, cos, sin, kv, mask: torch.Tensor) -> torch.Tensor:
        """Block ``start + j`` on ``h`` ``[batch, seq, d]``; ``kv``: the prefix's (keys,
        values) ``[batch, kv_heads, P, head_dim]`` of this block (rotary applied)."""
        return self.join(j, *self.parts(j, h, cos, sin, kv, mask))

    def join(self, j: int, h_mid: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        """Block ``start + j``'s output from its two parts (:meth:`parts`): the stream after
        attention plus the MLP's output (Gemma 3: the MLP's output normed first). An edit of
        the MLP's down projection adds to ``mlp_out``."""
        if self.gemma:
            return h_mid + self._norm(mlp_out, *self.blocks[j]["n4"])
        return h_mid + mlp_out

    def parts(self, j: int, h: torch.Tensor, cos, sin, kv, mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stream after attention, MLP output)`` of block ``start + j`` (see :meth:`block`)."""
        w = self.blocks[j]
        norm = self._norm
        cos, sin = cos[w["rt"]], sin[w["rt"]]
        B, S, _ = h.shape
        hd, nq, nkv = w["hd"], w["nq"], w["nkv"]
        x = norm(h, *w["n1"])
        q, k, v = w["qkv"](x)
        q = q.view(B, S, nq, hd).transpose(1, 2)
        k = k.view(B, S, nkv, hd).transpose(1, 2)
        v = v.view(B, S, nkv, hd).transpose(1, 2)
        if w["qn"] is not None:  # Qwen3's and Gemma 3's per-head q/k norms, before rotary
            q, k = norm(q, *w["qn"]), norm(k, *w["kn"])
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        pk, pv = kv
        if pk is not None:
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if nkv != nq and _GQA:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=w["scaling"],
                                               enable_gqa=True)
        else:
            if nkv != nq:  # transformers' repeat_kv: each kv head serves nq // nkv query heads
                k = k.repeat_interleave(nq // nkv, dim=1)
                v = v.repeat_interleave(nq // nkv, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=w["scaling"])
        a = w["o"](o.transpose(1, 2).reshape(B, S, nq * hd))[0]
        if self.gemma:  # norms after attention and around the MLP, GELU-tanh gate
            h = h + norm(a, *w["n2"])
            g, u = w["gu"](norm(h, *w["n3"]))
            return h, w["down"](F.gelu(g, approximate="tanh") * u)[0]
        h = h + a
        g, u = w["gu"](norm(h, *w["n2"]))
        return h, w["down"](F.silu(g) * u)[0]

    def run(self, h: torch.Tensor, cos, sin, prefix_kv: list, mask: torch.Tensor, first: int = 0,
            tap: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Blocks ``start + first ..`` then the final norm; ``prefix_kv`` is indexed by
        absolute block. ``tap(layer, h)`` sees the stream *entering* block ``layer`` for
        every layer after the first block run (``layer == n_blocks``: the last block's
        output, before the norm)."""
        for j in range(first, len(self.blocks)):
            i = self.start + j
            h = self.block(j, h, cos, sin, prefix_kv[i], mask)
            if tap is not None:
                tap(i + 1, h)
        return self.norm(h)
