"""Extractive question answering on SQuAD v1.1 ('squad') and v2.0 ('squad_v2'): span head, F1/EM.

Data. From the hub (`rajpurkar/squad`, `rajpurkar/squad_v2`) the official
train split is the clients' data and the validation split the evaluation set.
Offline only dev files exist (`<data root>/squad/dev-v1.1.json`, and a course
subset of SQuAD v2.0 at `squad/SQuAD-v2-cs224n-subset/dev-v2.0.json`), so the
task splits the local dev file BY ARTICLE (seeded): a quarter of the articles
become the evaluation set and the rest the clients' training data. No context
is shared between the two, but the scores are not the official dev scores;
a warning says so in every such run.

Non-IID. The partitioner's Dirichlet split reads a `label` column: here it is
the article's position modulo `ARTICLE_GROUPS`, so skewed clients hold
questions about different documents (topic skew), the natural heterogeneity
of federated QA. The same rule serves v1.1 and v2.0.

Features. A context longer than the window gives several overlapping windows
(`data.doc_stride` tokens shared). Evaluation reads every window; clients
train on one window per example (`encode_train`: the first holding the
answer), so that DP-SGD samples and clips examples, the unit its guarantee
is about, not windows of them.

Metric. The official SQuAD scores, in percent (0-100) as the official script
reports them: exact match and token F1, each the maximum over the gold
answers; for v2.0 an unanswerable question scores 1 only for an empty answer.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import datasets
import numpy as np
import torch
from peft import PeftModel, TaskType
from torch.utils.data import TensorDataset
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    BatchEncoding,
    PreTrainedTokenizerBase,
)

from aslora.config import ExperimentConfig
from aslora.pretrained import load_pretrained, resolve_model
from aslora.tasks.common import DataNotFoundError, data_root, with_lora

log = logging.getLogger(__name__)

HUB = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
LOCAL = {"squad": "squad/dev-v1.1.json", "squad_v2": "squad/SQuAD-v2-cs224n-subset/dev-v2.0.json"}
EVAL_ARTICLE_SHARE = 0.25  # offline: share of the dev file's articles held out for evaluation
ARTICLE_GROUPS = 4  # the `label` of an example: its article's position modulo this
MAX_ANSWER_TOKENS = 30
COLUMNS = ["id", "title", "context", "question", "answers"]
FEATURES = datasets.Features(
    {
        **{name: datasets.Value("string") for name in COLUMNS[:-1]},
        "answers": {"text": datasets.List(datasets.Value("string")), "answer_start": datasets.List(datasets.Value("int32"))},
    }
)


# The official SQuAD metric -----------------------------------------------------------------
# Written out here because HF `evaluate`'s squad metrics fetch their script from the hub at
# run time, which this project never does. Logic of the official v2.0 script (which gives
# the v1.1 scores on answerable questions): normalise, then exact match and token F1.


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # no-answer: only an empty prediction matches
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction, each in [0, 1], the best over the gold answers.

    Gold answers that normalise to nothing are dropped; none left (an
    unanswerable v2.0 question) means the only right answer is the empty one.
    """
    kept = [g for g in golds if normalize_answer(g)] or [""]
    exact = max(float(normalize_answer(prediction) == normalize_answer(g)) for g in kept)
    return exact, max(_f1(prediction, g) for g in kept)


# Loading -----------------------------------------------------------------------------------


def _flatten(path: Path) -> list[dict]:
    """Rows (id, title, context, question, answers) from the official SQuAD JSON layout."""
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        return [
            {
                "id": qa["id"],
                "title": article["title"],
                "context": paragraph["context"],
                "question": qa["question"],
                "answers": {
                    "text": [a["text"] for a in qa["answers"]],
                    "answer_start": [a["answer_start"] for a in qa["answers"]],
                },
            }
            for article in articles
            for paragraph in article["paragraphs"]
            for qa in paragraph["qas"]
        ]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path} is not in the official SQuAD JSON layout (data -> title, paragraphs -> context, "
            f"qas -> id, question, answers); problem: {type(exc).__name__} {exc}. Use the official file"
        ) from None


