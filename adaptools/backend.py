"""How a base weight is stored and where an engine run puts its output: the :class:`Backend` plugins
register (a dense dtype, a quantized group, a model file of another format) and the
:class:`OutputContainer` s they may offer (docs/plugins.md, "Backends")."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Protocol

import torch

from .errors import UnsupportedOperationError
from .plugin_data import BaseTensor

if TYPE_CHECKING:  # the engine's types import this module; the contract names them for type checkers only
    from .checkpoint import Checkpoint
    from .engine.entries import MergePlan, ShardPlan
    from .engine.options import MergeOptions
    from .safetensors_io import TensorInfo


class Backend(ABC):
    """How a stored base weight decodes to a dense tensor and encodes back.

    Two kinds: a *tensor* backend stores a parameter as one tensor (dense dtypes) and implements
    :meth:`claims`, :meth:`decode` and :meth:`encode`; a *group* backend stores it across several tensors
    (NF4: packed bytes, absmax, a JSON state) and implements :meth:`find_groups`, :meth:`group_info`,
    :meth:`decode_group` and, to write them, :meth:`group_settings` and :meth:`encode_group`.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: True when decode and encode are plain dtype casts, so any block of rows can be decoded, updated and
    #: encoded on its own (the merge then casts blocks straight into the output).
    elementwise: ClassVar[bool] = False
    #: A sentence a ``merge --requantize`` into this backend's groups reports, when its re-encoding is not what
    #: the format's own tools would make (GPTQ: rounding onto the stored grid, without calibration).
    requantize_note: ClassVar[str] = ""
    #: True for the one backend ``adaptools requantize`` uses without ``--quant-type`` (bitsandbytes NF4, what
    #: transformers' ``load_in_4bit`` makes). Chosen by this flag, never by registration order, which plugins
    #: loaded in another order would change.
    quantize_default: bool = False

    @property
    def implementation(self) -> str:
        """Which code does the work (e.g. a native kernel or a fallback), for ``adaptools plugins``."""
        return "python"

    def claims(self, tensor: BaseTensor, checkpoint_config: Mapping[str, Any]) -> bool:
        """True if this (tensor) backend stores ``tensor``."""
        return False

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored tensor -> dense float32, always a new tensor (the merge updates it in place)."""
        raise UnsupportedOperationError(f"backend {self.name!r} stores parameters as groups, not tensors")

    def encode(self, dense: torch.Tensor, like: BaseTensor) -> torch.Tensor:
        """Dense float32 -> stored tensor, rounding once."""
        raise UnsupportedOperationError(f"backend {self.name!r} stores parameters as groups, not tensors")

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
        raise UnsupportedOperationError(f"backend {self.name!r} stores no groups")

    def decode_group(self, param: str, read: Callable[[str], torch.Tensor], names: list[str],
                     settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The dense value (in the group's dtype) of a grouped parameter. ``settings``: those the group was
        just encoded with (what :meth:`encode_group` was given; the engine decodes a re-encoded group to
        report how much of a change survived), or None for the group as the checkpoint stores it."""
        raise UnsupportedOperationError(f"backend {self.name!r} stores no groups")

    def decode_group_into(self, param: str, read: Callable[[str], torch.Tensor], names: list[str],
                          out: torch.Tensor) -> torch.Tensor:
        """:meth:`decode_group` of the group as stored, into ``out`` where the backend can: an uninitialised tensor
        of the group's dense dtype and shape (:meth:`group_info`) that the merge engine lends from its buffer
        pool. Why: a fresh tensor per decoded weight faults its pages in on first touch, a cost of the same order
        as decoding (docs/merge-engine.md, "Where the time goes"). The value returned is what
        counts: the engine keeps ``out`` only if that value is it. The default ignores ``out``."""
        return self.decode_group(param, read, names)

    def group_settings(self, param: str, read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
        """How a grouped parameter was encoded (to encode a changed value the same way)."""
        raise UnsupportedOperationError(f"backend {self.name!r} cannot re-encode groups")

    def encode_group(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Encode a dense value as this backend's group of tensors, named as the checkpoint names them."""
        raise UnsupportedOperationError(f"backend {self.name!r} cannot encode groups")

    def encode_group_decoded(self, param: str, dense: torch.Tensor, settings: Mapping[str, Any],
                             out: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`encode_group`, and what it wrote decoded again as ``decode_group(..., settings)`` decodes it.

        Why: the merge engine decodes every group it encodes, to check that what is written is finite where its
        source was and to report how much of the change survived (docs/merge-engine.md, "Encoding a group").
        A codec that can give back each block's decoded values while it encodes it (they are in cache then)
        saves a second pass over the whole tensor; such a backend overrides this with the same results. ``out``,
        an uninitialised tensor of ``dense``'s dtype and shape, may receive the decoded values (the engine lends
        a pooled buffer: a fresh one per tensor faults in page by page); the value returned is what counts. The
        default makes the two calls and ignores ``out``."""
        group = self.encode_group(param, dense, settings)
        written = self.decode_group(param, group.__getitem__, [k for k in group if k != param], settings)
        return group, written

    def quantize_settings(self, tensor: BaseTensor, options: Any) -> Mapping[str, Any]:
        """How a dense weight would be encoded as this backend's group (``adaptools requantize``), given the
        user's ``QuantizeOptions``; the result is passed to :meth:`encode_group`."""
        raise UnsupportedOperationError(f"backend {self.name!r} cannot quantize dense weights")

    def quantization_config(self, settings: Mapping[str, Any], options: Any) -> dict[str, Any]:
        """The ``quantization_config`` a checkpoint quantized with these settings carries in config.json,
        so that transformers loads it."""
        raise UnsupportedOperationError(f"backend {self.name!r} cannot describe a quantized checkpoint")

    def quantize_options(self, config: Mapping[str, Any]) -> Any:
        """The ``QuantizeOptions`` a quantized checkpoint's config.json says it was made with, or None when
        this backend did not make it (``merge --merge-base original --requantize``)."""
        return None

    def open_checkpoint(self, path: Path) -> Any:
        """A base stored as one file of a format this backend reads (not a Hugging Face folder), as an
        ``adaptools.Checkpoint`` (see ``Checkpoint.from_file``), or None when the file is not one. Must be
        cheap for files that are not its own, and raise an AdaptoolsError for one of its own that is broken."""
        return None

    def containers(self) -> Sequence[OutputContainer]:
        """The output containers this backend writes (``merge ... --to NAME``, or an output path ending in
        a container's suffix)."""
        return ()


class OutputWriter(Protocol):
    """What :meth:`OutputContainer.writer` returns: a context manager writing one planned shard in slot
    order. The engine calls ``copy`` for a stored tensor kept byte for byte and ``write`` for a computed
    one, then reads ``seconds`` (time spent writing) once the shard is closed."""

    @property
    def seconds(self) -> float: ...

    def copy(self, name: str, src: BinaryIO, info: TensorInfo) -> None:
        """The next tensor: ``info.nbytes`` bytes at ``info.begin`` of ``src``, unchanged."""

    def write(self, name: str, tensor: torch.Tensor, done: Callable[[], None] | None = None) -> None:
        """The next tensor, computed; ``done`` is called once its bytes are written (its buffer is reused)."""

    def __enter__(self) -> OutputWriter: ...

    def __exit__(self, exc_type: Any, exc: Any, tb: Any, /) -> None: ...


class OutputContainer(ABC):
    """Where an engine run (merge, dequantize, requantize) puts its output. The engine's own is a Hugging
    Face checkpoint folder of safetensors shards; a backend may offer others (:meth:`Backend.containers`),
    such as a single file of another format.

    The plan calls :meth:`prepare` before it decides any entry, and :meth:`warnings` once it has; the run
    opens one :meth:`writer` per planned shard (a single-file container gets one shard, written at the
    output path itself), then calls :meth:`finalize`, all inside the temporary output before it is
    published. ``--force`` asks every container's :meth:`owns` whether an existing output may be replaced.
    What a container may read of the plan (:class:`MergePlan`, :class:`ShardPlan`, :class:`Slot`,
    :class:`Entry`, :class:`GroupOutput`) is listed in docs/plugins.md, "Output containers".
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: An output path ending in this is written in this container without ``--to``.
    suffix: ClassVar[str | None] = None
    #: The suffix of the files this container writes (a one-file container's output; a folder container's
    #: shards): ``--force`` asks :meth:`owns` about the files directly in an existing output folder that end
    #: in one of the containers' file suffixes. None: it writes no file worth recognising inside a folder.
    file_suffix: ClassVar[str | None] = None
    #: True: the output is a folder; False: one file.
    directory: ClassVar[bool] = False
    #: What to do when requantizing erased most of a change (the survival warning's last sentence).
    survival_hint: ClassVar[str] = "Merge without --requantize for a faithful 16-bit model."
    #: True: a one-file output may instead be written as several part files (``--shard-size``, :meth:`split`).
    splits: ClassVar[bool] = False

    def owns(self, path: Path) -> bool:
        """True if the regular file ``path`` was written by adaptools in this container's file format (its
        metadata carries adaptools' keys), so that ``--force`` may replace it. Reads no more than the start
        of the file, and never raises (an unreadable file is not ours)."""
        return False

    def prepare(self, checkpoint: Checkpoint,
                options: MergeOptions) -> Mapping[str, tuple[Backend, Mapping[str, Any]]]:
        """Refuse (raise an AdaptoolsError) what this container cannot hold, before anything is read, and
        return the parameters it stores through a backend's :meth:`Backend.encode_group`:
        ``{param: (backend, settings)}``. An untouched parameter whose stored group belongs to that same
        backend is copied byte for byte; every other one is encoded."""
        return {}

    def warnings(self, plan: MergePlan) -> list[str]:
        """Sentences about the finished plan the user should read (a changed tensor stored in another type)."""
        return []

    def split(self, plan: MergePlan, max_bytes: int) -> list[ShardPlan]:
        """A one-file output that :attr:`splits`, laid out in parts of at most ``max_bytes`` of tensor data
        each (``plan.shards`` holds every slot in one shard), named as the format names its parts, first to
        last. One part keeps the output's own name. The run writes each part beside the others and publishes
        the first part last (:func:`adaptools.outputs.atomic_output`)."""
        raise UnsupportedOperationError(f"a {self.name} output is one file; --shard-size does not apply")

    @abstractmethod
    def writer(self, path: Path, shard: ShardPlan, plan: MergePlan, record: Mapping[str, Any]) -> OutputWriter:
        """The writer of one planned shard at ``path``, taking ``shard.slots`` in order (:class:`OutputWriter`).
        ``record`` is the provenance to store."""

    def finalize(self, path: Path, plan: MergePlan, record: Mapping[str, Any]) -> None:
        """Write what goes beside the tensors (index, config, model card) once every shard is written."""
