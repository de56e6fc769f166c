"""Run discovery's passes over a model and leave nothing behind in it.

Tracing and probing call the model's forward: a model that caches tensors it computes
(attention-bias caches, recurrent states, lazily built buffers) would keep fx proxies or
fake tensors from the trace, and ``torch.export`` rebinds some attributes. ``untouched``
snapshots every module's ``__dict__`` (attributes, parameters, buffers, submodules and
hooks, with the contents of its plain containers) and puts it back exactly on exit.

``class_forward`` lets the passes see through an instance-level forward wrapper that
declares what it wraps (``functools.wraps``' ``__wrapped__``), as Accelerate's autocast
wrapper does: discovery is about the model's structure, which such a wrapper does not change.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Iterator

from torch import nn

__all__ = ["untouched", "class_forward"]

# Containers whose contents a forward may change in place (``self._cache[key] = ...``).
_CONTAINERS = (dict, OrderedDict, list, set)


def _shallow(value: Any) -> Any:
    return type(value)(value) if type(value) in _CONTAINERS else None


def _refill(container: Any, saved: Any) -> None:
    """Give ``container`` back the contents it had, keeping the object (others may hold it)."""
    container.clear()
    if isinstance(container, list):
        container.extend(saved)
    else:  # dict or set
        container.update(saved)


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """On exit, every module of ``model`` has exactly the ``__dict__`` entries it had on entry."""
    saved = []
    for module in model.modules():
        entries = dict(module.__dict__)
        contents = {k: _shallow(v) for k, v in entries.items() if type(v) in _CONTAINERS}
        saved.append((module, entries, contents))
    try:
        yield
    finally:
        for module, entries, contents in saved:
            state = module.__dict__
            for key in [k for k in state if k not in entries]:
                del state[key]
            for key, value in entries.items():
                if state.get(key) is not value:
                    state[key] = value
                if key in contents:
                    _refill(value, contents[key])


def _unwrapped(function: Any) -> Iterator[Any]:
    """``function``, then each function it declares it wraps (bound methods looked through)."""
    seen = set()
    while function is not None and id(function) not in seen:
        seen.add(id(function))
        yield function
        function = getattr(function, "__func__", None) or getattr(function, "__wrapped__", None)


@contextlib.contextmanager
def class_forward(model: nn.Module) -> Iterator[None]:
    """Modules whose instance ``forward`` wraps their class's ``forward`` run the class's for a while.

    A wrapper that does not declare the class forward as what it wraps is the user's own
    forward, and stays: it may compute something else.
    """
    hidden = []
    for module in model.modules():
        wrapper = module.__dict__.get("forward")
        if wrapper is None:
            continue
        own = type(module).forward
        if any(f is own for f in list(_unwrapped(wrapper))[1:]):
            hidden.append((module, wrapper))
            del module.__dict__["forward"]
    try:
        yield
    finally:
        for module, wrapper in hidden:
            module.__dict__["forward"] = wrapper
