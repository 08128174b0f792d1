"""The merge engine as a whole: the plan (dry run), the one writer for dense and quantized output, checks
before publication, options validated up front, and never garbage in OUT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import adapter_path, base_path
from safetensors.torch import load_file

import adaptools
from adaptools import plugin
from adaptools.engine import MergeInput, MergeOptions, merge

NF4_BASE = base_path("llama-nf4")


def run_cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "adaptools", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "ADAPTOOLS_LOAD_PLUGINS": "", **(env or {})}, **kw)


def test_dry_run_prints_the_plan_and_writes_nothing(cli_runner, tmp_path):
    out = tmp_path / "out"
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-resized-vocab"), out, "--dry-run",
                        "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "model.embed_tokens.weight" in plan["merged"] and plan["untied"] == ["lm_head.weight"]
    assert plan["resized"]["model.embed_tokens.weight"] == [[128, 64], [136, 64]]
    assert plan["config_changes"] == {"tie_word_embeddings": False, "vocab_size": 136}
    assert plan["copied"] + len(plan["merged"]) + len(plan["cast"]) == plan["tensors"]
    assert [s["file"] for s in plan["shards"]] == sorted(p.name for p in base_path("llama").glob("*.safetensors"))
    text = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), out, "--dry-run")
    assert text.exit_code == 0 and "copied byte for byte" in text.stdout and not out.exists()


def test_dry_run_bytes_match_what_merge_writes(cli_runner, tmp_path):
    result = cli_runner("merge", base_path("qwen2"), adapter_path("qwen2-lora-bias"), tmp_path / "o", "--dry-run",
                        "--json", "--dtype", "fp32")
    planned = {s["file"]: s["bytes"] for s in json.loads(result.stdout)["shards"]}
    merge(base_path("qwen2"), [MergeInput(adaptools.load(adapter_path("qwen2-lora-bias")))], tmp_path / "o",
          dtype="fp32")
    for name, nbytes in planned.items():
        header = adaptools.plugin.read_header(tmp_path / "o" / name)
        assert sum(i.nbytes for i in header.tensors.values()) == nbytes


def test_requantized_resized_vocab_config_matches_its_tensors(tmp_path):
    """The 4-bit writer used to leave vocab_size at 128 with 136-row embeddings: transformers refused it."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "rq"
    summary = merge(NF4_BASE, [MergeInput(adaptools.load(adapter_path("llama-resized-vocab")))], out,
                    requantize=True)
    config = json.loads((out / "config.json").read_text())
    assert summary.vocab_size == config["vocab_size"] == 136
    assert config["tie_word_embeddings"] is False
    state = load_file(str(out / "model.safetensors"))
    assert state["model.embed_tokens.weight"].shape[0] == state["lm_head.weight"].shape[0] == 136
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert model.get_input_embeddings().weight.shape[0] == 136
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_dense_and_requantized_outputs_share_layout_rules(tmp_path):
    """An untied lm_head follows its storage in both writers."""
    adapter = MergeInput(adaptools.load(adapter_path("llama-resized-vocab")))
    merge(NF4_BASE, [adapter], tmp_path / "dense")
    merge(NF4_BASE, [adapter], tmp_path / "rq", requantize=True)
    for out in ("dense", "rq"):
        names = list(adaptools.plugin.read_header(tmp_path / out / "model.safetensors").tensors)
        assert names.index("lm_head.weight") == names.index("model.embed_tokens.weight") + 1, out


KILL_AFTER_CHECK = """
import os, signal, sys
import adaptools
from adaptools.plugins import load_plugins, pm

class Killer(adaptools.plugin.Validator):
    name = "killer"
    def validate(self, context):
        print("validated", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

class Plugin:
    @adaptools.plugin.hookimpl
    def register_validators(self, register):
        register(Killer())

load_plugins()
pm.register(Plugin(), name="killer-plugin")
from adaptools.cli import main
sys.argv = ["adaptools", "merge", *sys.argv[1:], "--check", "killer"]
main()
"""


