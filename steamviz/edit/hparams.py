"""One base for the editors' hyperparameter dataclasses (ROME, MEMIT, SAKE, BaFT, KNE).

A subclass is a ``@dataclass`` of fields with defaults; the base gives it ``replace``
(``dataclasses.replace`` that names an unknown field), ``to_dict``, ``from_dict`` /
``from_yaml`` and the ``for_model`` hook (per-model defaults; here the class's defaults).

>>> ROMEHparams().replace(blok=3)                       # doctest: +SKIP
TypeError: unknown ROME parameter 'blok'; fields of ROMEHparams: ['block', ...]

Vocabulary: ``block`` / ``blocks`` are decoder-block indices (``0 .. n_blocks - 1``: where an
edit goes); ``layer`` / ``layers`` are residual-stream indices (``0 .. n_blocks``, capture's
numbering: layer ``l`` leaves block ``l - 1``). A field renamed to follow it is listed in the
class's ``RENAMED``: mappings (YAML files, stored configs) by the old name are still read, and a
keyword argument by the old name is an error naming the new one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, TypeVar

H = TypeVar("H", bound="Hparams")


def unknown_field(cls: type, name: str, label: str) -> str | None:
    """The message for a parameter ``name`` that the dataclass ``cls`` has no field for
    (None when it has one); ``label`` names the editor ("ROME")."""
    fields = [f.name for f in dataclasses.fields(cls)]
    if name in fields:
        return None
    new = getattr(cls, "RENAMED", {}).get(name)
    if new:
        return (f"unknown {label} parameter {name!r}: it is {new!r} now ({BLOCK_VS_LAYER}); "
                f"fields of {cls.__name__}: {fields}")
    return f"unknown {label} parameter {name!r}; fields of {cls.__name__}: {fields}"


#: the vocabulary, in one line for messages
BLOCK_VS_LAYER = ("'block'/'blocks' are decoder-block indices, 'layer'/'layers' residual-stream "
                  "indices")


def renamed(cls: type, d: dict) -> dict:
    """``d`` with the old names of ``cls``'s renamed fields (its ``RENAMED``) replaced by the
    new ones: how stored mappings written before a rename are read."""
    old = getattr(cls, "RENAMED", {})
    return {old.get(k, k) if old.get(k) not in d else k: v for k, v in d.items()}


class Hparams:
    """Base of a hyperparameter ``@dataclass``; its label in messages is the class name
    without ``Hparams`` ("BaFT"). ``RENAMED``: old field name -> new one (see the module
    docstring)."""

    RENAMED: ClassVar[dict] = {}

    def replace(self: H, **kw) -> H:
        """A copy with ``kw`` changed (``dataclasses.replace``: ``__post_init__`` checks the
        values again); an unknown field is a TypeError naming the fields."""
        label = type(self).__name__.removesuffix("Hparams")
        for k in kw:
            why = unknown_field(type(self), k, label)
            if why:
                raise TypeError(why)
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def for_model(cls: type[H], lm_or_name: Any) -> H:
        """Defaults for a model (an LM or its name); a subclass with per-model defaults
        overrides this."""
        return cls()

    @classmethod
    def from_dict(cls: type[H], d: dict, source: str = "hparams") -> H:
        """From a mapping of field values, old names of renamed fields included (ROME and
        MEMIT read EasyEdit's keys instead)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: hparams must be a mapping, got {type(d).__name__}")
        return cls().replace(**renamed(cls, d))

    @classmethod
    def from_yaml(cls: type[H], path, **kw) -> H:
        """Read a YAML mapping of hyperparameters through the class's ``from_dict(d,
        source=path, **kw)``."""
        import yaml

        return cls.from_dict(yaml.safe_load(Path(path).read_text()), source=str(path), **kw)

    @staticmethod
    def model_name(lm_or_name: Any) -> Any:
        """The name an LM is known by (a name stays itself): the key of a per-model table."""
        return getattr(lm_or_name, "name", lm_or_name)


@dataclasses.dataclass
class VStarHparams(Hparams):
    """The target-vector (v*) optimisation ROME and MEMIT share (names as in their YAML
    files): ``v_num_grad_steps`` Adam steps at ``v_lr`` on the NLL of the new object over the
    context prompts (``context_template_length_params``: ``(length, n)`` pairs), plus
    ``kl_factor`` x the KL term, a ``v_weight_decay`` term and a norm clamp at
    ``clamp_norm_factor`` x the original value's norm; stops early below ``early_stop_loss``.
    ``seed`` seeds the context prompts. :class:`~steamviz.edit.rome.ROMEHparams` and
    :class:`~steamviz.edit.memit.MEMITHparams` add where the edit goes and its statistics.

    >>> VStarHparams(v_num_grad_steps=0)
    Traceback (most recent call last):
    ...
    ValueError: v_num_grad_steps must be >= 1 and v_lr > 0
    """

    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    context_template_length_params: tuple = ((5, 10), (10, 10))  # ROME's
    seed: int = 0

    def __post_init__(self) -> None:
        self.context_template_length_params = tuple(
            tuple(int(v) for v in x) for x in self.context_template_length_params)
        if self.v_num_grad_steps < 1 or self.v_lr <= 0:
            raise ValueError("v_num_grad_steps must be >= 1 and v_lr > 0")

    def vstar(self) -> dict:
        """The v* fields and their values: one editor's objective handed to another."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(VStarHparams)}
