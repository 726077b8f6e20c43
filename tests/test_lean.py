"""The lean forward (steamviz.core.lean) stands in for the model's modules in the v* loop: same
result as the modules, used only where it applies, bfloat16 products only on request."""

import pytest
import torch

from steamviz import lean, rome
from steamviz.data.requests import EditRequest
from steamviz.edit.rome import ROMEHparams
from steamviz.edit.steam import AlignLoss

REQ = EditRequest(prompt="The capital city of {} is", subject="France", target_new="Rome",
                  target_true="Paris")
FAST = dict(context_template_length_params=((5, 3), (10, 2)), v_num_grad_steps=4)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma3_text"])
def tiny_llama(request, tokenizer):
    from conftest import build_tiny

    return build_tiny(request.param, tokenizer)


def _align(lm, layers):
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(lm.n_blocks + 1, lm.d_model, generator=g)[layers]
    return AlignLoss(lam=2.0, layers=layers, phi=phi)


def test_lean_equals_modules(tiny_llama):
    assert lean.unsupported(tiny_llama.model, 1) is None
    hp = ROMEHparams(block=1, **FAST)
    prep = rome.prepare(tiny_llama, REQ, hp, use_cache=False)
    a = rome.compute_v(tiny_llama, prep, hp, lean=True)
    b = rome.compute_v(tiny_llama, prep, hp, lean=False)
    torch.testing.assert_close(a.delta, b.delta, rtol=1e-3, atol=1e-4)
    # with STEAM's alignment term, which reads streams between the blocks
    al = _align(tiny_llama, [2, 3, 4])
    a = rome.compute_v(tiny_llama, prep, hp, align=al, lean=True)
    b = rome.compute_v(tiny_llama, prep, hp, align=al, lean=False)
    assert [round(x["align"], 5) for x in a.losses] == [round(x["align"], 5) for x in b.losses]
    torch.testing.assert_close(a.delta, b.delta, rtol=1e-3, atol=1e-4)


def test_bfloat16_products_stay_close(tiny_llama):
    hp = ROMEHparams(block=1, **FAST)
    prep = rome.prepare(tiny_llama, REQ, hp, use_cache=False)
    a = rome.compute_v(tiny_llama, prep, hp)
    b = rome.compute_v(tiny_llama, prep, hp.replace(v_matmul_dtype="bfloat16"))
    assert b.delta.dtype == a.delta.dtype
    assert not torch.equal(a.delta, b.delta)  # the products did run in bfloat16
    assert torch.cosine_similarity(a.delta, b.delta, 0) > 0.99


def test_hooks_or_other_architectures_use_the_modules(tiny_llama, tokenizer):
    from conftest import build_tiny

    hp = ROMEHparams(block=1, **FAST)
    prep = rome.prepare(tiny_llama, REQ, hp, use_cache=False)
    blocks = tiny_llama.model.model.layers
    # an added constant, not a scale: Gemma 3 normalises the MLP's output (its post-feedforward
    # norm), which would undo a scale and leave the hooked result equal to the plain one
    h = blocks[2].mlp.register_forward_hook(lambda m, a, o: o + 1.0)
    try:
        assert "hook" in lean.unsupported(tiny_llama.model, 1)
        with pytest.raises(ValueError, match="hook"):
            rome.compute_v(tiny_llama, prep, hp, lean=True)
        with pytest.raises(ValueError, match="v_matmul_dtype"):
            rome.compute_v(tiny_llama, prep, hp.replace(v_matmul_dtype="bfloat16"))
        hooked = rome.compute_v(tiny_llama, prep, hp)  # falls back, and honours the hook
    finally:
        h.remove()
    plain = rome.compute_v(tiny_llama, prep, hp)
    assert hooked.losses[-1]["loss"] != pytest.approx(plain.losses[-1]["loss"], rel=1e-3)
    gpt2 = build_tiny("gpt2", tokenizer)
    assert "model_type" in lean.unsupported(gpt2.model, 1)
    with pytest.raises(ValueError, match="null"):
        ROMEHparams(v_matmul_dtype="int8")
