"""Operations on adapters and checkpoints. They take schema objects and plugin objects, never print, and
report progress by yielding events or calling a callback."""

from .convert import convert
from .describe import describe

__all__ = ["convert", "describe"]
