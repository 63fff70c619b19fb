"""The CUDA path (``pytest -m gpu``; skipped where there is no GPU): mixed precision in training and evaluation.

The other GPU tests sit beside their CPU twins (``test_batched_chips.py``, ``test_chips_per_step.py``).
"""
import pytest
import torch
from torch import nn

import correctnet as cn
from correctnet.training import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _net() -> nn.Module:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    return cn.analogize(body, cn.make_variation("rram", sigma=0.5, read_noise=0.01)).cuda()


def _data(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_gpu_mixed_precision_training_keeps_float32_parameters_and_learns(precision: str) -> None:
    net = _net()
    x, y = _data()
    before = cn.monte_carlo(net, (x, y), n_chips=2, progress=False).mean
    history = train(net, (x, y), None, TrainConfig(epochs=4, batch_size=32, noise_aware=True, precision=precision),
                    progress=False)
    losses = [h["train_loss"] for h in history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in net.parameters())
    assert cn.monte_carlo(net, (x, y), n_chips=2, progress=False).mean > before


def test_gpu_bfloat16_evaluation_is_the_float32_evaluation_up_to_round_off() -> None:
    net = _net()
    x, _ = _data(512)
    with torch.no_grad():
        y = net(x.cuda()).argmax(1).cpu()
    a32 = cn.monte_carlo(net, (x, y), n_chips=4, progress=False, chips_per_pass=2).accuracies
    a16 = cn.monte_carlo(net, (x, y), n_chips=4, progress=False, chips_per_pass=2, precision="bfloat16").accuracies
    assert max(abs(a - b) for a, b in zip(a16, a32)) <= 0.02
