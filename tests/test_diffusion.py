"""Image-model LoRAs (kohya and diffusers key styles), read and converted, against diffusers itself: every
module, factor and scale adaptools reads equals what diffusers' ``load_lora_weights`` puts into the pipeline's
layers, and what adaptools writes loads into diffusers with the same layers again."""

from __future__ import annotations

import re

import pytest
import torch
from diffusion_checks import (
    COMPONENTS,
    FAMILIES,
    as_diffusers_reads,
    build_all,
    diffusers_layers,
    ours,
    pipeline,
    raw_tensors,
    same_layers,
)
from safetensors import safe_open

import adaptools

STYLES = ("kohya", "diffusers", "diffusers-plain")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_all(tmp_path_factory)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("style", STYLES)
def test_reading_matches_diffusers_loader(built, family, style):
    """Module paths, factors bit for bit and each module's scale (alpha / rank) as diffusers loads them (with
    diffusers' one kohya divergence, on attention alphas, spelled out in as_diffusers_reads)."""
    paths = built[family]
    adapter = adaptools.load(paths[style])
    assert adapter.read_format == ("kohya" if style == "kohya" else "diffusers")
    same_layers(as_diffusers_reads(adapter, style), diffusers_layers(paths["pipe"], paths[style]))


def test_diffusers_misreads_kohya_attention_alphas(built):
    """The divergence as_diffusers_reads models is real: in the fixture's kohya file (alpha = rank, ranks 2 on
    to_k and 4 elsewhere) diffusers scales to_k by 4/2 where kohya's rule gives 2/2."""
    adapter = adaptools.load(built["sd1"]["kohya"])
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert adapter.config["modules"][module]["scaling"] == 1.0
    assert diffusers_layers(built["sd1"]["pipe"], built["sd1"]["kohya"])[module][2] == 2.0


@pytest.mark.parametrize("family", FAMILIES)
def test_family_and_components(built, family, cli_runner):
    for style in STYLES:
        adapter = adaptools.load(built[family][style])
        expected = ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
        assert adapter.config["model_family"] == family
        assert adapter.config["components"] == expected
    result = cli_runner("info", built[family]["kohya"])
    assert result.exit_code == 0, result.output
    assert f"model_family: {family}" in result.output
    assert f"components: {expected}" in result.output


