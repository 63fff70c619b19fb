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


def _lenet_and_images(n: int = 300):
    torch.manual_seed(1)
    model = cn.analogize(cn.build_model("lenet5", (1, 8, 8), 10), cn.LogNormal(0.5))
    x = torch.randn(n, 1, 8, 8)  # one input channel: the layout case that needs forcing
    with torch.no_grad():  # labels = the clean model's own predictions, so accuracies are far from 0 and 1
        y = model(x).argmax(1)
    return model, (x, y)


@pytest.mark.parametrize("make", [_lenet_and_images, trained_mlp])
def test_fast_path_gives_the_simple_methods_predictions_chip_by_chip(make):
    model, (x, y) = make()
    nominal_before = {k: v.clone() for k, v in model.state_dict().items()}
    mc = cn.monte_carlo(model, (x, y), n_chips=4, seed=2, batch_size=128, progress=False)
    plain_layout = cn.monte_carlo(model, (x, y), n_chips=4, seed=2, batch_size=128, progress=False, channels_last=False)
    simple = []
    for s in mc.chip_seeds:
        copy = cn.chip_copy(model, s).eval()  # copy the model, write the chip's weights, forward
        with torch.no_grad():
            pred_simple = copy(x).argmax(1)
            with cn.chip(model, s):
                batches = cn.evaluate.eval_batches((x, y), 128, model)
                pred_fast = torch.cat([model(b).argmax(1) for b, _ in batches])
        assert torch.equal(pred_fast, pred_simple)
        simple.append((pred_simple == y).sum().item() / len(y))
    assert mc.accuracies == simple == plain_layout.accuracies
    assert len(set(mc.accuracies)) > 1  # the chips differ
    assert all(torch.equal(v, nominal_before[k]) for k, v in model.state_dict().items())
    assert all(layer.analog_mode == "off" for layer in cn.analog_layers(model).values())


def test_chip_copy_holds_the_chips_weights_and_refuses_what_no_copy_can_hold():
    model, _ = trained_mlp()
    s = chip_seed(Stream.EVAL, 0, 0)
    copy = cn.chip_copy(model, s)
    assert not cn.analog_layers(copy)
    with cn.chip(model, s):
        for name, layer in cn.analog_layers(model).items():
            assert torch.equal(copy.get_submodule(name).weight, layer.analog_weight())
    assert not torch.equal(copy.net[1].weight, model.net[1].weight)
    with pytest.raises(cn.ConfigError, match="no analog layers"):
        cn.chip_copy(copy, s)
    cn.set_variation(model, cn.make_variation("rram", 1.0, read_noise=0.01))
    with pytest.raises(cn.ConfigError, match="per-read noise"):
        cn.chip_copy(model, s)


def test_channels_last_layout_changes_values_nowhere():
    x = torch.randn(5, 1, 6, 6)
    cl = cn.evaluate.to_channels_last(x)
    assert torch.equal(cl, x) and cl.stride() == (36, 1, 6, 1)
    assert cn.evaluate.to_channels_last(torch.randn(3, 4)).stride() == (4, 1)
