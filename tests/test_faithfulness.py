"""The library's RaPTr step equals a plain hand-written RaPTr loop: same decisions, same losses."""

import pytest
import torch
import torch.nn.functional as F

from raptr_fx import RaPTr, transform
from tests.fixtures.models import GPT, tokens

LAYERS, STAGES, STEPS_PER_STAGE, SEED = 4, (2, 3, 4), 3, 5


def hand_written(scaling: str) -> tuple[list[float], list[list[bool]]]:
    torch.manual_seed(0)
    model = GPT(n_layer=LAYERS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, decisions = [], []
    for step in range(len(STAGES) * STEPS_PER_STAGE):
        k = STAGES[step // STEPS_PER_STAGE]
        p = (k - 2) / (LAYERS - 2)  # first and last layer always on
        draws = torch.rand(LAYERS, generator=torch.Generator().manual_seed(SEED * 1_000_003 + step))
        keep = [i in (0, LAYERS - 1) or bool(draws[i] < p) for i in range(LAYERS)]
        idx = tokens()[0]
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))
        for i, block in enumerate(model.transformer.h):
            if not keep[i]:
                continue
            fixed = i in (0, LAYERS - 1)
            x = block(x) if scaling == "none" or fixed or p == 1 else x + (block(x) - x) / p
        logits = model.lm_head(model.transformer.ln_f(x))
        loss = F.cross_entropy(logits.flatten(0, 1), idx.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        decisions.append(keep)
    return losses, decisions


def library(scaling: str) -> tuple[list[float], list[list[bool]]]:
    torch.manual_seed(0)
    model = GPT(n_layer=LAYERS)
    schedule = RaPTr("-".join(map(str, STAGES)), total_steps=len(STAGES) * STEPS_PER_STAGE)
    ctl = transform(model, schedule, scaling=scaling, seed=SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    losses, decisions = [], []
    for _ in range(len(STAGES) * STEPS_PER_STAGE):
        decisions.append(ctl.active)
        idx = tokens()[0]
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, decisions


@pytest.mark.parametrize("scaling", ["none", "inverse"])
def test_library_matches_hand_written_raptr(scaling):
    reference_losses, reference_decisions = hand_written(scaling)
    losses, decisions = library(scaling)
    assert decisions == reference_decisions
    assert any(not all(d) for d in decisions) and all(decisions[-1])
    assert losses == pytest.approx(reference_losses, rel=1e-5, abs=1e-6)
