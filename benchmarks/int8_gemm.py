"""int8 GEMM candidates for the CPU engine on Pythia's linear shapes, as ratios to the fp32 packed path.

Per shape (``--hidden`` 512 = pythia-70m, 768 = pythia-160m; QKV 3H x H, dense H x H, MLP up 4H x H and
down H x 4H summed as one layer; the LM head 50304 x H alone) and per row count M, the best time of:

- ``fp32``: the engine's path today, oneDNN with a packed fp32 weight (:mod:`neox_ray.layers.cpu_gemm`);
- ``bf16``: the same with a packed bf16 weight and bf16 activations;
- ``qlinear``: the engine's int8 path (:func:`neox_ray.layers.cpu_int8.int8_linear`): our int8 kernel where
  the CPU runs it (:mod:`neox_ray.kernels.cpu_int8_gemm`; AMX: up to 64 rows, VNNI: every row count), else
  ``onednn::qlinear_pointwise`` (inductor's x86 int8 path), int8 weight prepacked with per-channel scales,
  the activation quantized per tensor to uint8 (the C quantizer when it builds; the cost included), output
  fp32; ``qlinear-bf16`` takes and returns bf16 activations; ``qlinear-onednn`` is oneDNN alone;
- ``int_mm``: ``torch._int_mm`` int8 x int8 -> int32 with a per-token activation scale, dequantized after;
- ``dynamic``: ``quantized::linear_dynamic`` (torch.ao dynamic quantization, per-tensor uint8 activation);
- ``w8``: ``torch._weight_int8pack_mm`` (int8 weight only, fp32 activations; M <= 16 only, it is far slower).

Also the activation-quantization cost alone (per tensor: the engine's quantizer and torch's fused
``quantize_per_tensor_dynamic``; per token with torch ops) and, on a random Pythia-like
activation with a few outlier channels, the relative error of per-tensor vs per-token activation scales.
Quick timings: a handful of repeats each; on a shared machine read the ratios, not the absolute numbers.

    python benchmarks/int8_gemm.py                     # hidden 768, M = 1 16 64 256 2048
    python benchmarks/int8_gemm.py --hidden 512 --rows 1 64
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neox_ray.engine.cpu_tuning import keep_freed_memory_for_reuse  # noqa: E402
from neox_ray.layers.cpu_gemm import pack_weight, packed_linear  # noqa: E402
from neox_ray.layers.cpu_int8 import int8_linear, pack_int8_weight, quantize_activation  # noqa: E402

VOCAB = 50304


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls: on a shared machine the minimum is the steadiest statistic."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def torch_quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Asymmetric uint8 over [min, max] with torch's fused op (what the engine falls back to)."""
    quantized = torch.quantize_per_tensor_dynamic(x.float(), torch.quint8, False)
    return quantized.int_repr(), quantized.q_scale(), quantized.q_zero_point()


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-8) / 127
    return torch.round(x / scales).clamp_(-127, 127).to(torch.int8), scales


def candidates(weight: torch.Tensor, bias: torch.Tensor, rows: int) -> dict[str, Callable[[torch.Tensor], object]]:
    """name -> fn(fp32 activation); every int8 candidate quantizes the activation inside the call."""
    out_features = weight.shape[0]
    qweight, scales = quantize_weight(weight)
    packed32 = pack_weight(weight)
    packed16 = pack_weight(weight.bfloat16())
    bias16 = bias.bfloat16()
    engine_weight = pack_int8_weight(weight)
    onednn_weight = pack_int8_weight(weight, kernel=False)
    zero_points = torch.zeros(out_features, dtype=torch.int64)
    qweight_t = qweight.t().contiguous()
    torch.backends.quantized.engine = "x86"
    ao_weight = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
    dynamic_packed = torch.ops.quantized.linear_prepack(ao_weight, bias)

    def int_mm(x: torch.Tensor) -> torch.Tensor:
        qx, x_scales = quantize_per_token(x)
        return torch._int_mm(qx, qweight_t) * (x_scales * scales) + bias

    return {
        "fp32": lambda x: packed_linear(x, packed32, bias),
        "bf16": lambda x: packed_linear(x, packed16, bias16),
        "qlinear": lambda x: int8_linear(x, engine_weight, bias),
        "qlinear-bf16": lambda x: int8_linear(x, engine_weight, bias16),
        "qlinear-onednn": lambda x: int8_linear(x, onednn_weight, bias),
        "int_mm": int_mm,
        "dynamic": lambda x: torch.ops.quantized.linear_dynamic(x, dynamic_packed, False),
        "w8": lambda x: torch._weight_int8pack_mm(x, qweight, scales) + bias,
    }


