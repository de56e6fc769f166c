"""RaPTr for Lightning in one line: ``Trainer(callbacks=[RaPTrLightningCallback("6-8-10-12", module="model")])``."""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from .._compat import ORIGINAL_MODULE
from ..controller import Controller, unwrap_optimizer
from ..schedules import Schedule
from ._common import Adoption, check_arguments, metrics

__all__ = ["RaPTrLightningCallback"]


class RaPTrLightningCallback(Callback):
    """Train with RaPTr under ``lightning.Trainer``.

    At ``setup`` (stage ``"fit"``, before Lightning wraps the model for DDP) the callback
    transforms ``module`` (``total_steps`` defaults to the Trainer's ``max_steps``, else its
    estimated optimizer steps); a model that needs example inputs is transformed at its first
    forward call with that call's arguments, unless you pass ``example_inputs=``. The controller
    steps after every real optimizer step (once per ``accumulate_grad_batches`` batches), and the
    gradients of dropped units are released in ``on_before_optimizer_step``, after the closure's
    backward. Its state is this callback's ``state_dict``, which Lightning stores in every
    checkpoint: ``trainer.fit(..., ckpt_path=...)`` replays the gate sequence of an uninterrupted
    run. ``raptr/stage``, ``raptr/active_units`` and ``raptr/expected_compute`` of each optimizer
    step are logged through ``pl_module.log`` in ``on_before_optimizer_step``, on the row of the
    loss of that step's last batch.

    Example:
        >>> from raptr_fx.integrations.lightning import RaPTrLightningCallback
        >>> trainer = lightning.Trainer(max_steps=10_000, accumulate_grad_batches=2,
        ...                             callbacks=[RaPTrLightningCallback("6-8-10-12", module="model")])
        >>> trainer.fit(lit_module)          # lit_module.model is the network to gate

    Args:
        schedule: a string like ``"6-8-10-12"`` or a raptr_fx :class:`~raptr_fx.Schedule`.
        controller: an existing controller instead (do not attach it to the optimizer yourself).
        module: what to transform: an attribute path of the LightningModule (``"model"``,
            ``"net.backbone"``), an ``nn.Module``, or None for the LightningModule itself.
            Transform before compiling: compile in ``configure_model`` or later.
        total_steps: length of a string schedule; default from the Trainer.
        example_inputs: inputs for tracing; default: the first call's arguments when needed.
        freeze_dropped: dropped units are not updated by the optimizer.
        log_metrics: log the raptr/* values (with ``logger=False`` they only reach
            ``trainer.callback_metrics``).
        **transform_options: passed to :func:`raptr_fx.transform` (``scaling``, ``seed``,
            ``include``, ``exclude``, ``granularity``, ``compile_mode``, ``compile_options``, tracer
            options).
    """

    def __init__(self, schedule: str | Schedule | None = None, *, controller: Controller | None = None,
                 module: str | nn.Module | None = None, total_steps: int | None = None,
                 example_inputs: Any = None, freeze_dropped: bool = True, log_metrics: bool = True,
                 **transform_options: Any):
        check_arguments("RaPTrLightningCallback", schedule, controller, total_steps, transform_options)
        if module is not None and not isinstance(module, (str, nn.Module)):
            raise TypeError(f"RaPTrLightningCallback: module must be an attribute path, an nn.Module or None, "
                            f"got {type(module).__name__} {module!r}")
        self.module = module
        self.freeze_dropped = freeze_dropped
        self.log_metrics = log_metrics
        self._adoption = Adoption("RaPTrLightningCallback", schedule, controller, total_steps,
                                  {**transform_options, "example_inputs": example_inputs})
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def controller(self) -> Controller | None:
        """The controller (None until the model is transformed)."""
        return self._adoption.controller

    def _target(self, pl_module: LightningModule) -> nn.Module:
        if isinstance(self.module, nn.Module):
            return self.module
        if self.module is None:
            return pl_module
        try:
            target = functools.reduce(getattr, self.module.split("."), pl_module)
        except AttributeError:
            raise ValueError(f"RaPTrLightningCallback: module={self.module!r} is not an attribute of "
                             f"{type(pl_module).__name__}") from None
        if not isinstance(target, nn.Module):
            raise TypeError(f"RaPTrLightningCallback: module={self.module!r} is a {type(target).__name__}, "
                            "not an nn.Module")
        return target

    @staticmethod
    def _total_steps(trainer: Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            estimated = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - no dataloader yet: the caller says to pass total_steps
            return None
        return int(estimated) if estimated != float("inf") else None

    # -- fit -------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            target = self._target(pl_module)
            self._adoption.adopt(target, self._total_steps(trainer), compiled=hasattr(target, ORIGINAL_MODULE))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"RaPTrLightningCallback: expected one optimizer, the LightningModule has "
                             f"{len(optimizers)}; make a controller with raptr_fx.transform and call "
                             "controller.step() once per training step yourself")
        self._optimizer = unwrap_optimizer(optimizers[0])
        # Steps after the real optimizer.step() and freezes what the controller freezes around it
        # (dropped units, width parts not kept). Lightning's closure runs the backward inside
        # step(), after the pre-step hook: on_before_optimizer_step, after that backward, freezes
        # for the step again.
        self._adoption.attach(self._optimizer, freeze_dropped=self.freeze_dropped)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        controller = self._adoption.controller
        if controller is None or unwrap_optimizer(optimizer) is not self._optimizer:
            return
        if self.freeze_dropped:
            controller.freeze_for_step(self._optimizer)
        # Logged here, after the closure's forward and before optimizer.step() moves the controller
        # on: the values on a row are those of the step whose loss is on that row.
        if self.log_metrics:
            pl_module.log_dict(metrics(controller), on_step=True, on_epoch=False)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._adoption.detach()
            self._optimizer = None

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self._adoption.state()
        return {} if state is None else {"controller": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "controller" in state_dict:
            self._adoption.load(state_dict["controller"])
