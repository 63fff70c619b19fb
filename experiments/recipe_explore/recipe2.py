"""Prototype 2: KD from the vanilla reference during noise-aware training (+ joint compensators)."""
import sys, time, json, math, argparse
import torch, torch.nn.functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the checkout
import correctnet as cn
from correctnet.data import load_dataset
from correctnet.training import TrainConfig, train, make_optimizer, make_schedule
from correctnet.compensation import attach_compensation, overhead, bypass
from correctnet.calibration import CalibrationConfig, ChipCalibrator, calibration_images, distillation_loss
from correctnet.evaluate import first_samples, iter_batches
from correctnet.seeding import Stream, chip_seed
p = argparse.ArgumentParser()
p.add_argument("--model", default="lenet5"); p.add_argument("--dataset", default="fashion_mnist")
p.add_argument("--sigma", type=float, default=0.5); p.add_argument("--epochs", type=int, default=3)
p.add_argument("--chips", type=int, default=20); p.add_argument("--seed", type=int, default=0)
p.add_argument("--arms", nargs="+", default=["na_kd", "joint_out4_kd"])
p.add_argument("--train-sigma", type=float, default=None)
p.add_argument("--alpha", type=float, default=0.7); p.add_argument("--T", type=float, default=2.0)
p.add_argument("--cal", action="store_true"); p.add_argument("--lr", type=float, default=2e-3)
a = p.parse_args()
torch.set_num_threads(1)
data = load_dataset(a.dataset, None, val_fraction=0.1, seed=a.seed)
test = first_samples(data.test, 2000)
var = cn.LogNormal(a.sigma)
tvar = cn.LogNormal(a.train_sigma if a.train_sigma is not None else a.sigma)
kw = {"width": 0.25} if a.model.startswith("vgg") else {}
torch.manual_seed(a.seed)
teacher = cn.analogize(cn.build_model(a.model, data.input_shape, data.num_classes, **kw), var, inplace=True)
t0 = time.perf_counter()
train(teacher, data.train, None, TrainConfig(epochs=a.epochs, lr=a.lr, seed=a.seed), progress=False)
teacher.eval()
mc = cn.monte_carlo(teacher, test, n_chips=a.chips, seed=0, progress=False)
print(json.dumps({"arm": "vanilla", "clean": cn.clean_accuracy(teacher, test), "mean": mc.mean, "p5": mc.p5, "s": time.perf_counter() - t0}), flush=True)

def kd_train(m, cfg, alpha, T):
    dev = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    n = len(data.train.tensors[0]); spe = math.ceil(n / cfg.batch_size)
    opt = make_optimizer([q for q in m.parameters() if q.requires_grad], cfg)
    sched = make_schedule(opt, cfg, cfg.epochs * spe)
    with cn.noise_aware(m, chip_seed(Stream.TRAIN, cfg.seed, 0)):
        for ep in range(cfg.epochs):
            m.train()
            for x, y in iter_batches(data.train, cfg.batch_size, dev, generator=shuffle):
                with torch.no_grad(), cn.nominal(teacher):
                    tl = teacher(x)
                out = m(x)
                loss = alpha * distillation_loss(out, tl, T) + (1 - alpha) * F.cross_entropy(out, y)
                opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    m.eval()

for arm in a.arms:
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    m = cn.analogize(cn.build_model(a.model, data.input_shape, data.num_classes, **kw), tvar, inplace=True)
    cost = None
    if arm.startswith("joint"):
        kind = "output" if "_out" in arm else "input"
        rank = int(arm.split("_")[1][-1])
        attach_compensation(m, "all", kind=kind, rank=rank, affine=True, seed=a.seed)
        cost = overhead(m, data.test.tensors[0][:1])["total"]
    cfg = TrainConfig(epochs=a.epochs, lr=a.lr, noise_aware=True, seed=a.seed)
    if arm.endswith("_kd"):
        kd_train(m, cfg, a.alpha, a.T)
    else:
        train(m, data.train, None, cfg, progress=False)
    cn.set_variation(m, var)
    mc = cn.monte_carlo(m, test, n_chips=a.chips, seed=0, progress=False)
    res = {"arm": arm, "clean": cn.clean_accuracy(m, test), "mean": mc.mean, "p5": mc.p5, "min": mc.min,
           "params_pct": cost and cost["params_pct"], "s": time.perf_counter() - t0}
    print(json.dumps(res), flush=True)
    if a.cal and cost is not None:
        imgs = calibration_images(data.train, 1000, a.seed)
        calib = ChipCalibrator(m, imgs, CalibrationConfig(steps=60, n_images=1000, lr=0.01, seed=a.seed, start="trained"))
        res["cal_mean"] = cn.monte_carlo(m, test, n_chips=a.chips, seed=0, progress=False, calibrate=calib).mean
    print(json.dumps(res), flush=True)
