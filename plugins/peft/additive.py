"""The base of every PEFT method whose update adds a per-module delta to a weight (LoHa, LoKr, AdaLoRA, VeRA).

What such methods share is everything but the delta: finding the weight a module changes, adding the delta
to it with the merge weight (``current + delta * weight``, the delta as is at weight 1), and, unmerged,
a forward hook adding the delta's path to the layer's output (for a weight-shaped delta: the layer's conv,
or ``F.linear``). A subclass says which modules it adapts, computes the delta (refusing, naming why, a module
that does not fit its weight) and the path. Each keeps PEFT's own order of operations for its delta,
so merges stay bit for bit what peft's are.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from adaptools import plugin
from adaptools.plugin import Adapter, BaseInfo, TensorUpdate

from .common import hooked, locate, replacement_updates

#: The current value of a weight (fp32, on the merge's device) -> the module's unweighted delta, in that shape.
Delta = Callable[[torch.Tensor], torch.Tensor]
#: (the layer, its input in fp32) -> what the module's delta adds to the layer's output.
Path = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def layer_path(layer: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """What a weight-shaped ``delta`` adds to ``layer``'s output for input ``x``: the layer's own conv (its
    stride, padding, dilation and groups), or ``F.linear``."""
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, delta, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                        groups=layer.groups)
    if isinstance(layer, torch.nn.Conv1d):
        return F.conv1d(x, delta, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                        groups=layer.groups)
    return F.linear(x, delta)


class AdditiveDelta(plugin.AdapterMethod, plugin.Mergeable, plugin.RuntimeApplicable):
    """A method whose update adds a per-module delta to the module's weight."""

    #: Whether the unmerged forward adds the delta's path to the layer's output upcast to fp32 (AdaLoRA's
    #: does), rather than to the output as the layer gives it.
    fp32_output: ClassVar[bool] = False

    @abstractmethod
    def anchor(self, module: str, roles: Mapping[str, str]) -> str | None:
        """The tensor that names a module this method adds a delta to, in messages (None: no delta there)."""

    @abstractmethod
    def module_delta(self, adapter: Adapter, module: str, roles: Mapping[str, str], target: str,
                     base_shape: tuple[int, ...], shared: Any) -> Delta:
        """The module's delta onto base tensor ``target`` (of ``base_shape``), as PEFT's get_delta_weight
        computes it; refuse here, naming why, a module that cannot be merged onto it. ``shared`` is what
        :meth:`prepare_merge` returned."""

    @abstractmethod
    def module_path(self, adapter: Adapter, module: str, roles: Mapping[str, str], layer: torch.nn.Module,
                    shared: Any) -> Path:
        """What the module adds to ``layer``'s output unmerged, as PEFT's forward computes it; refuse here,
        naming why, a layer it cannot be applied to. ``shared`` is what :meth:`prepare_apply` returned."""

    def prepare_merge(self, adapter: Adapter, base: BaseInfo) -> Any:
        """What every module's delta needs from the whole adapter and base (VeRA's projections); None here."""
        return None

    def prepare_apply(self, adapter: Adapter, model: torch.nn.Module) -> Any:
        """What every module's path needs from the whole adapter and model; None here."""
        return None

    def source(self, roles: Mapping[str, str]) -> str:
        """The tensors a module's update is made of, for plans and messages."""
        return ", ".join(n for r, n in roles.items() if r in self.roles)

    def merge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        """Saved full tensors first, then each adapted module's weighted delta."""
        updates = replacement_updates(adapter, base)
        shared = self.prepare_merge(adapter, base)
        for module, roles in adapter.modules().items():
            anchor = self.anchor(module, roles)
            if anchor is None:
                continue
            target = locate(adapter, base, module, "weight", anchor)
            found = base.find(target)
            assert found is not None  # located above
            delta = self.module_delta(adapter, module, roles, target, tuple(found.shape), shared)
            updates.append(TensorUpdate(target, "delta", _added(delta, weight), source=self.source(roles)))
        return updates

    def apply(self, adapter: Adapter, model: torch.nn.Module) -> AbstractContextManager[torch.nn.Module]:
        """Forward hooks adding each adapted module's path to its layer's output, as PEFT's unmerged forward
        does (the input upcast to fp32, the sum cast back to the output's dtype)."""
        shared = self.prepare_apply(adapter, model)
        upcast = self.fp32_output

        def install(module: str, roles: dict[str, str], layer: torch.nn.Module) -> list[Any]:
            if self.anchor(module, roles) is None:
                return []
            path = self.module_path(adapter, module, roles, layer, shared)

            def hook(mod: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                extra = path(mod, inputs[0].float())
                return ((output.float() if upcast else output) + extra).to(output.dtype)

            return [layer.register_forward_hook(hook)]

        return hooked(adapter, model, install)


def _added(delta: Delta, weight: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The merge function adding ``delta`` with ``weight``: the delta itself at weight 1, else scaled first."""

    def fn(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        d = delta(current)
        return current + (d if weight == 1.0 else d * weight)

    return fn
