"""Suite-wide settings."""

import torch

# One torch thread for the whole suite: on a shared two-core CPU a second OpenMP thread mostly
# spins at barriers (5-25x slower training steps measured here).
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server():
    """One throw-away PostgreSQL cluster for the session (tests take a fresh database each)."""
    from node_harness import Postgres

    if not Postgres.available:
        pytest.skip("PostgreSQL server binaries not installed (make debs installs postgresql)")
    server = Postgres()
    yield server
    server.close()
