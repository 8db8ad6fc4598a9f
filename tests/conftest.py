import os

import pytest

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=int(os.environ.get("DUQUANT_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("default")


@pytest.fixture(autouse=True, scope="session")
def _exact_deterministic_kernels():
    """Tests compare paths against references: the PyTorch kernels run in float32 or exact
    integer arithmetic, and by the fixed fallback order instead of timing candidates
    (a test that needs other settings sets them with `kernel_options`)."""
    from interop import kernels

    kernels.set_kernel_options(autotune=False, precision="float32")
    yield
