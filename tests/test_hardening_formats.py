"""Hardening, round 3 (issue #21), the classes whose fixes live in the GGUF family, the engine's encoders and
the PEFT lint: Inf written from finite inputs, architecture mismatches merged, counts that hang, GGUF LoRAs
without head counts, adapters that do nothing. Hostile files are made here from the fixtures."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import gguf
import pytest
import torch
from conftest import adapter_path, base_path
from gguf import GGMLQuantizationType as Q
from gguf_bases import write_base

import adaptools
from adaptools.plugin import MemoryStore


@pytest.fixture(autouse=True)
def at_most_a_minute():
    """A hang (the defects of class 4) fails its test instead of stalling the suite."""
    import signal

    def alarm(signum, frame):
        raise TimeoutError("ran past 60 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def scaled_lora(tmp: Path, factor: float, name: str = "big.safetensors") -> Path:
    """llama-lora with every lora_B multiplied by ``factor`` (finite), as a schema file."""
    lora = adaptools.load(adapter_path("llama-lora"))
    tensors = {n: lora.tensor(n) * (factor if n.endswith("lora_B") else 1) for n in lora.tensor_names()}
    assert all(torch.isfinite(t).all() for t in tensors.values())
    path = tmp / name
    adaptools.save(adaptools.Adapter(lora.method, lora.config, MemoryStore(tensors), lora.base), path)
    return path


def refused_cleanly(result, out: Path, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*adaptools-tmp*"))


# --- 2. never Inf/NaN from finite inputs, whatever the container or encoder ------------------------------

@pytest.mark.parametrize(("qtype", "factor"), [(Q.F16, 1e7), (Q.Q8_0, 1e11)], ids=["F16", "Q8_0"])
def test_a_merge_into_a_gguf_base_that_overflows_its_type_is_refused(tmp_path, cli_runner, qtype, factor):
    """F16 values beyond 65504; Q8_0 block scales (amax / 127, stored in fp16) beyond it."""
    base = write_base(base_path("llama"), tmp_path / "base.gguf", qtype)
    adapter = scaled_lora(tmp_path, factor)
    out = tmp_path / "out.gguf"
    refused_cleanly(cli_runner("merge", base, adapter, out), out, "non-finite", "its encoding")


def test_an_adapter_converted_to_gguf_f16_that_overflows_is_refused(tmp_path, cli_runner):
    out = tmp_path / "a.gguf"
    result = cli_runner("convert", scaled_lora(tmp_path, 1e7), out, "--to", "gguf", "--base", base_path("llama"),
                        "--outtype", "f16")
    refused_cleanly(result, out, "finite")


def test_an_alpha_pattern_over_a_tiny_lora_alpha_is_not_folded_into_inf(tmp_path, cli_runner):
    folder = tmp_path / "a"
    shutil.copytree(adapter_path("llama-lora"), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(lora_alpha=1e-38, alpha_pattern={"q_proj": 1e6})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "a.gguf"
    result = cli_runner("convert", folder, out, "--to", "gguf", "--base", base_path("llama"))
    if result.exit_code == 0:  # written: then every value in it is finite
        reader = gguf.GGUFReader(out)
        assert all(torch.isfinite(torch.from_numpy(t.data.astype("float32"))).all() for t in reader.tensors)
    else:
        refused_cleanly(result, out, "finite")


def test_an_int8_base_whose_scales_overflow_fp16_is_refused_by_merge_as_by_dequantize(tmp_path, cli_runner):
    base = tmp_path / "int8"
    shutil.copytree(base_path("llama-int8"), base)
    shard = next(base.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    scb = [n for n in tensors if n.endswith(".SCB")]
    assert scb
    for name in scb:
        tensors[name] = tensors[name] * 1e6
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    refused_cleanly(cli_runner("merge", base, adapter_path("llama-lora"), out, "--dtype", "fp16"), out, "finite")


# --- 3. a GGUF LoRA for another architecture --------------------------------------------------------------

def test_a_gguf_lora_of_another_architecture_is_refused_like_a_peft_one(tmp_path, cli_runner):
    lora = tmp_path / "a.gguf"
    assert cli_runner("convert", adapter_path("llama-lora"), lora, "--to", "gguf", "--base",
                      base_path("llama")).exit_code == 0
    data = lora.read_bytes()
    key = b"general.architecture"
    at = data.index(key) + len(key) + 4  # then the string: u64 length, bytes
    (length,) = struct.unpack("<Q", data[at:at + 8])
    assert data[at + 8:at + 8 + length] == b"llama"
    lora.write_bytes(data[:at + 8] + b"qwen2" + data[at + 8 + length:])
    out = tmp_path / "out"
    refused_cleanly(cli_runner("merge", base_path("llama"), lora, out), out, "qwen2", "llama")


# --- 4. counts bounded before allocating or looping ----------------------------------------------------------

def _gguf_with_array(tmp: Path, count: int) -> Path:
    path = tmp / "a.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("test.values", [1, 2, 3])
    writer.add_block_count(2)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", torch.zeros(2, 64).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    key = b"test.values"
    at = data.index(key) + len(key) + 4 + 4  # value type ARRAY, element type, then the u64 count
    data[at:at + 8] = struct.pack("<Q", count)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("command", ["info", "check"])
def test_a_gguf_array_declaring_2_to_the_50_items_answers_at_once(tmp_path, cli_runner, command):
    path = _gguf_with_array(tmp_path, 2**50)
    started = time.monotonic()
    result = cli_runner(command, path)
    assert time.monotonic() - started < 20
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_a_gguf_base_with_a_huge_block_count_answers_at_once(tmp_path, cli_runner):
    base = write_base(base_path("llama"), tmp_path / "base.gguf", Q.F32)
    data = bytearray(base.read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key) + 4
    data[at:at + 4] = struct.pack("<I", 4_000_000_000)
    base.write_bytes(bytes(data))
    started = time.monotonic()
    result = cli_runner("merge", base, adapter_path("llama-lora"), tmp_path / "out.gguf")
    assert time.monotonic() - started < 20
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_an_oft_config_asking_for_a_billion_series_terms_is_refused_at_once(tmp_path, cli_runner):
    folder = tmp_path / "oft"
    shutil.copytree(adapter_path("llama-oft"), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(use_cayley_neumann=True, num_cayley_neumann_terms=1_000_000_000)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    started = time.monotonic()
    out = tmp_path / "out"
    result = cli_runner("merge", base_path("llama"), folder, out)
    assert time.monotonic() - started < 20
    refused_cleanly(result, out, "num_cayley_neumann_terms")


# --- 5. a GGUF LoRA without head counts merges: the base has them ----------------------------------------------

def test_a_gguf_lora_without_head_counts_merges_into_a_base_that_has_them(tmp_path, cli_runner):
    lora = tmp_path / "a.gguf"
    assert cli_runner("convert", adapter_path("llama-lora"), lora, "--to", "gguf", "--base",
                      base_path("llama")).exit_code == 0
    reader = gguf.GGUFReader(lora)
    stripped = tmp_path / "stripped.gguf"
    writer = gguf.GGUFWriter(stripped, "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or "head_count" in field.name or field.name == "general.architecture":
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1]
                             if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out"
    result = cli_runner("merge", base_path("llama"), stripped, out)
    assert result.exit_code == 0, result.output
    direct = tmp_path / "direct"
    assert cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), direct).exit_code == 0
    merged, expected = adaptools.plugin.Checkpoint.open(out), adaptools.plugin.Checkpoint.open(direct)
    for name in expected.location:
        assert torch.allclose(merged.read(name).float(), expected.read(name).float(), atol=1e-6), name


# --- 7. check fails an adapter that does nothing ----------------------------------------------------------------

def test_check_fails_an_adapter_whose_every_lora_b_is_zero(tmp_path, cli_runner):
    zero = scaled_lora(tmp_path, 0.0, "zero.safetensors")
    result = cli_runner("check", zero)
    assert result.exit_code == 1, result.output
    assert "error" in result.output


def test_check_fails_an_adapter_whose_scaling_is_zero_everywhere(tmp_path, cli_runner):
    folder = tmp_path / "a"
    shutil.copytree(adapter_path("llama-lora"), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(lora_alpha=0)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    result = cli_runner("check", folder)
    assert result.exit_code == 1, result.output


#: Each PEFT method's inert rule, the fixture it is shown on, and the role whose zeros make a module change nothing
#: (BOFT: boft_R zero with boft_s one, the identity).
INERT = {
    "LOHA012": ("llama-loha", "hada_w1_a", torch.zeros_like),
    "LOKR013": ("llama-lokr", "lokr_w1", torch.zeros_like),
    "ADALORA012": ("llama-adalora", "lora_E", torch.zeros_like),
    "VERA013": ("llama-vera", "vera_lambda_b", torch.zeros_like),
    "OFT013": ("llama-oft", "oft_R", torch.zeros_like),
    "BOFT013": ("llama-boft", "boft_R", torch.zeros_like),
}


@pytest.mark.parametrize("rule", sorted(INERT))
def test_check_fails_a_method_adapter_whose_every_module_changes_nothing(rule, tmp_path, cli_runner):
    """Every method has LORA023's rule after its last: an error when no module changes anything, a warning
    (and exit 0) when only one does not."""
    fixture, role, make_zero = INERT[rule]
    adapter = adaptools.load(adapter_path(fixture))
    modules = adapter.modules()
    zeroed = {roles[role] for roles in modules.values() if role in roles}
    assert len(zeroed) > 1, sorted(modules)

    def write(names: set[str], path: Path) -> Path:
        tensors = {n: make_zero(adapter.tensor(n)) if n in names else adapter.tensor(n) for n in adapter.tensor_names()}
        if rule == "BOFT013":
            tensors.update({n: torch.ones_like(t) for n, t in tensors.items() if n.endswith("boft_s")})
        adaptools.save(adaptools.Adapter(adapter.method, adapter.config, MemoryStore(tensors), adapter.base), path)
        return path

    every = cli_runner("check", write(zeroed, tmp_path / "every"), "--format", "json")
    assert every.exit_code == 1, every.output
    assert rule in {f["rule"] for f in json.loads(every.stdout)["adapters"][0]["findings"] if f["severity"] == "error"}
    one = cli_runner("check", write({sorted(zeroed)[0]}, tmp_path / "one"), "--format", "json")
    assert one.exit_code == 0, one.output
    assert rule not in one.stdout


def test_check_only_warns_about_one_zero_module(tmp_path, cli_runner):
    lora = adaptools.load(adapter_path("llama-lora"))
    names = sorted(n for n in lora.tensor_names() if n.endswith("lora_B"))
    tensors = {n: torch.zeros_like(lora.tensor(n)) if n == names[0] else lora.tensor(n) for n in lora.tensor_names()}
    path = tmp_path / "one.safetensors"
    adaptools.save(adaptools.Adapter(lora.method, lora.config, MemoryStore(tensors), lora.base), path)
    result = cli_runner("check", path)
    assert result.exit_code == 0, result.output
    assert "warning" in result.output


def test_baking_an_encoder_that_overflows_is_refused(tmp_path, cli_runner):
    from safetensors.torch import load_file, save_file

    source = Path(__file__).resolve().parent.parent / "fixtures" / "prompt-encoders" / "llama-p-tuning-mlp"
    folder = tmp_path / "enc"
    shutil.copytree(source, folder)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    head = sorted(n for n in tensors if "mlp_head" in n and n.endswith("weight"))
    assert head, sorted(tensors)
    tensors[head[-1]] = tensors[head[-1]] * 1e38  # finite in fp32, its products are not
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "baked"
    refused_cleanly(cli_runner("convert", folder, out, "--to", "peft", "--bake-projection"), out, "non-finite")


def test_a_resized_vocabulary_merged_into_a_gguf_base_is_refused_in_one_line(tmp_path, cli_runner):
    """It ended in a numpy reshape traceback: a GGUF tensor keeps its shape, the tokenizer metadata its size."""
    base = write_base(base_path("llama"), tmp_path / "base.gguf", Q.F32)
    out = tmp_path / "out.gguf"
    refused_cleanly(cli_runner("merge", base, adapter_path("llama-resized-vocab"), out), out, "resized vocabulary")
