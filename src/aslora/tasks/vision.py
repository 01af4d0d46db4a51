"""Image classification with a ViT (CIFAR-100, Tiny-ImageNet): LoRA on the attention, a trained head.

The data come from a local folder in each set's official layout, or from the
Hugging Face hub. The model is a pretrained ViT (a local folder or a hub id,
e.g. google/vit-base-patch16-224-in21k) or, with model.name = "vit-tiny-random",
a small randomly initialised ViT that needs no download. No pretrained vision
weights exist offline, so offline runs use random weights: they check the
pipeline (data, DP-SGD, federation, metrics), they do not reproduce the
paper's accuracies.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import datasets
import numpy as np
import torch
from peft import PeftModel
from PIL import Image
from torch.utils.data import TensorDataset
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, ViTConfig

try:  # transformers 5 names the PIL-based processor apart from the torchvision one
    from transformers import ViTImageProcessorPil as ViTImageProcessor
except ImportError:  # transformers 4: ViTImageProcessor is the PIL-based one
    from transformers import ViTImageProcessor

from aslora.config import ExperimentConfig
from aslora.pretrained import load_pretrained
from aslora.tasks.common import DataNotFoundError, data_root, with_lora

log = logging.getLogger(__name__)

RANDOM_VIT = "vit-tiny-random"
# Sized for CPUs: 16 patches of 8x8 pixels, two blocks of width 64.
RANDOM_VIT_CONFIG = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
}
# Google's ViT checkpoints (and the random ViT) normalise every channel to [-1, 1].
PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)

CIFAR_FOLDER = "cifar-100-python"
CIFAR_HUB = "uoft-cs/cifar100"
CIFAR_SIDE = 32
# The official archive unpacks to tiny-imagenet-200; the offline copy is a subset of it.
TINY_FOLDERS = ("tiny-imagenet-200", "tiny-imagenet-200-subset")
TINY_HUB = "zh-plus/tiny-imagenet"
VISION_TASKS = ("cifar100", "tiny_imagenet")


def _rows(n: int, size: int, seed: int) -> np.ndarray:
    """The rows a subset of `size` keeps (a seeded random draw), or all rows in order when size is 0.

    Rows are chosen before any image is decoded, so a small subset of a large
    set loads in a moment.
    """
    if not size or size >= n:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)[:size]


def _image_split(images: list[Image.Image] | list[str], labels: np.ndarray, names: list[str]) -> datasets.Dataset:
    """A split with an `image` column (PIL images or file paths, decoded on access) and a `label` column."""
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    return datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)


def _unpickle(path: Path) -> dict:
    """One file of the CIFAR-100 python layout, or the error that says where it should be."""
    if not path.is_file():
        raise DataNotFoundError(
            f"missing {path}; unpack the official CIFAR-100 archive (cifar-100-python.tar.gz) into "
            f"{path.parent.parent}, or point --data-dir / ASLORA_DATA_DIR at a folder holding "
            f"vision/{CIFAR_FOLDER}/"
        )
    # The official CIFAR-100 distribution is a Python pickle; the user chose this file to load.
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_local(folder: Path, subsets: dict[str, int], seed: int) -> dict[str, datasets.Dataset]:
    """CIFAR-100 from the python-pickle layout: `train`, `test` and `meta` in `folder`."""
    names = [n.decode() for n in _unpickle(folder / "meta").get(b"fine_label_names", [])]
    if len(names) != 100:
        raise ValueError(
            f"{folder / 'meta'}: expected 100 entries under b'fine_label_names', found {len(names)}"
        )
    splits = {}
    for split, size in subsets.items():
        path = folder / split
        batch = _unpickle(path)
        if b"data" not in batch or b"fine_labels" not in batch:
            raise ValueError(
                f"{path} lacks b'data' or b'fine_labels'; is it the CIFAR-100 (not CIFAR-10) file?"
            )
        data, labels = np.asarray(batch[b"data"], dtype=np.uint8), np.asarray(batch[b"fine_labels"])
        if data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIDE**2 or len(data) != len(labels):
            raise ValueError(
                f"{path}: b'data' has shape {data.shape} for {len(labels)} labels; expected one row of "
                f"{3 * CIFAR_SIDE**2} bytes (3 x 32 x 32, channel-major) per label"
            )
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(names):
            raise ValueError(
                f"{path}: fine labels must lie in [0, {len(names)}), found {labels.min()}..{labels.max()}"
            )
        keep = _rows(len(labels), size, seed)
        pixels = data[keep].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
        splits[split] = _image_split([Image.fromarray(p) for p in pixels], labels[keep], names)
    return splits


def _tiny_train(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """Image files and labels of train/<wnid>/images/, the label being the wnid's line in wnids.txt."""
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        found = sorted((folder / "train" / wnid / "images").glob("*.JPEG"))
        if not found:
            raise DataNotFoundError(
                f"no training images in {folder / 'train' / wnid / 'images'} (class {wnid} of wnids.txt)"
            )
        files += found
        labels += [label] * len(found)
    return files, labels


