"""One base for the editors' hyperparameter dataclasses (ROME, MEMIT, SAKE, BaFT, KNE).

A subclass is a ``@dataclass`` of fields with defaults; the base gives it ``replace``
(``dataclasses.replace`` that names an unknown field), ``to_dict``, ``from_dict`` /
``from_yaml`` and the ``for_model`` hook (per-model defaults; here the class's defaults).

>>> ROMEHparams().replace(layr=3)                       # doctest: +SKIP
TypeError: unknown ROME parameter 'layr'; fields of ROMEHparams: ['layer', ...]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

H = TypeVar("H", bound="Hparams")


def unknown_field(cls: type, name: str, label: str) -> str | None:
    """The message for a parameter ``name`` that the dataclass ``cls`` has no field for
    (None when it has one); ``label`` names the editor ("ROME")."""
    fields = [f.name for f in dataclasses.fields(cls)]
    if name in fields:
        return None
    return f"unknown {label} parameter {name!r}; fields of {cls.__name__}: {fields}"


class Hparams:
    """Base of a hyperparameter ``@dataclass``; its label in messages is the class name
    without ``Hparams`` ("BaFT")."""

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
        """From a mapping of field values (ROME and MEMIT read EasyEdit's keys instead)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: hparams must be a mapping, got {type(d).__name__}")
        return cls().replace(**d)

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
