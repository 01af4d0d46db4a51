"""GLUE classification (SST-2, QNLI, QQP, RTE, MNLI): HF datasets, a sequence-classification head, accuracy.

Local data use the official GLUE TSV layout, `glue/<TASK>/train.tsv` with
`dev.tsv` (MNLI: `dev_matched.tsv` and `dev_mismatched.tsv`), else the
hub's `nyu-mll/glue`. Where a local folder lacks the official training file,
the labelled subsets drawn from it (`glue/train_subsets/<TASK>/{train,dev}.json`)
stand in, and their `dev.json` replaces a missing official dev set: said in
the log, since those are then not GLUE's dev numbers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import datasets
import torch
from peft import PeftModel, TaskType
from torch.utils.data import TensorDataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from aslora.config import ConfigError, ExperimentConfig
from aslora.memory import check_micro_batch
from aslora.pretrained import load_pretrained, native_bfloat16, resolve_dtype, resolve_model
from aslora.tasks.common import DataFormatError, DataNotFoundError, data_root, with_lora
from aslora.tasks.pooling import pooled_classifier, resolve_pair_encoding, resolve_pooling

log = logging.getLogger(__name__)
HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueSpec:
    """Where one GLUE task lives and how its columns are named."""

    folder: str  # local folder under glue/, as in the GLUE distribution
    texts: tuple[str, ...]  # text columns, as named on the hub
    tsv_texts: tuple[str, ...]  # the same columns in the GLUE TSV files
    tsv_label: str
    labels: tuple[str, ...]  # label names in the hub's id order
    # evaluation splits: "" is the main one, others are reported with their name as prefix
    evals: dict[str, tuple[str, str]] = field(default_factory=lambda: {"": ("validation", "dev.tsv")})


GLUE = {
    "sst2": GlueSpec("SST-2", ("sentence",), ("sentence",), "label", ("0", "1")),
    "qnli": GlueSpec("QNLI", ("question", "sentence"), ("question", "sentence"), "label", ("entailment", "not_entailment")),
    "qqp": GlueSpec("QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", ("0", "1")),
    "rte": GlueSpec("RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
    "mnli": GlueSpec(
        "MNLI",
        ("premise", "hypothesis"),
        ("sentence1", "sentence2"),
        "gold_label",
        ("entailment", "neutral", "contradiction"),
        {"": ("validation_matched", "dev_matched.tsv"), "mm": ("validation_mismatched", "dev_mismatched.tsv")},
    ),
}


def _read_tsv(path: Path, spec: GlueSpec) -> datasets.Dataset:
    # QUOTE_NONE (3): GLUE TSVs contain bare quotes that are part of the text. The texts and the
    # label are read as the text they are: one stray '0.5' must not turn every label into a
    # float, nor a sentence 'null' into a missing value.
    as_text = dict.fromkeys([*spec.tsv_texts, spec.tsv_label], str)
    try:
        table = datasets.load_dataset(
            "csv", data_files=str(path), delimiter="\t", quoting=3, split="train", converters=as_text,
            keep_default_na=False,
        )
    except datasets.exceptions.DatasetGenerationError as exc:  # pandas' parser error is its cause
        cause = exc.__cause__ or exc
        raise DataFormatError(
            f"{path} is not a GLUE TSV file: {str(cause).strip()}; every line needs the header's tab-separated fields"
        ) from None
    except ValueError as exc:  # datasets: 'Instruction "train" corresponds to no data!'
        raise DataFormatError(f"{path} holds no examples ({exc}); put the GLUE rows under its header line") from None
    return table


def _read_subset(path: Path, spec: GlueSpec) -> datasets.Dataset:
    """A train_subsets JSON file ({index: {text_a, text_b, label}}) with the TSV column names."""
    rows = list(json.loads(path.read_text()).values())
    names = dict(zip(("text_a", "text_b"), spec.tsv_texts, strict=False)) | {"label": spec.tsv_label}
    return datasets.Dataset.from_list([{names[k]: v for k, v in row.items() if k in names} for row in rows])


@dataclass(frozen=True)
class Source:
    """Where a split came from, so that a bad row is named by its file and line."""

    name: str  # the file's path, or the hub split
    first_line: int | None = None  # the file line of data row 1 (TSV: 2, under the header); None: no lines

    def at(self, row: int) -> str:
        """Row `row` (0-based) as a place in the source."""
        return f"line {row + self.first_line}" if self.first_line is not None else f"data row {row + 1}"


Splits = tuple[datasets.Dataset, dict[str, datasets.Dataset], dict[str, Source]]


def _load_local(folder: Path, spec: GlueSpec) -> Splits:
    """The training split, the evaluation splits and their sources, from a local GLUE folder (see the module doc)."""
    subset = folder.parent / "train_subsets" / spec.folder
    train_file = folder / "train.tsv"
    if train_file.is_file():
        train, sources = _read_tsv(train_file, spec), {"train": Source(str(train_file), first_line=2)}
    elif (subset / "train.json").is_file():
        log.warning("GLUE/%s: no train.tsv; training on the subset in %s", spec.folder, subset)
        train, sources = _read_subset(subset / "train.json", spec), {"train": Source(str(subset / "train.json"))}
    else:
        raise DataNotFoundError(
            f"missing {train_file}; put the GLUE TSV files (train.tsv, dev.tsv) there, "
            "or point --data-dir / ASLORA_DATA_DIR at a folder holding glue/<TASK>/"
        )
    evals = {}
    for name, (_, file) in spec.evals.items():
        if (folder / file).is_file():
            evals[name], sources[name] = _read_tsv(folder / file, spec), Source(str(folder / file), first_line=2)
        elif name == "" and (subset / "dev.json").is_file():
            log.warning("GLUE/%s: no %s; evaluating on %s, drawn from the TRAIN set", spec.folder, file, subset / "dev.json")
            evals[name], sources[name] = _read_subset(subset / "dev.json", spec), Source(str(subset / "dev.json"))
        elif name == "":
            raise DataNotFoundError(f"missing {folder / file}, GLUE/{spec.folder}'s dev set; put it there")
        else:
            log.warning("GLUE/%s: no %s; its '%s_' metrics are not reported", spec.folder, folder / file, name)
    return train, evals, sources


def _load_hub(hub_config: str, spec: GlueSpec, root_hint: str) -> Splits:
    try:
        loaded = datasets.load_dataset(HUB_DATASET, hub_config)
    except Exception as exc:  # noqa: BLE001 - the hub raises many types when offline
        raise DataNotFoundError(
            f"could not load GLUE/{hub_config} from the hub ({type(exc).__name__}) and no local "
            f"copy is configured. Put the files at {root_hint} and pass --data-dir DIR "
            "(or set ASLORA_DATA_DIR=DIR), where DIR holds glue/<TASK>/train.tsv and dev.tsv"
        ) from None
    evals = {name: loaded[split] for name, (split, _) in spec.evals.items()}
    where = {name: Source(f"GLUE/{hub_config} {split} (hub)") for name, (split, _) in spec.evals.items()}
    return loaded["train"], evals, {"train": Source(f"GLUE/{hub_config} train (hub)")} | where


def _normalise(split: datasets.Dataset, spec: GlueSpec, source: Source) -> datasets.Dataset:
    """Hub column names, integer labels in the hub's order; unknown labels are named, not guessed."""
    if set(spec.tsv_texts) <= set(split.column_names) and spec.tsv_label in split.column_names:
        split = split.select_columns([*spec.tsv_texts, spec.tsv_label])
        split = split.rename_columns(
            {old: new for old, new in zip(spec.tsv_texts, spec.texts, strict=True) if old != new}
            | ({spec.tsv_label: "label"} if spec.tsv_label != "label" else {})
        )
    _check_texts(split, spec.texts, source)
    named = split.features["label"].dtype in ("string", "large_string")
    values = [str(v) for v in _column(split, "label")]
    allowed = spec.labels if named else [str(i) for i in range(len(spec.labels))]
    unknown = [i for i, v in enumerate(values) if v not in allowed]
    if unknown:
        raise ValueError(
            f"{source.name}: {len(unknown)} example(s) have a label outside {list(allowed)} (first at "
            f"{source.at(unknown[0])}: {values[unknown[0]]!r}); remove or fix them"
        )
    if named:
        split = split.remove_columns("label").add_column("label", [spec.labels.index(v) for v in values])
    return split.select_columns([*spec.texts, "label"])


