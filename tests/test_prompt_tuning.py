"""Prompt tuning and P-tuning (PEFT PROMPT_TUNING, P_TUNING): read, check, bake the encoder, apply at runtime
exactly as PeftModel's forward does; merge refuses with the reason."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import FIXTURES, adapter_path, base_path
from peft_oracle import load_base, peft_model
from safetensors.torch import load_file

import adaptools
from adaptools.operations.check import check

NAMES = ["llama-prompt-tuning", "llama-p-tuning-mlp", "llama-p-tuning-lstm"]
TOKENS = {"llama-prompt-tuning": 5, "llama-p-tuning-mlp": 4, "llama-p-tuning-lstm": 6}
ENCODERS = FIXTURES / "prompt-encoders"
IDS = torch.tensor([[1, 5, 7, 9, 17, 33, 64, 100, 127, 3, 2, 8], [4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26]])
MASK = torch.tensor([[1] * 12, [0] * 3 + [1] * 9])  # left padding: the mask must grow by the virtual tokens
LABELS = IDS.masked_fill(MASK == 0, -100)
TEXT = FIXTURES / "text" / "GPL-3.txt"
LSTM = "llama-p-tuning-lstm"
#: How far the committed LSTM prompts may be from what PEFT computes on this machine. The LSTM's low bits
#: depend on the CPU: torch runs it through oneDNN's RNN primitive and the head through MKL's sgemm, both of
#: which pick their code path by instruction set (measured: the committed file, made on another machine, is
#: 4.8e-7 from what this AVX-512 Xeon computes, a few ulps). So the bit-exact oracle for the LSTM is PEFT run
#: here (peft_saved); the committed bits are only held to this bound.
LSTM_COMMITTED_TOLERANCE = 1e-5


def saved_prompts(name):
    return load_file(str(adapter_path(name) / "adapter_model.safetensors"))["prompt_embeddings"]


def peft_saves(encoder, out):
    """What PEFT's own save_pretrained writes for the training-time checkpoint ``encoder``, computed here and
    now: the PeftModel as a training script holds it (inference_mode off, so the prompt encoder is built, its
    weights requiring grad), the committed encoder weights loaded into it, saved with grad mode on."""
    from peft import PeftConfig, get_peft_model

    config = PeftConfig.from_pretrained(encoder)
    config.inference_mode = False
    model = get_peft_model(load_base(base_path("llama")), config)
    loaded = model.load_state_dict(load_file(str(encoder / "adapter_model.safetensors")), strict=False)
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if k.startswith("prompt_encoder.")], loaded.missing_keys
    assert all(p.requires_grad for p in model.prompt_encoder.parameters())
    with torch.enable_grad():
        model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def peft_saved(tmp_path_factory):
    """name -> the adapter directory PEFT writes, in this process, from the committed encoder of that name."""
    root = tmp_path_factory.mktemp("peft-saved")
    return {name: peft_saves(ENCODERS / name, root / name) for name in NAMES}


def live_prompts(peft_saved, name):
    return load_file(str(peft_saved[name] / "adapter_model.safetensors"))["prompt_embeddings"]


def assert_committed_prompts_are(name, prompts):
    """The committed adapter holds ``prompts`` (what PEFT computes here): bit for bit, but for the LSTM's
    CPU-dependent low bits (LSTM_COMMITTED_TOLERANCE)."""
    committed = saved_prompts(name)
    if name == LSTM:
        assert committed.shape == prompts.shape and committed.dtype == prompts.dtype
        assert (committed - prompts).abs().max() <= LSTM_COMMITTED_TOLERANCE
    else:
        assert torch.equal(committed, prompts)


def forward_of(adapter_dir):
    """PeftModel's forward (logits over virtual + real positions, and the loss) for a saved adapter."""
    with torch.no_grad():
        return peft_model(base_path("llama"), adapter_dir)(input_ids=IDS, attention_mask=MASK, labels=LABELS)


@pytest.fixture(scope="module")
def reference_outputs():
    """PeftModel's forward for each committed adapter."""
    return {name: forward_of(adapter_path(name)) for name in NAMES}


@pytest.fixture(scope="module")
def encoder_outputs(peft_saved):
    """PeftModel's forward for what PEFT saves, here, from each committed encoder: the oracle for baking and
    applying an encoder (for the LSTM the committed adapter's bits come from another CPU's kernel)."""
    return {name: forward_of(peft_saved[name]) for name in NAMES}


