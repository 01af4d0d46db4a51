"""Property-based fuzzing (hypothesis) of configs, config files and the privacy command: every bad
value is refused in one line naming its key, never a traceback or a hang."""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from aslora.cli import app
from aslora.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bad_inputs

NUMERIC = bad_inputs.numeric_keys()
WRONG = st.one_of(
    st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.sampled_from([math.nan, math.inf, -math.inf]), st.none(),
)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(NUMERIC), value=WRONG)
def test_a_wrong_type_or_non_finite_number_is_a_config_error_naming_its_key(key: tuple[str, str], value: object) -> None:
    section, name = key
    raw = load_config(REPO / "tests" / "base.toml").model_dump(mode="json")
    (raw[section] if section else raw)[name] = value
    if value is None and name in ("epsilon", "noise_multiplier"):
        raw["privacy"]["epsilon"] = raw["privacy"]["noise_multiplier"] = None  # neither: refused too
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert f"{section}.{name}" in str(err.value) if section else name in str(err.value)


FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e-300, 1e300]))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    target=st.sampled_from(["--epsilon", "--sigma"]), value=FLOATS,
    rate=st.one_of(FLOATS, st.floats(1e-4, 1.0)), steps=st.integers(-3, 10_000), delta=st.one_of(FLOATS, st.just(1e-5)),
)
@example(target="--epsilon", value=1e300, rate=5e-324, steps=1, delta=1e-5)  # Opacus's search divided by sigma^2 = 0
def test_the_privacy_command_answers_or_refuses_in_one_line(
    target: str, value: float, rate: float, steps: int, delta: float
) -> None:
    """Whatever the numbers: exit 0 with an answer, or exit 2 with one line; never a traceback or a hang."""
    args = ["privacy", target, repr(value), "--sample-rate", repr(rate), "--steps", str(steps), "--delta", repr(delta)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (0, 2), (args, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output and 1 <= len(lines) <= 3, (args, result.output)
    if result.exit_code == 2:
        assert result.output.startswith("error:"), result.output


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(NUMERIC), value=st.sampled_from(bad_inputs.WRONG_VALUES))
def test_a_mutated_config_file_fails_before_training_naming_its_key(key: tuple[str, str], value: str, data_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outcome = bad_inputs.attempt(bad_inputs.mutation(data_dir, *key, value), Path(tmp))
    assert outcome.clear, (key, value, outcome.exit_code, outcome.message)
