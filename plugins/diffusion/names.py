"""Module names of image-model LoRAs: components, kohya's flattened names, and the model family.

A module path in the schema is ``<component>.<module path inside that component>``, the component being the
folder of a diffusers pipeline (``unet``, ``text_encoder``, ``text_encoder_2``), so a path names the file and
tensor it adapts (docs/diffusion.md, "Module paths").

kohya flattens a module path by turning every dot into an underscore, which loses where the dots were; the
inverse splits the name with the vocabulary of diffusers' UNet and transformers' CLIP text model module
names (docs/diffusion.md, "kohya names").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")

#: Module names that themselves hold an underscore, in the UNet (diffusers) and CLIP text model (transformers).
#: A kohya name is split at an underscore unless it sits inside one of these.
COMPOUND_NAMES = (
    # UNet2DConditionModel
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "add_time_proj", "encoder_hid_proj",
    "class_embedding", "add_k_proj", "add_v_proj", "add_q_proj", "to_add_out", "time_proj", "conv_act",
    # CLIPTextModel / CLIPTextModelWithProjection
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "token_embedding",
    "position_embedding", "final_layer_norm", "layer_norm1", "layer_norm2", "text_projection", "activation_fn",
)
_BY_LENGTH = sorted(COMPOUND_NAMES, key=len, reverse=True)

#: Original (SGM/LDM) UNet block names some sd-scripts SDXL files use instead of diffusers' names (sgm_kohya.py).
SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


def split_flat(flat: str, vocabulary: Iterable[str] | None = None) -> str:
    """A kohya flattened module name (without its ``lora_unet_`` / ``lora_te*_`` prefix) -> a dotted path.

    At each position the longest vocabulary name (``COMPOUND_NAMES`` unless given) that ends at an underscore
    (or the end) is one segment; otherwise the text up to the next underscore is.
    ``path.replace(".", "_") == flat`` always holds."""
    by_length = _BY_LENGTH if vocabulary is None else sorted(vocabulary, key=len, reverse=True)
    parts: list[str] = []
    i = 0
    while i < len(flat):
        for name in by_length:
            end = i + len(name)
            if flat.startswith(name, i) and (end == len(flat) or flat[end] == "_"):
                break
        else:
            end = flat.find("_", i)
            end = len(flat) if end < 0 else end
        parts.append(flat[i:end])
        i = end + 1
    return ".".join(parts)


def component_of(module: str) -> str:
    return module.split(".", 1)[0]


def components(modules: Iterable[str]) -> list[str]:
    """The components ``modules`` adapt, in pipeline order."""
    seen = {component_of(m) for m in modules}
    return [c for c in COMPONENTS if c in seen]


#: Cross-attention width (the in-features of a UNet ``attn2.to_k``) of each family's text conditioning.
CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def detect_family(in_features: Mapping[str, int]) -> tuple[str, str]:
    """(family, why) from module paths and their input widths: ``sdxl``, ``sd1``, ``sd2`` or ``unknown``.

    Evidence, in order (docs/diffusion.md, "Model family"): a second text encoder or the added-conditioning
    embedding (SDXL only); the cross-attention width of ``attn2.to_k``/``to_v``; the UNet's layout (SDXL
    has no attention in its first down block and stacks several transformer blocks per attention; SD 1.x/2.x
    have attention in the first down block and one transformer block each)."""
    modules = list(in_features)
    if any(component_of(m) == "transformer" for m in modules):
        from .flux_names import is_flux_module

        if any(is_flux_module(m) for m in modules):
            return "flux", "FLUX.1 transformer layers are adapted"
        return "unknown", "a transformer is adapted, but no layer of it is one of FLUX.1's"
    if any(component_of(m) == "text_encoder_2" for m in modules):
        return "sdxl", "a second text encoder is adapted"
    if any(m.startswith("unet.add_embedding.") for m in modules):
        return "sdxl", "the added-conditioning embedding (add_embedding) is adapted"
    widths = {w for m, w in in_features.items()
              if m.startswith("unet.") and (m.endswith(".attn2.to_k") or m.endswith(".attn2.to_v"))}
    known = {CROSS_ATTENTION_WIDTH[w] for w in widths if w in CROSS_ATTENTION_WIDTH}
    if len(known) == 1 and len(widths) == 1:
        family = known.pop()
        return family, f"cross-attention width {widths.pop()}"
    unet = [m for m in modules if m.startswith("unet.")]
    if any(".transformer_blocks." in m and not m.split(".transformer_blocks.", 1)[1].startswith("0.")
           for m in unet):
        return "sdxl", "several transformer blocks per attention"
    if any(m.startswith("unet.down_blocks.0.attentions.") for m in unet):
        return "sd1", "attention in the first down block, one transformer block each"
    return "unknown", "no key or shape tells the family"


def mixed_family_problem(in_features: Mapping[str, int]) -> str | None:
    """Why these modules cannot come from one model, or None: two cross-attention widths, or the SDXL-only
    parts beside SD 1.x's layout."""
    widths = sorted({w for m, w in in_features.items()
                     if m.startswith("unet.") and (m.endswith(".attn2.to_k") or m.endswith(".attn2.to_v"))})
    if len(widths) > 1:
        return f"cross-attention layers of widths {widths}: keys of two model families are mixed"
    modules = list(in_features)
    unet = next((m for m in modules if component_of(m) == "unet"), None)
    transformer = next((m for m in modules if component_of(m) == "transformer"), None)
    if unet and transformer:
        return f"{transformer} (Flux) beside {unet} (Stable Diffusion): keys of two model families are mixed"
    sdxl_only = [m for m in modules if component_of(m) == "text_encoder_2" or m.startswith("unet.add_embedding.")]
    sd1_layout = [m for m in modules if m.startswith("unet.down_blocks.0.attentions.")]
    if sdxl_only and sd1_layout:
        return (f"{sdxl_only[0]} (SDXL only) beside {sd1_layout[0]} (SD 1.x/2.x only): keys of two model "
                "families are mixed")
    return encoder_problem(in_features, widths[0] if widths else None, bool(sdxl_only))


