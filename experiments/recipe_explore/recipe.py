"""Prototype: does training compensators jointly with noise-aware training beat noise-aware alone?"""
import sys, time, json, copy, argparse
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the checkout
import correctnet as cn
from correctnet.data import load_dataset
from correctnet.training import TrainConfig, train
from correctnet.compensation import attach_compensation, overhead, bypass
from correctnet.calibration import CalibrationConfig, ChipCalibrator, calibration_images
from correctnet.evaluate import first_samples
p = argparse.ArgumentParser()
p.add_argument("--model", default="lenet5"); p.add_argument("--dataset", default="fashion_mnist")
p.add_argument("--sigma", type=float, default=0.5); p.add_argument("--epochs", type=int, default=3)
p.add_argument("--chips", type=int, default=20); p.add_argument("--seed", type=int, default=0)
p.add_argument("--arms", nargs="+", default=["na", "joint_out4", "joint_in2"])
p.add_argument("--cal", action="store_true"); p.add_argument("--lr", type=float, default=2e-3)
a = p.parse_args()
torch.set_num_threads(1)
data = load_dataset(a.dataset, None, val_fraction=0.1, seed=a.seed)
test = first_samples(data.test, 2000)
var = cn.LogNormal(a.sigma)
kw = {"width": 0.25} if a.model.startswith("vgg") else {}
for arm in a.arms:
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    m = cn.build_model(a.model, data.input_shape, data.num_classes, **kw)
    m = cn.analogize(m, var, inplace=True)
    cost = None
    if arm.startswith("joint"):
        kind = "output" if "out" in arm else "input"
        rank = int(arm[-1])
        attach_compensation(m, "all", kind=kind, rank=rank, affine=True, seed=a.seed)
        cost = overhead(m, data.test.tensors[0][:1])["total"]
    cfg = TrainConfig(epochs=a.epochs, lr=a.lr, noise_aware=arm != "vanilla", seed=a.seed)
    train(m, data.train, None, cfg, progress=False)
    mc = cn.monte_carlo(m, test, n_chips=a.chips, seed=0, progress=False)
    res = {"arm": arm, "clean": cn.clean_accuracy(m, test), "mean": mc.mean, "p5": mc.to_dict().get("p5"), "min": mc.to_dict().get("min"),
           "params_pct": cost and cost["params_pct"], "s": time.perf_counter() - t0}
    if cost is not None:
        with bypass(m):
            res["bypassed_mean"] = cn.monte_carlo(m, test, n_chips=a.chips, seed=0, progress=False).mean
    if a.cal and cost is not None:
        imgs = calibration_images(data.train, 1000, a.seed)
        calib = ChipCalibrator(m, imgs, CalibrationConfig(steps=60, n_images=1000, lr=0.01, seed=a.seed))
        res["cal_mean"] = cn.monte_carlo(m, test, n_chips=a.chips, seed=0, progress=False, calibrate=calib).mean
    print(json.dumps(res), flush=True)