def test_killed_between_validation_and_publication_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECK, str(base_path("llama")),
                           str(adapter_path("llama-lora")), str(out)], capture_output=True, text=True,
                          env={**os.environ, "ADAPTOOLS_LOAD_PLUGINS": ""})
    assert proc.returncode == -signal.SIGKILL and "validated" in proc.stdout
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert leftovers and all(p.name.startswith(".out.adaptools-tmp-") for p in leftovers)
    # the next run into the same folder removes what the killed one left
    merge(base_path("llama"), [MergeInput(adaptools.load(adapter_path("llama-lora")))], tmp_path / "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_checks_are_recorded_inside_the_output_before_it_is_published(tmp_path):
    class Recorder(adaptools.plugin.Validator):
        name = "recorder"
        seen: list[str] = []

        def validate(self, context):
            self.seen.append(context.output)
            return adaptools.plugin.Verdict(False, "recorded a failure", {"x": 1})

    from adaptools.plugins import load_plugins, pm

    class Plugin:
        @adaptools.plugin.hookimpl
        def register_validators(self, register):
            register(Recorder())

    load_plugins()
    pm.register(Plugin(), name="recorder-plugin")
    try:
        from adaptools.engine import CheckRequest

        out = tmp_path / "out"
        summary = merge(base_path("gpt2"), [MergeInput(adaptools.load(adapter_path("gpt2-lora")))], out,
                        checks=(CheckRequest("recorder"),))
    finally:
        pm.unregister(name="recorder-plugin")
    assert ".out.adaptools-tmp-" in Recorder.seen[0]  # the check saw the unpublished output
    assert not summary.checks_passed
    assert json.loads((out / "adaptools_checks.json").read_text())[0]["message"] == "recorded a failure"
    assert "CHECK FAILED: recorder" in (out / "README.md").read_text()


def test_check_options_are_refused_before_anything_is_written(cli_runner, tmp_path):
    out = tmp_path / "out"
    result = cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), out, "--check", "perplexity",
                        "--eval-text", tmp_path / "missing.txt")
    assert result.exit_code == 2 and "missing.txt" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("field", "value", "message"), [
    ("dtype", "fp8", "unknown dtype"), ("device", "bogus", "unknown device"), ("device", "meta", "unknown device"),
    ("shard_size", 0, "positive"), ("shard_size", -5, "positive"), ("workers", -1, "workers"),
])
def test_options_are_validated_when_made(field, value, message):
    with pytest.raises(adaptools.InputError, match=message):
        MergeOptions(**{field: value})


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_refused(weight):
    with pytest.raises(adaptools.InputError, match="finite"):
        MergeInput(adaptools.load(adapter_path("llama-lora")), weight)


def _scaled_adapter(factor: float, name: str = "gpt2-lora") -> adaptools.Adapter:
    src = adaptools.load(adapter_path(name))
    tensors = {n: src.tensor(n) * factor for n in src.tensor_names()}
    return adaptools.Adapter("lora", dict(src.config), adaptools.plugin.MemoryStore(tensors), source="overflowing")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_overflowing_delta_is_refused_naming_the_tensor(arch, tmp_path):
    """Both fp32 bases; on llama the delta is added in place, block of rows by block, to what the dense
    backend decoded, which must not be the stored base the check compares with."""
    with pytest.raises(adaptools.InputError, match=r"non-finite.*") as err:
        merge(base_path(arch), [MergeInput(_scaled_adapter(1e25, f"{arch}-lora"))], tmp_path / "out")
    assert err.value.tensor and err.value.tensor.endswith(".weight")
    assert list(tmp_path.iterdir()) == []


def _gpt2_base_with(tmp_path: Path, tensor: str, index: tuple[int, int], value: float) -> Path:
    """A copy of the gpt2 fixture base with one value of ``tensor`` set to ``value``."""
    base = tmp_path / "base"
    shutil.copytree(base_path("gpt2"), base)
    state = {k: v.clone() for k, v in load_file(str(base / "model.safetensors")).items()}
    state[tensor][index] = value
    adaptools.plugin.save_tensors(base / "model.safetensors", state, {"format": "pt"})
    return base


def test_cast_overflow_to_fp16_is_refused(tmp_path):
    """Finite fp32 values beyond fp16's range would become infinities in an --dtype fp16 output."""
    base = _gpt2_base_with(tmp_path, "transformer.h.0.mlp.c_fc.weight", (0, 0), 1e6)
    with pytest.raises(adaptools.InputError, match="non-finite") as err:
        merge(base, [], tmp_path / "out", dtype="fp16", operation="merge")
    assert err.value.tensor == "transformer.h.0.mlp.c_fc.weight"
    assert not (tmp_path / "out").exists()