@torch.no_grad()
def applied(adapter, model=None, **kwargs):
    model = model or load_base(base_path("llama"))
    with adaptools.plugin.get_method(adapter.method).apply(adapter, model):
        return model(**{"input_ids": IDS, "attention_mask": MASK, "labels": LABELS, **kwargs})


# --- reading and writing --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_reads_as_its_method_with_one_tensor(name):
    adapter = adaptools.load(adapter_path(name))
    assert adapter.method == ("prompt_tuning" if name == "llama-prompt-tuning" else "p_tuning")
    assert adapter.tensor_names() == ["prompt_embeddings"]
    assert adapter.info("prompt_embeddings").shape == (TOKENS[name], 64)


@pytest.mark.parametrize("name", NAMES)
def test_encoder_checkpoint_round_trip_is_lossless(name, tmp_path):
    """A training checkpoint (the encoder's weights) survives schema and PEFT writes key for key."""
    stored = load_file(str(ENCODERS / name / "adapter_model.safetensors"))
    adaptools.save(adaptools.load(ENCODERS / name), tmp_path / "e.safetensors")
    adaptools.save(adaptools.load(tmp_path / "e.safetensors"), tmp_path / "peft", format="peft")
    written = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(written) == sorted(k.replace(".default.", ".") for k in stored)
    assert all(torch.equal(written[k.replace(".default.", ".")], v) for k, v in stored.items())
    assert adaptools.load(tmp_path / "peft").tensor_names() == adaptools.load(ENCODERS / name).tensor_names()


# --- baking the encoder ---------------------------------------------------------------------------------


