"""What the trainer callbacks share: argument checks, lazy transform, optimizer hooks, metrics.

No framework is imported here.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

from ..controller import Controller, transform, unwrap_optimizer
from ._compat import original_forward
from ..errors import TracingError
from ..schedules import RaPTr, Schedule

log = logging.getLogger("raptr_fx")

# transform()'s own keyword options (the callbacks set schedule, total_steps and example_inputs)
# plus the tracer options it passes through.
TRANSFORM_OPTIONS = frozenset(
    {name for name, p in inspect.signature(transform).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    - {"total_steps", "example_inputs"}
    | {"leaf_modules", "autowrap_functions", "autowrap_modules", "concrete_args"})


def check_arguments(owner: str, schedule: Any, controller: Any, total_steps: Any,
                    options: dict[str, Any]) -> None:
    """ValueError / TypeError naming the offending value, raised when the callback is built."""
    if controller is not None:
        if not isinstance(controller, Controller):
            raise TypeError(f"{owner}: controller must be a raptr_fx.Controller, got {type(controller).__name__}")
        if schedule is not None:
            raise ValueError(f"{owner}: pass a schedule or a controller, not both (got schedule={schedule!r})")
        given = sorted(k for k in options if k not in ("example_inputs",)) + (
            ["total_steps"] if total_steps is not None else [])
        if given:
            raise TypeError(f"{owner}: {given} only apply when the callback transforms the model; "
                            "the controller you passed is already made")
        return
    if schedule is None:
        raise ValueError(f"{owner}: pass a schedule (e.g. '6-8-10-12') or controller=")
    if not isinstance(schedule, (str, Schedule)):
        raise TypeError(f"{owner}: schedule must be a string like '6-8-10-12' or a raptr_fx Schedule, "
                        f"got {type(schedule).__name__} {schedule!r}")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps <= 0):
        raise ValueError(f"{owner}: total_steps must be a positive int, got {total_steps!r}")
    if isinstance(schedule, str):
        RaPTr(schedule, total_steps=total_steps or 10**9)  # parse errors now, not at train start
    unknown = sorted(set(options) - TRANSFORM_OPTIONS - {"example_inputs"})
    if unknown:
        raise TypeError(f"{owner}: unknown option(s) {unknown}; transform options are "
                        f"{sorted(TRANSFORM_OPTIONS)}")


def _is_hf_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def _call_as_inputs(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """A first call's arguments as example inputs: a tuple, or a dict when keywords are used."""
    if not kwargs:
        return tuple(args)
    if not args:
        return dict(kwargs)
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    params = inspect.signature(module.forward).parameters
    flat: dict[str, Any] = {}
    for name, value in bound.items():
        if params[name].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        elif params[name].kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"cannot take example inputs from a call of {type(module).__name__} with *{name}: "
                            "pass example_inputs=")
        else:
            flat[name] = value
    return flat


def _autocast_off() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda", "xpu", "mps"):
        try:
            enabled = torch.is_autocast_enabled(device)
        except (RuntimeError, TypeError):  # a device type this torch does not know
            continue
        if enabled:
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


