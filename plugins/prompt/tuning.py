"""Prompt tuning and P-tuning (PEFT ``PROMPT_TUNING`` and ``P_TUNING``): learned virtual-token embeddings
put in front of the input embeddings (docs/prompt-tuning.md).

What PEFT's ``save_pretrained`` writes for both is one tensor, ``prompt_embeddings`` ``[T·S, token_dim]``
(T virtual tokens, S = ``num_transformer_submodules``, 1 for a causal LM), with no module path. For
P-tuning it is the *output* of the prompt encoder, evaluated once at save time; the encoder itself (an
MLP, or a bidirectional LSTM with an MLP head) is only in training checkpoints of the model
(``prompt_encoder.default.*`` keys). Those read into the roles below, and ``convert --bake-projection``
evaluates the encoder once into the embeddings PEFT would have saved, bit for bit, and labels the result
plain prompt tuning, which PEFT loads and serves identically (docs/prompt-tuning.md, "Baking
(`adaptools convert --bake-projection`)").

=======================  =========================  ==============================================
role                     shape                      key in a training checkpoint
=======================  =========================  ==============================================
prompt_embeddings        [T·S, token_dim]           (saved adapters: ``prompt_embeddings``)
embedding                [T·S, token_dim]           ``prompt_encoder.default.embedding.weight``
head_{0,2,4}(_bias)      MLP linears                ``prompt_encoder.default.mlp_head.{i}.weight|bias``
lstm_<param>             LSTM weights and biases    ``prompt_encoder.default.lstm_head.<param>``
=======================  =========================  ==============================================

Virtual tokens are extra inputs, not a change of any weight, so these adapters cannot be merged; they
are applied at runtime through ``inputs_embeds`` (:mod:`.runtime`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from adaptools import plugin
from adaptools.plugin import Adapter, Finding, IncompatibleBaseError, MemoryStore, UnsupportedOperationError

from .runtime import prepended

ROLE = "prompt_embeddings"
#: Most LSTM layers we name roles for (PEFT's default is 2); a deeper encoder reads as unknown tensors.
MAX_LSTM_LAYERS = 8
#: nn.LSTM's parameter names, 8 per layer (4 per direction), layer by layer.
LSTM_PARAMS = tuple(f"{kind}_{mat}_l{layer}{direction}" for layer in range(MAX_LSTM_LAYERS)
                    for direction in ("", "_reverse") for kind, mat in (("weight", "ih"), ("weight", "hh"),
                                                                        ("bias", "ih"), ("bias", "hh")))
#: role -> key under ``prompt_encoder[.default].`` in a training checkpoint.
ENCODER_KEYS = {"embedding": "embedding.weight",
                **{f"head_{i}{suffix}": f"mlp_head.{i}.{param}" for i in (0, 2, 4)
                   for suffix, param in (("", "weight"), ("_bias", "bias"))},
                **{f"lstm_{p}": f"lstm_head.{p}" for p in LSTM_PARAMS}}
P_TUNING_FIELDS = ("encoder_dropout", "encoder_hidden_size", "encoder_num_layers", "encoder_reparameterization_type")
#: The fields a PEFT PromptTuningConfig adds, as it writes them for randomly initialised prompts.
PROMPT_TUNING_FIELDS = {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_kwargs": None,
                        "tokenizer_name_or_path": None}
UNSUPPORTED = {
    "merge": "virtual tokens are extra inputs in front of the text, not a change of any weight, so no merge "
             "reproduces them: serve the adapter (adaptools eval --adapter applies it)",
    "algebra": "virtual-token embeddings are not a weight delta; diff compares its tensors",
}


def _peft_roles(roles: tuple[str, ...]) -> dict[str, str]:
    # Later entries win when writing, so the spelling without the adapter name ("default") comes last.
    encoder = {role: key for role, key in ENCODER_KEYS.items() if role in roles}
    return {**{f"prompt_encoder.default.{key}": role for role, key in encoder.items()}, ROLE: ROLE,
            **{f"prompt_encoder.{key}": role for role, key in encoder.items()}}


def _positive(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class PromptTuning(plugin.AdapterMethod, plugin.RuntimeApplicable, plugin.Bakeable):
    name = "prompt_tuning"
    description = "Prompt tuning (PEFT PROMPT_TUNING): learned virtual-token embeddings before the input"
    roles: ClassVar[tuple[str, ...]] = (ROLE, "embedding")
    peft_types: ClassVar[tuple[str, ...]] = ("PROMPT_TUNING",)
    peft_roles = _peft_roles(roles)
    unsupported = UNSUPPORTED
    rules = {"PROMPT001": ("error", "tensor shape disagrees with the config"),
             "PROMPT002": ("error", "tensor of another method, or prompt_embeddings and the encoder both missing"),
             "PROMPT003": ("error", "NaN, Inf or non-float values"),
             "PROMPT004": ("info", "the training-time encoder is stored; `convert --bake-projection` makes the "
                                   "embeddings PEFT saves"),
             "PROMPT005": ("error", "token_dim disagrees with the base model's hidden size"),
             "PROMPT006": ("error", "config field missing or invalid")}

    # --- config and shapes --------------------------------------------------------------------------

    def config_problems(self, config: dict[str, Any]) -> list[tuple[str, str]]:
        """(field, problem) for every config field the tensors' meaning depends on."""
        problems = [(key, f"{key} is {config.get(key)!r}, not a positive integer")
                    for key in ("num_virtual_tokens", "token_dim") if _positive(config, key) is None]
        submodules = config.get("num_transformer_submodules")
        if submodules is not None and _positive(config, "num_transformer_submodules") is None:
            problems.append(("num_transformer_submodules", f"num_transformer_submodules is {submodules!r}"))
        return problems

    def expected_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Role -> shape the config implies (empty when config_problems is not)."""
        if self.config_problems(config):
            return {}
        tokens = config["num_virtual_tokens"] * (config.get("num_transformer_submodules") or 1)
        return {ROLE: (tokens, config["token_dim"]), "embedding": (tokens, config["token_dim"])}

    def encoder_roles(self, config: dict[str, Any]) -> tuple[str, ...]:
        """The roles of the training-time encoder, all needed to bake it."""
        return ("embedding",)

    # --- check --------------------------------------------------------------------------------------

    def lint(self, adapter: Adapter, base: plugin.BaseInfo | None = None, *,
             check_values: bool = True) -> list[Finding]:
        config_file = Path(adapter.source) / "adapter_config.json"
        where_config = str(config_file) if config_file.is_file() else adapter.source
        findings = [Finding("PROMPT006", "error", problem, "ship the adapter_config.json PEFT wrote with these "
                            "weights", path=where_config, field=key)
                    for key, problem in self.config_problems(adapter.config)]
        expected = self.expected_shapes(adapter.config)
        present = set()
        for name in adapter.tensor_names():
            where = adapter.where(name)
            module, role = plugin.split_name(name)
            if module or role not in self.roles:
                findings.append(Finding("PROMPT002", "error", f"unexpected tensor {name} (not part of "
                                        f"{self.name})", "drop it, or read it with the method it belongs to",
                                        **where))
                continue
            present.add(role)
            info = adapter.info(name)
            if expected and tuple(info.shape) != expected.get(role):
                implied = list(expected[role]) if role in expected else "no such tensor"
                findings.append(Finding("PROMPT001", "error", f"shape {list(info.shape)}, the config implies "
                                        f"{implied}", "ship the adapter_config.json that belongs to these "
                                        "weights", **where))
            elif info.dtype not in ("F32", "F16", "BF16", "F64"):
                findings.append(Finding("PROMPT003", "error", f"dtype {info.dtype}, not a float", "re-save the "
                                        "adapter", **where))
            elif check_values and plugin.count_nonfinite(adapter.tensor(name)):
                findings.append(Finding("PROMPT003", "error", "NaN/Inf values", "retrain or re-save", **where))
        encoder = set(self.encoder_roles(adapter.config))
        if ROLE not in present and not encoder <= present:
            missing = ", ".join(sorted(encoder - present)) or "the encoder"
            findings.append(Finding("PROMPT002", "error", f"no prompt_embeddings, and the encoder lacks {missing}",
                                    "re-save the adapter with PEFT's save_pretrained", path=adapter.source))
        elif ROLE not in present:
            findings.append(Finding("PROMPT004", "info", "holds the training-time prompt encoder, not the "
                                    "embeddings it produces", "adaptools convert ADAPTER OUT --bake-projection",
                                    path=adapter.source))
        if base is not None and expected:
            hidden = _hidden_size(base.config)
            if hidden and hidden != adapter.config["token_dim"]:
                findings.append(Finding("PROMPT005", "error", f"token_dim {adapter.config['token_dim']}, the base's "
                                        f"embeddings are {hidden} wide", "use the base the adapter was trained "
                                        "on", path=adapter.source, field="token_dim"))
        return findings

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        config = adapter.config
        out = {key: config.get(key) for key in ("num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                                "prompt_tuning_init")}
        stored = {plugin.split_name(n)[1] for n in adapter.tensor_names()}
        out["stores"] = "virtual-token embeddings" if ROLE in stored else "training-time prompt encoder"
        return out

    # --- baking and runtime application -------------------------------------------------------------

    def evaluate_encoder(self, adapter: Adapter, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The virtual-token embeddings the stored encoder produces (prompt tuning: the embedding itself)."""
        return tensors["embedding"]

    def baked_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return dict(config)

    def bake(self, adapter: Adapter) -> Adapter:
        """Plain prompt tuning holding ``prompt_embeddings``, as PEFT saves it, from a stored encoder."""
        names = {plugin.split_name(n)[1]: n for n in adapter.tensor_names()}
        if adapter.method == "prompt_tuning" and set(names) == {ROLE}:
            return adapter
        if ROLE in names:
            tensors = {ROLE: adapter.tensor(names[ROLE])}
        else:
            missing = [role for role in self.encoder_roles(adapter.config) if role not in names]
            if missing or self.config_problems(adapter.config):
                raise UnsupportedOperationError(f"cannot bake the prompt encoder: {', '.join(missing) or 'config'} "
                                                "missing or invalid (see adaptools check)", path=adapter.source)
            stored = {role: adapter.tensor(names[role]) for role in self.encoder_roles(adapter.config)}
            tensors = {ROLE: self.evaluate_encoder(adapter, stored).contiguous()}
        provenance = {**adapter.provenance, "baked_from": adapter.method}
        return replace(adapter, method="prompt_tuning", config=self.baked_config(adapter.config),
                       tensors=MemoryStore(tensors, adapter.source), provenance=provenance)

    def apply(self, adapter: Adapter, model: torch.nn.Module) -> Any:
        config = adapter.config
        if (config.get("num_transformer_submodules") or 1) != 1:
            raise UnsupportedOperationError("cannot apply: encoder-decoder prompts (num_transformer_submodules "
                                            f"{config.get('num_transformer_submodules')}) are not supported",
                                            path=adapter.source)
        hidden = getattr(model.get_input_embeddings(), "embedding_dim", None)  # type: ignore[operator]
        if hidden is not None and hidden != config.get("token_dim"):
            raise IncompatibleBaseError(f"the virtual tokens are {config.get('token_dim')} wide, the model's "
                                        f"embeddings {hidden}", path=adapter.source)
        baked = self.bake(adapter)
        return prepended(baked.tensor(ROLE), model, adapter.source)


