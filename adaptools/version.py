"""The adaptools version, for provenance records. pyproject.toml reads it from here, so it is written once
and costs nothing to import (``importlib.metadata`` scanned every installed distribution: ~0.15 s)."""

__version__ = "0.2.0"
