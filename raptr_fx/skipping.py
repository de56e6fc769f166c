"""Can this unit be skipped, and what does it return when it is?

Discovery chooses the units (``unit_choice.py``) and gathers the facts about
each one (``unit_facts.py``): how often it runs, its shortcut, what its call
returned. :func:`judge`
turns those facts into the verdict, and the functions at the end of this module
are what a gate uses at run time to build a skipped unit's output.

The rule for units that return more than the stream (a tuple, list or dict,
like Hugging Face's ``T5Block``): the unit is droppable when exactly one element
is the stream and every other element is one of the unit's own inputs returned
unchanged (a tuple of numbers recomputed equal to one counts: a shape the unit
keeps), a constant (a Python number, string or bool), None, or a computed
value that nothing in the traced forward reads (attention weights nobody asked
for). Skipped, it returns the same structure with the stream input in the
stream's place, the pass-through values in theirs and None for unread ones.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence, cast

import torch
from torch import fx, nn

__all__ = ["OutputSlot", "Leaf", "ObservedOutput", "Owned", "UnitFacts", "Verdict", "observe", "judge", "shared_reason",
           "stream_output", "with_stream_output", "skipped_output", "signature_of"]

_CONSTANT_TYPES = (bool, int, float, str)
_CONTAINERS: dict[type, str] = {tuple: "tuple", list: "list", dict: "dict"}


# -- what a unit's call returned ---------------------------------------------------------------
@dataclass
class Leaf:
    """One element of a unit's output, as observed by the tracer or the probe."""

    key: int | str  # position in the tuple/list, or dict key
    kind: Literal["tensor", "input", "constant", "other"]  # computed tensor / argument returned as is / ...
    source: int | str | None = None  # kind "input": the argument (position or keyword) returned unchanged
    value: Any = None  # kind "constant": the value; kind "other": its type name
    node: fx.Node | None = None  # kind "tensor", torch.fx tracer: its graph node
    shape: tuple[int, ...] | None = None  # kind "tensor", probe: its shape


@dataclass
class ObservedOutput:
    container: str  # "tensor", "tuple", "list", "dict", or the type name of anything else
    leaves: list[Leaf] = field(default_factory=list)


def observe(output: Any, args: tuple, kwargs: dict, is_tensor: Callable[[Any], bool]) -> ObservedOutput:
    """Classify each element of ``output`` against the call's arguments (by identity).

    ``is_tensor`` tells tensors apart: real or fake tensors for the probe, proxies for torch.fx.
    """
    if is_tensor(output):
        return ObservedOutput("tensor")
    container = _CONTAINERS.get(type(output))  # exact types only: a subclass may not rebuild from items
    if container is None:
        return ObservedOutput(type(output).__name__)
    items = output.items() if isinstance(output, dict) else enumerate(output)
    arguments = [*enumerate(args), *kwargs.items()]
    leaves = []
    for key, value in items:
        leaves.append(_classify_leaf(key, value, arguments, is_tensor))
    return ObservedOutput(container, leaves)


def _classify_leaf(key: int | str, value: Any, arguments: list[tuple[int | str, Any]],
                   is_tensor: Callable[[Any], bool]) -> Leaf:
    # None and Python scalars first: small ints and None are shared objects, not pass-throughs.
    if value is None or isinstance(value, _CONSTANT_TYPES):
        return Leaf(key, "constant", value=value)
    source = next((k for k, arg in arguments if arg is value), None)
    if source is None and _plain_values(value):
        # Recomputed, yet equal to an argument (MViT's ``thw`` from a shape a stride-1 layer keeps):
        # the call shows it passes through, so a skip returns that argument.
        source = next((k for k, arg in arguments if type(arg) is type(value) and arg == value), None)
    if source is not None:
        return Leaf(key, "input", source=source)
    if is_tensor(value):
        node = value.node if isinstance(value, fx.Proxy) else None
        shape = None if node is not None else tuple(value.shape)
        return Leaf(key, "tensor", node=node, shape=shape)
    return Leaf(key, "other", value=type(value).__name__)


def _plain_values(value: Any) -> bool:
    """A non-empty tuple or list of Python numbers, strings or bools (a shape, a grid size)."""
    return type(value) in (tuple, list) and bool(value) and all(type(v) in _CONSTANT_TYPES for v in value)


