"""raptr_fx: RaPTr (Random Part Training) for any PyTorch model, in two lines.

    ctl = raptr_fx.transform(model, "6-8-10-12", total_steps=10_000)
    ctl.attach(optimizer)
"""

from .controller import Controller, restore, transform
from .discovery import Discovery, discover, find_blocks
from .errors import ExampleInputsError, RaptrError, RaptrWarning, TracingError
from .schedules import (FullModel, LayerDrop, ProgressiveLayerDrop, RaPTr, Schedule, Stage,
                        StagePlan, StochasticDepth, WidthRaPTr, plan)
from .units import Block, WidthGroup
from .width import find_width_groups

__all__ = [
    "Block", "Controller", "Discovery", "ExampleInputsError", "FullModel", "LayerDrop", "ProgressiveLayerDrop", "RaPTr",
    "RaptrError", "RaptrWarning", "Schedule", "Stage", "StagePlan", "StochasticDepth", "TracingError", "WidthGroup", "WidthRaPTr",
    "discover", "find_blocks", "find_width_groups", "plan", "restore", "transform",
]
__version__ = "0.1.0"