def _tiny_val(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """Image files and labels of val/images/, each file's wnid read from val/val_annotations.txt."""
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataNotFoundError(f"missing {annotations}; it maps each validation image to its class")
    index = {wnid: i for i, wnid in enumerate(wnids)}
    files, labels = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise ValueError(
                f"{annotations} line {number}: expected 'FILE<TAB>WNID...' with a WNID of wnids.txt, got {line!r}"
            )
        files.append(folder / "val" / "images" / fields[0])
        labels.append(index[fields[1]])
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} validation image(s) named in {annotations} are missing, e.g. {missing[0]}"
        )
    return files, labels


def _tiny_local(folder: Path, subsets: dict[str, int], seed: int) -> dict[str, datasets.Dataset]:
    """Tiny-ImageNet from its folder layout: wnids.txt, train/<wnid>/images/, val/ with its annotations."""
    wnids_file = folder / "wnids.txt"
    if not wnids_file.is_file():
        raise DataNotFoundError(
            f"missing {wnids_file}; unpack the official tiny-imagenet-200.zip into {folder.parent}, "
            f"or point --data-dir / ASLORA_DATA_DIR at a folder holding vision/{TINY_FOLDERS[0]}/"
        )
    wnids = wnids_file.read_text().split()
    splits = {}
    for split, reader in (("train", _tiny_train), ("val", _tiny_val)):
        files, labels = reader(folder, wnids)
        keep = _rows(len(files), subsets[split], seed)
        splits[split] = _image_split([str(files[i]) for i in keep], np.asarray(labels)[keep], wnids)
    return splits


def _hub(name: str, renames: dict[str, str], subsets: dict[str, int], seed: int) -> dict[str, datasets.Dataset]:
    """Splits of a hub data set, columns renamed to image/label, subsets drawn before decoding."""
    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - the hub raises many types when offline
        raise DataNotFoundError(
            f"could not load {name} from the hub ({type(exc).__name__}) and no local copy is configured; "
            "pass --data-dir DIR (or set ASLORA_DATA_DIR=DIR), where DIR holds "
            f"vision/{CIFAR_FOLDER}/ (CIFAR-100) or vision/{TINY_FOLDERS[0]}/ (Tiny-ImageNet)"
        ) from None
    splits = {}
    for split, size in subsets.items():
        data = loaded[split].rename_columns(renames).select_columns(["image", "label"])
        splits[split] = data.select(_rows(len(data), size, seed))
    return splits


