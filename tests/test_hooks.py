"""The one stream reader (steamviz.core.hooks) on the tiny models of every architecture."""

import pytest
import torch

from steamviz.core.arch import get_module, mlp_out_module
from steamviz.core.hooks import Tap, hooks, read, stream
from steamviz.core.tokens import encode

PROMPTS = ["The capital of France is", "Rome is the capital of the country of"]


def _hidden_states(lm, b):
    with torch.no_grad():
        return lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                        output_hidden_states=True).hidden_states


def test_stream_taps_equal_hidden_states_and_stop_early(tiny):
    b = encode(tiny, PROMPTS)
    ref = _hidden_states(tiny, b)
    n = tiny.n_blocks
    blocks = get_module(tiny.model, tiny.adapter.blocks)
    ran = []
    handle = blocks[n - 1].register_forward_hook(lambda m, a, o: ran.append(1))
    with hooks([handle]):
        got, out = read(tiny, b.input_ids, b.attention_mask,
                        {layer: stream(tiny, layer) for layer in range(n - 1)})
    assert out is None and ran == []  # stopped before the last block
    for layer in range(n - 1):
        torch.testing.assert_close(got[layer], ref[layer], rtol=1e-5, atol=1e-4)


def test_read_to_the_end_returns_the_output_and_input_output_pairs(tiny):
    b = encode(tiny, PROMPTS)
    mod = mlp_out_module(tiny.model, 1)
    seen = {}
    handle = mod.register_forward_hook(lambda m, a, o: seen.update(k=a[0], v=o))
    with hooks([handle]), torch.no_grad():
        get_module(tiny.model, tiny.adapter.base)(
            input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    got, out = read(tiny, b.input_ids, b.attention_mask,
                    {"kv": Tap(mod, "both"), "k": Tap(mod, "input"),
                     "last": Tap(mod, "output", keep=lambda v: v[:, -1])}, stop=False)
    assert out is not None
    torch.testing.assert_close(got["kv"][0], seen["k"])
    torch.testing.assert_close(got["kv"][1], seen["v"])
    torch.testing.assert_close(got["k"], seen["k"])
    torch.testing.assert_close(got["last"], seen["v"][:, -1])
    assert not got["k"].requires_grad  # a reader never builds a graph


def test_hooks_are_removed_on_error_and_bad_taps_are_named(tiny):
    b = encode(tiny, PROMPTS)
    mod = mlp_out_module(tiny.model, 0)

    def boom(v):
        raise KeyError("inside a keep function")

    with pytest.raises(KeyError):
        read(tiny, b.input_ids, b.attention_mask, {"x": Tap(mod, "output", keep=boom)})
    assert not mod._forward_hooks and not mod._forward_pre_hooks
    head = get_module(tiny.model, tiny.adapter.lm_head)  # not on the base model's path
    with pytest.raises(RuntimeError, match="never fired"):
        read(tiny, b.input_ids, b.attention_mask, {"head": Tap(head, "input")})
    assert not head._forward_pre_hooks
    with pytest.raises(ValueError, match="choose from"):
        Tap(mod, "inside")
    with pytest.raises(ValueError, match="out of range"):
        stream(tiny, tiny.n_blocks + 1)
    with pytest.raises(ValueError, match="at least one tap"):
        read(tiny, b.input_ids, b.attention_mask, {})