def test_non_finite_values_already_in_the_base_are_kept(tmp_path):
    base = _gpt2_base_with(tmp_path, "transformer.h.0.attn.c_attn.weight", (3, 5), float("nan"))
    merge(base, [MergeInput(adaptools.load(adapter_path("gpt2-lora")))], tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))["transformer.h.0.attn.c_attn.weight"]
    assert torch.isnan(merged[3, 5]) and int(torch.isnan(merged).sum()) == 1


@pytest.mark.parametrize("where", ["base", "base_parent", "adapter", "cwd"])
def test_force_never_replaces_an_input_or_a_folder_holding_one(tmp_path, where, monkeypatch):
    work = tmp_path / "work"
    base = work / "base"
    base.mkdir(parents=True)
    for f in base_path("gpt2").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    adapter = work / "adapter"
    adapter.mkdir()
    for f in adapter_path("gpt2-lora").iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = {"base": base, "base_parent": work, "adapter": adapter, "cwd": "."}[where]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    result = run_cli("merge", base, adapter, out, "--force", cwd=work)
    assert result.returncode == 2, result.stderr
    assert "never replaces inputs" in result.stderr and "Traceback" not in result.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_force_refuses_to_turn_a_folder_into_a_file(tmp_path, cli_runner):
    out = tmp_path / "out"
    assert cli_runner("convert", adapter_path("gpt2-lora"), out, "--to", "peft").exit_code == 0
    result = cli_runner("convert", adapter_path("gpt2-lora"), out, "--force")
    assert result.exit_code == 2 and "folder" in result.stderr
    assert out.is_dir()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM])
def test_stop_signals_during_start_up_end_in_one_line(sig, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "adaptools", "merge", str(base_path("llama")),
                             str(adapter_path("llama-lora")), str(tmp_path / "out")], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "ADAPTOOLS_LOAD_PLUGINS": ""})
    import time

    # Wait until the process catches the signal (its handlers are installed before the heavy imports):
    # before that, no program can turn it into a message, and a loaded machine can take over 0.5 s to get there.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught >> (sig - 1) & 1:
            break
        time.sleep(0.01)
    time.sleep(0.2)  # inside the imports
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "Interrupted" in err
    assert not (tmp_path / "out").exists()


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from adaptools.main import main
sys.argv = ["adaptools", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("command", ["merge", "convert", "dequantize"])
def test_a_full_disk_ends_in_one_line_and_leaves_nothing(command, tmp_path):
    out = tmp_path / "out"
    argv = {"merge": ["merge", base_path("llama"), adapter_path("llama-lora"), out],
            "convert": ["convert", adapter_path("llama-lora"), out, "--to", "peft"],
            "dequantize": ["dequantize", NF4_BASE, out]}[command]
    limit = "20_000" if command == "convert" else "50_000"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK.replace("200_000", limit), *map(str, argv)],
                          capture_output=True, text=True, env={**os.environ, "ADAPTOOLS_LOAD_PLUGINS": ""})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "File too large" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_output_folder_is_one_clean_error(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(adaptools.AdaptoolsError, match="Permission denied"):
        merge(base_path("gpt2"), [MergeInput(adaptools.load(adapter_path("gpt2-lora")))], tmp_path / "out")


def test_lm_head_lora_on_a_tied_base_unties_and_leaves_the_embedding(tmp_path):
    """Only the alias changes: the stored embedding is copied, lm_head written explicitly as W + sBA."""
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 64, generator=gen) * 0.1, torch.randn(128, 4, generator=gen) * 0.1
    method = adaptools.plugin.get_method("lora")
    config = method.from_peft({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["lm_head"]},
                              {"lm_head.lora_A": (4, 64)})
    adapter = adaptools.Adapter("lora", config, plugin.MemoryStore({"lm_head.lora_A": a, "lm_head.lora_B": b}),
                                source="lm-head-only")
    summary = merge(base_path("llama"), [MergeInput(adapter)], tmp_path / "out")
    assert summary.untied_lm_head
    state = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        state.update(load_file(str(f)))
    base = {}
    for f in base_path("llama").glob("*.safetensors"):
        base.update(load_file(str(f)))
    embedding = base["model.embed_tokens.weight"]
    assert torch.equal(state["model.embed_tokens.weight"], embedding)
    assert torch.equal(state["lm_head.weight"], embedding + (b @ a) * 2.0)


