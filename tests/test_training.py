"""Exit training (effllm.training) on tiny random models: the losses against straightforward reference
computations, determinism, resumption, the caches, the frozen backbone, and bfloat16 load selection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effllm import models, precision, records
from effllm.training import core, losses
from effllm.training.core import ExitTrainingConfig

# A tiny configuration: python-docs only (the fastest built-in corpus to build), no generated answers.
TINY = dict(corpora=("python-docs",), self_distill_prompts=0)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # built data and trained exits stay out of the user cache
        patch.setenv("EFFLLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def tiny_config(recipe: str = "default", model: str = "tiny-llama", **overrides) -> ExitTrainingConfig:
    return core.recipe(recipe, model=model, **{**TINY, **overrides})


# ---- losses against reference computations ---------------------------------------------------------


def test_weighted_ce_is_the_layer_weighted_mean_of_the_cross_entropies():
    torch.manual_seed(0)
    logits = [torch.randn(2, 5, 11) for _ in range(4)]
    labels = torch.randint(0, 11, (2, 5))
    labels[0, -1] = -100
    reference = 0.0
    for layer, layer_logits in enumerate(logits, start=1):  # w_l = l
        keep = labels.reshape(-1) != -100
        log_p = torch.log_softmax(layer_logits.reshape(-1, 11), -1)[keep]
        reference += layer * -log_p[torch.arange(int(keep.sum())), labels.reshape(-1)[keep]].mean()
    reference /= 1 + 2 + 3 + 4
    assert torch.allclose(losses.weighted_ce(logits, labels), reference, atol=1e-6)
    # explicit layer numbers weight by them
    two = losses.weighted_ce(logits[:2], labels, layers=[3, 6])
    expected = (3 * F.cross_entropy(logits[0].reshape(-1, 11), labels.reshape(-1))
                + 6 * F.cross_entropy(logits[1].reshape(-1, 11), labels.reshape(-1))) / 9
    assert torch.allclose(two, expected, atol=1e-6)


def test_free_teacher_layers_follow_the_seed_table_and_its_pattern():
    assert losses.free_teacher_layers(24, 6) == [3, 7, 11, 15, 19, 23]
    assert losses.free_teacher_layers(24, 10) == [2, 5, 7, 10, 12, 15, 17, 19, 21, 23]  # hand-written in the seed
    assert losses.free_teacher_layers(12, 3) == [3, 7, 11]
    for layers, shallow in ((24, 12), (24, 8), (24, 4)):  # the formula reproduces the divisible entries
        table = losses.FREE_TEACHER_LAYERS[layers][shallow]
        assert [round(k * layers / shallow) - 1 for k in range(1, shallow + 1)] == table
    assert losses.free_teacher_layers(30, 20)[-1] == 29 and len(losses.free_teacher_layers(30, 20)) == 20


def test_shallowdeep_kd_dyna_matches_a_direct_computation():
    torch.manual_seed(1)
    n_layers, shallow, alpha = 4, 2, 0.5
    normed = [torch.randn(2, 3, 8) for _ in range(n_layers)]
    shallow_logits, deep_logits = torch.randn(2, 3, 13), torch.randn(2, 3, 13)
    labels = torch.randint(0, 13, (2, 3))
    ce = lambda x: F.cross_entropy(x.reshape(-1, 13), labels.reshape(-1))  # noqa: E731
    # teachers for L=4, Ls=2: layers 2 and 4 (0-based 1 and 3); each aligned to a shallow layer from the last back
    teachers = [1, 3]
    mse = [[((normed[t] - normed[s]) ** 2).mean().item() for s in range(shallow)] for t in teachers]
    last, chosen = n_layers, []
    for row in reversed(mse):
        candidates = [s for s in sorted(range(shallow), key=lambda s: row[s]) if s < last]
        last = candidates[0] if candidates else last
        chosen.append(last)
    chosen.reverse()
    kd = sum(mse[i][s] for i, s in enumerate(chosen)) / len(teachers)
    reference = (shallow * ce(shallow_logits) + n_layers * ce(deep_logits)) / (shallow + n_layers) + alpha * kd
    got = losses.shallowdeep_kd_dyna(shallow_logits, deep_logits, labels, normed, shallow, alpha)
    assert got.item() == pytest.approx(float(reference), rel=1e-5)


def test_shallowdeep_kd_dyna_distils_only_into_the_shallow_layers():
    normed = [torch.randn(1, 2, 4, requires_grad=True) for _ in range(4)]
    loss = losses.layer_kd_dyna(normed, 2)
    loss.backward()
    assert normed[0].grad is not None or normed[1].grad is not None
    assert normed[2].grad is None and normed[3].grad is None  # teachers are detached


def test_layerskip_scales_and_dropout_rates():
    # e(l) = sum_{i<=l} i below the last layer: 0, 1, 3; the last: L-1 + sum_{i<L-1} i = 3 + 3
    assert losses.layerskip_scales(4, 1.0) == pytest.approx([0.0, 1 / 10, 3 / 10, 6 / 10])
    # the curriculum's disabled layers get no weight; the last layer always counts
    assert losses.layerskip_scales(4, 1.0, [False, True, False, False]) == pytest.approx([0, 1 / 7, 0, 6 / 7])
    assert losses.rotational_curriculum(4, step=1, rotation=2) == [False, True, False, True]
    rates = losses.layer_dropout_rates(5, 0.2)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)


def test_distillation_over_the_whole_vocabulary_is_kl_plus_the_teacher_entropy():
    torch.manual_seed(2)
    student, teacher = torch.randn(3, 7), torch.randn(3, 7)
    logp = torch.log_softmax(teacher, -1)
    values, ids = logp.topk(7, -1)
    kl = F.kl_div(torch.log_softmax(student, -1), logp, log_target=True, reduction="batchmean")
    entropy = -(logp.exp() * logp).sum(-1).mean()
    assert losses.distillation(student, ids, values).item() == pytest.approx((kl + entropy).item(), rel=1e-5)


# ---- configuration and caches -----------------------------------------------------------------------


def test_config_refuses_bad_values_with_what_is_allowed():
    with pytest.raises(ValueError, match="unknown loss 'ce'"):
        ExitTrainingConfig(loss="ce")
    with pytest.raises(ValueError, match="shallow_exit_layer"):
        ExitTrainingConfig(loss="shallowdeep_kd_dyna", backbone="lora")
    with pytest.raises(ValueError, match="trains nothing"):
        ExitTrainingConfig(exit_module=None)
    with pytest.raises(ValueError, match="layer_dropout"):
        ExitTrainingConfig(layer_dropout=1.0)
    with pytest.raises(ValueError, match="unknown recipe"):
        core.recipe("fast")


def test_cache_key_changes_with_the_configuration_and_precision():
    config = ExitTrainingConfig()
    key = core.cache_key(config, torch.float32)
    assert key == core.cache_key(ExitTrainingConfig(), torch.float32)
    assert key != core.cache_key(config.replace(lr=2e-3), torch.float32)
    assert key != core.cache_key(config.replace(exit_layers=(15, 20)), torch.float32)
    assert key != core.cache_key(config, torch.bfloat16)


# ---- training ----------------------------------------------------------------------------------------


def _train(config, **kwargs):
    model, tokenizer = models.load_model(config.model)
    return core.train(model, tokenizer, config, progress=False, **kwargs)


def test_training_is_deterministic_and_leaves_a_frozen_backbone_untouched():
    config = tiny_config()
    reference, _ = models.load_model("tiny-llama")
    model, exits, result = _train(config)
    _, exits2, result2 = _train(config)
    assert [row["loss"] for row in result["loss_history"]] == [row["loss"] for row in result2["loss_history"]]
    for (name, a), (_, b) in zip(exits.state_dict().items(), exits2.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # the backbone is frozen: every weight as it was
    assert result["perplexity_ratio"] == 1.0
    assert result["loss_history"][-1]["loss"] < result["loss_history"][0]["loss"]


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    config = tiny_config(steps=6, checkpoint_every=2)
    _, exits, full = _train(config)
    folder = tmp_path / "checkpoint"
    _, _, partial = _train(config, checkpoint_dir=folder, stop_after=4)
    assert partial["steps_done"] == 4 and folder.is_dir()
    _, resumed_exits, resumed = _train(config, checkpoint_dir=folder)
    assert [r["loss"] for r in resumed["loss_history"]] == [r["loss"] for r in full["loss_history"]]
    for a, b in zip(exits.state_dict().values(), resumed_exits.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_corrupt_checkpoint_is_refused_and_the_run_starts_over(tmp_path):
    config = tiny_config(steps=4, checkpoint_every=2)
    _, exits, full = _train(config)
    folder = tmp_path / "checkpoint"
    _train(config, checkpoint_dir=folder, stop_after=2)
    params = folder / "params.safetensors"
    data = bytearray(params.read_bytes())
    data[-1] ^= 0xFF
    params.write_bytes(bytes(data))
    steps_seen = []
    _, rebuilt, result = _train(config, checkpoint_dir=folder, on_step=steps_seen.append)
    assert steps_seen[0] == 1  # started from step 0, not from the corrupt step-2 checkpoint
    assert [r["loss"] for r in result["loss_history"]] == [r["loss"] for r in full["loss_history"]]
    for a, b in zip(exits.state_dict().values(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("recipe_name", ["calm", "free", "layerskip", "lora-anchor"])
def test_backbone_recipes_train_and_merge_lora(recipe_name):
    from peft.tuners.lora import LoraLayer

    config = tiny_config(recipe_name, steps=3)
    reference, _ = models.load_model("tiny-llama")
    model, _, result = _train(config)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # merged into plain linears
    assert all(math.isfinite(r["loss"]) for r in result["loss_history"])
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, reference.state_dict()[n])]
    assert changed and all(".layers." in n for n in changed)  # only decoder linears moved
    if recipe_name == "lora-anchor":  # LoRA only below the exit layer (2): layers 0 and 1
        assert all(n.split(".layers.")[1].split(".")[0] in ("0", "1") for n in changed)


@pytest.mark.parametrize("recipe_name", ["default", "free"])
def test_t5_decoder_trains(recipe_name):
    config = tiny_config(recipe_name, model="tiny-t5", steps=3)
    _, exits, result = _train(config)
    assert all(math.isfinite(r["loss"]) for r in result["loss_history"])
    assert 0.0 <= result["agreement_after"]["2"] <= 1.0


def test_token_skipping_matches_running_the_layers_by_hand():
    model, _ = models.load_model("tiny-llama")
    ids = torch.randint(3, 200, (2, 6))
    skip = [None, torch.tensor([[True], [False]]), None, None]
    with torch.no_grad():
        states, _ = core.run_layers(model, ids, skip)
        plain, _ = core.run_layers(model, ids)
    assert torch.equal(states[2][0], states[1][0])  # row 0 skipped layer 2: its state passed through
    assert torch.equal(states[2][1], plain[2][1])  # row 1 ran it


def test_paper_recipe_data_fails_offline_with_the_data_error(monkeypatch):
    from effllm.data import DataNotAvailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotAvailableError):
        _train(core.recipe("paper", model="tiny-llama"))


def test_exit_trained_model_by_name_is_cached_and_carries_its_exits():
    model, _ = models.load_model("tiny-llama-ee")
    exits = records.EXITS.get(model)
    hidden = torch.randn(1, 3, 64)
    assert exits.layers == [2] and exits.position_wise
    assert torch.equal(exits(1, hidden), hidden)  # identity where no exit was trained
    assert exits(2, hidden).shape == hidden.shape
    again, _ = models.load_model("tiny-llama-ee")  # from the cache: the same exits, no training
    for a, b in zip(exits.state_dict().values(), records.EXITS.get(again).state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert records.EXITS.attribute not in dict(model.named_modules())  # not a submodule of the model


# ---- bfloat16 loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "capability", "expected"), [
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", torch.bfloat16),
    ({"avx2", "amx_bf16", "amx_tile"}, "AVX512", torch.bfloat16),
    ({"avx2", "avx512f"}, "AVX512", torch.float32),
    ({"avx2"}, "AVX2", torch.float32),
    (set(), "DEFAULT", torch.float32),
])
def test_default_dtype_follows_the_cpu_capability(monkeypatch, flags, capability, expected):
    monkeypatch.delenv(models.DTYPE_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert models.default_dtype() is expected
    assert models.default_dtype("cpu") is expected


def test_embedded_models_load_in_the_default_dtype_and_tiny_ones_in_float32(monkeypatch):
    monkeypatch.delenv(models.DTYPE_ENV, raising=False)
    monkeypatch.setattr(models, "cpu_supports_bfloat16", lambda: True)
    assert models.default_dtype() is torch.bfloat16
    model, _ = models.load_model("tiny-llama")
    assert next(model.parameters()).dtype is torch.float32
    model, _ = models.load_model("tiny-llama", dtype="bfloat16")
    assert next(model.parameters()).dtype is torch.bfloat16
    model, _ = models.load_model("tiny-llama", dtype=torch.float16)
    assert next(model.parameters()).dtype is torch.float16
    with pytest.raises(ValueError, match="float32, float16, bfloat16, float64"):
        models.resolve_dtype("fp8")
    captured = {}

    def fake_from_pretrained(path, **kwargs):
        captured.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(models, "embedded_model_dir", lambda name: models.Path("/nonexistent"))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda path: None)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(OSError):
        models.load_model("smollm2-135m")
    assert captured["dtype"] is torch.bfloat16
    monkeypatch.setattr(models, "cpu_supports_bfloat16", lambda: False)
    with pytest.raises(OSError):
        models.load_model("smollm2-135m")
    assert captured["dtype"] is torch.float32


@pytest.mark.parametrize(("setting", "native", "expected"), [
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32), ("", False, torch.float32),
    ("float32", True, torch.float32), ("bfloat16", False, torch.bfloat16), (" BFloat16 ", True, torch.bfloat16),
])
def test_effllm_dtype_overrides_the_hardware_rule_for_every_model(monkeypatch, setting, native, expected):
    monkeypatch.setenv(models.DTYPE_ENV, setting)
    monkeypatch.setattr(models, "cpu_supports_bfloat16", lambda: native)
    assert models.default_dtype() is expected
    tiny, _ = models.load_model("tiny-llama")  # float32 under auto; the named precision otherwise
    explicit = setting.strip().lower() not in ("", "auto")
    assert next(tiny.parameters()).dtype is (expected if explicit else torch.float32)
    pinned, _ = models.load_model("tiny-llama", dtype="float16")  # an explicit dtype argument wins
    assert next(pinned.parameters()).dtype is torch.float16
    report = models.dtype_report()
    assert report["dtype"] == str(expected).removeprefix("torch.") and report["cpu_bfloat16"] is native
    assert report["dtype"] in models.dtype_line() and models.DTYPE_ENV in models.dtype_line()


def test_effllm_dtype_rejects_an_unknown_precision(monkeypatch):
    monkeypatch.setenv(models.DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match=r"EFFLLM_DTYPE='fp8' is not a precision.*auto, float32, bfloat16"):
        models.default_dtype()
    with pytest.raises(ValueError, match="EFFLLM_DTYPE='fp8'"):
        models.load_model("tiny-llama")


@pytest.mark.parametrize("family", ["llama", "gemma3", "t5", "opt"])
def test_mlp_exits_start_as_the_last_layers_mlp_update(family):
    from effllm.adapters import get_adapter
    from effllm.training.modules import build_exit_modules

    model, _ = models.tiny_model(family)
    adapter = get_adapter(model)
    exits = build_exit_modules(model, "mlp", [2])
    hidden = torch.randn(2, 3, adapter.hidden_size)
    with torch.no_grad():
        got = exits(2, hidden)
        last = adapter.num_layers - 1
        if family == "llama":
            expected = hidden + adapter.mlp(last)(adapter.norms(last)["mlp"](hidden))
        elif family == "gemma3":
            norms = adapter.norms(last)
            expected = hidden + norms["mlp_out"](adapter.mlp(last)(norms["mlp"](hidden)))
        elif family == "t5":
            expected = adapter.layer(last).layer[-1](hidden)
        else:  # no MLP to copy: a fresh block whose output projection starts at zero
            expected = hidden
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(exits(1, hidden), hidden)  # identity where no exit was trained
    assert exits.position_wise


def test_command_writes_the_result_json(tmp_path):
    import json

    from effllm.training.__main__ import main

    out = tmp_path / "exit_training_tiny-llama.json"
    assert main(["--model", "tiny-llama", "--out", str(out), "--set", "self_distill_prompts=0", "--set", "steps=4"]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["steps"] == 4 and result["recipe"] == "default"
    assert set(result["agreement_before"]) == set(result["agreement_after"]) == {"1", "2", "3", "4"}
    assert result["agreement_after"]["4"] == result["agreement_before"]["4"] == 1.0  # the last layer agrees with itself
    assert [row["step"] for row in result["loss_history"]] == [1, 2, 3, 4] and "exit_2" in result["loss_history"][0]
    assert result["perplexity_ratio"] == 1.0 and result["total_minutes"] > 0


# ---- task-trained exits (prompt -> reference answer, answer tokens only) ----------------------------------


def test_task_examples_mask_exactly_the_answer_labels():
    """The positions the mask keeps are those whose label is a reference-answer token (or the closing EOS)."""
    from effllm.experiments.prompts import task_prompts
    from effllm.training.data import task_examples

    model, tokenizer = models.load_model("tiny-llama")
    ids, mask = task_examples(model, tokenizer, "arithmetic", 3, "train", max_len=512)
    prompts = task_prompts(tokenizer, "arithmetic", 3, split="train", fmt="plain")
    for row, prompt in enumerate(prompts):
        answer = tokenizer(prompt.reference, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        labels = ids[row, 1:][mask[row, :-1]].tolist()
        assert labels == answer
        assert int(mask[row].sum()) == len(answer) and not mask[row, -1]


def test_task_config_refuses_tasks_without_a_train_split_and_attention_exits():
    with pytest.raises(ValueError, match="humaneval and alpaca have none"):
        ExitTrainingConfig(task="arithmetic+humaneval")
    with pytest.raises(ValueError, match="position-wise exits"):
        ExitTrainingConfig(task="arithmetic", exit_module="layer")
    assert core.cache_key(ExitTrainingConfig(task="arithmetic"), torch.float32) != core.cache_key(
        ExitTrainingConfig(), torch.float32)


def test_task_training_counts_answer_tokens_against_an_hf_forward():
    """Held-out agreement before training, recomputed from HF's own forward (hidden states through the final norm
    and head) at the answer positions only, equals what the teacher pass reports."""
    from effllm.training.teacher import build_examples

    config = tiny_config("task", heldout_task_examples=3, task_examples=6)
    model, exits, result = _train(config)
    assert result["loss_history"][-1]["loss"] < result["loss_history"][0]["loss"]
    _, heldout, _, mask = build_examples(model, models.load_model("tiny-llama")[1], config, progress=False)
    assert result["heldout_tokens"] == int(mask.sum()) < mask.numel()
    with torch.no_grad():
        out = model(heldout, output_hidden_states=True)
        final = out.logits.argmax(-1)
        for layer in (1, 2, 3):
            lens = model.lm_head(model.model.norm(out.hidden_states[layer])).argmax(-1)
            expected = float((lens == final)[mask].double().mean())
            assert result["agreement_before"][str(layer)] == pytest.approx(expected, abs=1e-6), layer


def test_task_training_on_the_backbone_paths_masks_the_labels(monkeypatch):
    """The seeds' losses with a trainable backbone (CALM's weighted_ce with LoRA) see the answer labels only: the
    loss of the first step equals the layer-weighted cross-entropy computed by hand on the answer positions."""
    config = tiny_config("calm", task="arithmetic", task_examples=4, heldout_task_examples=2, steps=1,
                         batch_windows=2)
    seen = {}
    original = losses.weighted_ce

    def spy(layer_logits, labels, layers):
        seen["labels"] = labels.clone()
        return original(layer_logits, labels, layers)

    monkeypatch.setattr(losses, "weighted_ce", spy)
    _, _, result = _train(config)
    from effllm.training.teacher import build_examples

    model, tokenizer = models.load_model("tiny-llama")
    train, _, mask, _ = build_examples(model, tokenizer, config, progress=False)
    rows = core._batch_rows(len(train), config.batch_windows, config, 0)
    expected = torch.where(mask[rows], torch.cat([train[rows, 1:], torch.full_like(train[rows, :1], -100)], 1),
                           torch.full_like(train[rows], -100))
    assert torch.equal(seen["labels"].cpu(), expected)
    assert math.isfinite(result["loss_history"][0]["loss"])


def test_task_trained_model_by_name_uses_the_task_recipe():
    model, _ = models.load_model("tiny-llama-ee-task")
    result = records.EXIT_TRAINING.get(model)
    assert result["config"]["task"] == "arithmetic+docstrings" and records.EXITS.get(model).layers == [2]


def test_t5_task_examples_put_the_prompt_in_the_encoder_and_the_answer_in_the_decoder():
    """Seed 001's seq2seq fine-tuning: source and target side by side; the target half holds the reference answer
    and EOS, the mask exactly its tokens; the decoder's final states through run_layers, the padded source masked,
    give HF's logits for the same pair unpadded."""
    from effllm.adapters import get_adapter
    from effllm.decoding.exits import exit_logits
    from effllm.experiments.prompts import prompt_format, task_prompts
    from effllm.training.data import task_examples
    from effllm.training.teacher import run_layers

    model, tokenizer = models.load_model("tiny-t5")
    ids, mask = task_examples(model, tokenizer, "arithmetic", 3, "train", max_len=256)
    width = ids.shape[1] // 2
    prompts = task_prompts(tokenizer, "arithmetic", 3, split="train", fmt=prompt_format(model, tokenizer, "tiny-t5"))
    pad = tokenizer.pad_token_id
    for row, prompt in enumerate(prompts):
        answer = tokenizer(prompt.reference, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert ids[row, width:][mask[row]].tolist() == answer and int(mask[row].sum()) == len(answer)
        source = ids[row, :width]
        assert source[source != pad].tolist() == prompt.input_ids[0].tolist()
    padded_row = int(torch.argmin((ids[:, :width] != pad).sum(1)))  # the shortest source: padded
    assert bool((ids[padded_row, :width] == pad).any())
    with torch.no_grad():
        states, labels = run_layers(model, ids)
        ours = exit_logits(get_adapter(model), get_adapter(model).num_layers, states[-1])[padded_row]
        source = ids[padded_row:padded_row + 1, :width]
        source = source[:, source[0] != pad]
        target = ids[padded_row:padded_row + 1, width:]
        hf = model(input_ids=source, labels=torch.where(target == pad, -100, target)).logits[0]
    kept = mask[padded_row]
    assert torch.allclose(ours[kept].float(), hf[kept].float(), atol=1e-4)
    assert torch.equal(labels[padded_row][kept], target[0][kept])


def test_t5_trains_exits_on_a_task():
    config = tiny_config("free", model="tiny-t5", task="arithmetic", task_examples=6, heldout_task_examples=3,
                         steps=3)
    model, exits, result = _train(config)
    assert all(math.isfinite(r["loss"]) for r in result["loss_history"])
    from effllm.training.teacher import build_examples

    _, _, _, mask = build_examples(model, models.load_model("tiny-t5")[1], config, progress=False)
    assert result["heldout_tokens"] == int(mask.sum()) < mask.numel()


@pytest.mark.parametrize("recipe_name", ["seed001-calm", "seed001-free"])
def test_seed_001_recipes_fine_tune_t5_on_a_task(recipe_name):
    """The seed's per-data-set fine-tuning (the whole model, its losses), source -> target, on a tiny T5 with a
    built-in task in place of SAMSum."""
    config = tiny_config(recipe_name, model="tiny-t5", task="arithmetic", task_examples=4, heldout_task_examples=2,
                         steps=2, batch_windows=2)
    assert config.backbone == "full" and config.loss in ("weighted_ce", "shallowdeep_kd_dyna")
    _, _, result = _train(config)
    assert all(math.isfinite(r["loss"]) for r in result["loss_history"]) and result["heldout_tokens"] > 0
