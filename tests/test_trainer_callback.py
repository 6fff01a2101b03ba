"""FusedDoraCallback: one line for transformers' Trainer and TRL's SFTTrainer (which builds the PEFT
model itself). 5 steps with adamw_torch_fused (the trainers' default), fp32, CPU: the
losses and adapters equal the same runs without fused_dora."""
import logging

import pytest
import torch

from helpers import LLAMA_TARGETS, logged_losses, randomize_adapters, rel_err, tiny_llama, trainer_args, trainer_data

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")]
from fused_dora.integrations.peft import enable_fused_dora, fused_dora_status  # noqa: E402
from fused_dora.integrations.transformers import FusedDoraCallback  # noqa: E402


def dora_config():
    # init_lora_weights=False: lora_B random, so the first steps already exercise the whole adapter
    return peft.LoraConfig(use_dora=True, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False)


def _compare(plain, fused):
    (plain_losses, plain_model), (fused_losses, fused_model) = plain, fused
    assert len(plain_losses) == len(fused_losses) == 5
    for step, (a, b) in enumerate(zip(fused_losses, plain_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: {a} vs {b}"
    plain_params = dict(plain_model.named_parameters())
    for name, p in fused_model.named_parameters():
        if p.requires_grad:
            assert rel_err(p, plain_params[name]) < 1e-5, name


def _trainer_run(tmp_path, callbacks):
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(seed=0), dora_config())
    data = [{"input_ids": ids, "labels": ids} for ids in trainer_data()]
    trainer = transformers.Trainer(model=model, args=trainer_args(transformers.TrainingArguments, tmp_path),
                                   train_dataset=data, callbacks=callbacks)
    trainer.train()
    return logged_losses(trainer), trainer.model


def test_trainer_with_callback_matches_peft(tmp_path, caplog):
    plain = _trainer_run(tmp_path / "plain", None)
    callback = FusedDoraCallback()
    with caplog.at_level(logging.INFO, logger="fused_dora"):
        fused = _trainer_run(tmp_path / "fused", [callback])
    assert callback.fused_layers == 2 * len(LLAMA_TARGETS)
    assert fused_dora_status(fused[1]).counts == {"fused": 2 * len(LLAMA_TARGETS)}
    reports = [r for r in caplog.records if r.name == "fused_dora.integrations.transformers"]
    assert len(reports) == 1 and "14 PEFT DoRA layers served by fused_dora (fused: 14)" in reports[0].message
    _compare(plain, fused)


def _trainer_losses(tmp_path, fused: bool):
    """5 steps of transformers' Trainer with adamw_torch_fused on a tiny random Llama + PEFT DoRA."""
    model = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(use_dora=True, r=4, lora_alpha=8,
                                                                    target_modules=LLAMA_TARGETS))
    randomize_adapters(model)
    if fused:
        assert enable_fused_dora(model) == 2 * len(LLAMA_TARGETS)
    data = [{"input_ids": ids, "labels": ids} for ids in trainer_data()]
    args = trainer_args(transformers.TrainingArguments, tmp_path / ("fused" if fused else "plain"))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert args.optim == "adamw_torch_fused" and optimizer.defaults["fused"] is True
    losses = logged_losses(trainer)
    assert len(losses) == 5
    return losses, model


def test_trainer_default_optimizer_matches_peft(tmp_path):
    """enable_fused_dora before the Trainer (no callback), with adamw_torch_fused, transformers' default
    optim in recent releases, whose steps bump no version counters: losses and adapters equal PEFT's."""
    _compare(_trainer_losses(tmp_path, fused=False), _trainer_losses(tmp_path, fused=True))


def _tokenizer():
    """A word-level tokenizer over the tiny Llama's 64 ids, built in memory (nothing downloaded)."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(64)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                                pad_token="t0", eos_token="t1", unk_token="t0")


def _sft_run(tmp_path, callbacks):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    torch.manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": trainer_data().tolist()})
    # TRL's defaults otherwise: bf16 autocast and gradient checkpointing (kept; named here for
    # TRL < 0.22, whose SFTConfig did not checkpoint by default), adamw_torch_fused
    args = trainer_args(trl.SFTConfig, tmp_path, gradient_checkpointing=True)
    trainer = trl.SFTTrainer(model=tiny_llama(seed=0), args=args,
                             train_dataset=data, processing_class=_tokenizer(), peft_config=dora_config(),
                             callbacks=callbacks)
    assert trainer.args.gradient_checkpointing
    trainer.train()
    return logged_losses(trainer), trainer.model


def test_sft_trainer_with_callback_matches_peft(tmp_path):
    plain = _sft_run(tmp_path / "plain", None)
    callback = FusedDoraCallback()
    fused = _sft_run(tmp_path / "fused", [callback])
    assert callback.fused_layers == 2 * len(LLAMA_TARGETS)
    assert fused_dora_status(fused[1]).counts == {"fused": 2 * len(LLAMA_TARGETS)}
    _compare(plain, fused)


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="dropout_semantics"):
        FusedDoraCallback("both")
