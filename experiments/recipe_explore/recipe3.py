"""Prototype 3: placements/kinds of jointly trained compensators, train sigma, calibration."""
import sys, time, json, argparse
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
p.add_argument("--arms", nargs="+", required=True)  # kind:tsigma:layer=rank,layer=rank  or na:tsigma
p.add_argument("--cal", action="store_true"); p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--cal-steps", type=int, default=60); p.add_argument("--cal-lr", type=float, default=0.01)
a = p.parse_args()
torch.set_num_threads(1)
data = load_dataset(a.dataset, None, val_fraction=0.1, seed=a.seed)
test = first_samples(data.test, 2000)
var = cn.LogNormal(a.sigma)
kw = {"width": 0.25} if a.model.startswith("vgg") else {}
for arm in a.arms:
    parts = arm.split(":")
    kind, tsig = parts[0], float(parts[1])
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    m = cn.analogize(cn.build_model(a.model, data.input_shape, data.num_classes, **kw), cn.LogNormal(tsig), inplace=True)
    cost = None
    if kind in ("input", "output"):
        pl = {k: int(v) for k, v in (x.split("=") for x in parts[2].split(","))}
        attach_compensation(m, pl, kind=kind, affine=True, seed=a.seed)
        cost = overhead(m, data.test.tensors[0][:1])["total"]
    train(m, data.train, None, TrainConfig(epochs=a.epochs, lr=a.lr, noise_aware=tsig > 0, seed=a.seed), progress=False)
    cn.set_variation(m, var)
    mc = cn.monte_carlo(m, test, n_chips=a.chips, seed=0, progress=False)
    res = {"arm": arm, "clean": cn.clean_accuracy(m, test), "mean": mc.mean, "p5": mc.p5, "min": mc.min,
           "params_pct": cost and cost["params_pct"], "macs_pct": cost and cost["macs_pct"], "s": time.perf_counter() - t0}
    print(json.dumps(res), flush=True)
    if a.cal and cost is not None:
        imgs = calibration_images(data.train, 1000, a.seed)
        for start in ("trained",):
            calib = ChipCalibrator(m, imgs, CalibrationConfig(steps=a.cal_steps, n_images=1000, lr=a.cal_lr, seed=a.seed, start=start))
            r = cn.monte_carlo(m, test, n_chips=a.chips, seed=0, progress=False, calibrate=calib)
            print(json.dumps({"arm": arm, "cal_start": start, "cal_mean": r.mean, "cal_p5": r.p5}), flush=True)
