"""Load the user's model (and example inputs) from a Python file or an import string.

Convention, in the user's file, tried in this order (the first rule that finds
something decides):

1. a module-level ``nn.Module`` instance, or a zero-argument factory function whose
   name starts with ``make_``, ``build_`` or ``create_`` (or that is annotated to
   return an ``nn.Module``);
2. a zero-argument function defined in the file that returns a module (any name:
   its ``return`` builds an ``nn.Module`` class or calls such a factory);
3. an ``nn.Module`` subclass defined in the file that builds without arguments;
   when several, the ones no other class in the file contains (the outermost).

More than one candidate left is an error that lists them; ``--model NAME`` picks any
attribute by name (an instance, an ``nn.Module`` class or a function taking no arguments).

Example inputs (optional): ``example_inputs``, a tensor, tuple, dict, or a
zero-argument function returning one.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
import textwrap
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


def _without_arguments(value: Any) -> bool:
    """True when ``value()`` needs no arguments (every parameter has a default)."""
    try:
        parameters = inspect.signature(value).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


def _defined_here(value: Any, module: ModuleType) -> bool:
    return getattr(value, "__module__", None) == module.__name__


def _is_factory(name: str, value: Any, module: ModuleType) -> bool:
    """Rule 1: a zero-argument function named ``make_*``/``build_*``/``create_*`` or annotated ``-> nn.Module``."""
    if not inspect.isfunction(value) or not _defined_here(value, module) or not _without_arguments(value):
        return False
    returns = inspect.signature(value).return_annotation
    annotated = inspect.isclass(returns) and issubclass(returns, nn.Module)
    return annotated or name.startswith(_FACTORY_PREFIXES) or returns in ("nn.Module", "torch.nn.Module")


def _returns_module(function: Any, module: ModuleType, depth: int = 0) -> bool:
    """Rule 2: the function's ``return`` builds an nn.Module (read from its source; it is not called)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return False
    built: dict[str, ast.expr] = {}  # local name -> the call assigned to it (``model = GPT(cfg)``)
    returned: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            built[node.targets[0].id] = node.value
        elif isinstance(node, ast.Return) and node.value is not None:
            returned.append(node.value)
    for value in returned:
        if isinstance(value, ast.Name):
            value = built.get(value.id, value)
        if isinstance(value, ast.Call):
            target = _resolve(value.func, module)
            if inspect.isclass(target) and issubclass(target, nn.Module):
                return True
            if inspect.isfunction(target) and depth < 2 and _returns_module(target, module, depth + 1):
                return True
    return False


def _resolve(expression: ast.expr, module: ModuleType) -> Any:
    """The object a name or dotted name (``nn.Sequential``) refers to in the user's file, or None."""
    if isinstance(expression, ast.Name):
        return vars(module).get(expression.id)
    if isinstance(expression, ast.Attribute):
        owner = _resolve(expression.value, module)
        return getattr(owner, expression.attr, None) if owner is not None else None
    return None


def _outermost_classes(classes: dict[str, type], module: ModuleType) -> list[str]:
    """Rule 3: the module classes no other candidate class refers to in its source."""
    used: set[str] = set()
    for name, cls in classes.items():
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            continue
        used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id != name}
    return [name for name in classes if name not in used]


def find_candidates(module: ModuleType) -> tuple[list[str], str]:
    """The attributes that may be the model, and which rule found them."""
    public = {n: v for n, v in vars(module).items() if not n.startswith("_")}
    found = [n for n, v in public.items() if isinstance(v, nn.Module) or _is_factory(n, v, module)]
    if found:
        return found, "instances and make_/build_/create_ factories"
    found = [n for n, v in public.items() if inspect.isfunction(v) and _defined_here(v, module)
             and _without_arguments(v) and _returns_module(v, module)]
    if found:
        return found, "zero-argument functions returning a module"
    classes = {n: v for n, v in public.items() if inspect.isclass(v) and issubclass(v, nn.Module)
               and _defined_here(v, module) and _without_arguments(v)}
    return _outermost_classes(classes, module), "nn.Module classes that build without arguments"


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
        found, rule = find_candidates(module)
        if not found:
            raise RaptrError(f"no model found in {target}: define a module-level nn.Module instance, a "
                             "zero-argument factory `def make_model()`, or an nn.Module class that builds "
                             "without arguments; or pass --model NAME")
        if len(found) > 1:
            raise RaptrError(f"several models in {target} ({rule}: {', '.join(found)}): pick one with "
                             f"--model NAME or {target}:NAME, e.g. --model {found[0]}")
        name = found[0]
    model = _build(name, getattr(module, name))
    inputs = getattr(module, "example_inputs", None)
    if callable(inputs):
        inputs = inputs()
    return Loaded(name, model, inputs)
