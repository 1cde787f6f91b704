"""grpo_kernels.integrations.trl: TRL 1.16's GRPOTrainer with our LM head and loss gives TRL's own numbers.

Every comparison runs two trainers built alike from the same tiny Llama (2 layers,
hidden 32, vocabulary 64, saved to a temporary directory and loaded by TRL like a
checkpoint), one of them patched, in float32 on CPU:

- ``compute_loss`` on one prepared batch (old, reference and sampling log-probs
  perturbed so that the clipping, the KL and the masks all act): loss, the
  gradient of every parameter, and the metrics logged into ``_metrics``;
- ``train()`` for a few optimizer steps (SGD, so that a wrong gradient shows in
  the parameters): parameters after training and the logged history;
- the LM head alone against TRL's ``add_fused_lm_head`` (bias, logit scale, softcap);
- the configs the integration refuses, at patch time.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally; nothing may be downloaded
trl = pytest.importorskip("trl")
if not trl.__version__.startswith("1.16."):
    pytest.skip(f"the integration targets trl 1.16, found {trl.__version__}", allow_module_level=True)

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from grpo_kernels.integrations import trl as integration  # noqa: E402
from grpo_kernels.integrations.trl_lm_head import install_fused_lm_head  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +="
VOCAB = 64
BATCH, PROMPT_LEN, COMPLETION_LEN = 4, 3, 6
# Metrics of time, not of the numbers.
UNCOMPARED_LOGS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


# --------------------------------------------------------------------------- #
# the tiny model, tokenizer, data and trainers
# --------------------------------------------------------------------------- #
def tiny_config(**overrides) -> LlamaConfig:
    options = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                   tie_word_embeddings=False)
    return LlamaConfig(**{**options, **overrides})


def tiny_model(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(**overrides))


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model().save_pretrained(path)
    return str(path)


def reward_len_and_a(completions, **kwargs):
    """A deterministic reward: length plus the count of 'a'."""
    return [float(len(c)) + c.count("a") for c in completions]


DATASET = Dataset.from_dict({"prompt": ["ab", "cd", "ef+", "1+2=", "zz", "9=", "k", "abc"]})


def make_trainer(model, tokenizer, tmp_path, *, patch=None, **config):
    """A GRPOTrainer on the tiny model; ``patch``: None (TRL's own), a backend name (patch_grpo_trainer) or
    "subclass" (the integration's GRPOTrainer)."""
    options = dict(output_dir=str(tmp_path / f"out_{patch}"), report_to="none", use_cpu=True, max_completion_length=8,
                   num_generations=4, per_device_train_batch_size=4, max_steps=2, logging_steps=1, save_strategy="no",
                   seed=0, optim="sgd", learning_rate=0.1, disable_tqdm=True, bf16=False)
    args = GRPOConfig(**{**options, **config})
    cls = integration.GRPOTrainer if patch == "subclass" else trl.GRPOTrainer
    trainer = cls(model=model, reward_funcs=reward_len_and_a, args=args, train_dataset=DATASET,
                  processing_class=tokenizer)
    if patch not in (None, "subclass"):
        integration.patch_grpo_trainer(trainer, backend=patch)
    return trainer


# --------------------------------------------------------------------------- #
# compute_loss on one prepared batch
# --------------------------------------------------------------------------- #
def prepared_batch(trainer, *, tool_mask: bool = False, per_token_advantages: bool = False, vllm: bool = False) -> dict:
    """A batch as TRL's _prepare_inputs hands it to compute_loss, with log-probs of the other policies near the
    model's own (from TRL's unpatched scoring), so that ratios clip on both sides and the masks act; ``vllm``: with
    the sampling engine's log-probs and TRL's importance-sampling ratio."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(2, VOCAB, (BATCH, PROMPT_LEN), generator=g)
    prompt_mask = torch.ones(BATCH, PROMPT_LEN, dtype=torch.long)
    prompt_mask[0, 0] = 0  # left padding
    prompt_ids[0, 0] = 0
    completion_ids = torch.randint(2, VOCAB, (BATCH, COMPLETION_LEN), generator=g)
    lengths = torch.tensor([COMPLETION_LEN, 4, 2, 5])
    completion_mask = (torch.arange(COMPLETION_LEN) < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            COMPLETION_LEN)

    def near(scale):
        return logps + scale * torch.randn(logps.shape, generator=g)

    signs = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])  # both signs: both clip sides act
    advantages = (signs * torch.rand(BATCH, COMPLETION_LEN if per_token_advantages else 1, generator=g)).squeeze(1)
    batch = dict(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=completion_mask,
        advantages=advantages, old_per_token_logps=near(0.5), ref_per_token_logps=near(0.3),
        num_items_in_batch=completion_mask.sum() * 3,  # the generation batch spans several micro-batches
    )
    if vllm:
        batch["sampling_per_token_logps"] = near(0.3)
        ratio = 0.5 + torch.rand(logps.shape, generator=g)
        batch["importance_sampling_ratio"] = ratio.masked_fill(completion_mask == 0, 1.0)  # TRL's: exp(0) off the mask
    if tool_mask:
        batch["tool_mask"] = torch.ones_like(completion_mask)
        batch["tool_mask"][1, 1:3] = 0
    return batch


# (config of GRPOConfig, settings of the trainer or the batch)
LOSS_CASES = {
    "grpo": (dict(loss_type="grpo"), {}),
    "bnpo": (dict(loss_type="bnpo"), {}),
    "dr_grpo": (dict(loss_type="dr_grpo"), {}),
    "dapo": (dict(loss_type="dapo"), {}),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.1), {}),
    "sapo": (dict(loss_type="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3), {}),
    "luspo": (dict(loss_type="luspo", importance_sampling_level="sequence"), {}),
    "vespo": (dict(loss_type="vespo"), {}),
    "vespo_vllm_off_policy_beta": (dict(loss_type="vespo", beta=0.05, off_policy_mask_threshold=0.02, vespo_k_pos=1.5,
                                        vespo_lambda_neg=2.5), dict(vllm=True)),
    "vespo_per_token_advantages": (dict(loss_type="vespo", importance_sampling_level="sequence"),
                                   dict(per_token_advantages=True)),
    "asymmetric_clip_delta": (dict(loss_type="dapo", epsilon=0.1, epsilon_high=0.28, delta=1.2), {}),
    "beta": (dict(loss_type="grpo", beta=0.05), {}),
    "beta_bias_corrected_dapo": (dict(loss_type="dapo", beta=0.05, use_bias_correction_kl=True), {}),
    "sequence_level_grpo": (dict(loss_type="grpo", importance_sampling_level="sequence"), {}),
    "sequence_level_dapo_beta": (dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.05), {}),
    "top_entropy_quantile": (dict(loss_type="dapo", top_entropy_quantile=0.5), {}),
    "entropy_bonus": (dict(loss_type="grpo", entropy_coef=0.05), {}),
    "entropy_bonus_top_entropy": (dict(loss_type="dapo", entropy_coef=0.05, top_entropy_quantile=0.3), {}),
    "off_policy_mask": (dict(loss_type="dapo", off_policy_mask_threshold=0.02), {}),
    "vllm_importance_sampling": (dict(loss_type="grpo"), dict(vllm=True)),
    "vllm_is_cispo_off_policy": (dict(loss_type="cispo", epsilon_high=1.2, off_policy_mask_threshold=0.02),
                                 dict(vllm=True)),
    "tool_mask": (dict(loss_type="bnpo", beta=0.05), dict(tool_mask=True)),
    "per_token_advantages": (dict(loss_type="grpo"), dict(per_token_advantages=True)),
    "accumulation_dapo": (dict(loss_type="dapo", gradient_accumulation_steps=2, steps_per_generation=4), {}),
    "accumulation_grpo": (dict(loss_type="grpo", gradient_accumulation_steps=3), {}),
    "eval_dapo": (dict(loss_type="dapo", gradient_accumulation_steps=2), dict(eval=True)),
    "eval_entropy_bonus": (dict(loss_type="sapo", entropy_coef=0.1), dict(eval=True)),
    "reference_backend": (dict(loss_type="dapo", beta=0.05, top_entropy_quantile=0.5), dict(backend="reference")),
}


def loss_and_gradients(trainer, inputs, settings) -> tuple[torch.Tensor, dict, dict]:
    trainer.model.train(not settings.get("eval", False))
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    if settings.get("vllm"):  # what use_vllm=True sets, without vLLM (the ratio comes with the batch)
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    return loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train" if trainer.model.training
                                                                        else "eval"].items()}


def assert_same_metrics(ours: dict, theirs: dict):
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(torch.tensor(ours[key], dtype=torch.float64),
                                   torch.tensor(theirs[key], dtype=torch.float64), equal_nan=True, **TOL, msg=key)


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_compute_loss_matches_trl(case, model_dir, tokenizer, tmp_path):
    config, settings = LOSS_CASES[case]
    trl_trainer = make_trainer(model_dir, tokenizer, tmp_path, **config)
    our_trainer = make_trainer(model_dir, tokenizer, tmp_path, patch=settings.get("backend", "auto"), **config)
    inputs = prepared_batch(trl_trainer, tool_mask=settings.get("tool_mask", False),
                            per_token_advantages=settings.get("per_token_advantages", False),
                            vllm=settings.get("vllm", False))
    trl_loss, trl_grads, trl_metrics = loss_and_gradients(trl_trainer, inputs, settings)
    loss, grads, metrics = loss_and_gradients(our_trainer, inputs, settings)

    assert loss.item() != 0.0
    torch.testing.assert_close(loss, trl_loss, **TOL)
    for name, grad in trl_grads.items():
        assert grad.abs().sum() > 0 or name.endswith("bias"), name  # every weight gets a gradient
        torch.testing.assert_close(grads[name], grad, **TOL, msg=name)
    assert_same_metrics(metrics, trl_metrics)


@pytest.mark.parametrize("case", ["vespo_vllm_off_policy_beta", "sequence_level_dapo_beta", "vllm_importance_sampling",
                                  "top_entropy_quantile"])
def test_masked_garbage_changes_nothing(case, model_dir, tokenizer, tmp_path):
    """NaN / ±inf in the per-token inputs at completion positions the mask drops change no loss, gradient or
    logged metric of the patched trainer (TRL's own metrics multiply by the mask: NaN there)."""
    config, settings = LOSS_CASES[case]
    trainer = make_trainer(model_dir, tokenizer, tmp_path, patch="auto", **config)
    clean = prepared_batch(trainer, vllm=settings.get("vllm", False))
    dirty = dict(clean)
    dropped = clean["completion_mask"] == 0
    for key, junk in (("old_per_token_logps", float("nan")), ("ref_per_token_logps", float("inf")),
                      ("sampling_per_token_logps", float("nan")), ("importance_sampling_ratio", float("nan"))):
        if key in clean:
            dirty[key] = clean[key].masked_fill(dropped, junk)
    loss, grads, metrics = loss_and_gradients(trainer, clean, settings)
    for logged in trainer._metrics.values():
        logged.clear()
    dirty_loss, dirty_grads, dirty_metrics = loss_and_gradients(trainer, dirty, settings)
    torch.testing.assert_close(dirty_loss, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(dirty_grads[name], grad, rtol=0, atol=0, msg=name)
    assert sorted(dirty_metrics) == sorted(metrics)
    for key, values in metrics.items():
        assert all(v == v for v in values), key
        torch.testing.assert_close(torch.tensor(dirty_metrics[key]), torch.tensor(values), rtol=0, atol=0, msg=key)


def test_clip_metrics_nonzero(model_dir, tokenizer, tmp_path):
    """The batch of the loss tests clips low and high (so the clip metrics compared there are not all zeros)."""
    trainer = make_trainer(model_dir, tokenizer, tmp_path, patch="auto", loss_type="dapo")
    inputs = prepared_batch(trainer)
    _, _, metrics = loss_and_gradients(trainer, inputs, {})
    assert metrics["clip_ratio/low_mean"][0] > 0 and metrics["clip_ratio/high_mean"][0] > 0


def test_adaptive_entropy_matches_trl(model_dir, tokenizer, tmp_path):
    """The adaptive entropy controller: no bonus until the first window is measured, then the coefficient moves
    towards more bonus (entropy below the target), over two accumulation windows of two micro-batches."""
    config = dict(loss_type="grpo", entropy_coef=0.05, use_adaptive_entropy=True, entropy_target=100.0,
                  entropy_coef_delta=0.02, gradient_accumulation_steps=2)
    trainers = [make_trainer(model_dir, tokenizer, tmp_path, patch=patch, **config) for patch in (None, "auto")]
    inputs = prepared_batch(trainers[0])
    for sync in (False, True, False, True):
        results = []
        for trainer in trainers:
            trainer.accelerator.gradient_state._set_sync_gradients(sync)
            results.append(loss_and_gradients(trainer, inputs, {}))
        (trl_loss, trl_grads, trl_metrics), (loss, grads, metrics) = results
        torch.testing.assert_close(loss, trl_loss, **TOL)
        for name, grad in trl_grads.items():
            torch.testing.assert_close(grads[name], grad, **TOL, msg=name)
        assert_same_metrics(metrics, trl_metrics)
        assert trainers[1].entropy_coef == pytest.approx(trainers[0].entropy_coef)
        assert trainers[1]._last_world_entropy == pytest.approx(trainers[0]._last_world_entropy)
    assert trainers[1].entropy_coef == pytest.approx(0.09)


def test_bf16_autocast_close_to_trl(model_dir, tokenizer, tmp_path):
    """TRL's default config runs the model under bfloat16 autocast: the patched trainer runs there too, and agrees
    with TRL to bfloat16 precision only (our LM head forms its logits in float32, TRL rounds them to bfloat16)."""
    config = dict(loss_type="dapo", beta=0.05, top_entropy_quantile=0.5, bf16=True)
    trl_trainer = make_trainer(model_dir, tokenizer, tmp_path, **config)
    our_trainer = make_trainer(model_dir, tokenizer, tmp_path, patch="auto", **config)
    inputs = prepared_batch(trl_trainer)
    trl_loss, trl_grads, _ = loss_and_gradients(trl_trainer, inputs, {})
    loss, grads, _ = loss_and_gradients(our_trainer, inputs, {})
    torch.testing.assert_close(loss, trl_loss, atol=0, rtol=2e-2)
    for name, grad in trl_grads.items():
        assert (grads[name] - grad).norm() <= 5e-2 * grad.norm() + 1e-6, name


# --------------------------------------------------------------------------- #
# training
# --------------------------------------------------------------------------- #
# (config, patch of the second trainer)
TRAIN_CASES = {
    "dapo_accumulation": (dict(loss_type="dapo", gradient_accumulation_steps=2, per_device_train_batch_size=2), "auto"),
    "grpo_beta_two_iterations": (dict(loss_type="grpo", beta=0.05, num_iterations=2), "auto"),
    "cispo_generation_over_steps": (dict(loss_type="cispo", epsilon_high=1.05, steps_per_generation=2,
                                         per_device_train_batch_size=2), "subclass"),
    "luspo_sequence_entropy": (dict(loss_type="luspo", importance_sampling_level="sequence", top_entropy_quantile=0.5,
                                    entropy_coef=0.01, num_iterations=2), "auto"),
    "vespo_two_iterations": (dict(loss_type="vespo", num_iterations=2), "auto"),
}


def train(model_dir, tokenizer, tmp_path, patch, config):
    trainer = make_trainer(model_dir, tokenizer, tmp_path, patch=patch, **config)
    trainer.train()
    logs = [{k: v for k, v in entry.items() if k not in UNCOMPARED_LOGS} for entry in trainer.state.log_history]
    return dict(trainer.model.named_parameters()), logs


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_matches_trl(case, model_dir, tokenizer, tmp_path):
    config, patch = TRAIN_CASES[case]
    trl_params, trl_logs = train(model_dir, tokenizer, tmp_path, None, config)
    params, logs = train(model_dir, tokenizer, tmp_path, patch, config)
    initial = dict(LlamaForCausalLM.from_pretrained(model_dir).named_parameters())
    for name, value in trl_params.items():
        assert not torch.equal(value, initial[name]), name  # training moved every parameter
        torch.testing.assert_close(params[name], value, **TOL, msg=name)
    assert len(logs) == len(trl_logs)
    for entry, trl_entry in zip(logs, trl_logs):
        assert_same_metrics(entry, trl_entry)


# --------------------------------------------------------------------------- #
# the LM head alone
# --------------------------------------------------------------------------- #
def head_model(bias: bool, **config):
    model = tiny_model(**config)
    if bias:
        model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    return model


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("head", [
    dict(bias=False),
    dict(bias=True, logit_scale=0.7, final_logit_softcapping=2.5),
    dict(bias=False, logits_scaling=4.0),
])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_lm_head_matches_trl(head, temperature, shifted):
    theirs, ours = head_model(**head), head_model(**head)
    add_fused_lm_head(theirs, temperature=temperature, outputs=("log_probs", "entropy"))
    install_fused_lm_head(ours, temperature=temperature, outputs=("log_probs", "entropy"))
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (3, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    kwargs = dict(shift_labels=labels) if shifted else dict(labels=labels)
    results = []
    for model in (theirs, ours):
        out = model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=True, **kwargs)
        (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
        results.append((out, {name: p.grad for name, p in model.named_parameters()}))
    (trl_out, trl_grads), (out, grads) = results
    for field in ("loss", "log_probs", "entropy", "label_mask"):
        torch.testing.assert_close(getattr(out, field), getattr(trl_out, field), **TOL, msg=field)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOL, msg=name)


def test_lm_head_keeps_the_unfused_forward_and_entropy_free_scoring():
    """Without fused_lm_head the model is its own; the head installs once (re-installing replaces it); a head
    without entropy returns None for it; a batch without any label still back-propagates (zeros)."""
    plain, ours = tiny_model(), tiny_model()
    add_fused_lm_head(ours, temperature=1.0)
    install_fused_lm_head(ours, temperature=0.5, outputs=("log_probs", "entropy"))
    install_fused_lm_head(ours, temperature=1.0)
    input_ids = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(ours(input_ids=input_ids).logits, plain(input_ids=input_ids).logits)
    out = ours(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
    assert out.entropy is None
    expected = torch.log_softmax(plain(input_ids=input_ids).logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])
    torch.testing.assert_close(out.log_probs, expected.squeeze(-1), **TOL)
    none = ours(input_ids=input_ids, labels=torch.full_like(input_ids, -100), fused_lm_head=True)
    assert torch.equal(none.log_probs, torch.zeros(2, 4))
    none.log_probs.sum().backward()
    assert ours.lm_head.weight.grad is not None and not ours.lm_head.weight.grad.any()


# --------------------------------------------------------------------------- #
# what the integration refuses, at patch time
# --------------------------------------------------------------------------- #
def test_refuses_what_is_not_a_grpo_trainer():
    with pytest.raises(TypeError, match="trl.GRPOTrainer"):
        integration.patch_grpo_trainer(object())


@pytest.mark.parametrize("config", [
    dict(top_entropy_quantile=0.5),
    dict(importance_sampling_level="sequence", beta=0.05, use_bias_correction_kl=True),
])
def test_refuses_vespo_with_what_the_op_cannot_multiply(config, model_dir, tokenizer, tmp_path):
    trainer = make_trainer(model_dir, tokenizer, tmp_path, loss_type="vespo", **config)
    with pytest.raises(NotImplementedError, match="vespo"):
        integration.patch_grpo_trainer(trainer)


def test_refuses_another_trl_version(model_dir, tokenizer, tmp_path, monkeypatch):
    trainer = make_trainer(model_dir, tokenizer, tmp_path)
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(NotImplementedError, match="trl 1.16"):
        integration.patch_grpo_trainer(trainer)


def test_refuses_a_subclass_with_its_own_loss(model_dir, tokenizer, tmp_path):
    class CustomLoss(trl.GRPOTrainer):
        def _compute_loss(self, model, inputs):
            return super()._compute_loss(model, inputs) * 2

    trainer = make_trainer(model_dir, tokenizer, tmp_path)
    trainer.__class__ = CustomLoss
    with pytest.raises(NotImplementedError, match="overrides _compute_loss"):
        integration.patch_grpo_trainer(trainer)


def test_refuses_the_moe_auxiliary_loss(tokenizer, tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                           num_experts_per_tok=1, router_aux_loss_coef=0.01, pad_token_id=0))
    trainer = make_trainer(moe, tokenizer, tmp_path)
    assert trainer.aux_loss_enabled
    with pytest.raises(NotImplementedError, match="router_aux_loss_coef"):
        integration.patch_grpo_trainer(trainer)


@pytest.mark.parametrize("config, kwargs, match", [
    (dict(epsilon=1.5), {}, "epsilon_low"),
    (dict(temperature=0.0), {}, "temperature"),
    ({}, dict(backend="nope"), "backend"),
    ({}, dict(chunk_size=0), "chunk_size"),
])
def test_refuses_invalid_options(config, kwargs, match, model_dir, tokenizer, tmp_path):
    trainer = make_trainer(model_dir, tokenizer, tmp_path, **config)
    forward = trainer.model.forward
    with pytest.raises(ValueError, match=match):
        integration.patch_grpo_trainer(trainer, **kwargs)
    assert trainer.model.forward == forward and "_compute_loss" not in vars(trainer)  # nothing patched


def test_library_import_does_not_import_trl():
    code = ("import sys, grpo_kernels, grpo_kernels.integrations; "
            "assert not {'trl', 'transformers'} & set(sys.modules), sorted({'trl', 'transformers'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True)

