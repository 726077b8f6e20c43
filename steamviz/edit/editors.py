"""One interface over every editor: ``edit(lm, request, method, **params) -> Edit``.

>>> e = edit(lm, request, "rome")                       # doctest: +SKIP
>>> e = edit(lm, request, "steam-rome", lam=20.0)       # doctest: +SKIP
>>> e.restore()                                         # doctest: +SKIP

Each method takes the request plus keyword parameters and returns an undoable
:class:`~steamviz.edit.edits.Edit`. ``register`` adds a method. Batch editors (MEMIT) also take
many requests at once through :func:`edit_batch`:

>>> e = edit_batch(lm, requests, "memit")                # one Edit for all   # doctest: +SKIP

Built in: ``rome``, ``steam-rome``, ``memit``, ``steam-memit``, ``sake``, ``baft``, ``kne``.

How figures and panels show a method -- its label and colour -- is the method's row of
:data:`DISPLAY` (one row per method; ``register(..., label=, color=)`` adds or changes one):

>>> display("steam-rome")
Display(label='STEAM-ROME', color='#0072B2', short='STEAM')

Everything the registry knows of a method -- batch or not, hyperparameter class, the grid
axes a sweep gives it (``register(..., axes=("block", "lam"))``) and its display row -- is
its :func:`spec`:

>>> spec("steam-memit").axes                             # doctest: +SKIP
('block', 'lam', 'batch')
"""

from __future__ import annotations

import dataclasses
import math

from typing import Callable

from .edits import Edit
from .hparams import unknown_field
from ..data.requests import EditRequest

BUILTIN_MODULES = ("memit", "steam", "sake", "baft", "kne")


@dataclasses.dataclass(frozen=True)
class Display:
    """How figures and panels show a method: ``label`` (legends), ``color`` (one per method)
    and ``short`` (the label before a lambda: "STEAM λ=50")."""

    label: str
    color: str
    short: str = ""

    def __post_init__(self):
        if not self.short:
            object.__setattr__(self, "short", self.label)


#: method -> its display row. Colours: the Okabe-Ito palette (Okabe & Ito 2008), which
#: readers with any common colour-vision deficiency tell apart; the unedited model is grey.
#: STEAM variants are blues (STEAM-ROME blue, STEAM-MEMIT sky blue); figures draw a STEAM
#: method's lambda values as shades of its colour (:func:`steamviz.show.figures.color`).
DISPLAY: dict[str, Display] = {
    "unedited": Display("unedited", "#999999"),
    "rome": Display("ROME", "#D55E00"),               # vermillion
    "steam-rome": Display("STEAM-ROME", "#0072B2", "STEAM"),  # blue
    "memit": Display("MEMIT", "#E69F00"),             # orange
    "steam-memit": Display("STEAM-MEMIT", "#56B4E9"),  # sky blue
    "sake": Display("SAKE", "#009E73"),               # bluish green
    "baft": Display("BaFT", "#CC79A7"),               # reddish purple
    "kne": Display("KNE", "#000000"),                 # black
}
#: colours for methods registered without one (Paul Tol's "muted" scheme, also safe)
_SPARE_COLORS = ("#332288", "#117733", "#44AA99", "#882255", "#AA4499", "#999933")


def display(method: str) -> Display:
    """The display row of ``method`` (a method without a row gets its name as label and a
    colour no row uses)."""
    key = str(method).lower()
    if key in DISPLAY:
        return DISPLAY[key]
    used = {d.color.lower() for d in DISPLAY.values()}
    free = [c for c in _SPARE_COLORS if c.lower() not in used] or list(_SPARE_COLORS)
    return Display(str(method), free[sum(map(ord, key)) % len(free)])


def is_nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or str(v) in ("nan", "None")


def label(method: str, lam=None, centered=None) -> str:
    """A method's legend label: its registry label, or for a lambda of a STEAM method its
    short label and the value ("STEAM λ=50", "STEAM λ=50 centred")."""
    d = display(method)
    if is_nan(lam) or str(method).lower() not in methods() or "lam" not in spec(method).axes:
        return d.label
    c = " centred" if centered in (True, "True") else ""
    return f"{d.short} λ={float(lam):g}{c}"


def method_key(method, lam, centered) -> tuple:
    return (str(method), None if is_nan(lam) else float(lam), str(centered in (True, "True")))


def ordered_points(points) -> list:
    """Grid points in reading order: methods in registry order (the unedited model first),
    then lambda ascending."""
    rank = {m: i for i, m in enumerate(DISPLAY)}

    def key(p):
        m, lam, cen = method_key(*p[:3])
        return (rank.get(m, len(rank)), m, lam if lam is not None else -1.0, cen)

    return sorted(points, key=key)


#: the grid axes a sweep can give a method: the edited block (``block``), the alignment
#: strength with its alignment layers and centring (``lam``), the requests edited at once
#: (``batch``; batch editors only)
AXES = ("block", "lam", "batch")


