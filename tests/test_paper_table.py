"""The paper table rebuilds from its per-run rows: intervals, the authors' metric, pairs by seed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import paper_table
from sound_run import require_sound

from aslora.config import ConfigError, ExperimentConfig


def _row(variant: str, seed: int, curve: list[float], dtype: str = "float32") -> dict:
    summary = {
        "metric_by_round": {str(r): {"accuracy": a} for r, a in enumerate(curve)},
        "final_metrics": {"accuracy": curve[-1]},
        "epsilon": 2.99, "delta": 1e-5, "noise_multiplier": 1.2, "rounds_completed": len(curve), "wall_time_s": 60.0,
    }
    return paper_table.row_of("sst2", 3.0, variant, seed, summary, "accuracy", "abc", dtype)


def test_the_table_names_rows_carried_from_an_earlier_config() -> None:
    """A control's run whose resolved config became a method's own counts as that method's, and says so."""
    carried = {"variant": "fedavg head2x", "regime": "old", "configs_at": "283e1be"}
    rows = [_row("fedavg", s, [0.6, 0.8]) | {"carried_from": carried} for s in range(2)] + [_row("ffa", 0, [0.6, 0.7])]
    assert paper_table._carried(rows) == [
        "Carried: 2 rows of `fedavg head2x` run with the configs at 283e1be, now `fedavg` (the same resolved config)."
    ]
    assert paper_table._carried(rows[2:]) == []


def test_a_row_keeps_final_best_and_rounds_to_target() -> None:
    row = _row("aslora", 0, [0.6, 0.8, 0.77])
    assert (row["final"], row["best"], row["rounds_to_target"]) == (0.77, 0.8, 2)
    assert _row("ffa", 0, [0.6, 0.7])["rounds_to_target"] is None


def test_the_table_counts_the_encoder_dtype_its_rows_ran_in() -> None:
    """model.dtype 'auto' resolves by machine: a suite whose rows mix bfloat16 and float32 says so."""
    rows = [_row("aslora", 0, [0.8], "bfloat16"), _row("ffa", 0, [0.8]), _row("ffa", 1, [0.8])]
    del rows[2]["encoder_dtype"]  # a row written before the field existed
    assert paper_table._dtypes(rows) == "bfloat16 1, float32 1, not recorded 1"


def test_interval_is_students_t() -> None:
    mean, half = paper_table.interval([0.80, 0.82, 0.84])
    assert mean == pytest.approx(0.82)
    assert half == pytest.approx(4.302653 * 0.02 / 3**0.5, rel=1e-5)


def test_block_pairs_aslora_with_each_baseline_over_the_seeds_both_finished(tmp_path: Path) -> None:
    rows = [_row("aslora", s, [0.5, 0.80 + 0.01 * s]) for s in range(3)]
    rows += [_row("ffa", s, [0.5, 0.78 + 0.01 * s]) for s in range(3)]
    rows += [_row("rolora", s, [0.5, 0.79]) for s in range(2)]  # seed 2 missing: the table uses seeds 0, 1
    text = "\n".join(paper_table.block("sst2", 3.0, rows, tmp_path, "test"))
    assert "Seeds [0, 1]" in text
    assert "| ffa | +0.0200 | [+0.0200, +0.0200] | 3 of 3 seeds ([0, 1, 2]) |" in text  # the pair has 3
    assert "| rolora | +0.0150 | [-0.0485, +0.0785] | 2 of 2 seeds ([0, 1]) |" in text
    assert (tmp_path / "test-sst2-eps3.png").is_file()


def test_the_two_step_suite_pairs_the_secant_rule_with_each_other_variant(tmp_path: Path) -> None:
    """cpu-2step was built for the secant score: its table pairs that rule, not the spec's, against the rest."""
    rows = [_row("aslora secant", s, [0.5, 0.81]) for s in range(2)] + [_row("ffa", s, [0.5, 0.80]) for s in range(2)]
    text = "\n".join(paper_table.block("sst2", 3.0, rows, tmp_path, "cpu-2step"))
    assert "`aslora secant` minus each other variant" in text
    assert "| ffa | +0.0100 |" in text and "| aslora secant | +" not in text


