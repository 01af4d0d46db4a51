"""The sentence embedding a classifier reads: the one the pretrained encoder was trained to give.

all-MiniLM-L6-v2 is a sentence-transformers model trained for MEAN pooling
(its `1_Pooling/config.json` says so); BERT's pooler on top of it was never
trained for that model, and a linear probe on the pooler output is 13 points
worse than on the mean (0.659 against 0.792 on SST-2). `model.pooling`:

- `auto`: the pooling the model declares (sentence-transformers'
  `1_Pooling/config.json`), else the architecture's own classification head
  (`AutoModelForSequenceClassification`, e.g. BERT's pooler, RoBERTa's head);
- `mean`, `cls`: the masked mean of the last hidden states, or the first token;
- `pooler`: the encoder's trained pooler output (dense + tanh over CLS).

Sentence pairs (`model.pair_encoding`): a sentence-transformers model is a
bi-encoder, trained to embed each sentence on its own; its classification
objective (SoftmaxLoss) reads `[u, v, |u - v|, u * v]`. A linear probe on frozen
MiniLM features of 9,000 QNLI training pairs scores 0.72 on 1,000 held-out
pairs that way, 0.57 with the pair run through the encoder as one sequence
(benchmarks/RESULTS.md): 'separate' builds that head.

`model.normalize` scales each embedding to unit length first, the last module
of all-MiniLM-L6-v2's own pipeline (`modules.json`: Transformer, Pooling,
Normalize). Under DP it decides whether the bi-encoder head learns: a private
federation of heads on frozen QNLI features reaches 0.69-0.71 from unit-length
u and v and 0.50-0.65 from the raw means (benchmarks/dp_head_probe.py), whose
norms vary from sentence to sentence and drown the `u * v` features in noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from aslora.config import ConfigError
from aslora.pretrained import load_pretrained

POOLINGS = ("auto", "cls", "mean", "pooler")
# sentence-transformers' pooling flags, and the modes of ours they mean.
_DECLARED = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def declared_pooling(model_path: str) -> str | None:
    """The pooling a local sentence-transformers model declares ('mean' or 'cls'), else None.

    A declared mode this module does not implement (max, weighted mean, ...)
    is an error, not a silent fallback to another embedding.
    """
    file = Path(model_path) / "1_Pooling" / "config.json"
    if not file.is_file():
        return None
    flags = {key for key, on in json.loads(file.read_text()).items() if key.startswith("pooling_mode") and on}
    modes = {_DECLARED[k] for k in flags if k in _DECLARED}
    if len(modes) != 1 or len(flags) != 1:
        raise ConfigError(
            f"model.pooling='auto': {file} declares {sorted(flags)}; only one of mean or cls tokens is "
            "supported: set model.pooling to 'mean', 'cls' or 'pooler'"
        )
    return modes.pop()


def resolve_pair_encoding(pair_encoding: str, texts: int, pooling: str | None, model_path: str) -> bool:
    """Whether a task of `texts` columns embeds its two sentences apart (model.pair_encoding).

    'auto' does for a model that declares its pooling: a sentence-transformers bi-encoder.
    """
    if texts != 2:
        return False
    if pair_encoding == "separate" and pooling is None:
        raise ConfigError(
            "model.pair_encoding='separate' needs a pooled embedding per sentence, and this model declares no "
            "pooling: set model.pooling to 'mean', 'cls' or 'pooler', or model.pair_encoding = 'joint'"
        )
    if pair_encoding == "auto":
        return pooling is not None and declared_pooling(model_path) is not None
    return pair_encoding == "separate"


def resolve_pooling(pooling: str, model_path: str, dtype: str = "float32") -> str | None:
    """The pooling to build with, or None for the architecture's own head ('auto' without a declaration).

    Checked before any weights load: a model without a pooler cannot provide 'pooler'.
    """
    if pooling == "auto":
        declared = declared_pooling(model_path)
        if declared is None and dtype == "bfloat16":
            raise ConfigError(
                f"model.dtype={dtype!r} needs a pooled classifier, and {model_path} declares no pooling: "
                "set model.pooling to 'mean', 'cls' or 'pooler', or model.dtype = 'float32'"
            )
        return declared
    if pooling == "pooler":
        config = load_pretrained(AutoConfig.from_pretrained, model_path)
        if config.model_type not in _WITH_POOLER:
            raise ConfigError(
                f"model.pooling='pooler': a {config.model_type} encoder has no trained pooler; "
                f"choose one of {', '.join(p for p in POOLINGS if p != 'pooler')}"
            )
    return pooling


# Encoders whose base model has a trained pooler (dense + tanh over the first token).
_WITH_POOLER = ("bert", "roberta", "xlm-roberta", "electra", "albert", "mpnet", "ernie", "camembert")


class PooledClassifier(torch.nn.Module):
    """A pretrained encoder, its pooling and a linear `classifier`: what sentence-transformers trained."""

    def __init__(
        self, encoder: PreTrainedModel, pooling: str, num_labels: int, pairs: bool = False, normalize: bool = False
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.pairs = pairs  # separately embedded sentence pairs: the head reads [u, v, |u - v|, u * v]
        self.normalize = normalize  # unit-length embeddings (sentence-transformers' Normalize)
        self.dropout = torch.nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.0))
        self.classifier = torch.nn.Linear(encoder.config.hidden_size * (4 if pairs else 1), num_labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence embedding the head reads.

        Written out rather than through sentence-transformers' Pooling module,
        whose import path and signature changed in its version 6; the masked
        mean is its `pooling_mode_mean_tokens` exactly.
        """
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling == "pooler":
            pooled = out.pooler_output.float()
        elif self.pooling == "cls":
            pooled = out.last_hidden_state[:, 0].float()
        else:
            hidden = out.last_hidden_state.float()
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        input_ids_b: torch.Tensor | None = None,
        attention_mask_b: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The embedding, or for separate pairs [u, v, |u - v|, u * v].

        The encoder runs once per sentence; each example's per-sample gradient
        (Opacus) is the sum over both passes, so DP-SGD clips the pair as one.
        """
        u = self.embed(input_ids, attention_mask)
        if not self.pairs:
            return u
        if input_ids_b is None or attention_mask_b is None:
            raise ValueError("a pair classifier needs input_ids_b and attention_mask_b (the second sentence)")
        v = self.embed(input_ids_b, attention_mask_b)
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        input_ids_b: torch.Tensor | None = None,
        attention_mask_b: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        logits = self.classifier(self.dropout(self.features(input_ids, attention_mask, input_ids_b, attention_mask_b)))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def pooled_classifier(
    model_path: str, pooling: str, num_labels: int, dtype: str = "float32", pairs: bool = False,
    normalize: bool = False,
) -> PooledClassifier:
    """The encoder at `model_path` (without its own head) under `pooling`, and a fresh head (seed first);
    `pairs`: the head of separately embedded sentence pairs; `normalize`: unit-length embeddings.

    With dtype 'bfloat16' the frozen encoder's weights are bfloat16 (on CPUs with AMX
    about 2.5x faster per DP-SGD example) while the head stays float32, and so do the
    LoRA factors that PEFT adds (its autocast_adapter_dtype): per-sample gradients,
    clipping and noise are float32, only the frozen forward pass is rounded.
    """
    encoder = load_pretrained(AutoModel.from_pretrained, model_path)
    if pooling != "pooler" and getattr(encoder, "pooler", None) is not None:
        # An unused pooler would be a module with no gradient: Opacus fails on it
        # mid-round if lora.head_modules names it, so it goes, and naming it fails first.
        encoder.pooler = None
    model = PooledClassifier(encoder, pooling, num_labels, pairs, normalize)
    model.encoder.to(getattr(torch, dtype))
    return model
