"""Probe: calibration teacher = nominal self vs mean over K chips (softmax ensemble) vs mean-scaled nominal."""
import sys, json, time, argparse, math
import torch, torch.nn.functional as F
import correctnet as cn
from correctnet.checkpoint import load_checkpoint
from correctnet.data import load_dataset
from correctnet.calibration import CalibrationConfig, ChipCalibrator, calibration_images, teacher_logits
from correctnet.evaluate import first_samples
from correctnet.analog import chip
from correctnet.seeding import Stream, chip_seed
p = argparse.ArgumentParser(); p.add_argument("ckpt"); p.add_argument("--chips", type=int, default=10)
p.add_argument("--teachers", nargs="+", default=["self", "ens8", "ens32"]); a = p.parse_args()
torch.set_num_threads(1)
model, meta = load_checkpoint(a.ckpt)
cfg = meta["config"]; seed = cfg["seed"]
data = load_dataset(cfg["dataset"]["name"], None, val_fraction=cfg["dataset"].get("val_fraction", 0.1), seed=seed)
test = first_samples(data.test, 2000)
imgs = calibration_images(data.train, 1000, seed)
cc = CalibrationConfig(steps=60, n_images=1000, lr=0.01, seed=seed, start="trained")
for t in a.teachers:
    t0 = time.perf_counter()
    cal = ChipCalibrator(model, imgs, cc, teacher=model)
    if t.startswith("ens"):
        k = int(t[3:])
        with torch.no_grad():
            model.eval()
            probs = 0
            for i in range(k):
                with chip(model, chip_seed(Stream.CALIBRATION, 12345, i)):
                    probs = probs + F.softmax(model(imgs), 1)
            cal.teacher = torch.log(probs / k)
    tacc = None
    r = cn.monte_carlo(model, test, n_chips=a.chips, seed=0, progress=False, calibrate=cal)
    print(json.dumps({"ckpt": a.ckpt, "teacher": t, "cal_mean": r.mean, "cal_p5": r.p5, "s": time.perf_counter() - t0}), flush=True)
