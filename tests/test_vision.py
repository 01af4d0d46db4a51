"""Image classification with a ViT: Tiny-ImageNet and CIFAR-100 loading, preprocessing, a DP round.

Tiny-ImageNet is read from the local copy under the shared data folder.
CIFAR-100 is not available offline, so these tests write a small fake
CIFAR-100 (random pixels, all 100 classes) in the official python-pickle
layout to tmp_path and exercise the real loader on it. The ViT is the
randomly initialised "vit-tiny-random" (no pretrained vision weights exist
offline): the runs check the pipeline, not accuracy.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import metric_rows
from transformers import BertConfig

from aslora.config import ExperimentConfig, load_config, parse_config
from aslora.experiment import run_experiment
from aslora.privacy import epsilon_for
from aslora.tasks import DataNotFoundError, load_task

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"cifar100": "cifar100-vit.toml", "tiny_imagenet": "tiny-imagenet-vit.toml"}
TINY = Path("vision") / "tiny-imagenet-200-subset"


def _write_pickle(path: Path, content: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(content, f)


def _fake_cifar(root: Path, n_train: int, n_test: int) -> dict[str, dict]:
    """A CIFAR-100 folder in the official layout under root/vision; returns what each file holds."""
    folder = root / "vision" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        data[0], data[1] = 255, 0  # a white and a black image: known pixel values after normalising
        written[split] = {b"data": data, b"fine_labels": rng.permutation(np.arange(n) % 100).tolist()}
        _write_pickle(folder / split, written[split])
    _write_pickle(folder / "meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)]})
    return written


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """A fake CIFAR-100 data root (300 train, 120 test images) and the content of its files."""
    root = tmp_path_factory.mktemp("cifar")
    return root, _fake_cifar(root, n_train=300, n_test=120)


def _config(task: str, root: Path, tmp_path: Path, **overrides: object) -> ExperimentConfig:
    """The task's shipped config, shrunk to seconds: 2 clients, tiny subsets, 2 local steps of batch 8."""
    return load_config(REPO / "configs" / CONFIGS[task]).with_overrides(
        {
            "output_dir": str(tmp_path / "runs"),
            "data.dir": str(root),
            "data.num_clients": 2,
            "data.train_subset": 200,
            "data.eval_subset": 100,
            "federation.rounds": 1,
            "federation.clients_per_round": 2,
            "federation.local_steps": 2,
            "federation.eval_every": 1,
            "optim.batch_size": 8,
            "optim.eval_batch_size": 50,
        }
        | overrides
    )


def _paths(split: datasets.Dataset) -> list[Path]:
    """The image file of every row, without decoding any image."""
    return [Path(image["path"]) for image in split.cast_column("image", datasets.Image(decode=False))["image"]]


def test_tiny_imagenet_loads_every_class_and_the_annotated_val_labels(data_dir: Path, tmp_path: Path) -> None:
    task = load_task(_config("tiny_imagenet", data_dir, tmp_path, **{"data.train_subset": 0, "data.eval_subset": 0}))
    folder = data_dir / TINY
    names = task.train.features["label"].names
    assert names == (folder / "wnids.txt").read_text().split()
    assert len(names) == 200 and task.eval.features["label"].names == names
    assert len(task.train) == 20_000 and len(task.eval) == 10_000
    # A training image's label is the class folder it lies in.
    assert all(path.parts[-3] == names[label] for path, label in zip(_paths(task.train), task.train["label"]))
    assert np.bincount(task.train["label"], minlength=200).tolist() == [100] * 200
    # A validation image's label is the wnid val_annotations.txt gives it, indexed as in training.
    annotated = dict(line.split("\t")[:2] for line in (folder / "val" / "val_annotations.txt").read_text().splitlines())
    assert [names[label] for label in task.eval["label"]] == [annotated[p.name] for p in _paths(task.eval)]
    assert len(set(task.eval["label"])) == 200


def test_subsets_are_seeded_draws_of_labelled_rows(data_dir: Path, tmp_path: Path) -> None:
    config = _config("tiny_imagenet", data_dir, tmp_path, **{"data.train_subset": 300, "data.eval_subset": 40})
    first, again = load_task(config), load_task(config)
    other = load_task(config.with_overrides({"seed": 1}))
    assert (len(first.train), len(first.eval)) == (300, 40)
    assert _paths(first.train) == _paths(again.train)
    assert _paths(first.train) != _paths(other.train)
    names = first.train.features["label"].names
    assert all(p.parts[-3] == names[label] for p, label in zip(_paths(first.train), first.train["label"]))


def test_cifar100_loads_the_pickle_layout(cifar: tuple[Path, dict[str, dict]], tmp_path: Path) -> None:
    root, written = cifar
    task = load_task(_config("cifar100", root, tmp_path, **{"data.train_subset": 0, "data.eval_subset": 0}))
    assert task.train.features["label"].names == [f"class{i}" for i in range(100)]
    for split, name in ((task.train, "train"), (task.eval, "test")):
        assert split["label"] == written[name][b"fine_labels"]
        # Channel-major rows of 3072 bytes become 32x32 RGB images, pixel for pixel.
        for row in (0, 5, len(split) - 1):
            image = np.asarray(split[row]["image"])
            expected = written[name][b"data"][row].reshape(3, 32, 32).transpose(1, 2, 0)
            assert image.shape == (32, 32, 3) and np.array_equal(image, expected)


