"""Front-end: turn a model into one torch.fx graph annotated with module scopes.

Two tracers, tried in order:

1. ``torch.fx`` symbolic tracing: needs no inputs; tracer options pass through.
2. ``torch.export`` (non-strict): needs example inputs; works on models that
   symbolic tracing cannot handle (Hugging Face transformers 5 among them).

Both produce a graph whose nodes carry ``meta["nn_module_stack"]``. The rest of
raptr_fx only sees :class:`TracedModel`, never which tracer made it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn

from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ._compat import DataDependentOutputException, soft_unbound_sizes, traced_seq_len
from .errors import TracingError
from .skipping import ObservedOutput, observe

__all__ = ["TracedModel", "trace", "normalize_example_inputs"]

# Ops that read a tensor's metadata, not its values: data does not flow through them.
_SHAPE_METHODS = {"size", "dim", "numel", "stride", "type", "get_device", "is_contiguous"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
_SHAPE_ATEN = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata"}

_EXPORT_LOGGERS = ("torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "torch._dynamo",
                   "torch.fx.experimental.recording", "torch._subclasses.fake_tensor")
_DATA_DEPENDENT = (DataDependentOutputException, GuardOnDataDependentSymNode)

_TRACER_OPTIONS = {"leaf_modules", "autowrap_functions", "autowrap_modules", "concrete_args"}

# torch.nn's transformer layers and stacks are Python around nn.MultiheadAttention (which stays a
# leaf): traced through, so their residual adds make units and their attention's heads width groups.
_TRACED_THROUGH = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer,
                   nn.TransformerDecoderLayer)

ExampleInputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class TracedModel:
    """A traced graph plus what the analysis needs to know about each node."""

    graph: fx.Graph
    tracer: str  # "torch.fx" or "torch.export"
    scopes: dict[fx.Node, tuple[str, ...]]  # qualified names of the modules a node runs in, outer first
    param_uses: dict[fx.Node, frozenset[str]]  # parameters a node reads directly
    user_inputs: list[fx.Node]  # placeholders fed by the caller (not parameters, buffers, constants)
    user_outputs: list[fx.Node]  # what the model returns (not buffer updates)
    call_counts: Counter[str]  # how often each module ran in one forward
    # module name -> the graph node passed as each argument of its (single) call; torch.fx only
    call_args: dict[str, dict[int | str, fx.Node]] = field(default_factory=dict)
    # module name -> what its (first) call returned, element by element; torch.fx only
    call_outputs: dict[str, ObservedOutput] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the trace assumed beyond the example inputs

    def is_value(self, node: fx.Node) -> bool:
        """True for nodes that carry tensor data (not parameters, constants or shapes)."""
        if node.op in ("get_attr", "output") or is_shape_query(node):
            return False
        if node.op == "placeholder" and node not in self.user_inputs:
            return False
        val = node.meta.get("val")
        return val is None or isinstance(val, torch.Tensor)

    def is_float(self, node: fx.Node) -> bool:
        """False only when the node is known to hold integers or booleans (ids, masks)."""
        val = node.meta.get("val")
        return not isinstance(val, torch.Tensor) or val.dtype.is_floating_point


def normalize_example_inputs(example_inputs: Any) -> ExampleInputs | None:
    """Accept a tensor, a tuple/list of positional args, or a dict of keyword args."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS
        if node.target is len:
            return True
        name = getattr(node.target, "__name__", "")
        return name.split(".")[0] in _SHAPE_ATEN
    return False


class _RecordingTracer(fx.Tracer):
    """A symbolic tracer that also records every module call's arguments and result."""

    def __init__(self, extra_leaf_modules: Iterable[type[nn.Module]] = (), **kwargs: Any):
        super().__init__(**kwargs)
        self.extra_leaf_modules = tuple(extra_leaf_modules)
        self.call_counts: Counter[str] = Counter()
        self.call_args: dict[str, dict[int | str, fx.Node]] = {}
        self.call_outputs: dict[str, ObservedOutput] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.extra_leaf_modules and isinstance(m, self.extra_leaf_modules):
            return True
        if isinstance(m, _TRACED_THROUGH):
            return False
        if type(m) is nn.Identity:
            # Traced through (it returns its input, no node), as torch.export does: a shortcut
            # ``f(x) + self.shortcut(x)`` or a ``res_scale = nn.Identity()`` keeps the stream.
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.call_counts[name] += 1
        if self.call_counts[name] == 1:
            nodes: dict[int | str, fx.Node] = {}
            for key, value in [*enumerate(args), *kwargs.items()]:
                if isinstance(value, fx.Proxy):
                    nodes[key] = value.node
            self.call_args[name] = nodes
        result = super().call_module(m, forward, args, kwargs)
        if name not in self.call_outputs:
            self.call_outputs[name] = observe(result, args, kwargs, lambda v: isinstance(v, fx.Proxy))
        return result


