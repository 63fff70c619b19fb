"""Hydra config groups of ``correctnet train`` (YAML package data; a package so that Hydra finds it installed).

``DIR`` is where they are, e.g. for ``hydra.initialize_config_dir(config_dir=str(DIR))``. Importing this package
registers the groups' schemas, built from the library's typed configs (:mod:`correctnet.conf.schema`); compose
only after importing it.
"""
from pathlib import Path

from .schema import register

DIR = Path(__file__).resolve().parent
register()
