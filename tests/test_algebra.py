"""diff, combine and resize against dense float64 references computed from the fixtures."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import adapter_path, base_path

import adaptools
from adaptools.operations.algebra import combine, diff, resize
from adaptools_plugins.lora.config import lora_rank_alpha, scaling_for


def dense(adapter):
    """module -> ΔW in float64, straight from the definition (s · B @ A)."""
    out = {}
    for module, roles in adapter.modules().items():
        a_role, b_role = ("lora_embedding_A", "lora_embedding_B") if "lora_embedding_A" in roles else ("lora_A",
                                                                                                      "lora_B")
        if a_role not in roles:
            continue
        rank, alpha = lora_rank_alpha(adapter.config, module)
        s = scaling_for(adapter.config, rank, alpha)
        out[module] = s * adapter.tensor(roles[b_role]).double() @ adapter.tensor(roles[a_role]).double()
    return out


def load(name):
    return adaptools.load(adapter_path(name))


def test_diff_matches_dense_reference():
    a, b = load("llama-lora"), load("llama-rslora-patterns")
    da, db = dense(a), dense(b)
    result = {m.module: m for m in diff(a, b).modules}
    assert set(result) == set(da) | set(db)
    for module, m in result.items():
        x = da.get(module, torch.zeros(1))
        y = db.get(module, torch.zeros(1))
        expected = (x - y).norm().item() if module in da and module in db else max(x.norm(), y.norm()).item()
        assert m.difference == pytest.approx(expected, rel=1e-9, abs=1e-12)
        if module in da and module in db:
            cos = (x * y).sum() / (x.norm() * y.norm())
            assert m.cosine == pytest.approx(cos.item(), rel=1e-9)
    assert "use_rslora" in diff(a, b).config


def test_diff_with_itself_is_exactly_zero(cli_runner):
    data = json.loads(cli_runner("diff", adapter_path("llama-dora").parent / "llama-lora",
                                 adapter_path("llama-lora"), "--json").stdout)
    assert all(m["difference"] == 0.0 and m["relative"] == 0.0 for m in data["modules"])
    assert data["config"] == {}


def test_cat_with_weights_1_0_is_the_first_adapter_exactly(tmp_path):
    a, b = load("llama-rslora-patterns"), load("llama-lora")
    combined = combine([a, b], [1.0, 0.0], "cat")
    adaptools.save(combined, tmp_path / "c", format="peft")
    adaptools.save(a, tmp_path / "a", format="peft")
    from safetensors.torch import load_file

    x, y = load_file(str(tmp_path / "c" / "adapter_model.safetensors")), load_file(str(tmp_path / "a" /
                                                                                       "adapter_model.safetensors"))
    assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize(("names", "weights"), [
    (("llama-lora", "llama-rslora-patterns"), (0.7, -0.4)),
    (("llama-rslora-patterns", "llama-regex", "llama-layers"), (1.0, 2.0, 0.5)),
])
def test_cat_is_the_exact_weighted_sum(names, weights):
    adapters = [load(n) for n in names]
    combined = combine(adapters, weights, "cat")
    expected: dict = {}
    for adapter, w in zip(adapters, weights):
        for module, delta in dense(adapter).items():
            expected[module] = expected.get(module, 0) + w * delta
    got = dense(combined)
    assert set(got) == set(expected)
    for module in got:
        torch.testing.assert_close(got[module], expected[module], rtol=1e-6, atol=1e-7)
    assert combined.config["use_rslora"] is False


def test_svd_combination_is_exact_at_full_rank_and_optimal_when_truncated():
    a, b = load("llama-lora"), load("llama-rslora-patterns")
    exact = combine([a, b], [1.0, 1.0], "svd", rank=16)
    reference = {m: dense(a).get(m, 0) + dense(b).get(m, 0) for m in set(dense(a)) | set(dense(b))}
    for module, delta in dense(exact).items():
        torch.testing.assert_close(delta, reference[module], rtol=1e-5, atol=1e-6)
    truncated = dense(combine([a, b], [1.0, 1.0], "svd", rank=2))
    for module, delta in truncated.items():
        s = torch.linalg.svdvals(reference[module])
        best = s[2:].pow(2).sum().sqrt()  # Eckart-Young: the best rank-2 error
        assert (delta - reference[module]).norm().item() == pytest.approx(best.item(), rel=1e-4)


def test_linear_folds_each_modules_scaling():
    a = load("llama-rslora-patterns")
    doubled = dense(combine([a], [2.0], "linear"))
    for module, delta in dense(a).items():
        torch.testing.assert_close(doubled[module], 2 * delta, rtol=1e-6, atol=1e-7)


def test_resize_matches_truncated_svd_and_reports_energy():
    a = load("llama-rslora-patterns")
    resized, retained = resize(a, rank=2)
    for module, delta in dense(a).items():
        s = torch.linalg.svdvals(delta)
        assert retained[module] == pytest.approx((s[:2].pow(2).sum() / s.pow(2).sum()).item(), rel=1e-9)
        got = dense(resized)[module]
        assert (got - delta).norm().item() == pytest.approx(s[2:].pow(2).sum().sqrt().item(), rel=1e-4, abs=1e-6)
    full, _ = resize(a, energy=1.0)
    for module, delta in dense(a).items():
        torch.testing.assert_close(dense(full)[module], delta, rtol=1e-5, atol=1e-6)


def test_combined_adapter_merges_and_loads_in_peft(tmp_path):
    from peft_oracle import logits, peft_model

    from adaptools import MergeInput, merge

    a, b = load("llama-lora"), load("llama-layers")
    adaptools.save(combine([a, b], [1.0, 1.0], "cat"), tmp_path / "c", format="peft")
    merge(base_path("llama"), [MergeInput(a), MergeInput(b)], tmp_path / "both")
    merge(base_path("llama"), [MergeInput(adaptools.load(tmp_path / "c"))], tmp_path / "combined")
    from peft_oracle import load_base

    torch.testing.assert_close(logits(load_base(tmp_path / "combined")), logits(load_base(tmp_path / "both")),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(peft_model(base_path("llama"), tmp_path / "c")),
                               logits(load_base(tmp_path / "both")), rtol=1e-4, atol=1e-4)


def test_refusals(tmp_path, cli_runner):
    result = cli_runner("combine", adapter_path("llama-dora"), adapter_path("llama-lora"), tmp_path / "x")
    assert result.exit_code == 2 and "DoRA" in result.stderr
    result = cli_runner("resize", adapter_path("qwen2-lora-bias"), tmp_path / "y", "--rank", "2")
    assert result.exit_code == 2 and "lora_bias" in result.stderr
    result = cli_runner("combine", adapter_path("llama-lora"), adapter_path("llama-rslora-patterns"), tmp_path / "z",
                        "--how", "linear")
    assert result.exit_code == 2 and "equal ranks" in result.stderr
    result = cli_runner("resize", adapter_path("llama-lora"), tmp_path / "w", "--rank", "2", "--energy", "0.5")
    assert result.exit_code == 2
    assert not any((tmp_path / n).exists() for n in "xyzw")


# --- checkpoint-level: diff, explain, extract ---------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from adaptools import MergeInput, merge

    out = tmp_path_factory.mktemp("tuned") / "llama-tuned"
    merge(base_path("llama"), [MergeInput(load("llama-modules-to-save"))], out)
    return out


def test_checkpoint_diff_streams_per_tensor(tuned, cli_runner):
    data = json.loads(cli_runner("diff", base_path("llama"), tuned, "--json").stdout)
    changed = {t["tensor"] for t in data["tensors"] if t["relative"] > 0}
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.norm.weight" in changed
    assert "model.layers.0.mlp.up_proj.weight" not in changed
    same = json.loads(cli_runner("diff", base_path("llama"), base_path("llama"), "--json").stdout)
    assert all(t["max_abs"] == 0 and t["relative"] == 0 for t in same["tensors"])


def test_adapter_explains_its_own_fine_tune(tuned, cli_runner):
    data = json.loads(cli_runner("diff", adapter_path("llama-modules-to-save"), base_path("llama"), tuned,
                                 "--json").stdout)
    assert data["explained"] > 0.999999
    partial = json.loads(cli_runner("diff", adapter_path("llama-lora"), base_path("llama"), tuned, "--json").stdout)
    assert partial["explained"] < 0.5


def test_extract_recovers_the_adapter(tuned, tmp_path, cli_runner):
    result = cli_runner("extract", base_path("llama"), tuned, tmp_path / "ex", "--rank", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert min(data["retained_energy"].values()) > 0.999999
    assert sorted(data["modules_to_save"]) == sorted([
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight"])
    extracted = adaptools.load(tmp_path / "ex")
    original = load("llama-modules-to-save")
    for m in diff(original, extracted).modules:
        assert m.relative < 1e-5, m
    # the extracted adapter, merged, gives the tuned model back (to fp32 rounding)
    from peft_oracle import load_base, logits, peft_model

    torch.testing.assert_close(logits(peft_model(base_path("llama"), tmp_path / "ex")), logits(load_base(tuned)),
                               rtol=1e-4, atol=1e-4)


def test_extract_by_energy_reports_retained_share(tuned, tmp_path):
    from adaptools.operations.extract import extract

    result = extract(base_path("llama"), tuned, method="lora", energy=0.5)
    for module, kept in result.retained.items():
        assert 0.5 <= kept <= 1.0
    assert {m["rank"] for m in result.adapter.config["modules"].values()} <= {1, 2, 3, 4}


def reference_ties(deltas, weights, density):
    """TIES spelled out element by element (float64), for a small module."""
    trimmed = []
    for d in deltas:
        flat = d.flatten()
        k = max(1, round(density * flat.numel()))
        keep = set(flat.abs().argsort(descending=True)[:k].tolist())
        trimmed.append(torch.tensor([v if i in keep else 0.0 for i, v in enumerate(flat.tolist())],
                                    dtype=torch.float64).reshape(d.shape))
    out = torch.zeros_like(deltas[0]).flatten()
    for i in range(out.numel()):
        values = [t.flatten()[i].item() for t in trimmed]
        total = sum(values)
        sign = (total > 0) - (total < 0)
        agreeing = [(w * v) for w, v in zip(weights, values) if v != 0 and ((v > 0) - (v < 0)) == sign]
        out[i] = sum(agreeing) / max(1, len(agreeing))
    return out.reshape(deltas[0].shape)


def test_ties_matches_an_elementwise_reference_before_truncation():
    from adaptools.operations.algebra import ties_merge

    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    torch.testing.assert_close(ties_merge(deltas, weights, 0.4), reference_ties(deltas, weights, 0.4))


def test_ties_and_dare_at_full_density_and_rank_are_the_weighted_sum():
    a, b = load("llama-lora"), load("llama-rslora-patterns")
    reference = {m: 0.5 * dense(a).get(m, 0) + 0.5 * dense(b).get(m, 0) for m in set(dense(a)) | set(dense(b))}
    dare = dense(combine([a, b], [0.5, 0.5], "dare", rank=64, density=1.0))
    for module, delta in dare.items():
        torch.testing.assert_close(delta, reference[module], rtol=1e-5, atol=1e-6)
    single = dense(combine([a], [1.0], "ties", rank=64, density=1.0))
    for module, delta in single.items():
        torch.testing.assert_close(delta, dense(a)[module], rtol=1e-5, atol=1e-6)


def test_dare_is_seeded():
    a, b = load("llama-lora"), load("llama-layers")
    x = dense(combine([a, b], None, "dare", density=0.3, seed=7))
    y = dense(combine([a, b], None, "dare", density=0.3, seed=7))
    z = dense(combine([a, b], None, "dare", density=0.3, seed=8))
    assert all(torch.equal(x[m], y[m]) for m in x)
    assert any(not torch.equal(x[m], z[m]) for m in x)
