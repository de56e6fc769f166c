"""torch.compile: one graph for every gate pattern and stage (about 30-60 s on a 2-core CPU)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from raptr_fx import RaPTr, transform
from tests.fixtures.models import GPT, tokens

pytestmark = pytest.mark.compile


def test_multi_stage_run_compiles_once_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    ctl = transform(model, RaPTr("2-3-4", total_steps=9), scaling="inverse", seed=1)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    patterns = set()
    for _ in range(9):
        patterns.add(tuple(ctl.active))
        compiled_loss = compiled(*tokens()).pow(2).mean()
        compiled_loss.backward()
        compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        eager_loss = model(*tokens()).pow(2).mean()
        eager_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
        for i, keep in enumerate(ctl.active):
            weight = f"transformer.h.{i}.mlp.c_fc.weight"
            if keep:
                torch.testing.assert_close(compiled_grads[weight], model.get_parameter(weight).grad,
                                           rtol=1e-3, atol=1e-5)
            else:  # torch.cond gives the skipped branch zero gradients, never running it
                assert torch.count_nonzero(compiled_grads[weight]) == 0
        model.zero_grad(set_to_none=True)
        ctl.step()
    assert len(patterns) >= 3 and ctl.stage == 2
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
