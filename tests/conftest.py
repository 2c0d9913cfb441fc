"""Test-session settings.

pytest-xdist runs 2 workers on CI's 2 cores; letting torch use 2 threads in each worker (and in
the processes they spawn) oversubscribes the cores and makes small matmuls ~100x slower. One
thread per process is the fastest setting for this suite's tiny models.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts with one intra-op thread (whatever an earlier test set) and leaves the
    count as it found it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
