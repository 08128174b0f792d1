"""What a caller asks of the merge engine, and what it reports back.

:class:`MergeOptions` is frozen and validated when it is made, so a bad value (an unknown dtype, a
shard size of zero, a device that does not exist) is refused before any file is opened, whichever
front end built it: the CLI, a library call, or another operation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..float_types import DTYPE_CHOICES
from ..schema import Adapter

#: Operations that run through the engine, as recorded in provenance and model cards.
OPERATIONS = ("merge", "dequantize", "requantize", "unmerge", "swap", "init-residual", "check")


@dataclass
class MergeInput:
    """One adapter to merge and its weight (its deltas are multiplied by it). ``invert``: take it back out
    instead (unmerge, swap), given the weight it was merged with; inverted inputs are listed in the order
    they were merged, and are undone first, in reverse (docs/unmerge.md)."""

    adapter: Adapter
    weight: float = 1.0
    invert: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise InputError(f"adapter weight {self.weight!r} is not a finite number", path=self.adapter.source,
                             hint="give a finite --weight such as 0.5 or 1")


@dataclass(frozen=True)
class QuantizeOptions:
    """Settings for turning dense weights into quantized ones (``adaptools requantize``). ``quant_type`` names
    the backend that quantizes; empty: the first registered backend that can."""

    quant_type: str = ""
    blocksize: int = 64
    double_quant: bool = True
    skip_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckRequest:
    """A validator to run on the output before it is published, with its options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeOptions:
    """Everything about *how* to merge; the inputs and the output path are the call's arguments.

    Attributes:
        dtype: ``auto`` (each tensor keeps the base's dtype) or ``fp32``/``fp16``/``bf16``.
        device: where the fp32 arithmetic runs (``cpu``, ``cuda`` or ``cuda:N``).
        shard_size: re-shard the output to at most this many bytes per file (default: the base's layout).
        force: replace an existing output that adaptools wrote (never an input or anything else).
        ignore_base_mismatch: merge even if the adapter names another architecture.
        hash_base: record the sha256 of local base shards (costs a full extra read).
        command: the command line, recorded in provenance.
        operation: one of :data:`OPERATIONS`, recorded in provenance; ``dequantize`` needs a quantized base.
        requantize: keep a quantized base's weights quantized (changed ones re-encoded with their own
            settings, untouched ones copied byte for byte) and report how much of each change survived.
        quantize: quantize a dense base's linear weights with these options, through ``quant_backend``.
        workers: threads for the arithmetic (0: one per core).
        checks: validators run on the finished output before it is renamed into place.
        to: the output container by name (default: chosen by the output path's suffix, else a checkpoint
            folder); containers other than the folder come from backends.
        outtype: the storage type, for containers that offer several (the folder takes ``dtype``).
        imatrix: an importance-matrix file, for containers whose encoders weight by one (GGUF).
    """

    dtype: str = "auto"
    device: str = "cpu"
    shard_size: int | None = None
    force: bool = False
    ignore_base_mismatch: bool = False
    hash_base: bool = False
    command: str | None = None
    operation: str = "merge"
    requantize: bool = False
    quantize: QuantizeOptions | None = None
    workers: int = 0
    checks: tuple[CheckRequest, ...] = ()
    to: str | None = None
    outtype: str | None = None
    imatrix: str | None = None

    def __post_init__(self) -> None:
        for key in ("to", "outtype", "imatrix"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise InputError(f"{key} {value!r} must be a name")
        if self.dtype not in DTYPE_CHOICES:
            raise InputError(f"unknown dtype {self.dtype!r}", hint=f"use one of {', '.join(DTYPE_CHOICES)}")
        device = self.device.split(":")[0]
        if device not in ("cpu", "cuda") or (":" in self.device and not self.device.split(":")[1].isdigit()):
            raise InputError(f"unknown device {self.device!r}", hint="use cpu, cuda or cuda:N")
        if self.shard_size is not None and (isinstance(self.shard_size, bool) or self.shard_size <= 0):
            raise InputError(f"shard size {self.shard_size!r} must be a positive number of bytes",
                             hint="give a size such as 5GB")
        if self.operation not in OPERATIONS:
            raise InputError(f"unknown operation {self.operation!r}")
        if self.workers < 0:
            raise InputError(f"workers {self.workers} must be 0 (one per core) or more")
        if (self.requantize or self.quantize is not None) and (self.shard_size is not None or self.dtype != "auto"):
            raise InputError("quantized output keeps the base's shard layout and dtypes",
                             hint="drop --shard-size and --dtype")
        if self.requantize and self.quantize is not None:
            raise InputError("requantize keeps the base's own settings; do not also give quantize options")

    @property
    def quantized_output(self) -> bool:
        return self.requantize or self.quantize is not None


@dataclass(frozen=True)
class MergeEvent:
    """Progress: one output tensor written."""

    tensor: str
    shard: str
    nbytes: int
    merged: bool
    total_bytes: int = 0  # what the whole output will hold (an estimate for quantized output)


@dataclass
class MergeSummary:
    output: str
    tensors: int = 0
    tensors_merged: int = 0
    tensors_copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    shards: int = 0
    untied_lm_head: bool = False
    vocab_size: int | None = None
    warnings: list[str] = field(default_factory=list)
    survival: list[dict[str, Any]] = field(default_factory=list)
    #: what to do when requantizing erased most of a change (the output container's advice)
    survival_hint: str = ""
    checks: list[dict[str, Any]] = field(default_factory=list)
    profile: dict[str, float] = field(default_factory=dict)

    @property
    def checks_passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """Every field, and with a survival report the layers that lost most of their change
        (``survival_lost``: the same judgement the warning prints, quantized.LOST_BELOW)."""
        from .quantized import SurvivalVerdict  # quantized.py imports this module

        data = dict(self.__dict__)
        verdict = SurvivalVerdict.of(self.survival)
        if verdict is not None:
            data["survival_lost"] = [name for name, _ in verdict.lost]
        return data
