#!/usr/bin/env python
"""Doc check: every command in README.md and docs/*.md runs, every config key they name exists.

    python tools/doc_check.py [FILE.md ...]      # default: README.md and docs/*.md of this repository

- ```python blocks run in a fresh interpreter in a temporary directory (OMP_NUM_THREADS=1, a timeout) and must
  exit 0. A block that cannot run on its own is marked on the line before its fence with
  ``<!-- doc-check: skip (fragment) -->``: it is then only compiled and its import statements executed.
- ``python -m correctnet.train`` / ``correctnet train`` commands (```bash blocks and inline code): their
  overrides are composed with Hydra's compose API against the config groups (``conf/``; no job runs; ``-m`` sweeps
  compose once per swept value) and the composed config goes through ``correctnet.train.run``'s validation,
  which runs before any data is loaded (stopped there).
- ``python -m correctnet.evaluate`` / ``aggregate`` commands: their arguments through the CLIs' own parsers
  (``correctnet.evaluate.cli.parse_args``: ``KEYS``, ``calibration.KEY``; ``correctnet.aggregate.parse_args``).
- Inline code that looks like overrides (``a.b=c``, ``group=option``, several separated by spaces, ``x|y``
  alternatives each checked) whose first segment is a top-level key or group of the config: composed and
  validated with the defaults or with some option of that group (``variation.levels=16`` needs an rram
  variation: it exists there). Inline dotted keys (``evaluation.n_chips``) must exist in some option of their
  group. ``hydra.*`` inline mentions are not checked (they need a launcher).

Prints one line per problem (``file:line: what: why``) and exits 1, or a summary and exits 0.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = re.compile(r"^\s*<!--\s*doc-check:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)")
INLINE = re.compile(r"(?<!`)(?P<ticks>`+)(?!`)(?P<code>.+?)(?<!`)(?P=ticks)(?!`)", re.S)
OVERRIDE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*=\S+$")
DOTTED = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+$")
FILE_SUFFIXES = (".py", ".json", ".md", ".png", ".yaml", ".yml", ".csv", ".npz", ".safetensors", ".txt", ".pt")
METAVARS = {"group=option", "key=value", "..."}
PROGRAMS = ("train", "evaluate", "aggregate")
PY_TIMEOUT = 180


@dataclass
class Block:
    path: Path
    line: int           # line of the opening fence
    lang: str
    text: str
    skip: str | None    # reason from a doc-check: skip marker


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def bad(self, path: Path, line: int, what: str, why: str) -> None:
        why = " ".join(why.split())
        self.problems.append(f"{_rel(path)}:{line}: {what}: {why}")

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- markdown

def parse_markdown(path: Path, report: Report) -> tuple[list[Block], list[tuple[int, str]]]:
    """Fenced blocks and the inline code spans (line, code) outside them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    prose = []                      # the lines outside fences ('' for fenced lines: line numbers stay)
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        start, fence, lang = i, m["fence"], m["lang"].lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        s = SKIP.match(prev)
        blocks.append(Block(path, start + 1, lang, "\n".join(lines[start + 1:j]) + "\n", s["reason"] if s else None))
        prose.extend([""] * (min(j, len(lines) - 1) - start + 1))
        i = j + 1
    for n, line in enumerate(lines, 1):  # a marker must sit right above a fence
        if SKIP.match(line):
            nxt = next((lines[k] for k in range(n, len(lines)) if lines[k].strip()), "")
            if not FENCE.match(nxt):
                report.bad(path, n, line.strip(), "doc-check marker not followed by a fenced block")
    text = "\n".join(prose)
    spans = []
    for paragraph in re.finditer(r"(?:[^\n]+\n?)+", text):   # code spans do not cross blank lines
        for m in INLINE.finditer(paragraph.group()):
            line = text.count("\n", 0, paragraph.start() + m.start("code")) + 1
            spans.append((line, " ".join(m["code"].split())))
    return blocks, spans


# ---------------------------------------------------------------- commands

