"""Actor tests run torch single-threaded: tiny models gain nothing from a second thread, and on a
shared 2-core machine the OpenMP threads of several processes only get in each other's way."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
