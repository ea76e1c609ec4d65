"""Fixtures for the agent tests: one engine on the embedded default model (its shipped
weights; the tests hold for any weights, since a reply that is not an action falls back
to wait())."""

import pytest
import torch

from agent.policy import shared_engine


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes on a CPU; deselect with -m 'not slow' for a quick run")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """This machine's two cores are shared with other jobs; with torch's default of one
    thread per core an append took 6 s instead of 0.3 s (oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def engine():
    return shared_engine(None, None)  # the one ModelPolicy uses, so policy tests share it