@pytest.mark.parametrize("task_name", ["cifar100", "tiny_imagenet"])
def test_encoding_gives_normalised_pixels_at_the_model_side_and_labels_last(
    task_name: str, cifar: tuple[Path, dict[str, dict]], data_dir: Path, tmp_path: Path
) -> None:
    root = cifar[0] if task_name == "cifar100" else data_dir
    task = load_task(_config(task_name, root, tmp_path, **{"data.train_subset": 0, "data.eval_subset": 64}))
    side = task.model_config.image_size
    encoded = task.encode(task.eval)
    pixels, labels = encoded.tensors
    assert pixels.shape == (64, 3, side, side) and pixels.dtype == torch.float32
    assert labels.dtype == torch.long and labels.tolist() == task.eval["label"]
    assert 0 <= int(labels.min()) and int(labels.max()) < len(task.eval.features["label"].names)
    assert -1.0 <= float(pixels.min()) < 0 < float(pixels.max()) <= 1.0
    if task_name == "cifar100":  # the white and the black image: scaled to [0, 1], then (x - 0.5) / 0.5
        train = task.encode(task.train.select([0, 1])).tensors[0]
        assert torch.allclose(train[0], torch.ones_like(train[0])) and torch.allclose(train[1], -torch.ones_like(train[1]))


@pytest.mark.parametrize("task_name", ["cifar100", "tiny_imagenet"])
def test_one_dp_round_of_aslora_runs_end_to_end(
    task_name: str, cifar: tuple[Path, dict[str, dict]], data_dir: Path, tmp_path: Path
) -> None:
    root = cifar[0] if task_name == "cifar100" else data_dir
    config = _config(task_name, root, tmp_path)
    assert config.method == "aslora" and config.privacy.enabled and config.privacy.epsilon == 3.0
    # CIFAR-100 calibrates sigma to the shipped epsilon; Tiny-ImageNet takes a given sigma (the
    # faster path), its epsilon then checked against the accountant.
    sigma = None if task_name == "cifar100" else 1.5
    result = run_experiment(config.with_overrides({"privacy.noise_multiplier": sigma}))
    (row,) = metric_rows(result.directory)
    assert sorted(row["clients"]) == [0, 1] and row["examples_seen"] > 0
    sizes = json.loads((result.directory / "config.json").read_text())["privacy_plan"]["client_sizes"]
    q = max(config.optim.batch_size / n for n in sizes)  # the most exposed client sets the epsilon
    if sigma is None:
        assert 2.9 <= row["epsilon"] <= 3.0
    else:
        assert row["epsilon"] == pytest.approx(epsilon_for(sigma, config.privacy.delta, q, 2, "rdp"))
    assert result.summary["epsilon"] == row["epsilon"]
    assert 0.0 <= row["metrics"]["accuracy"] <= 1.0 and math.isfinite(row["metrics"]["eval_loss"])
    assert any(factors for factors in row["mask"].values())  # LoRA factors trained, under DP
    # The round moved the model: noised LoRA factors and head give another loss.
    assert row["metrics"]["eval_loss"] != result.summary["initial_metrics"]["eval_loss"]
    assert (result.directory / "adapter" / "adapter_model.safetensors").is_file()


def test_a_missing_data_folder_names_the_layout_to_provide(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="cifar-100-python"):
        load_task(_config("cifar100", tmp_path, tmp_path))
    with pytest.raises(DataNotFoundError, match="tiny-imagenet-200"):
        load_task(_config("tiny_imagenet", tmp_path, tmp_path))


@pytest.mark.parametrize("task_name", ["cifar100", "tiny_imagenet"])
def test_without_a_data_folder_or_the_hub_the_error_says_how_to_point_at_one(
    task_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline mode makes the hub fail at once (the flags are read when datasets is imported).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("ASLORA_DATA_DIR", raising=False)
    raw = _config(task_name, tmp_path, tmp_path).model_dump(mode="json")
    raw["data"]["dir"] = None
    with pytest.raises(DataNotFoundError, match=r"--data-dir DIR.*vision/cifar-100-python/.*vision/tiny-imagenet-200/"):
        load_task(parse_config(raw))


def test_a_val_annotation_with_an_unknown_class_is_reported_with_its_line(tmp_path: Path) -> None:
    folder = tmp_path / TINY
    (folder / "train" / "n001" / "images").mkdir(parents=True)
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("n001\n")
    (folder / "train" / "n001" / "images" / "n001_0.JPEG").write_bytes(b"")
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn001\t0\t0\t8\t8\nval_1.JPEG\tn999\t0\t0\t8\t8\n")
    with pytest.raises(ValueError, match=r"line 2.*n999"):
        load_task(_config("tiny_imagenet", tmp_path, tmp_path))


def test_a_non_image_model_and_unknown_target_modules_are_refused(
    cifar: tuple[Path, dict[str, dict]], tmp_path: Path
) -> None:
    text_model = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(text_model)
    with pytest.raises(ValueError, match="not an image model"):
        load_task(_config("cifar100", cifar[0], tmp_path, **{"model.name": str(text_model)}))
    config = _config("cifar100", cifar[0], tmp_path, **{"lora.target_modules": ["query", "value"]})
    with pytest.raises(ValueError, match=r"named \[.*'q_proj'.*'v_proj'"):
        load_task(config).build_model(config)
