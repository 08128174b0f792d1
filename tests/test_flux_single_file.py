"""Merging FLUX.1 LoRAs into single-file Flux checkpoints in Black Forest Labs' naming (as BFL publishes
``flux1-dev.safetensors``, or under ComfyUI's ``model.diffusion_model.``), against diffusers 0.42.1.

The test file is the tiny transformer of fixtures/flux.py written with the fixture's own inverse mapping and
proved right by diffusers' own converter, ``convert_flux_transformer_checkpoint_to_diffusers``: converted back
it is the transformer's state dict, key for key and byte for byte. That converter hard-codes FLUX.1's width
(``inner_dim = 3072``, the split of a single block's ``linear1``), so on the tiny model it runs with that one
constant set to the tiny width (nothing else changed); at FLUX.1's real width it runs unchanged, on meta
tensors (names and shapes). A merged file converted back equals diffusers' ``load_lora_weights`` +
``fuse_lora``, bit for bit in fp32, the final layer's modulation included (stored with its two row halves in
the other order from diffusers'; docs/diffusion.md, "Flux single files")."""

from __future__ import annotations

import inspect
import json
import struct

import pytest
import torch
from flux_checks import build_all, flux_fixtures, loaded
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PREFIXES = ("", "model.diffusion_model.")
#: the transformer's keys in each style (the text encoder's are left out)
TRANSFORMER_KEYS = ("lora_unet_", "diffusion_model.", "transformer.")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_all(tmp_path_factory)


@pytest.fixture(scope="module")
def singles(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-single")
    return {p: flux_fixtures.single_file(built["pipe"], root / f"flux{len(p)}.safetensors", p) for p in PREFIXES}


def transformer_state(pipe):
    return {k: v for f in sorted((pipe / "transformer").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def convert(checkpoint, inner_dim=None):
    """diffusers' converter on a copy of ``checkpoint``; with ``inner_dim``, its hard-coded width replaced."""
    from diffusers.loaders import single_file_utils as sfu

    function = sfu.convert_flux_transformer_checkpoint_to_diffusers
    if inner_dim is None:
        return function(dict(checkpoint))
    source = inspect.getsource(function)
    assert source.count("inner_dim = 3072") == 1
    namespace = dict(vars(sfu))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)  # noqa: S102
    return namespace[function.__name__](dict(checkpoint))


def tiny_width():
    config = flux_fixtures.TRANSFORMER
    return config["attention_head_dim"] * config["num_attention_heads"]


def assert_same(ours, theirs):
    assert sorted(ours) == sorted(theirs)
    different = [k for k in theirs if not (ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]))]
    assert not different, f"{len(different)} tensors differ, first {different[:3]}"


def raw_tensors(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[8 + length + v["data_offsets"][0]:8 + length + v["data_offsets"][1]])
            for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_fixture_single_file_converts_back_to_the_transformer(built, singles, prefix):
    """The inverse mapping is right: diffusers' converter gives the transformer's state dict back exactly."""
    assert_same(convert(load_file(str(singles[prefix])), tiny_width()), transformer_state(built["pipe"]))


