"""The classes plugins subclass: adapter methods and their capabilities, file formats, weight backends and
validators (docs/plugins.md has the whole contract on one page).

A method is an :class:`AdapterMethod` (its tensors, config and checks) plus one small base class per thing
it can do: :class:`Mergeable`, :class:`LowRankAlgebra`, :class:`Initializable`, :class:`RuntimeApplicable`,
:class:`Bakeable`, :class:`PlainConvertible`. What a method supports (:attr:`AdapterMethod.operations`) is
derived from which of them it implements, so the two cannot disagree; the registry refuses a plugin whose
declared ``operations`` claim more, or less, than it implements.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import torch

from .backend import Backend, OutputContainer  # re-exported: the contract is one import away
from .errors import AdapterFormatError, InputError, UnsupportedOperationError
from .plugin_data import (  # re-exported: the contract's data lives beside it
    SEVERITIES,
    BaseInfo,
    BaseTensor,
    Finding,
    LowRank,
    ReadOptions,
    TensorUpdate,
    UpdateKind,
    ValidationContext,
    Verdict,
    WriteOptions,
)
from .schema import Adapter

__all__ = [
    "CAPABILITIES", "OPERATIONS", "SEVERITIES", "AdapterFormat", "AdapterMethod", "Backend", "Bakeable", "BaseInfo",
    "BaseTensor", "Finding", "Initializable", "LowRank", "LowRankAlgebra", "Mergeable", "PlainConvertible",
    "ReadOptions", "RuntimeApplicable", "TensorUpdate", "UpdateKind", "ValidationContext", "Validator",
    "ValidatorOption", "Verdict", "WriteOptions", "capability", "implemented_operations", "OutputContainer",
]

#: Operation -> the methods a class must have to support it. ``info`` and ``convert`` every method has.
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "merge": ("merge_updates",),
    "unmerge": ("unmerge_updates",),
    "apply": ("apply",),
    "algebra": ("low_rank", "from_low_rank"),
    "init": ("initialize",),
    "bake": ("bake",),
    "plain": ("to_plain",),
}
#: Every operation, in the order ``adaptools plugins`` shows them.
OPERATIONS = ("info", "convert", *CAPABILITIES)


C = TypeVar("C")


def capability(method: AdapterMethod, operation: str, kind: type[C], adapter: Adapter | None = None) -> C:
    """``method`` as the capability ``kind`` after :meth:`AdapterMethod.require` (a method written before
    the capability classes, with the methods but not the base class, passes too)."""
    method.require(operation, adapter)
    return cast(C, method)


def implemented_operations(cls: type) -> frozenset[str]:
    """The operations a method class implements: the always-present ones and each capability whose
    methods it has (concretely: an abstract method does not count)."""
    abstract: frozenset[str] = getattr(cls, "__abstractmethods__", frozenset())
    return frozenset({"info", "convert"}) | frozenset(
        op for op, names in CAPABILITIES.items()
        if all(callable(getattr(cls, n, None)) and n not in abstract
               and not getattr(getattr(cls, n), "refuses", False) for n in names))


def refusing_default(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a capability's default implementation that only refuses, so it does not count as implemented."""
    fn.refuses = True  # type: ignore[attr-defined]
    return fn


