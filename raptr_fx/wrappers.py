"""Wrappers users put around their blocks: ``torch.compile`` and activation checkpointing.

PyTorch's scaling recipe wraps each block in its parent's slot: ``checkpoint_wrapper(block)``
(``_checkpoint_wrapped_module``), ``torch.compile(block)`` (an ``OptimizedModule`` around
``_orig_mod``), or ``block.compile()`` in place (a compiled ``_call_impl``). Hugging Face layers
checkpoint themselves when ``gradient_checkpointing`` is on.

Two things follow, both here:

* discovery is about the user's modules, so ``seen_through`` shows it the model with every wrapper
  taken out of its slot for a while (and compiled calls and trainer checkpointing off), and maps
  the names it finds back to the wrapped model's;
* a unit's decision must be taken before anything wraps it (a graph break inside a checkpoint's
  higher-order op makes dynamo give up on the whole block), so a gate sits on the outermost
  wrapper in the slot (``gates.install_gate``), and moves there if the user wraps a block after ``transform``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn

from ._compat import COMPILED_CALL, ORIGINAL_MODULE, WRAPPED_ATTRIBUTES

__all__ = ["WRAPPED_ATTRIBUTES", "wrapper_chain", "is_compiled", "seen_through"]



def wrapper_chain(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """``module``, then each module it wraps, innermost last, each with the attribute that holds the
    next one ("" for the innermost)."""
    chain: list[tuple[nn.Module, str]] = []
    current: nn.Module | None = module
    while current is not None and len(chain) < 16:  # wrappers of wrappers, never a cycle
        attribute = next((a for a in WRAPPED_ATTRIBUTES if current._modules.get(a) is not None), "")
        chain.append((current, attribute))
        current = current._modules[attribute] if attribute else None
    return chain


def is_compiled(module: nn.Module) -> bool:
    """``torch.compile(module)``'s wrapper, or a module compiled in place with ``module.compile()``."""
    return ORIGINAL_MODULE in module._modules or COMPILED_CALL in module.__dict__


@contextlib.contextmanager
def seen_through(model: nn.Module) -> Iterator[Callable[[str], str]]:
    """For a while, ``model`` without its blocks' wrappers; yields a map from the names seen then to
    the wrapped model's names.

    Inside, each wrapper's slot holds the module it wraps, modules compiled in place run their own
    ``_call_impl``, and Hugging Face layers do not checkpoint themselves (a reentrant checkpoint runs
    the layer under ``no_grad``, where no residual add is recorded). Everything is put back on exit.
    A unit's own name stays the slot's name, which names the outermost wrapper there: where its gate goes.
    """
    slots: list[tuple[nn.Module, str, nn.Module]] = []
    compiled_calls: list[tuple[nn.Module, object]] = []
    checkpointing: list[nn.Module] = []
    # slot name as seen -> (the real name of the slot, i.e. of its outermost wrapper; of the module it wraps)
    prefixes: dict[str, tuple[str, str]] = {}

    def unwrap(module: nn.Module, seen: str, real: str) -> None:
        for attribute, child in list(module._modules.items()):
            if child is None:
                continue
            chain = wrapper_chain(child)
            child_seen, child_real = f"{seen}{attribute}", f"{real}{attribute}"
            if len(chain) > 1:
                slots.append((module, attribute, child))
                module._modules[attribute] = chain[-1][0]
                outer, child_real = child_real, child_real + "".join(f".{a}" for _, a in chain[:-1])
                prefixes[child_seen] = (outer, child_real)
            inner = chain[-1][0]
            if COMPILED_CALL in inner.__dict__:
                compiled_calls.append((inner, inner.__dict__.pop(COMPILED_CALL)))
            if getattr(inner, "gradient_checkpointing", False) is True and hasattr(inner, "_gradient_checkpointing_func"):
                checkpointing.append(inner)
                inner.gradient_checkpointing = False  # type: ignore[assignment]  # a Hugging Face flag, not a Module
            unwrap(inner, child_seen + ".", child_real + ".")

    def real_name(name: str) -> str:
        for end in range(len(name), 0, -1):  # the longest wrapped slot at or above ``name``
            if end < len(name) and name[end] != ".":
                continue
            if name[:end] in prefixes:
                outer, inner = prefixes[name[:end]]
                return outer if end == len(name) else inner + name[end:]
        return name

    try:
        unwrap(model, "", "")
        yield real_name
    finally:
        for module in checkpointing:
            module.gradient_checkpointing = True  # type: ignore[assignment]
        for module, compiled_call in compiled_calls:
            module.__dict__[COMPILED_CALL] = compiled_call
        for parent, attribute, wrapper in reversed(slots):
            parent._modules[attribute] = wrapper
