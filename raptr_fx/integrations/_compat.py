"""The private API of the frameworks the integrations (and the CLI) use, in one place.

The torch list is ``raptr_fx/_compat.py``; this one names what Hugging Face code keeps privately.
Nothing here imports a framework: each function reads the object it is given.
``tests/test_compat.py`` fails when one disappears.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["ORIGINAL_FORWARD", "original_forward", "auto_class_builds"]

# Accelerate's mixed precision replaces a model's forward by an autocast wrapper and keeps the
# original under this name (accelerate.utils.operations / Accelerator.prepare_model): discovery
# traces the original, without the casts autocast puts between the stream and its branches.
ORIGINAL_FORWARD = "_original_forward"


def original_forward(model: nn.Module) -> Any:
    """The forward Accelerate's autocast wrapper stands in front of, or None when there is none."""
    return model.__dict__.get(ORIGINAL_FORWARD)


def auto_class_builds(auto: Any, config: Any) -> bool:
    """Whether a transformers auto class (``AutoModelForCausalLM``...) has a model for this config's
    type. transformers has no public question for it (``from_config`` raises a ValueError naming every
    known config instead): its ``_model_mapping``. Fallback without it: True, and ``from_config`` answers."""
    mapping = getattr(auto, "_model_mapping", None)
    return True if mapping is None else type(config) in mapping
