"""Hugging Face Trainer with the package's optimizers through polyak_fused.integrations.hf, on the
real package (no mocks), CPU: accumulation against the big batch on both of Trainer's loss paths,
a compute_loss override, a 2-layer GPT-2 built from its config, the refused defaults and their
opt-ins. (tests/test_readme.py runs the README's example.)"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

import polyak_fused as pf
from helpers import assert_close
from polyak_fused.integrations import hf

SAMPLES, DIM, CLASSES, TOKENS = 64, 5, 7, 6


@pytest.fixture(autouse=True)
def quiet_transformers():
    """Trainer logs its setup at INFO and warns about the plain nn.Modules used here."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def make_trainer(tmp_path, model, optimizer, data, *, batch, accumulation=1, epochs=2,
                 trainer_cls=Trainer, eval_data=None, **overrides):
    """A Trainer that writes only under tmp_path, logs nothing, keeps the data's order, and uses
    the settings the integration asks for (no clipping, a constant multiplier) unless overridden."""
    settings = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                    num_train_epochs=epochs, max_grad_norm=0.0, lr_scheduler_type="constant",
                    train_sampling_strategy="sequential", report_to="none", save_strategy="no",
                    logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    settings.update(overrides)
    args = TrainingArguments(str(tmp_path / "out"), **settings)
    optimizers = {"optimizers": (optimizer, None)} if optimizer is not None else {}
    trainer = trainer_cls(model=model, args=args, train_dataset=data, eval_dataset=eval_data,
                          **optimizers)
    trainer.remove_callback(PrinterCallback)   # it prints the metrics when tqdm is off
    return trainer


# ---- accumulation: both of Trainer's loss paths -------------------------------------------------
class SampleMeanModel(torch.nn.Module):
    """A per-sample mean loss, forward(x, labels) with no **kwargs: Trainer divides each
    micro-batch loss by gradient_accumulation_steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(DIM, 8, dtype=torch.float64)
        self.out = torch.nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, x, labels):
        prediction = self.out(torch.tanh(self.proj(x))).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(prediction, labels)}


class TokenSumModel(torch.nn.Module):
    """Token classification whose forward takes **kwargs: Trainer then passes num_items_in_batch,
    the number of valid labels in the whole accumulated batch, the model divides its token sum
    by it, and Trainer does not divide again."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(DIM, 8, dtype=torch.float64)
        self.out = torch.nn.Linear(8, CLASSES, dtype=torch.float64)

    def forward(self, x, labels, num_items_in_batch=None, **kwargs):
        logits = self.out(torch.tanh(self.proj(x)))
        total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                  ignore_index=-100, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
        return {"loss": total / count}


def sample_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, DIM, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1)) + 0.1 * torch.randn(SAMPLES, generator=g, dtype=torch.float64)
    return [{"x": a, "labels": b} for a, b in zip(x, y)]


def token_data():
    """Sequences of TOKENS tokens whose last 0..5 labels are padding (-100): the micro-batches
    hold different numbers of valid tokens, so the mean of their means is not the token mean."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, TOKENS, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (SAMPLES, TOKENS), generator=g)
    for i in range(SAMPLES):
        labels[i, TOKENS - (i * 5) % TOKENS:] = -100
    return [{"x": a, "labels": b} for a, b in zip(x, labels)]


@pytest.mark.parametrize("model_cls, data, normalised_by_model", [
    (SampleMeanModel, sample_data, False), (TokenSumModel, token_data, True)],
    ids=["divided_by_trainer", "normalised_by_num_items_in_batch"])
def test_accumulation_equals_the_big_batch(tmp_path, model_cls, data, normalised_by_model):
    """Batches of 4 with gradient_accumulation_steps=4 against batches of 16, 2 epochs (8
    optimizer steps), float64, on both of Trainer's loss paths. The runs add the same terms in
    a different order, so they differ by rounding only (measured: 4e-16 and 2e-15 relative);
    1e-12 leaves over two orders of margin, while a step loss that missed Trainer's division
    by 4 (a watched sum that ignored the gradient reaching the loss) ends 1.4 relative away."""
    dataset = data()
    if normalised_by_model:
        counts = [sum(int((d["labels"] != -100).sum()) for d in dataset[i:i + 4])
                  for i in range(0, 16, 4)]
        assert len(set(counts)) > 1, counts

    def run(batch, accumulation):
        model = model_cls()
        opt = pf.InexactPolyak(model.parameters(), total_steps=None)
        trainer = make_trainer(tmp_path, model, opt, dataset, batch=batch,
                               accumulation=accumulation)
        hf.attach(trainer)
        trainer.train()
        assert trainer.model_accepts_loss_kwargs is normalised_by_model
        assert opt.param_groups[0]["total_steps"] == 8    # optimizer steps, not 32 batches
        assert int(opt.scalars["step"]) == 8 and int(opt.scalars["skipped"]) == 0
        return model, opt

    big, opt_big = run(16, 1)
    accumulated, opt_acc = run(4, 4)
    for (name, a), b in zip(accumulated.named_parameters(), big.parameters()):
        assert_close(a, b, rtol=1e-12, atol=1e-14, what=f"accumulate 4 vs batch 16: {name}")
    assert_close(opt_acc.scalars["step_size"], opt_big.scalars["step_size"], rtol=1e-12, atol=0,
                 what="step size")


class PenalisedTrainer(Trainer):
    """A compute_loss override that adds a term the model does not return."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"] + 0.1 * model.proj.weight.pow(2).sum()
        return (loss, outputs) if return_outputs else loss


