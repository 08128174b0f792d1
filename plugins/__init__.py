"""adaptools' built-in plugins, installed as the ``adaptools_plugins`` package (this folder is mapped to
that name in pyproject.toml).

Each subpackage is one family, registered with pluggy as one plugin under its own name
(``adaptools_plugins.lora``...), and written exactly as a third-party plugin would be: it imports only the
public plugin API (:mod:`adaptools.plugin`) and, where it builds on another family, that family's modules.
A family's ``__init__`` holds its hook implementations and imports its modules only when a hook is
called, so loading the plugins costs a few small imports (docs/plugins.md, "Where a new family goes").

=============  ==================================================================================
family         what it adds
=============  ==================================================================================
peft           the PEFT adapter folder format, and what every PEFT method shares: module matching,
               the common lint rules, locating base tensors, runtime hooks, the additive-delta base
lora           LoRA in every PEFT variant, with AdaLoRA (SVD form) and VeRA (shared projections);
               the ``init`` and ``extract`` commands
lycoris        LoHa and LoKr (PEFT's LyCORIS methods)
orthogonal     OFT and BOFT (multiplicative orthogonal updates)
prompt         prefix tuning, prompt tuning and P-tuning (virtual tokens; runtime only)
adapterhub     bottleneck adapters and the AdapterHub folder format
diffusion      image-model LoRAs (SD 1.x, SDXL): the kohya and diffusers key styles as formats
schema         the canonical schema file (one ``.safetensors``)
gguf           GGUF LoRA adapters, GGUF models as merge bases, GGUF files as merge outputs
dense          plain fp32/fp16/bf16 weights
bitsandbytes   4-bit (NF4/FP4) and 8-bit (LLM.int8) weights, byte-exact
fp8            fine-grained FP8 weights (float8_e4m3fn + block scales), byte-exact
compressed_tensors
               compressed-tensors (llm-compressor / vLLM): packed int, fp8, int8 and NVFP4 weights
mxfp4          MXFP4 expert weights (gpt-oss: FP4 e2m1 + e8m0 scales), decode only
awq            AWQ GEMM weights (4-bit, zero points, fp16 group scales): AutoAWQ's decode bit for bit,
               ``--requantize`` onto the stored grid
gptq           GPTQ weights (AutoGPTQ / GPTQModel: 2/3/4/8-bit codes, group scales, g_idx): GPTQModel's
               decode bit for bit, ``--requantize`` onto the stored grid
validators     the ``perplexity``, ``logits`` and ``generate`` checks and the ``eval`` command
=============  ==================================================================================
"""

#: The families, in the order they are registered (it decides the order of listings, never a lookup).
FAMILIES = ("lora", "lycoris", "orthogonal", "prompt", "adapterhub", "diffusion", "peft", "schema", "gguf",
            "dense", "bitsandbytes", "fp8", "compressed_tensors", "mxfp4", "awq", "gptq",
            "validators")
