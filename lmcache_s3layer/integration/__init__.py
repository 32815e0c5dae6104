"""Where LMCache and vLLM types meet the core: ``lmcache`` (the storage plugin, the CPU
connector) and ``vllm`` (the KV connector). Nothing below this package imports them, and
inside it only ``compat`` does (lazily): every LMCache/vLLM internal the integration relies on
is listed and checked there.

Also the integration's one tri-state switch parser (:func:`parse_mode`), shared by the
``S3LAYER_CPU_CONNECTOR`` environment variable and the ``s3layer.cpu_connector`` option.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from lmcache_s3layer.config import parse_bool
from lmcache_s3layer.errors import ConfigError

AUTO, ON, OFF = "auto", "on", "off"

# Spellings beyond parse_bool's (1/true/yes/on, 0/false/no/off) a mode switch has always taken.
_MODE_WORDS = {"": AUTO, "auto": AUTO, "always": ON, "force": ON, "never": OFF}

CPU_CONNECTOR_ENV_VAR = "S3LAYER_CPU_CONNECTOR"


def parse_mode(value: Any, name: str) -> str:
    """``auto``, ``on`` or ``off`` from a switch: ``auto`` (or empty, or None), any boolean
    spelling :func:`lmcache_s3layer.config.parse_bool` takes, ``always``/``force`` (on) or
    ``never`` (off), case-insensitive. Anything else is a :class:`ConfigError`."""
    if value is None:
        return AUTO
    if isinstance(value, str) and value.strip().lower() in _MODE_WORDS:
        return _MODE_WORDS[value.strip().lower()]
    try:
        return ON if parse_bool(value, name) else OFF
    except ConfigError:
        raise ConfigError(f"{name} must be auto, on or off, got {value!r}") from None


def cpu_connector_env_mode(logger: Optional[logging.Logger] = None) -> str:
    """``S3LAYER_CPU_CONNECTOR`` as a mode; a value not understood counts as ``auto`` (logged
    when a logger is given: an environment variable cannot stop start-up cleanly everywhere)."""
    raw = os.environ.get(CPU_CONNECTOR_ENV_VAR, AUTO)
    try:
        return parse_mode(raw, CPU_CONNECTOR_ENV_VAR)
    except ConfigError:
        if logger is not None:
            logger.warning("%s=%r not understood; using 'auto'", CPU_CONNECTOR_ENV_VAR, raw)
        return AUTO
