"""Integration metrics: does an edited fact sit with the model's knowledge of its new object?

For the model as it is now (call before and after an edit):

- :func:`anchor_cosines`: per layer, cosine between a prompt's residual stream at the
  predicting (last) token and the new object's anchor phi^l -- raw, and centred on the
  reference bank's mean stream (raw cosines of this model sit near 1 whatever the
  object, ``docs/latent-geometry.md``; centring removes the shared component).
- :func:`knn_share` (the isolation score): among the k nearest neighbours (centred cosine)
  of the edited representation within the unedited model's representations of many
  reference facts, the share whose object is o*. Low = isolated, high = integrated.
- :func:`axis_position`: where the stream sits between the old object's anchor (0) and the
  new one's (1), centred.
- :func:`logit_lens`: each layer's stream through final norm and lm_head: rank and
  probability of the first token of o* and of o.

:func:`integration_rows` measures on held-out prompts (the paraphrases, which no editor
optimises) and, labelled ``*_trained``, on the rewrite prompt; each cosine comes with a
control (anchors of other objects from the same relations).

>>> rows = integration_rows(lm, request, anchor, bank, layers)   # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.arch import final_readout
from ..look.capture import capture
from ..core.forward import space
from ..core.tokens import token_ids


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def last_streams(lm, prompts) -> torch.Tensor:
    """``[prompt, layer, hidden]`` at the last token."""
    return capture(lm, list(prompts), positions=("last",)).get("last")


def anchor_cosines(h: torch.Tensor, phi: torch.Tensor, center: torch.Tensor) -> dict:
    """``h``: ``[prompt, layer, d]`` -> per-layer mean raw and centred cosine to ``phi``."""
    raw = _cos(h, phi[None]).mean(0)
    cen = _cos(h - center[None], (phi - center)[None]).mean(0)
    return dict(cos_raw=raw.cpu().numpy(), cos_centered=cen.cpu().numpy())


def knn_share(h: torch.Tensor, bank, obj: str, layers, k: int = 10) -> np.ndarray:
    """Per layer in ``layers``: share of the ``k`` nearest bank facts (centred cosine) whose
    object is ``obj``, averaged over prompts. ``h``: ``[prompt, layer, d]``."""
    objs = np.array(bank.objects)
    mean = bank.mean
    out = []
    for layer in layers:
        B = bank.tensor[:, layer] - mean[layer]
        q = h[:, layer] - mean[layer]
        sims = _cos(q[:, None, :], B[None, :, :])  # [prompt, fact]
        top = sims.topk(min(k, B.shape[0]), dim=-1).indices.cpu().numpy()
        out.append(float((objs[top] == obj).mean()))
    return np.array(out)


def axis_position(h: torch.Tensor, new: torch.Tensor, old: torch.Tensor, center: torch.Tensor
                  ) -> np.ndarray:
    """Per layer: projection of ``h`` on the old->new anchor axis (0 = old, 1 = new)."""
    a, b = old - center, new - center
    x = h - center[None]
    d = b - a
    t = ((x - a[None]) * d[None]).sum(-1) / (d * d).sum(-1).clamp_min(1e-12)[None]
    return t.mean(0).cpu().numpy()


@torch.no_grad()
def logit_lens(lm, prompt: str, targets: dict[str, str]) -> list[dict]:
    """Per layer: rank and probability of the first token of each target (name -> text)."""
    h = last_streams(lm, [prompt])[0]  # [layer, d]
    probs = final_readout(lm.model, h).float().softmax(-1)  # [layer, vocab]
    rows = []
    for name, text in targets.items():
        tid = token_ids(lm, space(text))[0]
        p = probs[:, tid]
        rank = (probs > p[:, None]).sum(-1)
        for layer in range(probs.shape[0]):
            rows.append(dict(layer=layer, target=name, token=text, prob=float(p[layer]),
                             rank=int(rank[layer])))
    return rows


def _summaries(h, request, anchor, bank, layers, old_anchor, k, controls) -> dict:
    """Per-layer arrays and means over ``layers`` for the streams ``h`` [prompt, layer, d]."""
    center = bank.mean.to(h.device)
    cos = anchor_cosines(h, anchor.phi.to(h.device), center)
    share = knn_share(h, bank, request.target_new, layers, k)
    out = dict(
        cos_raw_layers=cos["cos_raw"], cos_centered_layers=cos["cos_centered"],
        cos_raw=float(cos["cos_raw"][layers].mean()),
        cos_centered=float(cos["cos_centered"][layers].mean()),
        knn_share=float(share.mean()), knn_share_layers=share,
    )
    if controls:
        ctl = [anchor_cosines(h, c.phi.to(h.device), center) for c in controls]
        for name in ("cos_raw", "cos_centered"):
            per_layer = np.mean([c[name] for c in ctl], axis=0)
            out[f"{name}_control_layers"] = per_layer
            out[f"{name}_control"] = float(per_layer[layers].mean())
    if old_anchor is not None:
        ax = axis_position(h, anchor.phi.to(h.device), old_anchor.phi.to(h.device), center)
        out["axis_layers"] = ax
        out["axis"] = float(ax[layers].mean())
    return out


def integration_rows(lm, request, anchor, bank, layers, old_anchor=None, k: int = 10,
                     prompts=None, controls=()) -> dict:
    """Integration of ``request`` on the model as it is now, on two prompt sets:

    - **held out** (the plain column names): the paraphrase prompts, which no editor
      optimises (or ``prompts``). These are the evidence of integration.
    - **trained** (``*_trained`` columns): the rewrite prompt, which the editor optimised --
      and which STEAM's alignment term pulls toward the anchor, so a high cosine there is
      partly the loss itself.

    Each set gets per-layer arrays (``*_layers``, all layers) and means over ``layers``: the
    raw and centred cosine to the anchor, the kNN share and (with ``old_anchor``) the
    old->new axis position. ``controls``: anchors of other objects built from the same
    relations; ``cos_*_control`` is the mean cosine to them, measured the same way. A layer
    where the control is as high as the anchor says nothing about this object.
    Held-out columns are absent when the request has no paraphrases (``held_out_prompts``
    says how many there were).
    """
    held = list(prompts) if prompts is not None else list(request.paraphrase_prompts)
    h = last_streams(lm, [request.rewrite_prompt] + held)
    layers = list(layers)
    out = {f"{name}_trained": v for name, v in _summaries(
        h[:1], request, anchor, bank, layers, old_anchor, k, controls).items()}
    out["held_out_prompts"] = len(held)
    if held:
        out.update(_summaries(h[1:], request, anchor, bank, layers, old_anchor, k, controls))
    return out
