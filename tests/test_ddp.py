"""Real DDP: 2 CPU processes over gloo, no find_unused_parameters, eager and compiled."""

import os

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from raptr_fx import RaPTr, transform
from tests.distributed import run_ranks
from tests.fixtures.models import GPT

STEPS = 6


def _worker(rank: int, out_dir: str, compile_mode: str | None, meta: bool) -> dict:
    # A cold inductor cache per rank, so every run really compiles (a warm cache once hid a hang).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{out_dir}/inductor-cache-{rank}"
    torch.manual_seed(0)
    if meta:  # build on meta, transform, then materialize: the gates must follow the new parameters
        with torch.device("meta"):
            model = GPT(n_layer=4)
        ctl = transform(model, RaPTr("2-3-4", total_steps=STEPS), seed=7)
        model.to_empty(device="cpu")
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    else:
        model = GPT(n_layer=4)
        ctl = transform(model, RaPTr("2-3-4", total_steps=STEPS), seed=7, compile_mode=compile_mode or "regional")
    ddp = DDP(model)  # no find_unused_parameters: skipped units must still report gradients
    runner = torch.compile(ddp) if compile_mode else ddp
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl.attach(optimizer)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    decisions, frozen = [], []
    for _ in range(STEPS):
        decisions.append(ctl.active)
        before = [[p.detach().clone() for p in model.transformer.h[i].parameters()] for i in range(4)]
        idx = torch.randint(0, 64, (2, 8), generator=generator)
        loss = torch.nn.functional.cross_entropy(runner(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        unchanged = [all(torch.equal(a, b) for a, b in zip(before[i], model.transformer.h[i].parameters()))
                     for i in range(4)]
        frozen.append([u for u, k in zip(unchanged, decisions[-1]) if not k])
    checksum = [float(p.detach().double().sum()) for p in model.parameters()]
    return {"decisions": decisions, "frozen": frozen, "checksum": checksum}


@pytest.mark.slow
@pytest.mark.parametrize("compile_mode, meta", [
    (None, False),
    (None, True),
    pytest.param("regional", False, marks=pytest.mark.compile),
    pytest.param("cond", False, marks=pytest.mark.compile),
], ids=["eager", "eager-meta-init", "compiled-regional", "compiled-cond"])
def test_ddp_ranks_agree_without_find_unused_parameters(tmp_path, compile_mode, meta):
    ranks = run_ranks(_worker, tmp_path, compile_mode, meta)
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert any(not all(d) for d in ranks[0]["decisions"]), "some steps must drop units"
    assert all(all(f) for f in ranks[0]["frozen"]), "dropped units must not be updated"
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


def _owned_worker(rank: int, out_dir: str) -> dict:
    """A pre-norm loop whose branches own their norms (tests/test_owned.py), under DDP."""
    from tests.fixtures.patterns import NormListLoop

    torch.manual_seed(0)
    model = NormListLoop()
    ctl = transform(model, RaPTr("2-3-4", total_steps=STEPS, fixed_units=[], sampling="exact"), seed=7)
    owned = [[model.get_parameter(p) for p in b.owned] for b in ctl.blocks]
    ddp = DDP(model)  # no find_unused_parameters: the skipped norms must still report gradients
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    generator = torch.Generator().manual_seed(100 + rank)
    decisions, zero_grads, frozen = [], [], []
    for _ in range(STEPS):
        decisions.append(ctl.active)
        before = [[p.detach().clone() for p in params] for params in owned]
        ddp(torch.randn(2, 5, 16, generator=generator)).pow(2).mean().backward()
        zero_grads.append([all(p.grad is not None and not p.grad.any() for p in params)
                           for params, kept in zip(owned, decisions[-1]) if not kept])
        optimizer.step()
        optimizer.zero_grad()
        frozen.append([all(torch.equal(a, b) for a, b in zip(values, params))
                       for values, params, kept in zip(before, owned, decisions[-1]) if not kept])
    checksum = [float(p.detach().double().sum()) for p in model.parameters()]
    return {"decisions": decisions, "zero_grads": zero_grads, "frozen": frozen, "checksum": checksum}


@pytest.mark.slow
def test_ddp_gives_owned_weights_of_skipped_units_zero_gradients_and_freezes_them(tmp_path):
    ranks = run_ranks(_owned_worker, tmp_path)
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert any(not all(d) for d in ranks[0]["decisions"]), "some steps must drop units"
    for rank in ranks:
        assert all(all(z) for z in rank["zero_grads"]), "a skipped unit's norm must get zero gradients"
        assert all(all(f) for f in rank["frozen"]), "a skipped unit's norm must not be updated"
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
