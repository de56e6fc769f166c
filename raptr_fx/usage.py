"""Catches the silent mistakes of driving a controller, each reported once as a warning.

Three mistakes train the wrong network without a word:

* the controller is never stepped (no ``attach`` and no ``step()``): stage 0 forever;
* the controller is stepped twice per optimizer step (``attach`` plus a manual ``step()``, or a
  ``step()`` per micro-batch): the schedule runs at double speed;
* the optimizer steps while the model is in eval mode (what ``from_pretrained`` returns): the
  gates are off and the full network trains.

All three are seen from one place: torch's global optimizer step hook, which fires after every
``optimizer.step()`` in the process, wrapped (Accelerate, Lightning) or not. Only optimizers that
hold the gated units' parameters count, and only the first such optimizer is followed, so a
second optimizer over the same model is not mistaken for a second step. The cost is a dictionary
look-up and a few integer comparisons per optimizer step; nothing runs per forward or per
micro-batch, so gradient accumulation cannot be misreported.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import RaptrWarning
from .schedules import FullModel, Schedule

__all__ = ["UsageMonitor", "remove_global_hook"]


class Monitored(Protocol):
    """What the monitor reads of a ``raptr_fx.Controller`` (which imports this module, so no import back)."""

    schedule: Schedule

    @property
    def step_count(self) -> int: ...

    def watched_modules(self) -> list[nn.Module]: ...


# Controller steps may lag or lead optimizer steps by a little for honest reasons (a callback that
# steps after the optimizer hook fired; mixed-precision steps that GradScaler skipped): warn only
# when the drift reaches this many steps and half of the optimizer steps.
_MIN_DRIFT = 3

# One global hook serves every live monitor; a monitor dies with its controller, so a controller
# dropped without remove() leaves nothing behind.
_monitors: weakref.WeakSet[UsageMonitor] = weakref.WeakSet()
_hook_handle: Any = None


def _on_any_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for monitor in list(_monitors):
        monitor.on_optimizer_step(optimizer)


def remove_global_hook() -> None:
    """Take the global optimizer hook off and forget every monitor; the next controller puts it back.

    For test isolation (``tests/conftest.py``): controllers of one test are not followed in the next.
    """
    global _hook_handle
    if _hook_handle is not None:
        _hook_handle.remove()
        _hook_handle = None
    _monitors.clear()


class UsageMonitor:
    """Follows optimizer steps against controller steps for one controller."""

    def __init__(self, controller: Monitored):
        self._controller = weakref.ref(controller)
        self._holds_units: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._followed: weakref.ref | None = None  # the first optimizer that holds the units
        self._optimizer_steps = 0
        self._controller_start = 0
        self._reported: set[str] = set()
        global _hook_handle
        if _hook_handle is None:
            _hook_handle = register_optimizer_step_post_hook(_on_any_optimizer_step)
        _monitors.add(self)

    def remove(self) -> None:
        _monitors.discard(self)

    def restart(self) -> None:
        """Count from here (a checkpoint moved the controller to another step)."""
        self._optimizer_steps = 0
        controller = self._controller()
        self._controller_start = controller.step_count if controller is not None else 0

    def on_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        controller = self._controller()
        if controller is None or not self._follows(optimizer, controller):
            return
        if not any(module.training for module in controller.watched_modules()):
            self._report("eval", "the optimizer stepped while the model is in eval mode, so every unit ran "
                         "and RaPTr had no effect (a model from from_pretrained starts in eval mode): call "
                         "model.train() before training")
            return
        if self._optimizer_steps == 0:
            self._controller_start = controller.step_count
        self._optimizer_steps += 1
        steps = self._optimizer_steps
        moved = controller.step_count - self._controller_start
        limit = max(_MIN_DRIFT, steps // 2)
        if steps - moved >= limit and not isinstance(controller.schedule, FullModel):  # no step changes it
            self._report("behind", f"the controller stepped {moved} times in {steps} optimizer steps, so the "
                         "schedule is not advancing: call controller.attach(optimizer) once, or "
                         "controller.step() after each optimizer.step()")
        elif moved - steps >= limit:
            self._report("ahead", f"the controller stepped {moved} times in {steps} optimizer steps, so the "
                         "schedule runs too fast: step it once per optimizer step, either through "
                         "attach(optimizer) or by calling step(), not both (and not per micro-batch)")

    def _follows(self, optimizer: torch.optim.Optimizer, controller: Monitored) -> bool:
        followed = self._followed() if self._followed is not None else None
        if followed is not None:
            return followed is optimizer
        holds = self._holds_units.get(optimizer)
        if holds is None:
            units = {id(p) for module in controller.watched_modules() for p in module.parameters()}
            holds = any(id(p) in units for group in optimizer.param_groups for p in group["params"])
            self._holds_units[optimizer] = holds
        if holds:
            self._followed = weakref.ref(optimizer)
            self._optimizer_steps = 0
        return holds

    def _report(self, kind: str, message: str) -> None:
        if kind not in self._reported:
            self._reported.add(kind)
            warnings.warn(f"raptr_fx: {message}", RaptrWarning, stacklevel=4)