class Adoption:
    """A controller, or what is needed to make one, for a callback.

    ``transform`` runs as soon as the model is known; a model that needs example inputs
    (Hugging Face transformers models need ``torch.export``) is transformed at its first forward
    call instead, with that call's arguments as example inputs. Checkpoint state and the
    optimizer that arrive before the controller exists are applied when it is made.
    """

    def __init__(self, owner: str, schedule: str | Schedule | None, controller: Controller | None,
                 total_steps: int | None, options: dict[str, Any]):
        self.owner = owner
        self.schedule = schedule
        self.controller = controller
        self.total_steps = total_steps
        self.example_inputs = options.pop("example_inputs", None)
        self.options = options
        self.made_here = False
        self._pending_state: dict[str, Any] | None = None
        self._optimizer: tuple[torch.optim.Optimizer, bool] | None = None
        self._first_call: Any = None  # forward pre-hook handle while transform waits for inputs
        self._attached = False  # whether this callback attached the controller to an optimizer
        self.on_made: Callable[[Controller], None] | None = None

    # -- the controller --------------------------------------------------------------------
    @property
    def waiting(self) -> bool:
        return self._first_call is not None

    def adopt(self, model: nn.Module, total_steps: int | None, *, compiled: bool = False) -> None:
        """Transform ``model`` now, or at its first forward call when it needs example inputs."""
        if self.controller is not None or self.waiting:
            return
        steps = self.total_steps or total_steps
        if isinstance(self.schedule, str) and not steps:
            raise ValueError(f"{self.owner}: cannot tell the number of training steps for schedule "
                             f"{self.schedule!r}; pass total_steps=")
        if self.example_inputs is None and _is_hf_model(model):
            self._defer(model, steps, compiled)
            return
        try:
            self._make(model, steps, self.example_inputs)
        except TracingError:
            if self.example_inputs is not None:
                raise
            self._defer(model, steps, compiled)

    def _defer(self, model: nn.Module, steps: int | None, compiled: bool) -> None:
        if compiled:
            raise ValueError(f"{self.owner}: {type(model).__name__} needs example inputs to be traced and the "
                             "model is compiled, so they cannot be taken from the first batch: pass "
                             "example_inputs= (a dict of one batch, e.g. {'input_ids': ...})")

        def first_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._first_call.remove()
            self._first_call = None
            log.info("raptr_fx: transforming %s with the first batch as example inputs", type(module).__name__)
            self._make(module, steps, _call_as_inputs(module, args, kwargs))

        self._first_call = model.register_forward_pre_hook(first_call, with_kwargs=True)

    def _make(self, model: nn.Module, steps: int | None, example_inputs: Any) -> None:
        # Trainers run the forward under autocast (bf16 / fp16): trace the model as it is, without
        # the casts autocast would put between the residual stream and its branches.
        # Accelerate's mixed precision replaces the root's forward by an autocast wrapper (keeping the
        # original in ``_original_forward``): trace the original, then put the wrapper back.
        original = original_forward(model)
        wrapper = model.__dict__.get("forward") if original is not None else None
        try:
            if wrapper is not None:
                model.forward = original
            assert self.schedule is not None  # check_arguments: a schedule or a controller
            with _autocast_off():
                self.controller = transform(model, self.schedule, total_steps=steps,
                                            example_inputs=example_inputs, **self.options)
        finally:
            if wrapper is not None:
                model.forward = wrapper
        self.made_here = True
        self._settle()

    def _settle(self) -> None:
        controller = self.controller
        assert controller is not None  # settled once made or given
        if self._pending_state is not None:
            controller.load_state_dict(self._pending_state)
            self._pending_state = None
        if self._optimizer is not None:
            optimizer, freeze = self._optimizer
            self._optimizer = None
            self.attach(optimizer, freeze)
        if self.on_made is not None:
            self.on_made(controller)

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict[str, Any] | None:
        if self.controller is not None:
            return self.controller.state_dict()
        return self._pending_state

    def load(self, state: dict[str, Any]) -> None:
        if self.controller is not None:
            self.controller.load_state_dict(state)
        else:
            self._pending_state = dict(state)

    def seek(self, step: int) -> None:
        """Put the controller (now or when made) at optimizer step ``step``, keeping its seed."""
        if self.controller is not None:
            self.controller.load_state_dict({**self.controller.state_dict(), "step": step})
        else:
            self._pending_state = {**(self._pending_state or {}), "step": step,
                                   "seed": int(self.options.get("seed", 0))}

    # -- the optimizer ---------------------------------------------------------------------
    def attach(self, optimizer: Any, freeze_dropped: bool) -> None:
        """Step the controller after every real optimizer step (once, whatever the accumulation)."""
        real = unwrap_optimizer(optimizer)  # Accelerate / Lightning wrappers: hooks go on the real one
        if self.controller is None:
            self._optimizer = (real, freeze_dropped)
            return
        self.controller.attach(real, freeze_dropped=freeze_dropped)
        self._attached = True

    def detach(self) -> None:
        """Remove the optimizer hooks this callback added (the gates stay), so that a later
        ``fit``/``train`` with a new optimizer can attach again."""
        if self.controller is not None and self._attached:
            self.controller.detach()
        self._attached = False
        self._optimizer = None
        if self._first_call is not None:
            self._first_call.remove()
            self._first_call = None


def metrics(controller: Controller) -> dict[str, float]:
    """What the callbacks log: stage, units running this step, this stage's expected compute, and
    with width groups the fraction of their parts kept this step (the mean over groups)."""
    row = controller.plan()[controller.stage]
    values = {
        "raptr/stage": float(controller.stage),
        "raptr/active_units": float(sum(controller.active)),
        "raptr/expected_compute": float(row.compute),
    }
    if controller.width_groups:
        kept = controller.kept_parts
        values["raptr/width"] = sum(kept[g.name] / g.parts for g in controller.width_groups) / len(kept)
    return values
