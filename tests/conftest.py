"""Test set-up: eight fake CPU devices, configured before JAX initialises; fixtures shared by the test files."""

import os

# Must happen before the first `import jax` anywhere in the test session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests run what the commands run: the package's XLA CPU flag, applied before JAX starts as a command does.
from anemia_jax.utils import xla_cpu  # noqa: E402 -- imports no JAX

xla_cpu.applied[:] = xla_cpu.apply()

import logging  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """`../shared` beside the checkout; tests that need it skip when it is absent."""
    return SHARED


@pytest.fixture
def warnings_log():
    """The messages of the warnings logged through absl during the test."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    absl_logging.get_absl_logger().addHandler(handler)
    yield lines
    absl_logging.get_absl_logger().removeHandler(handler)