class PTuning(PromptTuning):
    name = "p_tuning"
    description = "P-tuning (PEFT P_TUNING): virtual tokens from an MLP or LSTM prompt encoder"
    roles = (ROLE, *ENCODER_KEYS)
    peft_types = ("P_TUNING",)
    peft_roles = _peft_roles(roles)

    def config_problems(self, config: dict[str, Any]) -> list[tuple[str, str]]:
        problems = super().config_problems(config)
        kind = config.get("encoder_reparameterization_type")
        if kind not in ("MLP", "LSTM"):
            problems.append(("encoder_reparameterization_type", f"encoder_reparameterization_type is {kind!r}, "
                             "not MLP or LSTM"))
        for key in ("encoder_hidden_size", "encoder_num_layers"):
            if config.get(key) is not None and _positive(config, key) is None:
                problems.append((key, f"{key} is {config.get(key)!r}, not a positive integer"))
        if kind == "LSTM" and (_positive(config, "encoder_num_layers") or 0) > MAX_LSTM_LAYERS:
            problems.append(("encoder_num_layers", f"an LSTM encoder of {config['encoder_num_layers']} layers; "
                             f"at most {MAX_LSTM_LAYERS} are read"))
        return problems

    def encoder_roles(self, config: dict[str, Any]) -> tuple[str, ...]:
        if config.get("encoder_reparameterization_type") == "LSTM":
            lstm = tuple(f"lstm_{p}" for p in LSTM_PARAMS[: 8 * (_positive(config, "encoder_num_layers") or 0)])
            return ("embedding", *lstm, "head_0", "head_0_bias", "head_2", "head_2_bias")
        return ("embedding", "head_0", "head_0_bias", "head_2", "head_2_bias", "head_4", "head_4_bias")

    def expected_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes(config)
        hidden = _positive(config, "encoder_hidden_size")
        if not shapes or hidden is None:
            return shapes
        d = config["token_dim"]
        if config["encoder_reparameterization_type"] == "MLP":
            dims = {0: (hidden, d), 2: (hidden, hidden), 4: (d, hidden)}
        else:
            dims = {0: (2 * hidden, 2 * hidden), 2: (d, 2 * hidden)}
            for p in LSTM_PARAMS[: 8 * (_positive(config, "encoder_num_layers") or 0)]:
                layer_input = d if p.endswith(("_l0", "_l0_reverse")) else 2 * hidden
                width = layer_input if "weight_ih" in p else hidden
                shapes[f"lstm_{p}"] = (4 * hidden, width) if p.startswith("weight") else (4 * hidden,)
        for i, (rows, cols) in dims.items():
            shapes[f"head_{i}"], shapes[f"head_{i}_bias"] = (rows, cols), (rows,)
        return shapes

    def summary(self, adapter: Adapter) -> dict[str, Any]:
        out = super().summary(adapter)
        del out["prompt_tuning_init"]
        out.update({key: adapter.config.get(key) for key in P_TUNING_FIELDS})
        return out

    def evaluate_encoder(self, adapter: Adapter, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """PEFT's ``get_prompt_embedding_to_save``: ``encoder(arange(T)[None])[0]``, computed the way
        ``save_pretrained`` computes it (grad mode on, which picks the LSTM kernel PEFT's saved values
        come from; docs/prompt-tuning.md, "Baking (`adaptools convert --bake-projection`)")."""
        config = adapter.config
        x = tensors["embedding"].unsqueeze(0)
        if config["encoder_reparameterization_type"] == "LSTM":
            x = _lstm(x, tensors, config["encoder_hidden_size"], config["encoder_num_layers"])
            return F.linear(F.relu(F.linear(x, tensors["head_0"], tensors["head_0_bias"])), tensors["head_2"],
                            tensors["head_2_bias"])[0].detach()
        with torch.no_grad():
            x = F.relu(F.linear(x, tensors["head_0"], tensors["head_0_bias"]))
            x = F.relu(F.linear(x, tensors["head_2"], tensors["head_2_bias"]))
            return F.linear(x, tensors["head_4"], tensors["head_4_bias"])[0]

    def baked_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config PEFT writes for plain prompt tuning with the same virtual tokens and base."""
        baked = {k: v for k, v in config.items() if k not in P_TUNING_FIELDS}
        baked.update(PROMPT_TUNING_FIELDS, peft_type="PROMPT_TUNING", inference_mode=True)
        return baked


def _lstm(x: torch.Tensor, tensors: dict[str, torch.Tensor], hidden: int, layers: int) -> torch.Tensor:
    """A bidirectional batch-first LSTM holding the stored weights, run as in training (grad mode on,
    weights requiring grad), its output sequence detached."""
    lstm = torch.nn.LSTM(x.shape[-1], hidden, num_layers=layers, bidirectional=True, batch_first=True,
                         device="meta", dtype=x.dtype)
    state = {p: tensors[f"lstm_{p}"].detach().clone().requires_grad_(True) for p, _ in lstm.named_parameters()}
    lstm.load_state_dict(state, assign=True)
    with torch.enable_grad():
        out: torch.Tensor = lstm(x)[0]
    return out.detach()


def _hidden_size(config: dict[str, Any]) -> int | None:
    text = config.get("text_config")
    source = text if isinstance(text, dict) else config
    value = source.get("hidden_size") or source.get("n_embd") or source.get("d_model")
    return value if isinstance(value, int) else None
