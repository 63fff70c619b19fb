"""tools/doc_check.py: the README's and docs' commands, keys and python blocks (the repository check is slow)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("doc_check", ROOT / "tools" / "doc_check.py")
doc_check = importlib.util.module_from_spec(spec)
sys.modules["doc_check"] = doc_check
spec.loader.exec_module(doc_check)


@pytest.mark.slow
def test_repository_docs_pass():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "doc_check.py")], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "doc-check: ok" in r.stdout


BAD = """# bad

```bash
python -m correctnet.train training.epochz=3
python -m correctnet.train model=resnet999
python -m correctnet.evaluate checkpoint=PATH evaluation.n_chipz=5
correctnet train variation.sigma=0.5
```

Inline: `calibration.start=trained`, `training.epochz=3` and `python -m correctnet.aggregate multirun/X stagez=all`.

```python
raise SystemExit(3)
```

```python
print(undefined_name)
```

<!-- doc-check: skip (fragment) -->
```python
from correctnet import no_such_thing
model(x)
```
"""


def test_bad_doc_reports_each_problem(tmp_path):
    md = tmp_path / "bad.md"
    md.write_text(BAD)
    problems = doc_check.check([md]).problems
    text = "\n".join(problems)
    assert len(problems) == 8, text
    assert "bad.md:4: train training.epochz=3: Could not override 'training.epochz'" in text
    assert "bad.md:5: train model=resnet999:" in text and "resnet999" in text
    assert "bad.md:6: evaluate checkpoint=PATH evaluation.n_chipz=5: unknown key 'evaluation.n_chipz'" in text
    assert "bad.md:10: training.epochz=3:" in text                      # inline mention
    assert "bad.md:10: aggregate multirun/X stagez=all: unknown key 'stagez'" in text
    assert "bad.md:12: ```python block: exit 3" in text
    assert "bad.md:16: ```python block: a fragment that cannot run on its own: NameError" in text
    assert "bad.md:21: ```python block (skipped: fragment): ImportError" in text
    assert "variation.sigma=0.5" not in text and "calibration.start" not in text


def test_sweeps_placeholders_and_validation(tmp_path):
    md = tmp_path / "ok.md"
    md.write_text("```bash\npython -m correctnet.train -m seed=0,1 variation.sigma=0.3,0.5 "
                  "hydra/launcher=joblib hydra.launcher.n_jobs=2\n"
                  "python -m correctnet.train model=custom model._target_=my_pkg.nets.ResNet20 +model.width=0.5\n"
                  "python -m correctnet.train variation.sigma=0.3,0.5\n"
                  "python -m correctnet.train -m variation.sigma=0.3,-1\n```\n"
                  "`variation.levels=16` `model=lenet5|vgg11` `model=lenet5|vgg99` `evaluation.n_chipz`\n")
    problems = doc_check.check([md]).problems
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "ok.md:4: train variation.sigma=0.3,0.5: Ambiguous value" in text           # a sweep without -m
    assert "ok.md:5:" in text and "variation.sigma must be" in text                   # validated per swept value
    assert "ok.md:7: model=vgg99:" in text
    assert "ok.md:7: evaluation.n_chipz: no such config key" in text
