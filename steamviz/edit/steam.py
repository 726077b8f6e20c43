"""STEAM-ROME: ROME's v* objective plus a latent-level alignment term (Jeong et al., 2025).

``L = L_NLL + L_KL + lam * L_LA`` with ``L_LA = mean_{l in S} (1 - cos(h^l, phi^l))``:
``h^l`` is the edited prompt's residual stream at the token that predicts the new object
(the rewrite prompts' last token, every context prompt), ``phi^l`` the new object's anchor
(:mod:`steamviz.look.anchors`), ``S`` a set of layers above the edited block.

>>> edit = apply(lm, request, lam=20.0)            # doctest: +SKIP
>>> edit.info["align"]                              # doctest: +SKIP
{'lam': 20.0, 'layers': [8, ..., 20], 'centered': False, 'anchor_facts': 11}

Measurement choice: residual streams of this model share a large common component, so raw
cosines sit near 1 (``docs/latent-geometry.md``). ``centered=True`` subtracts
the mean stream of the reference bank per layer before the cosine, in the loss as in the
metrics. The default is the paper's raw cosine; lam must then be in the tens for SmolLM2.
With ``lam = 0`` this is exactly ROME.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import rome
from ..look.anchors import Anchor, build_anchor, reference_bank
from .editors import register
from ..data.requests import EditRequest

DEFAULT_LAM = 20.0


def default_layers(lm, block: int) -> list[int]:
    """Mid stream layers above the edited block: ``block + 3 .. 2/3 of the depth`` (layer
    ``block + 1`` is the first the edit moves)."""
    top = max(block + 3, round(lm.n_blocks * 2 / 3))
    return list(range(min(block + 3, lm.n_blocks), min(top, lm.n_blocks) + 1))


@dataclass
class AlignLoss:
    """``mean_l mean_rows (1 - cos(h^l - c^l, phi^l - c^l))`` (c = 0 unless centred)."""

    lam: float
    layers: list[int]
    phi: torch.Tensor  # [len(layers), d]
    center: torch.Tensor | None = None  # [len(layers), d]

    def key(self) -> tuple:
        """What this term pulls toward, as a hashable value (target-vector caches)."""
        import hashlib

        h = hashlib.sha256(self.phi.detach().float().cpu().numpy().tobytes())
        if self.center is not None:
            h.update(b"center")
            h.update(self.center.detach().float().cpu().numpy().tobytes())
        return (float(self.lam), tuple(self.layers), h.hexdigest()[:16])

    def loss(self, streams: dict[int, torch.Tensor]) -> torch.Tensor:
        terms = []
        for j, layer in enumerate(self.layers):
            h = streams[layer]  # [rows, d]
            p = self.phi[j]
            if self.center is not None:
                h, p = h - self.center[j], p - self.center[j]
            terms.append(1 - torch.nn.functional.cosine_similarity(h, p[None], dim=-1).mean())
        return torch.stack(terms).mean()


def make_align(lm, anchor: Anchor, lam: float, layers, centered: bool = False,
               bank=None) -> AlignLoss:
    """The alignment term toward ``anchor``; ``centered`` subtracts ``bank``'s mean stream
    (default: the reference bank of the unedited model)."""
    layers = sorted(set(int(x) for x in layers))
    phi = anchor.phi[layers].to(lm.device)
    center = None
    if centered:
        bank = reference_bank(lm) if bank is None else bank
        center = bank.mean[layers].to(lm.device)
    return AlignLoss(lam=lam, layers=layers, phi=phi, center=center)


def apply(
    lm,
    request: EditRequest | dict,
    lam: float = DEFAULT_LAM,
    layers=None,
    centered: bool = False,
    anchor: Anchor | None = None,
    hparams: rome.ROMEHparams | None = None,
    anchor_kw: dict | None = None,
    early_stop_on: str = "rome",
    bank=None,
):
    """Edit with STEAM-ROME; returns an undoable :class:`~steamviz.edit.edits.WeightEdit`.

    ``anchor`` (default: built now for ``request.target_new``, leaving the edited subject
    out) and ``bank`` (for ``centered``) must come from the unedited model: build them
    before the first edit when edits are stacked. ``early_stop_on="rome"`` (default) stops
    on ROME's own terms (NLL + KL + decay), as ROME does, so the alignment term does not buy
    STEAM extra steps; ``"total"`` includes it. For a fixed, matched budget set
    ``hparams.early_stop_loss = 0`` (what sweeps do)."""
    if isinstance(request, dict):
        request = EditRequest.from_dict(request)
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or lam < 0:
        raise ValueError(f"lam must be a number >= 0 (0 is plain ROME), got {lam!r}")
    hp = hparams or rome.ROMEHparams.for_model(lm)
    layers = default_layers(lm, hp.block) if layers is None else list(layers)
    if anchor is None:
        anchor = build_anchor(lm, request.target_new, exclude_subjects=(request.subject,),
                              **(anchor_kw or {}))
    align = make_align(lm, anchor, lam, layers, centered, bank=bank)
    prep = rome.prepare(lm, request, hp)
    v, reused = rome.target_vector(lm, prep, hp, align, early_stop_on)
    return rome.write_update(
        lm, prep, v, method="STEAM-ROME",
        extra={"align": {"lam": lam, "layers": align.layers, "centered": centered,
                         "anchor_facts": anchor.n}, "v_reused": reused},
    )


@register("steam-rome", params=rome.ROMEHparams,
          extra=("lam", "layers", "centered", "anchor", "bank"), axes=("block", "lam"),
          base="rome", vstar=True)
def _steam(lm, request, lam: float = DEFAULT_LAM, block: int | None = None, layers=None,
           centered: bool = False, hparams=None, anchor=None, bank=None, **hp):
    hparams = hparams or rome.ROMEHparams.for_model(lm)
    if block is not None:
        hp["block"] = block
    if hp:
        hparams = hparams.replace(**hp)
    return apply(lm, request, lam=lam, layers=layers, centered=centered, hparams=hparams,
                 anchor=anchor, bank=bank)
