"""SST-2 as generation: a decoder LM (LLaMA-class) fine-tuned as a causal LM to write the label.

The model reads "Review: <sentence>\\nSentiment:" and learns to continue with
" positive" or " negative" and EOS; only those answer tokens carry loss.
Offline there are no pretrained LM weights: model.name = "llama-tiny-random"
builds a small randomly initialised Llama with a borrowed tokenizer (the
embedded MiniLM's BERT WordPiece). That run checks the pipeline (per-sample
gradients through Llama blocks, DP, federation, export), not the quality of
any method; name a real checkpoint (a folder or hub id) for results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import datasets
import torch
import torch.nn.functional as F
from peft import PeftModel, TaskType
from torch.utils.data import TensorDataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from aslora.config import ExperimentConfig
from aslora.pretrained import load_pretrained
from aslora.tasks.common import with_lora
from aslora.tasks.glue import GLUE, load_splits

RANDOM_LLAMA = "llama-tiny-random"
SST2 = GLUE["sst2"]
TEXT = SST2.texts[0]
REVIEW = "Review: {}"
CUE = "\nSentiment:"
VERBALISERS = (" negative", " positive")  # indexed by the SST-2 label
IGNORE = -100  # LM label of tokens that carry no loss (prompt, padding)


def load_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    """The LM's own tokenizer; for the random Llama, MiniLM's WordPiece with [SEP] as EOS.

    A missing pad token becomes EOS: padding is told apart by the attention mask.
    """
    if model_name == RANDOM_LLAMA:
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, "minilm")
        tokenizer.eos_token = tokenizer.sep_token
    else:
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model_name)
    if tokenizer.eos_token is None:
        raise ValueError(
            f"the tokenizer of model.name={model_name!r} has no EOS token, so an answer cannot end; "
            "sst2_generation needs a decoder LM (e.g. a Llama checkpoint) or 'llama-tiny-random'"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _continuation(tokenizer: PreTrainedTokenizerBase, before: str, after: str) -> list[int]:
    """The tokens `after` adds to `before`, as the tokenizer splits the joined text.

    Tokenised in context, the cue and the answers match what a whole prompt
    gives; a tokenizer that merges across the seam cannot keep prompt and
    answer apart, and is refused.
    """
    head, whole = _tokens(tokenizer, before), _tokens(tokenizer, before + after)
    if whole[: len(head)] != head or len(whole) == len(head):
        raise ValueError(
            f"the tokenizer merges {after!r} with the text before it ({before!r}), so the answer "
            "tokens cannot be separated from the prompt; use another model.name (tokenizer)"
        )
    return whole[len(head) :]


def _subset(split: datasets.Dataset, size: int, seed: int) -> datasets.Dataset:
    """`size` seeded random examples (all when size is 0)."""
    return split.shuffle(seed=seed).select(range(min(size, len(split)))) if size else split


def answer_log_likelihood(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, lm_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed log-probability of its answer tokens, and how many there are.

    Rows are left padded (`GenerationTask.pack`), so every answer ends in the
    last column: columns of padding only are cut, positions count real tokens
    only, and the LM head runs on the answer positions alone. Over every
    position it would be most of the tiny model's compute, and a
    vocabulary-wide softmax per token on a real one.
    """
    width = int(attention_mask.sum(dim=1).max())
    input_ids, attention_mask, lm_labels = (t[:, -width:] for t in (input_ids, attention_mask, lm_labels))
    keep = int((lm_labels != IGNORE).sum(dim=1).max()) + 1  # the logits at t predict token t + 1
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        logits_to_keep=keep,
        use_cache=False,
    ).logits
    targets = lm_labels[:, -keep + 1 :]
    # float64 (cheap on a few positions): the CPU float32 log-softmax over a 30k vocabulary is off by ~1e-4.
    log_probs = logits[:, :-1].double().transpose(1, 2)
    nll = F.cross_entropy(log_probs, targets, ignore_index=IGNORE, reduction="none")
    return -nll.sum(dim=1), (targets != IGNORE).sum(dim=1)


