"""Errors a user can cause. Each carries one readable message; the CLI prints it without a traceback."""
from __future__ import annotations


class CorrectNetError(Exception):
    """Base class of every error caused by user input (config, data, files)."""


class ConfigError(CorrectNetError, ValueError):
    """A configuration value is invalid: the message names the key, the value and what is accepted."""


class DataNotFoundError(CorrectNetError, FileNotFoundError):
    """A dataset is missing: the message says where we looked and how to get it."""


class DataFormatError(CorrectNetError, ValueError):
    """A dataset file exists but is not in the expected format (truncated, wrong magic, wrong shape)."""
