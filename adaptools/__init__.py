"""adaptools: parameter-efficient fine-tuning adapters as files.

This module is the public API. Plugins, built-in or third-party, import only from here. Names are
imported on first use (PEP 562), so ``import adaptools`` and ``adaptools --version`` do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .adapter_io import (
        detect_format,
        load,
        save,
    )
    from .checkpoint import Checkpoint
    from .datatypes import UpdateKind, WriteOptions
    from .dtypes import FLOAT_TYPES, FloatType
    from .engine import CheckRequest, MergeInput, MergeOptions, merge
    from .engine.options import QuantizeOptions
    from .errors import (
        AdapterFormatError,
        AdaptoolsError,
        CheckFailedError,
        IncompatibleBaseError,
        InputError,
        OutputExistsError,
        PluginConflictError,
        PluginContractError,
        UnknownPluginError,
        UnsafeInputError,
        UnsupportedOperationError,
        printable,
    )
    from .hookspecs import (
        hookimpl,
    )
    from .interfaces import (
        OPERATIONS,
        AdapterFormat,
        AdapterMethod,
        Backend,
        Bakeable,
        BaseInfo,
        BaseTensor,
        Finding,
        Initializable,
        LowRank,
        LowRankAlgebra,
        Mergeable,
        OutputContainer,
        PlainConvertible,
        ReadOptions,
        RuntimeApplicable,
        TensorUpdate,
        ValidationContext,
        Validator,
        ValidatorOption,
        Verdict,
    )
    from .jsonio import check_json, json_problems, parse_json, read_json
    from .operations.extract import extract as extract_adapter
    from .operations.unmerge import unmerge
    from .outputs import (
        atomic_output,
        check_output,
    )
    from .patterns import compile_pattern
    from .patterns import match as match_pattern
    from .pickled import (
        load_pickled_tensors,
    )
    from .registry import (
        backends,
        formats,
        get_backend,
        get_format,
        get_method,
        get_validator,
        methods,
        validators,
    )
    from .resolve import parse_hub_ref
    from .safetensors_io import (
        SafetensorsFile,
        SafetensorsWriter,
        TensorInfo,
        TensorSpec,
        read_header,
        save_tensors,
    )
    from .schema import (
        SCHEMA_VERSION,
        Adapter,
        BaseRef,
        FileStore,
        MemoryStore,
        StoredTensorInfo,
        TensorStore,
        parse_metadata,
        split_name,
    )
    from .values import count_nonfinite

#: Public name -> the module that defines it.
_EXPORTS = {
    "count_nonfinite": ".values",
    "parse_hub_ref": ".resolve",
    "Checkpoint": ".checkpoint",
    "check_output": ".outputs",
    "merge": ".engine",
    "unmerge": ".operations.unmerge",
    "MergeInput": ".engine",
    "MergeOptions": ".engine",
    "CheckRequest": ".engine",
    "extract_adapter": ".operations.extract:extract",
    "read_json": ".jsonio",
    "parse_json": ".jsonio",
    "check_json": ".jsonio",
    "json_problems": ".jsonio",
    "compile_pattern": ".patterns",
    "match_pattern": ".patterns:match",
    "Mergeable": ".interfaces",
    "OutputContainer": ".interfaces",
    "TensorInfo": ".safetensors_io",
    "LowRankAlgebra": ".interfaces",
    "Initializable": ".interfaces",
    "RuntimeApplicable": ".interfaces",
    "Bakeable": ".interfaces",
    "PlainConvertible": ".interfaces",
    "ValidatorOption": ".interfaces",
    "UpdateKind": ".datatypes",
    "WriteOptions": ".datatypes",
    "PluginContractError": ".errors",
    "printable": ".errors",
    "QuantizeOptions": ".engine.options",
    "FLOAT_TYPES": ".dtypes",
    "FloatType": ".dtypes",
    "Adapter": ".schema",
    "AdapterFormat": ".interfaces",
    "AdapterFormatError": ".errors",
    "AdapterMethod": ".interfaces",
    "AdaptoolsError": ".errors",
    "Backend": ".interfaces",
    "BaseInfo": ".interfaces",
    "BaseRef": ".schema",
    "BaseTensor": ".interfaces",
    "CheckFailedError": ".errors",
    "FileStore": ".schema",
    "Finding": ".interfaces",
    "IncompatibleBaseError": ".errors",
    "InputError": ".errors",
    "LowRank": ".interfaces",
    "MemoryStore": ".schema",
    "OPERATIONS": ".interfaces",
    "OutputExistsError": ".errors",
    "PluginConflictError": ".errors",
    "ReadOptions": ".interfaces",
    "SCHEMA_VERSION": ".schema",
    "SafetensorsFile": ".safetensors_io",
    "SafetensorsWriter": ".safetensors_io",
    "StoredTensorInfo": ".schema",
    "TensorSpec": ".safetensors_io",
    "TensorStore": ".schema",
    "TensorUpdate": ".interfaces",
    "UnknownPluginError": ".errors",
    "UnsafeInputError": ".errors",
    "UnsupportedOperationError": ".errors",
    "ValidationContext": ".interfaces",
    "Validator": ".interfaces",
    "Verdict": ".interfaces",
    "atomic_output": ".outputs",
    "backends": ".registry",
    "detect_format": ".adapter_io",
    "formats": ".registry",
    "get_backend": ".registry",
    "get_format": ".registry",
    "get_method": ".registry",
    "get_validator": ".registry",
    "hookimpl": ".hookspecs",
    "load": ".adapter_io",
    "load_pickled_tensors": ".pickled",
    "methods": ".registry",
    "parse_metadata": ".schema",
    "read_header": ".safetensors_io",
    "save": ".adapter_io",
    "save_tensors": ".safetensors_io",
    "split_name": ".schema",
    "validators": ".registry",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adaptools' has no attribute {name!r}")
    module, _, attr = module.partition(":")
    value = getattr(importlib.import_module(module, __name__), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "count_nonfinite",
    "parse_hub_ref",
    "Checkpoint",
    "check_output",
    "merge",
    "unmerge",
    "MergeInput",
    "MergeOptions",
    "CheckRequest",
    "extract_adapter",
    "Mergeable",
    "OutputContainer",
    "TensorInfo",
    "LowRankAlgebra",
    "Initializable",
    "RuntimeApplicable",
    "Bakeable",
    "PlainConvertible",
    "ValidatorOption",
    "UpdateKind",
    "WriteOptions",
    "PluginContractError",
    "printable",
    "QuantizeOptions",
    "FLOAT_TYPES",
    "FloatType",
    "OPERATIONS",
    "load_pickled_tensors",
    "SCHEMA_VERSION",
    "Adapter",
    "AdapterFormat",
    "AdapterFormatError",
    "AdapterMethod",
    "AdaptoolsError",
    "Backend",
    "BaseInfo",
    "BaseRef",
    "BaseTensor",
    "CheckFailedError",
    "FileStore",
    "Finding",
    "LowRank",
    "IncompatibleBaseError",
    "InputError",
    "MemoryStore",
    "OutputExistsError",
    "PluginConflictError",
    "ReadOptions",
    "SafetensorsFile",
    "SafetensorsWriter",
    "StoredTensorInfo",
    "TensorSpec",
    "TensorStore",
    "TensorUpdate",
    "UnknownPluginError",
    "UnsafeInputError",
    "UnsupportedOperationError",
    "ValidationContext",
    "Validator",
    "Verdict",
    "__version__",
    "atomic_output",
    "check_json",
    "compile_pattern",
    "json_problems",
    "match_pattern",
    "parse_json",
    "read_json",
    "backends",
    "formats",
    "get_backend",
    "get_format",
    "get_method",
    "get_validator",
    "methods",
    "validators",
    "detect_format",
    "hookimpl",
    "load",
    "parse_metadata",
    "read_header",
    "save",
    "save_tensors",
    "split_name",
]
