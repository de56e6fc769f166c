"""``transform``: the adoption half of raptr_fx, and the stage controller it returns."""

from __future__ import annotations

import fnmatch
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from operator import attrgetter, contains, gt, is_not, lt
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ._compat import COMPILED_CALL, ORIGINAL_MODULE, supports_step_hooks
from .cutting import (Cut, CutState, FrozenParts, RewrittenHeads, install_cuts, is_cut, is_dtensor, local_part, remove_cuts,
                      tensor_parallel_width_error)
from .discovery import Discovery, discover, no_blocks_error
from .errors import RaptrError
from .gates import (CompileFallbackCheck, CompileMode, GatedForward, GateState, check_compile_mode, gate_of,
                    install_gate, move_gate, remove_gates)
from .schedules import RaPTr, Schedule, StagePlan, overall_compute, plan
from .units import Block, WidthGroup
from .usage import UsageMonitor
from .width import width_groups

__all__ = ["Controller", "transform", "restore"]

log = logging.getLogger("raptr_fx")

_WIDTH_STREAM = 0x5EED_0F_1D7  # offsets the width draws' seeds from the depth draws' seeds

ScalingRule = str | Callable[[float], float]
UnitKey = str | int  # a unit or width group, by name or by index
WidthPin = float | Sequence[int] | None  # a kept fraction, the kept part indices, or None: every part


@dataclass
class _Pins:
    """Decisions pinned by :meth:`Controller.force`, by unit or group index; they replace the drawn ones."""

    active: dict[int, bool] = field(default_factory=dict)
    scale: dict[int, float] = field(default_factory=dict)
    width: dict[int, float | list[int] | None] = field(default_factory=dict)

    def over(self, outer: _Pins | None) -> _Pins:
        """These pins on top of those of an enclosing ``force``."""
        if outer is None:
            return self
        return _Pins({**outer.active, **self.active}, {**outer.scale, **self.scale}, {**outer.width, **self.width})

# The per-step checks over every unit run as C loops (map, compress) over lists kept beside the gates
# (Controller._watch_gates):
# a Python loop costs a few thousand instructions per unit and step, which on a deep, narrow model
# (48 units, 32 rows of width 64) was about 1.7% of the step (benchmarks/instructions.py). Modules'
# attributes are read from their instance dicts (``vars``): getattr on a module goes through
# nn.Module's __getattr__ hook, several times the cost of a dict look-up. Even so, each element a C
# loop visits costs a few hundred instructions in this interpreter: what is left is mostly per unit.
_TRAINING = attrgetter("training")  # not from vars: torch.compile's OptimizedModule makes it a property


def _dict_items(dicts: Iterable[dict], key: str) -> Iterator[Any]:
    return map(dict.__getitem__, dicts, repeat(key))


