import pytest
from hypothesis import HealthCheck, settings

from tests.harness import close_pools

# Multi-process examples take tens of milliseconds to seconds: no per-example deadline.
settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("default")


@pytest.fixture(scope="session", autouse=True)
def _close_rank_pools():
    yield
    close_pools()
