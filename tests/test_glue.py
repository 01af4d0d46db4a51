"""GLUE beyond SST-2: sentence pairs, named labels, MNLI's matched and mismatched dev sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from aslora.config import ExperimentConfig
from aslora.experiment import run_experiment
from aslora.tasks import load_task


def _glue(tiny_config: ExperimentConfig, task: str, **overrides: object) -> ExperimentConfig:
    return tiny_config.with_overrides({"data.task": task, "federation.rounds": 1, **overrides})


@pytest.mark.parametrize(
    ("task", "columns", "labels", "train", "dev"),
    [
        ("qnli", ("question", "sentence"), 2, 8999, 5463),  # official dev; train from the train subset
        ("qqp", ("question1", "question2"), 2, 8999, 1000),  # both from the train subsets
        ("rte", ("sentence1", "sentence2"), 2, 2490, 277),  # the official TSVs
        ("mnli", ("premise", "hypothesis"), 3, 8999, 1000),
    ],
)
def test_local_files_load_as_labelled_pairs(
    tiny_config: ExperimentConfig, task: str, columns: tuple[str, str], labels: int, train: int, dev: int
) -> None:
    overrides = {"data.train_subset": 0, "data.eval_subset": 0, "model.pair_encoding": "joint"}
    loaded = load_task(_glue(tiny_config, task, **overrides))
    assert (len(loaded.train), len(loaded.eval)) == (train, dev)
    assert loaded.train.column_names == [*columns, "label"] and loaded.num_labels == labels
    assert set(loaded.train["label"]) == set(range(labels))
    encoded = loaded.encode(loaded.eval.select(range(3)))
    ids, mask, label = encoded.tensors
    assert ids.shape == mask.shape == (3, tiny_config.model.max_length) and label.shape == (3,)
    sep = loaded.tokenizer.sep_token_id
    assert all(int((row == sep).sum()) == 2 for row in ids)  # both texts of the pair, one sequence


def test_named_labels_follow_the_hubs_order(tiny_config: ExperimentConfig, data_dir: Path) -> None:
    """RTE's TSV says 'entailment'/'not_entailment'; the hub's ids are 0/1 in that order."""
    with (data_dir / "glue" / "RTE" / "dev.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    loaded = load_task(_glue(tiny_config, "rte", **{"data.eval_subset": 0}))
    by_text = {s: label for s, label in zip(loaded.eval["sentence1"], loaded.eval["label"], strict=True)}
    for row in rows[:20]:
        assert by_text[row["sentence1"]] == ("entailment", "not_entailment").index(row["label"])


def _mnli_folder(data_dir: Path, root: Path, bad_label: bool = False) -> None:
    """An MNLI folder in the official GLUE TSV layout, filled with real rows of the local train subsets
    (the official dev sets are not available offline); genre decides matched vs mismatched."""
    rows = list(json.loads((data_dir / "glue" / "train_subsets" / "MNLI" / "train.json").read_text()).values())
    folder = root / "glue" / "MNLI"
    folder.mkdir(parents=True)
    header = ["index", "genre", "sentence1", "sentence2", "gold_label"]
    parts = {"train.tsv": rows[:300], "dev_matched.tsv": rows[300:400], "dev_mismatched.tsv": rows[400:480]}
    if bad_label:
        parts["dev_matched.tsv"][3] = {**parts["dev_matched.tsv"][3], "label": "-"}
    for name, part in parts.items():
        lines = ["\t".join(header)] + [
            "\t".join([str(i), "fiction", r["text_a"], r["text_b"], r["label"]]) for i, r in enumerate(part)
        ]
        (folder / name).write_text("\n".join(lines) + "\n")


def test_mnli_reports_matched_and_mismatched_accuracy(
    tiny_config: ExperimentConfig, data_dir: Path, tmp_path: Path
) -> None:
    _mnli_folder(data_dir, tmp_path / "data")
    config = _glue(tiny_config, "mnli", **{"data.dir": str(tmp_path / "data"), "method": "aslora", "data.train_subset": 0, "data.eval_subset": 0})
    loaded = load_task(config)
    assert (len(loaded.train), len(loaded.eval), len(loaded.extra_evals["mm"])) == (300, 100, 80)
    result = run_experiment(config)
    final = result.summary["final_metrics"]
    assert 0 <= final["accuracy"] <= 1 and 0 <= final["mm_accuracy"] <= 1
    assert result.records[-1].epsilon is not None and result.records[-1].epsilon > 0


def test_an_unknown_label_is_named_with_its_row(tiny_config: ExperimentConfig, data_dir: Path, tmp_path: Path) -> None:
    _mnli_folder(data_dir, tmp_path / "data", bad_label=True)
    dev = tmp_path / "data" / "glue" / "MNLI" / "dev_matched.tsv"  # data row 4 is line 5, under the header
    with pytest.raises(ValueError, match=rf"{dev}: 1 example\(s\) have a label outside .*line 5: '-'"):
        load_task(_glue(tiny_config, "mnli", **{"data.dir": str(tmp_path / "data")}))


@pytest.mark.parametrize("task", ["qnli", "qqp", "rte"])
def test_one_dp_round_of_aslora(tiny_config: ExperimentConfig, task: str) -> None:
    result = run_experiment(_glue(tiny_config, task, method="aslora"))
    assert result.summary["rounds_completed"] == 1
    assert 0 <= result.summary["final_metrics"]["accuracy"] <= 1
    assert result.records[0].epsilon is not None and result.records[0].epsilon > 0
