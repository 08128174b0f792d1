"""adaptools: parameter-efficient fine-tuning adapters as files.

This module is the public API. Plugins, built-in or third-party, import only from here.
"""

from __future__ import annotations

from .adapter_io import detect_format, load, save
from .errors import (
    AdapterFormatError,
    AdaptoolsError,
    CheckFailedError,
    IncompatibleBaseError,
    InputError,
    OutputExistsError,
    PluginConflictError,
    UnknownPluginError,
    UnsafeInputError,
    UnsupportedOperationError,
)
from .hookspecs import hookimpl
from .interfaces import (
    OPERATIONS,
    AdapterFormat,
    AdapterMethod,
    Backend,
    BaseInfo,
    BaseTensor,
    Finding,
    LowRank,
    ReadOptions,
    TensorUpdate,
    ValidationContext,
    Validator,
    Verdict,
    WriteOptions,
)
from .outputs import atomic_output
from .pickled import load_pickled_tensors
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
from .safetensors_io import SafetensorsFile, SafetensorsWriter, TensorSpec, read_header, save_tensors
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
from .version import __version__

__all__ = [
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
    "WriteOptions",
    "__version__",
    "atomic_output",
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
