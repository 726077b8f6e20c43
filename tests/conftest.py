"""Shared fixtures: the real default model (once per session) and tiny random models of
every supported architecture (built from configs, no download)."""

from __future__ import annotations

import pytest
import torch

from steamviz import fetch


@pytest.fixture(scope="session")
def lm():
    from steamviz.core.models import load_model

    torch.manual_seed(0)
    return load_model(device="cpu")


def data_missing(*names: str) -> str | None:
    """Why the public data sets ``names`` cannot be loaded here (not fetched into the cache
    and no $STEAMVIZ_DATA_MIRROR folder), or None. scripts/test.sh points the mirror at
    ../shared/data when it exists."""
    for name in names:
        why = fetch.available(name)
        if why:
            return f"public data set {name!r} not available: {why}"
    return None


@pytest.fixture(scope="session")
def shared():
    """The data root with the public evaluation sets (skips the test without them)."""
    why = data_missing("counterfact", "zsre", "mquake", "lre", "pararel")
    if why:
        pytest.skip(why)
    return fetch.data_root()


@pytest.fixture(scope="session")
def tokenizer(lm):
    return lm.tok


TINY = {
    "llama": dict(cls="LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(cls="Qwen2Config", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "gemma3_text": dict(cls="Gemma3TextConfig", hidden_size=64, intermediate_size=128,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, sliding_window=64),
    "gpt2": dict(cls="GPT2Config", n_embd=64, n_layer=4, n_head=4, n_positions=256),
    "gptj": dict(cls="GPTJConfig", n_embd=64, n_layer=4, n_head=4, rotary_dim=8, n_positions=256),
    "gpt_neox": dict(cls="GPTNeoXConfig", hidden_size=64, intermediate_size=128,
                     num_hidden_layers=4, num_attention_heads=4),
}


#: tiny configs only the lean-path tests build (not in the `tiny` fixture's architectures)
TINY_LEAN = {
    "qwen3": dict(cls="Qwen3Config", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def build_tiny(arch: str, tok, seed: int = 0):
    import transformers
    from transformers import AutoModelForCausalLM

    from steamviz.core.models import from_model

    kw = dict(TINY[arch] if arch in TINY else TINY_LEAN[arch])
    cfg = getattr(transformers, kw.pop("cls"))(vocab_size=len(tok), initializer_range=0.3, **kw)
    cfg._attn_implementation = "sdpa" if arch != "gptj" else "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # randomise norms/biases too, so adapters' mistakes show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return from_model(model, tok, name=f"tiny-{arch}", prefix_ids=[0])


@pytest.fixture(scope="session", params=sorted(TINY))
def tiny(request, tokenizer):
    return build_tiny(request.param, tokenizer)
