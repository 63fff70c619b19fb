"""Data-parallel training on torch.distributed: 2 CPU processes (gloo), against one process and against itself."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import correctnet as cn
from correctnet.seeding import Stream, chip_seed
from correctnet.calibration import CompensationConfig, train_compensation
from correctnet.compensation import attach_compensation, compensation_parameters
from correctnet.training import TrainConfig, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _net(batchnorm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(12, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model(case: dict[str, Any]) -> nn.Module:
    net = _net(case["batchnorm"])
    return cn.analogize(net, cn.make_variation("lognormal", sigma=0.5)) if case["analog"] else net


def _compensated() -> nn.Module:
    model = cn.analogize(_net(False), cn.make_variation("lognormal", sigma=0.5))
    attach_compensation(model, "all", rank=2, seed=4)
    return model


def _worker(rank: int, world: int, init: str, out: str, case: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        if case.get("compensation"):
            model = _compensated()
            res = train_compensation(model, _data(case["n"]), CompensationConfig(**case["cfg"]), progress=False)
            history = res.history
        else:
            model = _model(case)
            history = train(model, _data(case["n"]), None, TrainConfig(**case["cfg"]), progress=False)
        torch.save({"state": model.state_dict(), "history": history}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp: Path, case: dict[str, Any], world: int = 2) -> list[dict[str, Any]]:
    tmp.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, f"file://{tmp / 'init'}", str(tmp), case), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def _metrics(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


NOISE_AWARE = {"batchnorm": True, "analog": True, "n": 196,
               "cfg": dict(epochs=2, batch_size=64, noise_aware=True, chips_per_step=2, seed=3)}


def test_two_ranks_end_with_the_same_model_and_a_rerun_reproduces_every_bit(tmp_path: Path) -> None:
    first = _run(tmp_path / "a", NOISE_AWARE)
    again = _run(tmp_path / "b", NOISE_AWARE)
    _assert_same_state(first[0]["state"], first[1]["state"])  # parameters and the averaged BatchNorm statistics
    for r in range(2):
        _assert_same_state(first[r]["state"], again[r]["state"])
    assert _metrics(first[0]["history"]) == _metrics(first[1]["history"]) == _metrics(again[0]["history"])
    h = first[0]["history"][-1]
    assert 0 < h["train_accuracy"] <= 1 and h["train_loss"] > 0
    nominal = _model(NOISE_AWARE).state_dict()
    assert not torch.equal(first[0]["state"]["0.weight"], nominal["0.weight"])  # it trained


def test_plain_training_on_two_ranks_matches_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    # 193 samples in global batches of 64: the last batch has one sample, so rank 1's share of it is empty
    case = {"batchnorm": False, "analog": False, "n": 193, "cfg": dict(epochs=2, batch_size=64, seed=0)}
    ranks = _run(tmp_path, case)
    one = _model(case)
    history = train(one, _data(case["n"]), None, TrainConfig(**case["cfg"]), progress=False)
    for k, v in one.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][k], v, atol=1e-5, rtol=1e-4)
    for a, b in zip(_metrics(ranks[0]["history"]), _metrics(history)):
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_rank_r_trains_on_its_share_through_chips_of_training_stream_r(tmp_path: Path) -> None:
    """One SGD step on one global batch of 10: the update is the share-weighted mean of two independent plain
    backward passes, rank r's on samples [5r, 5r + 5) of the shuffled batch through its chip of stream r."""
    lr = 0.1
    case = {"batchnorm": False, "analog": True, "n": 10,
            "cfg": dict(epochs=1, batch_size=10, noise_aware=True, optimizer="sgd", momentum=0.0, lr=lr,
                        schedule="none", seed=5)}
    ranks = _run(tmp_path, case)
    x, y = _data(case["n"])
    order = torch.randperm(case["n"], generator=torch.Generator().manual_seed(5))
    x, y = x[order], y[order]
    start = _model(case)
    grads: list[dict[str, torch.Tensor]] = []
    for r in range(2):
        m = copy.deepcopy(start)
        with cn.noise_aware(m, chip_seed(Stream.TRAIN, 5, r)):
            m.train()
            F.cross_entropy(m(x[5 * r:5 * r + 5]), y[5 * r:5 * r + 5]).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, p in start.named_parameters():
        expected = p.detach() - lr * (grads[0][n] + grads[1][n]) / 2
        torch.testing.assert_close(ranks[0]["state"][n], expected, atol=1e-6, rtol=1e-5)
        assert not torch.equal(grads[0][n], grads[1][n])  # different samples and chips


def test_compensation_training_on_two_ranks_is_the_mean_of_each_ranks_share_on_its_chips(tmp_path: Path) -> None:
    """Two Adam steps on global batches of 11 (shares of 6 and 5): the compensators equal an independent replay
    with plain backward passes, rank r's on its share of the shuffled batch through its chip (index r * 2**40 +
    step of the compensation stream), the gradients weighted by the shares; both ranks end the same."""
    cfg = dict(steps=2, batch_size=11, chips_per_step=1, lr=0.01, distill=0.0, seed=6)
    ranks = _run(tmp_path, {"compensation": True, "n": 11, "cfg": cfg})
    _assert_same_state(ranks[0]["state"], ranks[1]["state"])
    assert _metrics(ranks[0]["history"]) == _metrics(ranks[1]["history"])
    x, y = _data(11)
    ref = _compensated()
    params = compensation_parameters(ref)
    opt = torch.optim.Adam(params, lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2)
    shuffle = torch.Generator().manual_seed(6)
    ref.eval()
    for step in range(2):
        order = torch.randperm(11, generator=shuffle)
        total = {id(p): torch.zeros_like(p) for p in params}
        for r, share in enumerate(order.tensor_split(2)):
            m = copy.deepcopy(ref)
            with cn.chip(m, chip_seed(Stream.COMPENSATION, 6, (r << 40) + step)):
                F.cross_entropy(m(x[share]), y[share]).backward()
            for p, q in zip(params, compensation_parameters(m)):
                total[id(p)] += q.grad * len(share) / 11
        for p in params:
            p.grad = total[id(p)]
        opt.step()
        sched.step()
    got = ranks[0]["state"]
    state = ref.state_dict()
    names = [n for n, p in ref.named_parameters() if any(p is q for q in params)]
    assert names
    for n in names:
        torch.testing.assert_close(got[n], state[n], atol=1e-6, rtol=1e-5)
    assert not torch.equal(got[names[0]], _compensated().state_dict()[names[0]])  # it trained