class Controller:
    """Drives the gates of a transformed model: one decision set per optimizer step.

    Decisions for step t come from (seed, t) alone, so every DDP rank drops the same
    units with no communication, and a resumed run replays the same gate sequence.

    Example:
        >>> ctl = raptr_fx.transform(model, "6-8-10-12", total_steps=10_000)
        >>> ctl.attach(optimizer)   # steps itself after optimizer.step(); dropped units not updated
        >>> for batch in loader:
        ...     loss = model(batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model: nn.Module, blocks: Sequence[Block], schedule: Schedule,
                 scaling: ScalingRule, seed: int, compile_mode: CompileMode = "regional",
                 compile_options: dict[str, Any] | None = None, width_groups: Sequence[WidthGroup] = ()):
        self.model = model
        self.blocks = list(blocks)
        self.width_groups = list(width_groups)
        self.schedule = schedule
        self.seed = seed
        self.scaling = _scaling_function(scaling)
        self._state = GateState(len(self.blocks), compile_mode, compile_options)
        self._unscaled = scaling == "none"  # every kept unit's factor is 1: no per-unit call
        self._generator = torch.Generator()  # seeded anew for every draw: decisions come from (seed, step) alone
        self._exact_pool: tuple[Schedule, list[float], list[int], int, list[bool]] | None = None  # see _sample
        self._pins: _Pins | None = None  # decisions pinned by force()
        self._cuts = CutState(self.width_groups)
        self._frozen_parts = FrozenParts(self._cuts, lambda: set(self.active_blocks))
        self._hooks: list[Any] = []
        self._loaded_optimizers: set[torch.optim.Optimizer] = set()  # load_state_dict ran, not stepped since
        self._stepping_with: torch.optim.Optimizer | None = None
        self._step = 0
        modules = dict(model.named_modules())
        self._consumers = [modules[g.cut_targets(-1)[0]] for g in self.width_groups]  # their weight's device
        self._gates: list[GatedForward] = []
        self._cut_forwards: list[Cut | RewrittenHeads] = []
        try:  # all or nothing: a failure leaves no gate behind
            if schedule.gates_depth:
                for i, b in enumerate(self.blocks):
                    self._gates.append(install_gate(model, b, i, self._state, scaled=scaling != "none"))
            self._watch_gates()
            self._cut_forwards = install_cuts(model, self.width_groups, self._cuts,
                                              scaled=schedule.width_scaling != "none")
            self._apply()
        except BaseException:
            remove_gates(model)
            remove_cuts(model)
            raise
        # Tied weights across units (rare): a dropped unit's parameter that a running unit shares keeps
        # its gradient. Checked once here; without ties, no per-step set of running parameters.
        owners = [id(p) for gate in self._gates for p in set(gate.parameters())]
        self._units_share_parameters = len(owners) != len(set(owners))
        self._updated = [False] * len(self._gates)  # units whose parameters an optimizer has state for
        self._updated_loaded = False  # _updated comes from a checkpoint: see _forget_placeholder_state
        self._usage = UsageMonitor(self)
        self._check_compile_fallback = CompileFallbackCheck()
        self._state.follow_wrappers = self._follow_wrappers

    def _follow_wrappers(self) -> None:
        """Move each gate onto the outermost wrapper in its unit's slot.

        ``torch.compile`` or activation checkpointing applied to a block after ``transform`` would
        otherwise hold the gate inside: a skipped unit would still enter the wrapper, and a gate that
        breaks the graph inside a checkpoint makes dynamo give up on the whole block. Checked when an
        optimizer is attached and at every step (``GatedForward.displaced`` for every unit at once).
        """
        # Each parent's children, names and modules in order, as when the gates were last placed: then every
        # slot still holds its gate's module (C list copies and comparisons, identity first: no call per unit).
        unchanged = all(list(modules) == names and list(modules.values()) == held for modules, names, held in
                        zip(_dict_items(self._slot_parents, "_modules"), self._parent_names, self._parent_modules))
        if unchanged and not any(map(contains, self._gate_dicts_on_forward, repeat(COMPILED_CALL))):
            return
        for i, gate in enumerate(self._gates):
            if gate.displaced():
                self._gates[i] = move_gate(self.model, gate)
        self._watch_gates()

    def _watch_gates(self) -> None:
        """The lists the per-step checks read (see _TRAINING), built again whenever a gate moves."""
        gates = self._gates
        parents = list({id(g.slot[0]): g.slot[0] for g in gates}.values())
        self._slot_parents = [vars(parent) for parent in parents]
        self._parent_names = [list(parent._modules) for parent in parents]
        self._parent_modules = [list(parent._modules.values()) for parent in parents]
        self._gate_modules = [g.module for g in gates]
        # displaced()'s second question, asked only of gates standing on ``forward``
        self._gate_dicts_on_forward = [vars(g.module) for g in gates if g.place == "forward"]
        # where each unit's parameters live (GatedForward.parameters looks them up the same way)
        self._parameter_owners = [[vars(owner) for owner, _ in g.slots] for g in gates]
        self._parameter_names = [[name for _, name in g.slots] for g in gates]

    # -- the step ------------------------------------------------------------------------
    def step(self) -> None:
        """Advance to the next optimizer step and draw its subnetwork."""
        previous = self.stage
        self._step += 1
        self._follow_wrappers()
        self._apply()
        self._check_compile_fallback()
        if self.stage != previous:
            row = self.plan()[self.stage]
            log.info("raptr_fx: step %d enters stage %d: %.1f of %d units active, %.0f%% of unit compute",
                     self._step, self.stage, row.active, len(self.blocks), 100 * row.compute)

    def _apply(self) -> None:
        keep_p = self.schedule.keep_probabilities(self._step, len(self.blocks))
        keep = self._sample(keep_p)
        if self._unscaled:
            scale = [1.0] * len(keep)
        else:
            scale = [self.scaling(p) if k and p < 1.0 else 1.0 for k, p in zip(keep, keep_p)]
        pins = self._pins
        if pins is not None:
            for i, on in pins.active.items():
                keep[i] = on
            for i, factor in pins.scale.items():
                scale[i] = factor
        self._state.set(keep, scale)
        if self.width_groups:
            drawn = self._sample_width(self.schedule.width_fraction(self._step))
            kept = self._pinned_width(drawn, pins.width) if pins is not None and pins.width else drawn
            inverse = self.schedule.width_scaling == "inverse"
            scales = [g.parts / len(k) if inverse and k is not None else 1.0 for g, k in zip(self.width_groups, kept)]
            self._cuts.set(kept, scales, [m.weight.device for m in self._consumers])

    def _sample_width(self, fraction: float) -> list[torch.Tensor | None]:
        """round(f x parts) parts per group, drawn without replacement; None where every part runs.

        Groups with the same number of parts are drawn together (one random matrix, sorted by
        row): one draw per group size, not per group, keeps the host cost flat in depth.
        """
        kept: list[torch.Tensor | None] = [None] * len(self.width_groups)
        if fraction >= 1.0:
            return kept
        # Its own stream of (seed, step), so adding width leaves the depth decisions as they were.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self._step + _WIDTH_STREAM) % (2**63))
        by_parts: dict[int, list[int]] = {}
        for g, group in enumerate(self.width_groups):
            by_parts.setdefault(group.parts, []).append(g)
        for parts, members in sorted(by_parts.items()):
            count = max(1, round(fraction * parts))
            if count >= parts:
                continue
            draws = torch.rand(len(members), parts, generator=generator).argsort(dim=1)[:, :count]
            for g, row in zip(members, draws.sort(dim=1).values):
                kept[g] = row
        return kept

    def _pinned_width(self, kept: list[torch.Tensor | None],
                      pinned: dict[int, float | list[int] | None]) -> list[torch.Tensor | Sequence[int] | None]:
        """The drawn cuts with the pinned groups' replaced; a pinned fraction is drawn as the schedule draws it."""
        out: list[torch.Tensor | Sequence[int] | None] = list(kept)
        draws: dict[float, list[torch.Tensor | None]] = {}
        for g, value in pinned.items():
            if isinstance(value, float):
                out[g] = (draws[value] if value in draws else draws.setdefault(value, self._sample_width(value)))[g]
            else:
                out[g] = value
        return out

    def _sample(self, keep_p: list[float]) -> list[bool]:
        if all(p >= 1.0 for p in keep_p):  # every unit runs (FullModel, a full last stage): both draws keep all
            return [True] * len(keep_p)
        generator = self._generator.manual_seed((self.seed * 1_000_003 + self._step) % (2**63))
        if self.schedule.sampling == "exact":
            free, count, keep = self._exact_pool_for(keep_p)
            # p * |free| units drawn without replacement: constant cost, balanced across ranks.
            keep = keep.copy()  # the fixed units on
            for j in torch.randperm(len(free), generator=generator).tolist()[:count]:
                keep[free[j]] = True
            return keep
        draws = torch.rand(len(keep_p), generator=generator).tolist()
        return list(map(lt, draws, keep_p))

    def _exact_pool_for(self, keep_p: list[float]) -> tuple[list[int], int, list[bool]]:
        """The units an exact draw picks from (all but the schedule's fixed ones), how many it picks, and
        the decisions with only the fixed units on; worked out again only when the probabilities change."""
        pool = self._exact_pool
        if pool is None or pool[0] is not self.schedule or pool[1] != keep_p:
            fixed = self.schedule.fixed(len(keep_p))
            free = [i for i in range(len(keep_p)) if i not in fixed]
            pool = self._exact_pool = (self.schedule, list(keep_p), free, round(sum(keep_p[i] for i in free)),
                                       [i in fixed for i in range(len(keep_p))])
        return pool[2], pool[3], pool[4]

    # -- what users read -------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far."""
        return self._step

    @property
    def stage(self) -> int:
        return self.schedule.stage_index(self._step)

    @property
    def active(self) -> list[bool]:
        """This step's decision per unit (True: runs)."""
        return list(self._state.keep)

    @property
    def active_blocks(self) -> list[str]:
        return [b.name for b, k in zip(self.blocks, self._state.keep) if k]

    @property
    def kept_parts(self) -> dict[str, int]:
        """This step's kept parts per width group (hidden units or key/value heads), by group name."""
        return {g.name: g.parts if k is None else len(k) for g, k in zip(self.width_groups, self._cuts.kept)}

    @property
    def kept_indices(self) -> dict[str, list[int] | None]:
        """This step's kept part indices per width group, by group name; None where every part runs."""
        return {g.name: None if k is None else list(k) for g, k in zip(self.width_groups, self._cuts.kept)}

    # -- pinning decisions -------------------------------------------------------------------
    @contextmanager
    def force(self, *, active: Sequence[bool] | Mapping[UnitKey, bool] | None = None,
              scale: Sequence[float] | Mapping[UnitKey, float] | None = None,
              width: float | Mapping[UnitKey, WidthPin] | None = None) -> Iterator[Controller]:
        """Pin decisions inside a ``with`` block; on exit the drawn decisions of the current step come back.

        For tests, benchmarks and debugging a run: which units run and which width parts are kept,
        instead of the draw from (seed, step). The pins hold across :meth:`step` (the schedule still
        advances; only what is pinned is replaced), and a nested ``force`` pins on top of this one.

        Args:
            active: which units run: one bool per unit (``controller.blocks`` order), or
                ``{unit name or index: bool}`` for some units (the others are drawn as usual).
            scale: the factor on a running unit's update, in the same two forms. A unit pinned by
                ``active`` runs unscaled (a pinned unit has no keep probability) unless ``scale`` names it.
            width: the kept parts of the width groups: one fraction in (0, 1] for every group, or
                ``{group name or index: fraction, kept part indices, or None (every part)}``. A fraction
                keeps round(f x parts) parts drawn as the schedule draws them; the cut's output scale
                follows the schedule's ``width_scaling``.

        Example:
            >>> with ctl.force(active={"transformer.h.1": False}, width={"transformer.h.0.mlp:mlp": [0, 3]}):
            ...     loss = model(idx).pow(2).mean()  # layer 1 skipped; hidden units 0 and 3 of layer 0's MLP
        """
        pins = _Pins()
        if active is not None:
            if not self._gates:
                raise ValueError(f"active={active!r}: this controller's schedule cuts width only and gates no "
                                 "unit; pin width= instead")
            pins.active = self._per_unit(active, "active", lambda v: isinstance(v, bool), "True or False")
            pins.scale = dict.fromkeys(pins.active, 1.0)
        if scale is not None:
            if not self._gates:
                raise ValueError(f"scale={scale!r}: this controller's schedule cuts width only and gates no unit")
            pins.scale.update({i: float(v) for i, v in self._per_unit(
                scale, "scale", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                "a positive number").items()})
        if width is not None:
            pins.width = self._width_pins(width)
        previous = self._pins
        self._pins = pins.over(previous)
        try:
            self._apply()
            yield self
        finally:
            self._pins = previous
            self._apply()

    def _per_unit(self, values: Sequence[Any] | Mapping[UnitKey, Any], argument: str,
                  valid: Callable[[Any], bool], expected: str) -> dict[int, Any]:
        """``force``'s per-unit argument as {unit index: value}; a ValueError naming what is wrong."""
        names = [b.name for b in self.blocks]
        if isinstance(values, Mapping):
            pinned = {_index(key, names, argument, "unit"): value for key, value in values.items()}
        elif isinstance(values, Sequence) and not isinstance(values, str):
            if len(values) != len(names):
                raise ValueError(f"{argument} has {len(values)} values, the controller has {len(names)} units "
                                 f"{names}: give one per unit, or a dict {{unit name or index: value}}")
            pinned = dict(enumerate(values))
        else:
            raise ValueError(f"{argument} must be a list with one value per unit or a dict {{unit name or index: "
                             f"value}}, got {values!r}")
        bad = next(((i, v) for i, v in pinned.items() if not valid(v)), None)
        if bad is not None:
            raise ValueError(f"{argument} for unit {names[bad[0]]} must be {expected}, got {bad[1]!r}")
        return pinned

    def _width_pins(self, width: float | Mapping[UnitKey, WidthPin]) -> dict[int, float | list[int] | None]:
        names = [g.name for g in self.width_groups]
        if not names:
            raise ValueError(f"width={width!r}: this controller cuts no width (its schedule has no width stages)")
        if not isinstance(width, Mapping):
            return {g: _width_pin(width, group) for g, group in enumerate(self.width_groups)}
        pinned = {_index(key, names, "width", "width group"): value for key, value in width.items()}
        return {g: _width_pin(value, self.width_groups[g]) for g, value in pinned.items()}

    def plan(self) -> list[StagePlan]:
        """Per-stage expected compute, weighted by FLOPs share when known, else by parameters;
        width cuts count as the kept fraction of their groups' compute."""
        by_flops = all(b.flops_share is not None for b in self.blocks) and all(
            g.flops_share is not None for g in self.width_groups)
        if by_flops:
            weights = [b.flops_share or 0.0 for b in self.blocks]  # all known here
        else:
            weights = [float(b.params) for b in self.blocks]
        cut = {b.name: 0.0 for b in self.blocks}
        for group in self.width_groups:
            cut[group.unit] += (group.flops_share or 0.0) if by_flops else float(group.params)
        return plan(self.schedule, len(self.blocks), weights, [cut[b.name] for b in self.blocks])

    @property
    def expected_compute(self) -> float | None:
        """Share of the units' compute that runs over the whole schedule (None if open-ended)."""
        return overall_compute(self.plan())

    # -- optimizer -------------------------------------------------------------------------
    def attach(self, optimizer: Any, *, freeze_dropped: bool = True,
               step_with_optimizer: bool = True) -> "Controller":
        """Hook into ``optimizer``: a torch optimizer, or a wrapper of one (Accelerate's
        ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), whose inner optimizer is used.

        Args:
            freeze_dropped: units dropped this step are not updated (their grads are set to None
                before ``optimizer.step()``, which built-in optimizers skip). Without it, zero
                gradients would still move them through Adam momentum and weight decay. Width
                parts not kept are saved before the step and written back after it (parameters
                and optimizer state of the parameter's shape).
            step_with_optimizer: call :meth:`step` after every ``optimizer.step()``. Only one
                optimizer may step the controller; attach a second one with ``False``.

        A step that trains nothing (no gradients, or the zero-lr step with zero gradients by which
        ``torch.distributed.checkpoint`` initialises optimizer state) is ignored. The optimizer's
        ``state_dict()`` gives units not run yet zero state, so DCP checkpoints load strictly.

        Example:
            >>> ctl.attach(optimizer)            # or accelerator.prepare(...)'s optimizer
        """
        optimizer = unwrap_optimizer(optimizer)
        self._follow_wrappers()  # the recipe wraps blocks (compile, checkpointing) before it builds the optimizer
        if step_with_optimizer and self._stepping_with is not None:
            raise ValueError(f"the controller already steps with {type(self._stepping_with).__name__}; attach "
                             "another optimizer with step_with_optimizer=False, or the schedule would "
                             "advance once per optimizer")
        # A step that trains nothing (DCP's optimizer state initialisation, a step without gradients)
        # leaves the gradients, the frozen parts and the controller alone: decided before the step,
        # read by every hook of this optimizer for that step.
        training = [False]

        def before_step(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            # args holds the optimizer itself, then step()'s own arguments. A closure makes the
            # gradients (LBFGS, Lightning): a training step, though none exist yet.
            closure = args[1] if len(args) > 1 else kwargs.get("closure")
            training[0] = closure is not None or not _trains_nothing(opt)
            if not training[0]:
                return
            if self._loaded_optimizers:
                self._forget_placeholder_state()
            if freeze_dropped:
                self.release_dropped_grads()
                if self.width_groups:
                    self._frozen_parts.save(opt)

        def after_step(opt: torch.optim.Optimizer, *_: Any) -> None:
            if not training[0]:
                return
            training[0] = False
            if freeze_dropped and self.width_groups:  # before step() below, which draws the next step's cuts
                self._frozen_parts.restore(opt)
            self._note_updated_units(opt)
            if step_with_optimizer:
                self.step()

        self._hooks.append(optimizer.register_step_pre_hook(before_step))
        self._hooks.append(optimizer.register_step_post_hook(after_step))
        # Distributed checkpoints (DCP) need optimizer state for every parameter; see _complete_state.
        self._hooks.append(optimizer.register_state_dict_post_hook(self._complete_state))
        self._hooks.append(optimizer.register_load_state_dict_post_hook(self._loaded_optimizers.add))
        if step_with_optimizer:
            self._stepping_with = optimizer
        return self

    def _note_updated_units(self, optimizer: torch.optim.Optimizer) -> None:
        """Mark the units whose parameters now have optimizer state (a unit is marked once, so
        this costs nothing once every unit has run a step). An optimizer that keeps no state (SGD
        without momentum) has none to mark: looking would cost a scan of every unit at every step."""
        if not optimizer.state or all(self._updated):
            return
        for i, gate in enumerate(self._gates):
            if not self._updated[i] and any(p in optimizer.state for p in gate.parameters()):
                self._updated[i] = True

    def _complete_state(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        """``optimizer.state_dict()`` post-hook: give every parameter of a unit that has not been
        updated yet the optimizer's state at zero steps (zero tensors, shaped as another parameter's).

        A unit dropped at every step so far has no optimizer state, while DCP loads an optimizer
        strictly only if every parameter has some. Only the returned dict gains it: the optimizer
        is untouched. On load, the first training step forgets it again (the loaded controller says
        which units were not updated), so the resumed run is the uninterrupted one, for any optimizer.
        """
        state = state_dict["state"]
        if not state:  # no state at all (SGD without momentum): DCP initialises it with a zero-lr step
            return
        in_units = {id(p) for gate in self._gates for p in gate.parameters()}
        for group, saved_group in zip(optimizer.param_groups, state_dict["param_groups"]):
            for param, index in zip(group["params"], saved_group["params"]):
                if index in state or id(param) not in in_units or not param.requires_grad:
                    continue
                placeholder = _state_at_zero_steps(optimizer, param)
                if placeholder is None:
                    return  # state not shaped like the parameters (e.g. factored): DCP then names the gap
                state[index] = placeholder

    def _forget_placeholder_state(self) -> None:
        """After an optimizer was loaded: units not updated when it was saved have the placeholder
        state of :meth:`_complete_state`; drop it, so they start as in the uninterrupted run.
        Only with a loaded controller: a fresh one (a new schedule on a loaded optimizer) knows nothing
        of the checkpoint, so the loaded state stays."""
        if not self._updated_loaded:
            self._loaded_optimizers.clear()
            return
        shared = ({id(p) for gate, updated in zip(self._gates, self._updated) if updated for p in gate.parameters()}
                  if self._units_share_parameters else set())  # tied to an updated unit: real state
        for optimizer in self._loaded_optimizers:
            for updated, gate in zip(self._updated, self._gates):
                if not updated:
                    for param in gate.parameters():
                        if id(param) not in shared:
                            optimizer.state.pop(param, None)
        self._loaded_optimizers.clear()

    def release_dropped_grads(self) -> None:
        """Set the gradients of this step's dropped units to None (shared parameters excepted).

        Units in eval mode ran whole (the gates are off there), so their gradients are real and kept.
        """
        # training > keep: in training mode and not kept (booleans); C loops over the units, see _TRAINING.
        dropped = list(map(gt, map(_TRAINING, self._gate_modules), self._state.keep))
        if not any(dropped):
            return
        running = ({id(p) for gate, d in zip(self._gates, dropped) if not d for p in gate.parameters()}
                   if self._units_share_parameters else set())
        # GatedForward.parameters() of the dropped units, looked up as it does, and only those holding a
        # gradient visited in Python (a skipped unit's parameters usually have none: nothing to release).
        owners = chain.from_iterable(compress(self._parameter_owners, dropped))
        names = chain.from_iterable(compress(self._parameter_names, dropped))
        params: list[Any] = list(map(dict.get, _dict_items(owners, "_parameters"), names))  # None: no such parameter now
        for p in compress(params, map(is_not, map(getattr, params, repeat("grad"), repeat(None)), repeat(None))):
            if p.requires_grad and id(p) not in running:
                p.grad = None

    def freeze_for_step(self, optimizer: Any) -> None:
        """Do again, after the backward, what ``attach(freeze_dropped=True)`` does before ``optimizer.step()``.

        For an optimizer whose ``step(closure)`` runs the backward itself (Lightning's automatic
        optimization, LBFGS): the pre-step hook fires before the step's gradients exist, so the
        dropped units' gradients must be released again after the closure's backward. Width parts
        need nothing more: what they freeze follows the step's decisions, not its gradients.
        ``optimizer`` is accepted for symmetry with :meth:`attach` (a wrapper is fine).
        """
        unwrap_optimizer(optimizer)
        self.release_dropped_grads()

    def detach(self) -> None:
        """Remove the hooks that :meth:`attach` put on optimizers; the gates stay.

        For a new optimizer (a second ``fit``/``train`` call): ``detach()``, then ``attach(new)``.
        """
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._loaded_optimizers.clear()
        self._stepping_with = None

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The step, seed and unit names; the controller is a ``torch.distributed.checkpoint`` Stateful.

        Example:
            >>> dcp.save({"model": model_sd, "optim": optim_sd, "raptr": ctl}, checkpoint_id=path)
        """
        state = {"step": self._step, "seed": self.seed, "blocks": [b.name for b in self.blocks],
                 "updated": list(self._updated)}
        if self.width_groups:
            state["width_groups"] = [g.name for g in self.width_groups]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [b.name for b in self.blocks]
        if state.get("blocks", names) != names:
            raise RaptrError(f"checkpoint was made for units {state['blocks']}, this model has {names}")
        groups = [g.name for g in self.width_groups]
        if state.get("width_groups", []) != groups:
            raise RaptrError(f"checkpoint was made for width groups {state.get('width_groups', [])}, "
                             f"this controller cuts {groups}")
        self.seed = int(state["seed"])
        self._step = int(state["step"])
        # Older checkpoints do not say: count every unit as updated, so no optimizer state is dropped.
        self._updated = [bool(u) for u in state.get("updated", [True] * len(self._gates))]
        self._updated_loaded = True
        self._apply()
        self._usage.restart()

    # -- undo --------------------------------------------------------------------------------
    def remove(self) -> nn.Module:
        """Take the gates and optimizer hooks off; the model behaves exactly as before."""
        self.detach()
        self._usage.remove()
        remove_gates(self.model)
        remove_cuts(self.model)
        return self.model

    def watched_modules(self) -> list[nn.Module]:
        """The modules whose forward raptr_fx replaced: gated units and cut projections."""
        return self._gate_modules + [c.module for c in self._cut_forwards]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind trainer wrappers: Accelerate keeps it in ``.optimizer``,
    Lightning in ``._optimizer``. Hooks must go on that one, where ``step()`` really runs."""
    current = optimizer
    for _ in range(8):  # wrappers of wrappers, never a cycle
        inner = next((getattr(current, name) for name in ("optimizer", "_optimizer")
                      if isinstance(getattr(current, name, None), torch.optim.Optimizer)), None)
        if inner is None or inner is current:
            break
        current = inner
    if not (supports_step_hooks(current)):
        raise TypeError(f"attach() needs a torch.optim.Optimizer (or a trainer's wrapper of one), got "
                        f"{type(optimizer).__name__}: pass the optimizer that updates the model's parameters")
    return current


def _trains_nothing(optimizer: torch.optim.Optimizer) -> bool:
    """True for an ``optimizer.step()`` that cannot train anything: no parameter has a gradient, or
    DCP's optimizer state initialisation (``get_state_dict``/``set_state_dict`` on an optimizer
    without state set every gradient to zero and the learning rates to 0, then step).

    Cheap on a training step: the first parameter with a gradient answers the first question,
    and the second is asked only of an optimizer without state whose learning rates are all 0.
    """
    grads = (p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None)
    if next(grads, None) is None:
        return True
    if optimizer.state or any(float(group.get("lr", 1.0)) != 0.0 for group in optimizer.param_groups):
        return False
    return not any(local_part(g).any() for group in optimizer.param_groups for p in group["params"]
                   if (g := p.grad) is not None)


def _state_at_zero_steps(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, Any] | None:
    """Optimizer state for ``param`` shaped as another parameter's: zero tensors (the parameter's shape,
    mesh and placements for tensors shaped like that parameter, scalars for scalars), other values
    as they are. None if no parameter has state, or a state tensor has another shape."""
    for other, pattern in optimizer.state.items():
        if not pattern:
            continue
        state: dict[str, Any] = {}
        for key, value in pattern.items():
            if not isinstance(value, torch.Tensor):
                state[key] = value
            elif value.dim() == 0:
                state[key] = torch.zeros_like(value)
            elif value.shape == other.shape:
                state[key] = torch.zeros_like(param, dtype=value.dtype)
            else:
                return None
        return state
    return None


def _index(key: Any, names: list[str], argument: str, kind: str) -> int:
    """A unit's or width group's index from its name or index."""
    if isinstance(key, str) and key in names:
        return names.index(key)
    if isinstance(key, int) and not isinstance(key, bool) and -len(names) <= key < len(names):
        return key % len(names)
    raise ValueError(f"{argument} names {key!r}, which is no {kind} of this controller; they are {names} "
                     f"(by name, or by index 0 to {len(names) - 1})")


def _width_pin(value: Any, group: WidthGroup) -> float | list[int] | None:
    """One group's pinned cut: a kept fraction, the sorted kept part indices, or None (every part)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"width for {group.name} must be a kept fraction in (0, 1], got {value!r}")
        return float(value)
    parts = list(value.tolist() if isinstance(value, torch.Tensor) else value) if isinstance(
        value, (Sequence, torch.Tensor)) and not isinstance(value, str) else None
    if parts is None or not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        raise ValueError(f"width for {group.name} must be a fraction, a list of part indices or None, got {value!r}")
    if not parts or len(set(parts)) != len(parts) or not all(0 <= p < group.parts for p in parts):
        raise ValueError(f"width for {group.name} must list distinct part indices in 0..{group.parts - 1} "
                         f"(at least one), got {value!r}")
    return sorted(parts)


def _scaling_function(scaling: ScalingRule) -> Callable[[float], float]:
    if callable(scaling):
        return scaling
    if scaling == "inverse":
        return lambda p: 1.0 / p
    if scaling == "none":
        return lambda p: 1.0
    raise ValueError(f"scaling must be 'inverse', 'none' or a callable keep_prob -> factor, got {scaling!r}")


def _refuse_wrapped(model: nn.Module) -> None:
    wrapper = None
    if hasattr(model, ORIGINAL_MODULE):
        wrapper, fix = "torch.compile", "model = raptr_fx.transform(model, ...) first, then torch.compile(model)"
    elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or (
            type(model).__name__ == "FullyShardedDataParallel"):
        wrapper, fix = type(model).__name__, "transform the bare model first, then wrap it"
    if wrapper:
        raise RaptrError(f"the model is already wrapped by {wrapper}: {fix}")
    if _fully_sharded(model):
        raise RaptrError("the model is already sharded with fully_shard (FSDP2): transform before fully_shard, "
                         "i.e. raptr_fx.transform(model, ...), then fully_shard each unit and the root")
    if any(gate_of(m) is not None or is_cut(m) for m in model.modules()):
        raise RaptrError("the model is already transformed: call controller.remove() "
                         "(or raptr_fx.restore(model)) before transforming it again")


def _fully_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _patterns(patterns: Iterable[str] | str | None, argument: str) -> list[str] | None:
    """Unit names or glob patterns as a list; one string is one pattern, not its characters."""
    if patterns is None:
        return None
    listed = [patterns] if isinstance(patterns, str) else list(patterns)
    bad = [p for p in listed if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{argument} must be unit names or glob patterns (strings), got {bad!r}")
    return listed


def _select(blocks: list[Block], include: Iterable[str] | None, exclude: Iterable[str] | None,
            droppable_only: bool = True) -> list[Block]:
    """The units chosen by ``include``/``exclude``; only droppable ones when they will be dropped."""
    by_name = {b.name: b for b in blocks}
    chosen = [b for b in blocks if b.droppable or not droppable_only]
    if include is not None:
        patterns = list(include)
        for pattern in patterns:
            matched = [b for b in blocks if fnmatch.fnmatchcase(b.name, pattern)]
            if not matched:
                raise ValueError(f"include pattern {pattern!r} matches no unit; units are {list(by_name)}")
            bad = next((b for b in matched if not b.droppable), None)
            if bad is not None and droppable_only:
                raise ValueError(f"include pattern {pattern!r} names {bad.name}, which cannot be dropped: {bad.reason}")
        chosen = [b for b in chosen if any(fnmatch.fnmatchcase(b.name, p) for p in patterns)]
    for pattern in exclude or ():
        if not any(fnmatch.fnmatchcase(b.name, pattern) for b in blocks):
            raise ValueError(f"exclude pattern {pattern!r} matches no unit; units are {list(by_name)}")
        chosen = [b for b in chosen if not fnmatch.fnmatchcase(b.name, pattern)]
    return chosen


def transform(
    model: nn.Module,
    schedule: Schedule | str,
    *,
    example_inputs: Any = None,
    total_steps: int | None = None,
    scaling: ScalingRule | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    granularity: str = "layer",
    seed: int = 0,
    compile_mode: CompileMode = "regional",
    compile_options: dict[str, Any] | None = None,
    **tracer_options: Any,
) -> Controller:
    """Turn ``model`` into a RaPTr model in place and return its stage controller.

    Args:
        model: the bare model (before ``torch.compile`` / DDP). It keeps its class, methods,
            parameters and state_dict keys; ``controller.remove()`` undoes everything.
        schedule: a :class:`Schedule` or a RaPTr string like ``"6-8-10-12"`` (needs ``total_steps``).
            Width-wise: :class:`WidthRaPTr` (``"0.5-0.67-0.83-1"``), or ``RaPTr(..., width=...)`` for
            depth and width together; the units' MLP and attention-head groups are then cut too.
        example_inputs: tuple / dict / tensor; needed for models symbolic tracing cannot handle.
        scaling: ``"inverse"`` (1/p on a kept unit's update), ``"none"`` or a callable
            ``keep_prob -> factor``; default: the schedule's own convention.
        include / exclude: unit names or glob patterns (``"transformer.h.*"``).
        seed: decisions for step t depend on (seed, t) only.
        compile_mode: what the gates do under ``torch.compile``. ``"regional"`` (default): the gate
            decides in Python and runs the unit's own compiled graph (graph breaks at the gates,
            no recompute). ``"cond"``: ``torch.cond``, one whole-model graph (``fullgraph=True``
            works), but kept units' forward is recomputed in backward.
        compile_options: ``torch.compile`` keyword arguments for the units in regional mode.

    Example:
        >>> ctl = raptr_fx.transform(model, "6-8-10-12", total_steps=10_000)
        >>> ctl.attach(optimizer)
    """
    # Every argument is checked before the model is touched: transform installs all or nothing.
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_wrapped(model)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if compile_options is not None and not isinstance(compile_options, dict):
        raise TypeError(f"compile_options must be a dict of torch.compile keyword arguments, got {compile_options!r}")
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    if isinstance(schedule, str):
        schedule = RaPTr(schedule, total_steps=total_steps)
    elif not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a raptr_fx Schedule or a string like '6-8-10-12', got {schedule!r}")
    scaling = schedule.scaling if scaling is None else scaling
    _scaling_function(scaling)
    check_compile_mode(compile_mode)
    discovery = discover(model, example_inputs, granularity=granularity, **tracer_options)  # type: ignore[arg-type]
    # A width-only schedule drops no unit: it cuts inside every unit found, droppable or not (as
    # find_width_groups reports), and a unit refused for depth is no reason to refuse it.
    blocks = _select(discovery.blocks, include, exclude, droppable_only=schedule.gates_depth)
    if not blocks:
        if not discovery.droppable:
            raise no_blocks_error(discovery)
        raise ValueError(f"include={include} / exclude={exclude} left no unit to gate; droppable units are "
                         f"{[b.name for b in discovery.blocks if b.droppable]}")
    schedule.validate(len(blocks))
    groups = _width_groups(model, discovery, schedule, blocks) if _cuts_width(schedule) else []
    return Controller(model, blocks, schedule, scaling, seed, compile_mode, compile_options, groups)


def _cuts_width(schedule: Schedule) -> bool:
    return any(schedule.width_fraction(start) < 1.0 for start, _ in schedule.stage_bounds())


def _width_groups(model: nn.Module, discovery: Discovery, schedule: Schedule, blocks: list[Block]) -> list[WidthGroup]:
    """The cuttable groups of the schedule's kinds inside the chosen units; an error if there are none."""
    units = {b.name for b in blocks}
    _refuse_tensor_parallel_width(model, units)
    found = [g for g in width_groups(model, discovery)
             if g.unit in units and g.kind in schedule.width_kinds]
    chosen = [g for g in found if g.droppable]
    if not chosen:
        refused = "; ".join(f"{g.name}: {g.reason}" for g in found[:3]) or "no MLP or attention projections found"
        raise RaptrError(f"the schedule cuts width ({', '.join(schedule.width_kinds)}) but {type(model).__name__} "
                         f"has no cuttable group in its units ({refused}). Run `raptr-fx inspect MODEL --width`.")
    return chosen


def _refuse_tensor_parallel_width(model: nn.Module, units: set[str]) -> None:
    """Width cuts select rows and columns of the global weight; a tensor-parallel (DTensor) weight
    holds a shard per rank, which the cut would have to select per rank: not supported."""
    for name, param in model.named_parameters():
        if any(name.startswith(unit + ".") for unit in units) and is_dtensor(param):
            raise RaptrError(tensor_parallel_width_error(name, param))


def restore(model: nn.Module) -> nn.Module:
    """Remove every raptr_fx gate and cut from ``model`` (optimizer hooks stay; prefer ``controller.remove()``)."""
    remove_gates(model)
    remove_cuts(model)
    return model
