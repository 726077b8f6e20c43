"""Read activations out of one forward pass, then stop: the one stream reader.

Every part of steamviz that *reads* a model's inner activations (capture, ROME's keys, the
prefix cache, BaFT's and SAKE's streams, the covariance statistics) names what it wants as
:class:`Tap` s and calls :func:`read`. Editors that *write* through hooks register their own
hooks but remove them with :func:`hooks`, which always cleans up, also on error.

Stream indices follow :mod:`steamviz.look.capture`: ``layer`` 0 is the stream entering block 0,
``layer`` l the stream leaving block l - 1 (HuggingFace's ``output_hidden_states`` order).

>>> b = encode(lm, ["The capital of France is"])                        # doctest: +SKIP
>>> taps = {3: stream(lm, 3),                                           # leaving block 2
...         "k": Tap(mlp_out_module(lm.model, 4), "input")}             # doctest: +SKIP
>>> got, out = read(lm, b.input_ids, b.attention_mask, taps)            # doctest: +SKIP
>>> got[3].shape, out          # [batch, seq, hidden]; stopped early     # doctest: +SKIP
(torch.Size([1, 6, 576]), None)

:func:`read` stops the pass as soon as every tap has fired (the output is then ``None``, and
no block above the highest tap runs); with ``stop=False`` it runs to the end and also returns
the base model's output. It runs under ``torch.no_grad``: a reader never builds a graph.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Mapping

import torch

from .arch import get_module

WHERE = ("input", "output", "both")


class _Stop(Exception):
    """Raised by a hook to end the forward pass once everything wanted has been read."""


@contextmanager
def hooks(handles: list) -> Iterator[None]:
    """Remove every hook handle in ``handles`` on exit, whatever happens inside.

    >>> handles = [block.register_forward_hook(fn)]                     # doctest: +SKIP
    >>> with hooks(handles):
    ...     model(**batch)                     # the hook is gone afterwards # doctest: +SKIP
    """
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        handles.clear()


def first_tensor(x):
    """A module's main output: the first element of a tuple or list, else ``x`` itself."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _first_input(args: tuple, kwargs: dict):
    if args:
        return args[0]
    for name in ("hidden_states", "input", "x"):
        if name in kwargs:
            return kwargs[name]
    raise RuntimeError(f"cannot find the module's input among keyword arguments {list(kwargs)}")


@dataclass(frozen=True)
class Tap:
    """What to read: a module's ``"input"`` (its first argument), its ``"output"`` (the first
    tensor of it), or ``"both"`` as ``(input, output)``. ``keep`` is applied to what is read
    before it is stored (a gather of a few positions keeps memory small)."""

    module: torch.nn.Module
    where: str = "output"
    keep: Callable[[Any], Any] | None = None

    def __post_init__(self):
        if self.where not in WHERE:
            raise ValueError(f"Tap where={self.where!r}; choose from {WHERE}")


def stream(lm, layer: int, keep: Callable[[Any], Any] | None = None) -> Tap:
    """A :class:`Tap` on the residual stream at ``layer`` (``0..lm.n_blocks``, capture
    numbering): the input of block 0 for ``layer`` 0, else the output of block ``layer - 1``."""
    n = lm.n_blocks
    if not 0 <= int(layer) <= n:
        raise ValueError(f"layer {layer} out of range: this model has stream layers 0..{n}")
    blocks = get_module(lm.model, lm.adapter.blocks)
    if layer == 0:
        return Tap(blocks[0], "input", keep)
    return Tap(blocks[int(layer) - 1], "output", keep)


def read(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
         taps: Mapping[Hashable, Tap], stop: bool = True, **forward_kwargs
         ) -> tuple[dict, Any]:
    """One forward pass of ``lm``'s base model (no logits) with ``taps``; returns
    ``({name: what was read}, output)``. With ``stop`` the pass ends once every tap has fired
    and ``output`` is ``None``. ``forward_kwargs`` go to the base model (``position_ids``,
    ``past_key_values``, ...); ``use_cache`` defaults to ``False``. Hooks are always removed."""
    if not taps:
        raise ValueError("read() needs at least one tap")
    base = get_module(lm.model, lm.adapter.base)
    got: dict = {}

    def fire(name, tap: Tap, value) -> None:
        got[name] = tap.keep(value) if tap.keep is not None else value
        if stop and len(got) == len(taps):
            raise _Stop

    handles: list = []
    out = None
    forward_kwargs.setdefault("use_cache", False)
    with hooks(handles), torch.no_grad():
        for name, tap in taps.items():
            if tap.where == "input":
                handles.append(tap.module.register_forward_pre_hook(
                    lambda m, a, kw, name=name, tap=tap: fire(name, tap, _first_input(a, kw)),
                    with_kwargs=True))
            elif tap.where == "output":
                handles.append(tap.module.register_forward_hook(
                    lambda m, a, o, name=name, tap=tap: fire(name, tap, first_tensor(o))))
            else:
                handles.append(tap.module.register_forward_hook(
                    lambda m, a, kw, o, name=name, tap=tap: fire(
                        name, tap, (_first_input(a, kw), first_tensor(o))),
                    with_kwargs=True))
        try:
            out = base(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
        except _Stop:
            out = None
    missing = [k for k in taps if k not in got]
    if missing:
        raise RuntimeError(f"taps {missing} never fired: their modules are not on the forward "
                           "path of this model")
    return got, out