@pytest.mark.gpu
def test_cuda_merge_agrees_with_the_cpu_merge(tmp_path):
    """--device cuda runs the arithmetic on the GPU (whole tensors); the result matches the CPU's to the
    output dtype's rounding (GPU matrix products sum in another order)."""
    adapter = MergeInput(adaptools.load(adapter_path("qwen2-lora-bias")))
    merge(base_path("qwen2"), [adapter], tmp_path / "cpu")
    merge(base_path("qwen2"), [adapter], tmp_path / "gpu", device="cuda")
    cpu, gpu = load_file(str(tmp_path / "cpu" / "model.safetensors")), load_file(
        str(tmp_path / "gpu" / "model.safetensors"))
    for name, value in cpu.items():
        torch.testing.assert_close(gpu[name].float(), value.float(), rtol=1e-2, atol=1e-2)


def test_an_in_place_update_cannot_hide_the_infinities_it_makes(tmp_path):
    """An update with no row form that scales ``current`` in place also scales the decoded original it
    aliases; the non-finite check must compare with the stored value, not with that."""
    from adaptools.plugins import pm

    class Blow(adaptools.plugin.AdapterMethod, adaptools.plugin.Mergeable):
        name = "blow-up-test"
        roles = ("scale",)

        def merge_updates(self, adapter, base, weight=1.0):
            target = base.locate("model.layers.0.mlp.up_proj", "weight")
            return [adaptools.plugin.TensorUpdate(target, "delta", lambda current, original: current.mul_(1e39))]

    class Plugin:
        @adaptools.plugin.hookimpl
        def register_methods(self, register):
            register(Blow())

    pm.register(Plugin(), name="blow-up-plugin")
    try:
        adapter = adaptools.Adapter("blow-up-test", {}, adaptools.plugin.MemoryStore({}), source="blow")
        with pytest.raises(adaptools.InputError, match="non-finite"):
            merge(base_path("llama"), [MergeInput(adapter)], tmp_path / "out")
    finally:
        pm.unregister(name="blow-up-plugin")
    assert list(tmp_path.iterdir()) == []


def test_encoding_in_its_own_thread_writes_what_one_thread_does(tmp_path, monkeypatch):
    """--requantize encodes groups in a thread of its own, overlapping the next entries' arithmetic; the files
    and the survival report must be what encoding each entry before the next gives (ENCODING_AHEAD 0)."""
    import threading

    from adaptools.engine import run

    adapter = adaptools.load(adapter_path("llama-lora"))
    threads: set[str] = set()
    original = run.Compute._encode

    def spy(self, *args):
        threads.add(threading.current_thread().name)
        return original(self, *args)

    monkeypatch.setattr(run.Compute, "_encode", spy)
    ahead = merge(NF4_BASE, [MergeInput(adapter)], tmp_path / "ahead", requantize=True)
    assert threads and all(name.startswith("adaptools-encode") for name in threads)
    monkeypatch.setattr(run, "ENCODING_AHEAD", 0)
    one = merge(NF4_BASE, [MergeInput(adapter)], tmp_path / "one", requantize=True)
    assert ahead.survival == one.survival and ahead.tensors == one.tensors and ahead.survival
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "ahead").iterdir())
    for name in files:
        if name.endswith(".safetensors"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ahead" / name).read_bytes(), name


def test_an_encoding_error_in_its_thread_ends_the_run_and_leaves_nothing(tmp_path, monkeypatch):
    from adaptools.engine import run

    calls = []

    def broken(self, entry, *args):
        calls.append(entry.name)
        if len(calls) == 3:
            raise adaptools.InputError("encoding failed on purpose", tensor=entry.name)
        return original(self, entry, *args)

    original = run.Compute._encode
    monkeypatch.setattr(run.Compute, "_encode", broken)
    with pytest.raises(adaptools.InputError, match="on purpose"):
        merge(NF4_BASE, [MergeInput(adaptools.load(adapter_path("llama-lora")))], tmp_path / "out", requantize=True)
    assert list(tmp_path.iterdir()) == []
