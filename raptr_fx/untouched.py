"""Run discovery's passes over a model and leave nothing behind in it.

Tracing and probing call the model's forward: a model that caches tensors it computes
(attention-bias caches, recurrent states, lazily built buffers) would keep fx proxies or
fake tensors from the trace, and ``torch.export`` rebinds some attributes. ``untouched``
snapshots every module's ``__dict__`` (attributes, parameters, buffers, submodules and
hooks, with the contents of its plain containers) and puts it back exactly on exit.

``class_forward`` lets the passes see through an instance-level forward wrapper that
declares what it wraps (``functools.wraps``' ``__wrapped__``), as Accelerate's autocast
wrapper does: discovery is about the model's structure, which such a wrapper does not change.

``direct_calls`` lets them see modules whose parent calls ``layer.forward(...)`` instead of
``layer(...)`` (SqueezeBERT): such a call skips ``nn.Module.__call__``, where both tracers and the
probe see module boundaries, so the layer's own computation would appear as its parent's.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections import OrderedDict
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from ._compat import has_module_hooks
from .skipping import signature_of

__all__ = ["untouched", "class_forward", "direct_calls", "as_discovered"]

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
    """On exit, every module of ``model`` has exactly the ``__dict__`` entries it had on entry, and
    every buffer its values (a pass that runs modules in training mode updates BatchNorm statistics
    and counters in place)."""
    saved = []
    for module in model.modules():
        entries = dict(module.__dict__)
        contents = {k: _shallow(v) for k, v in entries.items() if type(v) in _CONTAINERS}
        saved.append((module, entries, contents))
    buffers = [(b, b._version, b.detach().clone()) for b in {id(b): b for b in model.buffers()}.values()
               if b.device.type != "meta"]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, version, values in buffers:
                if buffer._version != version:
                    buffer.copy_(values)
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


class _ThroughCall:
    """Stands in for ``module.forward`` while discovery runs: a direct ``module.forward(...)`` call
    is made as ``module(...)``, which then runs the class forward."""

    def __init__(self, module: nn.Module, entered: set[int]):
        self.module = module
        self.entered = entered  # ids of modules whose __call__ has started their forward
        self.forward = type(module).forward.__get__(module)
        self.__signature__ = signature_of(self.forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if id(self.module) in self.entered:  # reached from nn.Module.__call__: the ordinary path
            self.entered.discard(id(self.module))
            return self.forward(*args, **kwargs)
        return self.module(*args, **kwargs)


@contextlib.contextmanager
def direct_calls(model: nn.Module) -> Iterator[None]:
    """A submodule's direct ``forward(...)`` call goes through ``nn.Module.__call__`` for a while,
    so tracers and the probe see it as the module's call.

    Left alone: the root (the tracers call it themselves), modules with an instance ``forward`` of
    their own, modules with hooks (through ``__call__``, hooks the real call skips would run) and
    modules whose class forward is no Python function (TorchScript). At run time the gates replace
    ``module.forward``, so a direct call reaches them too.
    """
    entered: set[int] = set()
    wrapped = [m for m in list(model.modules())[1:] if "forward" not in m.__dict__ and not has_module_hooks(m)
               and isinstance(inspect.getattr_static(type(m), "forward", None), types.FunctionType)]
    ids = {id(m) for m in wrapped}

    def enter(module: nn.Module, args: Any) -> None:
        if id(module) in ids:
            entered.add(id(module))

    for module in wrapped:
        module.__dict__["forward"] = _ThroughCall(module, entered)
    handle = register_module_forward_pre_hook(enter)
    try:
        yield
    finally:
        handle.remove()
        for module in wrapped:
            if isinstance(module.__dict__.get("forward"), _ThroughCall):
                del module.__dict__["forward"]


@contextlib.contextmanager
def as_discovered(model: nn.Module) -> Iterator[None]:
    """The model as discovery's passes see it (trace, probe, and the width proof's runs): nothing
    they do stays in it, instance forwards that wrap the class's are looked through, and direct
    ``forward(...)`` calls are module calls. One view for all, so their records line up."""
    with untouched(model), class_forward(model), direct_calls(model):
        yield