#: Text-encoder modules whose input is the encoder's hidden width.
HIDDEN_INPUTS = (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj", ".mlp.fc1")


def encoder_problem(in_features: Mapping[str, int], cross: int | None, sdxl: bool) -> str | None:
    """Why the text-encoder modules cannot belong to the encoders this LoRA's UNet reads, or None: one encoder's
    modules of two hidden widths; the first encoder wider than the second (SDXL's CLIP-L is narrower than its
    OpenCLIP bigG: the prefixes are swapped); widths that do not make the UNet's cross-attention width (SD 1.x:
    the encoder's own; SDXL: both encoders' side by side) (docs/diffusion.md, "Model family")."""
    hidden: dict[str, set[int]] = {}
    for module, width in in_features.items():
        component = component_of(module)
        if component in ("text_encoder", "text_encoder_2") and module.endswith(HIDDEN_INPUTS):
            hidden.setdefault(component, set()).add(width)
    for component, found in sorted(hidden.items()):
        if len(found) > 1:
            return f"{component} modules of hidden widths {sorted(found)}: keys of two text encoders are mixed"
    te1 = next(iter(hidden.get("text_encoder", ())), None)
    te2 = next(iter(hidden.get("text_encoder_2", ())), None)
    if te1 is not None and te2 is not None:
        if te1 >= te2:
            return (f"text_encoder (width {te1}) is not narrower than text_encoder_2 (width {te2}): the LoRA's "
                    "two text-encoder prefixes name each other's encoder")
        if cross is not None and te1 + te2 != cross:
            return (f"text encoders of widths {te1} and {te2} do not feed the UNet's cross-attention width {cross}: "
                    "a text-encoder LoRA for another model")
    elif te1 is not None and cross is not None and not sdxl and te1 > cross:
        return (f"text_encoder of width {te1} is wider than the UNet's cross-attention width {cross}: a "
                "text-encoder LoRA for another model")
    return None
