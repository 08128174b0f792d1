"""IA3 for adaptools, packaged as any third party would: one module, one entry point, public API only.

IA3 learns one vector per adapted module, ``ia3_l``, that rescales the layer (docs/peft.md, "IA3"):
attention-type modules scale output rows (``[out, 1]``, and the bias with them), modules listed in
``feedforward_modules`` scale input columns (``[1, in]``). Merging multiplies the weight by the vector,
which is exact against PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

from typing import Any

from adaptools import plugin


class IA3(plugin.AdapterMethod, plugin.Mergeable):
    name = "ia3"
    description = "IA3: learned per-channel rescaling vectors (PEFT IA3)"
    roles = ("ia3_l",)
    peft_types = ("IA3",)
    peft_roles = {"ia3_l": "ia3_l"}
    rules = {"IA3001": ("error", "tensor is not an IA3 vector"),
             "IA3002": ("error", "NaN or Inf values")}

    def lint(self, adapter, base=None, *, check_values=True):
        findings = []
        for name in adapter.tensor_names():
            shape = adapter.info(name).shape
            if plugin.split_name(name)[1] != "ia3_l" or len(shape) != 2 or 1 not in shape:
                findings.append(plugin.Finding("IA3001", "error", f"{name} {list(shape)} is not [out, 1] or [1, in]",
                                                  "save the adapter again with peft", **adapter.where(name)))
            elif check_values and not adapter.tensor(name).isfinite().all():
                findings.append(plugin.Finding("IA3002", "error", "NaN/Inf values", "retrain or re-save",
                                                  **adapter.where(name)))
        return findings

    def summary(self, adapter) -> dict[str, Any]:
        return {"adapted_modules": len(adapter.modules()),
                "feedforward_modules": adapter.config.get("feedforward_modules")}

    def merge_updates(self, adapter, base, weight=1.0):
        updates = []
        for module, roles in adapter.modules().items():
            name = roles["ia3_l"]
            target = base.locate(module, "weight")
            if target is None:
                raise plugin.IncompatibleBaseError(f"the base has no {module}.weight", **adapter.where(name))
            rows, cols = base.find(target).shape
            vector = adapter.tensor(name).float()
            if adapter.config.get("fan_in_fan_out"):
                vector = vector.T
            if vector.shape not in ((rows, 1), (1, cols)):
                raise plugin.IncompatibleBaseError(f"{list(vector.shape)} does not fit {target} [{rows}, {cols}]",
                                                      **adapter.where(name))
            scale = 1 + weight * (vector - 1)  # weight 1: the vector itself; weight 0: no change
            updates.append(plugin.TensorUpdate(target, "delta", lambda cur, orig, s=scale: cur * s.to(cur.device),
                                                  source=name))
            bias = base.locate(module, "bias")
            if bias is not None and vector.shape == (rows, 1):  # output scaling applies to the bias too
                updates.append(plugin.TensorUpdate(
                    bias, "delta", lambda cur, orig, s=scale: cur * s.reshape(-1).to(cur.device), source=name))
        return updates


@plugin.hookimpl
def register_methods(register):
    register(IA3())
