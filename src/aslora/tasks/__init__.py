"""Tasks: data loading, model and head, loss and metric, one file per family.

Each task class declares the names it answers to (`names`) and whether it is
a sentence classifier (`sentence_classifier`); `REGISTRY` is what the config
and the commands read.
"""

from __future__ import annotations

from aslora.config import ExperimentConfig
from aslora.tasks.common import DataNotFoundError, Task
from aslora.tasks.generation import GenerationTask
from aslora.tasks.glue import GlueTask
from aslora.tasks.squad import SquadTask
from aslora.tasks.synthetic import SyntheticTask
from aslora.tasks.vision import VisionTask

REGISTRY: dict[str, type] = {
    name: cls for cls in (GlueTask, SquadTask, VisionTask, GenerationTask, SyntheticTask) for name in cls.names
}


def load_task(config: ExperimentConfig) -> Task:
    """The task named by `config.data.task`, its data loaded."""
    return REGISTRY[config.data.task].load(config)


__all__ = ["REGISTRY", "DataNotFoundError", "GlueTask", "SyntheticTask", "Task", "load_task"]