def test_full_width_names_match_diffusers_conversion():
    """At FLUX.1's real width (3072, the converter unchanged), on meta tensors: the fixture's inverse converts
    back to every name and shape of the model, and the single-file backend presents every linear layer's
    weight and bias under its diffusers name, in its diffusers shape."""
    from diffusers import FluxTransformer2DModel

    from adaptools.plugin import TensorInfo
    from adaptools_plugins.diffusion.flux_single_file import present_flux

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    state = model.state_dict()
    checkpoint = flux_fixtures.to_bfl_checkpoint(state)
    got = convert(checkpoint)
    assert sorted(got) == sorted(state) and all(got[k].shape == state[k].shape for k in state)
    stored, offset = {}, 0
    for key, value in checkpoint.items():
        stored[key] = TensorInfo("F32", tuple(value.shape), offset, offset + 4 * value.numel())
        offset += 4 * value.numel()
    opened = present_flux(__import__("pathlib").Path("flux1-dev.safetensors"), stored, {})
    linear = {k for k, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for module in linear:
        for param in ("weight", "bias"):
            info = opened.tensors[f"transformer.{module}.{param}"]
            assert info.shape == tuple(state[f"{module}.{param}"].shape), module
    # the final modulation is presented whole (all of the stored bytes), its halves exchanged on merging
    final = {f"transformer.norm_out.linear.{p}" for p in ("weight", "bias")}
    assert opened.swapped == final
    assert all(opened.pieces[n] == (f"final_layer.adaLN_modulation.1.{n.rpartition('.')[2]}", None) for n in final)
    assert all(opened.tensors[n] == stored[opened.pieces[n][0]] for n in final)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_the_final_modulation_reads_in_diffusers_order(built, singles, prefix):
    """Read through the opened checkpoint (what ``lora init`` reads), the final modulation's weight and bias are
    the diffusers tensors, halves in diffusers' order; the stored ones are not (the test could fail)."""
    from adaptools.plugin import Checkpoint

    checkpoint = Checkpoint.open(singles[prefix])
    state, stored = transformer_state(built["pipe"]), load_file(str(singles[prefix]))
    for param in ("weight", "bias"):
        theirs = state[f"norm_out.linear.{param}"]
        assert torch.equal(checkpoint.read(f"transformer.norm_out.linear.{param}"), theirs)
        assert not torch.equal(stored[f"{prefix}final_layer.adaLN_modulation.1.{param}"], theirs)


def transformer_only(lora, out):
    """The fixture LoRA without the text encoder (a transformer-only single file)."""
    with safe_open(str(lora), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(TRANSFORMER_KEYS)}
        metadata = f.metadata()
    save_file(state, str(out), metadata=metadata)
    return out


def fused_transformer(pipe, lora):
    """The transformer after diffusers loads ``lora`` and fuses it (every layer, the final modulation's too)."""
    from diffusers.utils import recurse_remove_peft_layers

    model = loaded(pipe, lora)["transformer"]
    assert "x" in model.norm_out.linear.lora_A and model.norm_out.linear.lora_B["x"].weight.abs().min() > 0
    model.fuse_lora(adapter_names=["x"])
    recurse_remove_peft_layers(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("style", ["diffusers", "kohya", "comfy"])
def test_merge_equals_diffusers_fuse_lora(built, singles, prefix, style, tmp_path, cli_runner):
    """A LoRA in each key style merged into the single file, converted back, equals the transformer after diffusers'
    load_lora_weights + fuse_lora of the same LoRA (diffusers keys and LoraConfigs), bit for bit; the file keeps
    the base's keys, order, dtypes and shapes, untouched tensors byte for byte, and adds the provenance. The
    final modulation's factor is a full one: its stored row halves are exchanged against diffusers' and the
    merge is still exact."""
    lora = transformer_only(built[style], tmp_path / "lora.safetensors")
    out = tmp_path / "merged.safetensors"
    result = cli_runner("merge", singles[prefix], lora, out)
    assert result.exit_code == 0, result.output
    assert_same(convert(load_file(str(out)), tiny_width()), fused_transformer(built["pipe"], built["diffusers"]))
    base, merged = raw_tensors(singles[prefix]), raw_tensors(out)
    assert list(base) == list(merged) and all(base[k][:2] == merged[k][:2] for k in base)
    changed = {k for k in base if base[k] != merged[k]}
    assert {f"{prefix}double_blocks.0.img_attn.qkv.weight", f"{prefix}single_blocks.0.linear1.weight",
            f"{prefix}final_layer.adaLN_modulation.1.weight"} <= changed
    assert not any(k.endswith((".bias", ".scale")) for k in changed)
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.architecture"] == "tiny-flux" and "adaptools.provenance" in metadata


def test_xlabs_lora_merges_as_diffusers_fuses_it(built, singles, tmp_path, cli_runner):
    """XLabs' attention LoRA: a single block's ``qkv_lora`` adapts three of ``linear1``'s four row blocks (the
    MLP's rows stay as stored), and the file converted back equals diffusers' fuse_lora of the same keys."""
    from flux_checks import fused
    from test_flux import xlabs_state

    state = xlabs_state("")
    save_file(state, str(tmp_path / "xlabs.safetensors"))
    out = tmp_path / "merged.safetensors"
    result = cli_runner("merge", singles[""], tmp_path / "xlabs.safetensors", out)
    assert result.exit_code == 0, result.output
    merged = convert(load_file(str(out)), tiny_width())
    assert_same(merged, fused(built["pipe"], dict(state))["transformer"])
    base = transformer_state(built["pipe"])
    key = "single_transformer_blocks.0.proj_mlp.weight"
    assert torch.equal(merged[key], base[key])
    assert not torch.equal(merged["single_transformer_blocks.0.attn.to_q.weight"],
                           base["single_transformer_blocks.0.attn.to_q.weight"])


def test_an_fp16_file_stays_fp16_rounded_once(built, singles, tmp_path, cli_runner):
    """Changed tensors, the fused row blocks included, are written in the stored fp16, each the fp32 merge of
    the same weights rounded once."""
    half = {k: v.half() for k, v in load_file(str(singles[""])).items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    save_file({k: v.float() for k, v in half.items()}, str(tmp_path / "full.safetensors"))
    lora = transformer_only(built["kohya"], tmp_path / "lora.safetensors")
    for name in ("half", "full"):
        result = cli_runner("merge", tmp_path / f"{name}.safetensors", lora, tmp_path / f"{name}-merged.safetensors")
        assert result.exit_code == 0, result.output
    merged, reference = (load_file(str(tmp_path / f"{n}-merged.safetensors")) for n in ("half", "full"))
    assert all(merged[k].dtype == torch.float16 and torch.equal(merged[k], reference[k].half()) for k in half)
    assert not torch.equal(merged["single_blocks.0.linear1.weight"], half["single_blocks.0.linear1.weight"])
    final = "final_layer.adaLN_modulation.1.weight"
    assert not torch.equal(merged[final], half[final])


def test_the_exchange_is_exact_for_any_row_wise_update():
    """swap_updates on a chain of updates that are not low-rank products (a per-row rescale reading the
    original, as DoRA's norm does, and a bias delta): applied to the stored tensor (halves exchanged), the
    result is the diffusers-order result with its halves exchanged, bit for bit; no row blocks are offered."""
    from adaptools.plugin import TensorUpdate
    from adaptools_plugins.diffusion.flux_single_file import swap_updates

    torch.manual_seed(0)
    weight, delta, magnitude = torch.randn(8, 5), torch.randn(8, 5), torch.rand(8, 1) + 0.5

    def add(current, original):
        return current.add_(delta)

    def rescale(current, original):
        return current * (magnitude / (original + delta).norm(dim=1, keepdim=True))

    chain = (TensorUpdate("w", "delta", add, rows=lambda c, sl: c.add_(delta[sl])),
             TensorUpdate("w", "delta", rescale, needs_original=True))
    expected = weight.clone()
    for update in chain:
        expected = update.fn(expected, weight)
    stored = torch.cat((weight[4:], weight[:4]))
    got = stored.clone()
    for update in swap_updates(chain):
        assert update.rows is None and update.row_delta is None
        got = update.fn(got, stored)
    assert torch.equal(got, torch.cat((expected[4:], expected[:4])))
    assert not torch.equal(got, expected)


# --- hostile inputs: one clean line naming the file (and tensor), exit 2, nothing written --------------------


def _refused(cli_runner, base, lora, tmp_path, *says):
    out = tmp_path / "out.safetensors"
    result = cli_runner("merge", base, lora, out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for text in says:
        assert text in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("key", ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                                 "double_blocks.0.txt_attn.qkv.bias"])
def test_a_fused_layer_that_does_not_split_is_refused(built, singles, tmp_path, cli_runner, key):
    """A qkv whose rows are no multiple of three, a linear1 with no rows left for the MLP after q, k and v as
    wide as its input, a bias of fewer rows than its weight."""
    state = load_file(str(singles[""]))
    cut = {"double_blocks.0.img_attn.qkv.weight": 95, "single_blocks.0.linear1.weight": 96,
           "double_blocks.0.txt_attn.qkv.bias": 93}[key]
    state[key] = state[key][:cut].contiguous()
    save_file(state, str(tmp_path / "edited.safetensors"))
    lora = transformer_only(built["kohya"], tmp_path / "lora.safetensors")
    _refused(cli_runner, tmp_path / "edited.safetensors", lora, tmp_path, "edited.safetensors", key, "row blocks")


def test_a_truncated_single_file_is_refused(built, singles, tmp_path, cli_runner):
    data = singles[""].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    last = list(raw_tensors(singles[""]))[-1]
    lora = transformer_only(built["kohya"], tmp_path / "lora.safetensors")
    _refused(cli_runner, tmp_path / "cut.safetensors", lora, tmp_path, "cut.safetensors", last, "truncated")


def test_an_sd_lora_into_a_flux_file_is_refused(singles, tmp_path, cli_runner):
    """An SDXL LoRA (kohya keys, a second text encoder) is named as such; nothing is merged."""
    state = {}
    for name, down, up in (("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", (2, 12), (12, 2)),):
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = torch.ones(down), torch.ones(up)
        state[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(state, str(tmp_path / "sdxl.safetensors"))
    _refused(cli_runner, singles[""], tmp_path / "sdxl.safetensors", tmp_path, "SDXL LoRA", "FLUX.1 single-file")


def test_a_final_modulation_of_odd_rows_is_refused(built, singles, tmp_path, cli_runner):
    """Its shift and scale halves cannot be told apart; the file is refused on opening, naming the tensor."""
    state = load_file(str(singles[""]))
    key = "final_layer.adaLN_modulation.1.weight"
    state[key] = state[key][:-1].contiguous()
    save_file(state, str(tmp_path / "edited.safetensors"))
    lora = transformer_only(built["kohya"], tmp_path / "lora.safetensors")
    _refused(cli_runner, tmp_path / "edited.safetensors", lora, tmp_path, "edited.safetensors", key, "halves")


@pytest.mark.parametrize("style", ["diffusers", "kohya", "comfy"])
def test_a_final_modulation_factor_of_odd_rows_is_refused(built, singles, tmp_path, cli_runner, style):
    """An up factor one row short of the layer: its halves cannot be exchanged (BFL keys) nor does it fit the
    layer (diffusers keys); refused in one line naming the factor."""
    with safe_open(str(built[style]), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(TRANSFORMER_KEYS)}
        metadata = f.metadata()
    up = next(k for k in state if ("adaLN" in k or "norm_out" in k) and ("lora_up" in k or "lora_B" in k))
    state[up] = state[up][:-1].contiguous()
    save_file(state, str(tmp_path / "lora.safetensors"), metadata=metadata)
    factor = {"diffusers": "transformer.norm_out.linear.lora_", "kohya": "lora_unet_final_layer_adaLN_modulation_1.",
              "comfy": "diffusion_model.final_layer.adaLN_modulation.1."}[style]
    _refused(cli_runner, singles[""], tmp_path / "lora.safetensors", tmp_path, "lora.safetensors", factor)


def test_a_flux_lora_into_an_sd_file_or_with_text_encoder_is_named(built, singles, tmp_path, cli_runner):
    """The fixture LoRA also adapts the CLIP text encoder, which a BFL transformer file does not hold."""
    lora = tmp_path / "with-te.safetensors"
    with safe_open(str(built["kohya"]), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(lora))
    _refused(cli_runner, singles[""], lora, tmp_path, "text_encoder.", "single file lacks")


@pytest.mark.parametrize("container", ["safetensors", "gguf"])
def test_other_containers_refuse_a_flux_single_file_base(built, singles, container, tmp_path, cli_runner):
    """Only the single-file container knows the final modulation is presented in diffusers' row order (and
    writes it back in BFL's): any other container must refuse such a base, not write the rows exchanged."""
    lora = transformer_only(built["diffusers"], tmp_path / "lora.safetensors")
    out = tmp_path / f"merged-{container}"
    result = cli_runner("merge", singles[PREFIXES[0]], lora, out, "--to", container)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()
