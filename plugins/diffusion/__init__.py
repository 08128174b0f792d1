"""The image-model LoRA family (Stable Diffusion 1.x / SDXL, FLUX.1): the kohya/sd-scripts and diffusers/PEFT key
styles as adapter formats, read into the ``lora`` method (LyCORIS LoHa and LoKr in kohya keys: the ``loha``
and ``lokr`` methods) with each module's component (``unet``, ``text_encoder``, ``text_encoder_2``) in its path
and the model family recorded (docs/diffusion.md). kohya files with LyCORIS' ``dora_scale`` read into the
``lycoris_dora`` method (dora.py), which this family registers.

names.py holds the module-name rules (components, kohya's flattened names, the family); common.py what both
key styles share (factor checks, alpha as a config); lycoris_keys.py what LyCORIS methods in kohya keys add;
kohya.py and diffusers_format.py the two formats; sgm_kohya.py reads kohya SDXL files that name the UNet's
blocks in the original SGM layout, with ldm_names.py's table. FLUX.1: flux_names.py maps BFL's layer names onto
diffusers', flux_read.py reads the styles that use them (kohya's ``lora_unet_double_blocks_…``, BFL/ComfyUI's
``diffusion_model.…`` in flux_format.py, OneTrainer's ``lora_transformer_…``), flux_write.py fuses them back.
Single-file SD 1.x/SDXL checkpoints are merge bases and outputs: ldm_names.py maps their original key naming,
single_file_layout.py says what a file holds under which name, single_file.py opens it (the backend),
single_file_writer.py writes it (the container); flux_single_file.py says what a FLUX.1 single file in BFL's
naming holds, for the same backend and container.
"""

from typing import Any

from adaptools.plugin import hookimpl


@hookimpl
def register_formats(register: Any) -> None:
    from .diffusers_format import DiffusersFormat
    from .flux_format import BflFormat
    from .kohya import KohyaFormat

    register(KohyaFormat())
    register(DiffusersFormat())
    register(BflFormat())


@hookimpl
def register_methods(register: Any) -> None:
    from .dora import LycorisDoRA

    register(LycorisDoRA())


@hookimpl
def register_backends(register: Any) -> None:
    from .single_file import SingleFileBackend

    register(SingleFileBackend())
