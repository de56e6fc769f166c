"""RaPTr for torchtitan: a model converter, enabled in a ``config_registry`` function.

    from raptr_fx.integrations.torchtitan import RaPTrConverter

    def llama3_8b_raptr() -> Trainer.Config:
        config = llama3_8b()
        config.model_spec = model_registry("8B", converters=[RaPTrConverter.Config(schedule="6-8-10-12")])
        config.training.disable_cuda_graphs = True
        return config

    torchrun ... -m torchtitan.train --module my_configs --config llama3_8b_raptr

Converters rewrite the model's config tree before the Trainer builds the model. This one wraps
the root config, so that:

* the model built on the meta device is transformed there (``raptr_fx.transform``), before
  torchtitan applies activation checkpointing, per-block ``torch.compile`` and ``fully_shard``
  (the gates then move onto those wrappers, outside them);
* the Trainer's own config supplies what the schedule needs: ``training.steps`` as its length,
  ``model_spec.post_optimizer_build_fn`` (chained) attaches the controller to torchtitan's
  optimizers, so it steps once per ``OptimizersContainer.step()``, and the checkpoint manager
  saves the controller (a DCP ``Stateful``, key ``"raptr_fx"``) with every checkpoint: a resumed
  run replays the gate sequence of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.models.common.attention import BaseAttention
from torchtitan.models.common.moe import MoE
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.protocols.module import Module

from ..controller import Controller, transform
from ..errors import RaptrError
from ..gates import check_compile_mode
from ._common import check_arguments

__all__ = ["RaPTrConverter", "STATE_KEY", "controller_of"]

STATE_KEY = "raptr_fx"  # the controller's entry in torchtitan checkpoints

# torchtitan's attention (RoPE, mask dispatch) and MoE routing are not symbolically traceable, and
# the model is on the meta device, where nothing can run: discovery treats them as leaves. The
# residual structure RaPTr needs is in the transformer blocks around them.
_LEAF_MODULES = (BaseAttention, MoE)

_CONTROLLER_ATTRIBUTE = "raptr_controller"


class RaPTrConverter(ModelConfigConverter):
    """Train a torchtitan model with RaPTr: list ``RaPTrConverter.Config(schedule=...)`` in
    ``model_registry(..., converters=[...])``; see the module docstring.

    Example:
        >>> spec = model_registry("debugmodel", converters=[RaPTrConverter.Config(schedule="2-4-6")])
        >>> config.model_spec = spec   # in a config_registry function; the Trainer does the rest
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        schedule: str
        """A RaPTr schedule string, e.g. "6-8-10-12" (units active per stage)."""

        total_steps: int | None = None
        """Length of the schedule; default: the Trainer's training.steps."""

        seed: int = 0
        """Decisions for step t depend on (seed, t) only: every rank drops the same blocks."""

        scaling: str | None = None
        """"inverse" or "none"; default: the schedule's own."""

        include: list[str] | None = None
        """Unit names or glob patterns to gate, e.g. ["layers.*"]; default: every droppable block."""

        exclude: list[str] | None = None
        """Unit names or glob patterns not to gate."""

        compile_mode: str = "regional"
        """What the gates do under torch.compile ("regional" or "cond"); see raptr_fx.transform."""

        freeze_dropped: bool = True
        """Dropped blocks are not updated by the optimizer (no momentum or weight decay step)."""

    def __init__(self, config: Config, **kwargs: Any):
        check_arguments("RaPTrConverter", config.schedule, None, config.total_steps, _transform_options(config))
        check_compile_mode(config.compile_mode)
        self.config = config

    def convert(self, model_config: Module.Config) -> Module.Config:
        if isinstance(model_config, _WithRaPTr):
            raise RaptrError("RaPTrConverter is listed twice in the converters: list it once")
        config_cls = _raptr_config_class(type(model_config))  # type: ignore[arg-type]  # a class is hashable
        return config_cls(**_init_fields(model_config), raptr=self.config)


class _WithRaPTr:
    """Marks a root model config wrapped by :class:`RaPTrConverter`."""

    __slots__ = ()


