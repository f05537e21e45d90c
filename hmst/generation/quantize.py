"""`--quantize int8`: dynamic int8 quantization for CPU inference.

Weights of the attention projections, every expert's SwiGLU (w13, w2) and the tied
output head are stored as int8 (per output channel scales); activations are quantized
on the fly per call (torch's dynamic quantized Linear, fbgemm/x86 kernels). The router
stays fp32 (it reads `gate.weight` directly, and expert choice is sensitive to it), as
do the embedding, norms and RoPE. Decoding at small batch is limited by reading weights
from memory, so 4x smaller weights decode faster; the cost is a small drift of the
logits (tests/test_generation.py bounds it; bench_decode.py --drift measures it).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

QUANTIZE_CHOICES = ("int8",)


def _quantize_dynamic(module: nn.Module, spec) -> nn.Module:
    # torch.ao.quantization is deprecated in favour of torchao (not a dependency here)
    # but still ships in torch 2.13 with its fbgemm CPU kernels; silence only that.
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        if spec is None:
            spec = {nn.Linear: per_channel_dynamic_qconfig}
        return quantize_dynamic(module, spec, dtype=torch.qint8, inplace=True)


def _check_engine():
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm", "qnnpack")):
        raise ValueError(f"no int8 engine on this machine (have {engines})")


@torch.no_grad()
def quantize_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An int8 BaseMoEModel for CPU inference: a copy, or `model` itself converted
    when `inplace`. The reference forward (`model(...)`) still works on it;
    `fast_logits` also uses the int8 head, stored as `int8_head`."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    _check_engine()
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("--quantize int8 runs on CPU only")
    q = (model if inplace else copy.deepcopy(model)).eval().requires_grad_(False)
    spec = {
        name: per_channel_dynamic_qconfig
        for name, mod in q.named_modules()
        if isinstance(mod, nn.Linear)
        and not name.endswith("router.gate")
        and name != "lm_head"
    }
    _quantize_dynamic(q, spec)
    head_w = q.embed.weight if q.config.tie_embeddings else q.lm_head.weight
    head = nn.Linear(head_w.shape[1], head_w.shape[0], bias=False)
    head.weight.data = head_w.detach().contiguous().clone()
    # quantize_dynamic swaps children, never the root: wrap the head to convert it
    q.int8_head = _quantize_dynamic(nn.Sequential(head), None)[0]
    return q
