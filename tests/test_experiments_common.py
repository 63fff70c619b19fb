"""experiments/common.py: the provenance every benchmark result records, and no machine paths in results."""
import argparse
import json
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))  # what `python experiments/<script>.py` does for the scripts

import common  # noqa: E402


def test_record_has_command_commit_versions_machine_and_threads():
    p = argparse.ArgumentParser()
    common.add_base_args(p)
    common.add_run_args(p)
    args = p.parse_args(["--out", str(ROOT / "experiments" / "results" / "x.json"), "--threads", "1"])
    rec = common.record(args)
    assert set(rec) >= {"command", "args", "git", "versions", "machine", "threads"}
    assert set(rec["versions"]) == {"correctnet", "torch", "numpy", "python"}
    assert set(rec["git"]) == {"commit", "dirty"} and len(rec["git"]["commit"]) == 40
    assert rec["machine"]["cpu_count"] >= 1 and rec["threads"] >= 1
    assert rec["args"]["out"] == "experiments/results/x.json"  # relative to the checkout
    text = json.dumps(rec)
    assert str(ROOT) not in text and socket.gethostname() not in text.replace(platform.platform(), "")
    assert "commit" in common.machine_line(rec)


def test_committed_results_name_no_machine_path():
    # the places this machine keeps files: the checkout's parent, the home and the temporary directory
    here = {str(ROOT.parent) + os.sep, str(Path.home()) + os.sep, tempfile.gettempdir() + os.sep}
    files = [p for d in ("experiments/results", "experiments/recipe_explore/results") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in (".md", ".json", ".jsonl", ".log", ".csv")]
    bad = [str(p.relative_to(ROOT)) for p in files if any(s in p.read_text(errors="replace") for s in here)]
    assert files and not bad, bad


def test_compare_methods_counts_a_correctnet_seed_whose_search_chose_no_layer(tmp_path):
    """A correctnet run that deployed no compensator is that seed's chip-agnostic result (zero overhead), not a
    missing seed: dropping it would keep only the seeds compensation helped."""
    import compare_methods

    def run(i: int, method: str, seed: int, stages: dict) -> None:
        d = tmp_path / str(i)
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({
            "config": {"method": {"name": method}, "seed": seed}, "variation": {"sigma": 0.8}, "model": "lenet5",
            "original_accuracy": 0.9, "stages": stages}))

    def stage(mean: float, params: float | None = None) -> dict:
        s = {"clean_accuracy": 0.8, "mc": {"mean": mean, "p5": mean - 0.02, "min": mean - 0.05, "n_chips": 100}}
        if params is not None:
            s["overhead"] = {"total": {"params_pct": params, "macs_pct": params / 10}}
        return s

    base = stage(0.5)
    run(0, "correctnet", 0, {"baseline": base, "compensated": stage(0.82, 0.9)})
    run(1, "correctnet", 1, {"baseline": base, "noise_aware": stage(0.78)})  # the search chose no layer
    run(2, "noise_aware", 0, {"noise_aware": stage(0.80)})
    run(3, "noise_aware", 1, {"noise_aware": stage(0.80)})
    rows = compare_methods.summarize(compare_methods.load([tmp_path]))
    cn_row = next(r for r in rows if r.get("tier") == "CorrectNet chip-agnostic")
    assert cn_row["seeds"] == [0, 1] and abs(cn_row["mean"] - 0.80) < 1e-12
    assert abs(cn_row["params_pct"] - 0.45) < 1e-12  # the no-layer seed counts at zero overhead
    diff = next(r for r in rows if "diff" in r)
    assert abs(diff["diff"]) < 1e-12