def _load_local(path: Path, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) from a local dev file, split by article."""
    if not path.is_file():
        raise DataNotFoundError(
            f"missing {path}; put the SQuAD dev JSON file there, or point --data-dir / ASLORA_DATA_DIR "
            "at a folder holding squad/dev-v1.1.json (v1.1) or squad/SQuAD-v2-cs224n-subset/dev-v2.0.json (v2.0)"
        )
    train, dev = split_by_article(_flatten(path), seed)
    return datasets.Dataset.from_list(train, features=FEATURES), datasets.Dataset.from_list(dev, features=FEATURES)


def _load_hub(task: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    try:
        loaded = datasets.load_dataset(HUB[task])
    except Exception as exc:  # noqa: BLE001 - the hub raises many types when offline
        raise DataNotFoundError(
            f"could not load {HUB[task]} from the hub ({type(exc).__name__}) and no local copy is "
            f"configured. Put the dev file at DIR/{LOCAL[task]} and pass --data-dir DIR (or set ASLORA_DATA_DIR=DIR)"
        ) from None
    return loaded["train"].select_columns(COLUMNS), loaded["validation"].select_columns(COLUMNS)


def split_by_article(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded quarter of the articles for evaluation, the rest for the clients."""
    titles = list(dict.fromkeys(row["title"] for row in rows))
    if len(titles) < 2:
        raise ValueError(f"the SQuAD file has {len(titles)} article(s); splitting it by article needs at least 2")
    order = np.random.default_rng(seed).permutation(len(titles))
    held = {titles[i] for i in order[: max(1, round(EVAL_ARTICLE_SHARE * len(titles)))]}
    return [r for r in rows if r["title"] not in held], [r for r in rows if r["title"] in held]


def _with_article_groups(split: datasets.Dataset) -> datasets.Dataset:
    """Add `label`: the article's position (first appearance) modulo ARTICLE_GROUPS."""
    position = {title: i for i, title in enumerate(dict.fromkeys(split["title"]))}
    return split.add_column("label", [position[t] % ARTICLE_GROUPS for t in split["title"]])


def _subset(split: datasets.Dataset, size: int, seed: int) -> datasets.Dataset:
    """`size` examples drawn with the seed; 0 keeps them all."""
    return split.shuffle(seed=seed).select(range(min(size, len(split)))) if size else split


# Encoded windows ---------------------------------------------------------------------------


class QAFeatures(TensorDataset):
    """Windows as tensors (ids, mask, token types, start, end) plus what maps logits to answers.

    `offsets[f, t]` is token t's character span in its context, (-1, -1)
    outside the context; `example[f]` the example window f came from.
    """

    def __init__(
        self,
        tensors: tuple[torch.Tensor, ...],
        offsets: torch.Tensor,
        example: torch.Tensor,
        contexts: list[str],
        golds: list[list[str]],
    ) -> None:
        super().__init__(*tensors)
        self.offsets, self.example, self.contexts, self.golds = offsets, example, contexts, golds


def _answer_tokens(enc: BatchEncoding, feature: int, answers: dict[str, list]) -> tuple[int, int]:
    """Token positions of the first gold answer in this window; (0, 0), the CLS token, if absent."""
    if not answers["text"]:
        return 0, 0
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    offsets = enc["offset_mapping"][feature]
    context = [t for t, s in enumerate(enc.sequence_ids(feature)) if s == 1]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    start = max(t for t in context if offsets[t][0] <= start_char)
    end = min(t for t in context if offsets[t][1] >= end_char)
    return start, end