def peft_prompt_tuning_config(tokens, tmp_path):
    """The adapter_config.json PEFT itself writes for plain prompt tuning on the same base."""
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(load_base(base_path("llama")), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=tokens))
    model.save_pretrained(tmp_path / "reference")
    config = json.loads((tmp_path / "reference" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "fixtures/bases/llama"
    return config


@pytest.mark.parametrize("name", NAMES)
def test_bake_gives_what_peft_saves_as_plain_prompt_tuning(name, tmp_path, cli_runner, reference_outputs,
                                                           peft_saved, encoder_outputs):
    assert "PROMPT004" in {f.rule for f in check(ENCODERS / name).findings}
    result = cli_runner("convert", ENCODERS / name, tmp_path / "baked", "--to", "peft", "--bake-projection")
    assert result.exit_code == 0, result.output
    baked = load_file(str(tmp_path / "baked" / "adapter_model.safetensors"))
    want = live_prompts(peft_saved, name)
    assert list(baked) == ["prompt_embeddings"] and torch.equal(baked["prompt_embeddings"], want)
    assert_committed_prompts_are(name, want)
    config = json.loads((tmp_path / "baked" / "adapter_config.json").read_text())
    assert config == peft_prompt_tuning_config(TOKENS[name], tmp_path)
    with torch.no_grad():
        logits = peft_model(base_path("llama"), tmp_path / "baked")(input_ids=IDS, attention_mask=MASK).logits
    assert torch.equal(logits, encoder_outputs[name].logits)
    if name != LSTM:  # the same prompts as the committed adapter, bit for bit: the same forward
        assert torch.equal(logits, reference_outputs[name].logits)


def test_saved_p_tuning_bakes_to_prompt_tuning_too(tmp_path, cli_runner):
    result = cli_runner("convert", adapter_path("llama-p-tuning-mlp"), tmp_path / "b", "--to", "peft",
                        "--bake-projection")
    assert result.exit_code == 0
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    plain = cli_runner("convert", adapter_path("llama-prompt-tuning"), tmp_path / "p", "--to", "peft",
                       "--bake-projection")
    assert plain.exit_code == 0
    assert (json.loads((tmp_path / "p" / "adapter_config.json").read_text())
            == json.loads((adapter_path("llama-prompt-tuning") / "adapter_config.json").read_text()))


def test_lstm_bake_runs_the_kernel_peft_saves_with(peft_saved):
    """PEFT saves with grad mode on; the no-grad LSTM kernel gives other bits, so the mode matters.

    Which bits each kernel gives depends on the CPU (oneDNN picks the RNN implementation by instruction set:
    here grad mode runs its reference forward_training primitive and no-grad its brgemm forward_inference one),
    so the saved bits are PEFT's, computed in this process; the committed file is from another machine."""
    encoder = adaptools.load(ENCODERS / "llama-p-tuning-lstm")
    tensors = {adaptools.plugin.split_name(n)[1]: encoder.tensor(n) for n in encoder.tensor_names()}
    config = encoder.config
    lstm = torch.nn.LSTM(64, config["encoder_hidden_size"], num_layers=2, bidirectional=True, batch_first=True)
    lstm.load_state_dict({p: tensors[f"lstm_{p}"] for p, _ in lstm.named_parameters()})
    head = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.ReLU(), torch.nn.Linear(48, 64))
    head.load_state_dict({"0.weight": tensors["head_0"], "0.bias": tensors["head_0_bias"],
                          "2.weight": tensors["head_2"], "2.bias": tensors["head_2_bias"]})
    with torch.no_grad():
        no_grad = head(lstm(tensors["embedding"][None])[0])[0]
    saved = live_prompts(peft_saved, LSTM)
    assert not torch.equal(no_grad, saved) and (no_grad - saved).abs().max() < 1e-5
    assert_committed_prompts_are(LSTM, saved)
    with torch.no_grad():  # our bake gives the saved bits even when called under no_grad
        baked = adaptools.plugin.get_method("p_tuning").bake(encoder)
    assert torch.equal(baked.tensor("prompt_embeddings"), saved)


def test_bake_refuses_an_incomplete_encoder(tmp_path):
    adapter = adaptools.load(ENCODERS / "llama-p-tuning-mlp", validate=False)
    state = {n: adapter.tensor(n) for n in adapter.tensor_names() if n != "head_2"}
    broken = adaptools.Adapter("p_tuning", adapter.config, adaptools.plugin.MemoryStore(state))
    with pytest.raises(adaptools.UnsupportedOperationError, match="head_2"):
        adaptools.plugin.get_method("p_tuning").bake(broken)


# --- runtime application --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["saved", "encoder"])
@pytest.mark.parametrize("name", NAMES)
def test_runtime_application_equals_peft_forward(name, source, reference_outputs, encoder_outputs):
    """The committed adapter against PeftModel on it; an encoder against PeftModel on what PEFT saves from it
    here (for the MLP and plain prompts that is the committed adapter's forward too, bit for bit)."""
    want = reference_outputs[name] if source == "saved" else encoder_outputs[name]
    if source == "encoder" and name != LSTM:
        committed = reference_outputs[name]
        assert torch.equal(want.logits, committed.logits) and torch.equal(want.loss, committed.loss)
    adapter = adaptools.load(adapter_path(name) if source == "saved" else ENCODERS / name)
    model = load_base(base_path("llama"))
    with torch.no_grad():
        plain = model(input_ids=IDS, attention_mask=MASK).logits
    got = applied(adapter, model)
    n = TOKENS[name]
    assert want.logits.shape[1] == n + IDS.shape[1]  # PEFT keeps the virtual positions; we drop them
    assert torch.equal(got.logits, want.logits[:, n:])
    assert torch.equal(got.loss, want.loss)
    assert (got.logits - plain).abs().max() > 1e-2  # the prompts matter, so the comparison can fail
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS, attention_mask=MASK).logits, plain)  # undone on exit


def test_position_ids_are_dropped_as_peft_does(reference_outputs):
    adapter = adaptools.load(adapter_path("llama-p-tuning-mlp"))
    got = applied(adapter, position_ids=torch.arange(12).repeat(2, 1) + 50)
    assert torch.equal(got.logits, reference_outputs["llama-p-tuning-mlp"].logits[:, 4:])


def test_inputs_embeds_and_positional_ids_work(reference_outputs):
    adapter = adaptools.load(adapter_path("llama-prompt-tuning"))
    model = load_base(base_path("llama"))
    with adaptools.plugin.get_method("prompt_tuning").apply(adapter, model), torch.no_grad():
        positional = model(IDS, MASK).logits
        embeds = model(inputs_embeds=model.get_input_embeddings()(IDS), attention_mask=MASK).logits
    want = reference_outputs["llama-prompt-tuning"].logits[:, 5:]
    assert torch.equal(positional, want) and torch.equal(embeds, want)