def commands(text: str) -> list[list[str]]:
    """Shell words of every simple command in ``text`` (continuations joined, comments dropped)."""
    out = []
    for logical in text.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(logical, comments=True)
        except ValueError:
            continue
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w in ("&&", "||", ";", "|", "&"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def correctnet_command(words: list[str]) -> tuple[str, list[str]] | None:
    """("train" | "evaluate" | "aggregate", arguments) for a correctnet command, else None."""
    if len(words) >= 3 and re.fullmatch(r"(\S*/)?python(3(\.\d+)?)?", words[0]) and words[1] == "-m":
        mod = words[2]
        for p in PROGRAMS:
            if mod in (f"correctnet.{p}", f"correctnet.{p}.__main__"):
                return p, words[3:]
    if len(words) >= 2 and re.fullmatch(r"(\S*/)?correctnet", words[0]) and words[1] in PROGRAMS:
        return words[1], words[2:]
    return None


def _synopsis(args: list[str]) -> list[str]:
    """Arguments with the synopsis notation removed: ``[optional]`` brackets, ``group=option``, ``...``."""
    out, depth = [], 0
    for a in args:
        opened = a.startswith("[")
        if opened:
            depth += 1
            a = a[1:]
        if depth and a.endswith("]") and a.count("[") < a.count("]"):
            depth -= 1
            a = a[:-1]
        if a and a not in METAVARS:
            out.append(a)
    return out


class Checker:
    def __init__(self) -> None:
        from hydra import initialize_config_module

        import correctnet.train as train_mod
        from correctnet import conf as conf_mod  # where the config groups are (conf/, package correctnet.configs)
        from correctnet.errors import CorrectNetError

        self._init = initialize_config_module(conf_mod.MODULE, version_base=None)
        self._init.__enter__()
        self.train_mod = train_mod
        self.error_types = (CorrectNetError,)
        conf = conf_mod.DIR
        self.groups = {p.name: sorted(q.stem for q in p.glob("*.yaml")) for p in conf.iterdir()
                       if p.is_dir() and p.name != "hydra" and not p.name.startswith("_")}
        from omegaconf import OmegaConf
        self._composed: dict[tuple[str, ...], object] = {}
        self.top = set(OmegaConf.to_container(self._compose([]), resolve=False)) - {"hydra"}
        self._key_cache: dict[str, set[str]] = {}
        self._validated: dict[tuple[str, ...], str | None] = {}
        self.option_keys: dict[str, dict[str, set[str]]] = {}   # group -> option -> its keys (from its yaml)
        for group, options in self.groups.items():
            for opt in options:
                keys: set[str] = set()
                node = OmegaConf.to_container(OmegaConf.load(conf / group / f"{opt}.yaml"), resolve=False)
                if isinstance(node, dict):
                    node.pop("defaults", None)
                    _flatten(node, "" if group == "method" else f"{group}.", keys)
                self.option_keys.setdefault(group, {})[opt] = keys

    def close(self) -> None:
        self._init.__exit__(None, None, None)

    def _compose(self, overrides: list[str]):
        """The composed config (cached; a failure is cached and raised again)."""
        from hydra import compose
        key = tuple(overrides)
        if key not in self._composed:
            hydra = any(o.lstrip("+~").startswith(("hydra.", "hydra/")) for o in overrides)
            try:
                self._composed[key] = compose("config", overrides=list(overrides), return_hydra_config=hydra)
            except Exception as e:
                self._composed[key] = e
        cfg = self._composed[key]
        if isinstance(cfg, Exception):
            raise cfg
        return cfg

    def _validate(self, cfg) -> str | None:
        """``correctnet.train.run``'s validation of ``cfg`` (stopped before the data loads); the error or None."""
        import torch

        class Validated(Exception):
            pass

        def stop(*a, **k):
            raise Validated

        mod, threads = self.train_mod, torch.get_num_threads()
        if "hydra" in cfg:
            from omegaconf import OmegaConf, open_dict
            cfg = cfg.copy()
            with open_dict(cfg):
                del cfg["hydra"]
            OmegaConf.set_readonly(cfg, False)
        saved = mod.dataset_from_config
        mod.dataset_from_config = stop
        try:
            with tempfile.TemporaryDirectory() as tmp:
                mod.run(cfg, Path(tmp) / "run")
        except Validated:
            return None
        except self.error_types as e:
            return str(e)
        except Exception as e:  # a validation that crashes is a problem too
            return f"{type(e).__name__}: {e}"
        finally:
            mod.dataset_from_config = saved
            torch.set_num_threads(threads)
        return "correctnet.train.run did not reach the data loading (doc_check cannot stop it there)"

    def train_overrides(self, overrides: list[str], multirun: bool) -> str | None:
        """The first compose or validation error of ``overrides`` (each swept value when ``multirun``)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser
        variants = [overrides]
        if multirun:
            try:
                parsed = OverridesParser.create().parse_overrides(overrides)
            except Exception as e:
                return _first_line(e)
            sweeps = [(i, o) for i, o in enumerate(parsed) if o.is_sweep_override()]
            base = list(overrides)
            for i, o in sweeps:
                base[i] = f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
            variants = [base]
            for i, o in sweeps:
                for v in list(o.sweep_string_iterator())[1:]:
                    variants.append(base[:i] + [f"{o.get_key_element()}={v}"] + base[i + 1:])
        for ov in variants:
            try:
                cfg = self._compose(ov)
            except Exception as e:
                return _first_line(e)
            if tuple(ov) not in self._validated:
                self._validated[tuple(ov)] = self._validate(cfg)
            err = self._validated[tuple(ov)]
            if err:
                return f"{err} (with {' '.join(ov)})" if multirun and len(variants) > 1 else err
        return None

    def group_keys(self, group: str) -> set[str]:
        """Every dotted key under ``group``: in the default config or in any option of any group."""
        if group not in self._key_cache:
            from omegaconf import OmegaConf
            keys: set[str] = set()
            _flatten(OmegaConf.to_container(self._compose([]), resolve=False), "", keys)
            for options in self.option_keys.values():
                for k in options.values():
                    keys |= k
            self._key_cache[group] = {k for k in keys if k.split(".")[0] == group}
        return self._key_cache[group]

    def inline_overrides(self, overrides: list[str]) -> str | None:
        """None when ``overrides`` compose with the defaults, or with an option of their group that has the key,
        and ``correctnet.train.run`` accepts them there (or rejects the config for a reason that does not name
        them: an inline mention is not a whole command)."""
        key = overrides[0].split("=")[0].lstrip("+~")
        first = key.split(".")[0]
        candidates = [[]]
        if "." in key and first in self.option_keys:
            candidates += [[f"{first}={o}"] for o, keys in self.option_keys[first].items() if key in keys]
        named = [o.split("=")[0].lstrip("+~") if "." in o.split("=")[0] else o for o in overrides]
        compose_error = None
        for base in candidates:
            try:
                self._compose(base + overrides)
            except Exception as e:
                compose_error = compose_error or _first_line(e)
                continue
            err = self.train_overrides(base + overrides, multirun=True)
            if err is None or not any(n in err for n in named):
                return None
            return err
        return compose_error

def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    extra = f" ({str(e.__cause__).splitlines()[0]})" if e.__cause__ and str(e.__cause__).strip() else ""
    return (msg[0] if msg else type(e).__name__) + extra


def _flatten(node, prefix: str, out: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}{k}"
            out.add(key)
            _flatten(v, key + ".", out)


def check_command(checker: Checker, report: Report, path: Path, line: int, prog: str, args: list[str]) -> None:
    shown = f"{prog} {' '.join(args)}".strip()
    report.count(f"{prog} commands")
    multirun = any(a in ("-m", "--multirun") for a in args)
    args = _synopsis([a for a in args if a not in ("-m", "--multirun")])
    if prog == "train":
        if args[:1] == ["--cfg"] and args[1:2] in (["job"], ["hydra"], ["all"]):  # Hydra prints the config
            args = args[2:]
        flags = [a for a in args if a.startswith("-")]
        words = [a for a in args if "=" not in a and not a.startswith("-")]
        if flags or words:
            report.bad(path, line, shown, f"not a key=value override: {' '.join(flags + words)}")
            return
        err = checker.train_overrides(args, multirun)
        if err:
            report.bad(path, line, shown, err)
        return
    if prog == "evaluate":
        from correctnet.evaluate.cli import parse_args
    else:
        from correctnet.aggregate import parse_args
    try:
        parse_args(args)
    except checker.error_types as e:
        report.bad(path, line, shown, str(e))


def check_inline(checker: Checker, report: Report, path: Path, line: int, code: str) -> None:
    words = code.split()
    if words and all(OVERRIDE.match(w) and "(" not in w for w in words):
        firsts = {w.split("=")[0].split(".")[0] for w in words}
        if not firsts <= checker.top or "hydra" in firsts:
            return
        report.count("inline overrides")
        alternatives = [[]]   # `a=x|y b=z` -> [a=x b=z], [a=y b=z]
        for w in words:
            key, _, value = w.partition("=")
            if value == "...":   # `variation.sigma=...`: the key is named, the value is not
                group = key.split(".")[0]
                if "." in key and key not in checker.group_keys(group):
                    report.bad(path, line, w, f"no such config key in any {group} option")
                continue
            opts = re.split(r"[|,]", value) if not value.startswith(("[", "{")) else [value]
            alternatives = [alt + [f"{key}={o}"] for alt in alternatives for o in opts]
        for alt in filter(None, alternatives):
            err = checker.inline_overrides(alt)
            if err:
                report.bad(path, line, " ".join(alt), err)
        return
    if DOTTED.match(code) and not code.endswith(FILE_SUFFIXES):
        first = code.split(".")[0]
        if first in checker.top and first != "hydra":
            report.count("inline keys")
            if code not in checker.group_keys(first):
                report.bad(path, line, code, f"no such config key in any {first} option")


# ---------------------------------------------------------------- python blocks

def _imports_only(source: str) -> str:
    tree = ast.parse(source)
    return ast.unparse(ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], []))


def start_python(block: Block, tmp: Path, n: int) -> subprocess.Popen:
    d = tmp / f"block{n}"
    d.mkdir()
    (d / "block.py").write_text(block.text, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "block.py"], cwd=d, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish_python(block: Block, proc: subprocess.Popen, report: Report) -> None:
    try:
        out, _ = proc.communicate(timeout=PY_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        report.bad(block.path, block.line, "```python block", f"timed out after {PY_TIMEOUT} s")
        return
    if proc.returncode == 0:
        return
    last = next((ln for ln in reversed(out.splitlines()) if ln.strip()), f"exit {proc.returncode}")
    where = re.findall(r'File "block.py", line (\d+)', out)
    at = f" (block line {where[-1]})" if where else ""
    if last.startswith("NameError"):
        report.bad(block.path, block.line, "```python block",
                   f"a fragment that cannot run on its own: {last}{at}; make it self-contained or mark it "
                   f"with <!-- doc-check: skip (fragment) --> on the line above the fence")
    else:
        report.bad(block.path, block.line, "```python block", f"exit {proc.returncode}: {last}{at}")


def check_fragment(block: Block, report: Report) -> None:
    """A skipped block still compiles and its imports resolve."""
    try:
        compile(block.text, "block.py", "exec")
        exec(compile(_imports_only(block.text), "block.py", "exec"), {})
    except Exception as e:
        report.bad(block.path, block.line, f"```python block (skipped: {block.skip})", f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------- main

def default_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def check(files: list[Path]) -> Report:
    report = Report()
    parsed = [(f, *parse_markdown(f, report)) for f in files]
    with tempfile.TemporaryDirectory(prefix="doc-check-") as tmp:
        running = []
        for f, blocks, _ in parsed:   # the python blocks run while the commands are composed
            for b in blocks:
                if b.lang in ("python", "py", "python3") and b.skip is None:
                    running.append((b, start_python(b, Path(tmp), len(running))))
                    report.count("python blocks run")
        checker = Checker()
        try:
            for f, blocks, spans in parsed:
                for b in blocks:
                    if b.skip is not None:
                        report.count(f"blocks skipped ({b.skip})")
                        if b.lang in ("python", "py", "python3"):
                            check_fragment(b, report)
                        continue
                    if b.lang in ("bash", "sh", "shell", "console"):
                        for line_no, words in _commands_with_lines(b.text):
                            c = correctnet_command(words)
                            if c:
                                check_command(checker, report, f, b.line + line_no, *c)
                for line, code in spans:
                    found = [c for c in map(correctnet_command, commands(code)) if c]
                    for c in found:
                        if c[1]:   # a bare `python -m correctnet.aggregate` in prose names the tool
                            check_command(checker, report, f, line, *c)
                    if not found:
                        check_inline(checker, report, f, line, code)
        finally:
            checker.close()
        for b, proc in running:
            finish_python(b, proc, report)
    return report


def _commands_with_lines(text: str) -> list[tuple[int, list[str]]]:
    out, pending, first = [], "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        if not pending:
            first = n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        for words in commands(pending + raw):
            out.append((first, words))
        pending = ""
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md, docs/*.md)")
    args = ap.parse_args(argv)
    files = args.files or default_files()
    os.environ["OMP_NUM_THREADS"] = "1"
    report = check(files)
    for p in report.problems:
        print(p)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(report.counts.items()))
    if report.problems:
        print(f"doc-check: {len(report.problems)} problem(s) in {len(files)} file(s) ({summary})")
        return 1
    print(f"doc-check: ok, {len(files)} file(s): {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
