"""Tensor parallel (DTensor, ``parallelize_module``) with real processes: 2 CPU ranks over gloo.

Each unit's MLP is column-parallel then row-parallel, as in PyTorch's TP recipes.
"""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from raptr_fx import RaPTr, RaptrError, WidthRaPTr, transform
from tests.distributed import run_ranks
from tests.fixtures.models import GPT
from tests.test_fsdp import _full, batch

STEPS = 6
SCHEDULE = dict(schedule=RaPTr("2-3-4", total_steps=STEPS), seed=7)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(n_layer=4)


def _tensor_parallel(model: GPT, mesh) -> None:
    for block in model.transformer.h:
        parallelize_module(block.mlp, mesh, {"c_fc": ColwiseParallel(), "c_proj": RowwiseParallel()})


def _train(model, ctl) -> dict:
    """STEPS steps with clip_grad_norm_; every rank sees the same batch, as tensor parallel wants."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ctl.attach(optimizer)
    decisions, norms, dropped_grads_like_params = [], [], []
    for step in range(STEPS):
        decisions.append(ctl.active)
        idx = batch(0, step)
        torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        for i, kept in enumerate(decisions[-1]):
            weight = model.transformer.h[i].mlp.c_fc.weight
            if not kept and isinstance(weight, DTensor):  # distributed: dropped units get zero gradients
                grad = weight.grad
                dropped_grads_like_params.append(isinstance(grad, DTensor) and grad.placements == weight.placements
                                                 and grad.to_local().shape == weight.to_local().shape)
        # The tensor-parallel (DTensor) parameters: torch's clip_grad_norm_ refuses a mix of DTensor and
        # plain gradients, untransformed too, and only the MLPs are parallel here.
        parallel = [p for name, p in model.named_parameters() if ".mlp." in name]
        norms.append(_full(torch.nn.utils.clip_grad_norm_(parallel, 0.5)).item())
        optimizer.step()
        optimizer.zero_grad()
    return dict(decisions=decisions, norms=norms, dropped_grads_like_params=dropped_grads_like_params,
                final=[_full(p).tolist() for p in model.parameters()])


def _worker(rank: int, out_dir: str) -> dict:
    mesh = init_device_mesh("cpu", (2,))
    result = {}
    for order in ("tp-first", "tp-last"):
        model = _model()
        if order == "tp-first":
            _tensor_parallel(model, mesh)
            ctl = transform(model, **SCHEDULE)
        else:
            ctl = transform(model, **SCHEDULE)
            _tensor_parallel(model, mesh)
        result[order] = _train(model, ctl)

    width = WidthRaPTr("0.5-1", total_steps=2)
    inputs = (batch(0, 0),)
    model = _model()
    _tensor_parallel(model, mesh)
    try:
        transform(model, width, example_inputs=inputs)
    except RaptrError as error:
        result["width tp-first"] = str(error)
    model = _model()
    transform(model, width, example_inputs=inputs)
    _tensor_parallel(model, mesh)
    try:
        model(*inputs)
    except RaptrError as error:
        result["width tp-last"] = str(error)
    return result


@pytest.mark.slow
def test_tensor_parallel_depth_with_clip_grad_norm_and_width_refused(tmp_path):
    ranks = run_ranks(_worker, tmp_path)

    model = _model()
    want = _train(model, transform(model, **SCHEDULE))
    assert any(not all(d) for d in want["decisions"]), "some steps must drop units"
    for rank in ranks:
        for order in ("tp-first", "tp-last"):
            got = rank[order]
            assert got["decisions"] == want["decisions"]
            assert got["dropped_grads_like_params"] and all(got["dropped_grads_like_params"])
            torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(want["norms"]), rtol=1e-4, atol=1e-6)
            for a, b in zip(got["final"], want["final"]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
        # Width cuts of TP-sharded projections are refused before training, naming the sharding.
        for order in ("width tp-first", "width tp-last"):
            assert "tensor parallel" in rank[order] and "DTensor sharded as (Shard(" in rank[order], rank[order]
