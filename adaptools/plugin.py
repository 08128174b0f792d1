"""The plugin author's API: everything a plugin may import, and nothing else (docs/plugins.md).

Users of the library need only :mod:`adaptools`; plugin authors subclass the contract here (methods and their
capabilities, formats, backends, output containers, validators), raise its errors and use its helpers
(safetensors access, JSON checks, patterns, the shared progress bar). The built-in plugins import from here
exactly as a third-party plugin does. Names are imported on first use, so this module is cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_module

if TYPE_CHECKING:
    # ``X as X``: an explicit re-export for type checkers (the names resolve lazily at run time)
    from .backend import (
        Backend as Backend,
    )
    from .backend import (
        OutputContainer as OutputContainer,
    )
    from .backend import (
        OutputWriter as OutputWriter,
    )
    from .checkpoint import (
        Checkpoint as Checkpoint,
    )
    from .engine.entries import (
        Entry as Entry,
    )
    from .engine.entries import (
        GroupOutput as GroupOutput,
    )
    from .engine.entries import (
        MergePlan as MergePlan,
    )
    from .engine.entries import (
        ShardPlan as ShardPlan,
    )
    from .engine.entries import (
        Slot as Slot,
    )
    from .engine.options import (
        MergeOptions as MergeOptions,
    )
    from .engine.options import (
        QuantizeOptions as QuantizeOptions,
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
        PluginConflictError as PluginConflictError,
    )
    from .errors import (
        PluginContractError as PluginContractError,
    )
    from .errors import (
        UnknownPluginError as UnknownPluginError,
    )
    from .errors import (
        UnsafeInputError as UnsafeInputError,
    )
    from .errors import (
        UnsupportedOperationError as UnsupportedOperationError,
    )
    from .errors import (
        printable as printable,
    )
    from .finite import (
        count_nonfinite as count_nonfinite,
    )
    from .float_types import (
        FLOAT_TYPES as FLOAT_TYPES,
    )
    from .float_types import (
        FloatType as FloatType,
    )
    from .hookspecs import (
        hookimpl as hookimpl,
    )
    from .interfaces import (
        OPERATIONS as OPERATIONS,
    )
    from .interfaces import (
        AdapterFormat as AdapterFormat,
    )
    from .interfaces import (
        AdapterMethod as AdapterMethod,
    )
    from .interfaces import (
        Bakeable as Bakeable,
    )
    from .interfaces import (
        Initializable as Initializable,
    )
    from .interfaces import (
        LowRankAlgebra as LowRankAlgebra,
    )
    from .interfaces import (
        Mergeable as Mergeable,
    )
    from .interfaces import (
        PlainConvertible as PlainConvertible,
    )
    from .interfaces import (
        RuntimeApplicable as RuntimeApplicable,
    )
    from .interfaces import (
        Validator as Validator,
    )
    from .interfaces import (
        ValidatorOption as ValidatorOption,
    )
    from .jsonio import (
        check_json as check_json,
    )
    from .jsonio import (
        json_problems as json_problems,
    )
    from .jsonio import (
        parse_json as parse_json,
    )
    from .jsonio import (
        read_json as read_json,
    )
    from .kernels import (
        load_kernel as load_kernel,
    )
    from .kernels import (
        split as split,
    )
    from .outputs import (
        atomic_output as atomic_output,
    )
    from .outputs import (
        check_output as check_output,
    )
    from .packed import (
        dequantize_fp8 as dequantize_fp8,
    )
    from .packed import (
        dequantize_packed as dequantize_packed,
    )
    from .packed import (
        describe_packed as describe_packed,
    )
    from .packed import (
        packed_available as packed_available,
    )
    from .patterns import (
        compile_pattern as compile_pattern,
    )
    from .patterns import (
        match_pattern as match_pattern,
    )
    from .pickled import (
        load_pickled_tensors as load_pickled_tensors,
    )
    from .plugin_data import (
        BaseInfo as BaseInfo,
    )
    from .plugin_data import (
        BaseTensor as BaseTensor,
    )
    from .plugin_data import (
        Finding as Finding,
    )
    from .plugin_data import (
        LowRank as LowRank,
    )
    from .plugin_data import (
        ReadOptions as ReadOptions,
    )
    from .plugin_data import (
        TensorUpdate as TensorUpdate,
    )
    from .plugin_data import (
        UpdateKind as UpdateKind,
    )
    from .plugin_data import (
        ValidationContext as ValidationContext,
    )
    from .plugin_data import (
        Verdict as Verdict,
    )
    from .plugin_data import (
        WriteOptions as WriteOptions,
    )
    from .progress import (
        progress_bar as progress_bar,
    )
    from .registry import (
        backends as backends,
    )
    from .registry import (
        formats as formats,
    )
    from .registry import (
        get_backend as get_backend,
    )
    from .registry import (
        get_format as get_format,
    )
    from .registry import (
        get_method as get_method,
    )
    from .registry import (
        get_validator as get_validator,
    )
    from .registry import (
        methods as methods,
    )
    from .registry import (
        validators as validators,
    )
    from .resolve import (
        parse_hub_ref as parse_hub_ref,
    )
    from .safetensors_io import (
        SafetensorsFile as SafetensorsFile,
    )
    from .safetensors_io import (
        SafetensorsWriter as SafetensorsWriter,
    )
    from .safetensors_io import (
        TensorInfo as TensorInfo,
    )
    from .safetensors_io import (
        TensorSpec as TensorSpec,
    )
    from .safetensors_io import (
        read_header as read_header,
    )
    from .safetensors_io import (
        save_tensors as save_tensors,
    )
    from .safetensors_io import (
        written_by_adaptools as written_by_adaptools,
    )
    from .schema import (
        SCHEMA_VERSION as SCHEMA_VERSION,
    )
    from .schema import (
        Adapter as Adapter,
    )
    from .schema import (
        BaseRef as BaseRef,
    )
    from .schema import (
        FileStore as FileStore,
    )
    from .schema import (
        MemoryStore as MemoryStore,
    )
    from .schema import (
        StoredTensorInfo as StoredTensorInfo,
    )
    from .schema import (
        TensorStore as TensorStore,
    )
    from .schema import (
        parse_metadata as parse_metadata,
    )
    from .schema import (
        split_name as split_name,
    )

#: Every public name of the plugin API -> the module that defines it (``module:attribute`` when renamed).
#: ``__all__`` is derived from it; tests/test_plugins.py checks the two stay one list.
EXPORTS = {
    # the hook marker and the contract
    "hookimpl": ".hookspecs",
    "OPERATIONS": ".interfaces",
    "AdapterMethod": ".interfaces", "Mergeable": ".interfaces", "LowRankAlgebra": ".interfaces",
    "Initializable": ".interfaces", "RuntimeApplicable": ".interfaces", "Bakeable": ".interfaces",
    "PlainConvertible": ".interfaces", "AdapterFormat": ".interfaces", "Validator": ".interfaces",
    "ValidatorOption": ".interfaces", "Backend": ".backend", "OutputContainer": ".backend",
    "OutputWriter": ".backend",
    # the data the contract passes
    "Adapter": ".schema", "BaseRef": ".schema", "TensorStore": ".schema", "FileStore": ".schema",
    "MemoryStore": ".schema", "StoredTensorInfo": ".schema", "SCHEMA_VERSION": ".schema",
    "split_name": ".schema", "parse_metadata": ".schema",
    "BaseInfo": ".plugin_data", "BaseTensor": ".plugin_data", "Finding": ".plugin_data", "LowRank": ".plugin_data",
    "ReadOptions": ".plugin_data", "WriteOptions": ".plugin_data", "TensorUpdate": ".plugin_data",
    "UpdateKind": ".plugin_data", "ValidationContext": ".plugin_data", "Verdict": ".plugin_data",
    "QuantizeOptions": ".engine.options", "Checkpoint": ".checkpoint",
    # what an output container sees of a merge (docs/plugins.md, "Output containers")
    "MergePlan": ".engine.entries", "ShardPlan": ".engine.entries", "Slot": ".engine.entries",
    "Entry": ".engine.entries", "GroupOutput": ".engine.entries", "MergeOptions": ".engine.options",
    "FLOAT_TYPES": ".float_types", "FloatType": ".float_types",
    # errors
    "AdaptoolsError": ".errors", "AdapterFormatError": ".errors", "CheckFailedError": ".errors",
    "IncompatibleBaseError": ".errors", "InputError": ".errors", "OutputExistsError": ".errors",
    "PluginConflictError": ".errors", "PluginContractError": ".errors", "UnknownPluginError": ".errors",
    "UnsafeInputError": ".errors", "UnsupportedOperationError": ".errors", "printable": ".errors",
    # looking up what other plugins registered
    "methods": ".registry", "formats": ".registry", "backends": ".registry", "validators": ".registry",
    "get_method": ".registry", "get_format": ".registry", "get_backend": ".registry",
    "get_validator": ".registry",
    # helpers: files, JSON, patterns, values, outputs, progress
    "SafetensorsFile": ".safetensors_io", "SafetensorsWriter": ".safetensors_io", "TensorInfo": ".safetensors_io",
    "TensorSpec": ".safetensors_io", "read_header": ".safetensors_io", "save_tensors": ".safetensors_io",
    "written_by_adaptools": ".safetensors_io",
    "load_pickled_tensors": ".pickled", "parse_hub_ref": ".resolve",
    "read_json": ".jsonio", "parse_json": ".jsonio", "check_json": ".jsonio", "json_problems": ".jsonio",
    "compile_pattern": ".patterns", "match_pattern": ".patterns",
    "count_nonfinite": ".finite", "atomic_output": ".outputs", "check_output": ".outputs",
    "progress_bar": ".progress", "load_kernel": ".kernels", "split": ".kernels",
    "dequantize_packed": ".packed", "packed_available": ".packed", "dequantize_fp8": ".packed",
    "describe_packed": ".packed",
}

__all__ = list(EXPORTS)

__getattr__, __dir__ = lazy_module(__name__, EXPORTS, globals())