def time_shapes(shapes: list[tuple[int, int]], rows: int, repeats: int) -> dict[str, float]:
    """Summed best seconds per candidate over ``shapes`` ((out, in) each), M = ``rows``."""
    totals: dict[str, float] = {}
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        bias = torch.randn(out_features, generator=generator) * 0.02
        x = torch.randn(rows, in_features, generator=generator)
        x16 = x.bfloat16()
        for name, fn in candidates(weight, bias, rows).items():
            if name == "w8" and rows > 16:
                continue
            arg = x16 if name in ("bf16", "qlinear-bf16") else x
            totals[name] = totals.get(name, 0.0) + best_seconds(lambda fn=fn, arg=arg: fn(arg), repeats)
    return totals


def print_row(label: str, totals: dict[str, float]) -> None:
    base = totals["fp32"]
    cells = "  ".join(f"{name} {1e3 * t:7.2f} ms ({base / t:4.2f}x)" for name, t in totals.items())
    print(f"{label:<22} {cells}", flush=True)


def activation_error(hidden: int, rows: int) -> None:
    """Relative error of x W^T with the activation quantized per tensor vs per token (weights exact), on an
    activation with Pythia-like outlier channels (a few channels ~20x larger than the rest)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, hidden, generator=generator)
    x[:, torch.randperm(hidden, generator=generator)[:4]] *= 20
    x *= torch.rand(rows, 1, generator=generator) * 4 + 0.1  # tokens of different scale
    weight = torch.randn(4 * hidden, hidden, generator=generator) * 0.02
    want = F.linear(x, weight)
    qx, scale, zero_point = quantize_activation(x)
    per_tensor = F.linear((qx.float() - zero_point) * scale, weight)
    qx_t, scales = quantize_per_token(x)
    per_token = F.linear(qx_t.float() * scales, weight)
    for label, got in (("per-tensor", per_tensor), ("per-token", per_token)):
        print(f"  activation {label:<10}: relative error {float((got - want).norm() / want.norm()):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 2048])
    parser.add_argument("--head-max-rows", type=int, default=256, help="skip the LM head above this many rows")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory_for_reuse()  # as the engine does: fresh 50 MB logits would otherwise page-fault every call
    h = args.hidden
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, hidden {h}")
    layer = [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h)]
    for rows in args.rows:
        print_row(f"layer M={rows}", time_shapes(layer, rows, args.repeats))
        if rows <= args.head_max_rows:
            print_row(f"lm head M={rows}", time_shapes([(VOCAB, h)], rows, args.repeats))
    for rows in args.rows:
        x = torch.randn(rows, h)
        cost_engine = best_seconds(lambda x=x: quantize_activation(x), args.repeats)
        cost_torch = best_seconds(lambda x=x: torch_quantize_per_tensor(x), args.repeats)
        cost_token = best_seconds(lambda x=x: quantize_per_token(x), args.repeats)
        print(f"quantize {rows} x {h}: per-tensor engine {1e6 * cost_engine:.0f} us, torch fused "
              f"{1e6 * cost_torch:.0f} us; per-token torch ops {1e6 * cost_token:.0f} us")
    activation_error(h, 64)


if __name__ == "__main__":
    main()
