"""FLUX.1 LoRAs against diffusers 0.42.1: reading every key style gives the factors and scales diffusers'
``FluxLoraLoaderMixin`` loads, the merge into a pipeline folder equals its ``fuse_lora`` bit for bit in fp32,
and converting between the styles keeps every tensor (docs/diffusion.md, "Flux")."""

from __future__ import annotations

import pytest
import torch
from flux_checks import build_all, deltas, diffusers_layers, fused
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptools

STYLES = ("diffusers", "kohya", "comfy")
#: the one module of the fixture whose scale (0.75) is no power of two: diffusers' kohya loader folds the scale
#: into the factors (docs/diffusion.md, "Flux"), so there its delta is equal only to rounding
ODD_SCALE = "transformer.transformer_blocks.0.norm1_context.linear"
#: the final layer's two modules, whose alphas diffusers' kohya loader drops (docs/diffusion.md, "Flux")
FINAL = {"transformer.norm_out.linear", "transformer.proj_out"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_all(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(built):
    """What diffusers loads from the diffusers-style file (with its LoraConfigs as metadata)."""
    return diffusers_layers(built["pipe"], built["diffusers"])


def ours(adapter):
    modules = adapter.config["modules"]
    return {m: (adapter.tensor(r["lora_A"]), adapter.tensor(r["lora_B"]), modules[m]["scaling"])
            for m, r in adapter.modules().items()}


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("style", STYLES)
def test_reading_equals_what_diffusers_loads(built, reference, style):
    """Every module, factor and scale, from each key style, as diffusers loads the diffusers-style file."""
    adapter = adaptools.load(built[style])
    assert adapter.config["model_family"] == "flux"
    assert adapter.config["components"] == ["transformer", "text_encoder"]
    got = ours(adapter)
    assert sorted(got) == sorted(reference)
    for module, (a, b, s) in reference.items():
        a2, b2, s2 = got[module]
        assert torch.equal(a, a2) and torch.equal(b, b2) and s == s2, module


@pytest.mark.parametrize("style", ["kohya", "comfy"])
def test_the_bfl_files_are_the_same_lora_to_diffusers(built, reference, style):
    """The fixture's BFL-named files hold the reference LoRA, as diffusers' own converter reads them. Its kohya
    loader cuts a single block's ``linear1`` at FLUX.1-dev's widths only, so that layer is left out here and
    checked at those widths below; the layers outside the blocks it converts to names without ``transformer.``,
    which its loader then drops, so those are compared as its converter returns them."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    state = {k: v for k, v in tensors(built[style]).items() if "single_blocks_0_linear1" not in k
             and "single_blocks.0.linear1" not in k}
    theirs = deltas(diffusers_layers(built["pipe"], state))
    expected = deltas(reference)
    linear1 = {m for m in expected if m.startswith("transformer.single_transformer_blocks.0.")
               and m.endswith(("to_q", "to_k", "to_v", "proj_mlp"))}
    converted = FluxLoraLoaderMixin.lora_state_dict(dict(state))
    dropped = {k[: -len(".lora_A.weight")] for k in converted
               if k.endswith(".lora_A.weight") and not k.startswith(("transformer.", "text_encoder."))}
    assert dropped and all(f"transformer.{m}" in expected for m in dropped)
    for module in dropped:
        theirs[f"transformer.{module}"] = converted[f"{module}.lora_B.weight"] @ converted[f"{module}.lora_A.weight"]
    assert sorted(theirs) == sorted(set(expected) - linear1)
    for module, delta in theirs.items():
        if module in FINAL:  # diffusers drops the final layer's alphas: scale 1 where kohya's rule gives 2
            assert reference[module][2] == 2 and torch.equal(2 * delta, expected[module]), module
        elif module == ODD_SCALE:
            torch.testing.assert_close(delta, expected[module], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(delta, expected[module]), module


@pytest.mark.parametrize("sparse", [False, True], ids=["shared-down", "block-diagonal"])
def test_linear1_splits_as_diffusers_splits_it(tmp_path, sparse):
    """A single block's fused linear1 at FLUX.1-dev's widths (3072 in, 3 x 3072 + 12288 out), rank 4, alpha 8."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    torch.manual_seed(3)
    name = "lora_unet_single_blocks_7_linear1"
    up = torch.randn(21504, 4)
    if sparse:
        mask = torch.zeros(21504, 4)
        for i, (r0, r1) in enumerate([(0, 3072), (3072, 6144), (6144, 9216), (9216, 21504)]):
            mask[r0:r1, i] = 1
        up = up * mask
    state = {f"{name}.lora_down.weight": torch.randn(4, 3072), f"{name}.lora_up.weight": up,
             f"{name}.alpha": torch.tensor(8.0)}
    path = tmp_path / "linear1.safetensors"
    save_file(state, str(path))
    theirs = FluxLoraLoaderMixin.lora_state_dict(dict(state))
    got = ours(adaptools.load(path))
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    assert sorted(got) == sorted(f"transformer.single_transformer_blocks.7.{p}" for p in parts)
    for module, (a, b, s) in got.items():
        a2, b2 = theirs[f"{module}.lora_A.weight"], theirs[f"{module}.lora_B.weight"]
        assert a.shape == a2.shape and b.shape == b2.shape, module
        assert a.shape[0] == (1 if sparse else 4)
        assert torch.equal(s * (b @ a), b2 @ a2), module  # diffusers folds the scale (2) into its factors


@pytest.mark.parametrize("style", STYLES)
def test_merge_equals_diffusers_fuse_lora(built, style, tmp_path, cli_runner):
    """Transformer and CLIP text encoder merged, every tensor bit for bit as diffusers fuses the reference."""
    out = tmp_path / "merged"
    result = cli_runner("merge", built["pipe"], built[style], out)
    assert result.exit_code == 0, result.output
    expected = fused(built["pipe"], built["diffusers"])
    for component, state in expected.items():
        merged = load_file(str(next((out / component).glob("*.safetensors"))))
        assert sorted(merged) == sorted(state), component
        different = [k for k in state if not torch.equal(merged[k], state[k])]
        assert not different, (component, different[:3])
    for component in ("transformer", "text_encoder"):  # the LoRA changed both
        base = load_file(str(next((built["pipe"] / component).glob("*.safetensors"))))
        assert any(not torch.equal(base[k], v) for k, v in expected[component].items()), component
    assert (out / "model_index.json").exists()


@pytest.mark.parametrize(("source", "target", "fmt"), [("kohya", "kohya", "kohya"), ("comfy", "bfl", "bfl"),
                                                       ("diffusers", "kohya", "kohya")])
def test_bfl_styles_round_trip(built, source, target, fmt, tmp_path, cli_runner):
    """kohya -> kohya and ComfyUI -> bfl give the same tensors back; diffusers -> kohya gives the fixture's kohya
    file (its inverse of diffusers' conversion); each via the schema and a diffusers file in between."""
    middle, out = tmp_path / "middle.safetensors", tmp_path / "out.safetensors"
    assert cli_runner("convert", built[source], middle, "--to", "diffusers").exit_code == 0
    result = cli_runner("convert", middle, out, "--to", target)
    assert result.exit_code == 0, result.output
    expected = tensors(built["kohya" if source == "diffusers" else source])
    got = tensors(out)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert adaptools.load(out).read_format == fmt


def test_onetrainer_keys_read_as_the_same_lora(built, reference, tmp_path):
    """OneTrainer's ``lora_transformer_<diffusers module, dots as _>`` with an alpha per module reads as the
    reference; diffusers' converter agrees on every layer it names right (attention projections, the layers
    outside the blocks) and names the other layers of a block as the block itself."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    adapter = adaptools.load(built["diffusers"])
    state = {}
    for module, (a, b, _) in ours(adapter).items():
        component, _, inner = module.partition(".")
        name = ("lora_transformer_" if component == "transformer" else "lora_te1_") + inner.replace(".", "_")
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = a, b
        state[f"{name}.alpha"] = torch.tensor(float(adapter.config["modules"][module]["alpha"]))
    path = tmp_path / "onetrainer.safetensors"
    save_file(state, str(path))
    got = ours(adaptools.load(path))
    assert sorted(got) == sorted(reference)
    for module, (a, b, s) in reference.items():
        assert torch.equal(got[module][0], a) and torch.equal(got[module][1], b) and got[module][2] == s, module
    transformer_only = {k: v for k, v in state.items() if k.startswith("lora_transformer_")}
    converted = FluxLoraLoaderMixin.lora_state_dict(transformer_only)
    modules = {k[: -len(".lora_A.weight")] for k in converted if k.endswith(".lora_A.weight")}
    right = modules & set(reference)
    assert {m for m in right if ".attn." in m} == {m for m in reference if ".attn." in m}
    assert modules - right == {"transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"}
    expected = deltas(reference)
    for module in right:
        delta = converted[f"{module}.lora_B.weight"] @ converted[f"{module}.lora_A.weight"]
        assert torch.equal(delta, expected[module]), module


def test_a_partly_adapted_fused_layer_is_not_written_as_kohya(built, tmp_path, cli_runner):
    """LoRAs on to_q and to_k but not to_v cannot be one LoRA on img_attn.qkv: refused, one line, exit 2."""
    state = {k: v for k, v in tensors(built["diffusers"]).items()
             if not k.startswith("transformer.transformer_blocks.0.attn.to_v.")}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    out = tmp_path / "out.safetensors"
    result = cli_runner("convert", path, out, "--to", "kohya")
    assert result.exit_code == 2 and "img_attn.qkv" in result.stderr and "to_v" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_info_names_the_family(built, cli_runner):
    result = cli_runner("info", built["kohya"])
    assert result.exit_code == 0 and "model_family: flux" in result.output, result.output


def test_what_convert_writes_diffusers_loads_as_the_reference(built, reference, tmp_path, cli_runner):
    """A kohya Flux file written in diffusers keys (with its LoraConfigs as metadata) loads into diffusers with
    every module, factor and scale of the reference."""
    out = tmp_path / "out.safetensors"
    assert cli_runner("convert", built["kohya"], out, "--to", "diffusers").exit_code == 0
    got = diffusers_layers(built["pipe"], out)
    assert sorted(got) == sorted(reference)
    for module, (a, b, s) in reference.items():
        assert torch.equal(got[module][0], a) and torch.equal(got[module][1], b) and got[module][2] == s, module


def test_bfl_keys_in_the_lora_a_spelling_read_as_the_same_lora(built, reference, tmp_path):
    """``diffusion_model.<layer>.lora_A.weight`` / ``.lora_B.weight`` (which diffusers does not convert for
    FLUX.1) read as the ``lora_down``/``lora_up`` spelling of the same file."""
    state = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
             for k, v in tensors(built["comfy"]).items()}
    path = tmp_path / "bfl.safetensors"
    save_file(state, str(path))
    adapter = adaptools.load(path)
    assert adapter.read_format == "bfl"
    got = ours(adapter)
    assert sorted(got) == sorted(reference)
    for module, (a, b, s) in reference.items():
        assert torch.equal(got[module][0], a) and torch.equal(got[module][1], b) and got[module][2] == s, module


def test_bf16_kohya_lora_merges_as_diffusers_fuses_it(built, tmp_path, cli_runner):
    """Published Flux LoRAs are mostly bf16: the fixture's kohya file in bf16 keeps its type through the split
    (converted to diffusers keys without a cast) and merges into the fp32 pipeline bit for bit as diffusers
    fuses that diffusers file."""
    lora = tmp_path / "bf16-kohya.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in tensors(built["kohya"]).items()}, str(lora))
    as_diffusers = tmp_path / "bf16.safetensors"
    assert cli_runner("convert", lora, as_diffusers, "--to", "diffusers").exit_code == 0
    assert {v.dtype for v in tensors(as_diffusers).values()} == {torch.bfloat16}
    result = cli_runner("merge", built["pipe"], lora, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    for component, state in fused(built["pipe"], as_diffusers).items():
        merged = load_file(str(next((tmp_path / "merged" / component).glob("*.safetensors"))))
        different = [k for k in state if not torch.equal(merged[k], state[k])]
        assert not different, (component, different[:3])


def test_resize_keeps_the_fused_layers_writable_as_kohya(built, tmp_path, cli_runner):
    """resize at the LoRA's own rank gives each diffusers module its own down factor, so the double block's q/k/v
    that shared one are fused back block-diagonally; every module's change survives (to rounding)."""
    out = tmp_path / "resized.safetensors"
    result = cli_runner("resize", built["kohya"], out, "--rank", "4", "--to", "kohya")
    assert result.exit_code == 0, result.output
    stored = tensors(out)
    assert stored["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12
    before, after = deltas(ours(adaptools.load(built["kohya"]))), deltas(ours(adaptools.load(out)))
    assert sorted(before) == sorted(after)
    for module, delta in before.items():
        torch.testing.assert_close(after[module], delta, rtol=1e-4, atol=1e-5)


def xlabs_state(prefix=""):
    """An XLabs attention LoRA for the fixture's transformer (random, rank 4, no alpha)."""
    torch.manual_seed(5)
    shapes = {"double_blocks.0.processor.qkv_lora1": (32, 96), "double_blocks.0.processor.proj_lora1": (32, 32),
              "double_blocks.0.processor.qkv_lora2": (32, 96), "double_blocks.0.processor.proj_lora2": (32, 32),
              "single_blocks.0.processor.qkv_lora": (32, 96), "single_blocks.0.processor.proj_lora": (160, 32)}
    state = {}
    for name, (width, height) in shapes.items():
        state[f"{prefix}{name}.down.weight"] = torch.randn(4, width) / 8
        state[f"{prefix}{name}.up.weight"] = torch.randn(height, 4) / 8
    return state


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_keys_read_and_merge_as_diffusers(built, tmp_path, cli_runner, prefix):
    """XLabs' ``double_blocks.N.processor.qkv_lora1.down.weight``...: every module and factor as diffusers'
    ``lora_state_dict`` converts them (scale 1), and the merge bit for bit as its fuse_lora."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    state = xlabs_state(prefix)
    path = tmp_path / "xlabs.safetensors"
    save_file(state, str(path))
    adapter = adaptools.load(path)
    assert adapter.read_format == "bfl" and adapter.config["model_family"] == "flux"
    theirs = FluxLoraLoaderMixin.lora_state_dict(dict(state))
    got = ours(adapter)
    assert sorted(f"{m}.lora_A.weight" for m in got) == sorted(k for k in theirs if k.endswith(".lora_A.weight"))
    for module, (a, b, s) in got.items():
        assert s == 1 and torch.equal(a, theirs[f"{module}.lora_A.weight"]), module
        assert torch.equal(b, theirs[f"{module}.lora_B.weight"]), module
    out = tmp_path / "merged"
    assert cli_runner("merge", built["pipe"], path, out).exit_code == 0
    expected = fused(built["pipe"], dict(state))["transformer"]
    merged = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    assert not [k for k in expected if not torch.equal(merged[k], expected[k])]
    base = load_file(str(next((built["pipe"] / "transformer").glob("*.safetensors"))))
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(base[key], merged[key])
