"""Engine tests run tiny models: one intra-op thread each.

Tiny matrices gain nothing from a second thread, and on a loaded shared machine OpenMP's
spin-waiting for a busy core turns millisecond forwards into second-long ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
