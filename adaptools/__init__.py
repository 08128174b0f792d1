"""adaptools: parameter-efficient fine-tuning adapters as files.

This module is the user's API: read and write adapters, merge them into base models and take them out
again, convert, check, compare and combine them, change how a checkpoint is stored. Plugin authors import
:mod:`adaptools.plugin` instead. Names are imported on first use (PEP 562), so ``import adaptools`` and
``adaptools --version`` do not pay for torch.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from ._lazy import lazy_module
from .version import __version__

if TYPE_CHECKING:
    # ``X as X``: an explicit re-export for type checkers (the names resolve lazily at run time)
    from .adapter_io import (
        detect_format as detect_format,
    )
    from .adapter_io import (
        load as load,
    )
    from .adapter_io import (
        save as save,
    )
    from .engine import (
        CheckRequest as CheckRequest,
    )
    from .engine import (
        MergeInput as MergeInput,
    )
    from .engine import (
        MergeOptions as MergeOptions,
    )
    from .engine import (
        MergeSummary as MergeSummary,
    )
    from .engine import (
        QuantizeOptions as QuantizeOptions,
    )
    from .engine.run import (
        merge as merge,
    )
    from .engine.run import (
        plan as plan,
    )
    from .errors import (
        AdapterFormatError as AdapterFormatError,
    )
    from .errors import (
        AdaptoolsError as AdaptoolsError,
    )
    from .errors import (
        CheckFailedError as CheckFailedError,
    )
    from .errors import (
        IncompatibleBaseError as IncompatibleBaseError,
    )
    from .errors import (
        InputError as InputError,
    )
    from .errors import (
        OutputExistsError as OutputExistsError,
    )
    from .errors import (
        UnsafeInputError as UnsafeInputError,
    )
    from .errors import (
        UnsupportedOperationError as UnsupportedOperationError,
    )
    from .operations.algebra import (
        combine as combine,
    )
    from .operations.algebra import (
        diff as diff,
    )
    from .operations.algebra import (
        resize as resize,
    )
    from .operations.check import (
        check as check,
    )
    from .operations.convert import (
        convert as convert,
    )
    from .operations.extract import (
        extract as extract,
    )
    from .operations.quantize import (
        dequantize as dequantize,
    )
    from .operations.quantize import (
        requantize as requantize,
    )
    from .operations.unmerge import (
        unmerge as unmerge,
    )
    from .schema import (
        Adapter as Adapter,
    )

#: Every public name -> the module that defines it. ``__all__`` is derived from it; tests/test_plugins.py
#: checks that the README's library section uses nothing else.
EXPORTS = {
    # adapters as files
    "load": ".adapter_io", "save": ".adapter_io", "detect_format": ".adapter_io", "Adapter": ".schema",
    "convert": ".operations.convert", "check": ".operations.check",
    "diff": ".operations.algebra", "combine": ".operations.algebra", "resize": ".operations.algebra",
    "extract": ".operations.extract",
    # models
    "merge": ".engine.run", "plan": ".engine.run", "unmerge": ".operations.unmerge",
    "dequantize": ".operations.quantize", "requantize": ".operations.quantize",
    "MergeInput": ".engine", "MergeOptions": ".engine", "CheckRequest": ".engine", "QuantizeOptions": ".engine",
    "MergeSummary": ".engine",
    # errors a caller may catch
    "AdaptoolsError": ".errors", "InputError": ".errors", "AdapterFormatError": ".errors",
    "IncompatibleBaseError": ".errors", "CheckFailedError": ".errors", "OutputExistsError": ".errors",
    "UnsafeInputError": ".errors", "UnsupportedOperationError": ".errors",
}

#: Names this module offered before the plugin API had a module of its own, and where they live now. They
#: still resolve, with a DeprecationWarning, so that plugins written for 0.x keep loading
#: (docs/plugins.md: the one-line change is ``from adaptools import plugin``).
MOVED = {"extract_adapter": "extract"}

__all__ = ["__version__", *EXPORTS]

_getattr, __dir__ = lazy_module(__name__, EXPORTS, globals())


def __getattr__(name: str) -> Any:
    if name in EXPORTS:
        return _getattr(name)
    if name in MOVED:
        warnings.warn(f"adaptools.{name} is now adaptools.{MOVED[name]}", DeprecationWarning, stacklevel=2)
        return _getattr(MOVED[name])
    plugin = importlib.import_module(".plugin", __name__)
    if name in plugin.EXPORTS:
        warnings.warn(f"adaptools.{name} is part of the plugin API: use adaptools.plugin.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(plugin, name)
    raise AttributeError(f"module 'adaptools' has no attribute {name!r}")
