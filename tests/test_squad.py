"""SQuAD v1.1 / v2.0: local loading and the by-article split, windowing, the official metric,
span post-processing, and one DP round of AS-LoRA end to end."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from conftest import metric_rows
from torch.utils.data import TensorDataset
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from aslora.config import ExperimentConfig, load_config
from aslora.experiment import run_experiment
from aslora.tasks import DataNotFoundError, load_task
from aslora.tasks.squad import (
    ARTICLE_GROUPS,
    FEATURES,
    SquadTask,
    normalize_answer,
    squad_scores,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"squad": "squad-v1-minilm.toml", "squad_v2": "squad-v2-minilm.toml"}
# question count of each local file, and how many of them have no answer
LOCAL_SIZES = {"squad": (10570, 0), "squad_v2": (6078, 3168)}

FILLER = "Water flows past the old mill near the quiet village every spring. " * 20
LONG_CONTEXT = FILLER + "The treasure was hidden by Captain Morgan in 1671."


def _config(task: str, data_dir: Path, **overrides: object) -> ExperimentConfig:
    """The task's shipped config on the local data, windows of 96 tokens sharing 32."""
    base = {"data.dir": str(data_dir), "model.max_length": 96, "data.doc_stride": 32}
    return load_config(REPO / "configs" / CONFIGS[task]).with_overrides(base | overrides)


@pytest.fixture(scope="module")
def tasks(data_dir: Path) -> dict[str, SquadTask]:
    """Both tasks loaded in full from the local files."""
    return {name: load_task(_config(name, data_dir, **{"data.eval_subset": 0})) for name in CONFIGS}


