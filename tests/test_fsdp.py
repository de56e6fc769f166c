"""Real FSDP2: 2 CPU processes over gloo, fully_shard per unit then the root."""

import gc
import os
import weakref

import pytest
import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from raptr_fx import RaPTr, RaptrError, transform
from tests.distributed import WORLD, run_ranks
from tests.fixtures.models import GPT

STEPS = 6
SCHEDULE = dict(schedule=RaPTr("2-3-4", total_steps=STEPS), seed=7)


def reference_model() -> GPT:
    torch.manual_seed(0)
    return GPT(n_layer=4)


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1000 * rank + step))


def train(model, ctl, runner, inputs) -> tuple[list, list]:
    """STEPS optimizer steps; the decisions, and for each dropped unit whether it stayed unchanged."""
    # SGD, not Adam: Adam turns the float noise of gradients that are zero in exact arithmetic
    # (attention's key bias) into full-size steps, so no two reduction orders would agree.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ctl.attach(optimizer)
    decisions, frozen = [], []
    for step in range(STEPS):
        decisions.append(ctl.active)
        before = [[_full(p).clone() for p in model.transformer.h[i].parameters()] for i in range(4)]
        idx = inputs(step)
        loss = torch.nn.functional.cross_entropy(runner(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for i, kept in enumerate(decisions[-1]):
            if not kept:
                frozen.append(all(torch.equal(a, _full(b)) for a, b in zip(before[i], model.transformer.h[i].parameters())))
    return decisions, frozen


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach()


def _shard(model: GPT) -> None:
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def _worker(rank: int, out_dir: str, flow: str) -> dict:
    result = {}
    if flow == "meta":  # build without memory, transform, shard, then materialize and initialize
        with torch.device("meta"):
            model = GPT(n_layer=4)
        ctl = transform(model, **SCHEDULE)
        _shard(model)
        model.to_empty(device="cpu")
        with torch.no_grad():  # the reference's values, so both flows can be checked against it
            for p, full in zip(model.parameters(), reference_model().parameters()):
                p.copy_(distribute_tensor(full.detach(), p.device_mesh, p.placements))
    else:
        model = reference_model()
        unsharded = [weakref.ref(p) for p in model.parameters()]
        ctl = transform(model, **SCHEDULE)
        _shard(model)
        gc.collect()
        result["full_size_alive"] = sum(ref() is not None for ref in unsharded)
        try:
            transform(model, **SCHEDULE)
        except RaptrError as error:
            result["second_transform"] = str(error)
    if flow == "compiled":
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{out_dir}/inductor-cache-{rank}"
        model.compile()  # regional gates: each unit its own compiled graph, skipped units never run
    result["shard_numel"] = sum(p.to_local().numel() for p in model.parameters())
    result["all_dtensors"] = all(isinstance(p, DTensor) for p in model.parameters())
    result["decisions"], result["frozen"] = train(model, ctl, model, lambda step: batch(rank, step))
    result["final"] = [_full(p).tolist() for p in model.parameters()]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("flow", ["sharded", "meta", pytest.param("compiled", marks=pytest.mark.compile)])
def test_fsdp2_matches_a_single_process_run_and_keeps_only_shards(tmp_path, flow):
    ranks = run_ranks(_worker, tmp_path, flow)

    model = reference_model()
    ctl = transform(model, **SCHEDULE)
    both_ranks = lambda step: torch.cat([batch(r, step) for r in range(WORLD)])  # noqa: E731
    decisions, frozen = train(model, ctl, model, both_ranks)

    assert ranks[0]["decisions"] == ranks[1]["decisions"] == decisions
    assert any(not all(d) for d in decisions), "some steps must drop units"
    assert all(ranks[0]["frozen"]) and all(ranks[1]["frozen"]) and ranks[0]["frozen"], "dropped units moved"
    tolerance = dict(rtol=1e-3, atol=1e-4) if flow == "compiled" else dict(rtol=1e-4, atol=1e-5)  # fused kernels
    for got, want in zip(ranks[0]["final"], model.parameters()):
        torch.testing.assert_close(torch.tensor(got), want.detach(), **tolerance)
    total = sum(p.numel() for p in model.parameters())
    for rank in ranks:
        assert rank["all_dtensors"]
        assert rank["shard_numel"] <= total // WORLD + 64  # each rank holds its shard only
    if flow != "meta":
        # Nothing (the gates included) keeps the unsharded parameters alive after sharding.
        assert [r["full_size_alive"] for r in ranks] == [0, 0]
        assert "transform before fully_shard" in ranks[0]["second_transform"]


def _recipe_worker(rank: int, out_dir: str, order: str) -> dict:
    """PyTorch's scaling recipe on every block: activation checkpointing, torch.compile, fully_shard."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def recipe(model: GPT, counter, transform_at: str | None):
        ctl = transform(model, **SCHEDULE) if transform_at == "first" else None
        for i, block in enumerate(model.transformer.h):
            model.transformer.h[i] = checkpoint_wrapper(block)
        if transform_at == "after-ac":
            ctl = transform(model, **SCHEDULE)
        for i, block in enumerate(model.transformer.h):
            model.transformer.h[i] = torch.compile(block, backend=counter)
        _shard(model)
        return ctl

    result = {}
    for transformed in (False, True):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        model = reference_model()
        ctl = recipe(model, counter, order if transformed else None)
        if transformed:
            result["decisions"], result["frozen"] = train(model, ctl, model, lambda step: batch(rank, step))
            result["final"] = [_full(p).tolist() for p in model.parameters()]
            result["graphs"] = counter.frame_count
        else:
            model(batch(rank, 0)).sum().backward()
            result["untransformed_graphs"] = counter.frame_count
    return result


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("order", ["first", "after-ac"], ids=["transform-ac-compile-shard", "ac-transform-compile-shard"])
def test_fsdp2_with_checkpointed_compiled_blocks_compiles_like_the_untransformed_stack(tmp_path, order):
    ranks = run_ranks(_recipe_worker, tmp_path, order)

    model = reference_model()
    ctl = transform(model, **SCHEDULE)
    decisions, frozen = train(model, ctl, model, lambda step: torch.cat([batch(r, step) for r in range(WORLD)]))
    for rank in ranks:
        assert rank["decisions"] == decisions and all(rank["frozen"]) and rank["frozen"]
        assert rank["graphs"] == rank["untransformed_graphs"] == 1  # one graph serves every block, no recompile
        for got, want in zip(rank["final"], model.parameters()):
            torch.testing.assert_close(torch.tensor(got), want.detach(), rtol=1e-4, atol=1e-5)


def _owned_worker(rank: int, out_dir: str) -> dict:
    """fully_shard per unit, then the root, which holds the norms the units own (tests/test_owned.py)."""
    from tests.fixtures.patterns import NormListLoop

    torch.manual_seed(0)
    model = NormListLoop()
    ctl = transform(model, RaPTr("2-3-4", total_steps=STEPS, fixed_units=[], sampling="exact"), seed=7)
    for block in ctl.blocks:
        fully_shard(model.get_submodule(block.name))
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ctl.attach(optimizer)
    decisions, frozen = [], []
    for step in range(STEPS):
        decisions.append(ctl.active)
        owned = [[model.get_parameter(p) for p in b.owned] for b in ctl.blocks]
        before = [[_full(p).clone() for p in params] for params in owned]
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1000 * rank + step))
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        owned = [[model.get_parameter(p) for p in b.owned] for b in ctl.blocks]
        frozen += [all(torch.equal(a, _full(b)) for a, b in zip(values, params))
                   for values, params, kept in zip(before, owned, decisions[-1]) if not kept]
    norms_sharded = all(isinstance(p, DTensor) for p in model.norms.parameters())
    return {"decisions": decisions, "frozen": frozen, "norms_sharded": norms_sharded,
            "final": [_full(p).tolist() for p in model.norms.parameters()]}


@pytest.mark.slow
def test_fsdp2_freezes_the_norms_skipped_units_own_on_every_rank(tmp_path):
    ranks = run_ranks(_owned_worker, tmp_path)
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert any(not all(d) for d in ranks[0]["decisions"]), "some steps must drop units"
    for rank in ranks:
        assert rank["norms_sharded"] and rank["frozen"] and all(rank["frozen"]), "a skipped unit's norm moved"
    assert ranks[0]["final"] == ranks[1]["final"]