# -- the verdict -------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputSlot:
    """How a skipped unit rebuilds one element of its output."""

    key: int | str  # position in the returned tuple/list, or key of the returned dict
    # the stream / an argument returned unchanged / a constant / computed but read by nothing (rebuilt as None)
    role: Literal["stream", "input", "constant", "unread"]
    source_position: int | None = None  # role "input": the forward argument's position ...
    source_name: str | None = None  # ... and name (whichever the call used)
    value: bool | int | float | str | None = None  # role "constant" (None for "unread")


@dataclass(frozen=True)
class Owned:
    """What a unit owns outside its module: the weights only its branch uses.

    Skipped, the unit takes them along: the modules holding them return zeros shaped like their
    input instead of running (a parent's norm feeding the branch, a post-norm of the branch's
    output), and the parameters are frozen with the unit. A layer scale the parent multiplies the
    branch by runs on the zeros, which keeps them zeros. The last four fields say why a unit
    cannot own what its branch runs outside it (any one refuses the unit).
    """

    params: tuple[str, ...] = ()  # qualified names of the parameters: frozen with the unit
    before: tuple[str, ...] = ()  # modules whose output only the unit reads (a parent's pre-norm)
    after: tuple[str, ...] = ()  # zero units: modules on the branch after it (a parent's post-norm)
    shared: tuple[str, ...] = ()  # outside weights the branch runs that something else reads too
    loose: tuple[str, ...] = ()  # outside weights run on data outside any module: no gate can stop them
    reshaping: tuple[tuple[str, str], ...] = ()  # (owned module, how it may change its input's shape)
    not_zero: tuple[str, ...] = ()  # ops after the unit, before the add, that do not keep zeros zero

    @property
    def refused(self) -> bool:
        return bool(self.shared or self.loose or self.reshaping or self.not_zero)


@dataclass
class UnitFacts:
    """What discovery learned about one unit; :func:`judge` decides from these alone."""

    name: str
    module: nn.Module
    drop: Literal["identity", "zero"]
    calls: int  # calls per forward
    projection: list[str] | None  # identity units: the modules of a projection shortcut, if any
    shortcut_scale: float | None  # identity units: the shortcut is ``x * shortcut_scale`` (a constant)
    zero_fix: str  # zero units refused: what would make the layer around them the unit
    owned: Owned  # weights outside it that only its branch uses, and the modules holding them
    output: ObservedOutput | None  # what the call returned; None: not observed (one tensor assumed)
    computed_from: dict[int | str, list[str]]  # computed output element -> parameters it is computed from
    unread: frozenset[int | str]  # computed output elements nothing outside the unit reads
    stream_node: fx.Node | None  # the unit's stream output in the graph, when known
    stream_argument: int | str | None  # the argument carrying the stream (position or keyword)
    arg_shapes: dict[int | str, tuple[int, ...]] | None  # probe: tensor arguments -> shape
    output_shape: tuple[int, ...] | None  # probe: the output's shape, when it is one tensor


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # None: droppable
    stream_position: int | None = None
    stream_name: str | None = None
    output_container: str = "tensor"
    output_slots: tuple[OutputSlot, ...] = ()


def judge(facts: UnitFacts) -> Verdict:
    """Can this unit be skipped, and how is its output rebuilt when it is?"""
    if facts.calls > 1:
        return Verdict(shared_reason(facts.calls))
    if facts.drop == "identity" and facts.shortcut_scale is not None:
        scale = f"{facts.shortcut_scale:g}"
        return Verdict(f"its shortcut scales the stream ({scale} * x + f(x)), not the identity: skipped, it "
                       f"would have to return {scale} * x, and returning x would change the stream")
    if facts.drop == "identity" and facts.projection is not None:
        where = f" ({', '.join(facts.projection)})" if facts.projection else ""
        shapes = _shape_change(facts, _stream_shape(facts, None))
        shapes = f" and changes the stream's shape{shapes}" if shapes else ""
        return Verdict(f"its shortcut is a projection{where}, not the identity{shapes}: "
                       "skipping it would change the stream")
    reason = _ownership_problem(facts)
    if reason is not None:
        return Verdict(reason)
    output = facts.output or ObservedOutput("tensor")
    if output.container != "tensor" and output.container not in _CONTAINERS.values():
        return Verdict(f"returns a {output.container}; a skipped unit can only rebuild one tensor "
                       "or a plain tuple, list or dict")
    stream_leaf = _stream_leaf(facts, output)
    reason = _structure_problem(facts, output, stream_leaf)
    if reason is not None:
        return Verdict(reason)
    if facts.stream_argument is None:
        return Verdict("cannot tell which argument of forward carries the stream")
    shapes = _shape_change(facts, _stream_shape(facts, stream_leaf))
    if shapes:
        return Verdict(f"it changes the stream's shape{shapes}")
    position, name = argument_slot(facts.module, facts.stream_argument)
    slots = tuple(_slot(facts.module, leaf, leaf is stream_leaf, leaf.key in facts.unread)
                  for leaf in output.leaves)
    return Verdict(None, position, name, output.container, slots)


