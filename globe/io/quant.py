"""Quantized checkpoints: FP8 block quantization is dequantized on read, everything else is refused.

Why: DeepSeek-V3, Kimi-K2 and the Qwen3 FP8 releases ship their linear weights as `float8_e4m3fn`
codes W_q (R, C) with `<name>_scale_inv` (ceil(R/br), ceil(C/bc)) fp32, one scale per br x bc block,
and config.json `quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size":
[br, bc], "activation_scheme": "dynamic"}`. The value of an element is its code (as fp32) times its
block's scale_inv: DeepSeek-V3 `inference/kernel.py::weight_dequant` (and
`inference/fp8_cast_bf16.py`, which rounds that product to bf16). Fitting raw codes (|code| <= 448)
would fit garbage, so `Checkpoint` hands every consumer values, never codes. Fused tensors
(E, R, C) carry scales (E, ceil(R/br), ceil(C/bc)).

Any other quant_method (gptq, awq, bitsandbytes, compressed-tensors, mxfp4, ...), FP8 without block
scales, static activation scales, or float8 tensors without a matching FP8 config is refused in one
line, at `Checkpoint` construction, before any weight is read.
"""

from __future__ import annotations

import torch

from ..errors import GlobeError

SCALE_SUFFIX = "_scale_inv"
SUPPORTED = 'FP8 block quantization (quant_method "fp8", fmt "e4m3", weight_block_size, dynamic activations)'
# Tensor-name endings of packed quantized formats (GPTQ/AWQ, compressed-tensors, bitsandbytes, MXFP4).
PACKED_SUFFIXES = (".qweight", ".qzeros", ".g_idx", ".weight_packed", ".weight_scale", ".input_scale",
                   ".absmax", ".SCB", "_blocks")


def fp8_block(qcfg: object, where: str) -> tuple[int, int] | None:
    """(br, bc) of a supported FP8 block-quantization config, None when there is no quantization_config.

    Raises GlobeError naming the quantization for anything else.
    """
    if qcfg is None:
        return None
    if not isinstance(qcfg, dict):
        raise GlobeError(f"{where}: quantization_config in config.json is not an object")
    method = qcfg.get("quant_method")
    if method != "fp8":
        raise GlobeError(f"{where}: quantized checkpoint (quant_method {method!r}) is not supported; "
                         f"GloBE reads fp32/bf16/fp16 weights and {SUPPORTED}")
    fmt = qcfg.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise GlobeError(f"{where}: FP8 format {fmt!r} is not supported (only e4m3)")
    act = qcfg.get("activation_scheme", "dynamic")
    if act != "dynamic":
        raise GlobeError(f"{where}: FP8 activation_scheme {act!r} is not supported (only dynamic)")
    wbs = qcfg.get("weight_block_size")
    if wbs is None:
        raise GlobeError(f"{where}: FP8 without weight_block_size (per-tensor scales) is not supported; "
                         f"supported: {SUPPORTED}")
    if (not isinstance(wbs, list) or len(wbs) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in wbs)):
        raise GlobeError(f"{where}: FP8 weight_block_size must be two positive integers, got {wbs!r}")
    return wbs[0], wbs[1]


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scale_inv of a quantized tensor (..., R, C): (..., ceil(R/br), ceil(C/bc))."""
    *lead, R, C = shape
    return (*lead, -(-R // block[0]), -(-C // block[1]))


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q (..., R, C) float8 codes, scale (..., ceil(R/br), ceil(C/bc)) -> values (..., R, C) in dtype.

    Product in fp32 (DeepSeek-V3 weight_dequant), then one rounding to dtype. Peak memory: about
    two fp32 copies of q (one more when R or C is not a multiple of the block).
    """
    br, bc = block
    *lead, R, C = q.shape
    nr, nc = -(-R // br), -(-C // bc)
    x = q.to(torch.float32)
    if R % br or C % bc:
        x = torch.nn.functional.pad(x, (0, nc * bc - C, 0, nr * br - R))
    x = x.view(*lead, nr, br, nc, bc).mul_(scale.to(torch.float32).reshape(*lead, nr, 1, nc, 1))
    x = x.view(*lead, nr * br, nc * bc)[..., :R, :C]
    return x.to(dtype) if dtype != torch.float32 else x.contiguous()
