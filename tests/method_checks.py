"""What every PEFT-method test compares with the real peft: merges (fp32, and on a bf16 copy of the base)
measured in ulps against ``merge_and_unload``, and runtime application against PeftModel's forward. Also a
tiny conv model for the conv variants (no transformers model has conv layers of every kind), defective copies
of the fixtures, and the tests every method file runs the same way (made here once, parametrised by the
file's fixtures and cases, and bound to a ``test_*`` name in that file so that pytest collects them there)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import adapter_path, base_path
from peft_oracle import load_base, logits, peft_model
from safetensors.torch import load_file, save_file

import adaptools
from adaptools import MergeInput, merge
from adaptools.operations.check import check

#: The first layer's q_proj as PEFT names it in a saved llama adapter.
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"

MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ``|a - b|`` in units in the last place of the larger of the two (0: bit-identical).

    Measured against the magnitude, so two tiny values of opposite sign count as close, as they are."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if not a.numel() or torch.equal(a, b):
        return 0.0
    x, y = a.double(), b.double()
    big = torch.maximum(x.abs(), y.abs()).clamp(min=torch.finfo(a.dtype).tiny)
    spacing = torch.exp2(torch.floor(torch.log2(big)) - MANTISSA[a.dtype])
    return float(((x - y).abs() / spacing).max())


def merged_state(out: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def bf16_copy(base: Path, out: Path) -> Path:
    """The base saved again in bf16 by transformers (what a bf16 checkpoint on the hub looks like)."""
    if not (out / "config.json").exists():
        load_base(base, torch.bfloat16).save_pretrained(out)
    return out


def compare_merge(base: Path, adapter: Path, out: Path, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Our merge against PEFT's merge_and_unload on the same base: max ulps, max |Δ|, tensors changed."""
    merge(base, [MergeInput(adaptools.load(adapter))], out)
    ours = merged_state(out)
    theirs = peft_model(base, adapter, dtype=dtype).merge_and_unload().state_dict()
    original = load_base(base, dtype).state_dict()
    worst, biggest, changed = 0, 0.0, 0
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype, key
        worst = max(worst, ulps(value, theirs[key]))
        biggest = max(biggest, float((value.float() - theirs[key].float()).abs().max()))
        changed += not torch.equal(value, original[key])
    assert changed > 0, "the adapter changed nothing: the comparison proves nothing"
    return {"ulps": worst, "max_abs": biggest, "changed": changed}


def compare_apply(base: Path, adapter: Path, dtype: torch.dtype = torch.float32) -> float:
    """max |logits| difference between our unmerged application and PeftModel's forward; checks that the
    adapter changes the logits and that leaving the context restores the model exactly."""
    expected = logits(peft_model(base, adapter, dtype=dtype))
    model = load_base(base, dtype)
    before = logits(model)
    loaded = adaptools.load(adapter)
    with adaptools.plugin.get_method(loaded.method).apply(loaded, model):
        got = logits(model)
    assert not torch.allclose(got, before, atol=1e-4), "the adapter had no effect: the test proves nothing"
    assert torch.equal(logits(model), before)
    return float((got - expected).abs().max())


def compare_merge_fp32_and_bf16(name: str, bf16_base, tmp: Path) -> tuple[dict[str, float], dict[str, float]]:
    """``compare_merge`` of fixture ``name`` on its fp32 base and on that base's bf16 copy (``bf16_base``, the
    conftest fixture): (fp32 figures, bf16 figures)."""
    arch = name.split("-")[0]
    fp32 = compare_merge(base_path(arch), adapter_path(name), tmp / "fp32")
    bf16 = compare_merge(bf16_base(arch), adapter_path(name), tmp / "bf16", torch.bfloat16)
    return fp32, bf16


