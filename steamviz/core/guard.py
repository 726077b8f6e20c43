"""Is an edit in place on the model? The count every :class:`~steamviz.edit.edits.Edit` keeps, and
the guard that reference builders (anchors, bank, recall checks, reference texts, key
statistics) call so they never read an edited model.

>>> from torch import nn
>>> active_edits(nn.Linear(2, 2))
0
"""

from __future__ import annotations

from torch import nn


def active_edits(model: nn.Module) -> int:
    """How many edits are in place on ``model`` now (caches of the unedited model, such as
    ROME's preparation and MEMIT's target vectors, are filled only while this is 0)."""
    return getattr(model, "_steamviz_active_edits", 0)


class EditedModelError(RuntimeError):
    """Something that must come from the unedited model was asked of an edited one."""


def require_unedited(model: nn.Module, what: str) -> None:
    """Raise :class:`EditedModelError` when an edit is in place on ``model``.

    References (anchors, the reference bank, recall checks, reference texts) describe the
    model's own knowledge: read from an edited model they would measure the edit against
    itself.
    """
    n = active_edits(model)
    if n:
        raise EditedModelError(
            f"{what} must be read from the unedited model, but {n} edit(s) are in place. "
            "Build references before the first edit (steamviz.measure.references.build_references, "
            "or build_anchor(...) and pass anchor=... to the editor), or restore the edits "
            "first.")
