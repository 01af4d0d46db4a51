"""GLUE sentence classification (SST-2): HF datasets, a sequence-classification head, accuracy."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch.utils.data import TensorDataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from aslora.config import ExperimentConfig
from aslora.pretrained import load_pretrained, resolve_model
from aslora.tasks.common import DataNotFoundError, data_root

log = logging.getLogger(__name__)

# task -> (hub config of nyu-mll/glue, local folder, text column, number of labels)
GLUE = {"sst2": ("sst2", "SST-2", "sentence", 2)}
HUB_DATASET = "nyu-mll/glue"


def _load_local(folder: Path) -> datasets.DatasetDict:
    files = {"train": folder / "train.tsv", "validation": folder / "dev.tsv"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"missing {', '.join(missing)}; put the GLUE TSV files (train.tsv, dev.tsv) there, "
            "or point --data-dir / ASLORA_DATA_DIR at a folder holding glue/<TASK>/"
        )
    # QUOTE_NONE (3): GLUE TSVs contain bare quotes that are part of the text.
    return datasets.load_dataset(
        "csv", data_files={k: str(v) for k, v in files.items()}, delimiter="\t", quoting=3
    )


def _load_hub(hub_config: str, root_hint: str) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_dataset(HUB_DATASET, hub_config)
    except Exception as exc:  # noqa: BLE001 - the hub raises many types when offline
        raise DataNotFoundError(
            f"could not load GLUE/{hub_config} from the hub ({type(exc).__name__}) and no local "
            f"copy is configured. Put the files at {root_hint} and pass --data-dir DIR "
            "(or set ASLORA_DATA_DIR=DIR), where DIR holds glue/<TASK>/train.tsv and dev.tsv"
        ) from None
    return datasets.DatasetDict(train=loaded["train"], validation=loaded["validation"])


def _check_texts(split: datasets.Dataset, column: str, where: str) -> None:
    """Every example needs a text and a label: say which rows lack one, before any training."""
    if column not in split.column_names or "label" not in split.column_names:
        raise ValueError(f"{where} needs the columns '{column}' and 'label'; it has {split.column_names}")
    empty = [i for i, text in enumerate(split[column]) if text is None or not str(text).strip()]
    unlabelled = [i for i, label in enumerate(split["label"]) if label is None]
    for rows, what in ((empty, "an empty text"), (unlabelled, "no label")):
        if rows:
            raise ValueError(
                f"{where}: {len(rows)} example(s) have {what} (first at data row {rows[0] + 1}); "
                "remove or fix them in the data files"
            )


@dataclass
class GlueTask:
    """One GLUE classification task with its tokenizer and splits."""

    name: str
    text_column: str
    num_labels: int
    train: datasets.Dataset
    eval: datasets.Dataset
    tokenizer: PreTrainedTokenizerBase
    model_path: str
    max_length: int
    metric: str = "accuracy"
    extra_evals: dict[str, datasets.Dataset] = field(default_factory=dict)

    @classmethod
    def load(cls, config: ExperimentConfig) -> GlueTask:
        hub_config, folder, text_column, num_labels = GLUE[config.data.task]
        root = data_root(config)
        if root is not None:
            splits = _load_local(root / "glue" / folder)
        else:
            splits = _load_hub(hub_config, f"DIR/glue/{folder}/")
        train, dev = splits["train"], splits["validation"]
        for split_name, split in (("train", train), ("dev", dev)):
            _check_texts(split, text_column, f"GLUE/{folder} {split_name}")
        if config.data.train_subset:
            train = train.shuffle(seed=config.seed).select(range(min(config.data.train_subset, len(train))))
        if config.data.eval_subset:
            dev = dev.shuffle(seed=config.seed).select(range(min(config.data.eval_subset, len(dev))))
        model_path = resolve_model(config.model.name)
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, config.model.name)
        return cls(
            name=config.data.task,
            text_column=text_column,
            num_labels=num_labels,
            train=train.select_columns([text_column, "label"]),
            eval=dev.select_columns([text_column, "label"]),
            tokenizer=tokenizer,
            model_path=model_path,
            max_length=config.model.max_length,
        )

    def encode(self, split: datasets.Dataset) -> TensorDataset:
        """Token ids, attention mask and label as tensors (padded to max_length)."""
        enc = self.tokenizer(
            list(split[self.text_column]),
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        labels = torch.tensor(split["label"], dtype=torch.long)
        return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)

    def build_model(self, config: ExperimentConfig) -> PeftModel:
        """The pretrained encoder with a fresh head and LoRA adapters, seeded."""
        torch.manual_seed(config.seed)
        base = load_pretrained(
            AutoModelForSequenceClassification.from_pretrained, self.model_path, num_labels=self.num_labels
        )
        lora = config.lora
        present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        missing = [m for m in lora.head_modules if m not in present]
        if missing:
            raise ValueError(
                f"lora.head_modules names {missing}, which {type(base).__name__} does not have; "
                "name modules of the model's head (BERT-like models: classifier, pooler)"
            )
        peft_config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            modules_to_save=list(lora.head_modules),
        )
        try:
            return get_peft_model(base, peft_config)
        except ValueError as exc:
            raise ValueError(f"lora.target_modules={list(lora.target_modules)}: {exc}") from None

    @staticmethod
    def _inputs(batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Model inputs with padding trimmed to the longest sequence in the batch."""
        input_ids, attention_mask, labels = batch
        length = max(1, int(attention_mask.sum(dim=1).max()))
        return {
            "input_ids": input_ids[:, :length],
            "attention_mask": attention_mask[:, :length],
            "labels": labels,
        }

    def loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean cross-entropy of the batch."""
        return module(**self._inputs(batch)).loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: TensorDataset, batch_size: int) -> dict[str, float]:
        """Accuracy and mean loss of `model` on `data`."""
        model.eval()
        correct, loss_sum = 0, 0.0
        # Length-sorted batches carry little padding: evaluation is about twice as fast.
        order = torch.argsort(data.tensors[1].sum(dim=1))
        for start in range(0, len(data), batch_size):
            batch = data[order[start : start + batch_size]]
            out = model(**self._inputs(batch))
            correct += int((out.logits.argmax(-1) == batch[2]).sum())
            loss_sum += float(out.loss) * len(batch[2])
        model.train()
        return {"accuracy": correct / len(data), "eval_loss": loss_sum / len(data)}