def _ownership_problem(facts: UnitFacts) -> str | None:
    """Why the unit cannot own the weights its branch runs outside it (None: it owns them all).

    A skip must remove exactly the computation the unit stands for: outside weights that kept
    running would train wrong (updated on zeros) or escape the freezing of dropped units.
    """
    owned, name = facts.owned, facts.name
    fix = facts.zero_fix if facts.drop == "zero" else f"compute them inside {name}"
    outside = "the branch also runs weights outside" if facts.drop == "zero" else "it reads weights computed outside"
    if owned.shared:
        return (f"{outside} {name} that other parts of the model read too ({_listing(owned.shared)}): "
                f"frozen with it, they would stop training for those too; {fix}")
    if owned.loose:
        return (f"{outside} {name} that only it uses, on data outside any module ({_listing(owned.loose)}): "
                f"skipped, they would still run for nothing; {fix}")
    if owned.reshaping:
        module, change = owned.reshaping[0]
        return (f"{name} owns {module} (only its branch uses it), but {module} {change}: skipped with {name}, "
                f"it could not return zeros shaped like its output; {fix}")
    if owned.not_zero:
        return (f"the branch runs weights outside {name} on its result ({_listing(owned.params)}) "
                f"through {owned.not_zero[0]}, which does not keep zeros zero: skipped, the branch would "
                f"not add zeros; {fix}")
    return None


def shared_reason(calls: int) -> str:
    return f"called {calls} times per forward (shared weights): one gate cannot tell the calls apart"


def _stream_leaf(facts: UnitFacts, output: ObservedOutput) -> Leaf | None:
    """The output element that carries the stream: by graph node when traced, else by shape."""
    computed = [leaf for leaf in output.leaves if leaf.kind == "tensor"]
    if any(leaf.node is not None for leaf in computed):  # torch.fx: the tracer saw graph nodes
        return next((leaf for leaf in computed if leaf.node is facts.stream_node), None)
    if len(computed) <= 1:
        return computed[0] if computed else None
    # Probe only (no graph nodes): the computed element shaped like the stream argument.
    wanted = (facts.arg_shapes or {}).get(facts.stream_argument) if facts.stream_argument is not None else None
    return next((leaf for leaf in computed if leaf.shape == wanted), computed[0])


def _structure_problem(facts: UnitFacts, output: ObservedOutput, stream_leaf: Leaf | None) -> str | None:
    if output.container == "tensor":
        return None
    if stream_leaf is None:
        return f"none of the elements of the {output.container} it returns is the stream"
    for leaf in output.leaves:
        if leaf is stream_leaf or leaf.kind in ("input", "constant") or leaf.key in facts.unread:
            continue
        what = f"output[{leaf.key!r}]"
        if leaf.kind == "other":
            return f"{what} is a {leaf.value}, not a tensor, an input or a constant: a skipped unit cannot rebuild it"
        shape = f" (shape {list(leaf.shape)})" if leaf.shape is not None else ""
        return (f"{what}{shape} is computed inside {facts.name}{_sources(facts.computed_from.get(leaf.key))}, "
                "not passed through from its inputs: a skipped unit cannot produce it")
    return None


