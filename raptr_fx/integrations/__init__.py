"""Trainer integrations: RaPTr in one line for Hugging Face ``Trainer``, Lightning and torchtitan.

Nothing here is imported by ``import raptr_fx``, and importing this package imports no
framework: each integration lives in its own module and imports its framework itself.

    from raptr_fx.integrations.transformers import RaPTrCallback        # Hugging Face Trainer
    from raptr_fx.integrations.lightning import RaPTrLightningCallback   # Lightning
    from raptr_fx.integrations.torchtitan import RaPTrConverter          # torchtitan (a model converter)

``from raptr_fx.integrations import RaPTrCallback`` works too (imported on first access).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RaPTrCallback", "RaPTrConverter", "RaPTrLightningCallback"]

_LAZY = {
    "RaPTrCallback": "raptr_fx.integrations.transformers",
    "RaPTrLightningCallback": "raptr_fx.integrations.lightning",
    "RaPTrConverter": "raptr_fx.integrations.torchtitan",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raptr_fx.integrations' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
