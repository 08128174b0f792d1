"""`adaptools merge` against PEFT's merge_and_unload, tensor by tensor, and against the unmerged forward."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import SAFE_ADAPTERS, WEIGHT_ADAPTERS, adapter_path, base_path
from peft_oracle import load_base, logits, peft_model
from safetensors.torch import load_file

import adaptools
from adaptools import MergeInput, merge

RESIZED = {"llama-resized-vocab": 136}
BASE_DTYPE = {"llama": torch.float32, "gpt2": torch.float32, "qwen2": torch.bfloat16}
#: Fixtures where PEFT's merge is *wrong* on a tied model (it changes lm_head through the shared tensor,
#: docs/peft.md, "Tied embeddings"): we keep lm_head as the unmerged model sees it instead.
TIED_DIVERGENCE = {"llama-embedding", "llama-resized-vocab"}


def merged_state(out):
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def peft_merged(name, names=None):
    arch = SAFE_ADAPTERS[name]
    model = peft_model(base_path(arch), adapter_path(name), dtype=BASE_DTYPE[arch], resize=RESIZED.get(name))
    if names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_adapter(adapter_path(name) / "other", adapter_name="other")
        return model.merge_and_unload(adapter_names=names)
    return model.merge_and_unload()


def run_merge(name, out, **kw):
    return merge(base_path(SAFE_ADAPTERS[name]), [MergeInput(adaptools.load(adapter_path(name)))], out, **kw)


@pytest.mark.parametrize("name", sorted(WEIGHT_ADAPTERS))
def test_merge_equals_peft_merge_and_unload(name, tmp_path):
    summary = run_merge(name, tmp_path / "out")
    ours = merged_state(tmp_path / "out")
    theirs = peft_merged(name).state_dict()
    assert summary.tensors_merged > 0
    compared = 0
    for key, value in ours.items():
        if key == "lm_head.weight" and name in TIED_DIVERGENCE:
            continue
        assert value.dtype == theirs[key].dtype, key
        assert torch.equal(value, theirs[key]), f"{key}: max diff {(value.float() - theirs[key].float()).abs().max()}"
        compared += 1
    assert compared >= len(ours) - 1


def test_multi_adapter_merge_with_dora_equals_peft(tmp_path):
    name = "qwen2-multi"
    inputs = [MergeInput(adaptools.load(adapter_path(name))),
              MergeInput(adaptools.load(adapter_path(name) / "other"))]
    merge(base_path("qwen2"), inputs, tmp_path / "out")
    ours = merged_state(tmp_path / "out")
    theirs = peft_merged(name, names=["default", "other"]).state_dict()
    for key, value in ours.items():
        diff = (value.float() - theirs[key].float()).abs().max().item()
        assert torch.equal(value, theirs[key]), f"{key}: {diff}"


@pytest.mark.parametrize("name", sorted(WEIGHT_ADAPTERS))
def test_merged_folder_loads_in_transformers_and_matches_unmerged_logits(name, tmp_path):
    arch = SAFE_ADAPTERS[name]
    run_merge(name, tmp_path / "out", dtype="fp32")
    merged = load_base(tmp_path / "out")
    expected = logits(peft_model(base_path(arch), adapter_path(name), resize=RESIZED.get(name)))
    got = logits(merged)
    tolerance = 2e-2 if BASE_DTYPE[arch] == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_tied_embedding_lora_unties_and_keeps_lm_head(tmp_path):
    summary = run_merge("llama-embedding", tmp_path / "out")
    assert summary.untied_lm_head
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    ours = merged_state(tmp_path / "out")
    base = load_base(base_path("llama")).state_dict()
    assert torch.equal(ours["lm_head.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(ours["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_untouched_tied_embedding_stays_tied(tmp_path):
    summary = run_merge("llama-lora", tmp_path / "out")
    assert not summary.untied_lm_head
    assert "lm_head.weight" not in merged_state(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_ensure_weight_tying_delta_is_applied_once(tmp_path):
    """An lm_head LoRA that mirrors the embedding LoRA (peft's ensure_weight_tying): W + Δ, not W + 2Δ."""
    src = adaptools.load(adapter_path("llama-embedding"))
    tensors = {n: src.tensor(n) for n in src.tensor_names()}
    a = tensors["model.embed_tokens.lora_embedding_A"]
    b = tensors["model.embed_tokens.lora_embedding_B"]
    tensors["lm_head.lora_A"] = b.T.contiguous()
    tensors["lm_head.lora_B"] = a.T.contiguous()
    config = dict(src.config)
    config["target_modules"] = ["embed_tokens", "q_proj", "lm_head"]
    adapter = adaptools.Adapter("lora", config, adaptools.plugin.MemoryStore(tensors), source="mirror")
    summary = merge(base_path("llama"), [MergeInput(adapter)], tmp_path / "out")
    assert not summary.untied_lm_head
    ours = merged_state(tmp_path / "out")
    base = load_base(base_path("llama")).state_dict()["model.embed_tokens.weight"]
    expected = base + 2.0 * (b @ a).T
    assert torch.equal(ours["model.embed_tokens.weight"], expected)


def test_resized_vocab_updates_config_and_shapes(tmp_path):
    summary = run_merge("llama-resized-vocab", tmp_path / "out")
    assert summary.vocab_size == 136
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 136
    ours = merged_state(tmp_path / "out")
    assert ours["model.embed_tokens.weight"].shape == (136, 64)
    assert ours["lm_head.weight"].shape == (136, 64)


def test_weights_scale_deltas(tmp_path):
    base = load_base(base_path("llama")).state_dict()
    adapter = adaptools.load(adapter_path("llama-lora"))
    merge(base_path("llama"), [MergeInput(adapter, 0.5), MergeInput(adapter, 0.5)], tmp_path / "half")
    merge(base_path("llama"), [MergeInput(adapter, 1.0)], tmp_path / "one")
    half, one = merged_state(tmp_path / "half"), merged_state(tmp_path / "one")
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(half[key], one[key], rtol=0, atol=1e-6)
    assert not torch.equal(one[key], base[key])


def test_dtype_and_reshard(tmp_path):
    summary = run_merge("llama-lora", tmp_path / "out", dtype="bf16", shard_size=150_000)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) == summary.shards >= 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    ours = merged_state(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_base(tmp_path / "out", torch.bfloat16)
    assert torch.isfinite(logits(model)).all()


def test_provenance_in_metadata(tmp_path):
    run_merge("llama-lora", tmp_path / "out", command="adaptools merge x y z")
    meta = adaptools.plugin.read_header(next((tmp_path / "out").glob("*.safetensors"))).metadata
    provenance = json.loads(meta["adaptools.provenance"])
    assert provenance["tool"].startswith("adaptools ")
    assert provenance["command"] == "adaptools merge x y z"
    files = {f["file"]: f["sha256"] for f in provenance["adapters"][0]["files"]}
    import hashlib

    expected = hashlib.sha256((adapter_path("llama-lora") / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert files["adapter_model.safetensors"] == expected
    assert (tmp_path / "out" / "README.md").read_text().startswith("---\nbase_model:")


def test_untouched_tensors_are_byte_identical(tmp_path):
    run_merge("llama-layers", tmp_path / "out")
    ours = merged_state(tmp_path / "out")
    base = {}
    for f in base_path("llama").glob("*.safetensors"):
        base.update(load_file(str(f)))
    touched = {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"}
    for key, value in base.items():
        if key in touched:
            assert not torch.equal(ours[key], value)
        else:
            assert torch.equal(ours[key], value), key


# --- refusals: exit 2, nothing written ------------------------------------------------------------------


def refuse(cli_runner, tmp_path, *args):
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli_runner("merge", *args, out)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return result.stderr


def test_refuses_missing_target_module(cli_runner, tmp_path):
    err = refuse(cli_runner, tmp_path, "--ignore-base-mismatch", base_path("qwen2"), adapter_path("gpt2-lora"))
    assert "base has no such tensor" in err and "c_attn" in err


def test_refuses_adapter_of_another_architecture(cli_runner, tmp_path):
    err = refuse(cli_runner, tmp_path, base_path("qwen2"), adapter_path("gpt2-lora"))
    assert "trained on GPT2LMHeadModel, the base is Qwen2ForCausalLM" in err


def test_refuses_shape_mismatch(cli_runner, tmp_path):
    tensors = load_file(str(adapter_path("llama-lora") / "adapter_model.safetensors"))
    config = json.loads((adapter_path("llama-lora") / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 48)
    adaptools.plugin.save_tensors(bad / "adapter_model.safetensors", tensors)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    err = refuse(cli_runner, tmp_path, base_path("llama"), bad)
    assert "do not fit base" in err and "q_proj" in err


def test_refuses_other_architecture(cli_runner, tmp_path):
    bad = tmp_path / "arch"
    import shutil

    shutil.copytree(adapter_path("llama-lora"), bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["auto_mapping"] = {"base_model_class": "MistralForCausalLM"}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    err = refuse(cli_runner, tmp_path, base_path("llama"), bad)
    assert "MistralForCausalLM" in err and "--ignore-base-mismatch" in err
    result = cli_runner("merge", base_path("llama"), bad, tmp_path / "ok", "--ignore-base-mismatch")
    assert result.exit_code == 0, result.output


def test_refuses_base_mutating_init(cli_runner, tmp_path):
    bad = tmp_path / "olora"
    import shutil

    shutil.copytree(adapter_path("llama-lora"), bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["init_lora_weights"] = "corda"  # olora and pissa are recomputed on the fly (tests/test_olora.py)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    assert "corda" in refuse(cli_runner, tmp_path, base_path("llama"), bad)


def test_refuses_lora_bias_without_base_bias(cli_runner, tmp_path):
    err = refuse(cli_runner, tmp_path, "--ignore-base-mismatch", base_path("llama"), adapter_path("qwen2-lora-bias"))
    assert "needs a bias" in err


def test_refuses_existing_output_without_force(cli_runner, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), out)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (out / "keep").read_text() == "x"
    # --force replaces only what adaptools wrote: a folder of the user's stays untouched
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), out, "--force")
    assert result.exit_code == 2 and "not written by adaptools" in result.stderr
    assert (out / "keep").read_text() == "x"
    mine = tmp_path / "mine"
    assert cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), mine).exit_code == 0
    (mine / "stale").write_text("x")
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), mine, "--force")
    assert result.exit_code == 0
    assert not (mine / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_refuses_bad_base(cli_runner, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in refuse(cli_runner, tmp_path, empty, adapter_path("llama-lora"))


def test_usage_errors(cli_runner, tmp_path):
    result = cli_runner("merge", base_path("llama"), tmp_path / "out")
    assert result.exit_code == 2
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), tmp_path / "o", "--weight", "1",
                        "--weight", "2")
    assert result.exit_code == 2 and "2 --weight values for 1 adapters" in result.output
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), tmp_path / "o", "--check", "nope")
    assert result.exit_code == 2 and "unknown validator 'nope'" in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_merge_json_summary(cli_runner, tmp_path):
    result = cli_runner("merge", base_path("gpt2"), adapter_path("gpt2-lora"), tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tensors_merged"] == 8
    assert data["peak_rss_bytes"] > 0


# --- interruption: no partial OUT --------------------------------------------------------------------

SLOW_MERGE = """
import sys, time
import adaptools.safetensors_io as io
original = io.SafetensorsWriter.write
def slow(self, name, tensor, *rest):
    print("writing", name, flush=True)
    time.sleep(0.5)
    return original(self, name, tensor, *rest)
io.SafetensorsWriter.write = slow
from adaptools.cli import main
sys.argv = ["adaptools", "merge", sys.argv[1], sys.argv[2], sys.argv[3]]
main()
"""


@pytest.mark.parametrize("sigs", [[signal.SIGTERM], [signal.SIGINT], [signal.SIGHUP], [signal.SIGQUIT],
                                  [signal.SIGINT, signal.SIGINT], [signal.SIGTERM, signal.SIGINT], [signal.SIGKILL]],
                         ids=["term", "int", "hup", "quit", "int-int", "term-int", "kill"])
def test_interrupted_merge_leaves_no_output(sigs, tmp_path):
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(base_path("llama")),
                             str(adapter_path("llama-lora")), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "ADAPTOOLS_LOAD_PLUGINS": ""})
    try:
        for _ in range(3):  # let it write a few tensors
            assert "writing" in proc.stdout.readline()
        for sig in sigs:  # a second signal 0.05 s later must not cut the clean-up short
            proc.send_signal(sig)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    if sigs == [signal.SIGKILL]:  # nothing can clean up after SIGKILL: the next run into the folder does
        assert leftovers and all(name.startswith(".out.adaptools-tmp-") for name in leftovers)
        merge(base_path("llama"), [MergeInput(adaptools.load(adapter_path("llama-lora")))], tmp_path / "next")
        assert [p.name for p in tmp_path.iterdir()] == ["next"]
    else:
        assert leftovers == []
        assert proc.returncode == 128 + sigs[0]
        assert "Traceback" not in err and err.strip().splitlines() == [
            f"Interrupted ({signal.Signals(sigs[0]).name}): nothing was written."]


