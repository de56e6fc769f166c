"""Every private torch API raptr_fx uses, in one place.

A torch upgrade that moves one of these breaks here, and ``tests/test_compat.py`` names it. Each
entry says why raptr_fx needs it and what happens without it (a fallback where there is one).
Hugging Face's private API has its own list, ``raptr_fx/integrations/_compat.py``: the core never
imports a framework.

Not wrapped: ``nn.Module``'s own registries (``_modules``, ``_parameters``), read directly where the
per-step checks run as C loops over them (``Controller._watch_gates``): ``getattr`` on a module goes
through ``nn.Module.__getattr__``, several times the cost. They are the module data model since
torch 1.0; ``tests/test_compat.py`` checks them too.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

# Fake tensors: the probe runs the model on shapes only (discovery must not run real compute), and
# width.py / head_rewrite.py propagate shapes through a traced graph. torch has no public home for
# them; without them discovery cannot probe, so no fallback.
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,  # noqa: F401
                                           FakeTensorMode, UnsupportedOperatorException)

# nn.MultiheadAttention's own mask normalisation: the cut forward (mha_heads.py) takes attn_mask and
# key_padding_mask exactly as the module does. No public equivalent, no fallback.
from torch.nn.functional import _canonical_mask as canonical_mask  # noqa: F401
from torch.nn.functional import _none_or_dtype as none_or_dtype  # noqa: F401

# torch.fx's tracer: head_rewrite.py's attention tracer overrides the hook that makes a placeholder
# (a branch on an argument, ``if mask is None``, becomes an assert in the graph), and runs a partial
# graph on fake tensors with the tracer's patches of torch functions taken off. No public
# equivalent; without them fused heads cannot be cut, so no fallback.
from torch.fx._symbolic_trace import _maybe_revert_all_patches as tracer_patches_reverted  # noqa: F401

PROXY_PLACEHOLDER = "_proxy_placeholder"  # fx.Tracer's method making a placeholder's proxy

try:  # a public pytree, where torch has one
    from torch.utils.pytree import tree_map  # noqa: F401
except ImportError:  # torch 2.13: the private module torch itself uses
    from torch.utils._pytree import tree_map  # noqa: F401

__all__ = ["FakeTensorMode", "DataDependentOutputException", "DynamicOutputShapeException",
           "UnsupportedOperatorException", "tree_map",
           "tracer_patches_reverted", "PROXY_PLACEHOLDER", "canonical_mask", "none_or_dtype", "traced_seq_len",
           "soft_unbound_sizes", "lowering_backward_at_forward",
           "dynamo_counters", "compiled_graph_count", "recompile_limit", "local_tensor", "shard_offsets",
           "has_module_hooks", "supports_step_hooks", "COMPILED_CALL", "ORIGINAL_MODULE", "WRAPPED_ATTRIBUTES"]

T = TypeVar("T")

# Where nn.Module.compile() keeps a module's compiled call: a gate on a module compiled in place
# stands there (gates.install_gate), and wrappers.seen_through takes it off for discovery.
COMPILED_CALL = "_compiled_call_impl"
# Where torch.compile's OptimizedModule keeps the module it wraps.
ORIGINAL_MODULE = "_orig_mod"
# The attribute under which each wrapper keeps the module it wraps: torch.compile's OptimizedModule,
# torch.distributed's CheckpointWrapper (and OffloadWrapper). Neither wrapper has a public accessor.
WRAPPED_ATTRIBUTES = (ORIGINAL_MODULE, "_checkpoint_wrapped_module")

_MODULE_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")


def soft_unbound_sizes() -> contextlib.AbstractContextManager:
    """draft_export of ``slot, token = torch.where(mask)`` allocates a size it then finds bound
    nowhere and stops (PendingUnbackedSymbolNotFound; LongCat-Flash's expert routing). Where torch
    can let that pass (``torch.fx.experimental._config``, 2.11 and later), it does: only a runtime
    check of the exported program would be missing, and discovery reads the graph, it never runs it.
    Fallback: nothing changed (such models are then refused with torch's error)."""
    config = getattr(torch.fx.experimental, "_config", None)
    if config is None or not hasattr(config, "soft_pending_unbacked_not_found_error"):
        return contextlib.nullcontext()
    return config.patch(soft_pending_unbacked_not_found_error=True)


@contextlib.contextmanager
def traced_seq_len(unknown: Callable[[Any], bool]) -> Iterator[None]:
    """torch.nn's transformer stacks read a sequence length (``torch.nn.modules.transformer._get_seq_len``)
    only to recognise a causal mask; for an input where ``unknown(src)`` (a traced proxy) it is None,
    as for a nested tensor. Fallback without the helper: nothing swapped."""
    module = torch.nn.modules.transformer
    original = getattr(module, "_get_seq_len", None)
    if original is None:
        yield
        return
    module._get_seq_len = lambda src, batch_first: None if unknown(src) else original(src, batch_first)
    try:
        yield
    finally:
        module._get_seq_len = original


def lowering_backward_at_forward(run: Callable[[], T]) -> T:
    """``run()`` with compiled backward graphs lowered at their first forward, not lazily in the middle
    of a backward pass: there the compile workers would start while DDP's gloo threads reduce gradients
    (seen to hang). ``torch._functorch.config.force_non_lazy_backward_lowering``, set and put back by
    hand: ``config.patch()`` cost about 40 us per call, 7 us this way. Fallback: ``run()`` as it is."""
    config = torch._functorch.config
    if not hasattr(config, "force_non_lazy_backward_lowering"):
        return run()
    before = config.force_non_lazy_backward_lowering
    config.force_non_lazy_backward_lowering = True
    try:
        return run()
    finally:
        config.force_non_lazy_backward_lowering = before


def dynamo_counters() -> dict[str, Any] | None:
    """Dynamo's own event counters (``torch._dynamo.utils.counters``: graph breaks, unimplemented
    constructs), the only trace of dynamo silently running a frame uncompiled. None while dynamo is
    not imported (nothing compiled) or has no counters (then gates.CompileFallbackCheck stays quiet)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return None if utils is None else getattr(utils, "counters", None)


def compiled_graph_count(code: Any) -> int | None:
    """How many graphs dynamo keeps for a code object (``torch._dynamo.eval_frame._debug_get_cache_entry_list``):
    units that compile one graph each are warned about. None without the helper (no warning then)."""
    try:
        return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))
    except Exception:
        return None


def recompile_limit() -> int:
    """dynamo's recompile limit per code object (``recompile_limit``; ``cache_size_limit`` before torch 2.7)."""
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds of a DTensor, sharing its storage (writes land in the shard):
    the public ``to_local()``, which outside autograd hands out the local tensor itself (a view of
    it for a parameter) instead of ``DTensor._local_tensor``."""
    with torch.no_grad():
        return tensor.to_local()  # type: ignore[attr-defined]


def shard_offsets(tensor: torch.Tensor) -> tuple[int, ...]:
    """Where this rank's shard of a DTensor starts in the global tensor, per dimension
    (``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``). Fallback: each mesh
    dimension's ``Shard(dim)`` split as ``torch.chunk`` splits it (DTensor's even sharding)."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:
        return _chunk_offsets(tensor)
    _, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,  # type: ignore[attr-defined]
                                                       tensor.placements)  # type: ignore[attr-defined]
    return tuple(offsets)


def _chunk_offsets(tensor: Any) -> tuple[int, ...]:
    offsets = [0] * tensor.dim()
    sizes = list(tensor.shape)
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_shard():
            dim, parts = placement.dim, tensor.device_mesh.size(mesh_dim)
            chunk = -(-sizes[dim] // parts)  # torch.chunk: ceil(size / parts) per chunk, the last ones shorter
            rank = tensor.device_mesh.get_local_rank(mesh_dim)
            offsets[dim] += min(rank * chunk, sizes[dim])
            sizes[dim] = max(0, min(chunk, sizes[dim] - rank * chunk))
    return tuple(offsets)


def has_module_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own. nn.Module keeps them in private
    dicts with no public reader; a dict that disappears counts as no hooks."""
    return any(getattr(module, name, None) for name in _MODULE_HOOK_DICTS)


def supports_step_hooks(optimizer: Any) -> bool:
    """A ``torch.optim.Optimizer`` whose ``register_step_pre_hook`` works: a subclass that skipped
    ``Optimizer.__init__`` lacks ``_optimizer_step_pre_hooks``, where those hooks are kept."""
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_optimizer_step_pre_hooks")
