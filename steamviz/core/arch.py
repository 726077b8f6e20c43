"""Architecture adapters: where things live inside a HuggingFace causal LM.

One small table, keyed by ``config.model_type``. Each entry names (as dotted paths from
the top-level ``*ForCausalLM`` module) the decoder blocks, the MLP, its output projection
(the matrix ROME edits), the attention, the final norm and the lm_head, and says whether
the projection is a ``Linear`` (weight ``[out, in]``) or GPT-2's ``Conv1D`` (weight
``[in, out]``).

>>> from steamviz.core.arch import ADAPTERS
>>> ADAPTERS["llama"].mlp_out.format(7)
'model.layers.7.mlp.down_proj'
>>> ADAPTERS["gpt2"].conv1d
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .memo import memo


@dataclass(frozen=True)
class Adapter:
    """Module paths of one architecture (``{}`` stands for a block index)."""

    model_type: str
    base: str  # the decoder stack (returns last hidden state, final norm applied)
    embed: str  # token embedding
    blocks: str  # ModuleList of the decoder blocks
    mlp: str
    mlp_out: str  # ROME / MEMIT edited matrix
    attn: str
    final_norm: str
    lm_head: str
    conv1d: bool = False  # weight stored [in, out] (GPT-2 Conv1D)
    # how the stack turns ``inputs_embeds`` into the first block's input:
    # "identity", "scale_sqrt_hidden" (Gemma), "add_wpe" (GPT-2 learned positions)
    embed_transform: str = "identity"

    def block(self, i: int) -> str:
        return f"{self.blocks}.{i}"


def _llama_like(model_type: str, **kw) -> Adapter:
    base = dict(
        model_type=model_type,
        base="model",
        embed="model.embed_tokens",
        blocks="model.layers",
        mlp="model.layers.{}.mlp",
        mlp_out="model.layers.{}.mlp.down_proj",
        attn="model.layers.{}.self_attn",
        final_norm="model.norm",
        lm_head="lm_head",
    )
    base.update(kw)
    return Adapter(**base)


def _gpt_like(model_type: str, mlp_out: str, **kw) -> Adapter:
    """GPT-2 / GPT-J layout: ``transformer.h.{i}``, the MLP's output projection ``mlp_out``."""
    return Adapter(model_type=model_type, base="transformer", embed="transformer.wte",
                   blocks="transformer.h", mlp="transformer.h.{}.mlp",
                   mlp_out=f"transformer.h.{{}}.mlp.{mlp_out}", attn="transformer.h.{}.attn",
                   final_norm="transformer.ln_f", lm_head="lm_head", **kw)


ADAPTERS: dict[str, Adapter] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "gemma": _llama_like("gemma"),
    "gemma2": _llama_like("gemma2"),
    "gemma3_text": _llama_like("gemma3_text"),
    "gpt2": _gpt_like("gpt2", "c_proj", conv1d=True, embed_transform="add_wpe"),
    "gptj": _gpt_like("gptj", "fc_out"),
    "gpt_neox": Adapter(
        model_type="gpt_neox",
        base="gpt_neox",
        embed="gpt_neox.embed_in",
        blocks="gpt_neox.layers",
        mlp="gpt_neox.layers.{}.mlp",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn="gpt_neox.layers.{}.attention",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head|embed_out",  # renamed in transformers 5
    ),
}
ADAPTERS["gemma3"] = ADAPTERS["gemma3_text"]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model`` (by ``config.model_type``), or a clear error."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ADAPTERS:
        raise ValueError(
            f"steamviz has no architecture adapter for model_type={mt!r}. Supported: "
            f"{sorted(ADAPTERS)}. Add an entry to steamviz.core.arch.ADAPTERS naming its modules."
        )
    ad = ADAPTERS[mt]
    if mt == "gemma3" and not _has(model, ad.blocks):
        # multimodal Gemma 3 wraps the text stack one level deeper
        raise ValueError("Gemma 3 multimodal checkpoints are not supported; load the text model.")
    return ad


def _has(model: nn.Module, path: str) -> bool:
    try:
        get_module(model, path)
        return True
    except AttributeError:
        return False


