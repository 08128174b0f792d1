"""Property-based fuzzing of every JSON-ish input (issue 13): adapter configs, safetensors headers, schema
metadata, base configs and 4-bit quant states. The property: adaptools either succeeds or raises an
AdaptoolsError, never anything else. A header our check passes must also be readable by the Rust
``safetensors`` reader.

The default run tries a few hundred examples in all, derandomized so that CI is repeatable; the ``slow``
tests run the same properties with many more random examples (hypothesis profile ``adaptools-slow``).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import adapter_path, base_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import adaptools
from adaptools.checkpoint import Checkpoint
from adaptools.operations.check import check
from adaptools_plugins.bitsandbytes import nf4 as nf4

settings.register_profile("adaptools-fast", max_examples=50, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("adaptools-slow", max_examples=1000, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))

# --- strategies ------------------------------------------------------------------------------------------

ODD_TEXT = st.sampled_from(["", "\n", "\x1b[2J", "\ud800", "q_proj", "(a|a)*$", "[", "^.*$", "a" * 2000, "é"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), ODD_TEXT, st.text(max_size=8),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 4, -1, 1e300, 2**63]))
JSONISH = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=8)
NESTED = st.integers(30, 3000).map(lambda n: "[" * n + "]" * n)


def dumps(value) -> str:
    """JSON text as a sloppy writer makes it: NaN and Infinity included, lone surrogates escaped."""
    return json.dumps(value, allow_nan=True)


LORA_FIELDS = ["r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
               "layers_to_transform", "layers_pattern", "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias",
               "modules_to_save", "trainable_token_indices", "init_lora_weights", "bias", "enable_lora",
               "peft_version", "base_model_name_or_path", "peft_type"]
PATTERN_MAPS = st.dictionaries(st.one_of(ODD_TEXT, st.sampled_from(["q_proj", r"layers\.0\..*", "v_proj"])),
                               SCALARS, max_size=3)
CONFIG_EDITS = st.dictionaries(st.sampled_from(LORA_FIELDS),
                               st.one_of(JSONISH, PATTERN_MAPS, st.lists(ODD_TEXT, max_size=3)), max_size=4)


# --- the properties ----------------------------------------------------------------------------------------

def adaptools_error_or_success(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except adaptools.AdaptoolsError as exc:
        assert str(exc) and "\n" not in str(exc) and "\x1b" not in str(exc)
        return None


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "adapter"
    shutil.copytree(adapter_path("llama-lora"), out)
    return out


def fuzz_adapter_config(adapter_dir: Path, edits: dict, raw: str | None) -> None:
    config = json.loads((adapter_path("llama-lora") / "adapter_config.json").read_text())
    config.update(edits)
    (adapter_dir / "adapter_config.json").write_text(raw if raw is not None else dumps(config),
                                                     encoding="utf-8", errors="surrogatepass")
    adapter = adaptools_error_or_success(adaptools.load, adapter_dir)
    adaptools_error_or_success(check, adapter_dir)
    if adapter is not None:  # what loads must also describe and convert
        method = adaptools.plugin.get_method(adapter.method)
        method.summary(adapter)
        adaptools_error_or_success(method.merge_warnings, adapter)
        adaptools_error_or_success(method.low_rank, adapter)


DTYPE_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16",
               "U32", "U64"]
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@st.composite
def headers(draw):
    """A header that is mostly right (sequential offsets), with hostile mutations mixed in."""
    tensors, offset = {}, 0
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.one_of(st.text(min_size=1, max_size=6), ODD_TEXT))
        dtype = draw(st.sampled_from(DTYPE_CODES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = math.prod(shape) * SIZES[dtype]
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        mutation = draw(st.sampled_from(["none"] * 6 + ["dtype", "shape", "offsets", "extra", "missing"]))
        if mutation != "none":
            key = {"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}.get(mutation, "junk")
            if mutation == "missing":
                entry.pop(draw(st.sampled_from(sorted(entry))))
            else:
                entry[key] = draw(JSONISH)
        tensors[name] = entry
        offset += size
    if draw(st.booleans()):
        tensors["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4),
                                                                 max_size=2), JSONISH))
    extra = draw(st.sampled_from([0, 0, 0, 1, -1]))
    return tensors, max(offset + extra, 0)


def fuzz_header(tmp: Path, header: dict, data_len: int, raw: str | None) -> None:
    text = raw if raw is not None else dumps(header)
    encoded = text.encode("utf-8", "surrogatepass")
    path = tmp / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\x01" * data_len)
    parsed = adaptools_error_or_success(adaptools.plugin.read_header, path)
    if parsed is None:
        return
    # Whatever our check passes, the Rust reader must read, tensor by tensor, with the same dtype and shape.
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(parsed.tensors)
        for name, info in parsed.tensors.items():
            tensor = handle.get_tensor(name)
            assert tuple(tensor.shape) == info.shape and tensor.dtype == info.torch_dtype


def fuzz_metadata(metadata: dict) -> None:
    adaptools_error_or_success(adaptools.plugin.parse_metadata, metadata, "fuzz.safetensors")


METADATA = st.fixed_dictionaries(
    {"adaptools.schema": st.one_of(st.sampled_from(["1", "0", "2", "01", "\u0661", " 1"]), st.text(max_size=3)),
     "adaptools.method": st.one_of(st.sampled_from(["lora", "LoRA", "", "bottleneck"]), st.text(max_size=4)),
     "adaptools.config": st.one_of(JSONISH.map(dumps), NESTED, st.text(max_size=6)),
     "adaptools.base": st.one_of(JSONISH.map(dumps), st.just('{"name": null, "revision": null, "sha256": null}')),
     "adaptools.provenance": st.one_of(JSONISH.map(dumps), NESTED)})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "base"
    shutil.copytree(base_path("gpt2"), out)
    return out


BASE_FIELDS = ["architectures", "model_type", "tie_word_embeddings", "text_config", "n_embd", "n_layer", "n_head",
               "vocab_size", "quantization_config", "hidden_size", "num_key_value_heads"]


def fuzz_base_config(base_dir: Path, edits: dict, raw: str | None) -> None:
    config = json.loads((base_path("gpt2") / "config.json").read_text())
    config.update(edits)
    (base_dir / "config.json").write_text(raw if raw is not None else dumps(config), encoding="utf-8",
                                          errors="surrogatepass")
    checkpoint = adaptools_error_or_success(Checkpoint.open, base_dir)
    if checkpoint is not None:
        info = checkpoint.base_info()
        for name in ("gpt2-lora", "gpt2-dora"):  # the header-only checks against a base read its config
            adapter = adaptools.load(adapter_path(name))
            adaptools.plugin.get_method(adapter.method).lint(adapter, info, check_values=False)
        prefix = adaptools.plugin.get_method("prefix_tuning")
        dummy = adaptools.Adapter("prefix_tuning", {"num_virtual_tokens": 1, "num_layers": 2, "token_dim": 64},
                                  adaptools.plugin.MemoryStore({"prompt_embeddings": torch.zeros(1, 256)}))
        prefix.lint(dummy, info, check_values=False)


NF4_PARAM = "model.layers.0.self_attn.q_proj.weight"
STATE_FIELDS = {"quant_type": st.sampled_from(["nf4", "fp4", "int8", ""]),
                "blocksize": st.one_of(st.sampled_from([64, 32, 4096, 0, -64, 64.0, True]), SCALARS),
                "dtype": st.one_of(st.sampled_from(["bfloat16", "float32", "float16", "int8"]), SCALARS),
                "shape": st.one_of(st.lists(st.integers(-2, 130), max_size=3), st.just([64, 64]), JSONISH),
                "nested_blocksize": st.one_of(st.just(256), SCALARS),
                "nested_offset": st.one_of(st.floats(allow_nan=True), SCALARS),
                "nested_dtype": st.one_of(st.just("float32"), SCALARS)}


@pytest.fixture(scope="module")
def nf4_group() -> dict[str, torch.Tensor]:
    stored = load_file(str(base_path("llama-nf4") / "model.safetensors"))
    return {k: v for k, v in stored.items() if k == NF4_PARAM or k.startswith(NF4_PARAM + ".")}


def fuzz_quant_state(group: dict[str, torch.Tensor], edits: dict, drop: list[str], cut: int | None,
                     raw: bytes | None) -> None:
    blob_name = f"{NF4_PARAM}.quant_state.bitsandbytes__nf4"
    blob = json.loads(bytes(group[blob_name].tolist()))
    blob.update(edits)
    for key in drop:
        blob.pop(key, None)
    data = raw if raw is not None else dumps(blob).encode("utf-8", "surrogatepass")
    tensors = {**group, blob_name: torch.tensor(list(data), dtype=torch.uint8)}
    if cut is not None:
        absmax = tensors[f"{NF4_PARAM}.absmax"]
        tensors[f"{NF4_PARAM}.absmax"] = absmax[: min(cut, absmax.numel())]
    state = adaptools_error_or_success(nf4.QuantState.from_state_dict, NF4_PARAM, tensors)
    if state is not None:
        dense = adaptools_error_or_success(nf4.dequantize_4bit, tensors[NF4_PARAM], state)
        if dense is not None:
            assert tuple(dense.shape) == state.shape and bool(torch.isfinite(dense.float()).all())
    backend = nf4.FourBit("nf4")
    adaptools_error_or_success(backend.group_info, NF4_PARAM, tensors.__getitem__)
    adaptools_error_or_success(backend.group_settings, NF4_PARAM, tensors.__getitem__)


# --- the tests ------------------------------------------------------------------------------------------

PROPERTIES = ["adapter config", "safetensors header", "schema metadata", "base config", "quant state"]


def run_property(name: str, profile: str, adapter_dir: Path, base_dir: Path, tmp: Path, group) -> None:
    if name == "adapter config":
        @given(CONFIG_EDITS, st.one_of(st.none(), st.none(), NESTED, st.text(max_size=10)))
        def prop(edits, raw):
            fuzz_adapter_config(adapter_dir, edits, raw)
    elif name == "safetensors header":
        @given(headers(), st.one_of(st.none(), st.none(), st.none(), NESTED, st.text(max_size=12)))
        def prop(header, raw):
            fuzz_header(tmp, header[0], header[1], raw)
    elif name == "schema metadata":
        @given(METADATA)
        def prop(metadata):
            fuzz_metadata(metadata)
    elif name == "base config":
        @given(st.dictionaries(st.sampled_from(BASE_FIELDS), JSONISH, max_size=3),
               st.one_of(st.none(), st.none(), NESTED, JSONISH.map(dumps)))
        def prop(edits, raw):
            fuzz_base_config(base_dir, edits, raw)
    else:
        @given(st.fixed_dictionaries({}, optional=STATE_FIELDS), st.lists(st.sampled_from(list(STATE_FIELDS)),
                                                                         max_size=2),
               st.one_of(st.none(), st.none(), st.integers(0, 100)), st.one_of(st.none(), st.none(), st.binary(
                   max_size=20), NESTED.map(str.encode)))
        def prop(edits, drop, cut, raw):
            fuzz_quant_state(group, edits, drop, cut, raw)
    settings(settings.get_profile(profile))(prop)()


@pytest.mark.parametrize("name", PROPERTIES)
def test_adaptools_error_or_success_never_anything_else(name, adapter_dir, base_dir, tmp_path, nf4_group):
    run_property(name, "adaptools-fast", adapter_dir, base_dir, tmp_path, nf4_group)


@pytest.mark.slow
@pytest.mark.parametrize("name", PROPERTIES)
def test_adaptools_error_or_success_many_random_examples(name, adapter_dir, base_dir, tmp_path, nf4_group):
    run_property(name, "adaptools-slow", adapter_dir, base_dir, tmp_path, nf4_group)
