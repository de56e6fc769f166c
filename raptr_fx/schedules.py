"""Schedules: which units may run at each step.

A schedule maps (step, number of units L) to one keep probability per unit; the
controller samples the decisions. RaPTr is stagewise (a subnetwork that grows);
the prior methods are schedules of the same machinery so they can be compared
on the same model:

===========================  =====================================  ===========
schedule                     keep probability of unit i at step t   scaling
===========================  =====================================  ===========
RaPTr "6-8-10-12"            1 for i in I, else (k - |I|)/(L - |I|)  none
ProgressiveLayerDrop         1 - i/L * (1 - theta(t))               inverse
StochasticDepth              1 - drop_rate * i/(L - 1)              inverse
LayerDrop                    1 - p                                  none
FullModel                    1                                      none
WidthRaPTr "0.5-0.67-0.83-1" 1 (each width group keeps f of parts)  none
===========================  =====================================  ===========
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

__all__ = [
    "Stage", "Schedule", "RaPTr", "WidthRaPTr", "ProgressiveLayerDrop", "StochasticDepth", "LayerDrop", "FullModel",
    "StagePlan", "plan", "overall_compute",
]

Sampling = Literal["bernoulli", "exact"]
Scaling = Literal["inverse", "none"]


def _require_number(name: str, value: object) -> None:
    """A TypeError naming the value, before a comparison would raise a bare one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")


@dataclass(frozen=True)
class Stage:
    """One RaPTr stage: its length and the size of the subnetwork.

    Give ``active`` (k, the expected number of running units, as in "6-8-10-12")
    or ``keep`` (p, the keep probability of each unit outside the fixed set), and
    optionally ``width`` (f, the fraction of each width group's parts kept).
    A width-only stage gives ``width`` alone: every unit runs.

    Example:
        >>> Stage(1000, active=6, width=0.5)   # 6 units in expectation, half of each MLP and head group
        >>> Stage(1000, width=0.5)             # every unit, half of each group
    """

    steps: int  # length of the stage in optimizer steps
    active: float | None = None  # k: expected number of active units (fixed ones included)
    keep: float | None = None  # p: keep probability of each non-fixed unit
    width: float | None = None  # f: fraction of each width group's parts kept (None: all)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"Stage.steps must be a positive int, got {self.steps!r}")
        if self.width is not None and self.active is None and self.keep is None:
            object.__setattr__(self, "keep", 1.0)  # width only: every unit runs
        if (self.active is None) == (self.keep is None):
            raise ValueError(f"give exactly one of Stage.active or Stage.keep, got active={self.active!r}, "
                             f"keep={self.keep!r}")
        for name in ("active", "keep", "width"):
            if getattr(self, name) is not None:
                _require_number(f"Stage.{name}", getattr(self, name))
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"Stage.keep must be in (0, 1], got {self.keep!r}")
        if self.width is not None and not 0.0 < self.width <= 1.0:
            raise ValueError(f"Stage.width must be in (0, 1], got {self.width!r}")
        if self.active is not None and self.active <= 0:
            raise ValueError(f"Stage.active must be positive, got {self.active!r}")


class Schedule:
    """Base class: subclasses define :meth:`keep_probabilities` (and stages, if any)."""

    sampling: Sampling = "bernoulli"
    scaling: Scaling = "none"  # the method's own rescaling convention
    width_kinds: tuple[str, ...] = ()  # width groups cut: "mlp", "heads"; () cuts none
    width_scaling: Scaling = "none"  # factor on a cut consumer's output: "inverse" is parts / kept
    gates_depth: bool = True  # False: no unit is ever dropped, so no depth gate is installed

    def width_fraction(self, step: int) -> float:
        """Fraction of each width group's parts kept at ``step`` (1.0: no cut)."""
        return 1.0

    def validate(self, num_units: int) -> None:
        """Raise ValueError if the schedule cannot run on ``num_units`` units."""

    def keep_probabilities(self, step: int, num_units: int) -> list[float]:
        raise NotImplementedError

    def fixed(self, num_units: int) -> frozenset[int]:
        """Units that always run (the fixed set I)."""
        return frozenset()

    def stage_index(self, step: int) -> int:
        return 0

    def stage_bounds(self) -> list[tuple[int, int | None]]:
        """(first step, end step) of each stage; end None means open-ended."""
        return [(0, None)]

    def describe(self) -> str:
        return type(self).__name__