@functools.cache
def _raptr_config_class(config_cls: Any) -> Any:
    """``config_cls`` with a ``raptr`` field: its ``build()`` transforms the model it builds, and its
    ``update_from_config()`` reads the Trainer's config (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class RaPTrConfig(config_cls, _WithRaPTr):
        raptr: RaPTrConverter.Config

        # slots=True replaces the class, so super() does not work here: call the base explicitly.
        def update_from_config(self, *, config: Any, **kwargs: Any) -> None:
            config_cls.update_from_config(self, config=config, **kwargs)
            _adopt_trainer_config(self, config)

        def build(self, **kwargs: Any) -> nn.Module:
            if self.raptr.total_steps is None:
                raise RaptrError(f"RaPTrConverter: schedule {self.raptr.schedule!r} needs its length: torchtitan's "
                                 "Trainer sets it from training.steps; built without a Trainer, set "
                                 "RaPTrConverter.Config(total_steps=...)")
            model = config_cls.build(self, **kwargs)
            # The Trainer builds under torch.device("meta"); the controller's decisions and
            # predicate tensors live on the host.
            with torch.device("cpu"):
                controller = transform(model, self.raptr.schedule, total_steps=self.raptr.total_steps,
                                       leaf_modules=_LEAF_MODULES, **_transform_options(self.raptr))
            setattr(model, _CONTROLLER_ATTRIBUTE, controller)
            return model

    RaPTrConfig.__qualname__ = RaPTrConfig.__name__ = f"RaPTr{config_cls.__qualname__}"
    return RaPTrConfig


def _transform_options(config: RaPTrConverter.Config) -> dict[str, Any]:
    options = {"seed": config.seed, "compile_mode": config.compile_mode, "include": config.include,
               "exclude": config.exclude}
    if config.scaling is not None:
        options["scaling"] = config.scaling
    return options


def _init_fields(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def controller_of(model_parts: nn.Module | Iterable[nn.Module]) -> Controller | None:
    """The controller of a model built with :class:`RaPTrConverter` (``trainer.model_parts`` or one
    model), or None."""
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    found = [c for part in parts if (c := getattr(part, _CONTROLLER_ATTRIBUTE, None)) is not None]
    return found[0] if found else None


# -- the Trainer's config ---------------------------------------------------------------------------
def _adopt_trainer_config(model_config: Any, config: Any) -> None:
    """Called by the Trainer (``model_config.update_from_config``) before it builds anything."""
    from torchtitan.trainer import Trainer

    if not isinstance(config, Trainer.Config):  # an inference or RL caller: no training loop to follow
        return
    if config.parallelism.pipeline_parallel_degree > 1:
        raise RaptrError("RaPTrConverter: pipeline parallelism splits the model into stages after it is built, "
                         f"which raptr_fx does not follow (pipeline_parallel_degree="
                         f"{config.parallelism.pipeline_parallel_degree}): train without it")
    if not config.training.disable_cuda_graphs and _captures_cuda_graphs():
        raise RaptrError("RaPTrConverter: torchtitan captures the forward and backward in a CUDA graph "
                         "(training.disable_cuda_graphs=False), which would replay the first step's subnetwork "
                         "at every step, while RaPTr decides at each step which blocks run: set "
                         "--training.disable_cuda_graphs (per-block torch.compile still applies)")
    if model_config.raptr.total_steps is None:
        model_config.raptr = dataclasses.replace(model_config.raptr, total_steps=config.training.steps)
    spec = config.model_spec
    if spec is not None and spec.model is model_config and not _is_ours(spec.post_optimizer_build_fn):
        spec.post_optimizer_build_fn = _attach_after(spec.post_optimizer_build_fn,
                                                     freeze_dropped=model_config.raptr.freeze_dropped)
    if not isinstance(config.checkpoint, _SavesController):
        checkpoint_cls = _saving_checkpoint_class(type(config.checkpoint))  # type: ignore[arg-type]
        config.checkpoint = checkpoint_cls(**_init_fields(config.checkpoint))


def _captures_cuda_graphs() -> bool:
    """Whether torchtitan's ``wrap_with_cuda_graph`` would capture (its own condition)."""
    from torchtitan.tools import utils

    return utils.device_type == "cuda" and torch.cuda.is_available() and torch.version.hip is None


def _is_ours(fn: Callable[..., Any] | None) -> bool:
    return getattr(fn, "_raptr_fx_attach", False)


def _attach_after(previous: Callable[..., None] | None, *, freeze_dropped: bool) -> Callable[..., None]:
    """A ``post_optimizer_build_fn``: the model's own (e.g. MoE load balancing), then the controller's hooks."""

    def post_optimizer_build(optimizers: OptimizersContainer, model_parts: list[nn.Module], parallel_dims: Any) -> None:
        if previous is not None:
            previous(optimizers, model_parts, parallel_dims)
        controller = controller_of(model_parts)
        if controller is None:
            return
        # Each optimizer of the container freezes what the controller drops (and completes the state
        # dict DCP saves); the container, whose step() runs them all, steps the controller once.
        for optimizer in optimizers:
            controller.attach(optimizer, freeze_dropped=freeze_dropped, step_with_optimizer=False)
        controller.attach(optimizers, freeze_dropped=False)

    post_optimizer_build._raptr_fx_attach = True  # type: ignore[attr-defined]
    return post_optimizer_build


class _SavesController:
    """Marks a checkpoint manager config whose manager saves the controller."""

    __slots__ = ()


@functools.cache
def _saving_checkpoint_class(checkpoint_cls: Any) -> Any:
    """``checkpoint_cls`` whose ``build()`` adds the controller to the states the manager saves and loads."""

    class SavesController(checkpoint_cls, _SavesController):
        __slots__ = ()

        def build(self, **kwargs: Any) -> Any:
            states = kwargs.get("states")
            controller = controller_of(kwargs.get("model_parts", ()))
            if states is not None and controller is not None:
                states[STATE_KEY] = controller
            return checkpoint_cls.build(self, **kwargs)

    SavesController.__name__ = checkpoint_cls.__name__
    SavesController.__qualname__ = checkpoint_cls.__qualname__
    return SavesController
