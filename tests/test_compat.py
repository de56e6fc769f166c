"""Every private torch (and Hugging Face) API raptr_fx uses still exists: a torch upgrade that moves one fails here,
by name, instead of somewhere deep in discovery or a compiled step."""

import inspect
import sys

import pytest
import torch
from torch import nn

from raptr_fx import _compat
from raptr_fx.integrations import _compat as integrations_compat
from tests.fixtures.models import GPT


def test_private_torch_modules_and_names_exist():
    import torch._functorch.config as functorch_config
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.fx.experimental._config as fx_config
    import torch.utils._pytree as pytree

    for name in ("FakeTensorMode", "DataDependentOutputException", "DynamicOutputShapeException",
                 "UnsupportedOperatorException"):
        assert getattr(fake_tensor, name) is getattr(_compat, name), name
    assert callable(pytree.tree_map)
    assert callable(torch.nn.functional._canonical_mask) and callable(torch.nn.functional._none_or_dtype)
    assert callable(torch.nn.modules.transformer._get_seq_len)
    assert isinstance(functorch_config.force_non_lazy_backward_lowering, bool)
    assert hasattr(fx_config, "soft_pending_unbacked_not_found_error")
    assert isinstance(torch._dynamo.config.recompile_limit, int) and _compat.recompile_limit() >= 1
    assert callable(torch._dynamo.eval_frame._debug_get_cache_entry_list)
    assert callable(torch.fx._symbolic_trace._maybe_revert_all_patches)
    assert callable(getattr(torch.fx.Tracer, _compat.PROXY_PLACEHOLDER))  # head_rewrite's tracer overrides it


def test_dynamo_counters_and_graph_count_read_a_compile():
    torch._dynamo.reset()

    def f(x):
        return x.sin() + 1

    assert _compat.compiled_graph_count(f.__code__) == 0
    torch.compile(f, backend="eager")(torch.ones(3))
    assert _compat.compiled_graph_count(f.__code__) == 1
    assert "torch._dynamo.utils" in sys.modules and _compat.dynamo_counters()["frames"]["total"] >= 1


def test_lowering_flag_is_set_inside_and_put_back():
    config = torch._functorch.config
    before = config.force_non_lazy_backward_lowering
    assert _compat.lowering_backward_at_forward(lambda: config.force_non_lazy_backward_lowering) is True
    assert config.force_non_lazy_backward_lowering is before
    with _compat.soft_unbound_sizes():
        assert torch.fx.experimental._config.soft_pending_unbacked_not_found_error is True


def test_module_registries_and_wrappers_keep_their_names():
    linear = nn.Linear(2, 2)
    assert {"_modules", "_parameters"} <= set(vars(linear))
    for name in _compat._MODULE_HOOK_DICTS:
        assert isinstance(getattr(linear, name), dict), name
    assert not _compat.has_module_hooks(linear)
    linear.register_forward_hook(lambda *_: None)
    assert _compat.has_module_hooks(linear)
    assert getattr(torch.compile(linear), _compat.ORIGINAL_MODULE) is linear
    block = nn.Linear(2, 2)
    block.compile()
    assert _compat.COMPILED_CALL in vars(block)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    assert getattr(checkpoint_wrapper(linear), _compat.WRAPPED_ATTRIBUTES[1]) is linear


def test_optimizer_step_hooks_are_where_supports_step_hooks_looks():
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert _compat.supports_step_hooks(optimizer)
    assert isinstance(optimizer._optimizer_step_pre_hooks, dict)
    assert not _compat.supports_step_hooks(object())


@pytest.mark.slow
def test_dtensor_local_tensor_and_offsets_match_the_private_ones(tmp_path):
    from tests.distributed import run_ranks

    assert run_ranks(_dtensor_worker, tmp_path) == [True, True]


def _dtensor_worker(rank: int, out_dir: str) -> bool:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    weight = nn.Parameter(distribute_tensor(torch.arange(10.0).view(5, 2), mesh, [Shard(0)]))
    local = _compat.local_tensor(weight)
    with torch.no_grad():
        local.add_(100)  # writes land in the shard
    same_storage = weight._local_tensor.data_ptr() == local.data_ptr() and bool((weight._local_tensor >= 100).all())
    offsets = _compat.shard_offsets(weight)
    return same_storage and offsets == _compat._chunk_offsets(weight) == ((0, 0) if rank == 0 else (3, 0))


def test_hugging_face_private_names():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    assert type(config) in transformers.AutoModelForCausalLM._model_mapping
    assert integrations_compat.auto_class_builds(transformers.AutoModelForCausalLM, config)
    assert not integrations_compat.auto_class_builds(transformers.AutoModelForSeq2SeqLM, config)
    accelerate = pytest.importorskip("accelerate")
    assert integrations_compat.ORIGINAL_FORWARD in inspect.getsource(accelerate.Accelerator.prepare_model)
    assert integrations_compat.original_forward(GPT(n_layer=1)) is None
