"""Load the user's model (and example inputs) from a Python file or an import string.

Convention, in the user's file:

* the model: a module-level ``nn.Module`` instance, or a zero-argument factory
  function whose name starts with ``make_``, ``build_`` or ``create_`` (or that is
  annotated to return an ``nn.Module``). ``--model NAME`` picks any attribute by
  name (an instance, an ``nn.Module`` class or a function taking no arguments).
* example inputs (optional): ``example_inputs``, a tensor, tuple, dict, or a
  zero-argument function returning one.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from raptr_fx import RaptrError

_FACTORY_PREFIXES = ("make_", "build_", "create_")


@dataclass
class Loaded:
    name: str  # the attribute the model came from
    model: nn.Module
    example_inputs: Any  # None when the file has none


def load_module(target: str) -> ModuleType:
    """A file path (``model.py``) or an import string (``package.module`` / ``package.module:NAME``)."""
    path = Path(target)
    if path.suffix == ".py" or "/" in target or path.exists():
        if not path.is_file():
            raise RaptrError(f"file not found: {path}. Pass a Python file that defines your model, "
                             "or an import string like package.module:NAME")
        spec = importlib.util.spec_from_file_location(f"raptr_fx_user_{uuid.uuid4().hex}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look the module up here
        sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise RaptrError(f"{path} raised {type(exc).__name__} on import: {exc}. "
                             f"Fix the file (`python {path}` shows the traceback, so does --debug)") from exc
        finally:
            sys.path.remove(str(path.resolve().parent))
        return module
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise RaptrError(f"cannot import {target!r}: {type(exc).__name__}: {exc}. "
                         "Pass a path to a .py file or an importable module") from exc


def _is_factory(name: str, value: Any, module: ModuleType) -> bool:
    if not inspect.isfunction(value) or value.__module__ != module.__name__:
        return False
    if any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
           for p in inspect.signature(value).parameters.values()):
        return False
    returns = inspect.signature(value).return_annotation
    annotated = inspect.isclass(returns) and issubclass(returns, nn.Module)
    return annotated or name.startswith(_FACTORY_PREFIXES) or returns in ("nn.Module", "torch.nn.Module")


def _build(name: str, value: Any) -> nn.Module:
    if isinstance(value, nn.Module):
        return value
    if callable(value):
        try:
            built = value()
        except TypeError as exc:
            raise RaptrError(f"{name} cannot be called without arguments ({exc}); "
                             "point --model at an instance or a zero-argument factory") from exc
        if isinstance(built, nn.Module):
            return built
        raise RaptrError(f"{name}() returned {type(built).__name__}, not a torch.nn.Module")
    raise RaptrError(f"{name} is a {type(value).__name__}, not a torch.nn.Module or a factory")


def load_model(target: str, model_name: str | None = None) -> Loaded:
    if ":" in target and not Path(target).exists() and model_name is None:
        target, model_name = target.rsplit(":", 1)
    module = load_module(target)
    if model_name is not None:
        if not hasattr(module, model_name):
            raise RaptrError(f"{target} has no attribute {model_name!r}")
        name = model_name
    else:
        found = [n for n, v in vars(module).items() if not n.startswith("_")
                 and (isinstance(v, nn.Module) or _is_factory(n, v, module))]
        if not found:
            raise RaptrError(f"no model found in {target}: define a module-level nn.Module instance or a "
                             "zero-argument factory `def make_model()`, or pass --model NAME")
        if len(found) > 1:
            raise RaptrError(f"several models in {target} ({', '.join(found)}): pick one with --model NAME")
        name = found[0]
    model = _build(name, getattr(module, name))
    inputs = getattr(module, "example_inputs", None)
    if callable(inputs):
        inputs = inputs()
    return Loaded(name, model, inputs)
