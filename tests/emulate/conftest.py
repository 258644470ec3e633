"""The emulated arm64 runtime for these tests (prepared by scripts/setup.sh); skipped without it."""

import pytest


@pytest.fixture(scope="session")
def arm64_runtime():
    from edgecomp.emulate import load_runtime
    from edgecomp.errors import EmulationError

    try:
        return load_runtime()
    except EmulationError as e:
        pytest.skip(f"no emulated arm64 runtime: {e}")