@dataclass
class GenerationTask:
    names: ClassVar[tuple[str, ...]] = ("sst2_generation",)  # SST-2 as generation with a decoder LM
    sentence_classifier: ClassVar[bool] = False
    """SST-2 prompts for a causal LM, answered by a verbaliser and EOS."""

    train: datasets.Dataset
    eval: datasets.Dataset
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    max_length: int
    cue: list[int]  # the tokens of CUE at the end of a prompt
    answers: tuple[list[int], ...]  # the tokens of each verbaliser after the cue
    name: str = "sst2_generation"
    metric: str = "accuracy"
    extra_evals: dict[str, datasets.Dataset] = field(default_factory=dict)

    @classmethod
    def load(cls, config: ExperimentConfig) -> GenerationTask:
        """SST-2 from the local GLUE files (else the hub) and the LM's tokenizer, checked before training."""
        # Checked and normalised as GLUE's SST-2: texts present, labels 0 (negative) or 1 (positive).
        train, evals = load_splits(config, "sst2")
        dev = evals[""]
        tokenizer = load_tokenizer(config.model.name)
        reference = REVIEW.format("a")
        cue = _continuation(tokenizer, reference, CUE)
        answers = tuple(_continuation(tokenizer, reference + CUE, v) for v in VERBALISERS)
        task = cls(
            train=_subset(train, config.data.train_subset, config.seed),
            eval=_subset(dev, config.data.eval_subset, config.seed),
            tokenizer=tokenizer,
            model_name=config.model.name,
            max_length=config.model.max_length,
            cue=cue,
            answers=answers,
        )
        if task.review_budget < 1:
            raise ValueError(
                f"model.max_length={config.model.max_length} leaves no room for the review: the cue, "
                "the longest answer and EOS take it all; raise model.max_length to at least "
                f"{config.model.max_length - task.review_budget + 1}"
            )
        return task

    @property
    def bos(self) -> list[int]:
        """BOS where the tokenizer has one (Llama's does; BERT's [CLS] is no BOS)."""
        return [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]

    @property
    def review_budget(self) -> int:
        """Tokens left for "Review: <sentence>" once BOS, cue, answer and EOS have their room."""
        return self.max_length - len(self.bos) - len(self.cue) - max(map(len, self.answers)) - 1

    def prompts(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids of every prompt; long reviews are cut, the cue always stays."""
        reviews = self.tokenizer(
            [REVIEW.format(s.strip()) for s in sentences],
            add_special_tokens=False,
            truncation=True,
            max_length=self.review_budget,
        )["input_ids"]
        return [self.bos + review + self.cue for review in reviews]

    def pack(
        self, prompts: Sequence[list[int]], answers: Sequence[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt + answer + EOS per row, left padded: ids, attention mask, LM labels.

        LM labels are IGNORE on prompt and padding, so only the answer and EOS
        carry loss. Left padding puts every answer at the end, where
        `answer_log_likelihood` reads it.
        """
        rows = [p + a + [self.tokenizer.eos_token_id] for p, a in zip(prompts, answers, strict=True)]
        width = max(map(len, rows), default=1)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        lm_labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (row, p) in enumerate(zip(rows, prompts, strict=True)):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
            lm_labels[i, width - len(row) + len(p) :] = torch.tensor(row[len(p) :])
        return ids, mask, lm_labels

    def encode(self, split: datasets.Dataset) -> TensorDataset:
        """Ids, attention mask and LM labels of prompt + gold answer + EOS, then the class label."""
        columns = split[:]  # plain lists, read in one go: iterating a Dataset goes row by row
        labels = columns["label"]
        ids, mask, lm_labels = self.pack(self.prompts(columns[TEXT]), [self.answers[y] for y in labels])
        return TensorDataset(ids, mask, lm_labels, torch.tensor(labels, dtype=torch.long))

    encode_train = encode  # one row per example already

    def build_model(self, config: ExperimentConfig) -> PeftModel:
        """The causal LM (or the seeded random tiny Llama) with LoRA adapters, in float32 for DP-SGD."""
        torch.manual_seed(config.seed)
        if self.model_name == RANDOM_LLAMA:
            shape = LlamaConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=self.max_length,
                pad_token_id=self.tokenizer.pad_token_id,
                bos_token_id=self.tokenizer.bos_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            base = AutoModelForCausalLM.from_config(shape)
        else:
            base = load_pretrained(AutoModelForCausalLM.from_pretrained, self.model_name, dtype=torch.float32)
        head = "sst2_generation trains no head: set lora.head_modules = [] and lora.train_head = false"
        return with_lora(base, config.lora, config.model.dropout, TaskType.CAUSAL_LM, head, "Llama's attention projections are q_proj, k_proj, v_proj, o_proj")

    def loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean over examples of each one's mean answer-token cross-entropy.

        Per example first, then over the batch (not over all tokens pooled):
        one example's gradient must not depend on how long the others are, and
        Opacus's loss_reduction="mean" expects exactly this mean.
        """
        log_likelihood, count = answer_log_likelihood(module, *batch[:3])
        return (-log_likelihood / count).mean()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: TensorDataset, batch_size: int) -> dict[str, float]:
        """Accuracy of the likelier verbaliser, and eval_loss (the training loss of the gold answer).

        Each verbaliser (with EOS) is scored by its exact log-likelihood given
        the prompt, and the higher one is the prediction: the ranking is exact
        (no sampling, no parsing of free text) and cheap (one forward pass per
        verbaliser, the LM head on the answer positions only).
        """
        model.eval()
        correct, loss_sum = 0, 0.0
        order = torch.argsort(data.tensors[1].sum(dim=1))  # similar lengths share a batch: little padding
        for start in range(0, len(data), batch_size):
            ids, mask, lm_labels, labels = data[order[start : start + batch_size]]
            in_prompt = (mask == 1) & (lm_labels == IGNORE)
            prompts = [row[keep].tolist() for row, keep in zip(ids, in_prompt, strict=True)]
            scores, losses = [], []
            for answer in self.answers:
                candidates = self.pack(prompts, [answer] * len(prompts))
                log_likelihood, count = answer_log_likelihood(model, *candidates)
                scores.append(log_likelihood)
                losses.append(-log_likelihood / count)
            correct += int((torch.stack(scores).argmax(dim=0) == labels).sum())
            loss_sum += float(torch.stack(losses).gather(0, labels.unsqueeze(0)).sum())
        model.train()
        return {"accuracy": correct / len(data), "eval_loss": loss_sum / len(data)}