@dataclasses.dataclass(frozen=True)
class Editor:
    """Everything the registry knows of a method: its row of :data:`REGISTRY` (:func:`spec`).

    ``fn(lm, request, **params) -> Edit`` edits one request (:func:`edit`); ``batch_fn(lm,
    requests, **params) -> Edit`` many at once (:func:`edit_batch`); either may be None.
    ``params``: the hyperparameter dataclass (its fields are the keyword parameters
    :func:`check_params` accepts), ``extra``: the other keyword arguments it takes, ``axes``:
    its sweep grid axes in the order of :data:`AXES` (none: one point per request)."""

    name: str
    fn: Callable[..., Edit] | None = None
    batch_fn: Callable[..., Edit] | None = None
    params: type | None = None
    extra: tuple[str, ...] = ()
    axes: tuple[str, ...] = ()
    #: the method this one adds STEAM's alignment to (steam-rome: rome): figures, panels and
    #: paired tables compare it against that one
    base: str | None = None
    #: its edit is ROME's rank-one update of a target vector v* (:func:`steamviz.edit.rome.collect`
    #: sees it): a sweep optimises every v* of one request's grid together
    vstar: bool = False

    @property
    def batch(self) -> bool:
        """Whether it takes many requests at once (:func:`edit_batch`)."""
        return self.batch_fn is not None

    @property
    def display(self) -> Display:
        return display(self.name)


#: method -> its row: one row per editor, written by :func:`register`
REGISTRY: dict[str, Editor] = {}


def methods(batch: bool | None = None) -> list[str]:
    """The registered methods, sorted: all (``batch=None``), those that edit one request at a
    time (``False``) or the batch editors (``True``)."""
    load_builtin()
    return sorted(k for k, e in REGISTRY.items()
                  if batch is None or (e.batch if batch else e.fn is not None))


def spec(method: str) -> Editor:
    """The registry's row of ``method``; a ValueError for a method nobody registered."""
    key = str(method).lower()
    if key not in REGISTRY:
        load_builtin()
    if key not in REGISTRY:
        raise ValueError(f"unknown editing method {method!r}; choose from {methods()}")
    return REGISTRY[key]


def aligned(names) -> tuple[str, str | None] | None:
    """The first method among ``names`` (e.g. a run's), in reading order, with an
    alignment-strength axis (``lam``: STEAM's), and the method it extends (its row's
    ``base``); None when there is none. Names nobody registered are left out.

    >>> aligned(["unedited", "rome", "steam-rome", "mine"])
    ('steam-rome', 'rome')
    """
    found = {str(m).lower() for m in names} & set(methods())
    ordered = [m for m, *_ in ordered_points([(m, None, None) for m in found
                                              if "lam" in spec(m).axes])]
    return (ordered[0], spec(ordered[0]).base) if ordered else None


#: parameters that name decoder blocks (``0 .. n_blocks - 1``) and residual-stream layers
#: (``0 .. n_blocks``: STEAM's alignment layers, SAKE's gates), checked against the model's
#: depth
BLOCK_FIELDS = ("block", "blocks")
LAYER_FIELDS = ("layers", "subject_layer", "query_layer")


def register(name: str, batch: bool = False, params: type | None = None, extra: tuple = (),
             label: str | None = None, color: str | None = None, axes: tuple | None = None,
             base: str | None = None, vstar: bool | None = None):
    """Decorator: register ``fn(lm, request, **params) -> Edit`` under ``name``; with
    ``batch=True``, ``fn(lm, requests, **params) -> Edit`` for :func:`edit_batch`.
    Registering the other kind under the same name adds it to the same :class:`Editor` row.
    ``params``: the method's hyperparameter dataclass (its fields are the keyword
    parameters :func:`check_params` accepts), ``extra``: other keyword arguments.
    ``label``/``color``: the method's :data:`DISPLAY` row (kept when not given).
    ``axes``: the method's sweep grid axes, a subset of :data:`AXES` (kept when not given).
    ``base``, ``vstar``: see :class:`Editor` (kept when not given)."""
    key = name.lower()
    row = REGISTRY.get(key, Editor(key))
    if axes is not None:
        bad = [a for a in axes if a not in AXES]
        if bad:
            raise ValueError(f"{name}: unknown grid axes {bad}; choose from {list(AXES)}")
        if "batch" in axes and not (batch or row.batch):
            raise ValueError(f"{name}: only a batch editor (batch=True) has a 'batch' axis")

    def deco(fn):
        now = REGISTRY.get(key, Editor(key))  # as it is when fn is registered, not before
        new = dataclasses.replace(now, **({"batch_fn": fn} if batch else {"fn": fn}))
        if params is not None:
            new = dataclasses.replace(new, params=params, extra=tuple(extra))
        if axes is not None:
            new = dataclasses.replace(new, axes=tuple(a for a in AXES if a in axes))
        if base is not None:
            new = dataclasses.replace(new, base=base.lower())
        if vstar is not None:
            new = dataclasses.replace(new, vstar=bool(vstar))
        REGISTRY[key] = new
        if label is not None or color is not None:
            old = display(key)
            DISPLAY[key] = Display(label or old.label, color or old.color,
                                   label or old.short)
        return fn

    return deco


