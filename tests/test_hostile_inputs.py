"""Hostile and sloppy inputs at the library boundary (issue 13): every one ends in an AdaptoolsError naming
the file and what is wrong, never a traceback, a hang, or garbage. The CLI side (one line, exit 2,
nothing written) is tests/test_bad_inputs.py; random inputs are tests/test_fuzz.py."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, adapter_path, base_path
from safetensors.torch import load_file, save_file

import adaptools
from adaptools.checkpoint import Checkpoint
from adaptools.errors import printable
from adaptools.jsonio import parse_json, read_json
from adaptools.operations.algebra import combine, resize
from adaptools.operations.check import check
from adaptools.operations.extract import extract
from adaptools_plugins.bitsandbytes import nf4 as nf4

# --- one JSON reader ------------------------------------------------------------------------------------

BAD_JSON = {
    "NaN": ('{"r": NaN}', "NaN"),
    "Infinity": ('{"r": -Infinity}', "Infinity"),
    "overflowing float": ('{"r": 1e400}', "overflows"),
    "huge integer": ('{"r": ' + "9" * 5000 + "}", "too large"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "nested"),
    "nesting past the limit": ("[" * 70 + "]" * 70, "nested more than 64"),
    "lone surrogate": ('{"name": "\\ud800"}', "lone surrogate"),
    "lone surrogate key": ('{"\\udc00": 1}', "lone surrogate"),
    "repeated key": ('{"r": 1, "r": 2}', "twice"),
    "not JSON": ('{"r": ', "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_parse_json_refuses_what_a_config_must_not_hold(case):
    text, expected = BAD_JSON[case]
    with pytest.raises(adaptools.InputError, match=expected) as info:
        parse_json(text, path="x/adapter_config.json")
    assert str(info.value).startswith("x/adapter_config.json: ")


def test_parse_json_refuses_non_utf8_and_accepts_a_bom():
    with pytest.raises(adaptools.InputError, match="not UTF-8"):
        parse_json(b'{"a": "\xff"}', path="c.json")
    assert parse_json("\ufeff{\"a\": 1}") == {"a": 1}


def test_read_json_refuses_directories_devices_and_large_files(tmp_path):
    (tmp_path / "dir").mkdir()
    os.symlink("/dev/zero", tmp_path / "zero.json")
    (tmp_path / "big.json").write_text("[" + "1," * 100 + "1]")
    with pytest.raises(adaptools.InputError, match="directory"):
        read_json(tmp_path / "dir")
    with pytest.raises(adaptools.InputError, match="not a regular file"):
        read_json(tmp_path / "zero.json")
    with pytest.raises(adaptools.InputError, match="at most 50"):
        read_json(tmp_path / "big.json", max_bytes=50)


def test_a_fifo_config_never_blocks(tmp_path):
    """A base whose config.json is a FIFO with no writer: refused at once (it used to block forever)."""
    base = tmp_path / "base"
    shutil.copytree(base_path("gpt2"), base)
    (base / "config.json").unlink()
    os.mkfifo(base / "config.json")
    code = f"import adaptools.checkpoint as c; c.Checkpoint.open({str(base)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "not a regular file" in done.stderr and "InputError" in done.stderr


# --- base config.json and shard index ------------------------------------------------------------------

def broken_base(tmp_path: Path, arch: str, file: str, content: str | bytes) -> Path:
    base = tmp_path / "base"
    shutil.copytree(base_path(arch), base)
    target = base / file
    target.unlink(missing_ok=True)
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    return base


BASE_CASES = {
    "config is a list": ("gpt2", "config.json", "[1, 2]", "expected a JSON object"),
    "config is a string": ("gpt2", "config.json", '"gpt2"', "expected a JSON object"),
    "architectures: 5": ("gpt2", "config.json", '{"architectures": 5}', "architectures is 5"),
    "hidden size 0": ("gpt2", "config.json", '{"n_embd": 0}', "n_embd is 0, expected a positive integer"),
    "non-UTF-8 config": ("gpt2", "config.json", b'{"model_type": "\xe9"}', "not UTF-8"),
    "index is a list": ("llama", "model.safetensors.index.json", "[]", "expected a JSON object"),
    "index maps to integers": ("llama", "model.safetensors.index.json", '{"weight_map": {"a": 1}}',
                               r'weight_map\["a"\] is 1'),
    "index entry escapes the folder": ("llama", "model.safetensors.index.json",
                                       '{"weight_map": {"a": "../../../etc/hostname"}}', "is a path"),
}


@pytest.mark.parametrize("case", sorted(BASE_CASES))
def test_broken_base_configs_and_indexes_are_refused_naming_the_file(case, tmp_path):
    arch, file, content, expected = BASE_CASES[case]
    base = broken_base(tmp_path, arch, file, content)
    with pytest.raises(adaptools.InputError, match=expected) as info:
        Checkpoint.open(base)
    assert file in str(info.value)


def test_config_json_that_is_a_directory(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(base_path("gpt2"), base)
    (base / "config.json").unlink()
    (base / "config.json").mkdir()
    with pytest.raises(adaptools.InputError, match="directory"):
        Checkpoint.open(base)


# --- safetensors headers ---------------------------------------------------------------------------------

def write_raw(path: Path, header: dict | str, data: bytes = b"") -> Path:
    raw = header if isinstance(header, str) else json.dumps(header)
    encoded = raw.encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


HEADERS = {
    "bool shape": ({"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed"),
    "bool offsets": ({"t": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"\0", "malformed"),
    "dtype as a list": ({"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype"),
    "dtype as an object": ({"t": {"dtype": {"F": 32}, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype"),
    "float shape": ({"t": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed"),
    "control character name": ({"t\x1b[2J": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0",
                               "control characters"),
    "empty name": ({"": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "empty"),
    "metadata is a string": ({"__metadata__": "x"}, b"", "__metadata__"),
    "metadata values not strings": ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    "F4 dtype": ({"t": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", "unsupported dtype"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_header_check_refuses_what_the_rust_reader_would_or_we_cannot_use(case, tmp_path):
    header, data, expected = HEADERS[case]
    path = write_raw(tmp_path / "x.safetensors", header, data)
    with pytest.raises(adaptools.InputError, match=expected):
        adaptools.plugin.read_header(path)


def test_header_with_lone_surrogate_name_and_deep_nesting(tmp_path):
    path = write_raw(tmp_path / "a.safetensors", '{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
                     b"\0")
    with pytest.raises(adaptools.InputError, match="lone surrogate"):
        adaptools.plugin.read_header(path)
    path = write_raw(tmp_path / "b.safetensors", '{"t": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(adaptools.InputError, match="nested"):
        adaptools.plugin.read_header(path)


def test_zero_dim_tensors_are_valid_safetensors(tmp_path):
    path = write_raw(tmp_path / "s.safetensors", {"t": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}},
                     struct.pack("<f", 1.5))
    assert adaptools.plugin.read_header(path).tensors["t"].shape == ()


# --- regexes from configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(a|a)*$", r"(a|aa)+$", r"^(\w+\s?)*$", r"([\w.]|[\w.])*\d"])
def test_catastrophic_regexes_return_in_well_under_a_second(pattern):
    config = {"target_modules": pattern}
    from adaptools_plugins.peft.matching import is_targeted

    start = time.perf_counter()
    try:
        is_targeted(config, "a" * 40 + "!")
    except adaptools.InputError as exc:
        assert "target_modules" in str(exc) and "backtracking" in str(exc)
    assert time.perf_counter() - start < 1.0


def test_a_regex_slow_on_every_name_but_never_timing_out_is_refused_once_its_budget_is_spent(monkeypatch):
    """A pattern that stays under the per-match limit on each name still runs out: its time over all the
    names it meets is bounded too (else thousands of modules times ~0.1 s each would run for hours)."""
    from adaptools import patterns

    monkeypatch.setattr(patterns, "PATTERN_BUDGET", 0.05)
    pattern = r"(a|aa)+b$"  # some milliseconds on 20 a's, far under the 0.1 s a match may take
    name = "a" * 20
    start = time.perf_counter()
    with pytest.raises(adaptools.InputError, match="0.05 s over the model's module names"):
        for i in range(10_000):
            adaptools.plugin.match_pattern(pattern, name + "x" * (i % 3), field="target_modules")
    assert time.perf_counter() - start < 1.0
    with pytest.raises(adaptools.InputError):  # refused at once from then on
        adaptools.plugin.match_pattern(pattern, "q", field="target_modules")
    # a real pattern's matches take microseconds and never count, however often it runs in a process. A
    # clock that advances 50 us a reading makes each match take exactly that, whatever the machine's load
    # (a real clock let one preempted match count, and a budget of 0 refused the pattern): 20,000 of them
    # would spend 1 s if fast matches counted.
    monkeypatch.setattr(patterns, "PATTERN_BUDGET", 0.5)
    ticks = iter(range(10**9))
    monkeypatch.setattr(patterns, "time", types.SimpleNamespace(thread_time=lambda: next(ticks) * 50e-6))
    for i in range(20_000):
        adaptools.plugin.match_pattern(r"(.*\.)?(q_proj)$", f"model.layers.{i}.self_attn.q_proj",
                                       field="target_modules")


def test_invalid_regex_names_the_field():
    with pytest.raises(adaptools.InputError, match="rank_pattern key holds an invalid regular expression"):
        adaptools.plugin.match_pattern(r"(.*\.)?([)$", "m", field="rank_pattern key", compiled_from="[")


def test_overlong_module_names_are_not_matched():
    with pytest.raises(adaptools.InputError, match="module name of 5000 characters"):
        adaptools.plugin.match_pattern("q_proj", "a" * 5000, field="target_modules")


# --- LoRA config values --------------------------------------------------------------------------------

def edited(tmp_path: Path, name: str = "llama-lora", raw: str | None = None, **changes) -> Path:
    out = tmp_path / "adapter"
    shutil.copytree(adapter_path(name), out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(raw if raw is not None else json.dumps(config))
    return out


LORA_FIELDS = {
    "r 'abc'": ({"r": "abc"}, "LORA001", 'r is "abc", expected a positive integer'),
    "r null": ({"r": None}, "LORA001", "r is null"),
    "r [4]": ({"r": [4]}, "LORA001", "r is [4]"),
    "r true": ({"r": True}, "LORA001", "r is true"),
    "alpha null": ({"lora_alpha": None}, "LORA001", "lora_alpha is null"),
    "alpha 1e300": ({"lora_alpha": 1e300}, "LORA001", "lora_alpha is 1e+300"),
    "target_modules 5": ({"target_modules": 5}, "LORA001", "target_modules is 5"),
    "layers_to_transform '0'": ({"layers_to_transform": "0"}, "LORA001", 'layers_to_transform is "0"'),
    "rank 0 via rank_pattern": ({"rank_pattern": {"q_proj": 0}}, "LORA001", 'rank_pattern["q_proj"] is 0'),
    "alpha pattern not a number": ({"alpha_pattern": {"q_proj": "x"}}, "LORA001", 'alpha_pattern["q_proj"] is "x"'),
    "invalid regex key": ({"rank_pattern": {"[": 4}}, "LORA020", "invalid regular expression"),
    "invalid target regex": ({"target_modules": "(q_proj"}, "LORA020", "invalid regular expression"),
    "catastrophic target regex": ({"target_modules": r"([\w.]|[\w.])*\d"}, "LORA020", "backtracking"),
    "exclude_modules 3": ({"exclude_modules": 3}, "LORA001", "exclude_modules is 3"),
}


@pytest.mark.parametrize("case", sorted(LORA_FIELDS))
def test_lora_config_values_are_refused_at_load_and_reported_by_check(case, tmp_path):
    changes, rule, expected = LORA_FIELDS[case]
    bad = edited(tmp_path, **changes)
    with pytest.raises(adaptools.AdapterFormatError) as info:
        adaptools.load(bad)
    assert expected in str(info.value) and "adapter_config.json" in str(info.value)
    report = check(bad)
    assert any(f.rule == rule and expected in f.message for f in report.findings), report.findings


@pytest.mark.parametrize("raw", ['{"peft_type": "LORA", "r": NaN}', '{"peft_type": "LORA", "r": 1e400}',
                                 '{"peft_type": "LORA", "lora_alpha": Infinity}'])
def test_non_finite_numbers_in_a_config_are_refused_naming_the_file(raw, tmp_path):
    bad = edited(tmp_path, raw=raw)
    for run in (adaptools.load, check):
        with pytest.raises(adaptools.InputError, match="adapter_config.json"):
            run(bad)


def test_null_alpha_no_longer_passes_info_and_crashes_merge(tmp_path):
    from adaptools import MergeInput, merge

    bad = edited(tmp_path, lora_alpha=None)
    with pytest.raises(adaptools.AdapterFormatError, match="lora_alpha"):
        adaptools.load(bad)
    adapter = adaptools.load(bad, validate=False)
    with pytest.raises(adaptools.AdaptoolsError, match="lora_alpha"):
        merge(base_path("llama"), [MergeInput(adapter)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prefix_and_bottleneck_configs_are_checked(tmp_path):
    hub = ROOT / "fixtures" / "adapterhub" / "llama-seq-bn"
    out = tmp_path / "hub"
    shutil.copytree(hub, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["config"]["reduction_factor"] = 0
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(adaptools.AdapterFormatError, match=r'reduction_factor"\] is 0'):
        adaptools.load(out)
    assert any(f.rule == "BN010" for f in check(out).findings)
    method = adaptools.plugin.get_method("prefix_tuning")
    adapter = adaptools.Adapter("prefix_tuning", {"num_virtual_tokens": True, "num_layers": 2, "token_dim": 4},
                                adaptools.plugin.MemoryStore({"prompt_embeddings": torch.zeros(1, 16)}))
    assert [f.rule for f in method.lint(adapter)] == ["PREFIX006"]


# --- tensors at the boundary --------------------------------------------------------------------------

def test_zero_dim_and_float8_adapter_tensors_are_named(tmp_path):
    out = tmp_path / "adapter"
    shutil.copytree(adapter_path("llama-lora"), out)
    tensors = dict(load_file(str(out / "adapter_model.safetensors")))
    a = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    b = a.replace("lora_A", "lora_B")
    tensors[a] = torch.tensor(1.0)
    tensors[b] = tensors[b].to(torch.float8_e4m3fn)
    (out / "adapter_model.safetensors").unlink()
    adaptools.plugin.save_tensors(out / "adapter_model.safetensors", tensors)
    rules = {f.rule: f for f in check(out).findings}
    assert "LORA022" in rules and "LORA003" in rules and "F8_E4M3" in rules["LORA003"].message
    with pytest.raises(adaptools.AdapterFormatError):
        adaptools.load(out)


NF4_PARAM = "model.layers.0.self_attn.q_proj.weight"


def nf4_group() -> dict[str, torch.Tensor]:
    stored = load_file(str(base_path("llama-nf4") / "model.safetensors"))
    return {k: v for k, v in stored.items() if k == NF4_PARAM or k.startswith(NF4_PARAM + ".")}


BLOB = f"{NF4_PARAM}.quant_state.bitsandbytes__nf4"


def with_blob(group: dict[str, torch.Tensor], **changes) -> dict[str, torch.Tensor]:
    blob = json.loads(bytes(group[BLOB].tolist()))
    blob.update(changes)
    return {**group, BLOB: torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize("native", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize("cut", ["truncated", "empty"])
def test_dequantize_refuses_a_short_absmax_on_both_paths(native, cut, monkeypatch):
    if native and nf4.NATIVE is None:
        pytest.skip("the C kernels are not built")
    if not native:
        monkeypatch.setattr(nf4, "NATIVE", None)
    group = nf4_group()
    absmax = group[f"{NF4_PARAM}.absmax"]
    group[f"{NF4_PARAM}.absmax"] = absmax[: absmax.numel() // 2] if cut == "truncated" else absmax[:0]
    with pytest.raises(adaptools.InputError, match="absmax has"):
        nf4.QuantState.from_state_dict(NF4_PARAM, group)
    state = nf4.QuantState.from_state_dict(NF4_PARAM, nf4_group())
    state.absmax = group[f"{NF4_PARAM}.absmax"]
    with pytest.raises(adaptools.InputError, match="absmax has"):
        nf4.dequantize_4bit(group[NF4_PARAM], state)


def test_pure_torch_path_selected_by_environment_refuses_too(tmp_path):
    code = ("import torch, adaptools_plugins.bitsandbytes.nf4 as n; assert n.NATIVE is None\n"
            "from safetensors.torch import load_file\n"
            f"g = load_file({str(base_path('llama-nf4') / 'model.safetensors')!r})\n"
            f"p = {NF4_PARAM!r}\n"
            "g = {k: v for k, v in g.items() if k.startswith(p)}\n"
            "g[p + '.absmax'] = g[p + '.absmax'][:3]\n"
            "try:\n    n.QuantState.from_state_dict(p, g)\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "ADAPTOOLS_NF4_PURE_TORCH": "1"}, timeout=120)
    assert done.stdout.startswith("InputError") and "absmax has 3 values" in done.stdout, done.stderr


QUANT_STATES = {
    "blocksize 0": ({"blocksize": 0}, "blocksize"),
    "blocksize 64.0": ({"blocksize": 64.0}, "blocksize"),
    "quant_type int8": ({"quant_type": "int8"}, "quant_type"),
    "dtype list": ({"dtype": ["bfloat16"]}, "dtype"),
    "shape negative": ({"shape": [-1, 64]}, "shape[0]"),
    "shape string": ({"shape": "64x64"}, "shape"),
    "shape too big": ({"shape": [2**40, 2**40]}, "too large"),
    "shape wrong": ({"shape": [64, 63]}, "packed weight has"),
    "nested offset string": ({"nested_offset": "0.1"}, "nested_offset"),
    "missing shape": ({"shape": None}, "shape"),
}


@pytest.mark.parametrize("case", sorted(QUANT_STATES))
def test_every_hostile_quant_state_field_is_refused(case):
    changes, expected = QUANT_STATES[case]
    group = with_blob(nf4_group(), **changes)
    with pytest.raises(adaptools.InputError, match=expected.replace("[", r"\[")):
        nf4.QuantState.from_state_dict(NF4_PARAM, group)


def test_quant_state_blob_that_is_not_json_or_too_deep():
    group = nf4_group()
    for raw in (b"\xff\xfe", b"[" * 500 + b"]" * 500, b'{"blocksize": NaN}'):
        group[BLOB] = torch.tensor(list(raw), dtype=torch.uint8)
        with pytest.raises(adaptools.InputError, match="4-bit quant state"):
            nf4.QuantState.from_state_dict(NF4_PARAM, group)


def test_nested_absmax_and_maps_must_fit():
    for key, value, expected in ((".nested_absmax", torch.zeros(0), "nested_absmax"),
                                 (".quant_map", torch.zeros(15), "quant_map"),
                                 (".nested_quant_map", torch.full((256,), float("nan")), "nested_quant_map")):
        group = nf4_group()
        group[NF4_PARAM + key] = value
        with pytest.raises(adaptools.InputError, match=expected):
            nf4.QuantState.from_state_dict(NF4_PARAM, group)


# --- smaller items -----------------------------------------------------------------------------------

def test_printable_escapes_what_a_terminal_would_act_on():
    assert printable("a\nb\x1b[31mc\ud800 é") == "a\\nb\\x1b[31mc\\ud800 é"
    error = adaptools.InputError("bad\nvalue", path="x\x1b]0;pwned\x07", tensor="t\r")
    assert "\n" not in str(error) and "\x1b" not in str(error) and "\r" not in str(error)


def test_combining_adapters_of_different_models_is_refused():
    llama, gpt2 = adaptools.load(adapter_path("llama-lora")), adaptools.load(adapter_path("gpt2-lora"))
    with pytest.raises(adaptools.IncompatibleBaseError, match="cannot be combined: their modules lie in"):
        combine([llama, gpt2])


@pytest.mark.parametrize("kwargs, expected", [({"weights": [float("nan")]}, "finite"),
                                              ({"weights": [float("inf")]}, "finite"),
                                              ({"how": "svd", "rank": 0}, "positive integer"),
                                              ({"density": float("nan"), "how": "ties"}, "density")])
def test_combine_refuses_unusable_numbers(kwargs, expected):
    with pytest.raises(adaptools.InputError, match=expected):
        combine([adaptools.load(adapter_path("llama-lora"))], **kwargs)


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"rank": -3}, {"rank": True}, {"energy": 2.0},
                                    {"energy": float("nan")}, {"energy": 0}])
def test_resize_and_extract_refuse_ranks_and_energies(kwargs):
    with pytest.raises(adaptools.InputError):
        resize(adaptools.load(adapter_path("llama-lora")), **kwargs)
    with pytest.raises(adaptools.InputError):
        extract(base_path("llama"), base_path("llama"), method="lora", **kwargs)


@pytest.mark.parametrize("options, expected", [({"rank": 0}, "rank"), ({"rank": -2}, "rank"),
                                               ({"rank": 4, "alpha": float("nan")}, "alpha"),
                                               ({"rank": 4, "alpha": float("inf")}, "alpha")])
def test_init_refuses_ranks_and_alphas_it_cannot_use(options, expected):
    base = Checkpoint.open(base_path("llama"))
    method = adaptools.plugin.get_method("lora")
    with pytest.raises(adaptools.InputError, match=expected):
        method.initialize(base.base_info(), base.read, {"targets": ["q_proj"], "init": "olora", **options})


def test_eval_refuses_pickle_weights_without_permission(tmp_path):
    from adaptools_plugins.validators.loading import load_model

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(base_path("gpt2") / "config.json", model)
    torch.save({"w": torch.zeros(1)}, model / "pytorch_model.bin")
    with pytest.raises(adaptools.UnsafeInputError, match="--allow-pickle") as info:
        load_model(model)
    assert "weights_only=False" not in str(info.value)


def test_schema_metadata_is_checked_against_the_shipped_schema(tmp_path):
    good = adaptools.load(adapter_path("llama-lora")).metadata()
    cases = {"adaptools.schema": ("\u0661", "adaptools.schema"),  # an Arabic-Indic one: int() accepts it
             "adaptools.config": ('{"modules": {"m": {"kind": "linear", "rank": 0, "alpha": 1, "scaling": 1}}}',
                                  "rank"),
             "adaptools.base": ('{"name": 5}', "name is 5"),
             "adaptools.provenance": ("[" * 100 + "]" * 100, "nested")}
    for key, (value, expected) in cases.items():
        with pytest.raises(adaptools.InputError, match=expected):
            adaptools.plugin.parse_metadata({**good, key: value}, tmp_path / "x.safetensors")


@pytest.mark.parametrize("which", ["base", "tuned"])
@pytest.mark.parametrize("kind", ["q_proj.weight", "input_layernorm.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_extract_refuses_non_finite_weights_naming_the_file_and_tensor(tmp_path, cli_runner, which, kind, bad):
    """A NaN or infinity in either checkpoint would reach the SVD (a LinAlgError traceback) or be copied
    into the adapter as a full tensor: refused in one line naming the checkpoint's file and the tensor."""
    folders = {name: tmp_path / name for name in ("base", "tuned")}
    for folder in folders.values():
        shutil.copytree(base_path("llama"), folder)
    index = read_json(base_path("llama") / "model.safetensors.index.json")["weight_map"]
    key = next(k for k in index if k.endswith(kind))

    def edit(folder, change):
        shard = folder / index[key]
        state = load_file(str(shard))
        state[key] = change(state[key].clone())
        save_file(state, str(shard), metadata={"format": "pt"})
        return shard

    def poison(tensor):
        tensor.view(-1)[3] = bad
        return tensor

    edit(folders["tuned"], lambda t: t + 0.5)  # the tuned model differs from the base at this tensor
    shard = edit(folders[which], poison)
    out = tmp_path / "out"
    result = cli_runner("extract", folders["base"], folders["tuned"], out, "--rank", "2")
    if which == "base" and kind.endswith("norm.weight"):  # a full tensor comes from the tuned model alone
        assert result.exit_code == 0, result.output
        written = adaptools.load(out)
        assert written.tensor_names()
        assert all(torch.isfinite(written.tensor(n)).all() for n in written.tensor_names())
        return
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert key in result.stderr and str(shard) in result.stderr and "non-finite" in result.stderr
    assert not out.exists()
