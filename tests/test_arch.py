"""Adapters, capture and the truncated forward pass on tiny random models of every
supported architecture (no download)."""

import pytest
import torch

from steamviz.core.arch import ADAPTERS, adapter_for, as_out_in, final_readout, get_module, mlp_out_module
from steamviz.look.capture import capture
from steamviz.core.forward import run_from_block
from steamviz.core.tokens import encode

PROMPTS = ["The capital of France is", "Tokyo is a big city in the country of", "Paris"]
SUBJECTS = ["France", "Tokyo", "Paris"]


def test_adapter_paths_resolve(tiny):
    ad = adapter_for(tiny.model)
    for path in (ad.embed, ad.blocks, ad.final_norm, ad.lm_head, ad.mlp.format(1),
                 ad.mlp_out.format(1), ad.attn.format(1)):
        get_module(tiny.model, path)
    W = as_out_in(mlp_out_module(tiny.model, 1).weight, ad)
    assert W.shape[0] == tiny.d_model  # [out, in]: the projection writes the residual stream


def test_unknown_architecture_is_a_clear_error():
    class Cfg:
        model_type = "mamba"

    class M(torch.nn.Module):
        config = Cfg()

    with pytest.raises(ValueError, match="no architecture adapter for model_type='mamba'"):
        adapter_for(M())


def test_table_covers_required_architectures():
    assert {"llama", "qwen2", "gemma3_text", "gpt2", "gptj", "gpt_neox"} <= set(ADAPTERS)


@torch.no_grad()
def test_capture_equals_output_hidden_states(tiny):
    cap = capture(tiny, PROMPTS, positions=("last", "subject_last"), subjects=SUBJECTS)
    b = encode(tiny, PROMPTS)
    hs = tiny.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                    output_hidden_states=True).hidden_states
    n = tiny.n_blocks
    assert cap.tensor.shape == (3, n + 1, 2, tiny.d_model)
    norm = get_module(tiny.model, tiny.adapter.final_norm)
    for layer in range(n + 1):
        for i in range(3):
            for k in range(2):
                got = cap.tensor[i, layer, k]
                if layer == n:  # HF's last hidden state has the final norm applied
                    got = norm(got)
                ref = hs[layer][i, cap.token_index[i, k]]
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_last_layer_readout_is_the_models_logits(tiny):
    cap = capture(tiny, PROMPTS, layers=[tiny.n_blocks])
    b = encode(tiny, PROMPTS)
    logits = tiny.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    ref = logits[torch.arange(3), b.last]
    torch.testing.assert_close(final_readout(tiny.model, cap.get("last", tiny.n_blocks)), ref,
                               rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_run_from_layer_matches_full_forward(tiny):
    b = encode(tiny, PROMPTS)
    out = tiny.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                     output_hidden_states=True)
    for start in (1, tiny.n_blocks - 1):
        top = run_from_block(tiny, out.hidden_states[start], start, b.attention_mask)
        for i in range(3):
            L = int(b.lengths[i])
            torch.testing.assert_close(top[i, :L], out.hidden_states[-1][i, :L],
                                       rtol=1e-4, atol=1e-4)
    assert len(get_module(tiny.model, tiny.adapter.blocks)) == tiny.n_blocks  # restored


@torch.no_grad()
def test_batched_capture_equals_one_at_a_time(tiny):
    cap = capture(tiny, PROMPTS, positions=("last", "subject_last"), subjects=SUBJECTS)
    for i, (p, s) in enumerate(zip(PROMPTS, SUBJECTS)):
        one = capture(tiny, [p], positions=("last", "subject_last"), subjects=[s])
        torch.testing.assert_close(one.tensor[0], cap.tensor[i], rtol=1e-4, atol=1e-4)


def test_kv_cache_calls_are_quiet_and_equal_a_full_forward(tiny):
    """Our KV-cache calls use the name this transformers release takes (``cache`` or
    ``past_key_values``): no deprecation warning, and a cached step gives the logits of
    one full forward."""
    import warnings

    from steamviz.core.arch import cache_kwargs, output_cache
    from steamviz.core.forward import greedy

    ids = torch.tensor([[0] + tiny.tok("Paris is a city in", add_special_tokens=False)["input_ids"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        full = tiny.model(input_ids=ids, use_cache=False).logits[0, -1]
        first = tiny.model(input_ids=ids[:, :-1], use_cache=True)
        cache = output_cache(first)
        assert cache is not None
        step = tiny.model(input_ids=ids[:, -1:], use_cache=True,
                          **cache_kwargs(tiny.model, cache)).logits[0, -1]
        greedy(tiny, ["Paris is a city in"], max_new_tokens=3)
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
