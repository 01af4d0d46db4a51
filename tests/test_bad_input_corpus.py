"""Every bad input of the hand-made corpus (benchmarks/bad_inputs.py) gets one clear line; the
hypothesis fuzzing is in test_fuzz.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bad_inputs

CASES = bad_inputs.corpus(REPO.parent / "shared" / "data")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_bad_input_of_the_corpus_gets_one_clear_line(case: bad_inputs.BadInput, data_dir: Path, tmp_path: Path) -> None:
    case = next(c for c in bad_inputs.corpus(data_dir) if c.name == case.name)  # the fixture's data folder
    outcome = bad_inputs.attempt(case, tmp_path)
    assert outcome.clear, (outcome.exit_code, outcome.message)