def test_compute_loss_override_is_the_watched_loss(tmp_path):
    """The step's loss is what compute_loss returns (the penalty included), not the model's loss:
    the run equals a plain loop given that loss (float64, 1e-12 as above)."""
    dataset = sample_data()
    model = SampleMeanModel()
    opt = pf.InexactPolyak(model.parameters(), total_steps=None)
    trainer = make_trainer(tmp_path, model, opt, dataset, batch=8, accumulation=2, epochs=1,
                           trainer_cls=PenalisedTrainer)
    hf.attach(trainer)
    trainer.train()

    reference = SampleMeanModel()
    ref_opt = pf.InexactPolyak(reference.parameters(), total_steps=4)
    for step in range(4):
        losses = []
        for micro in range(2):
            batch = dataset[(2 * step + micro) * 8:(2 * step + micro + 1) * 8]
            x = torch.stack([d["x"] for d in batch])
            y = torch.stack([d["labels"] for d in batch])
            loss = reference(x, y)["loss"] + 0.1 * reference.proj.weight.pow(2).sum()
            (loss / 2).backward()
            losses.append(loss.detach())
        ref_opt.step(loss=sum(losses) / 2)
        ref_opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert_close(a, b, rtol=1e-12, atol=1e-14, what=f"override vs plain loop: {name}")


# ---- GPT-2 --------------------------------------------------------------------------------------
VOCAB, LENGTH = 64, 24


