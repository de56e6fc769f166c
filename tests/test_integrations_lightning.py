"""raptr_fx.integrations.lightning: RaPTrLightningCallback under a real lightning.Trainer (CPU)."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
import torch.nn.functional as F

import raptr_fx
from raptr_fx import RaPTr, WidthRaPTr
from raptr_fx.errors import RaptrWarning
from tests.fixtures.models import GPT

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from raptr_fx.integrations.lightning import RaPTrLightningCallback  # noqa: E402

STEPS = 12
VOCAB = 64


class LitGPT(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = GPT(n_layer=4, vocab=VOCAB)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        logits = self.model(x[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class LitLlama(LitGPT):
    """A transformers model: traced with torch.export, so transformed at its first forward."""

    def __init__(self):
        L.LightningModule.__init__(self)
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                          bos_token_id=0, eos_token_id=0, use_cache=False)
        self.model = transformers.LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss


MODELS = {"gpt": (LitGPT, "transformer.h"), "llama": (LitLlama, "model.layers")}


def loader():
    data = torch.randint(0, VOCAB, (64, 9), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2)


def fit(callback, tmp_path, ckpt_path=None, lit=None, **overrides):
    """Fit STEPS optimizer steps; returns (trainer, lit, [(controller step, active) per forward], optimizer steps)."""
    lit = lit if lit is not None else LitGPT()
    seen: list[tuple[int, tuple[bool, ...]]] = []

    def record(*_):
        if callback.controller is not None:
            seen.append((callback.controller.step_count, tuple(callback.controller.active)))

    lit.model.register_forward_hook(record)
    steps = [0]

    class CountSteps(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))

    options = dict(max_steps=STEPS, accumulate_grad_batches=2, accelerator="cpu", enable_progress_bar=False,
                   logger=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                   callbacks=[callback, CountSteps(), ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4,
                                                                      save_top_k=-1)])
    options.update(overrides)
    trainer = L.Trainer(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on CPU workers, resumable loaders, ...
        warnings.simplefilter("error", RaptrWarning)
        trainer.fit(lit, loader(), ckpt_path=ckpt_path)
    return trainer, lit, seen, steps[0]


def by_step(seen):
    result: dict[int, tuple[bool, ...]] = {}
    for step, active in seen:
        assert result.setdefault(step, active) == active, f"micro-batches of step {step} ran different units"
    return result


@pytest.mark.parametrize("name", list(MODELS))
def test_accumulation_checkpoint_resume_and_logs(tmp_path, name):
    factory, prefix = MODELS[name]
    callback = RaPTrLightningCallback("3-3-4", module="model", seed=5)
    trainer, lit, seen, optimizer_steps = fit(callback, tmp_path / "a", lit=factory())
    ctl = callback.controller
    assert [b.name for b in ctl.blocks] == [f"{prefix}.{i}" for i in range(4)]
    assert optimizer_steps == STEPS and ctl.step_count == STEPS and trainer.global_step == STEPS
    assert len(seen) == 2 * STEPS  # accumulate_grad_batches=2: two forwards per step, same units
    full = by_step(seen)
    assert sorted(full) == list(range(STEPS)) and len(set(full.values())) > 1
    metrics = trainer.callback_metrics
    assert metrics["raptr/stage"] == 2 and metrics["raptr/active_units"] == 4 and metrics["raptr/expected_compute"] == 1
    checkpoint = torch.load(tmp_path / "a" / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    assert checkpoint["callbacks"]["RaPTrLightningCallback"]["controller"]["step"] == 4
    # resume from step 4 with a new model and callback (another seed by mistake: the checkpoint's wins)
    resumed_cb = RaPTrLightningCallback("3-3-4", module="model", seed=99)
    trainer, _, seen, optimizer_steps = fit(resumed_cb, tmp_path / "b", lit=factory(),
                                            ckpt_path=str(tmp_path / "a" / "ckpt" / "epoch=0-step=4.ckpt"))
    resumed = by_step(seen)
    assert sorted(resumed) == list(range(4, STEPS))
    assert all(resumed[t] == full[t] for t in resumed)
    assert optimizer_steps == STEPS - 4 and resumed_cb.controller.step_count == STEPS


def test_existing_controller_and_frozen_units(tmp_path):
    lit = LitGPT()
    ctl = raptr_fx.transform(lit.model, RaPTr("2-2", total_steps=STEPS))  # middle units never run
    before = {k: v.clone() for k, v in lit.model.state_dict().items()}
    callback = RaPTrLightningCallback(controller=ctl)
    _, _, seen, _ = fit(callback, tmp_path, lit=lit, accumulate_grad_batches=1, callbacks=[callback])
    assert ctl.step_count == STEPS and len(seen) == STEPS
    after = lit.model.state_dict()
    changed = {k.split(".")[2] for k in before
               if k.startswith("transformer.h.") and not torch.equal(before[k], after[k])}
    assert changed == {"0", "3"}


def test_width_schedule_freezes_the_parts_not_kept(tmp_path):
    # Lightning's closure runs the backward inside optimizer.step(): whatever the controller freezes
    # around the step (here the MLP rows a width cut did not keep) must still be frozen.
    callback = RaPTrLightningCallback(WidthRaPTr("0.5-1", total_steps=STEPS), module="model")
    unchanged_and_dropped = []

    class CompareRows(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.before = pl_module.model.transformer.h[0].mlp.c_fc.weight.detach().clone()
            self.dropped = 64 - callback.controller.kept_parts["transformer.h.0.mlp:mlp"]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = pl_module.model.transformer.h[0].mlp.c_fc.weight
            unchanged = int((after == self.before).all(dim=1).sum())
            unchanged_and_dropped.append((unchanged, self.dropped))

    fit(callback, tmp_path, accumulate_grad_batches=1, callbacks=[callback, CompareRows()])
    assert [g.name for g in callback.controller.width_groups] == [f"transformer.h.{i}.mlp:mlp" for i in range(4)]
    assert unchanged_and_dropped == [(32, 32)] * (STEPS // 2) + [(0, 0)] * (STEPS // 2)


def test_whole_module_and_csv_logger(tmp_path):
    class Whole(LitGPT):
        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return F.cross_entropy(self(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    callback = RaPTrLightningCallback("3-4")  # module=None: the LightningModule itself, total_steps from max_steps
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    fit(callback, tmp_path, lit=Whole(), logger=logger, callbacks=[callback], log_every_n_steps=1)
    assert [b.name for b in callback.controller.blocks] == [f"model.transformer.h.{i}" for i in range(4)]
    assert callback.controller.step_count == STEPS
    assert "raptr/active_units" in (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()


def test_logged_values_are_those_of_the_step_on_the_row(tmp_path):
    callback = RaPTrLightningCallback("3-3-4", module="model", seed=1)

    class LogsWhatRan(LitGPT):
        """Logs, next to its loss, the stage and units the gates ran in this batch's forward."""

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            ctl = callback.controller  # made at setup; read right after the forward
            self.log_dict({"ran/stage": float(ctl.stage), "ran/active_units": float(sum(ctl.active))},
                          on_step=True, on_epoch=False)
            return loss

    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    fit(callback, tmp_path, lit=LogsWhatRan(), logger=logger, callbacks=[callback], log_every_n_steps=1)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["raptr/stage"]]
    assert len(rows) == STEPS  # one row per optimizer step
    assert [(r["raptr/stage"], r["raptr/active_units"]) for r in rows] == [
        (r["ran/stage"], r["ran/active_units"]) for r in rows]
    assert {r["ran/stage"] for r in rows} == {"0.0", "1.0", "2.0"}  # an off-by-one shows at the stage boundaries


def test_bad_arguments():
    with pytest.raises(TypeError, match="module must be .* got int 3"):
        RaPTrLightningCallback("3-4", module=3)
    with pytest.raises(TypeError, match="schedule must be .* got list"):
        RaPTrLightningCallback([3, 4])
    callback = RaPTrLightningCallback("3-4", module="modle")
    with pytest.raises(ValueError, match="module='modle' is not an attribute of LitGPT"):
        callback.setup(L.Trainer(max_steps=4, logger=False, enable_progress_bar=False), LitGPT(), "fit")
