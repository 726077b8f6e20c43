"""Capture on the real default model (SmolLM2-135M)."""

import numpy as np
import pytest
import torch

from steamviz.core.arch import final_readout, get_module
from steamviz.look.capture import capture
from steamviz.core.forward import greedy
from steamviz.core.tokens import encode, fill, subject_span, token_ids

pytestmark = pytest.mark.model


def test_default_model_knows_paris(lm):
    assert lm.n_blocks == 30 and lm.d_model == 576
    assert greedy(lm, ["The capital of France is"], max_new_tokens=3)[0].startswith(" Paris")


@torch.no_grad()
def test_capture_matches_hidden_states_and_logits(lm):
    prompts = ["The capital of France is", "Toronto is located in the country of"]
    cap = capture(lm, prompts, positions=("last", "subject_last"), subjects=["France", "Toronto"])
    b = encode(lm, prompts)
    out = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                   output_hidden_states=True)
    norm = get_module(lm.model, lm.adapter.final_norm)
    for layer in range(31):
        ref = out.hidden_states[layer][torch.arange(2)[:, None], cap.token_index]
        got = cap.tensor[:, layer]
        if layer == 30:
            got = norm(got)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    logits = final_readout(lm.model, cap.get("last", 30))
    torch.testing.assert_close(logits, out.logits[torch.arange(2), b.last], rtol=1e-5, atol=1e-3)


def test_batched_equals_single_and_padding_safe(lm):
    prompts = ["Paris", "The official language of Brazil is", "Rome is the capital of"]
    subjects = ["Paris", "Brazil", "Rome"]
    both = capture(lm, prompts, positions=("last", "subject_last"), subjects=subjects,
                   batch_size=3)
    for i in range(3):
        one = capture(lm, prompts[i], positions=("last", "subject_last"), subjects=subjects[i])
        scale = one.tensor.abs().max()
        assert (one.tensor[0] - both.tensor[i]).abs().max() / scale < 1e-5


def test_subject_positions_are_tokenizer_aware(lm):
    p = "The Eiffel Tower is in the city of"
    first, last = subject_span(lm, p, "Eiffel Tower")
    ids = encode(lm, [p]).input_ids[0]
    assert lm.tok.decode(ids[first : last + 1]).strip() == "Eiffel Tower"
    with pytest.raises(ValueError, match="'Louvre' does not occur in prompt"):
        subject_span(lm, p, "Louvre")


def test_layer_subset_frame_and_numpy(lm):
    cap = capture(lm, ["The capital of Japan is"], layers=[0, 5, 30],
                  positions=("last", "subject_last"), subjects=["Japan"])
    assert cap.tensor.shape == (1, 3, 2, 576)
    full = capture(lm, ["The capital of Japan is"], positions=("last", "subject_last"),
                   subjects=["Japan"])
    torch.testing.assert_close(cap.tensor[0, 1], full.tensor[0, 5])
    df = cap.frame()
    assert len(df) == 6 and set(df.position) == {"last", "subject_last"}
    assert isinstance(cap.numpy(), np.ndarray) and df.hidden.iloc[0].shape == (576,)


def test_hooks_removed_on_error_and_model_reusable(lm):
    blocks = get_module(lm.model, lm.adapter.blocks)

    def counts():
        return [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks]

    before = counts()

    def boom(m, a):
        raise RuntimeError("mid-forward failure")

    h = blocks[10].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="mid-forward"):
            capture(lm, ["The capital of Japan is"], layers=[5, 20])
    finally:
        h.remove()
    assert counts() == before
    with pytest.raises(ValueError):
        capture(lm, ["The capital of Japan is"], positions=("subject_last",), subjects=["Spain"])
    assert counts() == before
    ok = capture(lm, ["The capital of Japan is"], layers=[5, 20])
    assert torch.isfinite(ok.tensor).all()
    with pytest.raises(ValueError, match="out of range"):
        capture(lm, ["x"], layers=[31])


def test_subject_located_from_the_slot_not_the_first_mention(lm):
    """Issue 18.4: text before the slot names the subject; ``subject_starts`` (the slot's
    offset, from :func:`fill`) puts ``subject_*`` at the slot's tokens."""
    text, at = fill("Toronto is big. {} is located in the country of", "Toronto")
    assert at == 16
    n0 = len(lm.prefix_ids)
    first = n0 + len(token_ids(lm, text[:at].rstrip()))  # " Toronto" takes the space
    last = n0 + len(token_ids(lm, text[: at + len("Toronto")])) - 1
    mention = n0 + len(token_ids(lm, "Toronto")) - 1  # the first mention's last token
    assert mention < first
    pos = ("subject_first", "subject_last", "last")
    cap = capture(lm, [text, "The capital of France is"], positions=pos, layers=[3],
                  subjects=["Toronto", "France"], subject_starts=[at, None])
    assert cap.token_index[0].tolist() == [first, last, len(encode(lm, [text]).input_ids[0]) - 1]
    # None: the search fallback (the only option for a prompt written without a template)
    assert cap.token_index[1, 1] == subject_span(lm, "The capital of France is", "France")[1]
    searched = capture(lm, [text], positions=("subject_last",), layers=[3], subjects=["Toronto"])
    assert int(searched.token_index[0, 0]) == mention  # what the old code read
    h = lm.model(input_ids=encode(lm, [text]).input_ids, output_hidden_states=True
                 ).hidden_states[3][0]
    torch.testing.assert_close(cap.get("subject_last", 3)[0], h[last], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="not at offset"):
        capture(lm, [text], positions=("subject_last",), subjects=["Toronto"], subject_starts=[3])
    with pytest.raises(ValueError, match="subject_starts"):
        capture(lm, [text], positions=("subject_last",), subjects=["Toronto"],
                subject_starts=[at, at])