def arithmetic_sequences(count, seed):
    """token[t] = (start + step * t) mod VOCAB, step in {1, 2, 3}: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, 1), generator=g)
    stride = torch.randint(1, 4, (count, 1), generator=g)
    tokens = (start + stride * torch.arange(LENGTH)) % VOCAB
    return [{"input_ids": t, "labels": t} for t in tokens]


def tiny_gpt2(device):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=LENGTH)
    return GPT2LMHeadModel(config).to(device)


def test_gpt2_trains_and_the_trainer_defaults_are_refused(tmp_path, device):
    """A 2-layer GPT-2 from its config through Trainer: Trainer's defaults are refused with the
    fix named, before anything changes; with max_grad_norm=0 and a constant schedule, 20
    optimizer steps of 2 accumulated batches (total_steps filled: 20, not 40 batches) lower the
    held-out loss, and the evaluations during training are not watched."""
    train, held_out = arithmetic_sequences(320, seed=0), arithmetic_sequences(64, seed=1)
    model = tiny_gpt2(device)
    opt = pf.InexactPolyak(model.parameters(), total_steps=None)
    initial = [p.detach().clone() for p in model.parameters()]
    on_cpu = device.type == "cpu"

    trainer = make_trainer(tmp_path, model, opt, train, batch=8, use_cpu=on_cpu,
                           max_grad_norm=1.0, lr_scheduler_type="linear")   # Trainer's defaults
    hf.attach(trainer)
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0.*Set TrainingArguments\("
                                         r"max_grad_norm=0\), or pass allow_clipping=True"):
        trainer.train()
    trainer = make_trainer(tmp_path, model, opt, train, batch=8, use_cpu=on_cpu,
                           lr_scheduler_type="linear")
    hf.attach(trainer)
    with pytest.raises(ValueError, match=r'lr_scheduler_type="linear".*Set TrainingArguments\('
                                         r'lr_scheduler_type="constant"\), or pass '
                                         r'allow_lr_schedule=True'):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))
    assert opt.param_groups[0]["total_steps"] is None and int(opt.scalars["step"]) == 0

    trainer = make_trainer(tmp_path, model, opt, train, batch=8, accumulation=2, use_cpu=on_cpu,
                           max_steps=20, eval_data=held_out, eval_strategy="steps",
                           eval_steps=10, per_device_eval_batch_size=32)
    hf.attach(trainer)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert opt.param_groups[0]["total_steps"] == 20
    assert int(opt.scalars["step"]) == 20 and int(opt.scalars["skipped"]) == 0
    assert len(evals) == 2 and evals[1] < evals[0] < before and evals[1] < 0.75 * before, (
        before, evals)


def test_opting_in_keeps_clipping_and_the_schedule(tmp_path):
    model = SampleMeanModel()
    opt = pf.InexactPolyak(model.parameters(), total_steps=None)
    trainer = make_trainer(tmp_path, model, opt, sample_data(), batch=16, epochs=1,
                           max_grad_norm=1.0, lr_scheduler_type="linear")
    hf.attach(trainer, allow_clipping=True, allow_lr_schedule=True)
    trainer.train()
    assert int(opt.scalars["step"]) == 4
    assert opt.param_groups[0]["lr"] == 0.0   # the linear schedule ran to its end


def test_trainer_builds_the_optimizer_and_weight_decay_is_reported(tmp_path):
    """optimizer_cls_and_kwargs: attach finds the optimizer the trainer built when training
    begins; TrainingArguments.weight_decay, which Trainer puts in the param groups and only DoG,
    MoMo and MoMoAdam read, is reported."""
    model = SampleMeanModel()
    trainer = make_trainer(tmp_path, model, None, sample_data(), batch=16, epochs=1,
                           weight_decay=0.01)
    trainer.optimizer_cls_and_kwargs = (pf.InexactPolyak, {"total_steps": None})
    hf.attach(trainer)
    with pytest.warns(UserWarning, match=r"InexactPolyak has no weight decay.*\[0\.01\]"):
        trainer.train()
    opt = trainer.optimizer.optimizer   # accelerate's wrapper around the one Trainer built
    assert isinstance(opt, pf.InexactPolyak)
    assert opt.param_groups[0]["total_steps"] == 4 and int(opt.scalars["step"]) == 4


def test_misuse_is_reported(tmp_path):
    dataset = sample_data()
    trainer = make_trainer(tmp_path, SampleMeanModel(), None, dataset, batch=16, epochs=1)
    hf.attach(trainer)   # no optimizer given: Trainer builds AdamW
    with pytest.raises(TypeError, match=r"found no polyak_fused optimizer.*AdamW.*"
                                        r"optimizers=\(opt, None\)"):
        trainer.train()

    model = SampleMeanModel()
    opt = pf.InexactPolyak(model.parameters(), total_steps=16)
    trainer = make_trainer(tmp_path, model, opt, dataset, batch=16, epochs=1)
    hf.attach(trainer)
    with pytest.raises(ValueError, match=r"already called on this trainer"):
        hf.attach(trainer)
    with pytest.warns(UserWarning, match=r"total_steps=16\) but the trainer plans 4 optimizer "
                                         r"steps \(state\.max_steps\)"):
        trainer.train()
    assert opt.param_groups[0]["total_steps"] == 16
    with pytest.raises(TypeError, match=r"attach\(\) takes a transformers\.Trainer"):
        hf.attach(model)

    trainer = make_trainer(tmp_path, model, opt, dataset, batch=16, epochs=1)
    trainer.add_callback(hf.PolyakCallback())   # a callback alone never sees the loss
    with pytest.raises(TypeError, match=r"without attach\(\).*hf\.attach\(trainer\)"):
        trainer.train()



@pytest.mark.parametrize("cls", [pf.MoMo, pf.MoMoAdam], ids=lambda c: c.__name__)
def test_momo_takes_a_decaying_schedule_and_refuses_clipping(tmp_path, cls):
    """MoMo's lr caps its step size (tau = min(lr / rho, t)); its paper runs it with the usual
    schedules, so Trainer's default linear decay is accepted. Trainer's default clipping is
    refused: it shrinks d and lengthens the Polyak part t."""
    model = SampleMeanModel()
    opt = cls(model.parameters(), lr=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, model, opt, sample_data(), batch=16, epochs=1,
                           max_grad_norm=1.0, lr_scheduler_type="linear")   # Trainer's defaults
    hf.attach(trainer)
    with pytest.raises(ValueError, match=rf"max_grad_norm=1\.0.*{cls.__name__} computes its step "
                                         r"from its averaged gradient d.*Set TrainingArguments\("
                                         r"max_grad_norm=0\), or pass allow_clipping=True"):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

    lrs = []
    trainer = make_trainer(tmp_path, model, opt, sample_data(), batch=16, epochs=1,
                           lr_scheduler_type="linear")
    hf.attach(trainer)
    opt.register_step_pre_hook(lambda o, *a: lrs.append(o.param_groups[0]["lr"]))
    trainer.train()
    assert int(opt.scalars["step"]) == 4 and int(opt.scalars["skipped"]) == 0
    assert lrs == [0.5, 0.375, 0.25, 0.125], lrs   # the linear schedule: the cap decays
    assert opt.param_groups[0]["lr"] == 0.0