def test_eval_perplexity_equals_peft_model(cli_runner):
    """`adaptools eval --adapter` scores the text exactly as the PEFT model's logits do."""
    from adaptools_plugins.validators.loading import tokenize

    ids = tokenize(base_path("llama"), TEXT.read_text(), 300)
    result = cli_runner("eval", base_path("llama"), "--adapter", adapter_path("llama-p-tuning-lstm"), "--eval-text",
                        TEXT, "--max-tokens", "300", "--window", "100", "--json")
    assert result.exit_code == 0, result.output
    reference = peft_model(base_path("llama"), adapter_path("llama-p-tuning-lstm"))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 299, 100):
            chunk = ids[start:start + 100][None]
            logits = reference(input_ids=chunk).logits[:, 6:].float()  # PEFT's logits without the 6 virtual
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    assert json.loads(result.stdout)["perplexity"] == math.exp(total / count)
    plain = json.loads(cli_runner("eval", base_path("llama"), "--eval-text", TEXT, "--max-tokens", "300",
                                  "--window", "100", "--json").stdout)["perplexity"]
    assert plain != math.exp(total / count)


def test_apply_refusals(tmp_path):
    adapter = adaptools.load(adapter_path("llama-prompt-tuning"))
    seq2seq = adaptools.Adapter("prompt_tuning", {**adapter.config, "num_transformer_submodules": 2},
                                adapter.tensors)
    with pytest.raises(adaptools.UnsupportedOperationError, match="encoder-decoder"):
        adaptools.plugin.get_method("prompt_tuning").apply(seq2seq, load_base(base_path("llama")))
    wide = adaptools.Adapter("prompt_tuning", {**adapter.config, "token_dim": 48},
                             adaptools.plugin.MemoryStore({"prompt_embeddings": torch.zeros(5, 48)}))
    with pytest.raises(adaptools.IncompatibleBaseError, match="48 wide"):
        adaptools.plugin.get_method("prompt_tuning").apply(wide, load_base(base_path("llama")))
    llama = load_base(base_path("llama"))
    with adaptools.plugin.get_method("prompt_tuning").apply(adapter, llama), torch.no_grad():
        cache = llama(input_ids=IDS[:1, :3], use_cache=True).past_key_values
        assert cache.get_seq_length() == 5 + 3
        with pytest.raises(adaptools.UnsupportedOperationError, match="incremental decoding"):
            llama(input_ids=IDS[:1, 3:4], past_key_values=cache)
    gpt2 = load_base(base_path("gpt2"))  # learned positions: 128, the virtual tokens need 5 of them
    with adaptools.plugin.get_method("prompt_tuning").apply(adapter, gpt2), torch.no_grad():
        assert gpt2(input_ids=torch.zeros(1, 123, dtype=torch.long)).logits.shape == (1, 123, 128)
        with pytest.raises(adaptools.InputError, match="exceed the model's 128 positions"):
            gpt2(input_ids=torch.zeros(1, 124, dtype=torch.long))


# --- what a user sees -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_merge_refuses_naming_why(name, tmp_path, cli_runner):
    result = cli_runner("merge", base_path("llama"), adapter_path(name), tmp_path / "out")
    assert result.exit_code == 2
    assert "cannot merge" in result.stderr and "virtual tokens" in result.stderr
    assert not (tmp_path / "out").exists()


def test_info_plugins_and_diff(cli_runner):
    result = cli_runner("info", ENCODERS / "llama-p-tuning-lstm")
    assert result.exit_code == 0 and "method: p_tuning" in result.stdout
    assert "encoder_reparameterization_type: LSTM" in result.stdout and "training-time prompt encoder" in result.stdout
    matrix = json.loads(cli_runner("plugins", "--json").stdout)["operations"]
    assert matrix["prompt_tuning"] == matrix["p_tuning"] == ["apply", "bake", "convert", "info"]
    from adaptools.operations.algebra import diff

    a, b = adaptools.load(adapter_path("llama-p-tuning-mlp")), adaptools.load(adapter_path("llama-p-tuning-lstm"))
    assert [m.difference for m in diff(a, a).modules] == [0.0]
    assert diff(a, b).shapes == {"prompt_embeddings": ([4, 64], [6, 64])}  # 4 virtual tokens against 6


# --- check: each rule catches a real defect -------------------------------------------------------------


