"""`adaptools unmerge` and `swap`: taking merged adapters back out, through the engine.

What can be promised is measured here: re-merging the unmerged model gives the merged one back bit for bit,
so the original base comes back wherever the merge's rounding kept it (where one base value is the only one
that merges to the stored value), and elsewhere it is at most one rounding of the merged value away.
docs/unmerge.md explains the arithmetic and quotes how often each case happens.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, adapter_path, base_path
from safetensors import safe_open
from safetensors.torch import load_file

import adaptools
from adaptools import MergeInput, UnsupportedOperationError, plugin
from adaptools.engine import merge

HUB = FIXTURES / "adapterhub"


def state(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def spacing(t: torch.Tensor) -> torch.Tensor:
    """The distance from each value to the next one of its own dtype, away from zero (one rounding)."""
    up = torch.nextafter(t.abs(), torch.tensor(float("inf"), dtype=t.dtype))
    return (up.float() - t.abs().float())


def unmerged_pair(tmp_path, base, name, weight=1.0):
    adapter = adaptools.load(name)
    merge(base, [MergeInput(adapter, weight)], tmp_path / "merged")
    adaptools.unmerge(tmp_path / "merged", [MergeInput(adapter, weight)], tmp_path / "unmerged")
    merge(tmp_path / "unmerged", [MergeInput(adapter, weight)], tmp_path / "remerged")
    return state(tmp_path / "merged"), state(tmp_path / "unmerged"), state(tmp_path / "remerged")


CASES = {  # name: (base, adapter, weight, least share of elements recovered exactly)
    "fp32, deltas twice the weights": ("llama", "llama-lora", 1.0, 0.4),
    "fp32, deltas a fiftieth of the weights": ("llama", "llama-lora", 0.01, 0.9),
    "bf16, deltas twice the weights": ("qwen2", "qwen2-lora-bias", 1.0, 0.4),
    "bf16, deltas a fiftieth of the weights": ("qwen2", "qwen2-lora-bias", 0.01, 0.9),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unmerge_gives_back_the_base_wherever_the_merge_kept_it(case, tmp_path):
    arch, name, weight, least = CASES[case]
    base = state(base_path(arch))
    merged, unmerged, remerged = unmerged_pair(tmp_path, base_path(arch), adapter_path(name), weight)
    equal = total = 0
    for key, original in base.items():
        assert unmerged[key].dtype == original.dtype, key
        # merge(unmerge(M)) == M everywhere: OUT is a base that merges to MERGED, so wherever only one base
        # value does (the merge kept the information), OUT holds the original, bit for bit.
        assert torch.equal(remerged[key], merged[key]), key
        # elsewhere it is within one rounding of the merged value
        gap = (unmerged[key].float() - original.float()).abs()
        assert bool((gap <= spacing(merged[key])).all()), key
        if torch.equal(merged[key], original):  # untouched by the adapter: copied byte for byte
            assert torch.equal(unmerged[key], original), key
        equal += int((unmerged[key] == original).sum())
        total += original.numel()
    assert equal / total >= least, f"{equal / total:.4f}"


@pytest.fixture
def grid(tmp_path):
    """A base on a 2⁻¹⁰ grid and a LoRA whose factors are multiples of 2⁻⁶: every product and sum of the
    merge is exact in fp32, so nothing rounds anywhere."""
    from safetensors.torch import save_file

    lora = adaptools.load(adapter_path("llama-lora"))
    tensors = {n: (lora.tensor(n) * 64).round() / 64 for n in lora.tensor_names()}
    adapter = adaptools.Adapter("lora", lora.config, adaptools.plugin.MemoryStore(tensors), lora.base)
    adaptools.save(adapter, tmp_path / "grid-lora.safetensors")
    base = {k: (v * 2**10).round() / 2**10 for k, v in state(base_path("llama")).items()}
    (tmp_path / "grid-base").mkdir()
    save_file(base, str(tmp_path / "grid-base" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "grid-base" / "config.json").write_text((base_path("llama") / "config.json").read_text())
    return tmp_path / "grid-base", tmp_path / "grid-lora.safetensors", base


def test_unmerge_is_bit_exact_where_the_merge_rounds_nowhere(grid, tmp_path):
    """The inexact elements above are all the merge's own rounding: without it, the round trip is exact."""
    base_dir, lora, base = grid
    adapter = adaptools.load(lora)
    merge(base_dir, [MergeInput(adapter)], tmp_path / "merged")
    adaptools.unmerge(tmp_path / "merged", [MergeInput(adapter)], tmp_path / "unmerged")
    merged, unmerged = state(tmp_path / "merged"), state(tmp_path / "unmerged")
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the adapter did change the model
    assert all(torch.equal(unmerged[k], base[k]) for k in base)