def _type_ok(annotation: str, v) -> bool:
    """Whether ``v`` (e.g. read from YAML or a command line) fits a dataclass field annotated
    ``annotation`` (``"int"``, ``"float | None"``, ``"tuple"``...)."""
    kinds = [a.strip() for a in str(annotation).split("|")]
    checks = {
        "None": lambda x: x is None,
        "bool": lambda x: isinstance(x, bool),
        "int": lambda x: isinstance(x, int) and not isinstance(x, bool),
        "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
        "str": lambda x: isinstance(x, str),
        "tuple": lambda x: isinstance(x, (list, tuple)),
    }
    return any(checks.get(k, lambda x: True)(v) for k in kinds)


def _index_wrong(key: str, v, n_blocks: int | None) -> str | None:
    """Why ``v`` (an index or a list of them) is not a block (``key`` in
    :data:`BLOCK_FIELDS`) or a stream layer (else) of an ``n_blocks`` model."""
    if v is None or n_blocks is None:
        return None
    top = n_blocks - 1 if key in BLOCK_FIELDS else n_blocks
    idx = list(v) if isinstance(v, (list, tuple)) else [v]
    if idx and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= top
                   for i in idx):
        return None
    what = "block indices" if key in BLOCK_FIELDS else "stream layers"
    return (f"{key}={v!r}: {what} must lie in 0..{top} (the model has {n_blocks} blocks, "
            f"{n_blocks + 1} stream layers)")


def check_fields(cls: type, params: dict, label: str, n_blocks: int | None = None) -> str | None:
    """Why ``params`` (field -> value) cannot be applied to the dataclass ``cls``: an unknown
    name, a value of the wrong type, a block index outside ``0 .. n_blocks - 1``; or None.
    The message names the field and the fix."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in params.items():
        if k not in fields:
            return unknown_field(cls, k, label)
        f = fields[k]
        default = f.default if f.default is not dataclasses.MISSING else None
        if not _type_ok(f.type, v):
            return f"{k} takes a value of the type of its default {default!r} ({f.type}), got {v!r}"
        if k in BLOCK_FIELDS + LAYER_FIELDS and _index_wrong(k, v, n_blocks):
            return _index_wrong(k, v, n_blocks)
    try:
        cls().replace(**params) if hasattr(cls, "replace") else cls(**params)
    except (TypeError, ValueError) as e:
        return f"{label} parameters {params}: {e}"
    return None


def check_params(method: str, params: dict, n_blocks: int | None = None) -> str | None:
    """Why keyword ``params`` cannot go to editor ``method`` (see :func:`check_fields`);
    None when they can. Grid arguments (``block``, ``lam``...) are the method's ``extra``.

    >>> check_params("rome", {"v_num_grad_steps": "abc"})  # doctest: +ELLIPSIS
    "v_num_grad_steps takes a value of the type of its default 25 (int), got 'abc'"
    """
    try:
        row = spec(method)
    except ValueError as e:
        return str(e)
    if row.params is None:
        return None  # a user's method without a declared hyperparameter class
    cls, extra = row.params, row.extra
    why = check_fields(cls, {k: v for k, v in params.items() if k not in extra}, method.upper(),
                       n_blocks)
    for k in BLOCK_FIELDS + LAYER_FIELDS:  # grid arguments (edited block, alignment layers)
        if why is None and k in extra:
            why = _index_wrong(k, params.get(k), n_blocks)
    return why


def edit(lm, request: EditRequest | dict, method: str = "rome", **params) -> Edit:
    if isinstance(request, dict):
        request = EditRequest.from_dict(request)
    row = spec(method)
    if row.fn is None:
        raise ValueError(f"{method!r} edits many requests at once: use edit_batch(lm, "
                         f"[request], {method!r}); one request at a time: {methods(batch=False)}")
    request.check_length(lm)
    return row.fn(lm, request, **params)


def edit_batch(lm, requests, method: str = "memit", **params) -> Edit:
    """Edit with many requests at once (batch editors only); one undoable Edit."""
    requests = [EditRequest.from_dict(r) if isinstance(r, dict) else r for r in requests]
    row = spec(method)
    if not row.batch:
        raise ValueError(f"{method!r} is not a batch editor; batch editors: "
                         f"{methods(batch=True)} (edit one request at a time with edit())")
    for r in requests:
        r.check_length(lm)
    return row.batch_fn(lm, requests, **params)


def load_builtin() -> None:
    import importlib

    if "rome" not in REGISTRY:
        _register_builtin()
    for mod in BUILTIN_MODULES:  # they register themselves on import
        importlib.import_module(f"{__package__}.{mod}")


def _register_builtin() -> None:
    from . import rome

    @register("rome", params=rome.ROMEHparams, axes=("block",), vstar=True)
    def _rome(lm, request, block: int | None = None, hparams=None, **hp):
        hparams = hparams or rome.ROMEHparams.for_model(lm)
        if block is not None:
            hp["block"] = block
        if hp:
            why = check_fields(rome.ROMEHparams, hp, "ROME", lm.n_blocks)
            if why:
                raise ValueError(why)
            hparams = hparams.replace(**hp)
        return rome.apply(lm, request, hparams)
