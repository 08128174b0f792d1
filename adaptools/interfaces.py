"""The classes plugins subclass: adapter methods, file formats, weight backends and validators.

A plugin (built-in or third-party) imports these from the top-level ``adaptools`` package, subclasses one,
and hands an instance to the ``register`` callback of the matching hook (see ``hookspecs.py``). Each class
declares what it can do through class attributes, so the core can refuse an unsupported operation before
touching any tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .errors import AdapterFormatError, UnsupportedOperationError
from .schema import Adapter

#: Operations a method may declare in ``AdapterMethod.operations``.
OPERATIONS = ("info", "convert", "merge", "apply", "algebra", "init")


@dataclass
class LowRank:
    """A module's delta as a product: ``delta = b @ a`` (``b`` [out, r] with the scaling folded in, ``a``
    [r, in]), in the layout the method stores (``kind`` says which: linear, embedding, conv)."""

    b: torch.Tensor
    a: torch.Tensor
    kind: str = "linear"

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class ReadOptions:
    """How a format reader may read its input."""

    allow_pickle: bool = False  # unpickle legacy .bin files (weights_only=True only)
    validate: bool = True  # check tensors against config, and values for NaN/Inf


@dataclass(frozen=True)
class BaseTensor:
    """One tensor of a base checkpoint, known from headers only."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class BaseInfo:
    """What a method may know about a base checkpoint before any weight is read.

    ``tensors`` holds what is stored on disk; ``aliases`` maps a parameter that is tied to another and not
    stored (``lm_head.weight`` under ``tie_word_embeddings``) to the tensor that holds its values.
    """

    tensors: dict[str, BaseTensor]
    config: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    path: str = "<base>"

    def find(self, name: str) -> BaseTensor | None:
        """The stored tensor that holds parameter ``name``, following ties; None if the base lacks it."""
        if name in self.tensors:
            return self.tensors[name]
        stored = self.aliases.get(name)
        if stored is not None:
            t = self.tensors[stored]
            return BaseTensor(name, t.dtype, t.shape)
        return None

    def locate(self, module: str, param: str) -> str | None:
        """The base parameter name for ``module.param``, tolerating a head-class prefix difference.

        An adapter trained on ``LlamaForCausalLM`` names ``model.layers.0...``; a checkpoint saved from
        ``LlamaModel`` names ``layers.0...`` (peft-format.md §2.4). Returns None if nothing fits.
        """
        head, _, rest = module.partition(".")
        candidates = [module]
        if rest:
            candidates.append(rest)
        candidates += [f"{prefix}.{module}" for prefix in ("model", "transformer")]
        for candidate in candidates:
            name = f"{candidate}.{param}"
            if self.find(name) is not None:
                return name
        return None


SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One problem ``adaptools check`` reports: which rule, how bad, where, and the one-line fix."""

    rule: str
    severity: str  # error | warning | info
    message: str
    fix: str
    path: str | None = None
    tensor: str | None = None
    field: str | None = None


#: An update to one base tensor: given the current value and the original (both fp32), return the new one.
UpdateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TensorUpdate:
    """What a method does to one base parameter during a merge.

    ``kind`` says how the update composes (the merge applies replacements, then deltas, then row
    replacements, then output maps, adapters in order within each):

    - ``"delta"``: a function of the current value (LoRA, DoRA, biases);
    - ``"replace"``: the stored tensor itself is replaced (a saved base layer, maybe with a resized vocab),
      so a parameter tied to it (lm_head) sees the new value too;
    - ``"replace_module"``: one module's copy is replaced (PEFT ``modules_to_save``); ties do not follow;
    - ``"replace_rows"``: some rows are replaced (trainable tokens); ties follow, as in PEFT;
    - ``"output_map"``: a map of the layer's *output* (a linear bottleneck adapter folded into the output
      projection), so it acts on the weight after every other change, whatever the adapters' order.

    ``fn(current, original)`` gets fp32 tensors on the merge device and returns the new value; it may
    modify ``current`` in place but never ``original``. ``rows``, when given, is the same update restricted
    to a block of rows (``rows(current_rows, row_slice)``), which lets the merge stream a large tensor
    through the CPU cache block by block; it must give bit-identical results to ``fn``.
    """

    target: str
    kind: str
    fn: UpdateFn
    shape: tuple[int, ...] | None = None  # the result's shape when it differs from the base's
    source: str = ""  # which adapter tensors, for messages
    rows: Callable[[torch.Tensor, slice], torch.Tensor] | None = None
    needs_original: bool = False  # fn reads ``original`` (DoRA norms), so it must not alias ``current``


class AdapterMethod(ABC):
    """An adapter method (LoRA, OLoRA, ...): knows its tensors, its config and its math."""

    #: What users type and what schema files record (``adaptools.method``).
    name: ClassVar[str]
    #: One line for ``adaptools plugins``.
    description: ClassVar[str] = ""
    #: Which of :data:`OPERATIONS` this method supports.
    operations: ClassVar[frozenset[str]] = frozenset({"info", "convert"})
    #: The tensor roles (suffixes) this method's adapters may contain.
    roles: ClassVar[tuple[str, ...]] = ()
    #: The PEFT ``peft_type`` values this method reads (empty: not a PEFT method).
    peft_types: ClassVar[tuple[str, ...]] = ()
    #: PEFT key suffix (after the module path, adapter name removed) -> canonical role.
    peft_roles: ClassVar[dict[str, str]] = {}

    def from_peft(self, peft_config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """Turn a PEFT ``adapter_config.json`` (base fields removed) into this method's config.

        ``shapes`` maps canonical tensor names to shapes, for configs that record per-module facts.
        """
        return dict(peft_config)

    def to_peft(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`from_peft`."""
        return dict(config)

    #: Lint rules this method checks: id -> (severity, one-line title), for ``adaptools check`` and SARIF.
    rules: ClassVar[dict[str, tuple[str, str]]] = {}

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
        """Every problem found, as findings (``adaptools check``); ``base`` adds checks against a base model."""
        return []

    def validate(self, adapter: Adapter, *, check_values: bool = True) -> None:
        """Raise :class:`AdapterFormatError` for the first error-severity finding (used by ``load``)."""
        for finding in self.lint(adapter, None, check_values=check_values):
            if finding.severity == "error":
                raise AdapterFormatError(finding.message, path=finding.path, tensor=finding.tensor,
                                         hint=finding.fix)

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        """A JSON-able description for ``adaptools info``."""
        return {}

    #: Why an operation is not supported, for the error message: {operation: reason}.
    unsupported: ClassVar[dict[str, str]] = {}
    #: Operations in :attr:`operations` that work only for some adapters of the method: {operation: when}.
    #: ``adaptools plugins`` shows them as "some"; the method refuses the others with the reason.
    conditional: ClassVar[dict[str, str]] = {}

    def require(self, operation: str) -> None:
        """Raise :class:`UnsupportedOperationError` unless this method supports ``operation``."""
        if operation not in self.operations:
            why = self.unsupported.get(operation)
            raise UnsupportedOperationError(
                f"method {self.name!r} cannot {operation}" + (f": {why}" if why else "")
                + f" (it supports: {', '.join(sorted(self.operations))})")

    def low_rank(self, adapter: Adapter) -> dict[str, LowRank]:
        """Each module's delta as ``b @ a`` (scaling folded into ``b``), for diff, combine and resize.

        Raise :class:`UnsupportedOperationError` when the delta is not a plain low-rank product (DoRA).
        """
        self.require("algebra")
        raise NotImplementedError

    def from_low_rank(self, template: Adapter, factors: dict[str, LowRank],
                      extra: dict[str, torch.Tensor] | None = None) -> Adapter:
        """A new adapter of this method holding ``factors`` (scale 1), with ``template``'s base and config."""
        self.require("algebra")
        raise NotImplementedError

    def initialize(self, base: BaseInfo, read: Callable[[str], torch.Tensor], options: Mapping[str, Any]) -> Adapter:
        """A freshly initialised adapter for ``base`` (``adaptools init``); ``read`` gives base weights."""
        self.require("init")
        raise NotImplementedError

    def to_plain(self, adapter: Adapter, base: BaseInfo | None, read: Callable[[str], torch.Tensor] | None,
                 initial: Adapter | None) -> Adapter:
        """The adapter as its method's plain form on the original base (e.g. OLoRA -> LoRA of rank 2r)."""
        raise UnsupportedOperationError(f"method {self.name!r} has no plain-form conversion")

    def bake(self, adapter: Adapter) -> Adapter:
        """The adapter with training-time parts evaluated into what is served (``convert --bake-projection``:
        a prefix's projection MLP into the plain prefix)."""
        raise UnsupportedOperationError(f"method {self.name!r} has nothing to bake")

    def merge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        """The updates a merge applies to the base. Raise IncompatibleBaseError if it does not fit."""
        self.require("merge")
        raise NotImplementedError

    def apply(self, adapter: Adapter, model: torch.nn.Module) -> AbstractContextManager[torch.nn.Module]:
        """Apply the adapter to a live torch module *unmerged* (for validation); undone on exit."""
        self.require("apply")
        raise NotImplementedError


