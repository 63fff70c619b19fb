"""Prototype 4: joint compensators + calibration against the vanilla reference as teacher."""
import sys, time, json, argparse
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the checkout
import correctnet as cn
from correctnet.data import load_dataset
from correctnet.training import TrainConfig, train
from correctnet.compensation import attach_compensation, overhead
from correctnet.calibration import CalibrationConfig, ChipCalibrator, calibration_images
from correctnet.evaluate import first_samples
p = argparse.ArgumentParser()
p.add_argument("--model", default="lenet5"); p.add_argument("--dataset", default="fashion_mnist")
p.add_argument("--sigma", type=float, default=0.5); p.add_argument("--epochs", type=int, default=3)
p.add_argument("--chips", type=int, default=20); p.add_argument("--seed", type=int, default=0)
p.add_argument("--arms", nargs="+", required=True)  # kind:layer=rank,...
p.add_argument("--cal-lrs", type=float, nargs="+", default=[0.01, 0.003]); p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--cal-steps", type=int, default=60); p.add_argument("--cal-images", type=int, default=1000)
a = p.parse_args()
torch.set_num_threads(1)
data = load_dataset(a.dataset, None, val_fraction=0.1, seed=a.seed)
test = first_samples(data.test, 2000)
var = cn.LogNormal(a.sigma)
kw = {"width": 0.25} if a.model.startswith("vgg") else {}
torch.manual_seed(a.seed)
ref = cn.analogize(cn.build_model(a.model, data.input_shape, data.num_classes, **kw), var, inplace=True)
train(ref, data.train, None, TrainConfig(epochs=a.epochs, lr=a.lr, seed=a.seed), progress=False)
print(json.dumps({"arm": "reference", "clean": cn.clean_accuracy(ref, test)}), flush=True)
imgs = calibration_images(data.train, a.cal_images, a.seed)
for arm in a.arms:
    kind, spec = arm.split(":")
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    m = cn.analogize(cn.build_model(a.model, data.input_shape, data.num_classes, **kw), var, inplace=True)
    pl = {k: int(v) for k, v in (x.split("=") for x in spec.split(","))}
    attach_compensation(m, pl, kind=kind, affine=True, seed=a.seed)
    cost = overhead(m, data.test.tensors[0][:1])["total"]
    train(m, data.train, None, TrainConfig(epochs=a.epochs, lr=a.lr, noise_aware=True, seed=a.seed), progress=False)
    mc = cn.monte_carlo(m, test, n_chips=a.chips, seed=0, progress=False)
    print(json.dumps({"arm": arm, "clean": cn.clean_accuracy(m, test), "mean": mc.mean, "p5": mc.p5,
                      "params_pct": cost["params_pct"], "macs_pct": cost["macs_pct"], "s": time.perf_counter() - t0}), flush=True)
    for lr in a.cal_lrs:
        for teacher in ("reference", "self"):
            t0 = time.perf_counter()
            calib = ChipCalibrator(m, imgs, CalibrationConfig(steps=a.cal_steps, n_images=a.cal_images, lr=lr, seed=a.seed, start="trained"),
                                   teacher=ref if teacher == "reference" else m)
            r = cn.monte_carlo(m, test, n_chips=a.chips, seed=0, progress=False, calibrate=calib)
            print(json.dumps({"arm": arm, "cal_lr": lr, "teacher": teacher, "cal_mean": r.mean, "cal_p5": r.p5, "s": time.perf_counter() - t0}), flush=True)
