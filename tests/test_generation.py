"""SST-2 as generation with the random tiny Llama: prompts, LM labels, verbaliser scoring, a DP round."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import metric_rows
from opacus import GradSampleModule
from safetensors.torch import load_file

from aslora.adapters import FACTORS, LoraView
from aslora.config import ExperimentConfig, load_config
from aslora.experiment import run_experiment
from aslora.tasks import load_task
from aslora.tasks.generation import (
    CUE,
    IGNORE,
    REVIEW,
    GenerationTask,
    answer_log_likelihood,
    load_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def config(data_dir: Path) -> ExperimentConfig:
    """configs/sst2-llama-tiny.toml on a small subset of the local SST-2 copy."""
    return load_config(REPO / "configs" / "sst2-llama-tiny.toml").with_overrides(
        {"data.dir": str(data_dir), "data.train_subset": 240, "data.eval_subset": 32, "model.max_length": 32}
    )


@pytest.fixture(scope="module")
def task(config: ExperimentConfig) -> GenerationTask:
    loaded = load_task(config)
    assert isinstance(loaded, GenerationTask)
    return loaded


def _split(sentences: list[str], labels: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"sentence": sentences, "label": labels})


def test_sst2_loads_from_the_local_files_as_prompts(task: GenerationTask) -> None:
    assert (len(task.train), len(task.eval)) == (240, 32)
    assert set(task.train.column_names) == {"sentence", "label"} and set(task.train["label"]) == {0, 1}
    tokenizer = task.tokenizer
    sentences = list(task.eval["sentence"][:8])
    uncut = 0
    for sentence, ids in zip(sentences, task.prompts(sentences), strict=True):
        whole = tokenizer(REVIEW.format(sentence.strip()) + CUE, add_special_tokens=False)["input_ids"]
        if len(whole) - len(task.cue) <= task.review_budget:  # the pieces join into the whole prompt's tokens
            assert ids == whole
            uncut += 1
        text = tokenizer.decode(ids)
        assert text.startswith("review :") and text.endswith("sentiment :")  # the MiniLM tokenizer lowercases
    assert uncut > 0


def test_encoding_masks_the_prompt_and_labels_answer_and_eos(task: GenerationTask) -> None:
    long = " ".join(["remarkably"] * 100)
    ids, mask, lm_labels, labels = task.encode(_split(["a fine film", "dull", long], [1, 0, 0])).tensors
    eos = task.tokenizer.eos_token_id
    assert labels.tolist() == [1, 0, 0]
    assert ids.shape[1] == task.max_length  # the long review was cut to fit, not the row
    for row in range(3):
        answer = task.answers[int(labels[row])] + [eos]
        n = int(mask[row].sum())
        assert mask[row, -n:].all() and not mask[row, :-n].any()  # left padded
        assert ids[row, -len(answer) :].tolist() == answer  # the answer, then EOS, ends the row
        assert lm_labels[row, -len(answer) :].tolist() == answer
        assert (lm_labels[row, : -len(answer)] == IGNORE).all()  # prompt and padding carry no loss
        assert ids[row, -len(answer) - len(task.cue) : -len(answer)].tolist() == task.cue  # the cue survives a cut
    assert task.tokenizer.decode(ids[0][mask[0] == 1]) == "review : a fine film sentiment : positive [SEP]"


class GoodWordLM(torch.nn.Module):
    """A stand-in LM: at every position it gives one verbaliser 2 nats over all other tokens.

    ' positive' when the text holds the token 'good', else ' negative'; everything else is uniform.
    """

    def __init__(self, vocab: int, good: int, positive: int, negative: int) -> None:
        super().__init__()
        self.vocab, self.good, self.positive, self.negative = vocab, good, positive, negative

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int, **_: object) -> SimpleNamespace:
        logits = torch.zeros(len(input_ids), logits_to_keep, self.vocab)
        has_good = (input_ids == self.good).any(dim=1)
        logits[has_good, :, self.positive] = 2.0
        logits[~has_good, :, self.negative] = 2.0
        return SimpleNamespace(logits=logits)


def test_verbaliser_scoring_against_a_hand_computed_case(task: GenerationTask) -> None:
    (negative,), (positive,) = task.answers
    stub = GoodWordLM(len(task.tokenizer), task.tokenizer.convert_tokens_to_ids("good"), positive, negative)
    # The stub prefers ' positive' for both; the second's gold label is negative.
    data = task.encode(_split(["a good film", "good grief , what a mess"], [1, 0]))
    # By hand: the favoured token has p = e^2 / Z and any other token 1 / Z, Z = e^2 + V - 1; so EOS
    # has 1 / Z after either answer, and the gold answer's mean NLL is log Z - 1 when favoured, else log Z.
    log_z = math.log(math.exp(2.0) + len(task.tokenizer) - 1)
    for batch_size in (1, 2):
        metrics = task.evaluate(stub, data, batch_size)
        assert metrics["accuracy"] == 0.5
        assert metrics["eval_loss"] == pytest.approx(((log_z - 1) + log_z) / 2, rel=1e-6)
    flipped = task.evaluate(stub, task.encode(_split(["a good film", "a mess"], [1, 0])), 2)
    assert flipped["accuracy"] == 1.0 and flipped["eval_loss"] == pytest.approx(log_z - 1, rel=1e-6)


def test_padding_changes_neither_scores_nor_per_example_gradients(task: GenerationTask, config: ExperimentConfig) -> None:
    """Left padding is invisible to the model, and Opacus's per-sample LoRA gradients are each example's own."""
    model = task.build_model(config)
    view = LoraView(model)
    params = view.set_trainable(dict.fromkeys(view.layers, FACTORS), train_head=False)
    torch.manual_seed(1)
    view.set_factors({layer: {"B": torch.randn_like(view.parameter(layer, "B"))} for layer in view.layers})
    sentences, labels = ["a good film", "dull", "a long and winding , overlong tale"], [1, 0, 0]
    batch = task.encode(_split(sentences, labels)).tensors
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    task.loss(wrapped, batch).backward()
    per_sample = [p.grad_sample.clone() for p in params]
    wrapped.to_standard_module()
    with torch.no_grad():
        together, _ = answer_log_likelihood(model, *batch[:3])
    for i, sentence in enumerate(sentences):
        single = task.encode(_split([sentence], [labels[i]])).tensors
        model.zero_grad()
        loss = task.loss(model, single)
        loss.backward()
        assert float(-loss.detach()) * 2 == pytest.approx(float(together[i]), abs=1e-5)  # 2 tokens: answer, EOS
        for p, gs in zip(params, per_sample, strict=True):
            assert float(torch.linalg.norm(gs[i] - p.grad)) <= 1e-4 * float(torch.linalg.norm(p.grad)) + 1e-9
        assert sum(float(torch.linalg.norm(p.grad)) for p in params) > 0


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"lora.target_modules": ["query", "value"]}, "q_proj, k_proj, v_proj, o_proj"),
        ({"lora.head_modules": ["classifier"]}, "lora.head_modules = []"),
    ],
)
def test_bert_style_lora_settings_are_refused_with_the_fix(
    task: GenerationTask, config: ExperimentConfig, overrides: dict, named: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        task.build_model(config.with_overrides(overrides))


def test_one_dp_round_of_aslora_trains_and_exports_the_attention_adapters(
    config: ExperimentConfig, tmp_path: Path
) -> None:
    assert config.method == "aslora" and config.privacy.enabled and config.privacy.epsilon == 3.0
    small = config.with_overrides(
        {
            "output_dir": str(tmp_path),
            "data.num_clients": 3,
            "federation.rounds": 1,
            "federation.clients_per_round": 2,
            "federation.local_steps": 2,
            "federation.eval_every": 1,
            "optim.batch_size": 16,
        }
    )
    result = run_experiment(small)
    (row,) = metric_rows(result.directory)
    assert len(row["clients"]) == 2 and row["rejected"] == [] and row["examples_seen"] > 0
    assert math.isfinite(row["train_loss"])
    assert 0 < result.summary["epsilon"] <= 3.0
    for metrics in (result.summary["initial_metrics"], result.summary["final_metrics"]):
        assert 0.0 <= metrics["accuracy"] <= 1.0 and math.isfinite(metrics["eval_loss"])
    adapter = load_file(str(result.directory / "adapter" / "adapter_model.safetensors"))
    for layer in range(2):
        for projection in PROJECTIONS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            assert adapter[f"{prefix}.lora_A.weight"].shape == (8, 64)
            trained = adapter[f"{prefix}.lora_B.weight"]  # zero at the start; round 0 trains B everywhere
            assert row["mask"][f"model.layers.{layer}.self_attn.{projection}"] == ["B"]
            assert float(trained.abs().max()) > 0


def test_a_causal_lm_folder_loads_as_a_real_checkpoint_would(
    task: GenerationTask, config: ExperimentConfig, tmp_path: Path
) -> None:
    """The path of a real LM (a folder or hub id, its own tokenizer) gives the model it was saved from."""
    source = task.build_model(config)
    expected = task.evaluate(source, task.encode(task.eval), 16)
    source.unload().save_pretrained(tmp_path)  # LoRA B is zero: the folder holds the base model
    task.tokenizer.save_pretrained(tmp_path)
    saved = replace(task, tokenizer=load_tokenizer(str(tmp_path)), model_name=str(tmp_path))
    model = saved.build_model(config)
    assert next(model.parameters()).dtype == torch.float32
    assert saved.evaluate(model, saved.encode(saved.eval), 16) == pytest.approx(expected, rel=1e-9)