@contextlib.contextmanager
def _transformer_layers_traceable() -> Iterator[None]:
    """torch.nn's transformer layers as training runs them while traced: their inference fast path
    off (its checks branch on tensor properties), and the stacks' sequence length (``if
    src.is_nested``) unknown for a traced input, as it is for a nested one (it only serves to
    recognise a causal mask, and the trace of a mask fails on its own)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with traced_seq_len(lambda src: isinstance(src, fx.Proxy)):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _scope(node: fx.Node, prefix: str = "") -> tuple[str, ...]:
    """Module names a node runs in, outer first; a module's second call is named ``name@1``."""
    scope = []
    for key, (path, _) in node.meta.get("nn_module_stack", {}).items():
        path = path[len(prefix):] if path.startswith(prefix) else ""
        if path:
            call = key.rpartition("@")[2] if "@" in key else ""
            scope.append(f"{path}@{call}" if call.isdigit() else path)
    return tuple(scope)


def _trace_symbolic(model: nn.Module, tracer_options: dict[str, Any]) -> TracedModel:
    options = dict(tracer_options)
    concrete_args = options.pop("concrete_args", None)
    tracer = _RecordingTracer(
        extra_leaf_modules=options.pop("leaf_modules", ()),
        autowrap_functions=tuple(options.pop("autowrap_functions", ())),
        autowrap_modules=(math, *options.pop("autowrap_modules", ())),
    )
    with _transformer_layers_traceable():
        graph = tracer.trace(model, concrete_args=concrete_args)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    param_uses: dict[fx.Node, frozenset[str]] = {}
    for node in graph.nodes:
        used: set[str] = set()
        if node.op == "call_module":
            used = {f"{node.target}.{n}" for n, _ in modules[node.target].named_parameters()}
        elif node.op == "get_attr" and node.target in params:
            used = {node.target}
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg.target in params:
                used.add(arg.target)
        param_uses[node] = frozenset(used)
    user_inputs = [n for n in graph.nodes if n.op == "placeholder"]
    param_uses = _through_parameter_expressions(graph, param_uses, user_inputs)
    scopes = {n: _scope(n) for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    return TracedModel(
        graph=graph,
        tracer="torch.fx",
        scopes=scopes,
        param_uses=param_uses,
        user_inputs=user_inputs,
        user_outputs=list(output.all_input_nodes),
        call_counts=tracer.call_counts,
        call_args=tracer.call_args,
        call_outputs=tracer.call_outputs,
    )


class _TensorOutputs(nn.Module):
    """Returns only the tensors of a model's output: export rejects cache objects and other types."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.wrapped = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(_tensors(self.wrapped(*args, **kwargs)))


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _export(model: nn.Module, inputs: ExampleInputs) -> tuple[torch.export.ExportedProgram, list[str]]:
    """torch.export (non-strict), retried where the failure is the trace's, not the model's.

    * A data-dependent guard (``if mask.any():``, ``.item()`` sizes): ``torch.export.draft_export``
      traces again, resolving each such branch with the example inputs' real values. The graph is
      then the one the example takes, as with every tracer (shapes are specialized too).
    * Hugging Face models skip building a default attention mask while being traced
      (``if attention_mask is None and not is_torchdynamo_compiling()``) and then read the None:
      traced again with the all-ones mask the eager forward builds for itself.

    Returns the program and what the trace assumed (empty for a plain export).
    """
    args, kwargs = inputs
    notes: list[str] = []
    try:
        return torch.export.export(_TensorOutputs(model), args, kwargs, strict=False), notes
    except Exception as exc:
        failure = exc
    masks = _missing_attention_masks(model, args, kwargs)
    if masks and not _is_data_dependent(failure):
        kwargs = {**kwargs, **masks}
        notes.append(f"{', '.join(masks)} of ones added (the model's default, not built while traced)")
        try:
            return torch.export.export(_TensorOutputs(model), args, kwargs, strict=False), notes
        except Exception as exc:
            if not _is_data_dependent(exc):
                if sys.version_info >= (3, 11):  # add_note is 3.11's
                    failure.add_note(f"retried with {', '.join(masks)} of ones added: {_first_line(exc)}")
                raise failure from exc
            failure = exc
    if not _is_data_dependent(failure):
        raise failure
    notes.append("data-dependent branches resolved with the example inputs' values (torch.export.draft_export)")
    with soft_unbound_sizes():
        return torch.export.draft_export(_TensorOutputs(model), args, kwargs, strict=False), notes


def _is_data_dependent(exc: BaseException) -> bool:
    """A guard on a value fake tensors do not know (torch.export cannot branch on it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _DATA_DEPENDENT) or "data-dependent expression" in str(seen):
            return True  # export re-raises some of them as its own UserError, with this wording
        seen = seen.__cause__ or seen.__context__
    return False


def _missing_attention_masks(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``attention_mask`` (``decoder_attention_mask``, ...) of ones for each ``*input_ids`` given
    without its mask, where the forward takes one: what the model builds itself when not traced."""
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return {}
    masks = {}
    for name, value in bound.items():
        if not (name.endswith("input_ids") and isinstance(value, torch.Tensor) and value.dim() == 2):
            continue
        mask_name = name.removesuffix("input_ids") + "attention_mask"
        if mask_name in signature.parameters and bound.get(mask_name) is None:
            masks[mask_name] = torch.ones_like(value)
    return masks


@contextlib.contextmanager
def _quiet_export():
    """torch.export logs the graph of a failed attempt and draft_export each branch it resolved:
    a retry that succeeds says what it assumed in ``TracedModel.notes``, a failure in the error."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _trace_export(model: nn.Module, inputs: ExampleInputs) -> TracedModel:
    with _quiet_export():
        program, notes = _export(model, inputs)
    graph = program.graph
    signature = program.graph_signature
    prefix = "wrapped."
    param_of = {node: name.removeprefix(prefix) for node, name in signature.inputs_to_parameters.items()}
    param_uses: dict[fx.Node, frozenset[str]] = {}
    for node in graph.nodes:
        used = {param_of[node.name]} if node.op == "placeholder" and node.name in param_of else set()
        used |= {param_of[a.name] for a in node.all_input_nodes if a.op == "placeholder" and a.name in param_of}
        param_uses[node] = frozenset(used)
    scopes = {n: _scope(n, prefix) for n in graph.nodes}
    user_input_names, user_output_names = set(signature.user_inputs), set(signature.user_outputs)
    output = next(n for n in graph.nodes if n.op == "output")
    user_inputs = [n for n in graph.nodes if n.op == "placeholder" and n.name in user_input_names]
    user_outputs = [n for n in output.all_input_nodes if n.name in user_output_names]
    param_uses = _through_parameter_expressions(graph, param_uses, user_inputs)
    return TracedModel(
        graph=graph,
        tracer="torch.export",
        scopes=scopes,
        param_uses=param_uses,
        user_inputs=user_inputs,
        user_outputs=user_outputs,
        call_counts=Counter(),  # filled in by the probe run, which sees every call
        notes=notes,
    )


def _through_parameter_expressions(graph: fx.Graph, param_uses: dict[fx.Node, frozenset[str]],
                                   user_inputs: list[fx.Node]) -> dict[fx.Node, frozenset[str]]:
    """A node reading a value computed from parameters alone reads those parameters.

    ``x * self.gamma.view(1, -1, 1, 1)`` or a weight standardized before ``F.conv2d``: the op
    that meets the data reads ``gamma`` or the conv weight through the view or the arithmetic.
    """
    carries_inputs: set[fx.Node] = set(user_inputs)
    expression: dict[fx.Node, frozenset[str]] = {}  # node computed from parameters alone -> them
    result = dict(param_uses)
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if node in carries_inputs or any(a in carries_inputs for a in inputs):
            carries_inputs.add(node)
        else:
            expression[node] = param_uses.get(node, frozenset()).union(
                *(expression.get(a, frozenset()) for a in inputs))
        reached = frozenset().union(*(expression[a] for a in inputs if a in expression))
        if reached - result.get(node, frozenset()):
            result[node] = result.get(node, frozenset()) | reached
    return result


def _first_line(exc: BaseException) -> str:
    """The error's first line and where in the model's own code it was raised."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".strip()
    frame = _model_frame(exc)
    if frame is not None:
        code = f" ({frame.line.strip()})" if frame.line else ""
        line += f" at {Path(frame.filename).name}:{frame.lineno}{code}"
    return line


def _model_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame outside torch and raptr_fx: the model code the tracer stopped at."""
    skip = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(skip) and "<" not in f.filename]
    return frames[-1] if frames else None


def trace(
    model: nn.Module,
    example_inputs: ExampleInputs | None,
    tracer_options: dict[str, Any],
) -> TracedModel:
    """Trace ``model`` with the first tracer that succeeds; raise one error listing all failures."""
    unknown = set(tracer_options) - _TRACER_OPTIONS
    if unknown:
        raise ValueError(f"unknown tracer option(s) {sorted(unknown)}; expected one of {sorted(_TRACER_OPTIONS)}")
    failures: list[str] = []
    retries: list[str] = []  # what torch.export tried again, and how that failed
    try:
        return _trace_symbolic(model, tracer_options)
    except Exception as exc:  # symbolic tracing fails in many ways on dynamic Python
        failures.append(f"torch.fx symbolic_trace: {_first_line(exc)}")
    if example_inputs is not None:
        try:
            return _trace_export(model, example_inputs)
        except Exception as exc:
            failures.append(f"torch.export (non-strict): {_first_line(exc)}")
            retries = list(getattr(exc, "__notes__", ()))
    else:
        failures.append("torch.export (non-strict): skipped, needs example inputs")
    reasons = "\n".join([f"  - {line}" for line in failures] + [f"    {line}" for line in retries])
    # The first line says why: the last tracer tried with inputs, the symbolic tracer without.
    main = failures[-1] if example_inputs is not None else failures[0]
    # With example inputs, the model already ran on them (the probe): the tracers are what failed.
    fix = ("mark the module that fails as a leaf (leaf_modules=[ThatModule]), or simplify the "
           "Python control flow that torch.export reports" if example_inputs is not None else
           "pass example inputs (find_blocks(model, example_inputs=...) or --input-shape), "
           "or mark the module that fails as a leaf (leaf_modules=[ThatModule])")
    raise TracingError(f"could not trace {type(model).__name__}: {main}\n{reasons}\nFix: {fix}.")
