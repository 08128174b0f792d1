"""Hostile and unsupported image-model LoRA files: each ends in one line naming the file and the tensor (or
header key) and what to do, exit code 2, nothing written, whether the command is ``info``, ``check`` or
``convert``. The files are the fixture's real kohya and diffusers LoRAs, edited one way each."""

from __future__ import annotations

import json

import pytest
import torch
from diffusion_checks import build_all
from safetensors import safe_open
from safetensors.torch import save_file

import adaptools

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE = "lora_te1_encoder_layers_0_self_attn_q_proj"
D = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return build_all(tmp_path_factory)


def load_all(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata() or {}


def set_alpha(value):
    return lambda s: s.__setitem__(f"{Q}.alpha", torch.tensor(value))


def rename_te(prefix):
    def edit(state):
        for key in [k for k in state if k.startswith("lora_te1_")]:
            state[prefix + key[len("lora_te1_"):]] = state.pop(key)
    return edit


def sdxl_text_encoder_2(built):
    """The SDXL fixture's second text encoder keys, to mix into the SD 1.x file."""
    state, _ = load_all(built["sdxl"]["kohya"])
    return {k: v for k, v in state.items() if k.startswith("lora_te2_")}


#: case -> (edit of the sd1 kohya state, what the one line must name)
KOHYA = {
    "alpha-nan": (set_alpha(float("nan")), f"{Q}.alpha"),
    "alpha-inf": (set_alpha(float("inf")), f"{Q}.alpha"),
    "alpha-zero": (set_alpha(0.0), f"{Q}.alpha"),
    "alpha-negative": (set_alpha(-4.0), f"{Q}.alpha"),
    "alpha-huge": (set_alpha(3e38), f"{Q}.alpha"),
    "alpha-vector": (lambda s: s.__setitem__(f"{Q}.alpha", torch.ones(2)), f"{Q}.alpha"),
    "rank-mismatch": (lambda s: s.__setitem__(f"{Q}.lora_up.weight", s[f"{Q}.lora_up.weight"][:, :2].clone()),
                      f"{Q}.lora_up.weight"),
    "up-missing": (lambda s: s.pop(f"{Q}.lora_up.weight"), Q),
    "down-1d": (lambda s: s.__setitem__(f"{Q}.lora_down.weight", torch.ones(4)), f"{Q}.lora_down.weight"),
    "factor-nan": (lambda s: s[f"{Q}.lora_up.weight"].__setitem__((0, 0), float("nan")), f"{Q}.lora_up.weight"),
    "unknown-key": (lambda s: s.__setitem__("something_else.weight", torch.ones(1)), "something_else.weight"),
    "unknown-suffix": (lambda s: s.__setitem__(f"{Q}.lora_mid.weight", torch.ones(1)), f"{Q}.lora_mid.weight"),
    "oft-key": (lambda s: s.__setitem__(f"{Q}.oft_blocks", torch.ones(2, 2, 2)), f"{Q}.oft_blocks"),
    "lora-and-lokr": (lambda s: s.__setitem__(f"{Q}.lokr_w1", torch.ones(2, 2)), "mixes LoRA modules"),
    "lora-and-loha": (lambda s: s.update({f"{TE}.{r}": torch.ones(2, 2) for r in ("hada_w1_a", "hada_w1_b",
                                                                                   "hada_w2_a", "hada_w2_b")}),
                      "mixes LoRA modules"),
    "sgm-and-diffusers-names": (lambda s: s.__setitem__("lora_unet_input_blocks_4_1_proj_in.alpha", torch.tensor(1.0)),
                  "lora_unet_input_blocks_4_1_proj_in.alpha"),
    "te-and-te1": (lambda s: s.update({"lora_te_" + k[len("lora_te1_"):]: s.pop(k) for k in list(s)
                                       if k.startswith(TE)}), "lora_te_"),
}


def write(tmp_path, state, metadata=None):
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path


def one_clean_line(result, path, named):
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert str(path) in result.stderr and named in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("case", sorted(KOHYA))
def test_hostile_kohya_files_end_in_one_clean_error(case, built, tmp_path, cli_runner):
    edit, named = KOHYA[case]
    state, _ = load_all(built["sd1"]["kohya"])
    edit(state)
    path = write(tmp_path, state)
    for command in (["info", path], ["convert", path, tmp_path / "out.safetensors", "--to", "diffusers"]):
        one_clean_line(cli_runner(*command), path, named)
    assert not (tmp_path / "out.safetensors").exists()


def test_two_families_mixed_are_refused(built, tmp_path, cli_runner):
    """SD 1.x's UNet layout with SDXL's second text encoder, in one file."""
    state, _ = load_all(built["sd1"]["kohya"])
    rename_te("lora_te1_")(state)
    state.update(sdxl_text_encoder_2(built))
    path = write(tmp_path, state)
    result = cli_runner("info", path)
    one_clean_line(result, path, "text_encoder_2")
    assert "two model families" in result.stderr


def test_two_cross_attention_widths_are_refused(built, tmp_path, cli_runner):
    state, _ = load_all(built["sd1"]["kohya"])
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    state[key] = torch.zeros(state[key].shape[0], 99)
    path = write(tmp_path, state)
    result = cli_runner("info", path)
    assert result.exit_code == 2 and "widths [12, 99]" in result.stderr, result.output


def test_a_truncated_file_is_refused(built, tmp_path, cli_runner):
    data = built["sd1"]["kohya"].read_bytes()
    path = tmp_path / "lora.safetensors"
    path.write_bytes(data[: len(data) - 100])
    result = cli_runner("convert", path, tmp_path / "out.safetensors", "--to", "kohya")
    assert result.exit_code == 2 and str(path) in result.stderr and "truncated" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.safetensors").exists()


def metadata_edit(field, value):
    def edit(meta):
        data = json.loads(meta["lora_adapter_metadata"])
        data[field] = value
        meta["lora_adapter_metadata"] = json.dumps(data)
    return edit


#: case -> (edit of the header metadata, what the one line must name)
DIFFUSERS = {
    "metadata-alpha-zero": (metadata_edit("unet.lora_alpha", 0), "alpha 0"),
    "metadata-alpha-negative": (metadata_edit("unet.lora_alpha", -8), "alpha -8"),
    "metadata-rank-lies": (metadata_edit("unet.r", 5), "rank 5"),
    "metadata-rslora": (metadata_edit("unet.use_rslora", True), "use_rslora"),
    "metadata-not-json": (lambda m: m.__setitem__("lora_adapter_metadata", "{nope"), "lora_adapter_metadata"),
    "metadata-stray-field": (lambda m: m.__setitem__("lora_adapter_metadata", json.dumps({"r": 4})), "'r'"),
    "kohya-facts-garbage": (lambda m: m.__setitem__("adaptools.kohya", json.dumps({"alpha_dtype": "U8"})),
                            "adaptools.kohya"),
}


@pytest.mark.parametrize("case", sorted(DIFFUSERS))
def test_hostile_diffusers_headers_end_in_one_clean_error(case, built, tmp_path, cli_runner):
    edit, named = DIFFUSERS[case]
    state, meta = load_all(built["sd1"]["diffusers"])
    edit(meta)
    path = write(tmp_path, state, meta)
    for command in (["info", path], ["convert", path, tmp_path / "out.safetensors", "--to", "kohya"]):
        one_clean_line(cli_runner(*command), path, named)


def test_diffusers_factor_without_partner_is_refused(built, tmp_path, cli_runner):
    state, _ = load_all(built["sd1"]["diffusers-plain"])
    state.pop(f"{D}.lora_B.weight")
    path = write(tmp_path, state)
    one_clean_line(cli_runner("info", path), path, f"{D}.lora_A.weight")


def test_missing_alpha_means_alpha_equals_rank(built, tmp_path):
    """kohya's rule (docs/diffusion.md, "Alpha"); and writing it back leaves the alpha out again."""
    state, _ = load_all(built["sd1"]["kohya"])
    state.pop(f"{Q}.alpha")
    state[f"{TE}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    path = write(tmp_path, state)
    adapter = adaptools.load(path)
    module = adapter.config["modules"][D]
    assert module["alpha"] == module["rank"] == 4 and module["scaling"] == 1.0
    assert adapter.config["modules"]["text_encoder.encoder.layers.0.self_attn.q_proj"]["scaling"] == 1.0 / 2
    adaptools.save(adapter, tmp_path / "back.safetensors", format="kohya")
    with safe_open(str(tmp_path / "back.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(f"{TE}.alpha").dtype == torch.float16
    assert keys == set(state)


#: what ``check`` reports for each hostile kohya file: a rule (exit 1), or None for a file that cannot be read
#: at all (exit 2, the same one line)
CHECK_RULES = {"alpha-nan": "DIFF001", "alpha-huge": "DIFF001",
               "alpha-inf": "DIFF001", "alpha-zero": "DIFF001", "alpha-negative": "DIFF001",
               "alpha-vector": "DIFF001", "unknown-key": "DIFF003", "unknown-suffix": "DIFF003",
               "oft-key": "DIFF003", "lora-and-lokr": "DIFF003",
               "lora-and-loha": "DIFF003", "sgm-and-diffusers-names": "DIFF003", "te-and-te1": "DIFF002",
               "factor-nan": "LORA011",
               "rank-mismatch": None, "up-missing": None, "down-1d": None}


@pytest.mark.parametrize("case", sorted(KOHYA))
def test_check_reports_each_hostile_kohya_file_by_rule(case, built, tmp_path, cli_runner):
    edit, named = KOHYA[case]
    state, _ = load_all(built["sd1"]["kohya"])
    edit(state)
    path = write(tmp_path, state)
    result = cli_runner("check", path, "--format", "json")
    rule = CHECK_RULES[case]
    if rule is None:
        one_clean_line(result, path, named)
        return
    assert result.exit_code == 1, result.output
    findings = json.loads(result.stdout)["adapters"][0]["findings"]
    assert [f["rule"] for f in findings if f["severity"] == "error"] == [rule], findings


def test_check_names_the_mixed_families(built, tmp_path, cli_runner):
    state, _ = load_all(built["sd1"]["kohya"])
    rename_te("lora_te1_")(state)
    state.update(sdxl_text_encoder_2(built))
    result = cli_runner("check", write(tmp_path, state), "--format", "json")
    assert result.exit_code == 1, result.output
    assert [f["rule"] for f in json.loads(result.stdout)["adapters"][0]["findings"]] == ["DIFF002"]


def test_check_warns_where_diffusers_reads_kohya_alphas_differently(built, tmp_path, cli_runner):
    """DIFF005 on the fixture's kohya file (attention alphas 2 among 4s: diffusers misreads them, shown by
    tests/test_diffusion.py::test_diffusers_misreads_kohya_attention_alphas); DIFF004 once an alpha is dropped."""
    state, _ = load_all(built["sd1"]["kohya"])
    state.pop(f"{Q}.alpha")
    result = cli_runner("check", write(tmp_path, state), "--format", "json")
    rules = sorted(f["rule"] for f in json.loads(result.stdout)["adapters"][0]["findings"])
    assert result.exit_code == 0 and rules == ["DIFF004", "DIFF005"], result.output
    result = cli_runner("check", built["sd1"]["diffusers-plain"], "--format", "json")
    assert [f["rule"] for f in json.loads(result.stdout)["adapters"][0]["findings"]] == ["DIFF006"]
    result = cli_runner("check", built["sdxl"]["diffusers"], "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout)["adapters"][0]["findings"] == []
