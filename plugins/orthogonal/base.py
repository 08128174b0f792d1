"""What OFT and BOFT share: a multiplicative update of a Linear layer, ``W' = (M @ Wᵀ)ᵀ`` (then rows scaled,
for BOFT), merged as a "delta"-kind update whose function multiplies, and applied unmerged by rotating the
layer's input (and scaling its output). Each method supplies its matrix ``M`` (``docs/methods.md``).

The merge engine applies a parameter's updates in the order the adapters are given, so stacked adapters
compose as PEFT composes them when it merges several adapters one after the other.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import Adapter, BaseInfo, IncompatibleBaseError, TensorUpdate, UnsupportedOperationError

from ..peft.common import hooked, locate, replacement_updates, weight_of
from ..peft.lint import Lint

CONV_REFUSAL = "conv layers are not supported yet (PEFT views the kernel as part of the input rotation)"


def exactly_one(report: Lint, rule: str, first: tuple[str, int], second: tuple[str, int]) -> bool:
    """Whether the config's two block fields (name, default) are usable: non-negative integers of which
    exactly one is set, as PEFT requires (else a finding of ``rule`` on the first field)."""
    (one, one_default), (other, other_default) = first, second
    a, b = report.adapter.config.get(one, one_default), report.adapter.config.get(other, other_default)
    valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (a, b))
    if valid and bool(a) == bool(b):
        report.add(rule, f"{one} is {a} and {other} is {b}", field=one)
        return False
    return valid


def block_diagonal(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.block_diag`` of ``blocks`` (which torch leaves unannotated, so it is typed here, once)."""
    matrix: torch.Tensor = torch.block_diag(*blocks)  # type: ignore[no-untyped-call]
    return matrix


class Orthogonal(plugin.AdapterMethod, plugin.Mergeable, plugin.RuntimeApplicable):
    """A method whose update multiplies the weight by a matrix acting on the input dimension."""

    unsupported = {"algebra": "a multiplicative update is not a low-rank delta; diff compares its tensors"}
    #: The role that holds the update.
    marker: str
    #: Roles that mark an adapted module, including kinds this plugin refuses (so none is skipped silently).
    markers: tuple[str, ...] = ()

    @abstractmethod
    def rotation(self, adapter: Adapter, module: str, roles: Mapping[str, str], in_features: int) -> torch.Tensor:
        """The module's ``[in, in]`` matrix in fp32, exactly as PEFT's get_delta_weight builds it."""

    def scale(self, adapter: Adapter, roles: Mapping[str, str]) -> torch.Tensor | None:
        """A per-output-row scale ``[out, 1]`` applied after the rotation (BOFT's ``boft_s``), or None."""
        return None

    def module_refusal(self, adapter: Adapter, roles: Mapping[str, str]) -> str | None:
        """Why this module cannot be merged or applied (None: it can)."""
        return None

    def _check(self, adapter: Adapter, module: str, roles: Mapping[str, str], weight_shape: tuple[int, ...],
               weight: float = 1.0) -> int:
        """Refuse what cannot be done, naming why; return the layer's input size."""
        name = next(roles[r] for r in self.markers if r in roles)
        why = self.module_refusal(adapter, roles)
        if why is None and len(weight_shape) != 2:
            why = CONV_REFUSAL
        if why is None and weight != 1.0:
            why = (f"weight {weight:g}: a rotation has no weighted form (scaling its generator would give "
                   "another rotation, not a fraction of this one); merge it with weight 1")
        if why:
            raise UnsupportedOperationError(f"cannot use {module}: {why}", **adapter.where(name))
        return int(weight_shape[1])

    def merge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        updates = replacement_updates(adapter, base)
        for module, roles in adapter.modules().items():
            if not any(r in roles for r in self.markers):
                continue
            target = locate(adapter, base, module, "weight", next(roles[r] for r in self.markers if r in roles))
            shape = tuple(base.find(target).shape)  # type: ignore[union-attr]
            in_features = self._check(adapter, module, roles, shape, weight)
            matrix = self.rotation(adapter, module, roles, in_features)
            scale = self.scale(adapter, roles)
            if scale is not None and scale.shape[0] != shape[0]:
                raise IncompatibleBaseError(f"the output scale has {scale.shape[0]} rows; {target} has {shape[0]}",
                                            **adapter.where(roles[self.marker]))

            def fn(current: torch.Tensor, original: torch.Tensor, m: torch.Tensor = matrix,
                   s: torch.Tensor | None = scale) -> torch.Tensor:
                # PEFT: torch.mm(M, Wᵀ)ᵀ (a transposed view into the product, as there), then the row scale
                rotated = torch.mm(m.to(current.device), current.t()).t()
                return rotated if s is None else rotated * s.to(current.device)

            updates.append(TensorUpdate(target, "delta", fn, source=roles[self.marker]))
        return updates

    def input_rotation(self, adapter: Adapter, module: str, roles: Mapping[str, str], in_features: int) -> Any:
        """A function ``x -> x'`` rotating a layer's input as PEFT's unmerged forward does."""
        matrix = self.rotation(adapter, module, roles, in_features)
        return lambda x: x @ matrix

    def apply(self, adapter: Adapter, model: torch.nn.Module) -> Any:
        """The unmerged forward: the input rotated before the layer; BOFT also scales the output around the
        bias, ``(y - b) · s + b``."""

        def install(module: str, roles: dict[str, str], layer: torch.nn.Module) -> list[Any]:
            if not any(r in roles for r in self.markers):
                return []
            in_features = self._check(adapter, module, roles, tuple(weight_of(layer).shape))
            rotate = self.input_rotation(adapter, module, roles, in_features)
            scale = self.scale(adapter, roles)

            def pre(mod: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                x = args[0]
                return (rotate(x.to(torch.float32)).to(x.dtype), *args[1:])

            handles = [layer.register_forward_pre_hook(pre)]
            if scale is not None:
                s = scale.squeeze(-1)

                def post(mod: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                    bias: torch.Tensor | None = getattr(mod, "bias", None)
                    if bias is None:
                        return output * s.to(output.dtype)
                    return ((output - bias) * s.to(output.dtype) + bias).to(output.dtype)

                handles.append(layer.register_forward_hook(post))
            return handles

        return hooked(adapter, model, install)