def merge_exactness_test(fixtures: list[str]):
    """test_merge_is_bit_exact_against_peft_in_fp32_and_bf16 over ``fixtures``: 0 ulps in both dtypes."""

    @pytest.mark.parametrize("name", fixtures)
    def test_merge_is_bit_exact_against_peft_in_fp32_and_bf16(name, bf16_base, tmp_path):
        fp32, bf16 = compare_merge_fp32_and_bf16(name, bf16_base, tmp_path)
        assert fp32["ulps"] == 0 and bf16["ulps"] == 0, (fp32, bf16)

    return test_merge_is_bit_exact_against_peft_in_fp32_and_bf16


def application_exactness_test(fixtures: list[str]):
    """test_runtime_application_equals_peft_forward over ``fixtures``: the logits equal PeftModel's exactly."""

    @pytest.mark.parametrize("name", fixtures)
    def test_runtime_application_equals_peft_forward(name):
        assert compare_apply(base_path(name.split("-")[0]), adapter_path(name)) == 0.0

    return test_runtime_application_equals_peft_forward


class ConvNet(torch.nn.Module):
    """Conv2d 3×3, Conv2d 1×1, Conv1d k3 and a Linear head: the layer kinds the LyCORIS methods adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.pointwise = torch.nn.Conv2d(8, 6, 1)
        self.seq = torch.nn.Conv1d(6, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pointwise(torch.relu(self.conv(x)))
        h = self.seq(h.flatten(2))
        return self.head(h.mean(-1))


CONV_INPUT = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))


def conv_base(out: Path) -> Path:
    """A seeded ConvNet saved as a checkpoint folder adaptools can merge into."""
    torch.manual_seed(11)
    model = ConvNet()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    return out


def conv_model(base: Path) -> ConvNet:
    model = ConvNet()
    model.load_state_dict(load_file(str(base / "model.safetensors")))
    return model.eval()


def conv_adapter(base: Path, config, out: Path, seed: int = 5) -> Path:
    """A peft adapter on the ConvNet with seeded noise on every trainable tensor."""
    import peft

    model = peft.get_peft_model(conv_model(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return out


def compare_conv(base: Path, adapter: Path, out: Path) -> tuple[int, float]:
    """(merge ulps against merge_and_unload, max |output| difference of the unmerged application)."""
    import peft

    merge(base, [MergeInput(adaptools.load(adapter))], out)
    ours = merged_state(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(conv_model(base), adapter).eval()
    with torch.no_grad():
        expected = reference(CONV_INPUT)
    theirs = reference.merge_and_unload().state_dict()
    worst = max(ulps(v, theirs[k]) for k, v in ours.items())
    assert any(not torch.equal(v, load_file(str(base / "model.safetensors"))[k]) for k, v in ours.items())
    model = conv_model(base)
    loaded = adaptools.load(adapter)
    with adaptools.plugin.get_method(loaded.method).apply(loaded, model), torch.no_grad():
        got = model(CONV_INPUT)
    return worst, float((got - expected).abs().max())


def assert_conv_like_peft(base: Path, adapter: Path, out: Path) -> None:
    """``compare_conv``: the merge equals merge_and_unload bit for bit, the application PeftModel to 1e-6."""
    merge_ulps, apply_diff = compare_conv(base, adapter, out)
    assert merge_ulps == 0
    assert apply_diff < 1e-6


def saved_roles(adapter: Path) -> set[str]:
    """Every tensor role the adapter at ``adapter`` holds, over all its modules."""
    return {role for roles in adaptools.load(adapter).modules().values() for role in roles}


def retained_at_rank(cli_runner, name: str, out: Path, rank: int) -> dict[str, float]:
    """``convert --to lora --rank`` of fixture ``name`` (exit 0): the energy it reports kept, module by module."""
    result = cli_runner("convert", adapter_path(name), out, "--to", "lora", "--rank", str(rank), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["retained_energy"]


def edited(tmp: Path, name: str, config: dict | None = None, edit=None) -> Path:
    """A copy of fixture adapter ``name`` with config fields changed and/or its tensors edited in place."""
    import shutil

    out = tmp / "adapter"
    shutil.copytree(adapter_path(name), out)
    if config:
        data = json.loads((out / "adapter_config.json").read_text())
        data.update(config)
        (out / "adapter_config.json").write_text(json.dumps(data))
    if edit:
        tensors = {k: v.clone() for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
        (out / "adapter_model.safetensors").unlink()
        edit(tensors)
        adaptools.plugin.save_tensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    return out


def with_unknown_role(tmp: Path, name: str, module: str) -> Path:
    """Fixture ``name`` as a schema file with one extra tensor of a role no method knows."""
    adapter = adaptools.load(edited(tmp, name))
    tensors = {n: adapter.tensor(n) for n in adapter.tensor_names()}
    tensors[f"{module}.mystery"] = torch.ones(4)
    out = tmp / "odd.safetensors"
    adaptools.save(adaptools.Adapter(adapter.method, adapter.config, adaptools.plugin.MemoryStore(tensors)), out)
    return out


def assert_one_clear_line(cli_runner, tmp: Path, bad: Path, expected: str) -> None:
    """``info`` and ``convert`` of a bad adapter: exit 2, one line naming the problem, nothing written."""
    for command in ("info", "convert"):
        out = tmp / "out.safetensors"
        before = sorted(p.name for p in tmp.iterdir())
        result = cli_runner(command, bad, *([out] if command == "convert" else []))
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr
        assert "Traceback" not in result.output and result.stdout == ""
        assert sorted(p.name for p in tmp.iterdir()) == before


def edit_tensor(key: str, change):
    """An ``edit`` for ``edited``: tensor ``key`` replaced by ``change(tensor)``."""

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = change(tensors[key])

    return edit


def truncated(tmp: Path, name: str) -> Path:
    """A copy of fixture adapter ``name`` whose weights file is cut in half (a download that stopped)."""
    out = edited(tmp, name)
    f = out / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return out


def listed_operations(cli_runner, method: str) -> list[str]:
    """What ``adaptools plugins --json`` says ``method`` can do."""
    return json.loads(cli_runner("plugins", "--json").stdout)["operations"][method]


def assert_merge_refused(cli_runner, tmp: Path, base: Path, adapter: Path, expected: str, *options: str) -> None:
    """``merge`` (with ``options``) exits 2 with ``expected`` in its message, no traceback, and writes nothing."""
    result = cli_runner("merge", base, adapter, tmp / "out", *options)
    assert result.exit_code == 2 and expected in result.stderr, result.output
    assert "Traceback" not in result.output
    assert not (tmp / "out").exists()


def rule_corpus_test(corpus: dict):
    """test_each_defect_is_caught_by_exactly_its_rule over a method's defect corpus, ``rule -> (make, base)``:
    ``check`` of ``make(tmp)`` (against fixture base ``base`` when one is named) finds that rule and no other,
    each finding with a message, a path and a fix."""

    @pytest.mark.parametrize("rule", sorted(corpus))
    def test_each_defect_is_caught_by_exactly_its_rule(rule, tmp_path):
        make, base = corpus[rule]
        report = check(make(tmp_path), base=str(base_path(base)) if base else None)
        assert {f.rule for f in report.findings} == {rule}, [(f.rule, f.message) for f in report.findings]
        assert all(f.fix and f.message and f.path for f in report.findings)

    return test_each_defect_is_caught_by_exactly_its_rule


def one_clear_line_test(cases: dict):
    """test_bad_input_is_one_clear_line over ``case -> (make, expected)``: ``assert_one_clear_line`` of
    ``make(tmp)`` for ``info`` and ``convert``, the one line holding ``expected``."""

    @pytest.mark.parametrize(("case", "expected"), [(case, expected) for case, (_, expected) in cases.items()])
    def test_bad_input_is_one_clear_line(case, expected, tmp_path, cli_runner):
        assert_one_clear_line(cli_runner, tmp_path, cases[case][0](tmp_path), expected)

    return test_bad_input_is_one_clear_line
