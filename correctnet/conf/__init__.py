"""Hydra config groups of ``correctnet train`` (YAML package data; a package so that Hydra finds it installed).

``DIR`` is where they are, e.g. for ``hydra.initialize_config_dir(config_dir=str(DIR))``.
"""
from pathlib import Path

DIR = Path(__file__).resolve().parent