def load_splits(config: ExperimentConfig, task: str) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    """GLUE `task`'s training and evaluation splits, from the local files (else the hub), checked and
    normalised: texts present, integer labels; a bad row is named by its file and line."""
    spec = GLUE[task]
    root = data_root(config)
    if root is not None:
        train, evals, sources = _load_local(root / "glue" / spec.folder, spec)
    else:
        train, evals, sources = _load_hub(task, spec, f"DIR/glue/{spec.folder}/")
    return _normalise(train, spec, sources["train"]), {
        name: _normalise(split, spec, sources[name]) for name, split in evals.items()
    }


def _carve_validation(
    train: datasets.Dataset, size: int, seed: int
) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    """`size` training examples as the only evaluation split, the rest to train on: tuning never sees dev."""
    if size >= len(train):
        raise ValueError(
            f"data.validation_size={size} leaves no training data ({len(train)} examples): use fewer"
        )
    split = train.train_test_split(test_size=size, seed=seed)
    log.info("evaluating on %d examples carved from the training set (data.validation_size), not dev", size)
    return split["train"], {"": split["test"]}


def _column(split: datasets.Dataset, name: str) -> list:
    """One column as a Python list, read from Arrow at once: iterating `split[name]` formats every
    row on its own, 5 s for the 67k rows of SST-2's training set on a 2-core CPU."""
    return split.with_format("arrow")[name].to_pylist()