def _listing(names: Sequence[str]) -> str:
    """``a, b`` or ``a, b and 3 more``."""
    more = f" and {len(names) - 2} more" if len(names) > 2 else ""
    return ", ".join(names[:2]) + more


def _sources(params: list[str] | None) -> str:
    """`` from w`` or `` from w and 2 more``: the parameters an output element is computed from."""
    if not params:
        return ""
    more = f" and {len(params) - 1} more" if len(params) > 1 else ""
    return f" from {params[0]}{more}"


def _slot(module: nn.Module, leaf: Leaf, is_stream: bool, unread: bool) -> OutputSlot:
    if is_stream:
        return OutputSlot(leaf.key, "stream")
    if unread:
        # Nothing in the traced forward reads it: None is what such layers return when the element
        # is not asked for (attention weights without output_attentions), and a reader would fail loudly.
        return OutputSlot(leaf.key, "unread")
    if leaf.kind == "input":
        assert leaf.source is not None  # an input leaf names the argument it passes on
        position, name = argument_slot(module, leaf.source)
        return OutputSlot(leaf.key, "input", position, name)
    return OutputSlot(leaf.key, "constant", value=leaf.value)


def _stream_shape(facts: UnitFacts, stream_leaf: Leaf | None) -> tuple[int, ...] | None:
    return stream_leaf.shape if stream_leaf is not None else facts.output_shape


def _shape_change(facts: UnitFacts, output_shape: tuple[int, ...] | None) -> str:
    if facts.arg_shapes is None or output_shape is None:
        return ""
    key = facts.stream_argument if facts.stream_argument is not None else 0
    before = facts.arg_shapes.get(key)
    if before is None or before == output_shape:
        return ""
    return f" from {list(before)} to {list(output_shape)}"


def signature_of(function: Callable[..., Any]) -> inspect.Signature | None:
    """What ``inspect.signature`` gives for ``function``; None where it reads none (a builtin).

    A stand-in for ``module.forward`` sets it as its ``__signature__``: models choose the
    arguments they pass by ``inspect.signature(layer.forward)``.
    """
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def argument_slot(module: nn.Module, key: int | str) -> tuple[int | None, str | None]:
    """(position, name) of a forward argument given as a position or a keyword."""
    params = list(inspect.signature(module.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if isinstance(key, int):
        return key, positional[key].name if key < len(positional) else None
    position = next((i for i, p in enumerate(positional) if p.name == key), None)
    return position, key


# -- at run time: what the gate returns ----------------------------------------------------------
def _argument(args: tuple, kwargs: dict, position: int | None, name: str | None) -> Any:
    if position is not None and len(args) > position:
        return args[position]
    if name is not None and name in kwargs:
        return kwargs[name]
    raise TypeError(f"the gated unit's argument {name or position!r} was not passed; "
                    "discovery saw it passed (call the model the way its example inputs did)")


def _stream_key(block: Any) -> int | str:
    return next(slot.key for slot in block.output_slots if slot.role == "stream")


def stream_output(block: Any, out: Any) -> torch.Tensor:
    """The stream element of a unit's output (the output itself for a unit returning one tensor)."""
    if block.output_container == "tensor":
        return out
    return out[_stream_key(block)]


def with_stream_output(block: Any, out: Any, stream: torch.Tensor) -> Any:
    """``out`` with its stream element replaced by ``stream`` (other elements untouched)."""
    if block.output_container == "tensor":
        return stream
    if isinstance(out, dict):
        return {**out, _stream_key(block): stream}
    items = list(out)
    items[cast(int, _stream_key(block))] = stream  # a list or tuple's stream key is its position
    return items if block.output_container == "list" else tuple(items)


def skipped_output(block: Any, args: tuple, kwargs: dict, stream: torch.Tensor) -> Any:
    """What a skipped unit returns: ``stream`` in the stream's place, pass-through values in theirs."""
    if block.output_container == "tensor":
        return stream
    values = {}
    for slot in block.output_slots:
        if slot.role == "stream":
            values[slot.key] = stream
        elif slot.role == "input":
            values[slot.key] = _argument(args, kwargs, slot.source_position, slot.source_name)
        else:
            values[slot.key] = slot.value
    if block.output_container == "dict":
        return values
    items = [values[i] for i in range(len(values))]
    return items if block.output_container == "list" else tuple(items)
