"""The exception types raptr_fx raises for problems the user can fix."""

from __future__ import annotations

from typing import Any

import torch


class RaptrError(Exception):
    """A model, file or option raptr_fx cannot work with; the message says what to do.

    The CLI catches this at its edge and prints it as one styled line (exit code 1).
    """


class TracingError(RaptrError):
    """Every tracer failed on the model; the message lists each tracer's reason."""


class RaptrWarning(UserWarning):
    """A likely mistake in how the controller is driven; the message says what to do."""


class ExampleInputsError(RaptrError, ValueError):
    """The model rejects the example inputs; the message shows them and the model's own error."""


def describe_value(value: Any) -> str:
    """A short description of an input: ``tensor[2, 8] int64``, ``dict{'input_ids': ...}``, ``str 'hi'``."""
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        items = ", ".join(describe_value(v) for v in value)
        return f"({items},)" if isinstance(value, tuple) and len(value) == 1 else (
            f"({items})" if isinstance(value, tuple) else f"[{items}]")
    try:
        text = repr(value)
    except Exception:  # e.g. a flex-attention BlockMask on the meta device: its repr reads values
        return type(value).__name__
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def describe_inputs(args: tuple, kwargs: dict) -> str:
    """How the model was called: ``model(tensor[2, 8] int64)`` or ``model(input_ids=tensor[2, 8] int64)``."""
    parts = [describe_value(a) for a in args] + [f"{k}={describe_value(v)}" for k, v in kwargs.items()]
    return f"model({', '.join(parts)})"
