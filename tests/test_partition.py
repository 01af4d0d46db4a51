"""Client shards from flwr-datasets partitioners: sizes and label skew."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from aslora.config import DataConfig
from aslora.partition import partition


@pytest.fixture(scope="module")
def labelled() -> datasets.Dataset:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=4000).tolist()
    return datasets.Dataset.from_dict({"sentence": [f"text {i}" for i in range(4000)], "label": labels})


def _positive_share(shards: list[datasets.Dataset]) -> np.ndarray:
    return np.array([np.mean(s["label"]) for s in shards])


def test_iid_shards_cover_the_data_evenly(labelled: datasets.Dataset) -> None:
    shards = partition(labelled, DataConfig(partition="iid", num_clients=8), seed=0, min_size=16)
    sizes = [len(s) for s in shards]
    assert sum(sizes) == len(labelled)
    assert max(sizes) - min(sizes) <= 1
    ids = [t for s in shards for t in s["sentence"]]
    assert len(set(ids)) == len(labelled)  # disjoint


def test_dirichlet_shards_are_disjoint_skewed_and_large_enough(labelled: datasets.Dataset) -> None:
    config = DataConfig(partition="dirichlet", dirichlet_alpha=0.5, num_clients=8)
    shards = partition(labelled, config, seed=0, min_size=32)
    sizes = [len(s) for s in shards]
    assert sum(sizes) == len(labelled)
    assert min(sizes) >= 32
    assert len({t for s in shards for t in s["sentence"]}) == len(labelled)
    iid = partition(labelled, DataConfig(partition="iid", num_clients=8), seed=0, min_size=32)
    # Label skew: the positive share varies across clients far more than under IID.
    assert _positive_share(shards).std() > 5 * _positive_share(iid).std()
    assert _positive_share(shards).std() > 0.1


def test_smaller_alpha_means_more_skew(labelled: datasets.Dataset) -> None:
    def skew(alpha: float) -> float:
        config = DataConfig(partition="dirichlet", dirichlet_alpha=alpha, num_clients=4)
        return float(_positive_share(partition(labelled, config, seed=1, min_size=8)).std())

    assert skew(0.3) > skew(100.0)


def test_partitions_are_reproducible(labelled: datasets.Dataset) -> None:
    config = DataConfig(partition="dirichlet", num_clients=5)
    first = partition(labelled, config, seed=3, min_size=8)
    again = partition(labelled, config, seed=3, min_size=8)
    assert [s["sentence"] for s in first] == [s["sentence"] for s in again]


def test_too_little_data_is_a_clear_error(labelled: datasets.Dataset) -> None:
    with pytest.raises(ValueError, match="fewer clients.*more data"):
        partition(labelled.select(range(100)), DataConfig(num_clients=10), seed=0, min_size=32)
