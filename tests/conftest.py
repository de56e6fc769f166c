"""Resets between tests, so that no test sees what another left behind.

* ``torch._dynamo.reset()`` after a test that compiled: its graphs, guards and recompile counts
  (dynamo's cache limit is per code object, and every GPT fixture shares its forward's code) do
  not reach the next test. Tests that compiled nothing skip it: the check is two dict look-ups.
* raptr_fx's global optimizer step hook (``raptr_fx.usage``) comes off, with the monitors of
  that test's controllers; the next controller registers it again.
"""

import sys

import pytest
import torch

from raptr_fx.usage import remove_global_hook


def _frames_compiled() -> int:
    utils = sys.modules.get("torch._dynamo.utils")  # not imported: nothing compiled yet
    return 0 if utils is None else utils.counters.get("frames", {}).get("total", 0)


@pytest.fixture(autouse=True)
def _reset_between_tests():
    frames = _frames_compiled()
    yield
    if _frames_compiled() != frames:
        torch._dynamo.reset()
    remove_global_hook()
