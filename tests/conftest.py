import pytest
import torch

import correctnet.conf  # noqa: F401  (registers the config groups' schemas: tests compose the groups directly)


@pytest.fixture(autouse=True)
def _threads():
    # one thread, as `threads=auto` in the subprocesses the tests start: equal thread counts give bit-identical
    # numbers across processes, and on a busy machine one thread is many times faster than two (README)
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    """The placement tests' network: LeNet-5 on digits, analog (log-normal 0.5), 3 epochs of plain training."""
    import correctnet as cn
    from correctnet.data import load_dataset
    from correctnet.training import TrainConfig, train

    torch.manual_seed(0)
    data = load_dataset("digits", val_fraction=0.2, seed=0)
    model = cn.build_model("lenet5", data.input_shape, data.num_classes)
    model = cn.analogize(model, cn.make_variation("lognormal", sigma=0.5), inplace=True)
    train(model, data.train, data.val, TrainConfig(epochs=3, seed=0), progress=False)
    return model, data
