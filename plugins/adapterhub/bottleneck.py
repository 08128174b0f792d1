"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) as the AdapterHub ``adapters`` library defines them.

A bottleneck adapter sits after a transformer sub-layer (``mh_adapter``: after attention; ``output_adapter``:
after the feed-forward block) and adds ``up(act(down(x))) · scaling`` to the residual stream. Because of the
non-linearity it is not a weight delta: it cannot be merged, except when the activation is linear and its
input is the sub-layer's own output (Houlsby placement), where ``h' = (I + S·U·D)·h + S·(U·b_d + b_u)``
folds exactly into the sub-layer's output projection. Everything else is served unmerged (:meth:`apply`).

Canonical tensor names are ``<layer>.<location>.<role>``, e.g. ``model.layers.3.output_adapter.down``:

===================  ===============  ==========================================================
role                 shape            AdapterHub parameter (under ``<location>s.adapters.<name>.``)
===================  ===============  ==========================================================
down, down_bias      [d, H], [d]      ``adapter_down.0`` (``adapter_down.1`` with ``ln_before``)
up, up_bias          [H, d], [H]      ``adapter_up``
norm_before(_bias)   [H]              ``adapter_norm_before`` (``ln_before``)
norm_after(_bias)    [H]              ``adapter_norm_after`` (``ln_after``)
gate, gate_bias      [1, H], [1]      ``gate`` (``use_gating``)
scaling              [1] or [H]       ``scaling`` (``scaling: "learned"`` or ``"channel"``)
===================  ===============  ==========================================================

The config mirrors the library's ``adapter_config.json`` (``config`` holds the architecture flags,
``hidden_size``, ``model_type``, ``name``, ``version`` beside it), so it round-trips unchanged. The forward
maths follows ``adapters`` 1.3.0 (``methods/modeling.py``: ``Adapter``, ``ParallelAdapter``) for pre-norm
decoders, where the library passes no layer norm to the adapter; the fixtures check it against the
library's own logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from adaptools import plugin
from adaptools.plugin import Adapter, BaseInfo, Finding, IncompatibleBaseError, TensorUpdate, UnsupportedOperationError

from .config import (
    ACTIVATIONS,
    CONFIG_SCHEMA,
    CONV1D_MODELS,
    LINEAR,
    LOCATIONS,
    NAMES,
    ROLES,
    SUBLAYERS,
    architecture_name,
    enabled,
    flags,
    layer_index,
    reduction_for,
)
from .runtime import applied
from .unfold import unfold_updates


