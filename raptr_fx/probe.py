"""One real forward pass with example inputs: call counts, shapes and FLOPs per module.

The model is left exactly as it was: buffers (BatchNorm statistics) are restored
and the global RNG is forked, so probing never changes what the user trains.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Call", "Probe", "probe"]


@dataclass
class Call:
    """What the first call of one module saw."""

    arg_shapes: dict[int | str, tuple[int, ...]]  # tensor arguments (position or keyword) -> shape
    output_shape: tuple[int, ...] | None  # None when the module returned no single tensor
    output_type: str


@dataclass
class Probe:
    calls: dict[str, Call] = field(default_factory=dict)
    call_counts: Counter[str] = field(default_factory=Counter)
    flops: dict[str, int] = field(default_factory=dict)  # module name -> forward FLOPs
    total_flops: int = 0


def probe(model: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> Probe:
    args, kwargs = inputs
    result = Probe()
    names = {module: name for name, module in model.named_modules(remove_duplicate=False)}

    def record(module: nn.Module, call_args: tuple, call_kwargs: dict, output: Any) -> None:
        name = names.get(module)
        if name is None:
            return
        result.call_counts[name] += 1
        if name in result.calls:
            return
        shapes = {k: tuple(v.shape) for k, v in [*enumerate(call_args), *call_kwargs.items()]
                  if isinstance(v, torch.Tensor)}
        is_tensor = isinstance(output, torch.Tensor)
        result.calls[name] = Call(shapes, tuple(output.shape) if is_tensor else None, type(output).__name__)

    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in names]
    saved_buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    devices = sorted({b.device.index or 0 for b in model.parameters() if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for key, buffer in model.named_buffers():
                buffer.copy_(saved_buffers[key])
    prefix = type(model).__name__ + "."
    for key, by_op in counter.get_flop_counts().items():
        if key.startswith(prefix):
            result.flops[key[len(prefix):]] = int(sum(by_op.values()))
    result.total_flops = int(counter.get_total_flops())
    return result