def _examples(*rows: tuple[str, str, list[str]]) -> datasets.Dataset:
    """Hand-made examples (question, context, gold answers), answers located in the context."""
    return datasets.Dataset.from_list(
        [
            {
                "id": str(i),
                "title": "hand-made",
                "context": context,
                "question": question,
                "answers": {"text": golds, "answer_start": [context.index(g) for g in golds]},
            }
            for i, (question, context, golds) in enumerate(rows)
        ],
        features=FEATURES,
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_local_file_is_split_by_article_into_disjoint_train_and_eval(tasks: dict[str, SquadTask], name: str) -> None:
    task = tasks[name]
    total, unanswerable = LOCAL_SIZES[name]
    assert len(task.train) + len(task.eval) == total
    assert 0 < len(task.eval) < len(task.train)
    assert not set(task.train["title"]) & set(task.eval["title"])  # no article, so no context, in both
    assert not set(task.train["context"]) & set(task.eval["context"])
    no_answer = sum(not a["text"] for split in (task.train, task.eval) for a in split["answers"])
    assert no_answer == unanswerable
    assert set(task.train["label"]) == set(range(ARTICLE_GROUPS))  # article groups: the Dirichlet skew


def test_split_and_subsets_follow_the_seed(data_dir: Path) -> None:
    def held_out(seed: int) -> set[str]:
        return set(load_task(_config("squad_v2", data_dir, seed=seed, **{"data.eval_subset": 50})).eval["id"])

    first = held_out(0)
    assert len(first) == 50
    assert held_out(0) == first
    assert held_out(1) != first


def test_long_context_gives_overlapping_windows_with_the_answer_inside_or_at_cls(
    tasks: dict[str, SquadTask],
) -> None:
    encoded = tasks["squad"].encode(_examples(("Who hid the treasure?", LONG_CONTEXT, ["Captain Morgan"])))
    windows = len(encoded)
    assert windows >= 3
    assert all(len(t) == windows for t in encoded.tensors)  # the last tensor counts the batch
    assert encoded.tensors[0].shape == (windows, 96)
    assert encoded.example.tolist() == [0] * windows
    starts, ends = encoded.tensors[3].tolist(), encoded.tensors[4].tolist()
    answered = [f for f in range(windows) if starts[f] != 0]
    assert answered and answered[-1] == windows - 1  # the answer is in the last window(s) only
    assert all(starts[f] == ends[f] == 0 for f in range(windows) if f not in answered)
    for f in answered:
        span = LONG_CONTEXT[encoded.offsets[f, starts[f], 0] : encoded.offsets[f, ends[f], 1]]
        assert span == "Captain Morgan"
        assert starts[f] <= ends[f] < int(encoded.tensors[1][f].sum())


def test_clients_train_on_one_window_per_example_the_one_with_the_answer(tasks: dict[str, SquadTask]) -> None:
    """A row is DP-SGD's unit of privacy: an example must not be several rows."""
    split = _examples(
        ("Who hid the treasure?", LONG_CONTEXT, ["Captain Morgan"]), ("Who found the treasure?", LONG_CONTEXT, [])
    )
    every = tasks["squad_v2"].encode(split)
    train = tasks["squad_v2"].encode_train(split)
    assert len(every) >= 6 and len(train) == 2
    first_with_answer = next(f for f in range(len(every)) if every.example[f] == 0 and every.tensors[3][f] != 0)
    assert torch.equal(train.tensors[0][0], every.tensors[0][first_with_answer]) and train.tensors[3][0] != 0
    assert train.tensors[3][1] == 0 and train.tensors[4][1] == 0  # unanswerable: its first window, at CLS


def test_unanswerable_question_is_labelled_at_cls_in_every_window(tasks: dict[str, SquadTask]) -> None:
    encoded = tasks["squad_v2"].encode(_examples(("Who found the treasure?", LONG_CONTEXT, [])))
    assert len(encoded) >= 3
    assert encoded.tensors[3].eq(0).all() and encoded.tensors[4].eq(0).all()


def test_normalisation_drops_case_punctuation_articles_and_spaces() -> None:
    assert normalize_answer("  The Quick, brown-fox ate AN apple! ") == "quick brownfox ate apple"
    assert normalize_answer("theatre") == "theatre"  # articles are whole words only


@pytest.mark.parametrize(
    ("prediction", "golds", "exact", "f1"),
    [
        ("The Denver Broncos!", ["Denver Broncos"], 1.0, 1.0),
        ("Denver", ["Denver Broncos"], 0.0, 2 / 3),  # precision 1, recall 1/2
        ("x x y", ["x y"], 0.0, 0.8),  # a repeated token counts once per gold occurrence
        ("Broncos", ["Denver Broncos", "Broncos"], 1.0, 1.0),  # best over the gold answers
        ("the Carolina Panthers team", ["Panthers", "Carolina Panthers"], 0.0, 0.8),
        ("Seattle", ["Denver Broncos"], 0.0, 0.0),
        ("", [], 1.0, 1.0),  # v2.0: no answer, rightly
        ("Normans", [], 0.0, 0.0),  # v2.0: an answer where there is none
        ("", ["France"], 0.0, 0.0),  # v2.0: no answer where there is one
    ],
)
def test_official_scores_on_hand_computed_cases(prediction: str, golds: list[str], exact: float, f1: float) -> None:
    assert squad_scores(prediction, golds) == pytest.approx((exact, f1))


class Oracle(torch.nn.Module):
    """A QA model that reads the labels: logit 10 at the gold start and end tokens, 0 elsewhere."""

    def forward(self, input_ids: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor,
                **_: torch.Tensor) -> QuestionAnsweringModelOutput:
        def logits(positions: torch.Tensor) -> torch.Tensor:
            return 10 * torch.nn.functional.one_hot(positions, input_ids.shape[1]).float()

        return QuestionAnsweringModelOutput(
            loss=torch.tensor(0.0), start_logits=logits(start_positions), end_logits=logits(end_positions)
        )


def test_post_processing_recovers_spans_across_windows_and_no_answers(tasks: dict[str, SquadTask]) -> None:
    rows = [
        ("Who hid the treasure?", LONG_CONTEXT, ["Captain Morgan"]),  # answer in the last window only
        ("When was it hidden?", "The treasure was hidden in 1671.", ["1671"]),
        ("Who found the treasure?", LONG_CONTEXT, []),
        ("Where is the mill?", "Old mills stand near the quiet village.", []),
    ]
    v2 = tasks["squad_v2"]
    # answerable: the span wins over the other windows' CLS; unanswerable: CLS beats every span
    assert v2.evaluate(Oracle(), v2.encode(_examples(*rows)), batch_size=3)["exact"] == 100.0
    v1 = tasks["squad"]
    scores = v1.evaluate(Oracle(), v1.encode(_examples(*rows[:2])), batch_size=2)
    assert scores["exact"] == scores["f1"] == 100.0
    # v1.1 always answers with a span, so a CLS-only model cannot score on unanswerable questions
    # (its tie-broken span is the context's first word: not an article, which would normalise to '')
    assert v1.evaluate(Oracle(), v1.encode(_examples(*rows[2:])), batch_size=2)["exact"] == 0.0


def test_evaluate_refuses_data_it_did_not_encode(tasks: dict[str, SquadTask]) -> None:
    plain = TensorDataset(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="SquadTask.encode"):
        tasks["squad"].evaluate(Oracle(), plain, batch_size=2)


@pytest.mark.parametrize("name", CONFIGS)
def test_one_dp_round_of_aslora_records_epsilon_and_squad_scores(data_dir: Path, tmp_path: Path, name: str) -> None:
    config = _config(
        name,
        data_dir,
        output_dir=str(tmp_path),
        **{
            "data.num_clients": 2,
            "data.train_subset": 64,
            "data.eval_subset": 8,
            "federation.rounds": 1,
            "federation.clients_per_round": 2,
            "federation.local_steps": 1,
            "optim.batch_size": 8,
            "optim.eval_batch_size": 32,
        },
    )
    result = run_experiment(config)
    summary = result.summary
    assert summary["rounds_completed"] == 1 and summary["method"] == "aslora"
    assert 0 < summary["epsilon"] <= 3.0
    for metrics in (summary["initial_metrics"], summary["final_metrics"]):
        assert 0 <= metrics["exact"] <= metrics["f1"] <= 100
    (row,) = metric_rows(result.directory)
    assert row["epsilon"] == summary["epsilon"] and "f1" in row["metrics"]


def test_bad_data_and_window_settings_fail_with_the_fix(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.doc_stride=96 must be below model.max_length=96"):
        load_task(_config("squad", data_dir, **{"data.doc_stride": 96}))
    with pytest.raises(DataNotFoundError, match="dev-v1.1.json"):
        load_task(_config("squad", tmp_path))
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "dev-v1.1.json").write_text('{"data": [{"title": "t", "paragraphs": [{"qas": [{"id": "1"}]}]}]}')
    with pytest.raises(ValueError, match="not in the official SQuAD JSON layout"):
        load_task(_config("squad", tmp_path))
    cramped = load_task(_config("squad", data_dir, **{"model.max_length": 16, "data.doc_stride": 8}))
    with pytest.raises(ValueError, match="raise model.max_length or lower data.doc_stride"):
        cramped.encode(_examples(("Who, in the long history of the world, hid the treasure?", LONG_CONTEXT, [])))