class Bottleneck(plugin.AdapterMethod, plugin.Mergeable, plugin.RuntimeApplicable):
    name = "bottleneck"
    description = "Bottleneck adapters (Houlsby, Pfeiffer, parallel) from the AdapterHub `adapters` library"
    #: merge is listed because a linear bottleneck folds exactly; every other one is refused with the reason.
    conditional = {"merge": "only with a linear activation after the sub-layer (Houlsby placement)",
                   "unmerge": "as merge, and only when the folded map I + S·U·D is invertible"}
    roles = ROLES
    unsupported = {"algebra": "a bottleneck adapter is not a low-rank weight delta; diff compares its tensors",
                   "init": "train it with the adapters library"}
    rules = {
        "BN001": ("error", "tensor shape disagrees with the config (hidden size, reduction factor)"),
        "BN002": ("error", "unknown tensor role or adapter location"),
        "BN003": ("error", "an adapter location lacks its down or up projection"),
        "BN004": ("error", "NaN or Inf values"),
        "BN005": ("warning", "tensors at a location or layer the config disables (mh_adapter, leave_out)"),
        "BN006": ("error", "activation function adaptools cannot evaluate"),
        "BN007": ("error", "hidden size or layer count disagrees with the base model"),
        "BN008": ("error", "configuration adaptools cannot apply (PHM layers, invertible adapters)"),
        "BN009": ("warning", "the adapter was trained on another model type than the base"),
        "BN010": ("error", "config field has the wrong type or range"),
        "BN011": ("error", "tensor dtype is not fp16, bf16, fp32 or fp64, or it has no dimensions"),
    }

    # --- reading and checking -----------------------------------------------------------------------

    def unsupported_features(self, config: Mapping[str, Any]) -> str | None:
        f = flags(config)
        if f["phm_layer"]:
            return "PHM (Compacter) layers"
        if f["inv_adapter"]:
            return f"invertible adapters ({f['inv_adapter']})"
        return None

    def lint(self, adapter: Adapter, base: BaseInfo | None = None, *, check_values: bool = True) -> list[Finding]:
        problems = plugin.json_problems(adapter.config, CONFIG_SCHEMA)
        if problems:  # nothing below can trust the config
            return [Finding("BN010", "error", message, "fix adapter_config.json (see the adapters library's "
                            "BnConfig)", path=adapter.source, field=field) for field, message in problems]
        f = flags(adapter.config)
        hidden = adapter.config.get("hidden_size")
        findings: list[Finding] = []
        for name in adapter.tensor_names():
            info = adapter.info(name)
            if info.dtype not in ("F64", "F32", "F16", "BF16") or not info.shape:
                findings.append(Finding("BN011", "error", f"dtype {info.dtype}, shape {list(info.shape)}",
                                        "save the adapter in fp32, fp16 or bf16", **adapter.where(name)))
        if findings:
            return findings
        why = self.unsupported_features(adapter.config)
        if why:
            findings.append(Finding("BN008", "error", f"{why} are not supported", "use a plain bottleneck config",
                                    path=adapter.source, field="config"))
        act = str(f.get("non_linearity") or "linear").lower()
        if act not in ACTIVATIONS:
            findings.append(Finding("BN006", "error", f"unknown non_linearity {act!r}",
                                    f"one of {', '.join(sorted(ACTIVATIONS))}", path=adapter.source,
                                    field="config.non_linearity"))
        for module, roles in adapter.modules().items():
            location = module.rpartition(".")[2]
            first = next(iter(roles.values()))
            where = adapter.where(first)
            if location not in LOCATIONS:
                findings.append(Finding("BN002", "error", f"unknown adapter location {module}",
                                        f"expected one of {', '.join(LOCATIONS)}", **where))
                continue
            layer = layer_index(module)
            if not enabled(f, module):
                findings.append(Finding("BN005", "warning", f"{module}: the config disables this adapter",
                                        "these tensors are ignored when the adapter is applied", **where))
            findings += self._lint_module(adapter, module, roles, f, hidden, layer, check_values)
        if base is not None:
            findings += self._lint_base(adapter, base, hidden)
        return findings

    def _lint_module(self, adapter: Adapter, module: str, roles: dict[str, str], f: Mapping[str, Any],
                     hidden: Any, layer: int | None, check_values: bool) -> list[Finding]:
        findings = []
        for role, name in roles.items():
            if role not in ROLES:
                findings.append(Finding("BN002", "error", f"unexpected tensor {name}", "drop it",
                                        **adapter.where(name)))
        if "down" not in roles or "up" not in roles:
            missing = "down" if "down" not in roles else "up"
            findings.append(Finding("BN003", "error", f"{module} has no {missing} projection",
                                    "re-save the adapter", **adapter.where(next(iter(roles.values())))))
            return findings
        rf = reduction_for(f, layer or 0)
        if isinstance(hidden, int) and rf:
            size = max(int(hidden // rf), 1)
            expected = {"down": (size, hidden), "down_bias": (size,), "up": (hidden, size), "up_bias": (hidden,)}
            expected.update({r: (hidden,) for r in ("norm_before", "norm_before_bias", "norm_after",
                                                    "norm_after_bias")})
            expected.update({"gate": (1, hidden), "gate_bias": (1,)})
            if f["scaling"] == "channel":
                expected["scaling"] = (hidden,)
            elif f["scaling"] == "learned":
                expected["scaling"] = (1,)
            for role, name in roles.items():
                shape = tuple(adapter.info(name).shape)
                if role in expected and shape != expected[role]:
                    findings.append(Finding("BN001", "error", f"shape {list(shape)}, config implies "
                                            f"{list(expected[role])} (hidden_size {hidden}, reduction {rf:g})",
                                            "ship the adapter_config.json that belongs to these weights",
                                            **adapter.where(name)))
        if check_values and not findings:
            for name in roles.values():
                if plugin.count_nonfinite(adapter.tensor(name)):
                    findings.append(Finding("BN004", "error", "NaN/Inf values", "retrain or re-save",
                                            **adapter.where(name)))
        return findings

    def _lint_base(self, adapter: Adapter, base: BaseInfo, hidden: Any) -> list[Finding]:
        findings = []
        base_hidden = base.config.get("hidden_size") or base.config.get("n_embd")
        if isinstance(hidden, int) and base_hidden and base_hidden != hidden:
            findings.append(Finding("BN007", "error", f"adapter hidden_size {hidden}, base {base_hidden}",
                                    "use the base the adapter was trained on", path=adapter.source,
                                    field="hidden_size"))
        trained_on, base_type = adapter.config.get("model_type"), base.config.get("model_type")
        if trained_on and base_type and trained_on != base_type:
            findings.append(Finding("BN009", "warning", f"trained on a {trained_on} model, the base is {base_type}",
                                    "check that this is the base the adapter belongs to", path=adapter.source,
                                    field="model_type"))
        layers = base.config.get("num_hidden_layers") or base.config.get("n_layer")
        for module, roles in adapter.modules().items():
            index = layer_index(module)
            if layers and index is not None and index >= layers:
                findings.append(Finding("BN007", "error", f"{module}: the base has only {layers} layers",
                                        "use the base the adapter was trained on",
                                        **adapter.where(next(iter(roles.values())))))
        return findings

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        f = flags(adapter.config)
        arch = architecture_name(f)
        locations = sorted({m.rpartition(".")[2] for m in adapter.modules()})
        merge_refusal = self.refusal("merge", adapter)
        return {"architecture": NAMES.get(arch, arch), "non_linearity": f.get("non_linearity"),
                "reduction_factor": f.get("reduction_factor"), "locations": locations,
                "adapters": len(adapter.modules()), "hidden_size": adapter.config.get("hidden_size"),
                "adapterhub_name": adapter.config.get("name"),
                "merge": "folds exactly (linear)" if merge_refusal is None else "refused: " + merge_refusal}

    # --- merge: only the linear case folds ----------------------------------------------------------

    def refusal(self, operation: str, adapter: Adapter) -> str | None:
        """Why this adapter cannot be merged (or unmerged): only a linear map after the sub-layer folds into a
        weight. Whether a fold can be undone also depends on its values: :meth:`unmerge_updates` says."""
        if operation not in ("merge", "unmerge"):
            return None
        f = flags(adapter.config)
        act = str(f.get("non_linearity") or "linear").lower()
        if act not in LINEAR:
            return (f"its non-linearity {act!r} sits between the down and up projections, so the adapter is "
                    "not a linear map of any weight; serve it with the adapter, or train one with "
                    "non_linearity='linear' to merge")
        reasons = {"is_parallel": "a parallel adapter reads the residual stream, not a sub-layer output",
                   "original_ln_before": "its input includes the residual stream (original_ln_before)",
                   "ln_before": "it normalises its input (ln_before)", "ln_after": "it normalises its output",
                   "use_gating": "its gate averages over the sequence"}
        for flag, reason in reasons.items():
            if f[flag]:
                return f"{reason}, which no weight change reproduces"
        if not f["original_ln_after"]:
            return "it drops the sub-layer's residual connection (original_ln_after=false)"
        if f["residual_before_ln"] is not True:
            return "its residual is taken after the residual add (residual_before_ln)"
        return self.unsupported_features(adapter.config)

    def unmerge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0) -> list[TensorUpdate]:
        """The fold undone: the inverse map of each location (unfold.py); refuses a singular one."""
        self.require("unmerge", adapter)
        return self.merge_updates(adapter, base, weight, invert=True)

    def merge_updates(self, adapter: Adapter, base: BaseInfo, weight: float = 1.0, *,
                      invert: bool = False) -> list[TensorUpdate]:
        self.require("unmerge" if invert else "merge", adapter)
        f = flags(adapter.config)
        conv1d = base.config.get("model_type") in CONV1D_MODELS
        updates = []
        for module, roles in adapter.modules().items():
            layer_path, _, location = module.rpartition(".")
            if not enabled(f, module):
                continue
            target = self._projection(adapter, base, layer_path, location, roles)
            updates += self._fold(adapter, base, f, roles, target, conv1d, weight, invert, module)
        return updates

    def _projection(self, adapter: Adapter, base: BaseInfo, layer_path: str, location: str,
                    roles: dict[str, str]) -> str:
        for candidate in SUBLAYERS.get(location, ((), ()))[1]:
            found = base.locate(f"{layer_path}.{candidate}", "weight")
            if found is not None:
                return found
        raise IncompatibleBaseError(f"cannot find the output projection that {layer_path}.{location} follows",
                                    **adapter.where(roles["down"]),
                                    hint="adaptools knows Llama-style (o_proj, down_proj) and GPT-2 (c_proj)")

    def _fold(self, adapter: Adapter, base: BaseInfo, f: Mapping[str, Any], roles: dict[str, str], target: str,
              conv1d: bool, weight: float, invert: bool = False, module: str = "") -> list[TensorUpdate]:
        down, up = adapter.tensor(roles["down"]).double(), adapter.tensor(roles["up"]).double()
        hidden = up.shape[0]

        def get(role: str, default: Callable[[], torch.Tensor]) -> torch.Tensor:
            return (adapter.tensor(roles[role]) if role in roles else default()).double()

        scale = get("scaling", lambda: torch.tensor(float(f["scaling"]))).expand(hidden).reshape(hidden, 1) * weight
        mix = torch.eye(hidden, dtype=torch.float64) + scale * (up @ down)  # h' = mix @ h + shift
        bias_down = get("down_bias", lambda: torch.zeros(down.shape[0]))
        bias_up = get("up_bias", lambda: torch.zeros(hidden))
        shift = scale[:, 0] * (up @ bias_down + bias_up)
        stored = base.find(target)
        out_dim = stored.shape[-1] if conv1d else stored.shape[0]  # type: ignore[union-attr]
        if out_dim != hidden:
            raise IncompatibleBaseError(f"{target} has {out_dim} outputs, the adapter expects {hidden}",
                                        **adapter.where(roles["up"]))
        bias_name = target[: -len("weight")] + "bias"
        has_bias = base.find(bias_name) is not None
        if invert and (has_bias or not bool(shift.abs().max() > 0)):
            return unfold_updates(adapter, target, bias_name if has_bias else None, scale * up, down, shift, conv1d,
                                  (roles["up"], roles.get("up_bias", roles["up"])), module)
        mix32, shift32 = mix.float(), shift.float()

        def fold_weight(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
            m = mix32.to(current.device)
            return current @ m.T if conv1d else m @ current

        updates = [TensorUpdate(target, "output_map", fold_weight, source=roles["up"])]
        if has_bias:
            def fold_bias(current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
                return mix32.to(current.device) @ current + shift32.to(current.device)

            updates.append(TensorUpdate(bias_name, "output_map", fold_bias, source=roles["up_bias"]))
        elif bool(shift.abs().max() > 0):
            raise UnsupportedOperationError(
                f"cannot merge: the adapter adds a constant through its biases, and {target} has no bias to "
                "hold it (this architecture has none)", **adapter.where(roles["up_bias"]))
        return updates

    # --- runtime application, for validation --------------------------------------------------------

    def apply(self, adapter: Adapter, model: torch.nn.Module) -> Any:
        why = self.unsupported_features(adapter.config)
        act = str(flags(adapter.config).get("non_linearity") or "linear").lower()
        if why or act not in ACTIVATIONS:
            raise UnsupportedOperationError(f"cannot apply: {why or f'unknown non_linearity {act!r}'}",
                                            path=adapter.source)
        return applied(adapter, model, ACTIVATIONS[act])