class AdapterMethod(ABC):
    """An adapter method (LoRA, OLoRA, ...): knows its tensors, its config and its checks.

    Subclass it together with the capability classes below for what the method can do.
    """

    #: What users type and what schema files record (``adaptools.method``).
    name: ClassVar[str]
    #: One line for ``adaptools plugins``.
    description: ClassVar[str] = ""
    #: The tensor roles (suffixes) this method's adapters may contain.
    roles: ClassVar[tuple[str, ...]] = ()
    #: The PEFT ``peft_type`` values this method reads (empty: not a PEFT method).
    peft_types: ClassVar[tuple[str, ...]] = ()
    #: PEFT key suffix (after the module path, adapter name removed) -> canonical role.
    peft_roles: ClassVar[dict[str, str]] = {}
    #: Lint rules this method checks: id -> (severity, one-line title), for ``adaptools check`` and SARIF.
    rules: ClassVar[dict[str, tuple[str, str]]] = {}
    #: Error rules that fail ``adaptools check`` but do not stop ``load`` (an adapter that changes nothing is
    #: wrong to publish, yet reading, merging or initialising one is harmless).
    check_only: ClassVar[frozenset[str]] = frozenset()
    #: Why an operation is not supported, for the error message: {operation: reason}.
    unsupported: ClassVar[dict[str, str]] = {}
    #: Operations that work only for some adapters of the method: {operation: when}. ``adaptools plugins``
    #: shows them as "some"; :meth:`refusal` says why a given adapter is refused.
    conditional: ClassVar[dict[str, str]] = {}

    @property
    def operations(self) -> frozenset[str]:
        """What this method supports, derived from the capabilities it implements."""
        return implemented_operations(type(self))

    def from_peft(self, peft_config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """Turn a PEFT ``adapter_config.json`` (base fields removed) into this method's config.

        ``shapes`` maps canonical tensor names to shapes, for configs that record per-module facts.
        """
        return dict(peft_config)

    def to_peft(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`from_peft`."""
        return dict(config)

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
        """Every problem found, as findings (``adaptools check``); ``base`` adds checks against a base model."""
        return []

    def validate(self, adapter: Adapter, *, check_values: bool = True) -> None:
        """Raise :class:`AdapterFormatError` for the first error-severity finding (used by ``load``)."""
        for finding in self.lint(adapter, None, check_values=check_values):
            if finding.severity == "error" and finding.rule not in self.check_only:
                raise AdapterFormatError(finding.message, path=finding.path, tensor=finding.tensor,
                                         hint=finding.fix)

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        """A JSON-able description for ``adaptools info``."""
        return {}

    def refusal(self, operation: str, adapter: Adapter) -> str | None:
        """Why this particular adapter cannot do ``operation`` although the method supports it, or None
        (e.g. a bottleneck adapter with a non-linear activation cannot be merged)."""
        return None

    def require(self, operation: str, adapter: Adapter | None = None) -> None:
        """Raise :class:`UnsupportedOperationError` unless this method (and ``adapter``) can do ``operation``."""
        if operation not in self.operations:
            why = self.unsupported.get(operation)
            raise UnsupportedOperationError(
                f"method {self.name!r} cannot {operation}" + (f": {why}" if why else "")
                + f" (it supports: {', '.join(sorted(self.operations))})",
                path=adapter.source if adapter is not None else None)
        why = self.refusal(operation, adapter) if adapter is not None else None
        if why:
            raise UnsupportedOperationError(f"cannot {operation}: {why}", path=adapter.source)  # type: ignore[union-attr]


class Mergeable(ABC):
    """A method whose adapters change base weights (``merge``)."""

    def merge_warnings(self, adapter: Adapter) -> list[str]:
        """Sentences a merge should print about what it assumed for this adapter (an ambiguity of its
        config that the adapter itself cannot settle); empty when there is nothing to say."""
        return []

    @abstractmethod
    def merge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        """The updates a merge applies to the base. Raise IncompatibleBaseError if it does not fit."""

    @refusing_default
    def unmerge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        """The updates that take this adapter (merged with ``weight``) back out of ``base``, a merged model
        (``adaptools unmerge``, ``swap``): one inverse per update :meth:`merge_updates` makes, in the same
        order, each labelled with the kind of the update it undoes. The engine runs them before every other
        update, in the exact reverse of the merge's order (docs/unmerge.md). Raise UnsupportedOperationError
        naming why when an adapter's merge cannot be undone (the reason also belongs in
        :meth:`AdapterMethod.refusal` for ``"unmerge"``). By default a merge is not invertible: a method says
        how to undo it by overriding this."""
        name = getattr(self, "name", type(self).__name__)
        raise UnsupportedOperationError(f"method {name!r} cannot unmerge: it does not say how to undo its merge",
                                        path=adapter.source)


class LowRankAlgebra(ABC):
    """A method whose delta is a low-rank product: ``diff``, ``combine``, ``resize``, ``extract``."""

    @abstractmethod
    def low_rank(self, adapter: Adapter) -> dict[str, LowRank]:
        """Each module's delta as ``b @ a`` (scaling folded into ``b``). Raise UnsupportedOperationError
        when this adapter's delta is not a plain low-rank product (DoRA)."""

    @abstractmethod
    def from_low_rank(self, template: Adapter | None, factors: dict[str, LowRank],
                      extra: dict[str, torch.Tensor] | None = None) -> Adapter:
        """A new adapter of this method holding ``factors`` (scale 1), with ``template``'s base and config
        (None: a fresh config); ``extra`` are full tensors (``<module>.replace_weight``...)."""


class Initializable(ABC):
    """A method that can create a fresh adapter from a base (OLoRA and PiSSA initialisation)."""

    @abstractmethod
    def initialize(self, base: BaseInfo, read: Callable[[str], torch.Tensor], options: Mapping[str, Any]) -> Adapter:
        """A freshly initialised adapter for ``base``; ``read`` gives base weights."""


class RuntimeApplicable(ABC):
    """A method that can be applied to a live torch model unmerged (for validation and ``eval``)."""

    @abstractmethod
    def apply(self, adapter: Adapter, model: torch.nn.Module) -> AbstractContextManager[torch.nn.Module]:
        """Apply the adapter to ``model`` unmerged; undone on exit."""


class Bakeable(ABC):
    """A method whose training-time parts can be evaluated into what is served (a prefix's projection)."""

    @abstractmethod
    def bake(self, adapter: Adapter) -> Adapter:
        """The adapter with training-time parts evaluated (``convert --bake-projection``)."""


class PlainConvertible(ABC):
    """A method with a plainer equivalent (OLoRA/PiSSA -> LoRA on the original base): ``convert --to``."""

    #: The method name the plain form has.
    plain_method: ClassVar[str] = ""

    @abstractmethod
    def to_plain(self, adapter: Adapter, base: BaseInfo | None, read: Callable[[str], torch.Tensor] | None,
                 initial: Adapter | None, options: Mapping[str, Any] | None = None) -> Adapter:
        """The adapter as its plain form; ``base``/``read`` or ``initial`` supply what it needs."""


class AdapterFormat(ABC):
    """An on-disk adapter format: how to recognise, read and write it."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: True when the format writes a directory rather than a single file.
    writes_directory: ClassVar[bool] = True

    @property
    def can_read(self) -> bool:
        return type(self).read is not AdapterFormat.read

    @property
    def can_write(self) -> bool:
        return type(self).write is not AdapterFormat.write

    #: File-level lint rules this format checks: id -> (severity, one-line title).
    rules: ClassVar[dict[str, tuple[str, str]]] = {}

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """True if ``path`` (file or directory) is in this format. Must be cheap and never raise."""

    def lint(self, path: Path, adapter: Adapter | None, options: ReadOptions) -> list[Finding]:
        """File-level findings for ``adaptools check``: called first with ``adapter=None`` (before anything is
        read; an error finding ends the check there) and again with the adapter as read."""
        return []

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        raise UnsupportedOperationError(f"format {self.name!r} cannot be read")

    def base_mismatch(self, adapter: Adapter, base_config: Mapping[str, Any]) -> str | None:
        """Why ``adapter``, as this format read it, was made for another architecture than the base whose
        config.json is ``base_config`` (None: no objection). A merge asks before it computes anything, as it
        checks a PEFT adapter's ``base_model_class``; ``--ignore-base-mismatch`` skips both."""
        return None

    def write(self, adapter: Adapter, path: Path, options: WriteOptions = WriteOptions()) -> None:
        """Write ``adapter`` to ``path``, which does not exist yet (the caller renames it into place)."""
        raise UnsupportedOperationError(f"format {self.name!r} cannot be written")


@dataclass(frozen=True)
class ValidatorOption:
    """An option a validator takes. ``flag`` gives it a command-line spelling of its own on ``merge`` and
    ``check`` (``--eval-text``); every option is also reachable as ``--check-option NAME=VALUE``."""

    name: str
    type: type = str  # str, int, float, bool or pathlib.Path
    default: Any = None
    help: str = ""
    flag: str | None = None
    minimum: float | None = None  # numbers: the smallest accepted value


class Validator(ABC):
    """A check any operation can run on its output before publishing it (``--check NAME``)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: The options this validator reads from its context, declared so the CLI can offer and type them.
    options: ClassVar[tuple[ValidatorOption, ...]] = ()

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse unusable options (a missing evaluation file) before the operation writes anything."""

    def check_target(self, container: str, directory: bool) -> None:
        """Refuse, before anything is written, an output this check cannot run on. ``container`` names the
        output container (``folder``, or a single-file one such as ``gguf``); by default only checkpoint
        folders are checked. A validator that can run another kind of output overrides this."""
        if not directory:
            raise InputError(f"--check {self.name} runs on a checkpoint folder, not on a {container} output",
                             hint="merge to a folder to check it, or drop --check")

    @abstractmethod
    def validate(self, context: ValidationContext) -> Verdict:
        """Run the check and return a verdict; raise AdaptoolsError only for unusable input."""