FULL_DISK = """
import errno, os, sys
calls = []
def full(fd, offset, size):
    calls.append(size)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.posix_fallocate = full
import adaptools.safetensors_io as io
original = io.SafetensorsWriter.write
def counted(self, name, tensor, *rest):
    print("wrote", name, flush=True)
    return original(self, name, tensor, *rest)
io.SafetensorsWriter.write = counted
from adaptools.cli import main
sys.argv = ["adaptools", "merge", sys.argv[1], sys.argv[2], sys.argv[3]]
main()
"""


def test_full_disk_is_found_before_any_tensor_is_written(tmp_path):
    """Each shard is reserved whole before its first byte: a disk without room fails at once, in one line
    that says what to do, with no tensor computed for nothing and nothing left behind."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(base_path("llama")), str(adapter_path("llama-lora")),
                           str(out)], capture_output=True, text=True, env={**os.environ, "ADAPTOOLS_LOAD_PLUGINS": ""})
    assert done.returncode == 2, done.stderr
    assert "wrote" not in done.stdout
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "No space left" in done.stderr and "free some space" in done.stderr and str(out) in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_writer_without_fallocate_support_still_writes(tmp_path, monkeypatch):
    import errno

    from adaptools.safetensors_io import SafetensorsWriter, TensorSpec

    def unsupported(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    with SafetensorsWriter(tmp_path / "x.safetensors", {k: TensorSpec.of(v) for k, v in tensors.items()}) as out:
        for name, tensor in tensors.items():
            out.write(name, tensor)
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_writer_reserves_exactly_the_file_size(tmp_path):
    from adaptools.safetensors_io import SafetensorsWriter, TensorSpec

    tensors = {"a": torch.randn(3, 5), "b": torch.zeros(7, dtype=torch.float16)}
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, {k: TensorSpec.of(v) for k, v in tensors.items()}) as out:
        assert path.stat().st_size > 8 + 60 + 14  # header and data reserved before any tensor
        reserved = path.stat().st_size
        for name, tensor in tensors.items():
            out.write(name, tensor)
    assert path.stat().st_size == reserved
    assert torch.equal(load_file(path)["a"], tensors["a"])


def test_every_output_file_is_exactly_its_header_and_data(tmp_path):
    """A merge copies untouched tensors in-kernel into a file reserved at its full size; each file must end
    where its last tensor does (safetensors refuses a file 'not fully covered')."""
    import struct

    from safetensors import safe_open

    out = tmp_path / "out"
    merge(base_path("llama"), [MergeInput(adaptools.load(adapter_path("llama-lora")))], out, shard_size=20_000)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1
    for path in files:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert len(raw) == 8 + n + end, path.name
        with safe_open(path, "pt") as f:  # the reference reader accepts it
            assert list(f.keys())