def _check_texts(split: datasets.Dataset, columns: str | Sequence[str], source: Source) -> None:
    """Every example needs its texts and a label: say which rows lack one, before any training."""
    columns = [columns] if isinstance(columns, str) else list(columns)
    if not set(columns) <= set(split.column_names) or "label" not in split.column_names:
        raise ValueError(f"{source.name} needs the columns {[*columns, 'label']}; it has {split.column_names}")
    for column in columns:
        empty = [i for i, text in enumerate(_column(split, column)) if text is None or not str(text).strip()]
        if empty:
            raise ValueError(
                f"{source.name}: {len(empty)} example(s) have an empty text in '{column}' (first at "
                f"{source.at(empty[0])}); remove or fix them"
            )
    unlabelled = [i for i, label in enumerate(_column(split, "label")) if label is None or not str(label).strip()]
    if unlabelled:
        raise ValueError(
            f"{source.name}: {len(unlabelled)} example(s) have no label (first at {source.at(unlabelled[0])}); "
            "remove or fix them"
        )


def _tokens(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each row's token count (over both sentences of a separately embedded pair)."""
    return sum(mask.sum(dim=1) for mask in tensors[1:-1:2])


@dataclass
class GlueTask:
    """One GLUE classification task with its tokenizer and splits."""

    names: ClassVar[tuple[str, ...]] = tuple(GLUE)
    sentence_classifier: ClassVar[bool] = True  # a pooled embedding read by a head (model.pooling, dtype)

    name: str
    texts: tuple[str, ...]  # one column, or a sentence pair
    num_labels: int
    train: datasets.Dataset
    eval: datasets.Dataset
    tokenizer: PreTrainedTokenizerBase
    model_path: str
    max_length: int
    pooling: str | None  # see tasks/pooling.py; None: the architecture's own head
    pairs: bool  # the two sentences of a pair embedded apart (model.pair_encoding 'separate')
    normalize: bool  # unit-length embeddings before the head (model.normalize)
    dtype: str  # the frozen encoder's, model.dtype made concrete ('auto' resolved on this machine)
    metric: str = "accuracy"
    extra_evals: dict[str, datasets.Dataset] = field(default_factory=dict)

    @classmethod
    def load(cls, config: ExperimentConfig) -> GlueTask:
        spec = GLUE[config.data.task]
        train, evals = load_splits(config, config.data.task)
        if config.data.validation_size:
            train, evals = _carve_validation(train, config.data.validation_size, config.seed)
        if config.data.train_subset:
            train = train.shuffle(seed=config.seed).select(range(min(config.data.train_subset, len(train))))
        if config.data.eval_subset:
            evals = {
                name: split.shuffle(seed=config.seed).select(range(min(config.data.eval_subset, len(split))))
                for name, split in evals.items()
            }
        classes = set(_column(train, "label"))
        if len(classes) < 2:
            raise ValueError(
                f"GLUE/{spec.folder} train: every example has label {classes.pop()}; a classifier needs two "
                "classes at least: check the data files, or raise data.train_subset"
            )
        main = evals.pop("")
        model_path = resolve_model(config.model.name)
        asked = config.model.dtype
        pooling = resolve_pooling(config.model.pooling, model_path, asked)
        dtype = resolve_dtype(asked) if pooling is not None else "float32"
        if config.model.normalize and pooling is None:
            raise ConfigError(
                f"model.normalize scales a pooled embedding, and {model_path} declares no pooling (its own head "
                "reads the encoder): set model.pooling to 'mean', 'cls' or 'pooler', or remove model.normalize"
            )
        if dtype == "bfloat16" and not native_bfloat16():
            log.warning("model.dtype='bfloat16' on a CPU without native bfloat16: about 30x slower than "
                        "float32 here; model.dtype = 'auto' picks the fast one")
        log.info("frozen encoder in %s (model.dtype=%r)", dtype, asked)
        optim = config.optim
        physical = optim.micro_batch_size or int(optim.batch_size + 4 * optim.batch_size**0.5)  # Poisson tail
        check_micro_batch(
            load_pretrained(AutoConfig.from_pretrained, model_path), physical, config.model.max_length,
            2 if dtype == "bfloat16" else 4,
        )
        return cls(
            name=config.data.task,
            texts=spec.texts,
            num_labels=len(spec.labels),
            train=train,
            eval=main,
            tokenizer=load_pretrained(AutoTokenizer.from_pretrained, config.model.name),
            model_path=model_path,
            max_length=config.model.max_length,
            pooling=pooling,
            pairs=resolve_pair_encoding(config.model.pair_encoding, len(spec.texts), pooling, model_path),
            normalize=config.model.normalize,
            dtype=dtype,
            extra_evals=evals,
        )

    def encode(self, split: datasets.Dataset) -> TensorDataset:
        """Token ids, attention mask and label as tensors, padded to max_length: a pair as one
        sequence, or with `pairs` each sentence apart (ids, mask, ids_b, mask_b, label)."""
        columns = [_column(split, column) for column in self.texts]
        groups = [[c] for c in columns] if self.pairs else [columns]
        tensors = []
        for texts in groups:
            enc = self.tokenizer(
                *texts, truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
            )
            tensors += [enc["input_ids"], enc["attention_mask"]]
        labels = torch.tensor(_column(split, "label"), dtype=torch.long)
        return TensorDataset(*tensors, labels)

    def encode_train(self, split: datasets.Dataset) -> TensorDataset:
        """`encode`, its rows sorted by token count.

        Poisson sampling draws each row independently and yields the drawn
        rows in index order, so every logical batch comes out sorted by
        length and its micro-batches (optim.micro_batch_size) carry little
        padding. The order is a fixed function of the data and changes no
        example's chance of being drawn; the padding only changes how the
        same sum of clipped gradients is computed.
        """
        data = self.encode(split)
        order = torch.argsort(_tokens(data.tensors), stable=True)
        return TensorDataset(*(t[order] for t in data.tensors))

    def build_model(self, config: ExperimentConfig) -> PeftModel:
        """The pretrained encoder with a fresh head and LoRA adapters, seeded.

        With a pooling (`model.pooling`, see tasks/pooling.py) the head is one
        `classifier` Linear over that embedding; without, the architecture's
        own sequence-classification head.
        """
        torch.manual_seed(config.seed)
        if self.pooling is None:
            base = load_pretrained(
                AutoModelForSequenceClassification.from_pretrained, self.model_path, num_labels=self.num_labels
            )
            hint = "name modules of the model's head (BERT-like models: classifier, pooler)"
            return with_lora(base, config.lora, config.model.dropout, TaskType.SEQ_CLS, hint)
        base = pooled_classifier(self.model_path, self.pooling, self.num_labels, self.dtype, self.pairs, self.normalize)
        hint = f"with model.pooling={self.pooling!r} the head is 'classifier' (and 'pooler' only with model.pooling='pooler')"
        return with_lora(base, config.lora, config.model.dropout, None, hint)

    @staticmethod
    def _inputs(batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Model inputs with padding trimmed to the longest sequence in the batch (each sentence's, for
        separately embedded pairs)."""
        inputs = {"labels": batch[-1]}
        for suffix, (ids, mask) in zip(("", "_b"), zip(batch[:-1:2], batch[1:-1:2], strict=True), strict=False):
            length = max(1, int(mask.sum(dim=1).max()))
            inputs |= {f"input_ids{suffix}": ids[:, :length], f"attention_mask{suffix}": mask[:, :length]}
        return inputs

    def loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean cross-entropy of the batch."""
        return module(**self._inputs(batch)).loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: TensorDataset, batch_size: int) -> dict[str, float]:
        """Accuracy and mean loss of `model` on `data`."""
        model.eval()
        correct, loss_sum = 0, 0.0
        # Length-sorted batches carry little padding: evaluation is about twice as fast.
        order = torch.argsort(_tokens(data.tensors))
        for start in range(0, len(data), batch_size):
            batch = data[order[start : start + batch_size]]
            out = model(**self._inputs(batch))
            correct += int((out.logits.argmax(-1) == batch[-1]).sum())
            loss_sum += float(out.loss) * len(batch[-1])
        model.train()
        return {"accuracy": correct / len(data), "eval_loss": loss_sum / len(data)}
