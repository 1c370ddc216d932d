"""Settings: declared once in `schema`, resolved and validated by `loader` before anything starts."""

from daemon.config.loader import ConfigError, load
from daemon.config.refs import CheckpointRef
from daemon.config.schema import SPECS, Config, Spec

__all__ = ["SPECS", "CheckpointRef", "Config", "ConfigError", "Spec", "load"]
