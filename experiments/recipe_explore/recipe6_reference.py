"""Probe: calibration teacher = vanilla reference (retrained as the run did) vs chip ensemble, same chips."""
import sys, json, time, argparse, copy, dataclasses
import torch, torch.nn.functional as F
import correctnet as cn
from correctnet.checkpoint import load_checkpoint
from correctnet.data import dataset_from_config
from correctnet.models import model_from_config
from correctnet.training import TrainConfig, train
from correctnet.calibration import CalibrationConfig, ChipCalibrator, calibration_images, teacher_logits
from correctnet.evaluate import first_samples, clean_accuracy
from correctnet.analog import chip, analogize
from correctnet.seeding import Stream, chip_seed
p = argparse.ArgumentParser(); p.add_argument("ckpt"); p.add_argument("--chips", type=int, default=10)
p.add_argument("--temps", type=float, nargs="+", default=[1.0]); a = p.parse_args()
torch.set_num_threads(1)
model, meta = load_checkpoint(a.ckpt)
cfg = meta["config"]; seed = cfg["seed"]
data = dataset_from_config(cfg["dataset"], seed=seed)
test = first_samples(data.test, 2000)
torch.manual_seed(seed)
ref, _ = model_from_config(cfg["model"], data.input_shape, data.num_classes)
ref = analogize(ref, cn.LogNormal(cfg["variation"]["sigma"]), inplace=True)
tc = {k: v for k, v in cfg["training"].items() if k in TrainConfig.__dataclass_fields__}
tc["noise_aware"] = False
t0 = time.perf_counter()
train(ref, data.train, data.val, TrainConfig(seed=seed, **tc), progress=False)
print(json.dumps({"reference_clean": clean_accuracy(ref, test), "expected": meta["metrics"]["original_accuracy"], "s": time.perf_counter() - t0}), flush=True)
imgs = calibration_images(data.train, 1000, seed)
with torch.no_grad():
    model.eval(); probs = 0
    for i in range(32):
        with chip(model, chip_seed(Stream.CALIBRATION, 12345, i)):
            probs = probs + F.softmax(model(imgs), 1)
    ens = torch.log(probs / 32)
    tp = 0
    for i in range(32):
        with chip(model, chip_seed(Stream.CALIBRATION, 12345, i)):
            tp = tp + F.softmax(model(test.tensors[0]), 1)
    print(json.dumps({"ens32_test_acc": (tp.argmax(1) == test.tensors[1]).float().mean().item()}), flush=True)
for T in a.temps:
  for t in ("reference", "ens32"):
    t0 = time.perf_counter()
    cal = ChipCalibrator(model, imgs, CalibrationConfig(steps=60, n_images=1000, lr=0.01, seed=seed, start="trained", temperature=T),
                         teacher=ref if t == "reference" else model)
    if t == "ens32":
        cal.teacher = ens
    r = cn.monte_carlo(model, test, n_chips=a.chips, seed=0, progress=False, calibrate=cal)
    print(json.dumps({"ckpt": a.ckpt, "teacher": t, "T": T, "cal_mean": r.mean, "cal_p5": r.p5, "s": time.perf_counter() - t0}), flush=True)
