"""Where the Hydra config groups of ``correctnet train`` are, and their schemas: the one place that says so.

The YAML groups live in the checkout's top-level ``conf/``, which setuptools maps into the package as
``correctnet.configs`` (``package-dir`` in pyproject.toml; the wheel ships them as its package data, an editable
install maps the same name onto the checkout's ``conf/``). Locate them through this module only: ``MODULE``, e.g.
for ``hydra.initialize_config_module(MODULE)``; ``CONFIG_PATH``, the ``pkg://`` search path for ``@hydra.main``;
``DIR``, their directory, e.g. for ``hydra.initialize_config_dir(config_dir=str(DIR))``. Importing this package
registers the groups' schemas, built from the library's typed configs (:mod:`correctnet.conf.schema`); compose
only after importing it.
"""
import importlib.resources
from pathlib import Path

from .schema import register

MODULE = "correctnet.configs"
CONFIG_PATH = f"pkg://{MODULE}"
try:
    DIR = Path(str(importlib.resources.files(MODULE))).resolve()
except ModuleNotFoundError as e:  # a checkout on sys.path without `pip install -e .`: conf/ is not mapped
    raise ImportError(f"{MODULE} (the config groups, conf/ in the checkout) is not installed: "
                      "install correctnet (pip install -e . in the checkout)") from e
register()
