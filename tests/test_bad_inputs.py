"""A corpus of broken adapters: each must end in one clear line naming the problem, exit 2, and no output."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import adapter_path
from safetensors.torch import load_file

import adaptools

SRC = adapter_path("llama-lora")
A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def copy_adapter(tmp: Path, name: str = "llama-lora") -> Path:
    out = tmp / "adapter"
    shutil.copytree(adapter_path(name), out)
    return out


def edit_config(tmp: Path, **changes) -> Path:
    out = copy_adapter(tmp)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def edit_tensors(tmp: Path, fn: Callable[[dict], None], name: str = "llama-lora") -> Path:
    out = copy_adapter(tmp, name)
    tensors = {k: v.clone() for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    (out / "adapter_model.safetensors").unlink()  # never rewrite a file that is memory-mapped
    fn(tensors)
    adaptools.plugin.save_tensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    return out


def truncated(tmp):
    out = copy_adapter(tmp)
    f = out / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return out


def lying_offsets(tmp):
    out = copy_adapter(tmp)
    f = out / "adapter_model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    return out


def huge_header_length(tmp):
    out = copy_adapter(tmp)
    f = out / "adapter_model.safetensors"
    f.write_bytes(struct.pack("<Q", 2**40) + f.read_bytes()[8:])
    return out


def header_not_json(tmp):
    out = copy_adapter(tmp)
    f = out / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:12] = b"!!!!"
    f.write_bytes(bytes(raw))
    return out


def rank_mismatch(tmp):
    return edit_config(tmp, r=8)


def a_without_b(tmp):
    return edit_tensors(tmp, lambda t: t.pop(B0))


def nan_value(tmp):
    def poison(t):
        t[A0][0, 0] = float("nan")
    return edit_tensors(tmp, poison)


def inf_value(tmp):
    def poison(t):
        t[B0][1, 1] = float("inf")
    return edit_tensors(tmp, poison)


def invalid_json(tmp):
    out = copy_adapter(tmp)
    (out / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    return out


def config_not_object(tmp):
    out = copy_adapter(tmp)
    (out / "adapter_config.json").write_text("[1, 2]")
    return out


def missing_peft_type(tmp):
    out = copy_adapter(tmp)
    config = json.loads((out / "adapter_config.json").read_text())
    del config["peft_type"]
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def unknown_method(tmp):
    return edit_config(tmp, peft_type="SUPERLORA")


def pickle_without_flag(tmp):
    return adapter_path("llama-bin")


def garbage_pickle_with_flag(tmp):
    out = tmp / "adapter"
    shutil.copytree(adapter_path("llama-bin"), out)
    (out / "adapter_model.bin").write_bytes(b"\x80\x04not a pickle at all")
    return out


def empty_directory(tmp):
    out = tmp / "empty"
    out.mkdir()
    (out / "notes.txt").write_text("no adapter here")
    return out


def missing_path(tmp):
    return tmp / "does-not-exist"


def config_without_weights(tmp):
    out = copy_adapter(tmp)
    (out / "adapter_model.safetensors").unlink()
    return out


def rank_disagreement(tmp):
    def shrink(t):
        t[B0] = t[B0][:, :2].contiguous()
    return edit_tensors(tmp, shrink)


def integer_tensor(tmp):
    def to_int(t):
        t[A0] = t[A0].to(torch.int32)
    return edit_tensors(tmp, to_int)


def dora_without_magnitude(tmp):
    return edit_config(tmp, use_dora=True)


def lora_bias_not_in_config(tmp):
    out = tmp / "adapter"
    shutil.copytree(adapter_path("qwen2-lora-bias"), out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["lora_bias"] = False
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def token_rows_mismatch(tmp):
    out = tmp / "adapter"
    shutil.copytree(adapter_path("llama-trainable-tokens"), out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["trainable_token_indices"] = [1, 5]
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def untargeted_module(tmp):
    return edit_config(tmp, target_modules=["q_proj"])


def schema_from_the_future(tmp):
    out = tmp / "future.safetensors"
    adapter = adaptools.load(SRC)
    adapter.schema_version = 99
    adaptools.save(adapter, out)
    return out


def schema_unknown_method(tmp):
    out = tmp / "odd.safetensors"
    adapter = adaptools.load(SRC)
    adapter.method = "hyperlora"
    adaptools.save(adapter, out)
    return out


def truncated_schema_file(tmp):
    out = tmp / "cut.safetensors"
    adaptools.save(adaptools.load(SRC), out)
    out.write_bytes(out.read_bytes()[:-100])
    return out


HUB = adapter_path("llama-lora").parent.parent / "adapterhub"


def copy_hub(tmp: Path, name: str = "llama-seq-bn") -> Path:
    out = tmp / "adapter"
    shutil.copytree(HUB / name, out)
    return out


def hub_config(tmp, edit):
    out = copy_hub(tmp)
    config = json.loads((out / "adapter_config.json").read_text())
    edit(config)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def hub_invalid_json(tmp):
    out = copy_hub(tmp)
    (out / "adapter_config.json").write_text('{"config": {')
    return out


def hub_reduction_factor(tmp):
    return hub_config(tmp, lambda c: c["config"].__setitem__("reduction_factor", 4))


def hub_no_config_object(tmp):
    return hub_config(tmp, lambda c: c.__setitem__("config", "seq_bn"))


def hub_unknown_activation(tmp):
    return hub_config(tmp, lambda c: c["config"].__setitem__("non_linearity", "wobble"))


def hub_pickle(tmp):
    return HUB / "llama-seq-bn-extras"


def hub_nan(tmp):
    out = copy_hub(tmp)
    tensors = {k: v.clone() for k, v in load_file(str(out / "adapter.safetensors")).items()}
    next(v for k, v in sorted(tensors.items()) if k.endswith("adapter_up.weight"))[0, 0] = float("nan")
    (out / "adapter.safetensors").unlink()
    adaptools.plugin.save_tensors(out / "adapter.safetensors", tensors, {"format": "pt"})
    return out


# --- issue 13: hostile and sloppy inputs ---------------------------------------------------------------


def raw_config(text: str | bytes):
    def make(tmp):
        out = copy_adapter(tmp)
        target = out / "adapter_config.json"
        target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text, errors="surrogatepass")
        return out
    return make


def config_with(**changes):
    return lambda tmp: edit_config(tmp, **changes)


def raw_header(header: str, data: bytes):
    def make(tmp):
        out = copy_adapter(tmp)
        encoded = header.encode("utf-8", "surrogatepass")
        (out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
        return out
    return make


def tensor_edit(fn):
    return lambda tmp: edit_tensors(tmp, fn)


def zero_dim(t):
    t[A0] = torch.tensor(1.0)


def float8(t):
    t[B0] = t[B0].to(torch.float8_e4m3fn)


def fifo_config(tmp):
    out = copy_adapter(tmp)
    (out / "adapter_config.json").unlink()
    os.mkfifo(out / "adapter_config.json")
    return out


def deep_schema_metadata(tmp):
    out = tmp / "deep.safetensors"
    adapter = adaptools.load(SRC)
    adapter.provenance = {"x": json.loads("[" * 60 + "]" * 60)}
    metadata = adapter.metadata()
    metadata["adaptools.provenance"] = "[" * 3000 + "]" * 3000
    adaptools.plugin.save_tensors(out, {n: adapter.tensor(n) for n in adapter.tensor_names()}, metadata)
    return out


def enable_lora_wrong_rank(tmp):
    out = tmp / "adapter"
    shutil.copytree(adapter_path("llama-lora").parent.parent / "old-peft" / "peft-0.2.0-gpt2-enable-lora", out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["r"] = 8
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def hub_reduction_zero(tmp):
    return hub_config(tmp, lambda c: c["config"].__setitem__("reduction_factor", 0))


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "config r is NaN": (raw_config('{"peft_type": "LORA", "r": NaN}'), "NaN, which is not a JSON number"),
    "config alpha Infinity": (raw_config('{"peft_type": "LORA", "lora_alpha": Infinity}'), "Infinity"),
    "config r 1e400": (raw_config('{"peft_type": "LORA", "r": 1e400}'), "overflows to infinity"),
    "config nested too deep": (raw_config('{"peft_type": "LORA", "x": ' + "[" * 50000 + "]" * 50000 + "}"),
                               "nested"),
    "config not UTF-8": (raw_config(b'{"peft_type": "LORA", "x": "\xff"}'), "not UTF-8"),
    "config lone surrogate": (raw_config('{"peft_type": "LORA", "x": "\\ud800"}'), "lone surrogate"),
    "config is a FIFO": (fifo_config, "no adapter found"),
    "r is 'abc'": (config_with(r="abc"), 'r is "abc", expected a positive integer'),
    "r is null": (config_with(r=None), "r is null"),
    "r is [4]": (config_with(r=[4]), "r is [4]"),
    "lora_alpha null": (config_with(lora_alpha=None), "lora_alpha is null"),
    "lora_alpha 1e300": (config_with(lora_alpha=1e300), "lora_alpha is 1e+300"),
    "target_modules 5": (config_with(target_modules=5), "target_modules is 5"),
    "layers_to_transform '0'": (config_with(layers_to_transform="0"), 'layers_to_transform is "0"'),
    "rank 0 via rank_pattern": (config_with(rank_pattern={"q_proj": 0}), 'rank_pattern["q_proj"] is 0'),
    "alpha_pattern value not a number": (config_with(alpha_pattern={"q_proj": "big"}), 'alpha_pattern["q_proj"]'),
    "invalid regex": (config_with(target_modules="(q_proj|v_proj"), "invalid regular expression"),
    "catastrophic regex": (config_with(target_modules=r"([\w.]|[\w.])*\d"), "backtracking"),
    "header bool shape": (raw_header('{"t": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', b"\0" * 4),
                          "malformed shape"),
    "header dtype list": (raw_header('{"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
                          "unsupported dtype"),
    "header lone surrogate name": (raw_header('{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
                                              b"\0"), "lone surrogate"),
    "header name with escape codes": (raw_header('{"a\\u001b[2Jb": {"dtype": "U8", "shape": [1], '
                                                 '"data_offsets": [0, 1]}}', b"\0"), "control characters"),
    "header nested": (raw_header('{"t": ' + "[" * 5000 + "]" * 5000 + "}", b""), "nested"),
    "0-d tensor": (tensor_edit(zero_dim), "has 0 dimensions"),
    "float8 tensor": (tensor_edit(float8), "F8_E4M3"),
    "schema metadata nested": (deep_schema_metadata, "nested"),
    "peft 0.2.0 enable_lora with the wrong r": (enable_lora_wrong_rank, "enable_lora"),
    "adapterhub: reduction factor 0": (hub_reduction_zero, 'reduction_factor"] is 0'),
}
NEEDS_PICKLE = {"garbage pickle with the flag", "peft 0.2.0 enable_lora with the wrong r"}

CORPUS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "adapterhub: invalid JSON config": (hub_invalid_json, "not valid JSON"),
    "adapterhub: reduction factor disagrees": (hub_reduction_factor, "reduction 4"),
    "adapterhub: config is a name, not an object": (hub_no_config_object, 'no "config" object'),
    "adapterhub: unknown activation": (hub_unknown_activation, "wobble"),
    "adapterhub: pickle without the flag": (hub_pickle, "--allow-pickle"),
    "adapterhub: NaN value": (hub_nan, "NaN/Inf"),
    "truncated safetensors": (truncated, "truncated"),
    "header offsets that lie": (lying_offsets, "data_offsets"),
    "huge header length": (huge_header_length, "header length"),
    "header not JSON": (header_not_json, "not valid JSON"),
    "config r=8, tensors r=4": (rank_mismatch, "config gives rank 8"),
    "lora_A without lora_B": (a_without_b, "has no matching lora_B"),
    "NaN value": (nan_value, "NaN/Inf"),
    "Inf value": (inf_value, "NaN/Inf"),
    "invalid JSON config": (invalid_json, "not valid JSON"),
    "config not an object": (config_not_object, "JSON object"),
    "missing peft_type": (missing_peft_type, "no peft_type"),
    "unknown method": (unknown_method, "SUPERLORA"),
    "pickle without the flag": (pickle_without_flag, "--allow-pickle"),
    "garbage pickle with the flag": (garbage_pickle_with_flag, "cannot read pickle safely"),
    "directory with no adapter": (empty_directory, "no adapter found"),
    "missing path": (missing_path, "not found"),
    "config without weights": (config_without_weights, "no adapter_model.safetensors"),
    "A and B ranks disagree": (rank_disagreement, "do not share a rank"),
    "integer tensor": (integer_tensor, "is not fp16, bf16, fp32 or fp64"),
    "use_dora without magnitude": (dora_without_magnitude, "no magnitude vector"),
    "lora_B.bias without lora_bias": (lora_bias_not_in_config, "lora_bias is false"),
    "trainable token count": (token_rows_mismatch, "3 trainable token rows but 2 indices"),
    "weights for an untargeted module": (untargeted_module, "does not select it"),
    "schema from a newer version": (schema_from_the_future, "newer than this adaptools"),
    "schema with unknown method": (schema_unknown_method, "hyperlora"),
    "truncated schema file": (truncated_schema_file, "truncated"),
    **HOSTILE,
}


def digest(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` and its bytes (FIFOs are not read)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CORPUS))
@pytest.mark.parametrize("command", ["info", "convert"])
def test_bad_input_is_one_clear_line_exit_2_and_writes_nothing(case, command, tmp_path, cli_runner):
    make, expected = CORPUS[case]
    bad = make(tmp_path)
    extra = ["--allow-pickle"] if case in NEEDS_PICKLE else []
    out = tmp_path / "out.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    contents = digest(tmp_path)
    args = [command, bad, *([out] if command == "convert" else []), *extra]
    result = cli_runner(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary leftovers
    assert digest(tmp_path) == contents  # inputs intact
    assert "\x1b" not in result.stderr


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 12 and len(HOSTILE) >= 25


def test_errors_name_the_tensor_and_file(tmp_path, cli_runner):
    bad = nan_value(tmp_path)
    result = cli_runner("info", bad)
    assert "adapter_model.safetensors" in result.stderr
    assert "layers.0.self_attn.q_proj.lora_A.weight" in result.stderr


def test_debug_shows_traceback(tmp_path):
    from click.testing import CliRunner

    from adaptools.cli import get_cli

    result = CliRunner().invoke(get_cli(), ["--debug", "info", str(tmp_path / "nope")])
    assert isinstance(result.exception, adaptools.InputError)


# --- broken bases: merge, dequantize and eval refuse them before writing anything -------------------------


def base_copy(tmp: Path, arch: str) -> Path:
    out = tmp / "base"
    shutil.copytree(adapter_path("llama-lora").parent.parent / "bases" / arch, out)
    return out


def base_file(arch: str, file: str, content: str):
    def make(tmp):
        out = base_copy(tmp, arch)
        (out / file).unlink(missing_ok=True)
        (out / file).write_text(content)
        return out
    return make


def base_fifo_config(tmp):
    out = base_copy(tmp, "llama")
    (out / "config.json").unlink()
    os.mkfifo(out / "config.json")
    return out


def nf4_short_absmax(tmp):
    out = base_copy(tmp, "llama-nf4")
    tensors = dict(load_file(str(out / "model.safetensors")))
    key = "model.layers.0.self_attn.q_proj.weight.absmax"
    tensors[key] = tensors[key][:1].clone()
    (out / "model.safetensors").unlink()
    adaptools.plugin.save_tensors(out / "model.safetensors", tensors, {"format": "pt"})
    return out


BAD_BASES: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    "config is a list": (base_file("llama", "config.json", "[1]"), "merge", "expected a JSON object"),
    "config is a string": (base_file("llama", "config.json", '"llama"'), "merge", "expected a JSON object"),
    "architectures: 5": (base_file("llama", "config.json", '{"architectures": 5}'), "merge", "architectures is 5"),
    "config is a FIFO": (base_fifo_config, "merge", "not a regular file"),
    "index is a list": (base_file("llama", "model.safetensors.index.json", "[]"), "merge", "JSON object"),
    "index maps to integers": (base_file("llama", "model.safetensors.index.json", '{"weight_map": {"a": 3}}'),
                               "merge", "is 3"),
    "index escapes the base folder": (base_file("llama", "model.safetensors.index.json",
                                                '{"weight_map": {"a": "../../../etc/hostname"}}'), "merge",
                                      "is a path"),
    "4-bit absmax truncated": (nf4_short_absmax, "dequantize", "absmax has 1 values"),
}


@pytest.mark.parametrize("case", sorted(BAD_BASES))
def test_bad_base_is_one_clear_line_exit_2_and_writes_nothing(case, tmp_path, cli_runner):
    make, command, expected = BAD_BASES[case]
    base = make(tmp_path)
    contents = digest(tmp_path)
    args = [command, base, *([SRC] if command == "merge" else []), tmp_path / "out"]
    result = cli_runner(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and digest(tmp_path) == contents
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_eval_never_unpickles_a_model_without_permission(tmp_path, cli_runner):
    model = tmp_path / "model"
    shutil.copytree(adapter_path("llama-lora").parent.parent / "bases" / "gpt2", model)
    state = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    text = tmp_path / "text.txt"
    text.write_text("hello world " * 50)
    result = cli_runner("eval", model, "--eval-text", text)
    assert result.exit_code == 2 and "--allow-pickle" in result.stderr and "weights_only" not in result.stderr
