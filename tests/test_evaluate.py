import numpy as np
import pytest
import torch
from torch import nn

import correctnet as cn
from correctnet.seeding import Stream, chip_seed, stream_of


def trained_mlp():
    torch.manual_seed(0)
    x = torch.randn(300, 1, 4, 4)
    y = (x.flatten(1).sum(1) > 0).long()
    model = cn.build_model("mlp", (1, 4, 4), 2, hidden=[32])
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return cn.analogize(model, cn.LogNormal(0.8)), (x, y)


def test_same_seed_same_numbers_and_statistics():
    model, data = trained_mlp()
    a = cn.monte_carlo(model, data, n_chips=20, seed=3, progress=False)
    b = cn.monte_carlo(model, data, n_chips=20, seed=3, progress=False)
    c = cn.monte_carlo(model, data, n_chips=20, seed=4, progress=False)
    assert a.accuracies == b.accuracies
    assert a.accuracies != c.accuracies
    acc = np.array(a.accuracies)
    d = a.to_dict()
    assert d["n_chips"] == 20 and d["seed"] == 3
    assert d["mean"] == pytest.approx(acc.mean()) and d["std"] == pytest.approx(acc.std(ddof=1))
    assert d["min"] == acc.min() and d["p5"] == pytest.approx(np.percentile(acc, 5))
    assert all(0 <= v <= 1 for v in acc)
    # variation hurts: chips are below the clean model on average
    assert a.mean < cn.clean_accuracy(model, data)


def test_evaluation_chips_and_training_chips_are_disjoint():
    ev = {chip_seed(Stream.EVAL, s, i) for s in range(5) for i in range(200)}
    tr = {chip_seed(Stream.TRAIN, s, i) for s in range(5) for i in range(200)}
    assert not ev & tr
    assert {stream_of(x) for x in ev} == {Stream.EVAL} and {stream_of(x) for x in tr} == {Stream.TRAIN}


def test_bad_chip_count():
    model, data = trained_mlp()
    with pytest.raises(ValueError, match="n_chips"):
        cn.monte_carlo(model, data, n_chips=0)