def _best_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per window: the best span's score, its character start and end, and the no-answer score.

    The best span is the exact maximum of start + end logit over spans inside
    the context of at most MAX_ANSWER_TOKENS tokens (-inf when none fits).
    """
    length = start_logits.shape[1]
    inside = offsets[:, :length, 0] >= 0
    band = torch.ones(length, length, dtype=torch.bool).triu().tril(MAX_ANSWER_TOKENS - 1)
    allowed = inside[:, :, None] & inside[:, None, :] & band
    scores = (start_logits[:, :, None] + end_logits[:, None, :]).masked_fill(~allowed, -torch.inf)
    best, flat = scores.flatten(1).max(dim=1)
    rows = torch.arange(len(flat))
    start_char = offsets[rows, flat // length, 0]
    end_char = offsets[rows, flat % length, 1]
    return best, start_char, end_char, start_logits[:, 0] + end_logits[:, 0]


@dataclass
class SquadTask:
    names: ClassVar[tuple[str, ...]] = ("squad", "squad_v2")  # extractive QA
    sentence_classifier: ClassVar[bool] = False
    """SQuAD v1.1 or v2.0 with its tokenizer and splits."""

    name: str
    train: datasets.Dataset
    eval: datasets.Dataset
    tokenizer: PreTrainedTokenizerBase
    model_path: str
    max_length: int
    stride: int
    metric: str = "f1"
    extra_evals: dict[str, datasets.Dataset] = field(default_factory=dict)

    @property
    def with_negatives(self) -> bool:
        """v2.0: a question may have no answer in its context."""
        return self.name == "squad_v2"

    @classmethod
    def load(cls, config: ExperimentConfig) -> SquadTask:
        task, data = config.data.task, config.data
        if data.doc_stride >= config.model.max_length:
            raise ValueError(
                f"data.doc_stride={data.doc_stride} must be below model.max_length={config.model.max_length} "
                "(it counts the tokens consecutive windows share); lower it or raise max_length"
            )
        root = data_root(config)
        if root is not None:
            train, dev = _load_local(root / LOCAL[task], config.seed)
            log.warning(
                "%s: no training set offline; the local dev file is split by article into %d client "
                "examples and %d evaluation examples: scores are not official dev scores",
                task, len(train), len(dev),
            )
        else:
            train, dev = _load_hub(task)
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, config.model.name)
        if not tokenizer.is_fast:
            raise ValueError(
                f"model.name={config.model.name!r} has no fast tokenizer, which QA needs for character "
                "offsets; use a model that ships tokenizer.json"
            )
        return cls(
            name=task,
            train=_subset(_with_article_groups(train), data.train_subset, config.seed),
            eval=_subset(_with_article_groups(dev), data.eval_subset, config.seed),
            tokenizer=tokenizer,
            model_path=resolve_model(config.model.name),
            max_length=config.model.max_length,
            stride=data.doc_stride,
        )

    def _tokenize(self, split: datasets.Dataset) -> BatchEncoding:
        try:
            return self.tokenizer(
                [q.lstrip() for q in split["question"]],  # some questions start with many spaces
                list(split["context"]),
                truncation="only_second",
                max_length=self.max_length,
                stride=self.stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
                padding="max_length",
            )
        except Exception as exc:  # noqa: BLE001 - the tokenizer says too little about why
            raise ValueError(
                f"cannot cut the contexts into windows of model.max_length={self.max_length} tokens sharing "
                f"data.doc_stride={self.stride} ({exc}); a question leaves too little room: raise "
                "model.max_length or lower data.doc_stride"
            ) from None

    def encode(self, split: datasets.Dataset) -> QAFeatures:
        """One row per window: padded inputs and the answer's token positions (CLS when outside)."""
        enc = self._tokenize(split)
        example = enc["overflow_to_sample_mapping"]
        answers = split["answers"]
        positions = torch.tensor([_answer_tokens(enc, f, answers[i]) for f, i in enumerate(example)])
        offsets = torch.tensor(
            [
                [span if s == 1 else (-1, -1) for span, s in zip(spans, enc.sequence_ids(f), strict=True)]
                for f, spans in enumerate(enc["offset_mapping"])
            ]
        )
        token_types = enc.get("token_type_ids") or [[0] * self.max_length] * len(example)
        tensors = (
            torch.tensor(enc["input_ids"]),
            torch.tensor(enc["attention_mask"]),
            torch.tensor(token_types),
            positions[:, 0],
            positions[:, 1],
        )
        golds = [a["text"] for a in answers]
        return QAFeatures(tensors, offsets, torch.tensor(example), list(split["context"]), golds)

    def encode_train(self, split: datasets.Dataset) -> TensorDataset:
        """One window per example, so that a row, DP-SGD's unit, is an example: the first window
        holding the answer, else the first (labelled at CLS)."""
        features = self.encode(split)
        starts = features.tensors[3]
        chosen: dict[int, int] = {}
        for window, example in enumerate(features.example.tolist()):
            if example not in chosen or (starts[chosen[example]] == 0 and starts[window] != 0):
                chosen[example] = window
        keep = torch.tensor(sorted(chosen.values()))
        return TensorDataset(*(t[keep] for t in features.tensors))

    def build_model(self, config: ExperimentConfig) -> PeftModel:
        """The pretrained encoder with a fresh span head (qa_outputs) and LoRA adapters, seeded."""
        torch.manual_seed(config.seed)
        base = load_pretrained(AutoModelForQuestionAnswering.from_pretrained, self.model_path)
        return with_lora(base, config.lora, config.model.dropout, TaskType.QUESTION_ANS, "the span head of BERT-like models is qa_outputs")

    def _inputs(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model inputs with padding trimmed to the longest window in the batch.

        Answer positions lie in the context or at CLS, never in the padding cut.
        """
        input_ids, attention_mask, token_types, start, end = batch
        length = max(1, int(attention_mask.sum(dim=1).max()))
        inputs = {
            "input_ids": input_ids[:, :length],
            "attention_mask": attention_mask[:, :length],
            "start_positions": start,
            "end_positions": end,
        }
        if "token_type_ids" in self.tokenizer.model_input_names:
            inputs["token_type_ids"] = token_types[:, :length]
        return inputs

    def loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The model's loss: the mean of the start and end cross-entropies over the batch."""
        return module(**self._inputs(batch)).loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: TensorDataset, batch_size: int) -> dict[str, float]:
        """F1 and exact match in percent over the examples of `data`, and the mean loss per window."""
        if not isinstance(data, QAFeatures):
            raise TypeError(f"SQuAD evaluates what SquadTask.encode returns, not a {type(data).__name__}")
        model.eval()
        n = len(data)
        best, null = torch.empty(n), torch.empty(n)
        start_char, end_char = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
        loss_sum = 0.0
        order = torch.argsort(data.tensors[1].sum(dim=1))  # little padding per batch
        for first in range(0, n, batch_size):
            rows = order[first : first + batch_size]
            out = model(**self._inputs(data[rows]))
            loss_sum += float(out.loss) * len(rows)
            best[rows], start_char[rows], end_char[rows], null[rows] = _best_spans(
                out.start_logits, out.end_logits, data.offsets[rows]
            )
        model.train()
        exact, f1 = self._score(data, best, start_char, end_char, null)
        return {"f1": 100 * f1, "exact": 100 * exact, "eval_loss": loss_sum / n}

    def _score(
        self, data: QAFeatures, best: torch.Tensor, start_char: torch.Tensor, end_char: torch.Tensor, null: torch.Tensor
    ) -> tuple[float, float]:
        """Mean (EM, F1) over examples: each answers with its best span over all its windows.

        v2.0 answers nothing when the lowest no-answer score of its windows is
        at least the best span's (threshold 0), as the reference post-processing does.
        """
        scores, nulls = best.tolist(), null.tolist()
        chosen: dict[int, int] = {}  # example -> its window with the best span
        lowest_null: dict[int, float] = {}
        for f, e in enumerate(data.example.tolist()):
            if e not in chosen or scores[f] > scores[chosen[e]]:
                chosen[e] = f
            lowest_null[e] = min(lowest_null.get(e, math.inf), nulls[f])
        totals = np.zeros(2)
        for e, f in chosen.items():
            answered = scores[f] > -math.inf and (not self.with_negatives or scores[f] > lowest_null[e])
            text = data.contexts[e][int(start_char[f]) : int(end_char[f])] if answered else ""
            totals += squad_scores(text, data.golds[e])
        examples = len(data.contexts)
        return float(totals[0] / examples), float(totals[1] / examples)
