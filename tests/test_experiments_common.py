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
