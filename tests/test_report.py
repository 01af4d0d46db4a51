"""The comparison table's figures."""

from __future__ import annotations

from rich.console import Console

from aslora.report import comparison_table, rounds_to_reach


def _summary(method: str, curve: dict[int, float], metric: str = "accuracy") -> dict:
    return {
        "method": method,
        "metric_by_round": {str(r): {metric: v} for r, v in curve.items()},
        "final_metrics": {metric: curve[max(curve)]},
        "epsilon": 2.5,
        "rounds_completed": max(curve) + 1,
        "mean_agg_error": 0.0,
        "total_agg_time_s": 0.01,
        "mean_bytes_up_per_client": 2048.0,
        "mean_bytes_down_per_client": 4096.0,
        "wall_time_s": 3.0,
    }


def test_rounds_to_reach_either_direction() -> None:
    assert rounds_to_reach(_summary("a", {0: 0.5, 2: 0.7, 4: 0.8}), "accuracy", 0.7) == 3
    assert rounds_to_reach(_summary("a", {0: 0.5, 2: 0.6}), "accuracy", 0.7) is None
    errors = _summary("a", {0: 0.9, 1: 0.3, 2: 0.1}, metric="rel_error")
    assert rounds_to_reach(errors, "rel_error", 0.2) == 3


def test_table_reports_mean_spread_and_reach() -> None:
    runs = [_summary("ffa", {0: 0.5, 1: 0.8}), _summary("ffa", {0: 0.5, 1: 0.6}), _summary("aslora", {0: 0.7, 1: 0.9})]
    console = Console(width=200, record=True)
    console.print(comparison_table(runs, "accuracy", target=0.7))
    text = console.export_text()
    assert "0.7000 ± 0.1414" in text  # ffa: mean and sample std of 0.8 and 0.6
    assert "2.0 (1/2)" in text and "1.0 (1/1)" in text
    assert "2 KiB" in text and "4 KiB" in text
