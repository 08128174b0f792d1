"""``adaptools info``: what an adapter is, as a JSON-able dict."""

from __future__ import annotations

from typing import Any

from .. import registry
from ..safetensors_io import DTYPES
from ..schema import Adapter


def describe(adapter: Adapter) -> dict[str, Any]:
    """Method, base, size, per-method summary and the tensor list of an adapter."""
    method = registry.get_method(adapter.method)
    tensors = []
    total_bytes = 0
    dtypes: dict[str, int] = {}
    for name in adapter.tensor_names():
        info = adapter.info(name)
        numel = 1
        for d in info.shape:
            numel *= d
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
        tensors.append({"name": name, "dtype": info.dtype, "shape": list(info.shape)})
        total_bytes += numel * (DTYPES[info.dtype][1] if info.dtype in DTYPES else 1)
    return {
        "source": adapter.source,
        "format": adapter.read_format,
        "schema_version": adapter.schema_version,
        "method": adapter.method,
        "base": adapter.base.to_json(),
        "parameters": adapter.num_parameters(),
        "bytes": total_bytes,
        "dtypes": dtypes,
        "modules": len(adapter.modules()),
        "summary": method.summary(adapter),
        "provenance": adapter.provenance,
        "tensors": tensors,
    }
