"""Gates: per-module forward overrides that really skip a unit's compute.

A gate replaces ``module.forward`` on the instance only (the class, parameters,
buffers and state_dict keys are untouched) and reads its decision from a shared
:class:`GateState`:

* eager: a plain Python ``if`` on host booleans, so eager training pays no
  compile machinery;
* under ``torch.compile``, ``compile_mode="regional"`` (default): the gate leaves
  the graph, decides in Python, and runs the unit through its own compiled
  forward; one compiled unit graph serves every unit of that shape, every gate
  pattern and every stage (a warning says so when units compile one graph each instead);
* under ``torch.compile``, ``compile_mode="cond"``: ``torch.cond`` on a CPU bool
  tensor that the controller updates in place: the whole model stays one graph
  (``fullgraph=True`` works), but torch.cond's backward recomputes the forward of
  kept units (it saves only the inputs);
* evaluation mode: the original forward, bit for bit;
* under ``torch.compile``, a step where every unit runs unscaled: the original forward, inlined,
  in both modes, so the whole model is one graph with its cross-unit fusions, as untransformed.

A unit that owns modules outside it (``Block.owned_before``/``owned_after``: a parent's norm that
only its branch reads) gets a companion gate on each (:class:`OwnedForward`): while the unit is
skipped, the module returns zeros shaped like its input instead of running.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Literal, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._compat import (COMPILED_CALL, compiled_graph_count, dynamo_counters, lowering_backward_at_forward,
                      recompile_limit)
from .cutting import is_dtensor
from .errors import RaptrError, RaptrWarning
from .skipping import signature_of, skipped_output, stream_output, with_stream_output
from .units import Block
from .wrappers import is_compiled, wrapper_chain

__all__ = ["GateState", "GatedForward", "OwnedForward", "gate_of", "install_gate", "move_gate", "remove_gates"]

CompileMode = Literal["regional", "cond"]


def check_compile_mode(compile_mode: str) -> None:
    if compile_mode not in ("regional", "cond"):
        raise ValueError(f"compile_mode must be 'regional' or 'cond', got {compile_mode!r}")


class GateState:
    """The decisions of one optimizer step, shared by every gate of a model."""

    def __init__(self, num_blocks: int, compile_mode: CompileMode = "regional",
                 compile_options: dict[str, Any] | None = None):
        check_compile_mode(compile_mode)
        self.compile_mode = compile_mode
        self.compile_options = dict(compile_options or {})  # torch.compile kwargs for regional units
        self.keep = [True] * num_blocks  # host copy read by eager gates
        self.scale = [1.0] * num_blocks
        # Every unit runs unscaled (the last stage, FullModel, an all-kept draw): compiled gates then
        # inline the units, so the step is the untransformed model's one graph. A guard on this one
        # flag: at most one more graph, and no recompile when stages switch back and forth.
        self.all_run = True
        # Read by compiled graphs as inputs; updated in place, so no recompilation. On the
        # host: torch.cond reads a CPU predicate without a device sync.
        self.keep_tensor = torch.ones(num_blocks, dtype=torch.bool)
        self.scale_tensor = torch.ones(num_blocks, dtype=torch.float32)
        # Regional mode: which units have compiled, per forward code object, to tell graphs shared
        # by all units from one graph per unit (see _warn_if_each_unit_compiles_its_own_graph).
        self.compiled_units: dict[Any, set[int]] = {}
        self.warned_codes: set[Any] = set()
        # The controller's: moves every displaced gate outside the wrappers put around its unit.
        self.follow_wrappers: Callable[[], None] = lambda: None

    def set(self, keep: list[bool], scale: list[float]) -> None:
        changed = keep != self.keep or scale != self.scale
        self.keep[:] = keep
        self.scale[:] = scale
        self.all_run = all(keep) and scale.count(1.0) == len(scale)
        # Only torch.cond's graphs read the tensors; a step that decides as the last one did (every unit
        # on, step after step) leaves them as they are: two tensors built and copied less per step.
        if self.compile_mode == "cond" and changed:
            self.keep_tensor.copy_(torch.tensor(keep, dtype=torch.bool))
            self.scale_tensor.copy_(torch.tensor(scale, dtype=torch.float32))


class _ZeroGradients(torch.autograd.Function):
    """A scalar zero whose backward gives each parameter a zero gradient.

    Added to a skipped unit's output so DDP's reducer sees every parameter used,
    without ``find_unused_parameters=True`` and without running the unit. A tensor-parallel
    (DTensor) parameter gets a DTensor zero of its mesh and placements, so ``clip_grad_norm_``
    and optimizers see the same kind of gradient as the untransformed model's.
    """

    @staticmethod
    def forward(ctx: Any, like: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.likes = [_zeros_spec(p) for p in params]  # specs, not the parameters: nothing kept alive
        return like.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *(_zeros(spec) for spec in ctx.likes))


def _zeros_spec(param: torch.Tensor) -> tuple:
    if is_dtensor(param):  # tensor parallel: FSDP2 alone swaps in plain unsharded tensors for the forward
        return (param.shape, param.dtype, param.device, param.device_mesh, tuple(param.placements))
    return (param.shape, param.dtype, param.device, None, None)


def _zeros(spec: tuple) -> torch.Tensor:
    shape, dtype, device, mesh, placements = spec
    if mesh is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    from torch.distributed.tensor import zeros
    return zeros(shape, dtype=dtype, device_mesh=mesh, placements=placements)


_is_compiling = torch.compiler.is_compiling  # the same function (dynamo folds it), one look-up less per call
_DISTRIBUTED_BUILD = dist.is_available()  # a property of the torch build: asked once, not per skipped unit


def _distributed() -> bool:
    return _DISTRIBUTED_BUILD and dist.is_initialized()


class GatedForward:
    """Stands in for ``module.forward``; see the module docstring.

    ``module`` is the outermost module in the unit's slot: the unit itself, or a wrapper around it
    (``torch.compile``, activation checkpointing), so a skipped unit never enters the wrapper. On a
    module compiled in place (``module.compile()``) the gate stands in for its compiled call instead.
    """

    def __init__(self, module: nn.Module, block: Block, index: int, state: GateState, scaled: bool,
                 slot: tuple[nn.Module, str], owned: Sequence[tuple[nn.Module, str]] = ()):
        self.module = module
        self.block = block
        self.index = index
        self.state = state
        self.scaled = scaled  # False: scaling is "none", so no arithmetic is emitted at all
        # skipped()'s usual case: the unit returns its stream as is (nothing to build, no zeros to add)
        self.skip_returns_stream = block.drop == "identity" and block.output_container == "tensor"
        self.slot = slot  # (parent, attribute) that holds ``module``: a wrapper put there later is followed
        # Read at every eager call: getattr on a module goes through nn.Module's __getattr__ hook.
        self.module_vars, self.parent_vars = vars(module), vars(slot[0])
        self.place = COMPILED_CALL if COMPILED_CALL in module.__dict__ else "forward"
        # The unit's parameters, then those it owns outside it (frozen with it: ``Block.owned``).
        self.slots = [(owner, name) for owner in module.modules() for name in owner._parameters] + list(owned)
        self.companions: list[OwnedForward] = []  # gates on the modules it owns outside it
        self.original: Callable[..., Any] = getattr(module, self.place)
        self.instance_forward = module.__dict__.get(self.place)  # the user's own override (or compiled call), if any
        self.compiled_forward: Callable[..., Any] | None = None  # regional mode, made on first use
        self.graphs_checked = False  # regional mode: counted among its forward's graphs once it ran
        self.__signature__ = signature_of(self.original)  # inspect.signature(module.forward) unchanged

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy and pickle: module_vars and parent_vars are the modules' own dicts, found again below
        return {k: v for k, v in self.__dict__.items() if k not in ("module_vars", "parent_vars")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.module_vars, self.parent_vars = vars(self.module), vars(self.slot[0])

    def parameters(self) -> list[nn.Parameter]:
        """The unit's trainable parameters as they are now, with those it owns outside it.

        Looked up at every use, never kept: meta-device init (``to_empty``),
        ``load_state_dict(assign=True)`` and FSDP2 sharding replace parameter objects, and a
        kept reference would both point at the stale tensors and keep them alive. The submodules
        and names are kept instead (those stay): one dict look-up per parameter, not a recursive
        ``module.parameters()`` walk, which cost milliseconds per step on 48-unit models.
        """
        found = []
        for owner, name in self.slots:
            param = owner._parameters.get(name)
            if param is not None and param.requires_grad:
                found.append(param)
        return found

    def stream(self, args: tuple, kwargs: dict) -> torch.Tensor:
        position = self.block.stream_position
        if position is not None and len(args) > position:
            return args[position]
        if self.block.stream_name not in kwargs:
            raise RaptrError(f"{self.block.name} was called without its stream argument "
                             f"{self.block.stream_name!r} (position {position}), which discovery traced: "
                             "call it as the traced model did, or transform again")
        return kwargs[self.block.stream_name]

    def with_stream(self, args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
        position = self.block.stream_position
        if position is not None and len(args) > position:
            return (*args[:position], x, *args[position + 1:]), kwargs
        return args, {**kwargs, self.block.stream_name: x}

    def rescale_stream(self, x: torch.Tensor, stream: torch.Tensor, scale: Any) -> torch.Tensor:
        if self.block.drop == "identity":
            return x + (stream - x) * scale  # scale the unit's residual update
        return stream * scale  # scale the branch

    def rescale(self, x: torch.Tensor, out: Any, scale: Any) -> Any:
        """Rescale the stream element of the unit's output; pass-through elements stay as they are."""
        stream = stream_output(self.block, out)
        return with_stream_output(self.block, out, self.rescale_stream(x, stream, scale))

    def skipped(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """The unit's output without running it: the stream (or zeros) in the stream's place and, for a
        unit returning a tuple or dict, its pass-through values in theirs (``skipping.skipped_output``)."""
        out = x if self.block.drop == "identity" else torch.zeros_like(x)
        if torch.is_grad_enabled() and _distributed():
            params = self.parameters()
            if params:
                out = out + _ZeroGradients.apply(x, *params)
        return skipped_output(self.block, args, kwargs, out)

    def displaced(self) -> bool:
        """Whether a wrapper now stands outside this gate: its slot holds another module (the user
        wrapped the unit after ``transform``), or its module was compiled in place since."""
        parent, attribute = self.slot
        return parent._modules.get(attribute) is not self.module or (
            self.place == "forward" and COMPILED_CALL in self.module.__dict__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        if not module.training:
            return self.original(*args, **kwargs)
        if _is_compiling():
            if self.state.all_run:
                return self.original(*args, **kwargs)
            if self.state.compile_mode == "cond":
                return self.with_cond(args, kwargs)
            return _gate_outside_graph(self, args, kwargs)
        # Eager: this runs at every unit call of every step, so the usual cases are written out here
        # (each Python call saved is about 1,500 instructions a unit; benchmarks/instructions.py).
        # self.displaced():
        if self.parent_vars["_modules"].get(self.slot[1]) is not module or (
                COMPILED_CALL in self.module_vars and self.place == "forward"):
            _moved_out_late(self)  # wrapped since the controller last looked: this call is already inside
        state, index, position = self.state, self.index, self.block.stream_position
        if position is None or len(args) <= position:
            return self.gated(args, kwargs, self.original)
        if state.keep[index]:  # gated()'s kept, unscaled unit with its stream passed by position
            if not self.scaled or state.scale[index] == 1.0:
                return self.original(*args, **kwargs)
        elif self.skip_returns_stream and not (_DISTRIBUTED_BUILD and dist.is_initialized()):
            return args[position]  # skipped()'s: the stream itself (no zero gradients to give DDP)
        return self.gated(args, kwargs, self.original)

    def gated(self, args: tuple, kwargs: dict, forward: Callable[..., Any]) -> Any:
        """Decide on the host, then skip the unit or run ``forward`` (and rescale)."""
        position = self.block.stream_position  # self.stream(), its usual case written out
        x = args[position] if position is not None and len(args) > position else self.stream(args, kwargs)
        if not self.state.keep[self.index]:
            return self.skipped(x, args, kwargs)
        out = forward(*args, **kwargs)
        scale = self.state.scale[self.index]
        return out if scale == 1.0 or not self.scaled else self.rescale(x, out, scale)

    def with_cond(self, args: tuple, kwargs: dict) -> Any:
        index = self.index

        def run(x: torch.Tensor) -> torch.Tensor:
            call_args, call_kwargs = self.with_stream(args, kwargs, x)
            out = stream_output(self.block, self.original(*call_args, **call_kwargs))
            if self.scaled:
                scale = self.state.scale_tensor[index]
                out = torch.where(scale == 1.0, out, self.rescale_stream(x, out, scale.to(out.dtype)))
            return out

        def skip(x: torch.Tensor) -> torch.Tensor:
            # torch.cond branches may not return an input as is.
            return x.clone() if self.block.drop == "identity" else torch.zeros_like(x)

        # torch.cond carries the stream only; a unit's other outputs are pass-throughs of its inputs
        # (discovery checked), so the same structure is rebuilt around either branch's stream.
        stream = torch.cond(self.state.keep_tensor[index], run, skip, (self.stream(args, kwargs),))
        return skipped_output(self.block, args, kwargs, stream)


class OwnedForward:
    """Stands in for the forward of a module that a unit owns (only its branch uses it: a parent's
    norm feeding the unit, a post-norm of its output): while the unit is skipped, the module returns
    zeros shaped like its input instead of running. Discovery checked that its output has that shape,
    and that the zeros reach nothing but the skipped unit, or the add as the branch's zeros.

    Otherwise it follows its unit's gate: the original forward when the unit runs, in eval mode, and
    under ``torch.compile`` when every unit runs; ``torch.cond`` in "cond" mode; a graph break and its
    own compiled graph in "regional" mode.
    """

    def __init__(self, module: nn.Module, gate: GatedForward):
        self.module = module
        self.gate = gate
        self.place = COMPILED_CALL if COMPILED_CALL in module.__dict__ else "forward"
        self.original: Callable[..., Any] = getattr(module, self.place)
        self.instance_forward = module.__dict__.get(self.place)
        self.compiled_forward: Callable[..., Any] | None = None  # regional mode, made on first use
        self.__signature__ = signature_of(self.original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        gate = self.gate
        if not gate.module.training:  # the unit's mode decides: in eval its gate runs it whole
            return self.original(*args, **kwargs)
        if torch.compiler.is_compiling():
            if gate.state.all_run:
                return self.original(*args, **kwargs)
            if gate.state.compile_mode == "cond":
                x, rest = _first_argument(args, kwargs)
                return torch.cond(gate.state.keep_tensor[gate.index], lambda x: self.original(x, *rest, **kwargs),
                                  torch.zeros_like, (x,))
            return _owned_outside_graph(self, args, kwargs)
        return self.decided(args, kwargs, self.original)

    def decided(self, args: tuple, kwargs: dict, forward: Callable[..., Any]) -> Any:
        if self.gate.state.keep[self.gate.index]:
            return forward(*args, **kwargs)
        return torch.zeros_like(_first_argument(args, kwargs)[0])


def _first_argument(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple]:
    """An owned module's input (its first argument) and the other positional arguments."""
    if args:
        return args[0], args[1:]
    return next(iter(kwargs.values())), ()


@torch.compiler.disable(reason="raptr_fx's regional gates decide in Python, so the graph breaks at a module "
                        "that a unit owns outside it, as at the unit")
def _owned_outside_graph(owned: OwnedForward, args: tuple, kwargs: dict) -> Any:
    """Regional mode: decide in Python; a kept module runs its own compiled graph (see _gate_outside_graph)."""
    if owned.compiled_forward is None:
        owned.compiled_forward = torch.compile(owned.original, **owned.gate.state.compile_options)
    compiled = owned.compiled_forward
    return lowering_backward_at_forward(lambda: owned.decided(args, kwargs, compiled))


@torch.compiler.disable(reason="raptr_fx's regional gates decide in Python at each unit, so the graph breaks there. "
                        "With fullgraph=True, transform with compile_mode='cond' (one graph, a predicate tensor), or "
                        "torch.compile each block after transform (the gates then decide outside the compiled blocks)")
def _gate_outside_graph(gate: GatedForward, args: tuple, kwargs: dict) -> Any:
    """Regional mode: a graph break at the gate; the unit runs its own compiled graph.

    Units of one class and shape share that graph (dynamo caches by code object), so
    no gate pattern or stage ever recompiles, and nothing is recomputed in backward.
    """
    if gate.compiled_forward is None:
        gate.compiled_forward = torch.compile(gate.original, **gate.state.compile_options)
    compiled = gate.compiled_forward
    out = lowering_backward_at_forward(lambda: gate.gated(args, kwargs, compiled))
    if not gate.graphs_checked and gate.state.keep[gate.index]:  # the unit ran: it has compiled by now
        gate.graphs_checked = True
        _warn_if_each_unit_compiles_its_own_graph(gate)
    return out


class CompileFallbackCheck:
    """Warns once when dynamo gave up compiling at a gate it met where the graph cannot break: a
    ``torch.utils.checkpoint.checkpoint(block, x)`` written in the model's forward puts the gate inside
    checkpoint's higher-order op, and dynamo then runs the loop eagerly, telling nobody.

    Its trace is in dynamo's own counters: a regional gate reached under compile counts an
    ``unimplemented`` entry naming it, and, where the break could be made, a ``graph_break`` entry
    too; inside a checkpoint only the first grows. Read once per step, summed only when the
    ``unimplemented`` counter grew (a dict look-up and two lengths otherwise)."""

    def __init__(self) -> None:
        self.sizes = (-1, -1)
        self.counts = self.gate_counts()
        self.warned = False

    @staticmethod
    def gate_counts() -> tuple[int, int]:
        """How often dynamo met a regional gate it could not inline, and how often it broke the graph there."""
        counters = dynamo_counters()
        if counters is None:
            return 0, 0
        name = _gate_outside_graph.__name__
        return tuple(sum(n for key, n in counters.get(kind, {}).items() if name in str(key))
                     for kind in ("unimplemented", "graph_break"))

    def __call__(self) -> None:
        counters = dynamo_counters()  # None: dynamo not imported, nothing compiled, nothing to check
        if self.warned or counters is None:
            return
        sizes = (sum(counters.get("unimplemented", {}).values()), sum(counters.get("graph_break", {}).values()))
        if sizes == self.sizes:
            return
        self.sizes = sizes
        counts = self.gate_counts()
        met, broke = counts[0] - self.counts[0], counts[1] - self.counts[1]
        self.counts = counts
        if met > 0 and broke <= 0:
            self.warned = True
            warnings.warn(
                "raptr_fx: torch.compile ran a frame of your model uncompiled: it calls a gated block inside "
                "torch.utils.checkpoint.checkpoint, where a gate cannot break the graph. Wrap the blocks with "
                "checkpoint_wrapper (torch.distributed.algorithms._checkpoint.checkpoint_wrapper) instead of "
                "calling checkpoint in forward, or transform with compile_mode='cond'", RaptrWarning, stacklevel=3)


def _warn_if_each_unit_compiles_its_own_graph(gate: GatedForward) -> None:
    """After a unit first ran compiled: do units of this forward compile one graph each?

    They share one graph unless dynamo guards on something that differs per unit, such as the
    per-layer state of a Hugging Face KV cache. Then warm-up compiles every unit, and past dynamo's
    recompile limit units run uncompiled, which torch reports without saying why.
    """
    code = getattr(getattr(gate.original, "__func__", gate.original), "__code__", None)
    if code is None or code in gate.state.warned_codes:
        return
    units = gate.state.compiled_units.setdefault(code, set())
    units.add(gate.index)
    graphs = compiled_graph_count(code)
    if graphs is None:  # a private helper of torch's: without it, no warning
        return
    if graphs >= PER_UNIT_GRAPHS_WARNING and graphs >= len(units):
        gate.state.warned_codes.add(code)
        warnings.warn(f"{gate.block.name} and the other units of {code.co_name} compiled {graphs} graphs for "
                      f"{len(units)} units (regional gates): torch.compile guards on something that differs per unit, "
                      "so each compiles its own graph, and past torch's recompile limit "
                      f"({recompile_limit()}) units run uncompiled. For a Hugging Face model, set "
                      "model.config.use_cache = False for training (the KV cache it builds is the usual cause); "
                      "TORCH_LOGS=recompiles names the guard", RaptrWarning, stacklevel=4)


PER_UNIT_GRAPHS_WARNING = 4  # one static and one dynamic graph are normal; more, one per unit, is not


def _moved_out_late(gate: GatedForward) -> None:
    """A gate found itself inside a wrapper while it ran: move it out now, and say so if the wrapper
    compiles (this step the unit ran uncompiled, and dynamo may have given up on the wrapper's code)."""
    chain = [m for m, _ in wrapper_chain(gate.slot[0].get_submodule(gate.slot[1]))]
    gate.state.follow_wrappers()
    if any(is_compiled(m) for m in chain):
        wrappers = " > ".join(type(m).__name__ + (" (compiled in place)" if COMPILED_CALL in m.__dict__ else "")
                              for m in chain)
        warnings.warn(f"{gate.block.name} was wrapped ({wrappers}) after raptr_fx gated it, and ran "
                      "before the controller saw the wrapper: the gate was inside compiled code, so this unit ran "
                      "uncompiled (and torch.compile may have given up on the wrapper's code for this process). raptr_fx "
                      "moved the gate onto the outermost wrapper. Wrap blocks (torch.compile, checkpoint_wrapper) before "
                      "ctl.attach(optimizer), or call ctl.attach after wrapping, so no step runs like this",
                      RaptrWarning, stacklevel=4)


def slot_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The (parent, attribute) that holds the unit called ``name`` in ``model``."""
    parent, _, attribute = name.rpartition(".")
    return model.get_submodule(parent), attribute


def install_gate(model: nn.Module, block: Block, index: int, state: GateState, scaled: bool) -> GatedForward:
    """Gate ``block`` on the outermost module in its slot (the unit itself, or a wrapper around it),
    and each module it owns outside it."""
    slot = slot_of(model, block.name)
    owned = [slot_of(model, name) for name in block.owned]
    gate = GatedForward(slot[0].get_submodule(slot[1]), block, index, state, scaled, slot, owned)
    gate.module.__dict__[gate.place] = gate
    for name in block.owned_before + block.owned_after:
        companion = OwnedForward(model.get_submodule(name), gate)
        companion.module.__dict__[companion.place] = companion
        gate.companions.append(companion)
    return gate


def move_gate(model: nn.Module, gate: GatedForward) -> GatedForward:
    """Put ``gate`` back outside every wrapper in its slot (wrapped after ``transform``)."""
    outer = gate.slot[0]._modules.get(gate.slot[1])
    if outer is None or not any(m is gate.module for m, _ in wrapper_chain(outer)):
        raise RaptrError(f"{gate.block.name} now holds {type(outer).__name__}, which is not the unit raptr_fx gated "
                         "(nor torch.compile or checkpoint_wrapper around it): replace modules before "
                         "raptr_fx.transform, or ctl.remove() and transform again")
    _remove_gate(gate)
    return install_gate(model, gate.block, gate.index, gate.state, gate.scaled)


def _remove_gate(gate: GatedForward | OwnedForward) -> None:
    for companion in getattr(gate, "companions", ()):
        _remove_gate(companion)
    del gate.module.__dict__[gate.place]
    if gate.instance_forward is not None:
        gate.module.__dict__[gate.place] = gate.instance_forward


def gate_of(module: nn.Module) -> GatedForward | None:
    """The gate standing on ``module``, if any."""
    for place in ("forward", COMPILED_CALL):
        gate = module.__dict__.get(place)
        if isinstance(gate, GatedForward):
            return gate
    return None


def remove_gates(model: nn.Module) -> int:
    """Remove every gate from ``model``; returns how many were removed."""
    removed = 0
    for module in model.modules():
        gate = gate_of(module)
        if gate is not None:
            _remove_gate(gate)
            removed += 1
    return removed