class AdapterFormat(ABC):
    """An on-disk adapter format: how to recognise, read and write it."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    can_read: ClassVar[bool] = True
    can_write: ClassVar[bool] = True
    #: True when the format writes a directory rather than a single file.
    writes_directory: ClassVar[bool] = True

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """True if ``path`` (file or directory) is in this format. Must be cheap and never raise."""

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        raise UnsupportedOperationError(f"format {self.name!r} cannot be read")

    def write(self, adapter: Adapter, path: Path) -> None:
        """Write ``adapter`` to ``path``, which does not exist yet (the caller renames it into place)."""
        raise UnsupportedOperationError(f"format {self.name!r} cannot be written")


class Backend(ABC):
    """How a stored base weight decodes to a dense tensor and encodes back (dense dtypes, NF4, ...)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def claims(self, tensor: BaseTensor, checkpoint_config: Mapping[str, Any]) -> bool:
        """True if this backend stores ``tensor``."""

    @abstractmethod
    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored tensor -> dense float32."""

    @abstractmethod
    def encode(self, dense: torch.Tensor, like: BaseTensor) -> torch.Tensor:
        """Dense float32 -> stored tensor, rounding once."""

    def find_groups(self, tensors: Mapping[str, BaseTensor]) -> dict[str, list[str]]:
        """Parameters this backend stores across several tensors: ``{param: [companion names]}``.

        A quantized weight (NF4: packed bytes plus absmax, maps and a JSON state) is one such group; the
        merge then sees the parameter as dense, with the shape and dtype from :meth:`group_info`. When a
        checkpoint asks, ``tensors`` also has a ``config`` attribute: its config.json, for formats whose
        layout depends on the architecture (8-bit GPT-2 weights are stored transposed).
        """
        return {}

    def group_info(self, param: str, read: Callable[[str], torch.Tensor]) -> tuple[torch.dtype, tuple[int, ...]]:
        """The dense dtype and shape of a grouped parameter, reading only small tensors."""
        raise NotImplementedError

    def decode_group(self, param: str, read: Callable[[str], torch.Tensor], names: list[str]) -> torch.Tensor:
        """The dense value (in the group's dtype) of a grouped parameter."""
        raise NotImplementedError

    def group_settings(self, param: str, read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
        """How a grouped parameter was encoded (to encode a changed value the same way)."""
        raise NotImplementedError

    def encode_group(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Encode a dense value as this backend's group of tensors, named as the checkpoint names them."""
        raise NotImplementedError

    #: True when decode and encode are plain dtype casts, so any block of rows can be decoded, updated and
    #: encoded on its own (the merge then casts blocks straight into the output). NF4 and friends: False.
    elementwise: ClassVar[bool] = False


@dataclass(frozen=True)
class Verdict:
    """A validator's answer: passed or not, figures for machines, a sentence for people."""

    passed: bool
    message: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationContext:
    """What an operation hands a validator: its inputs, its output and the user's options."""

    operation: str
    base: str | None
    adapters: list[Adapter]
    output: str | None
    options: dict[str, Any] = field(default_factory=dict)


class Validator(ABC):
    """A check any operation can run after it has written its output (``--check NAME``)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def validate(self, context: ValidationContext) -> Verdict:
        """Run the check and return a verdict; raise AdaptoolsError only for unusable input."""
