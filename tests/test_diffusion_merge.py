"""Merging image-model LoRAs into a diffusers pipeline folder, against diffusers itself: each component's
weights equal, bit for bit in fp32, what ``pipe.load_lora_weights`` + ``pipe.fuse_lora`` computes on the same
pipeline, and the merged folder loads with ``DiffusionPipeline.from_pretrained``."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusion_checks import COMPONENTS, FAMILIES, build_all, pipeline
from safetensors.torch import load_file, save_file

import adaptools


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_all(tmp_path_factory)


def fused(pipe_folder, lora_file):
    """Each component's state dict after diffusers' load_lora_weights + fuse_lora (every component, scale 1)
    + unload_lora_weights."""
    pipe = pipeline(pipe_folder)
    present = [c for c in COMPONENTS if getattr(pipe, c, None) is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(lora_file))
        pipe.fuse_lora(components=present, lora_scale=1.0)
        pipe.unload_lora_weights()
    return {c: {k: v.detach() for k, v in getattr(pipe, c).state_dict().items()} for c in present}


def merged_state(folder, component):
    files = sorted((folder / component).glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def assert_same(ours, theirs, component):
    assert sorted(ours) == sorted(theirs), component
    different = [k for k in theirs if not (ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]))]
    assert not different, f"{component}: {len(different)} tensors differ, first {different[:3]}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("style", ["diffusers", "diffusers-plain"])
def test_merge_equals_diffusers_fuse_lora(built, family, style, tmp_path, cli_runner):
    paths = built[family]
    out = tmp_path / "merged"
    result = cli_runner("merge", paths["pipe"], paths[style], out)
    assert result.exit_code == 0, result.output
    reference = fused(paths["pipe"], paths[style])
    for component, state in reference.items():
        assert_same(merged_state(out, component), state, component)
    base_unet = load_file(str(paths["pipe"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base_unet[k], v) for k, v in reference["unet"].items())  # the LoRA changed it
    for name in ("vae", "scheduler", "tokenizer", "model_index.json"):
        assert (out / name).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = pipeline(out)
    for component in reference:
        assert_same({k: v.detach() for k, v in getattr(loaded, component).state_dict().items()},
                    reference[component], component)


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_merge_equals_the_same_lora_in_diffusers_keys(built, family, tmp_path):
    """The fixture's kohya file is the plain diffusers file with alpha = rank: both merge to the same bytes,
    so the kohya merge equals diffusers' fuse_lora too (which misreads some kohya alphas; see
    test_diffusion.py::test_diffusers_misreads_kohya_attention_alphas)."""
    paths = built[family]
    adaptools.merge(paths["pipe"], [adaptools.MergeInput(adaptools.load(paths["kohya"]))], tmp_path / "k")
    adaptools.merge(paths["pipe"], [adaptools.MergeInput(adaptools.load(paths["diffusers-plain"]))], tmp_path / "d")
    for component in ("unet", "text_encoder"):
        assert_same(merged_state(tmp_path / "k", component), merged_state(tmp_path / "d", component), component)


def test_tensors_for_no_component_are_an_error(built, tmp_path, cli_runner):
    """An SDXL LoRA (with text_encoder_2) into an SD 1.x pipeline: the tensors are named, nothing written."""
    result = cli_runner("merge", built["sd1"]["pipe"], built["sdxl"]["kohya"], tmp_path / "out")
    assert result.exit_code == 2 and "name no component of this pipeline" in result.stderr, result.output
    assert "text_encoder_2." in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_modules_the_component_lacks_are_an_error(built, tmp_path, cli_runner):
    """An SDXL LoRA's UNet modules into an SD 1.x UNet: the first missing module is named."""
    sdxl = adaptools.load(built["sdxl"]["diffusers"])
    adaptools.save(sdxl, tmp_path / "x.safetensors", format="diffusers")
    result = cli_runner("merge", built["sd1"]["pipe"], tmp_path / "x.safetensors", tmp_path / "out")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_dry_run_on_a_pipeline_says_what_to_do(built, tmp_path, cli_runner):
    result = cli_runner("merge", built["sd1"]["pipe"], built["sd1"]["kohya"], tmp_path / "out", "--dry-run")
    assert result.exit_code == 2 and "pipeline folder" in result.stderr, result.output


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_lora_merges_as_diffusers_fuses_it(built, family, tmp_path, cli_runner):
    """Most published LoRAs are stored in fp16: read as fp16, converted without a cast, and merged into the
    fp32 pipeline bit for bit as diffusers fuses them."""
    from safetensors import safe_open

    source = built[family]["diffusers"]
    with safe_open(str(source), "pt") as f:
        half = {k: f.get_tensor(k).half() for k in f.keys()}
        metadata = f.metadata()
    lora = tmp_path / "fp16.safetensors"
    save_file(half, str(lora), metadata=metadata)
    kohya = tmp_path / "fp16-kohya.safetensors"
    assert cli_runner("convert", lora, kohya, "--to", "kohya").exit_code == 0
    with safe_open(str(kohya), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {torch.float16}
    result = cli_runner("merge", built[family]["pipe"], lora, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    for component, state in fused(built[family]["pipe"], lora).items():
        assert_same(merged_state(tmp_path / "merged", component), state, component)


def _lycoris(built, tmp_path_factory, method):
    """The fixture's LyCORIS ``method`` in kohya keys (made by peft, fixtures/diffusion.py) and peft's merged
    UNet."""
    from diffusion_checks import diffusion_fixtures

    path = tmp_path_factory.mktemp(method) / f"{method}.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = getattr(diffusion_fixtures, f"{method}_kohya")(built["sd1"]["pipe"], path)
    return path, reference


@pytest.fixture(scope="module")
def loha(built, tmp_path_factory):
    return _lycoris(built, tmp_path_factory, "loha")


def test_kohya_loha_merges_as_peft_merges_it(built, loha, tmp_path, cli_runner):
    """A LoHa in LyCORIS' kohya keys reads into the loha method and merges into the pipeline's UNet bit for bit
    as peft's LoHa merge (linear and 3x3 conv, rank and alpha patterns); the other components are copied."""
    path, reference = loha
    adapter = adaptools.load(path)
    assert adapter.method == "loha" and adapter.config["components"] == ["unet"]
    result = cli_runner("merge", built["sd1"]["pipe"], path, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert_same(merged_state(tmp_path / "merged", "unet"), reference, "unet")
    base = merged_state(built["sd1"]["pipe"], "unet")
    assert sum(not torch.equal(base[k], v) for k, v in reference.items()) == len(adapter.modules())
    assert_same(merged_state(tmp_path / "merged", "text_encoder"), merged_state(built["sd1"]["pipe"], "text_encoder"),
                "text_encoder")


def test_kohya_loha_round_trips_byte_identical(loha, tmp_path, cli_runner):
    from diffusion_checks import raw_tensors

    path, _ = loha
    assert cli_runner("convert", path, tmp_path / "s.safetensors").exit_code == 0  # schema file
    assert cli_runner("convert", tmp_path / "s.safetensors", tmp_path / "k.safetensors", "--to", "kohya").exit_code == 0
    assert raw_tensors(tmp_path / "k.safetensors") == raw_tensors(path)
    result = cli_runner("convert", path, tmp_path / "d.safetensors", "--to", "diffusers")
    assert result.exit_code == 2 and "--to kohya" in result.stderr, result.output


def test_a_loha_module_missing_a_factor_is_refused(loha, tmp_path, cli_runner):

    state = load_file(loha[0])
    key = next(k for k in sorted(state) if k.endswith(".hada_w2_b"))
    del state[key]
    save_file(state, tmp_path / "l.safetensors")
    result = cli_runner("info", tmp_path / "l.safetensors")
    assert result.exit_code == 2 and "has no hada_w2_b" in result.stderr and key.split(".")[0] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def lokr(built, tmp_path_factory):
    return _lycoris(built, tmp_path_factory, "lokr")


def test_kohya_lokr_merges_as_peft_merges_it(built, lokr, tmp_path, cli_runner):
    """A LoKr in LyCORIS' kohya keys reads into the lokr method and merges into the pipeline's UNet bit for bit
    as peft's LoKr merge: both factors low-rank (decompose_both), both full (to_v), and 3x3 convs."""
    path, reference = lokr
    adapter = adaptools.load(path)
    assert adapter.method == "lokr" and adapter.config["decompose_both"] is True
    kinds = {frozenset(roles) for roles in adapter.modules().values()}
    assert frozenset({"lokr_w1", "lokr_w2"}) in kinds and frozenset(
        {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}) in kinds
    result = cli_runner("merge", built["sd1"]["pipe"], path, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert_same(merged_state(tmp_path / "merged", "unet"), reference, "unet")
    base = merged_state(built["sd1"]["pipe"], "unet")
    assert sum(not torch.equal(base[k], v) for k, v in reference.items()) == len(adapter.modules())


def test_kohya_lokr_with_both_factors_full_ignores_alpha(built, lokr, tmp_path, cli_runner):
    """LyCORIS (and A1111, ComfyUI) scale a LoKr module whose factors are both full by 1, whatever its alpha:
    such a module's alpha set to 1 (as trainers that write 'linear_alpha: 1, ignored in full dimension'
    save it) merges the same, and writing the file back keeps the 1."""
    from diffusion_checks import raw_tensors

    path, reference = lokr
    state = load_file(path)
    full = [k[: -len(".lokr_w2")] for k in state if k.endswith(".lokr_w2")]
    assert full
    for name in full:
        state[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(state, tmp_path / "one.safetensors")
    result = cli_runner("merge", built["sd1"]["pipe"], tmp_path / "one.safetensors", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert_same(merged_state(tmp_path / "merged", "unet"), reference, "unet")
    assert cli_runner("convert", tmp_path / "one.safetensors", tmp_path / "s.safetensors").exit_code == 0
    assert cli_runner("convert", tmp_path / "s.safetensors", tmp_path / "k.safetensors", "--to", "kohya").exit_code == 0
    assert raw_tensors(tmp_path / "k.safetensors") == raw_tensors(tmp_path / "one.safetensors")


def test_kohya_lokr_round_trips_byte_identical(lokr, tmp_path, cli_runner):
    from diffusion_checks import raw_tensors

    path, _ = lokr
    assert cli_runner("convert", path, tmp_path / "s.safetensors").exit_code == 0
    assert cli_runner("convert", tmp_path / "s.safetensors", tmp_path / "k.safetensors", "--to", "kohya").exit_code == 0
    assert raw_tensors(tmp_path / "k.safetensors") == raw_tensors(path)


@pytest.mark.parametrize("edit, says", [
    ("drop-w2_b", "has no lokr_w2_b"),
    ("both-forms", "saves lokr_w1 and lokr_w1_a both"),
    ("drop-w1", "has no lokr_w1"),
])
def test_a_broken_lokr_module_is_refused_in_one_line(lokr, tmp_path, cli_runner, edit, says):
    state = load_file(lokr[0])
    low = next(k for k in sorted(state) if k.endswith(".lokr_w2_b"))
    name = low[: -len(".lokr_w2_b")]
    full = next(k for k in sorted(state) if k.endswith(".lokr_w1"))
    if edit == "drop-w2_b":
        del state[low]
    elif edit == "both-forms":
        state[full[: -len(".lokr_w1")] + ".lokr_w1_a"] = torch.ones(2, 1)
    else:
        del state[full]
    save_file(state, tmp_path / "l.safetensors")
    result = cli_runner("info", tmp_path / "l.safetensors")
    assert result.exit_code == 2 and says in result.stderr, result.output
    assert (name if edit == "drop-w2_b" else full.split(".")[0]) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
