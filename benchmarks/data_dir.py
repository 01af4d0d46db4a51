"""The benchmarks' --data-dir option, defined once: where the real datasets live on this checkout."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# $ASLORA_DATA_DIR, else the project's shared/ beside the checkout (README: set-up): never the hub
DEFAULT = os.environ.get("ASLORA_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    """--data-dir: the folder holding glue/<TASK>/ and the other local datasets."""
    parser.add_argument("--data-dir", default=DEFAULT, help=f"local datasets (default: {DEFAULT})")
