"""The accountant cross-checked against Google's dp-accounting (RDP and PLD)."""

from __future__ import annotations

import logging

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from aslora.privacy import RDP_ORDERS, restore_accountant, spent_epsilon

CASES = [(0.6, 0.005, 20), (1.1, 0.01, 300), (2.0, 0.2, 50)]
DELTA = 1e-5


def _event(sigma: float, q: float, steps: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    # dp-accounting logs every fractional order it cannot evaluate at large q.
    logging.getLogger().setLevel(logging.ERROR)


@pytest.mark.parametrize(("sigma", "q", "steps"), CASES)
def test_rdp_epsilon_matches_dp_accounting(sigma: float, q: float, steps: int) -> None:
    ours = spent_epsilon(restore_accountant("rdp", [(sigma, q, steps // 2), (sigma, q, steps - steps // 2)]), DELTA)
    google = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))
    google.compose(_event(sigma, q, steps))
    assert ours == pytest.approx(google.get_epsilon(DELTA), rel=1e-3)


@pytest.mark.parametrize(("sigma", "q", "steps"), CASES)
def test_prv_epsilon_matches_dp_accounting_pld(sigma: float, q: float, steps: int) -> None:
    """Both are numerical, near-tight accountants; RDP is an upper bound on both."""
    ours_prv = spent_epsilon(restore_accountant("prv", [(sigma, q, steps)]), DELTA)
    ours_rdp = spent_epsilon(restore_accountant("rdp", [(sigma, q, steps)]), DELTA)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(_event(sigma, q, steps))
    google_pld = pld.get_epsilon(DELTA)
    assert ours_prv == pytest.approx(google_pld, rel=0.03)
    assert google_pld <= ours_rdp
