import pytest
import torch

import correctnet.conf  # noqa: F401  (registers the config groups' schemas: tests compose the groups directly)


@pytest.fixture(autouse=True)
def _threads():
    # one thread, as `threads=auto` in the subprocesses the tests start: equal thread counts give bit-identical
    # numbers across processes, and on a busy machine one thread is many times faster than two (README)
    torch.set_num_threads(1)
