"""Linear probes on frozen MiniLM features of sentence pairs: how much of a pair task the encoder's
embedding already carries, as one joint sequence or as a bi-encoder reads it.

    python benchmarks/feature_probe.py --task QNLI [--train 9000] [--data-dir ../shared/data]

Trains a logistic regression on `--train` pairs of glue/train_subsets/<TASK>/train.json and scores it
on the 1,000 pairs of dev.json beside it (held out from the same official training set; never the
official dev set), for four features of the frozen encoder (mean pooling, as MiniLM declares):
- `joint`: the pair tokenised as one sequence (model.pair_encoding 'joint');
- `separate`: [u, v, |u - v|, u * v] of the two sentences embedded apart ('separate', SoftmaxLoss's);
- `separate, unit`: the same from unit-length u and v;
- `both`: the unit features and the joint one side by side.
No DP, no fine-tuning: an upper reference for what a head alone can read (README, pair_encoding).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from data_dir import add_data_dir
from sklearn.linear_model import LogisticRegression
from transformers import AutoTokenizer

from aslora.pretrained import load_pretrained, resolve_model
from aslora.tasks.pooling import pooled_classifier


def read(path: Path, limit: int | None = None) -> tuple[list[str], list[str], list[str]]:
    rows = list(json.loads(path.read_text()).values())[:limit]
    return [r["text_a"] for r in rows], [r["text_b"] for r in rows], [r["label"] for r in rows]


@torch.no_grad()
def embed(model, tokenizer, first: list[str], second: list[str] | None = None, batch: int = 64) -> np.ndarray:
    """Mean-pooled embeddings of `first` (with `second`: of each pair as one sequence)."""
    out = []
    for i in range(0, len(first), batch):
        enc = tokenizer(
            first[i : i + batch], second[i : i + batch] if second else None,
            truncation=True, max_length=128, padding=True, return_tensors="pt",
        )
        out.append(model.embed(enc["input_ids"], enc["attention_mask"]).numpy())
    return np.concatenate(out)


def bi_encoder(u: np.ndarray, v: np.ndarray, unit: bool) -> np.ndarray:
    if unit:
        u, v = u / np.linalg.norm(u, axis=1, keepdims=True), v / np.linalg.norm(v, axis=1, keepdims=True)
    return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="QNLI", choices=["QNLI", "MNLI", "QQP"])
    parser.add_argument("--train", type=int, default=9000)
    add_data_dir(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.data_dir) / "glue" / "train_subsets" / args.task
    train, held_out = read(folder / "train.json", args.train), read(folder / "dev.json")
    labels = sorted(set(train[2]))
    y_train = np.array([labels.index(label) for label in train[2]])
    y_held = np.array([labels.index(label) for label in held_out[2]])
    print(f"{args.task}: {len(y_train)} training pairs, {len(y_held)} held out; majority class "
          f"{np.bincount(y_held).max() / len(y_held):.3f}", flush=True)
    path = resolve_model("minilm")
    model = pooled_classifier(path, "mean", len(labels)).eval()
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path)
    started = time.perf_counter()
    joint = [embed(model, tokenizer, a, b) for a, b, _ in (train, held_out)]
    u = [embed(model, tokenizer, a) for a, _, _ in (train, held_out)]
    v = [embed(model, tokenizer, b) for _, b, _ in (train, held_out)]
    print(f"embedding: {time.perf_counter() - started:.0f} s", flush=True)
    features = {
        "joint": joint,
        "separate": [bi_encoder(u[i], v[i], unit=False) for i in (0, 1)],
        "separate, unit": [bi_encoder(u[i], v[i], unit=True) for i in (0, 1)],
        "both": [np.concatenate([bi_encoder(u[i], v[i], unit=True), joint[i]], axis=1) for i in (0, 1)],
    }
    for name, (x_train, x_held) in features.items():
        for c in (0.1, 1.0):
            probe = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
            print(f"{name:16s} C={c}: held-out accuracy {probe.score(x_held, y_held):.3f}", flush=True)


if __name__ == "__main__":
    main()