def _parse(spec: str, what: str = "active units per stage") -> list[float]:
    example = "0.5-0.67-0.83-1" if what.startswith("keep") else "6-8-10-12"
    try:
        values = [float(part) for part in spec.split("-")]
    except ValueError:
        raise ValueError(f"schedule {spec!r} is not of the form {example!r} ({what})") from None
    return values


@dataclass(frozen=True)
class RaPTr(Schedule):
    """Random Part Training: stages whose random subnetwork grows until the full model trains.

    Example:
        >>> RaPTr("6-8-10-12", total_steps=100_000)  # four equal stages on a 12-unit model
        >>> RaPTr([Stage(1000, keep=1.0), Stage(4000, active=6), Stage(5000, active=12)])
    """

    stages: str | Sequence[Stage]  # "6-8-10-12" (needs total_steps) or explicit Stage list
    total_steps: int | None = None  # equal-length stages when stages is a string
    fixed_units: Literal["ends"] | Sequence[int] = "ends"  # I: "ends" = first and last unit, as in the paper
    sampling: Sampling = "bernoulli"  # "bernoulli": unit i kept with prob p; "exact": exactly k run
    scaling: Scaling = "none"  # see docs/schedules.md: inverse (1/p) measured worse here
    # Width per stage alongside the depth stages: "0.5-0.67-0.83-1" or one fraction per stage.
    width: str | Sequence[float] | None = None
    width_kinds: tuple[str, ...] = ("mlp", "heads")  # which width groups the width stages cut
    width_scaling: Scaling = "none"  # see docs/width.md: no scaling measured better for width
    resolved: tuple[Stage, ...] = field(init=False, repr=False)
    # Asked at every step: the stages' end steps, and keep probabilities per (stage, L), worked out once.
    _ends: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _keep_cache: dict[tuple[int, int], tuple[float, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_width_options()
        if self.sampling not in ("bernoulli", "exact"):
            raise ValueError(f"sampling must be 'bernoulli' or 'exact', got {self.sampling!r}")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps <= 0):
            raise ValueError(f"total_steps must be a positive int, got {self.total_steps!r}")
        if isinstance(self.stages, str):
            if self.total_steps is None:
                raise ValueError(f"schedule {self.stages!r} needs total_steps to set the stage lengths")
            sizes = _parse(self.stages, self._spec_kind())
            if self.total_steps < len(sizes):
                raise ValueError(f"total_steps={self.total_steps} is shorter than the {len(sizes)} stages")
            base, extra = divmod(self.total_steps, len(sizes))
            # Spread the remainder over the last stages, so the full model gets the extra steps.
            lengths = [base + (1 if i >= len(sizes) - extra else 0) for i in range(len(sizes))]
            resolved = tuple(self._stage(n, k) for n, k in zip(lengths, sizes))
        else:
            if not isinstance(self.stages, (list, tuple)):
                raise TypeError(f"stages must be a string like '6-8-10-12' or a list of Stage, got {self.stages!r}")
            resolved = tuple(self.stages)
            if not resolved or not all(isinstance(s, Stage) for s in resolved):
                raise ValueError(f"stages must be a string like '6-8-10-12' or a list of Stage, got {self.stages!r}")
            covered = sum(s.steps for s in resolved)
            if self.total_steps is not None and covered != self.total_steps:
                raise ValueError(f"stages cover {covered} steps but total_steps={self.total_steps}")
        object.__setattr__(self, "resolved", self._with_width(resolved))
        object.__setattr__(self, "_ends", tuple(end for _, end in self.stage_bounds()))
        object.__setattr__(self, "_keep_cache", {})
        self._refuse_shrinking()
        if not isinstance(self.fixed_units, str):
            indices = tuple(self.fixed_units) if isinstance(self.fixed_units, (list, tuple, range, set)) else None
            if indices is None or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
                raise TypeError(f"fixed_units must be 'ends' or a list of unit indices, got {self.fixed_units!r}")
            object.__setattr__(self, "fixed_units", indices)
        elif self.fixed_units != "ends":
            raise ValueError(f"fixed_units must be 'ends' or a list of unit indices, got {self.fixed_units!r}")

    def _stage(self, steps: int, value: float) -> Stage:
        """The stage one number of a schedule string stands for."""
        return Stage(steps, active=value)

    def _spec_kind(self) -> str:
        return "active units per stage"

    def _check_width_options(self) -> None:
        kinds = (self.width_kinds,) if isinstance(self.width_kinds, str) else tuple(self.width_kinds)
        bad = [k for k in kinds if k not in ("mlp", "heads")]
        if bad or not kinds:
            raise ValueError(f"width_kinds must name 'mlp' and/or 'heads', got {self.width_kinds!r}")
        object.__setattr__(self, "width_kinds", kinds)
        if self.width_scaling not in ("none", "inverse"):
            raise ValueError(f"width_scaling must be 'none' or 'inverse', got {self.width_scaling!r}")

    def _with_width(self, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
        """The stages with ``width=`` folded in: one fraction per stage."""
        if self.width is None:
            return stages
        fractions = _parse(self.width, "keep fractions per stage") if isinstance(self.width, str) else list(self.width)
        if len(fractions) != len(stages):
            raise ValueError(f"width {self.width!r} has {len(fractions)} stages, the schedule has {len(stages)}")
        if any(s.width is not None for s in stages):
            raise ValueError("give the width per stage either in Stage(width=...) or as width=, not both")
        return tuple(replace(s, width=f) for s, f in zip(stages, fractions))

    def width_fraction(self, step: int) -> float:
        width = self.resolved[self.stage_index(step)].width
        return 1.0 if width is None else width

    def _refuse_shrinking(self) -> None:
        """RaPTr's subnetwork grows; a schedule that shrinks it is Progressive Layer Dropping's idea."""
        stages = list(self.resolved)
        while stages and stages[0].keep == 1.0:  # a full-model warm-up may come first (UL2)
            stages.pop(0)
        for before, after in zip(stages, stages[1:]):
            # Stages given one as active units and one as keep probability compare only once L is known.
            field_name = next((f for f in ("active", "keep")
                               if getattr(before, f) is not None and getattr(after, f) is not None), None)
            if field_name is not None and getattr(after, field_name) < getattr(before, field_name):
                what = "active units" if field_name == "active" else "keep probability"
                # "12-4-..." on a 12-unit model usually means a full-model warm-up, which only keep=1.0 says.
                warmup_hint = (" A full-model warm-up stage first is written Stage(steps, keep=1.0)."
                               if before is stages[0] and field_name == "active" else "")
                raise ValueError(
                    f"RaPTr stages {self.describe().removeprefix('RaPTr ')} shrink ({what} "
                    f"{getattr(before, field_name):g} then {getattr(after, field_name):g}): RaPTr grows its "
                    "subnetwork stage by stage. To drop more "
                    "layers as training goes on, use ProgressiveLayerDrop (the prior method the RaPTr "
                    "paper argues against)." + warmup_hint)

        widths = [1.0 if s.width is None else s.width for s in self.resolved]
        for earlier, later in zip(widths, widths[1:]):
            if later < earlier:
                raise ValueError(f"RaPTr width stages shrink ({earlier:g} then {later:g}): RaPTr grows its "
                                 "subnetwork stage by stage")

    def fixed(self, num_units: int) -> frozenset[int]:
        if self.fixed_units == "ends":
            return frozenset({0, num_units - 1})
        return frozenset(i % num_units if i < 0 else i for i in self.fixed_units)

    def validate(self, num_units: int) -> None:
        if not isinstance(self.fixed_units, str):
            bad = [i for i in self.fixed_units if not -num_units <= i < num_units]
            if bad:
                raise ValueError(f"fixed unit {bad[0]} is outside the model's {num_units} units")
        fixed = len(self.fixed(num_units))
        for stage in self.resolved:
            if stage.active is not None and not fixed <= stage.active <= num_units:
                raise ValueError(f"stage active={stage.active:g} is outside [{fixed}, {num_units}]: "
                                 f"the model has {num_units} units, {fixed} of them always on")

    def stage_keep(self, stage: Stage, num_units: int) -> float:
        if stage.keep is not None:
            return stage.keep
        fixed = len(self.fixed(num_units))
        assert stage.active is not None  # a resolved stage has keep or active
        return 1.0 if num_units == fixed else (stage.active - fixed) / (num_units - fixed)

    def stage_bounds(self) -> list[tuple[int, int | None]]:
        bounds: list[tuple[int, int | None]] = []
        start = 0
        for stage in self.resolved:
            bounds.append((start, start + stage.steps))
            start += stage.steps
        return bounds

    def stage_index(self, step: int) -> int:
        # The first stage whose end is past ``step``; past the end: keep training with the last stage.
        return min(bisect.bisect_right(self._ends, step), len(self.resolved) - 1)

    def keep_probabilities(self, step: int, num_units: int) -> list[float]:
        key = (self.stage_index(step), num_units)
        keep = self._keep_cache.get(key)
        if keep is None:
            p = self.stage_keep(self.resolved[key[0]], num_units)
            fixed = self.fixed(num_units)
            keep = self._keep_cache[key] = tuple(1.0 if i in fixed else p for i in range(num_units))
        return list(keep)

    def describe(self) -> str:
        if isinstance(self.stages, str):
            depth = self.stages
        else:
            depth = "-".join(f"{s.active:g}" if s.active is not None else f"p{s.keep:g}" for s in self.resolved)
        if not any(s.width is not None for s in self.resolved):
            return f"RaPTr {depth}"
        width = "-".join(f"{1.0 if s.width is None else s.width:g}" for s in self.resolved)
        return f"RaPTr {depth} x width {width} ({', '.join(self.width_kinds)})"


@dataclass(frozen=True)
class WidthRaPTr(RaPTr):
    """Width-wise RaPTr: every unit runs; each MLP and attention-head group keeps a random fraction
    of its parts that grows stage by stage ("0.5-0.67-0.83-1" on four equal stages).

    Example:
        >>> WidthRaPTr("0.5-0.67-0.83-1", total_steps=100_000)
        >>> WidthRaPTr([Stage(5000, width=0.5), Stage(5000, width=1.0)], width_kinds=("mlp",))
    """

    gates_depth = False  # every unit always runs

    def __post_init__(self) -> None:
        if self.width is not None:
            raise ValueError(f"WidthRaPTr's stages are its widths; width={self.width!r} is for RaPTr(...)")
        super().__post_init__()
        if any(s.keep != 1.0 for s in self.resolved):
            raise ValueError("WidthRaPTr stages give a width only (Stage(steps, width=f)); "
                             "to drop units too, use RaPTr(..., width=...)")

    def _stage(self, steps: int, value: float) -> Stage:
        return Stage(steps, width=value)

    def _spec_kind(self) -> str:
        return "keep fractions per stage"

    def describe(self) -> str:
        return "WidthRaPTr " + "-".join(f"{1.0 if s.width is None else s.width:g}" for s in self.resolved) + (
            f" ({', '.join(self.width_kinds)})")


@dataclass(frozen=True)
class ProgressiveLayerDrop(Schedule):
    """Progressive Layer Dropping (Zhang & He 2020): capacity shrinks over time, deeper units first.

    theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar; unit i keeps with 1 - i/L * (1 - theta(t)).
    """

    theta_bar: float = 0.5  # the keep-probability floor (recommended 0.5)
    gamma: float = 0.001  # decay rate per step (recommended 0.001)
    scaling: Scaling = "inverse"

    def __post_init__(self) -> None:
        _require_number("theta_bar", self.theta_bar)
        _require_number("gamma", self.gamma)
        if not 0.0 < self.theta_bar <= 1.0:
            raise ValueError(f"theta_bar must be in (0, 1], got {self.theta_bar!r}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma!r}")

    def keep_probabilities(self, step: int, num_units: int) -> list[float]:
        theta = (1.0 - self.theta_bar) * math.exp(-self.gamma * step) + self.theta_bar
        return [1.0 - i / num_units * (1.0 - theta) for i in range(num_units)]


@dataclass(frozen=True)
class StochasticDepth(Schedule):
    """Stochastic depth (Huang et al. 2016): drop rate rising linearly with depth, constant in time."""

    drop_rate: float = 0.1  # drop probability of the deepest unit
    scaling: Scaling = "inverse"

    def __post_init__(self) -> None:
        _require_number("drop_rate", self.drop_rate)
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")

    def keep_probabilities(self, step: int, num_units: int) -> list[float]:
        return [1.0 - self.drop_rate * i / max(num_units - 1, 1) for i in range(num_units)]


@dataclass(frozen=True)
class LayerDrop(Schedule):
    """LayerDrop (Fan et al. 2019): every unit dropped with the same constant probability, no rescaling."""

    p: float = 0.2  # drop probability of each unit
    scaling: Scaling = "none"

    def __post_init__(self) -> None:
        _require_number("LayerDrop p", self.p)
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"LayerDrop p must be in [0, 1), got {self.p!r}")

    def keep_probabilities(self, step: int, num_units: int) -> list[float]:
        return [1.0 - self.p] * num_units


@dataclass(frozen=True)
class FullModel(Schedule):
    """Every unit, every step: the baseline, through the same machinery."""

    def keep_probabilities(self, step: int, num_units: int) -> list[float]:
        return [1.0] * num_units


@dataclass(frozen=True)
class StagePlan:
    """One row of a schedule's expected-compute table."""

    stage: int
    start: int  # first step
    steps: int | None  # length; None when open-ended
    active: float  # expected number of running units
    keep: list[float]  # keep probability per unit
    compute: float  # expected share of the units' compute that runs (weights: FLOPs or params)
    width: float = 1.0  # fraction of each width group's parts kept


def plan(schedule: Schedule, num_units: int, weights: Sequence[float] | None = None,
         width_weights: Sequence[float] | None = None) -> list[StagePlan]:
    """Expected compute per stage; ``weights`` are the units' costs (FLOPs share, else parameters),
    ``width_weights`` the part of each unit's cost in its width groups (in the same measure)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a raptr_fx Schedule, got {schedule!r}")
    if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units <= 0:
        raise ValueError(f"num_units must be a positive int, got {num_units!r}")
    schedule.validate(num_units)
    weights = list(weights) if weights is not None else [1.0] * num_units
    if len(weights) != num_units:
        raise ValueError(f"weights has {len(weights)} entries for {num_units} units")
    width_weights = list(width_weights) if width_weights is not None else [0.0] * num_units
    if len(width_weights) != num_units:
        raise ValueError(f"width_weights has {len(width_weights)} entries for {num_units} units")
    total = sum(weights) or 1.0
    rows = []
    for i, (start, end) in enumerate(schedule.stage_bounds()):
        keep = schedule.keep_probabilities(start, num_units)
        f = schedule.width_fraction(start)
        compute = sum(p * (w - (1.0 - f) * g) for p, w, g in zip(keep, weights, width_weights)) / total
        rows.append(StagePlan(i, start, None if end is None else end - start, sum(keep), keep, compute, f))
    return rows


def overall_compute(rows: Sequence[StagePlan]) -> float | None:
    """Step-weighted compute share over all stages; None for open-ended schedules."""
    steps = [r.steps for r in rows]
    if any(s is None for s in steps):
        return None
    return sum(r.compute * (s or 0) for r, s in zip(rows, steps)) / sum(s or 0 for s in steps)
