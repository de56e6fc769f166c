"""RaPTr for the Hugging Face ``Trainer`` in one line: ``callbacks=[RaPTrCallback("6-8-10-12")]``."""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

from torch import nn
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.training_args import ParallelMode

from ..controller import Controller
from ..errors import RaptrWarning
from ..schedules import Schedule
from ._common import Adoption, check_arguments, metrics

__all__ = ["RaPTrCallback", "STATE_FILE", "TRAINER_STATE_KEY"]

log = logging.getLogger("raptr_fx")

STATE_FILE = "raptr_fx_state.json"  # written into every checkpoint-<step> directory
TRAINER_STATE_KEY = "raptr_fx"  # the same state in trainer_state.json's stateful_callbacks
# Not transformers' ExportableState: the Trainer restores those only with
# restore_callback_states_from_checkpoint=True (off by default), and by building a new callback from
# JSON args (a Schedule object is not one) that replaces the user's instance, and its controller, in the
# handler. Reading our own entry in on_train_begin needs neither.


class RaPTrCallback(TrainerCallback):
    """Train with RaPTr under a Hugging Face ``Trainer``.

    At train start the callback transforms ``trainer.model`` (``total_steps`` defaults to the
    Trainer's ``max_steps``); a transformers model, which needs ``torch.export`` to be traced,
    is transformed at its first forward call with the first training batch as example inputs,
    unless you pass ``example_inputs=``. The controller is attached to the real optimizer behind
    Accelerate's wrapper and steps once per optimizer step, whatever
    ``gradient_accumulation_steps`` is, so every micro-batch of a step runs the same subnetwork.
    Its state goes into each checkpoint directory (``raptr_fx_state.json``) and is restored by
    ``trainer.train(resume_from_checkpoint=...)``, wherever that checkpoint lies: the resumed run
    replays the gate sequence of an uninterrupted one. The same state is kept in the checkpoint's
    ``trainer_state.json`` (under ``stateful_callbacks["raptr_fx"]``), which is how a checkpoint
    moved out of ``output_dir`` is found. Each log row gets ``raptr/stage``, ``raptr/active_units``
    and ``raptr/expected_compute`` of the optimizer step that ended at that row's step (the one
    whose loss is logged), not of the next one.

    Under DDP (torchrun), pass ``TrainingArguments(ddp_find_unused_parameters=False)``: RaPTr does
    not need unused-parameter detection (skipped units get zero gradients), and the Trainer, which
    wraps the model before any callback event, otherwise turns it on; the callback warns then.

    Example:
        >>> from raptr_fx.integrations.transformers import RaPTrCallback
        >>> trainer = Trainer(model=model, args=args, train_dataset=data,
        ...                   callbacks=[RaPTrCallback("6-8-10-12")])
        >>> trainer.train()
        >>> trainer.train(resume_from_checkpoint=True)   # continues the same gate sequence

    Args:
        schedule: a string like ``"6-8-10-12"`` or a raptr_fx :class:`~raptr_fx.Schedule`.
        controller: an existing controller instead of a schedule (from ``raptr_fx.transform``);
            do not attach it to the optimizer yourself, the callback does.
        total_steps: length of a string schedule; default: the Trainer's ``max_steps``.
        example_inputs: inputs for tracing (tuple, dict or tensor); default: the first batch.
        freeze_dropped: dropped units are not updated by the optimizer (see ``Controller.attach``).
        **transform_options: passed to :func:`raptr_fx.transform`: ``scaling``, ``seed``,
            ``include``, ``exclude``, ``granularity``, ``compile_mode``, ``compile_options`` and the
            tracer options.
    """

    def __init__(self, schedule: str | Schedule | None = None, *, controller: Controller | None = None,
                 total_steps: int | None = None, example_inputs: Any = None, freeze_dropped: bool = True,
                 **transform_options: Any):
        check_arguments("RaPTrCallback", schedule, controller, total_steps, transform_options)
        self.freeze_dropped = freeze_dropped
        self._adoption = Adoption("RaPTrCallback", schedule, controller, total_steps,
                                  {**transform_options, "example_inputs": example_inputs})
        self._last_step_metrics: dict[str, float] | None = None  # what the last optimizer step ran

    @property
    def controller(self) -> Controller | None:
        """The controller (None until the model is transformed)."""
        return self._adoption.controller

    # -- set-up ----------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        # The Trainer fixed its DDP options when it built its Accelerator, before this first
        # event, so the callback cannot turn find_unused_parameters off; it can only say so.
        if model is not None and _trainer_finds_unused_parameters(args, model):
            warnings.warn("RaPTrCallback: the Trainer will wrap the model in DDP with find_unused_parameters=True "
                          "(ddp_find_unused_parameters is None). RaPTr does not need it (skipped units get zero "
                          "gradients) and it costs a graph walk every step: pass "
                          "TrainingArguments(ddp_find_unused_parameters=False)", RaptrWarning, stacklevel=2)

    # -- training --------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        adoption = self._adoption
        if model is None or optimizer is None:
            raise ValueError("RaPTrCallback: the Trainer passed no model or optimizer to on_train_begin")
        adoption.adopt(model, state.max_steps if state.max_steps > 0 else None,
                       compiled=bool(getattr(args, "torch_compile", False)))
        self._last_step_metrics = None
        if state.global_step > 0:
            self._restore(args, state)
        elif adoption.made_here and adoption.controller is not None and adoption.controller.step_count:
            adoption.seek(0)  # a second trainer.train() from scratch starts the schedule again
        adoption.attach(optimizer, self.freeze_dropped)

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        # The Trainer does not tell callbacks which checkpoint it resumes from, but it loaded this
        # state from that checkpoint's trainer_state.json: the entry saved there comes first.
        stored = _callback_states(state).get(TRAINER_STATE_KEY)
        if isinstance(stored, dict) and stored.get("global_step") == state.global_step:
            self._adoption.load(stored["controller"])
            log.info("raptr_fx: restored the controller from the checkpoint's trainer state (step %d)",
                     stored["controller"]["step"])
            return
        # Checkpoints written before the trainer-state entry existed have only the state file.
        candidates: list[str] = []
        resumed = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resumed, str):
            candidates.append(resumed)
        candidates.append(os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}"))
        for directory in candidates:
            path = os.path.join(directory, STATE_FILE)
            if os.path.isfile(path):
                with open(path) as f:
                    saved = json.load(f)
                if saved.get("global_step") == state.global_step:
                    self._adoption.load(saved["controller"])
                    log.info("raptr_fx: restored the controller from %s (step %d)", path,
                             saved["controller"]["step"])
                    return
        warnings.warn(f"RaPTrCallback: resuming at step {state.global_step} but the checkpoint's trainer state has "
                      f"no {TRAINER_STATE_KEY!r} entry and no {STATE_FILE} was found in {candidates}; continuing "
                      f"the schedule at step {state.global_step} with this callback's seed (the same gate "
                      "sequence if the seed is unchanged)", RaptrWarning, stacklevel=2)
        self._adoption.seek(state.global_step)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        # The controller steps inside optimizer.step(), before the Trainer logs this step's loss:
        # keep what this step ran for the log row.
        controller = self._adoption.controller
        if controller is not None:
            self._last_step_metrics = metrics(controller)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        # The Trainer writes its state into each checkpoint after this event.
        saved = self._adoption.state()
        if saved is not None:
            _callback_states(state)[TRAINER_STATE_KEY] = {"global_step": state.global_step, "controller": saved}

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._adoption.detach()  # the gates stay: eval() runs the full model anyway

    # -- checkpoints -----------------------------------------------------------------------
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        saved = self._adoption.state()
        if saved is None or not state.is_world_process_zero:
            return
        directory = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
        if not os.path.isdir(directory):
            log.warning("raptr_fx: checkpoint directory %s not found; controller state not saved", directory)
            return
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump({"global_step": state.global_step, "controller": saved}, f, indent=1)

    # -- logs ------------------------------------------------------------------------------
    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        values = self._last_step_metrics
        if values is None or logs is None or any(k.startswith(("eval_", "test_")) for k in logs):
            return
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def _callback_states(state: TrainerState) -> dict[str, Any]:
    """The callbacks' entries the Trainer writes into each checkpoint's ``trainer_state.json``: a dict
    at run time (transformers 5 annotates it as a list of callbacks)."""
    return state.stateful_callbacks  # type: ignore[return-value]


def _trainer_finds_unused_parameters(args: TrainingArguments, model: nn.Module) -> bool:
    """Whether the Trainer will wrap ``model`` in DDP with ``find_unused_parameters=True``.

    Mirrors ``Trainer._build_accelerator_args`` (transformers 5.x): left None, the option is
    True except for a transformers model with activation checkpointing.
    """
    if args.parallel_mode != ParallelMode.DISTRIBUTED or args.fsdp or args.deepspeed:
        return False
    if args.ddp_find_unused_parameters is not None:
        return False  # the user chose; RaPTr works either way
    checkpointing = bool(getattr(model, "is_activation_checkpointing", False) or args.activation_checkpointing)
    return not (isinstance(model, PreTrainedModel) and checkpointing)
