"""Edits undo exactly in any order: the model ends bit for bit where it started, and after
any restore it equals the model with only the remaining edits applied."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steamviz import memit, rome
from steamviz.edit.edits import WeightEdit
from steamviz.core.guard import active_edits
from steamviz.data.requests import EditRequest
from steamviz.edit.rome import ROMEHparams


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from conftest import build_tiny

    return build_tiny("llama", tokenizer)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# an op: (kind, parameter choice, seed); kinds: dense add, row add, set entries, restore
OPS = st.lists(st.tuples(st.sampled_from(["add", "row", "set", "restore", "restore"]),
                         st.integers(0, 3), st.integers(0, 10_000)), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_any_order_of_apply_and_restore_is_exact(tiny_llama, ops):
    model = tiny_llama.model
    names = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight",
             "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    params = dict(model.named_parameters())
    start = _state(model)
    active: list[tuple[WeightEdit, list]] = []  # edit, its recorded ops (to replay)
    try:
        for kind, which, seed in ops:
            g = torch.Generator().manual_seed(seed)
            if kind == "restore":
                if not active:
                    continue
                e, _ = active.pop(seed % len(active))
                e.restore()
                # expected: the start with the remaining edits' ops replayed in order
                expect = {k: v.clone() for k, v in start.items()}
                for _, rec in active:
                    for name, fn in rec:
                        fn(expect[name])
                assert _same(_state(model), expect)
                continue
            name = names[which]
            p = params[name]
            e = WeightEdit(model, "probe")
            if kind == "add":
                d = torch.randn(p.shape, generator=g) * 1e-2
                e.add_delta(name, d)
                rec = [(name, lambda t, d=d: t.add_(d.to(t.dtype)))]
            elif kind == "row":
                i = seed % p.shape[0]
                d = torch.randn(p.shape[1:], generator=g) * 1e-2 if p.dim() > 1 else \
                    torch.randn((), generator=g) * 1e-2
                e.add_delta(name, d, index=i)

                def fn(t, d=d, i=i):
                    t[i] += d.to(t.dtype)
                rec = [(name, fn)]
            else:
                idx = torch.randperm(p.numel(), generator=g)[:5]
                vals = torch.randn(5, generator=g)
                e.set_flat(name, idx, vals)

                def fn(t, idx=idx, vals=vals):
                    t.view(-1)[idx] = vals.to(t.dtype)
                rec = [(name, fn)]
            active.append((e, rec))
    finally:
        for e, _ in reversed(active):
            e.restore()
    assert _same(_state(model), start)
    assert active_edits(model) == 0 and not getattr(model, "_steamviz_weight_stack", {})


REQ_A = EditRequest(prompt="The capital city of {} is", subject="France", target_new="Rome",
                    target_true="Paris")
REQ_B = EditRequest(prompt="The capital city of {} is", subject="Spain", target_new="Oslo",
                    target_true="Madrid")
FAST = dict(context_template_length_params=((5, 2),), v_num_grad_steps=3)


def test_rome_edits_restored_out_of_order(tiny_llama, tmp_path):
    """The defect: a.restore() then b.restore() used to leave A's edit in the weights."""
    model = tiny_llama.model
    start = _state(model)
    hp = ROMEHparams(block=1, **FAST)
    a = rome.apply(tiny_llama, REQ_A, hp)
    b = rome.apply(tiny_llama, REQ_B, hp)
    b.save(tmp_path / "b.safetensors")
    a.restore()
    only_b = _state(model)
    b.restore()
    assert _same(_state(model), start)
    from steamviz.edit.edits import load_edit

    delta = load_edit(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="made on other weights"):  # B was made on A's model
        delta.apply(model)
    with delta.apply(model, force=True):
        assert _same(_state(model), only_b)  # after A's restore: exactly B alone
    assert _same(_state(model), start)


def test_memit_and_rome_interleaved(tiny_llama):
    model = tiny_llama.model
    start = _state(model)
    hp = ROMEHparams(block=2, **FAST)
    mhp = memit.MEMITHparams.for_model(tiny_llama).replace(blocks=(1, 2), **FAST)
    a = rome.apply(tiny_llama, REQ_A, hp)
    m = memit.apply(tiny_llama, [REQ_B], mhp)  # both touch block 2's down_proj
    c = rome.apply(tiny_llama, REQ_B, hp.replace(block=1))
    m.restore()
    a.restore()
    c.restore()
    assert _same(_state(model), start)


def test_a_saved_delta_knows_its_model_and_is_not_applied_twice(tiny_llama, tokenizer,
                                                                 tmp_path):
    from conftest import build_tiny

    from steamviz.edit.edits import load_edit

    model = tiny_llama.model
    start = _state(model)
    with rome.apply(tiny_llama, REQ_A, ROMEHparams(block=1, **FAST)) as e:
        e.save(tmp_path / "a.safetensors")
        edited = _state(model)
    d = load_edit(tmp_path / "a.safetensors")
    prov = d.info["provenance"]
    assert prov["model_type"] == "llama" and prov["steamviz"] and prov["weights"]
    with d.apply(tiny_llama) as again:  # an LM or its module
        assert _same(_state(model), edited)
        with pytest.raises(ValueError, match="already applied"):
            d.apply(model, force=True)
    assert _same(_state(model), start) and not again.active
    other = build_tiny("llama", tokenizer, seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="made on other weights.*force=True"):
        d.apply(other)
    d.apply(other, force=True).restore()