def edited(name, config=None, tensors=None, root=None):
    def make(tmp):
        out = tmp / "adapter"
        shutil.copytree((root or adapter_path(name).parent) / name, out)
        if config:
            data = json.loads((out / "adapter_config.json").read_text())
            data.update(config)
            (out / "adapter_config.json").write_text(json.dumps(data))
        if tensors:
            state = {k: v.clone() for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
            tensors(state)
            (out / "adapter_model.safetensors").unlink()
            adaptools.plugin.save_tensors(out / "adapter_model.safetensors", state, {"format": "pt"})
        return out
    return make


def narrow_base(tmp):
    """The llama base with a 48-wide config: what a prompt for another model meets."""
    out = tmp / "base"
    shutil.copytree(base_path("llama"), out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    return str(out)


def nan_row(state):
    state["prompt_embeddings"][1, 3] = float("nan")


CORPUS = {
    "PROMPT001": edited("llama-prompt-tuning", config={"num_virtual_tokens": 4}),
    "PROMPT002": edited("llama-p-tuning-mlp", root=ENCODERS,
                        tensors=lambda s: s.pop("prompt_encoder.default.mlp_head.2.weight")),
    "PROMPT003": edited("llama-p-tuning-lstm", tensors=nan_row),
    "PROMPT004": edited("llama-p-tuning-lstm", root=ENCODERS),
    "PROMPT006": edited("llama-p-tuning-mlp", config={"encoder_reparameterization_type": "GRU"}),
}


@pytest.mark.parametrize("rule", sorted(CORPUS))
def test_each_rule_catches_its_defect(rule, tmp_path):
    report = check(CORPUS[rule](tmp_path))
    assert {f.rule for f in report.findings} == {rule}, [(f.rule, f.message) for f in report.findings]
    assert all(f.fix and f.message and f.path for f in report.findings)


def test_base_mismatch_rule(tmp_path):
    assert check(adapter_path("llama-p-tuning-mlp"), base=str(base_path("llama"))).findings == []
    findings = check(adapter_path("llama-p-tuning-mlp"), base=narrow_base(tmp_path)).findings
    assert [(f.rule, f.field) for f in findings] == [("PROMPT005", "token_dim")]


def test_a_stray_tensor_of_another_method_is_named(tmp_path):
    make = edited("llama-prompt-tuning", tensors=lambda s: s.update(
        {"base_model.model.model.norm.weight": torch.ones(64)}))
    findings = check(make(tmp_path)).findings
    assert [f.rule for f in findings] == ["PROMPT002"] and "model.norm" in findings[0].message


# --- hostile and sloppy files ---------------------------------------------------------------------------


HOSTILE = {
    "tokens-as-text": edited("llama-prompt-tuning", config={"num_virtual_tokens": "five"}),
    "token-dim-null": edited("llama-p-tuning-mlp", config={"token_dim": None}),
    "layers-as-text": edited("llama-p-tuning-lstm", root=ENCODERS, config={"encoder_num_layers": "2"}),
    "hidden-bool": edited("llama-p-tuning-mlp", root=ENCODERS, config={"encoder_hidden_size": True}),
    "inf": edited("llama-p-tuning-mlp", tensors=lambda s: s["prompt_embeddings"].fill_(float("inf"))),
    "int-tensor": edited("llama-prompt-tuning", tensors=lambda s: s.update(
        {"prompt_embeddings": s["prompt_embeddings"].to(torch.int32)})),
    "no-tensors": edited("llama-prompt-tuning", tensors=lambda s: s.clear()),
    "lstm-layer-missing": edited("llama-p-tuning-lstm", root=ENCODERS, tensors=lambda s: [
        s.pop(k) for k in list(s) if "_l1" in k]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_end_in_one_clean_error(case, tmp_path, cli_runner):
    path = HOSTILE[case](tmp_path)
    with pytest.raises(adaptools.AdaptoolsError):
        adaptools.load(path)
    for command in (["info", path], ["convert", path, tmp_path / "out", "--bake-projection"]):
        result = cli_runner(*command)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert str(path) in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "out").exists()
    assert check(path).findings  # check reports it instead of stopping


def test_truncated_weights_are_refused(tmp_path, cli_runner):
    out = edited("llama-prompt-tuning")(tmp_path)
    data = (out / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(data[:-40])
    result = cli_runner("info", out)
    assert result.exit_code == 2 and "Traceback" not in result.output