def test_a_regime_fingerprint_changes_with_a_setting_not_with_a_comment_or_a_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of an edited config must not be averaged with (or skip) the rows run before the edit."""
    (tmp_path / "configs" / "paper").mkdir(parents=True)
    config = tmp_path / "configs" / "paper" / "sst2.toml"
    original = (paper_table.REPO / "configs" / "paper" / "sst2.toml").read_text().split("\n[per_method")[0]
    monkeypatch.setattr(paper_table, "REPO", tmp_path)
    config.write_text(original)
    before = paper_table.regime("cpu", "sst2", "ffa")
    config.write_text("# a new comment\n" + original.replace('method = "aslora"', 'method = "ffa"').replace("seed = 0", "seed = 4"))
    assert paper_table.regime("cpu", "sst2", "ffa") == before  # per-cell settings and comments are not the regime
    config.write_text(original.replace("[data]\n", "[data]\nprobe_size = 0\n"))
    assert paper_table.regime("cpu", "sst2", "ffa") == before  # a default spelled out (or a new key) is no change
    config.write_text(original.replace("batch_size = 128", "batch_size = 256"))
    assert paper_table.regime("cpu", "sst2", "ffa") != before
    # A method's own per_method table is its regime alone: the other methods' rows stand.
    config.write_text(original)
    fedavg, aslora = paper_table.regime("cpu", "sst2", "fedavg"), paper_table.regime("cpu", "sst2", "aslora tied")
    config.write_text(original + "\n[per_method.fedavg]\noptim.lr = 0.5\n")
    assert paper_table.regime("cpu", "sst2", "fedavg") != fedavg
    assert paper_table.regime("cpu", "sst2", "aslora tied") == aslora == paper_table.regime("cpu", "sst2", "aslora")
    row = _row("aslora", 0, [0.6, 0.8])
    assert paper_table._key(row) != paper_table._key(row | {"regime": before})


def test_a_variant_the_regime_cannot_run_fails_before_training_or_is_left_out(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """configs/paper/sst2.toml takes one local step per round; 'aslora secant' needs two."""
    with pytest.raises(ConfigError, match=r"(?s)aslora secant.*local_steps to 2 or more"):
        paper_table.run("cpu", ["sst2"], [3.0], [0], ["aslora secant"], str(data_dir))
    paper_table.run("cpu", ["sst2"], [3.0], [0], ["aslora secant"], str(data_dir), explicit=False)  # trains nothing
    assert "left out: sst2 'aslora secant'" in capsys.readouterr().out


def test_the_earlier_regime_and_its_two_step_suite_regroup_the_cpu_config_s_examples() -> None:
    """cpu-b512 takes cpu-fixed's examples in a quarter of the steps (30 of expected batch 512), each
    iterate scored; cpu-2step takes those 30 steps as 15 rounds x 2 and differs from it in nothing else."""
    cpu, b512 = paper_table.task_config("cpu-fixed", "sst2", "ffa"), paper_table.task_config("cpu-b512", "sst2", "ffa")
    two = paper_table.task_config("cpu-2step", "sst2", "ffa")
    examples = lambda c: c.federation.rounds * c.federation.local_steps * c.optim.batch_size
    assert (b512.federation.rounds, b512.optim.batch_size, b512.federation.ema_decay) == (30, 512, 0.0)
    assert examples(b512) == examples(cpu) == 120 * 128
    assert (two.federation.rounds, two.federation.local_steps) == (15, 2) and examples(two) == examples(b512)
    assert two.with_overrides({"federation.rounds": 30, "federation.local_steps": 1}) == b512
    restored = {"optim.batch_size": 128, "federation.rounds": 120, "federation.eval_every": 10, "federation.ema_decay": 0.9}
    assert b512.with_overrides(restored) == cpu
    assert "`optim.batch_size = 512`" in paper_table._overridden("cpu-b512") and paper_table._overridden("cpu") == ""


def test_the_cosine_suite_is_the_cpu_config_with_a_scheduled_lr() -> None:
    """cpu-cosine differs from cpu in the schedule alone, and its rows get their own regime fingerprint."""
    cpu, cosine = paper_table.task_config("cpu", "sst2", "ffa"), paper_table.task_config("cpu-cosine", "sst2", "ffa")
    assert cosine.optim.lr_schedule == "cosine" and cosine.with_overrides({"optim.lr_schedule": "constant"}) == cpu
    assert paper_table.regime("cpu-cosine", "sst2", "ffa") != paper_table.regime("cpu", "sst2", "ffa")


def test_the_float32_suite_is_the_cpu_config_with_its_encoder_in_float32() -> None:
    """cpu-f32 pins what `auto` leaves to the machine, and nothing else; its rows get their own fingerprint."""
    cpu, f32 = paper_table.task_config("cpu", "sst2", "aslora"), paper_table.task_config("cpu-f32", "sst2", "aslora")
    assert cpu.model.dtype == "auto" and f32.model.dtype == "float32"
    assert f32.with_overrides({"model.dtype": "auto"}) == cpu
    assert paper_table.regime("cpu-f32", "sst2", "aslora") != paper_table.regime("cpu", "sst2", "aslora")


def test_the_fixed_suite_is_the_cpu_config_with_the_smallest_client_setting_sigma() -> None:
    """SST-2's file samples every client at one rate; cpu-fixed differs from it in that alone, keeps
    each method's own table, and its rows get their own regime fingerprint."""
    cpu, fixed = (paper_table.task_config(s, "sst2", "aslora") for s in ("cpu", "cpu-fixed"))
    assert cpu.optim.batch_scaling == "by_size" and fixed.optim.batch_scaling == "fixed"
    assert fixed.with_overrides({"optim.batch_scaling": "by_size"}) == cpu
    assert paper_table.regime("cpu-fixed", "sst2", "aslora") != paper_table.regime("cpu", "sst2", "aslora")