def get_module(model: nn.Module, path: str) -> nn.Module:
    """``model.a.b.3.c`` by dotted path, with a clear error. ``"a|b"`` tries ``a`` then ``b``
    (module names that changed between transformers versions)."""
    if "|" in path:
        alts = path.split("|")
        for alt in alts[:-1]:
            try:
                return get_module(model, alt)
            except AttributeError:
                pass
        path = alts[-1]
    mod = model
    for part in path.split("."):
        if not hasattr(mod, part):
            raise AttributeError(f"{type(model).__name__} has no submodule {path!r} (at {part!r})")
        mod = getattr(mod, part)
    return mod


def n_blocks(model: nn.Module) -> int:
    return len(get_module(model, adapter_for(model).blocks))


def block_module(model: nn.Module, i: int) -> nn.Module:
    return get_module(model, adapter_for(model).blocks)[i]


def mlp_out_module(model: nn.Module, i: int) -> nn.Module:
    return get_module(model, adapter_for(model).mlp_out.format(i))


def mlp_out_weight(model: nn.Module, i: int) -> torch.Tensor:
    """The edited matrix's weight parameter (layout depends on ``Adapter.conv1d``)."""
    return mlp_out_module(model, i).weight


def as_out_in(weight: torch.Tensor, ad: Adapter) -> torch.Tensor:
    """View a projection weight as ``[out, in]`` whatever its storage."""
    return weight.T if ad.conv1d else weight


def final_readout(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Residual stream -> logits: final norm then lm_head (the logit lens).

    ``hidden``: ``[..., d_model]`` -> ``[..., vocab]``.
    """
    ad = adapter_for(model)
    norm = get_module(model, ad.final_norm)
    head = get_module(model, ad.lm_head)
    logits = head(norm(hidden))
    soft = getattr(model.config, "final_logit_softcapping", None)
    if soft:
        logits = torch.tanh(logits / soft) * soft
    return logits


def lm_head_logits(model: nn.Module, last_hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the stack's *output* (final norm already applied)."""
    ad = adapter_for(model)
    logits = get_module(model, ad.lm_head)(last_hidden)
    soft = getattr(model.config, "final_logit_softcapping", None)
    if soft:
        logits = torch.tanh(logits / soft) * soft
    return logits


def block_input_to_embeds(
    model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """Invert what the stack does to ``inputs_embeds`` before its first block.

    With this, the stack can be run on a cached residual stream: truncate its block list
    and pass ``block_input_to_embeds(h)`` as ``inputs_embeds``
    (see :func:`steamviz.core.forward.run_from_block`).
    """
    ad = adapter_for(model)
    if ad.embed_transform == "identity":
        return hidden
    if ad.embed_transform == "scale_sqrt_hidden":
        norm = torch.tensor(model.config.hidden_size**0.5, dtype=hidden.dtype)
        return hidden / norm
    if ad.embed_transform == "add_wpe":
        wpe = get_module(model, "transformer.wpe")
        return hidden - wpe(position_ids)
    raise ValueError(f"unknown embed_transform {ad.embed_transform!r}")



# --------------------------------------------------------------------------------------------
# the KV cache's name, which changed across transformers releases
# --------------------------------------------------------------------------------------------
_CACHE_NAMES: dict[type, str] = memo("arch.cache_names")


def cache_name(module: nn.Module) -> str:
    """The keyword under which ``module.forward`` takes a KV cache: ``"cache"`` in recent
    transformers 5 releases, ``"past_key_values"`` before (the old name still works there,
    with a deprecation warning on every call).

    >>> from torch import nn
    >>> class Old(nn.Module):
    ...     def forward(self, input_ids=None, past_key_values=None): ...
    >>> cache_name(Old())
    'past_key_values'
    """
    kind = type(module)
    if kind not in _CACHE_NAMES:
        import inspect

        params = inspect.signature(kind.forward).parameters
        _CACHE_NAMES[kind] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_NAMES[kind]


def cache_kwargs(module: nn.Module, cache) -> dict:
    """``{name: cache}`` to pass a KV cache to ``module``'s forward, whatever the release."""
    return {cache_name(module): cache}


def cache_in_kwargs(kwargs: dict):
    """The KV cache among a forward's keyword arguments (as a forward pre-hook sees them)."""
    got = kwargs.get("cache")
    return got if got is not None else kwargs.get("past_key_values")


def output_cache(out):
    """The KV cache a forward returned (``out.cache`` or ``out.past_key_values``), or None."""
    fields = getattr(out, "__dataclass_fields__", None) or {}
    if "cache" in fields:
        return out.cache
    return getattr(out, "past_key_values", None)