def test_metadata_alpha_patterns_are_read(built):
    """The fixture's LoraConfig has rank and alpha patterns: per-module scales differ, as peft set them."""
    scales = {m: v["scaling"] for m, v in adaptools.load(built["sd1"]["diffusers"]).config["modules"].items()}
    assert scales["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == 8 / 4
    assert scales["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"] == 8 / 2
    assert scales["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"] == 3 / 4
    assert scales["unet.down_blocks.0.resnets.0.conv1"] == 8 / 3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("start,via", [("kohya", "diffusers"), ("diffusers", "kohya"), ("diffusers-plain", "kohya")])
def test_round_trips_are_byte_identical(built, family, start, via, tmp_path):
    """kohya -> diffusers -> kohya and diffusers -> kohya -> diffusers give back every tensor byte for byte
    (alpha keys in their stored type included)."""
    first = built[family][start]
    back_to = "kohya" if start == "kohya" else "diffusers"
    adaptools.save(adaptools.load(first), tmp_path / "mid.safetensors", format=via)
    adaptools.save(adaptools.load(tmp_path / "mid.safetensors"), tmp_path / "back.safetensors", format=back_to)
    assert raw_tensors(tmp_path / "back.safetensors") == raw_tensors(first)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("start,to", [("kohya", "diffusers"), ("diffusers", "kohya"), ("diffusers", "diffusers")])
def test_written_files_load_in_diffusers_unchanged(built, family, start, to, tmp_path, cli_runner):
    """What ``convert --to kohya|diffusers`` writes holds the input's layers and scales (read back by
    adaptools), and diffusers loads it as it loads any file of that style: per-module alpha survives."""
    out = tmp_path / f"{to}.safetensors"
    result = cli_runner("convert", built[family][start], out, "--to", to)
    assert result.exit_code == 0, result.output
    written = adaptools.load(out)
    same_layers(ours(written), ours(adaptools.load(built[family][start])))
    same_layers(diffusers_layers(built[family]["pipe"], out), as_diffusers_reads(written, to))


def test_diffusers_own_kohya_conversion_drops_alpha_and_ours_keeps_it(built, tmp_path):
    """diffusers' convert_state_dict_to_kohya writes alpha = rank, so a LoRA trained with lora_alpha != r loses
    its scale; adaptools writes each module's alpha (docs/diffusion.md, "What diffusers does differently")."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    source = built["sd1"]["diffusers"]
    theirs = tmp_path / "theirs.safetensors"
    save_file(convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(source))), theirs)
    adaptools.save(adaptools.load(source), tmp_path / "ours.safetensors", format="kohya")
    reference = {m: s for m, (_, _, s) in ours(adaptools.load(source)).items()}
    mine = {m: s for m, (_, _, s) in ours(adaptools.load(tmp_path / "ours.safetensors")).items()}
    lost = {m: s for m, (_, _, s) in ours(adaptools.load(theirs)).items()}
    assert mine == reference
    assert set(lost.values()) == {1.0} and set(reference.values()) != {1.0}


def test_kohya_alpha_types_are_kept_and_chosen(built, tmp_path):
    """An alpha comes back in the type it was stored in; a LoRA from elsewhere gets float32 alphas, float64
    only where float32 would change the value."""
    adapter = adaptools.load(built["sd1"]["diffusers"])
    adaptools.save(adapter, tmp_path / "k.safetensors", format="kohya")
    alphas = {k: v for k, v in raw_tensors(tmp_path / "k.safetensors").items() if k.endswith(".alpha")}
    assert {dtype for dtype, _, _ in alphas.values()} == {str(torch.float32)}
    kohya = raw_tensors(built["sd1"]["kohya"])  # diffusers' converter stores int64 ranks
    assert {v[0] for k, v in kohya.items() if k.endswith(".alpha")} == {str(torch.int64)}


def test_diffusers_reads_a_missing_kohya_alpha_as_the_common_one(built, tmp_path):
    """Another divergence (check's DIFF004): a module without alpha in a file whose other modules have one is
    alpha = rank to kohya (scale 1) and the component's most common alpha to diffusers."""
    from safetensors.torch import load_file, save_file

    state = load_file(built["sd1"]["kohya"])
    key = "lora_unet_down_blocks_0_resnets_0_conv1"  # rank 3 in a file whose common alpha is 4
    del state[f"{key}.alpha"]
    save_file(state, tmp_path / "k.safetensors")
    module = "unet.down_blocks.0.resnets.0.conv1"
    assert adaptools.load(tmp_path / "k.safetensors").config["modules"][module]["scaling"] == 1.0
    assert diffusers_layers(built["sd1"]["pipe"], tmp_path / "k.safetensors")[module][2] == 4 / 3


def old_spellings(built, family, tmp_path):
    """The two older diffusers spellings, made by diffusers' own converters: ``lora.down`` /
    ``lora_linear_layer.down`` (convert_state_dict_to_diffusers of the PEFT keys) and the attention-processor
    ``…processor.to_q_lora.down`` (what its kohya loader turns kohya keys into, alphas dropped)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file, save_file

    plain = load_file(built[family]["diffusers-plain"])
    save_file(convert_state_dict_to_diffusers(plain), tmp_path / "lora-down.safetensors")
    processor, _ = _convert_non_diffusers_lora_to_diffusers(load_file(built[family]["kohya"]))
    save_file(processor, tmp_path / "processor.safetensors")
    return tmp_path / "lora-down.safetensors", tmp_path / "processor.safetensors"


@pytest.mark.parametrize("family", FAMILIES)
def test_older_diffusers_spellings_read_as_diffusers_reads_them(built, family, tmp_path):
    """Both older spellings read to the very LoRA of the PEFT keys. diffusers reads the attention-processor
    file the same; of the ``lora.down`` file its loader silently drops the UNet's attention projections
    (to_q/to_k/to_v/to_out.0), which adaptools reads (docs/diffusion.md, "What diffusers does differently")."""
    lora_down, processor = old_spellings(built, family, tmp_path)
    reference = ours(adaptools.load(built[family]["diffusers-plain"]))
    for path in (lora_down, processor):
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        assert any(k.endswith(("lora.down.weight", "lora_linear_layer.down.weight")) for k in keys)  # really old
        same_layers(ours(adaptools.load(path)), reference)
    same_layers(reference, diffusers_layers(built[family]["pipe"], processor))
    loaded = diffusers_layers(built[family]["pipe"], lora_down)
    same_layers({m: reference[m] for m in loaded}, loaded)
    dropped = set(reference) - set(loaded)
    assert dropped and all(m.startswith("unet.") and re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", m)
                           for m in dropped)


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_names_split_back_to_every_module_of_the_real_models(built, family):
    """Every module of diffusers' UNet and transformers' CLIP text encoders, flattened as kohya does, splits
    back to its own path (names.split_flat), not only the ones the fixture LoRA adapts."""
    from adaptools_plugins.diffusion.names import split_flat

    pipe = pipeline(built[family]["pipe"])
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        names = [name for name, _ in model.named_modules() if name]
        assert names
        wrong = [n for n in names if split_flat(n.replace(".", "_")) != n]
        assert not wrong, wrong[:5]


def test_writing_an_adapter_made_for_no_pipeline_is_refused(tmp_path, cli_runner):
    """A PEFT LLM LoRA (module paths model.layers...) names no pipeline component: one line, exit 2."""
    from conftest import adapter_path

    for to in ("kohya", "diffusers"):
        result = cli_runner("convert", adapter_path("llama-lora"), tmp_path / f"{to}.safetensors", "--to", to)
        assert result.exit_code == 2 and "model.layers" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / f"{to}.safetensors").exists()


def test_literal_pattern_keys_match_as_the_regex_rule_does():
    """plugins/peft/matching.py answers literal keys (escaped paths, as adaptools writes them) by string
    comparison; the answer equals PEFT's regex rule, for both pattern rules, on every key/module pair."""
    from adaptools_plugins.peft.matching import pattern_key

    modules = ["unet.a.to_q", "a.to_q", "to_q", "unet.ato_q", "x.unet.a.to_q", "text_encoder.a.b", "a.b",
               "text_encoder_2.a.b", "unet.a.to_q\n", "b"]
    keys = ["to_q", r"a\.to_q", r"^unet\.a\.to_q", r"unet\.a\.to_q", "a.to_q", r"^a\.b", r"a\.b", "b", "^b"]
    for dotted in (False, True):
        for module in modules:
            for key in keys:
                wrapped = rf".*\.{key}$" if dotted else rf"(.*\.)?({key})$"
                expected = re.match(wrapped, module) is not None
                assert (pattern_key({key: 1}, module, dotted=dotted) == key) == expected, (key, module, dotted)


def test_portable_pattern_keys_fast_path_equals_the_pairwise_rule(built):
    """plugins/lora/legacy.py counts dotted suffixes instead of matching every pair; the keys are the same as
    the pairwise regex rule gives, on the SDXL fixture's modules and on names built to collide."""
    from adaptools_plugins.lora.legacy import portable_pattern_keys

    def pairwise(modules):
        def hits(key, name):
            return bool(re.match(rf".*\.{key}$", name) or re.match(rf"(.*\.)?({key})$", name))
        keys = {}
        for module in modules:
            parts = module.split(".")
            key = re.escape(".".join(parts[1:])) if len(parts) > 1 else None
            if key is None or any(hits(key, other) for other in modules if other != module):
                key = f"^{re.escape(module)}"
            keys[module] = key
        return keys

    sdxl = sorted(adaptools.load(built["sdxl"]["kohya"]).config["modules"])
    for modules in (sdxl, ["a.b.c", "b.c", "x.b.c", "c", "q", "q.c", "z.q"], ["a.b", "a.b"]):
        assert portable_pattern_keys(modules) == pairwise(modules)
    assert any(k.startswith("^") for k in portable_pattern_keys(sdxl).values())  # the two text encoders clash
