"""``dequantize`` and ``requantize``: change how a checkpoint's weights are stored, through the merge engine
with no adapter (docs/merge-engine.md)."""

from __future__ import annotations

import os
from typing import Any

from ..engine import MergeOptions, MergeSummary, QuantizeOptions, execute, plan
from ..engine.run import Progress
from ..outputs import check_output


def dequantize(base: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str = "auto",
               shard_size: int | None = None, force: bool = False, command: str | None = None,
               progress: Progress | None = None) -> MergeSummary:
    """Write ``base`` (a quantized checkpoint an installed backend decodes) as a dense checkpoint folder,
    each weight decoded exactly as its library decodes it; ``quantization_config`` is removed."""
    check_output(out, force, [base])
    options = MergeOptions(dtype=dtype, shard_size=shard_size, force=force, command=command,
                           operation="dequantize")
    return execute(plan(base, [], options, out), out, progress)


def requantize(dense: str | os.PathLike[str], out: str | os.PathLike[str], quantize: QuantizeOptions | None = None,
               *, force: bool = False, command: str | None = None, progress: Progress | None = None,
               **settings: Any) -> MergeSummary:
    """Quantize the dense checkpoint ``dense`` as transformers would (``quantize`` or keyword ``settings``
    choose the backend and its settings; bitsandbytes NF4 by default) and write it at ``out``."""
    check_output(out, force, [dense])
    options = MergeOptions(force=force, quantize=quantize or QuantizeOptions(**settings), operation="requantize",
                           command=command)
    return execute(plan(dense, [], options, out), out, progress)