def test_unmerge_cli_reports_the_distance_and_records_what_it_did(tmp_path, cli_runner):
    lora = adapter_path("llama-lora")
    assert cli_runner("merge", base_path("llama"), lora, tmp_path / "m").exit_code == 0
    result = cli_runner("unmerge", tmp_path / "m", lora, tmp_path / "u", "--base", base_path("llama"), "--check",
                        "logits", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    distance = data["distance"]
    assert distance["elements"] == sum(v.numel() for v in state(base_path("llama")).values())
    assert 0 < distance["elements_differing"] < distance["elements"]
    assert 0 < distance["max_abs"] < 1e-6 and distance["max_relative"] < 1e-6
    assert data["checks"][0]["passed"] and data["checks"][0]["name"] == "logits"
    with safe_open(str(next((tmp_path / "u").glob("*.safetensors"))), "pt") as f:
        record = json.loads(f.metadata()["adaptools.provenance"])
    assert record["operation"] == "unmerge" and record["adapters"][0]["removed"] is True
    assert json.loads((tmp_path / "u" / "adaptools_checks.json").read_text())[0]["passed"]
    assert "# Unmerged model" in (tmp_path / "u" / "README.md").read_text()
    text = cli_runner("unmerge", tmp_path / "m", lora, tmp_path / "u2", "--base", base_path("llama"))
    assert "distance from" in text.stdout and "elements equal" in text.stdout


def test_swap_is_unmerge_then_merge_in_one_pass(tmp_path):
    base, a, b = base_path("llama"), adaptools.load(adapter_path("llama-lora")), adaptools.load(
        adapter_path("llama-regex"))
    merge(base, [MergeInput(a)], tmp_path / "merged")
    adaptools.unmerge(tmp_path / "merged", [MergeInput(a)], tmp_path / "swapped", added=[MergeInput(b)])
    adaptools.unmerge(tmp_path / "merged", [MergeInput(a)], tmp_path / "unmerged")
    merge(tmp_path / "unmerged", [MergeInput(b)], tmp_path / "two-passes")
    merge(base, [MergeInput(b)], tmp_path / "fresh")
    swapped, two, fresh = state(tmp_path / "swapped"), state(tmp_path / "two-passes"), state(tmp_path / "fresh")
    recovered, original = state(tmp_path / "unmerged"), state(base)
    for key in original:
        assert torch.equal(swapped[key], two[key]), key  # fp32: one pass rounds exactly as two do
        kept = recovered[key] == original[key]
        # a fresh merge of B, bit for bit, wherever unmerging recovered the base
        assert torch.equal(swapped[key][kept], fresh[key][kept]), key
    with safe_open(str(next((tmp_path / "swapped").glob("*.safetensors"))), "pt") as f:
        record = json.loads(f.metadata()["adaptools.provenance"])
    assert record["operation"] == "swap"
    assert [x.get("removed", False) for x in record["adapters"]] == [True, False]


def test_swap_equals_a_fresh_merge_bit_for_bit_when_the_base_comes_back(grid, tmp_path, cli_runner):
    base_dir, a, _ = grid
    b = adapter_path("llama-regex")
    assert cli_runner("merge", base_dir, a, tmp_path / "m").exit_code == 0
    result = cli_runner("swap", tmp_path / "m", "--remove", a, "--add", b, tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert cli_runner("merge", base_dir, b, tmp_path / "fresh").exit_code == 0
    swapped, fresh = state(tmp_path / "s"), state(tmp_path / "fresh")
    assert swapped.keys() == fresh.keys() and all(torch.equal(swapped[k], fresh[k]) for k in fresh)


@pytest.mark.parametrize("order", ["lora-first", "bottleneck-first"])
def test_unmerge_undoes_the_merge_chain_in_reverse_whatever_the_order(order, tmp_path, cli_runner):
    """The bottleneck fold acts after LoRA's delta in either merge order, so it must be undone first."""
    pair = [adapter_path("llama-lora"), HUB / "llama-houlsby-linear"]
    pair = pair if order == "lora-first" else pair[::-1]
    assert cli_runner("merge", base_path("llama"), *pair, tmp_path / "m").exit_code == 0
    result = cli_runner("unmerge", tmp_path / "m", *pair, tmp_path / "u", "--base", base_path("llama"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["distance"]["max_relative"] < 1e-6


@pytest.mark.parametrize("name", ["gpt2-houlsby-linear", "llama-houlsby-linear"])
def test_bottleneck_fold_is_inverted_to_fp32_precision(name, tmp_path, cli_runner):
    arch = name.split("-")[0]
    assert cli_runner("merge", base_path(arch), HUB / name, tmp_path / "m").exit_code == 0
    result = cli_runner("unmerge", tmp_path / "m", HUB / name, tmp_path / "u", "--base", base_path(arch), "--json",
                        "--check", "logits")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["distance"]["max_relative"] < 1e-5 and data["distance"]["tensors_equal"] > 0
    assert data["checks"][0]["passed"]


def singular_bottleneck(tmp_path):
    """A linear bottleneck whose fold is I − v·vᵀ: it erases the direction v of the projection's output."""
    adapter = adaptools.load(HUB / "llama-houlsby-linear")
    tensors = {n: adapter.tensor(n).clone() for n in adapter.tensor_names()}
    v = torch.zeros(64)
    v[3] = 1.0
    where = "model.layers.1.output_adapter"
    tensors[f"{where}.up"] = torch.zeros(64, 4)
    tensors[f"{where}.up"][:, 0] = v
    tensors[f"{where}.down"] = torch.zeros(4, 64)
    tensors[f"{where}.down"][0] = v
    tensors[f"{where}.scaling"] = torch.tensor([-1.0])
    path = tmp_path / "singular.safetensors"
    adaptools.save(adaptools.Adapter("bottleneck", adapter.config, plugin.MemoryStore(tensors), adapter.base), path)
    return path


REFUSED = {
    "llama-dora": "DoRA rescales each row",
    "llama-modules-to-save": "modules_to_save",
    "llama-trainable-tokens": "trainable token rows",
}


@pytest.mark.parametrize("command", ["unmerge", "swap"])
@pytest.mark.parametrize("what", [*sorted(REFUSED), "relu bottleneck", "singular bottleneck", "olora init"])
def test_adapters_whose_merge_cannot_be_undone_are_refused(what, command, tmp_path, cli_runner):
    if what in REFUSED:
        path, reason = adapter_path(what), REFUSED[what]
    elif what == "relu bottleneck":
        path, reason = HUB / "llama-seq-bn", "non-linearity 'relu'"
    elif what == "singular bottleneck":
        path, reason = singular_bottleneck(tmp_path), "singular"
    else:
        lora = adaptools.load(adapter_path("llama-lora"))
        olora = adaptools.Adapter("lora", {**lora.config, "init_lora_weights": "olora"},
                                  plugin.MemoryStore({n: lora.tensor(n) for n in lora.tensor_names()}), lora.base)
        path, reason = tmp_path / "olora.safetensors", "recomputes the initial factors"
        adaptools.save(olora, path)
    out = tmp_path / "out"
    args = [base_path("llama"), path, out] if command == "unmerge" else [
        base_path("llama"), "--remove", path, "--add", adapter_path("llama-regex"), out]
    result = cli_runner(command, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and reason in result.stderr and "cannot unmerge" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_method_that_does_not_say_how_to_undo_its_merge_cannot_unmerge():
    class Scale(adaptools.plugin.AdapterMethod, adaptools.plugin.Mergeable):
        name = "scale-test"

        def merge_updates(self, adapter, base, weight=1.0):
            return []

    assert "unmerge" not in Scale().operations and "merge" in Scale().operations
    adapter = adaptools.Adapter("scale-test", {}, adaptools.plugin.MemoryStore({}))
    with pytest.raises(UnsupportedOperationError, match="does not say how to undo its merge"):
        Scale().unmerge_updates(adapter, None)
    with pytest.raises(UnsupportedOperationError, match="cannot unmerge"):
        Scale().require("unmerge", adapter)


@pytest.mark.parametrize("args, message", [
    (["M", "llama-lora", "OUT", "--weight", "1", "--weight", "2"], "2 --weight values for 1 adapters"),
    (["M", "llama-lora", "OUT", "--weight", "nan"], "not a finite number"),
    (["M", "OUT"], "give MERGED, at least one ADAPTER, and OUT"),
    (["M", "llama-lora", "OUT", "--base", "NOWHERE"], "NOWHERE"),
    (["M", "llama-lora", "OUT", "--check", "logits", "--check-option", "tokens=1"], "at least 2"),
    (["M", "llama-lora", "OUT", "--check", "nosuch"], "nosuch"),
    (["M", "llama-lora", "OUT", "--eval-text", "x.txt"], "--eval-text"),
])
def test_bad_unmerge_options_end_in_one_line_and_write_nothing(args, message, tmp_path, cli_runner):
    assert cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), tmp_path / "M").exit_code == 0
    where = {"M": tmp_path / "M", "OUT": tmp_path / "OUT", "llama-lora": adapter_path("llama-lora"),
             "NOWHERE": tmp_path / "NOWHERE"}
    result = cli_runner("unmerge", *[where.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and not (tmp_path / "OUT").exists()


@pytest.mark.parametrize("args, message", [
    (["M", "OUT", "--add", "llama-regex"], "--remove"),
    (["M", "OUT", "--remove", "llama-lora"], "--add"),
    (["M", "OUT", "--remove", "llama-lora", "--add", "llama-regex", "--add-weight", "inf"], "not a finite number"),
    (["M", "OUT", "--remove", "llama-lora", "--add", "llama-regex", "--remove-weight", "1", "--remove-weight", "1"],
     "2 --remove-weight values for 1 adapters"),
    (["M", "M", "--remove", "llama-lora", "--add", "llama-regex", "--force"], "input"),
])
def test_bad_swap_options_end_in_one_line_and_write_nothing(args, message, tmp_path, cli_runner):
    assert cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), tmp_path / "M").exit_code == 0
    before = state(tmp_path / "M")
    where = {"M": tmp_path / "M", "OUT": tmp_path / "OUT", "llama-lora": adapter_path("llama-lora"),
             "llama-regex": adapter_path("llama-regex")}
    result = cli_runner("swap", *[where.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and not (tmp_path / "OUT").exists()
    after = state(tmp_path / "M")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_removing_an_adapter_that_was_not_merged_or_another_weight_warns(tmp_path, cli_runner):
    assert cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), tmp_path / "m").exit_code == 0
    other = cli_runner("unmerge", tmp_path / "m", adapter_path("llama-regex"), tmp_path / "u1")
    assert other.exit_code == 0 and "does not list this adapter" in other.stderr
    weight = cli_runner("unmerge", tmp_path / "m", adapter_path("llama-lora"), tmp_path / "u2", "--weight", "0.5")
    assert weight.exit_code == 0 and "merged with weight 1.0, removed with weight 0.5" in weight.stderr
    right = cli_runner("unmerge", tmp_path / "m", adapter_path("llama-lora"), tmp_path / "u3")
    assert right.exit_code == 0 and "warning" not in right.stderr


def test_dry_run_shows_what_is_removed(tmp_path, cli_runner):
    assert cli_runner("merge", base_path("llama"), adapter_path("llama-lora"), tmp_path / "m").exit_code == 0
    result = cli_runner("unmerge", tmp_path / "m", adapter_path("llama-lora"), tmp_path / "u", "--dry-run", "--json")
    assert result.exit_code == 0 and not (tmp_path / "u").exists()
    data = json.loads(result.stdout)
    assert data["operation"] == "unmerge" and data["adapters"][0]["removed"] is True and len(data["merged"]) == 14


def test_where_double_rounding_meets_a_power_of_two_the_neighbour_is_taken():
    """The merge adds in fp32 and rounds to bf16 after: a sum landing exactly on a bf16 tie next to 2⁻⁸
    rounds down to 2⁻⁸, and plain subtraction then gives a value that merges elsewhere (6 elements of a
    bf16 SmolLM2 merge do this). The neighbour above is the base that merges to M."""
    from adaptools_plugins.lora.unmerge import _undo

    bf16 = torch.bfloat16
    base = torch.tensor([0.003936767578125])
    delta = torch.tensor([-1.5258689927577507e-05])
    merged = (base + delta).to(bf16).float()
    assert merged.item() == 2.0**-8
    plain = (merged - delta).to(bf16).float()
    assert (plain + delta).to(bf16).float().item() != merged.item()  # what a plain subtraction gives is wrong
    undone = _undo(merged, lambda x: x + delta, bf16)
    assert (undone + delta).to(bf16).float().item() == merged.item() and undone.item() == base.item()
    # and in general: a million random bf16 pairs near powers of two all merge back
    gen = torch.Generator().manual_seed(0)
    exponent = torch.randint(-12, 2, (1_000_000,), generator=gen).float()
    base = (2.0**exponent * (1 + 0.01 * torch.randn(1_000_000, generator=gen))).to(bf16).float()
    delta = torch.randn(1_000_000, generator=gen) * 2.0 ** (exponent - 9)
    merged = (base + delta).to(bf16).float()
    undone = _undo(merged, lambda x: x + delta, bf16)
    assert torch.equal((undone + delta).to(bf16).float(), merged)


def test_a_merge_update_may_not_claim_the_undo_kind(tmp_path):
    """`undo` is the engine's label for inverses; a method's merge returning it is a contract error."""
    import adaptools.plugins as plugins

    class Sneaky(adaptools.plugin.AdapterMethod, adaptools.plugin.Mergeable):
        name = "sneaky-test"

        def merge_updates(self, adapter, base, weight=1.0):
            return [adaptools.plugin.TensorUpdate("model.norm.weight", "undo", lambda current, original: current)]

    class Plugin:
        @adaptools.plugin.hookimpl
        def register_methods(self, register):
            register(Sneaky())

    plugin = Plugin()
    plugins.pm.register(plugin, name="sneaky-test")
    try:
        adapter = adaptools.Adapter("sneaky-test", {}, adaptools.plugin.MemoryStore({}))
        with pytest.raises(adaptools.InputError, match="unknown kind"):
            merge(base_path("llama"), [MergeInput(adapter)], tmp_path / "out")
        assert not (tmp_path / "out").exists()
    finally:
        plugins.pm.unregister(plugin)
