"""Shared test helpers. Tests run on CPU with tiny configs."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "official_A"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def official_a() -> Path:
    """The parity fixture. A user's clone has no ../shared: skip there; CI (MAGE_REQUIRE_FIXTURES=1) must run it."""
    if not (FIXTURES / "expected.pt").is_file():
        if os.environ.get("MAGE_REQUIRE_FIXTURES"):
            pytest.fail(f"parity fixture missing at {FIXTURES} but MAGE_REQUIRE_FIXTURES is set")
        pytest.skip(
            f"parity fixture not found at {FIXTURES} (it ships in the project's shared/ folder, not in a clone)"
        )
    return FIXTURES


@pytest.fixture(scope="session")
def expected(official_a):
    return torch.load(official_a / "expected.pt", map_location="cpu", weights_only=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
