"""A toy editor, written as a user would add one: this module and one registry entry.

``toy-nudge`` adds to the edited block's MLP output projection the rank-one update that
writes ``scale`` x the new object's (unit) unembedding direction wherever the subject's key
appears -- a one-line caricature of ROME with no optimisation. It declares the ``block``
grid axis, so a sweep gives it the edited block; its label and colour go to every figure.
Imported by tests/test_sweep.py (issue #19: adding an editor touches one place).
"""

import torch

from steamviz.core.arch import mlp_out_module
from steamviz.edit.editors import register
from steamviz.edit.edits import WeightEdit
from steamviz.edit.rome import keys_and_outputs
from steamviz.core.tokens import token_ids

NAME, LABEL, COLOR = "toy-nudge", "Toy nudge", "#117733"


@register(NAME, label=LABEL, color=COLOR, axes=("block",))
def nudge(lm, request, block: int | None = None, hparams=None, scale: float = 8.0) -> WeightEdit:
    block = hparams.block if block is None else block
    k, _ = keys_and_outputs(lm, block, [request.rewrite_prompt], [request.subject])
    k = k[0].float()
    u = lm.model.get_output_embeddings().weight[token_ids(lm, " " + request.target_new)[0]]
    u = u.float() / u.float().norm()
    W = mlp_out_module(lm.model, block).weight  # [d_model, d_ff]: W @ k' adds u * (k . k')
    edit = WeightEdit(lm.model, NAME, info=dict(request=request.to_dict(), block=block))
    name = lm.adapter.mlp_out.format(block) + ".weight"
    edit.add_delta(name, (scale * torch.outer(u, k / k.dot(k))).to(W.dtype))
    return edit