def _load_splits(config: ExperimentConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) of config.data.task, from the local data folder if one is set, else the hub."""
    root, seed = data_root(config), config.seed
    train_size, eval_size = config.data.train_subset, config.data.eval_subset
    if config.data.task == "cifar100":
        subsets = {"train": train_size, "test": eval_size}
        if root is None:
            splits = _hub(CIFAR_HUB, {"img": "image", "fine_label": "label"}, subsets, seed)
        else:
            splits = _cifar_local(root / "vision" / CIFAR_FOLDER, subsets, seed)
        return splits["train"], splits["test"]
    if root is None:
        splits = _hub(TINY_HUB, {}, {"train": train_size, "valid": eval_size}, seed)
        return splits["train"], splits["valid"]
    folders = [root / "vision" / name for name in TINY_FOLDERS]
    folder = next((f for f in folders if f.is_dir()), folders[0])
    splits = _tiny_local(folder, {"train": train_size, "val": eval_size}, seed)
    return splits["train"], splits["val"]


def _model_config(name: str, labels: list[str]) -> PretrainedConfig:
    """The ViT's configuration with a head for `labels`: the random tiny ViT, or a pretrained one's."""
    head = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    if name == RANDOM_VIT:
        log.warning(
            "model.name=%r is a randomly initialised ViT: results check the pipeline, they are not "
            "pretrained-model results", RANDOM_VIT
        )
        return ViTConfig(**RANDOM_VIT_CONFIG, **head)
    model_config = load_pretrained(AutoConfig.from_pretrained, name, **head)
    if getattr(model_config, "image_size", None) is None:
        raise ValueError(
            f"model.name={name!r} is a {type(model_config).__name__}, not an image model with an "
            f"image_size; use a ViT (e.g. google/vit-base-patch16-224-in21k) or {RANDOM_VIT!r}"
        )
    return model_config


@dataclass
class VisionTask:
    """One image classification set with the ViT that classifies it."""

    names: ClassVar[tuple[str, ...]] = VISION_TASKS
    sentence_classifier: ClassVar[bool] = False

    name: str
    train: datasets.Dataset
    eval: datasets.Dataset
    model_name: str
    model_config: PretrainedConfig
    processor: ViTImageProcessor
    metric: str = "accuracy"
    extra_evals: dict[str, datasets.Dataset] = field(default_factory=dict)

    @classmethod
    def load(cls, config: ExperimentConfig) -> VisionTask:
        """The task's splits (subsets drawn, images not yet decoded) and a processor at the model's side."""
        train, dev = _load_splits(config)
        model_config = _model_config(config.model.name, train.features["label"].names)
        side = model_config.image_size
        processor = ViTImageProcessor(
            size={"height": side, "width": side}, image_mean=list(PIXEL_MEAN), image_std=list(PIXEL_STD)
        )
        return cls(
            name=config.data.task,
            train=train,
            eval=dev,
            model_name=config.model.name,
            model_config=model_config,
            processor=processor,
        )

    def encode(self, split: datasets.Dataset) -> TensorDataset:
        """Pixel values (resized to the model's side, scaled to [0, 1], normalised) and labels."""
        # Tiny-ImageNet holds some greyscale JPEGs; the ViT takes three channels.
        images = [image.convert("RGB") for image in split["image"]]
        pixels = self.processor(images, return_tensors="pt")["pixel_values"]
        return TensorDataset(pixels, torch.tensor(split["label"], dtype=torch.long))

    encode_train = encode  # one row per example already

    def build_model(self, config: ExperimentConfig) -> PeftModel:
        """The ViT with a fresh head and LoRA adapters, seeded (the random ViT's weights too)."""
        torch.manual_seed(config.seed)
        if self.model_name == RANDOM_VIT:
            base = AutoModelForImageClassification.from_config(self.model_config)
        else:
            # A checkpoint's own head (ImageNet's 1000 classes) is replaced by a fresh one.
            base = load_pretrained(
                AutoModelForImageClassification.from_pretrained,
                self.model_name,
                config=self.model_config,
                ignore_mismatched_sizes=True,
            )
        # Module names differ across transformers versions (ViT: query/value in 4.x, q_proj/v_proj in 5.x).
        return with_lora(base, config.lora, config.model.dropout, None, "name modules of the model's head (ViT: classifier)")

    def loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean cross-entropy of the batch."""
        pixels, labels = batch
        return module(pixel_values=pixels, labels=labels).loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: TensorDataset, batch_size: int) -> dict[str, float]:
        """Accuracy and mean loss of `model` on `data`."""
        model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, len(data), batch_size):
            pixels, labels = data[start : start + batch_size]
            out = model(pixel_values=pixels, labels=labels)
            correct += int((out.logits.argmax(-1) == labels).sum())
            loss_sum += float(out.loss) * len(labels)
        model.train()
        return {"accuracy": correct / len(data), "eval_loss": loss_sum / len(data)}
