"""One forward pass with example inputs: call counts, shapes, outputs and FLOPs per module.

The pass runs on fake tensors (``FakeTensorMode``) through ``torch.func.functional_call``:
parameters, buffers and inputs are fakes that carry shapes, dtypes and devices but
no data, so no real compute runs, no memory is allocated and no buffer can change,
whatever the model's size or device (``cpu``, ``cuda`` or ``meta``).

Only where fake tensors cannot follow the model (it reads a value: ``.item()``,
``if x.sum() > 0``, an output whose shape depends on values) or fail where real
tensors do not (a fake kernel stricter than the real one) does the probe run one
real forward pass, restoring buffers and attributes and forking the RNG so the
user's model is left exactly as it was. The inputs are rejected only when that
real pass fails too. ``Probe.mode`` says which was used.

Value errors (an index past an embedding's rows) are invisible to fake tensors;
the model's first real forward raises them.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._compat import (DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode,
                      UnsupportedOperatorException, tree_map)
from .errors import ExampleInputsError, describe_inputs
from .skipping import ObservedOutput, observe
from .untouched import untouched

__all__ = ["Call", "Probe", "probe"]

# What fake tensors cannot do; any other exception is the model's own answer to the inputs.
_FAKE_LIMITS: tuple[type[Exception], ...] = (
    DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)
try:  # data-dependent guards on symbolic shapes
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    _FAKE_LIMITS += (GuardOnDataDependentSymNode,)
except ImportError:  # pragma: no cover - older torch
    pass

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class Call:
    """What the first call of one module saw."""

    arg_shapes: dict[int | str, tuple[int, ...]]  # tensor arguments (position or keyword) -> shape
    output_shape: tuple[int, ...] | None  # None when the module returned no single tensor
    output: ObservedOutput  # each element of the output: computed, an input passed through, a constant


@dataclass
class Probe:
    calls: dict[str, Call] = field(default_factory=dict)
    call_counts: Counter[str] = field(default_factory=Counter)
    flops: dict[str, int] = field(default_factory=dict)  # module name -> forward FLOPs
    total_flops: int = 0
    mode: Literal["fake", "real"] = "fake"  # fake tensors, or one real forward pass


def probe(model: nn.Module, inputs: Inputs, *, mode: Literal["auto", "fake", "real"] = "auto") -> Probe:
    """Run ``model`` once on ``inputs`` (fake tensors unless they cannot follow it).

    Raises:
        ExampleInputsError: the model rejects the inputs (wrong shape, dtype or structure).
    """
    if mode not in ("auto", "fake", "real"):
        raise ValueError(f"probe mode must be 'auto', 'fake' or 'real', got {mode!r}")
    if mode != "real":
        try:
            return _run(model, inputs, fake=True)
        except _FAKE_LIMITS:
            if mode == "fake":
                raise
        except Exception as exc:
            if mode == "fake":
                raise ExampleInputsError(_failure(model, inputs, exc)) from exc
            # Fake and meta kernels can be stricter than the real ones (torch._grouped_mm's asks
            # for bf16 where the CPU kernel runs float32): a real pass decides whether the model
            # rejects the inputs, and its error is the one the user would see.
    try:
        return _run(model, inputs, fake=False)
    except Exception as exc:
        raise ExampleInputsError(_failure(model, inputs, exc)) from exc


def _failure(model: nn.Module, inputs: Inputs, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return (f"{type(model).__name__} fails on the example inputs {describe_inputs(*inputs)}: "
            f"{type(exc).__name__}: {first}\n"
            "Fix: pass example inputs the model accepts, shaped as in training: a tuple is called as "
            "model(*args), a dict as model(**kwargs), anything else as model(x)")


def _run(model: nn.Module, inputs: Inputs, *, fake: bool, count_flops: bool = True) -> Probe:
    result = Probe(mode="fake" if fake else "real")
    names = {module: name for name, module in model.named_modules(remove_duplicate=False)}
    hooks = [m.register_forward_hook(_recorder(result, names), with_kwargs=True) for m in names]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    counter: Any = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    try:
        with untouched(model), torch.random.fork_rng(devices=devices), torch.no_grad():
            _fake_forward(model, inputs, counter) if fake else _real_forward(model, inputs, counter)
    except AssertionError as exc:
        if not count_flops or not _raised_by_module_tracker(exc):
            raise
        # FlopCounterMode's ModuleTracker hooks every output that requires grad, and fails on one
        # without a grad_fn under no_grad (Perceiver's latents): the inputs are fine, FLOPs unknown.
        return _run(model, inputs, fake=fake, count_flops=False)
    finally:
        for hook in hooks:
            hook.remove()
    if count_flops:
        prefix = type(model).__name__ + "."
        for key, by_op in counter.get_flop_counts().items():
            if key.startswith(prefix):
                result.flops[key[len(prefix):]] = int(sum(by_op.values()))
        result.total_flops = int(counter.get_total_flops())
    return result


def _raised_by_module_tracker(exc: BaseException) -> bool:
    return any(frame.filename.endswith(("module_tracker.py", "autograd/graph.py"))
               for frame in traceback.extract_tb(exc.__traceback__))


def _recorder(result: Probe, names: dict[nn.Module, str]):
    def record(module: nn.Module, call_args: tuple, call_kwargs: dict, output: Any) -> None:
        name = names.get(module)
        if name is None:
            return
        result.call_counts[name] += 1
        if name in result.calls:
            return
        shapes = {k: tuple(v.shape) for k, v in [*enumerate(call_args), *call_kwargs.items()]
                  if isinstance(v, torch.Tensor)}
        observed = observe(output, call_args, call_kwargs, lambda v: isinstance(v, torch.Tensor))
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        result.calls[name] = Call(shapes, shape, observed)

    return record


def _fake_forward(model: nn.Module, inputs: Inputs, counter: Any) -> None:
    """Parameters, buffers and inputs as fake tensors; the model's own tensors are never touched."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(value: Any) -> Any:
        return fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    # remove_duplicate=False: tied weights appear under every name; from_tensor keeps them one fake.
    state = {name: fake(t) for name, t in [*model.named_parameters(remove_duplicate=False),
                                           *model.named_buffers(remove_duplicate=False)]}
    args, kwargs = tree_map(fake, inputs)
    with _quiet_fake_tensor_log(), counter, fake_mode:
        torch.func.functional_call(model, state, args, kwargs, strict=False)


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    """FakeTensorMode logs a traceback for every op the model gets wrong; the error we raise says it once."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _real_forward(model: nn.Module, inputs: Inputs, counter: Any) -> None:
    """One real pass; buffers (BatchNorm statistics) restored afterwards."""
    args, kwargs = inputs
    saved_buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        with counter:
            model(*args, **kwargs)
    finally:
        for key, buffer in model.named_buffers():
            buffer.copy_(saved_buffers[key])