def test_the_cpu_suite_averages_every_global_model_but_fedsa_s() -> None:
    """SST-2's regime scores the average of the rounds' models; cpu-b128 is cpu-fixed without it.
    FedSA, judged by its clients' own models, has no global model to average: its table turns it off."""
    cpu, b128 = paper_table.task_config("cpu-fixed", "sst2", "rolora"), paper_table.task_config("cpu-b128", "sst2", "rolora")
    assert cpu.federation.ema_decay == 0.9 and cpu.with_overrides({"federation.ema_decay": 0.0}) == b128
    for suite in ("cpu", "cpu-fixed"):  # the method's own table still applies
        assert paper_table.task_config(suite, "sst2", "fedsa").federation.ema_decay == 0.0
    with pytest.raises(ConfigError, match="clients' own models"):
        paper_table.task_config("cpu", "sst2", "fedsa", {"federation.ema_decay": 0.9})


def test_cells_run_the_named_seeds_in_the_order_given() -> None:
    """`--seed 1 --seed 0` runs the seed a question hangs on first; each cell keeps its own folder."""
    seeds = [seed for *_, seed, _folder in paper_table.cells("cpu-2step", ["sst2"], [3.0], [1, 0], ["ffa", "rolora"])]
    assert seeds == [1, 1, 0, 0]
    folders = [folder.name for *_, folder in paper_table.cells("cpu-2step", ["sst2"], [3.0], [1, 0], ["ffa"])]
    assert folders == ["ffa-s1", "ffa-s0"]


def test_a_run_with_rejected_updates_records_no_row(tiny_config) -> None:
    """A run whose server rejected updates (a client that raised) must not stand in a table at its
    start's accuracy; simulated faults (federation.dropout) are the exception."""
    with pytest.raises(SystemExit, match="rejected 12 client updates.*no row is recorded"):
        require_sound({"rejected_updates": 12}, tiny_config)
    require_sound({"rejected_updates": 0}, tiny_config)
    require_sound({"rejected_updates": 3}, tiny_config.with_overrides({"federation.dropout": 0.2}))


def test_without_the_spec_rule_the_pairs_take_the_aslora_variant_that_ran_and_show_the_early_gap(tmp_path: Path) -> None:
    """QNLI's `cpu` grid ran the secant rule only: the pairs are taken against it, and the early
    column pairs the first evaluated round (the faster-convergence claim)."""
    rows = [_row("aslora secant", s, [0.60 + 0.01 * s, 0.70]) for s in range(3)]
    rows += [_row("ffa", s, [0.57 + 0.01 * s, 0.70 + 0.01 * s]) for s in range(3)]
    text = "\n".join(paper_table.block("qnli", 3.0, rows, tmp_path, "cpu"))
    assert "`aslora secant` minus each other variant" in text and "first evaluated round (1)" in text
    assert "| ffa | -0.0100 | [-0.0348, +0.0148] | 0 of 3 seeds ([0, 1, 2]) | +0.0300 | [+0.0300, +0.0300] |" in text


def _step_sizes(config: ExperimentConfig) -> tuple[float, float, float]:
    """The lr of A, B and the head."""
    lr = config.optim.lr
    return lr * config.optim.a_lr_scale, lr, lr * config.optim.head_lr_scale


@pytest.mark.parametrize("task", ["qnli", "mnli"])
def test_the_lr_controls_step_every_parameter_alike_in_each_method_only_the_rule_differs(task: str) -> None:
    """FedAvg's control moves only its head's lr, to the one-factor methods'; AS-LoRA's and FFA-LoRA's
    then take the very same lr for A, B and the head."""
    controls = {v: paper_table.task_config("cpu", task, o["method"], o) for v, o in paper_table.LR_CONTROLS.items()}
    fedavg, aslora = (paper_table.task_config("cpu", task, m) for m in ("fedavg", "aslora"))
    assert controls["fedavg head2x"].with_overrides({"optim.head_lr_scale": 1.0}) == fedavg
    assert _step_sizes(controls["fedavg head2x"])[2] == _step_sizes(aslora)[2] > _step_sizes(fedavg)[2]
    assert {_step_sizes(c) for c in controls.values()} == {_step_sizes(controls["fedavg head2x"])}


def test_sst2_steps_every_method_at_the_lr_controls_lrs() -> None:
    """SST-2's config is the equal-lr regime itself: every method and variant steps A, B and the head
    at EQUAL_STEPS (head 4, factors 2), so its lr controls coincide with the methods they control."""
    steps = {}
    for variant, overrides in paper_table.VARIANTS.items():
        try:
            steps[variant] = _step_sizes(paper_table.task_config("cpu", "sst2", overrides["method"], overrides))
        except ConfigError:  # a variant this regime cannot run (the secant score needs two local steps)
            continue
    assert {"fedavg", "aslora", "ffa", "rolora", "fedsvd", "flora", "fedsa", "aslora random"} <= steps.keys()
    equal = _step_sizes(paper_table.task_config("cpu", "sst2", "fedavg", paper_table.EQUAL_STEPS))
    assert set(steps.values()) == {equal} and equal == (2.0, 2.0, 4.0)
    for variant, overrides in paper_table.LR_CONTROLS.items():
        assert paper_table.task_config("cpu", "sst2", overrides["method"], overrides) == paper_table.task_config(
            "cpu", "sst2", overrides["method"]
        ), variant
