import os

import pytest
import torch

# Triton kernels run in the CPU interpreter when there is no GPU. The flag is read
# when kernels are defined, so it must be set before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The tests run tiny tensors on small shared CPUs, where OpenMP fork/join dominates and
# more intra-op threads make them many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
