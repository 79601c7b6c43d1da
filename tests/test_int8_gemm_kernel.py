"""The int8 GEMM for decode-sized batches (``kernels/cpu_int8_gemm.c``), each version this CPU runs (AMX tiles,
AVX512-VNNI), against the exact int8 product and against oneDNN's int8 matmul, its weight layout, and where it
steps aside. A version the CPU lacks is skipped (the Zen 4 CI machine runs the VNNI one); without either every
int8 linear runs on oneDNN, which ``tests/test_int8.py`` covers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neox_ray.kernels import cpu_int8_gemm
from neox_ray.layers import cpu_int8

needs_kernel = pytest.mark.skipif(not cpu_int8_gemm.available(), reason="no AMX or AVX512-VNNI here (or no C compiler)")


def backend_param(name: str):
    return pytest.param(name, marks=pytest.mark.skipif(not cpu_int8_gemm.available(name), reason=f"no {name} here"))


BACKENDS = [backend_param(name) for name in cpu_int8_gemm.BACKENDS]


def problem(rows: int, in_features: int, out_features: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    x = torch.randn(rows, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    return weight, x, bias


def exact(quantized_x: torch.Tensor, scale: float, zero_point: int, quantized_w: torch.Tensor,
          w_scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The int8 linear's arithmetic in float64: integer sums are exact there."""
    sums = (quantized_x.double() - zero_point) @ quantized_w.double().T
    out = sums * scale * w_scales.double()
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 48, 64])
@pytest.mark.parametrize("in_features,out_features", [(64, 16), (128, 32), (768, 48), (512, 2048)])
@pytest.mark.parametrize("output_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_equals_the_exact_int8_product(backend: str, rows: int, in_features: int, out_features: int,
                                              output_dtype: torch.dtype, with_bias: bool) -> None:
    """Row counts that fill and leave partial row tiles (AMX: 16 rows; VNNI: 8), output blocks of 1, 2 and 3
    16-channel blocks (VNNI's column groups) and 2048 channels (42 groups of 3 and one of 2)."""
    weight, x, bias = problem(rows, in_features, out_features, seed=rows)
    quantized_w, w_scales = cpu_int8.quantize_weight(weight)
    packed = cpu_int8_gemm.pack(quantized_w, w_scales)
    assert packed is not None
    quantized_x, scale, zero_point = cpu_int8.quantize_activation(x)
    got = cpu_int8_gemm.multiply(quantized_x, scale, zero_point, packed, bias if with_bias else None, output_dtype,
                                 backend=backend)
    assert got is not None and got.dtype == output_dtype and got.shape == (rows, out_features)
    want = exact(quantized_x, scale, zero_point, quantized_w, w_scales, bias if with_bias else None)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if output_dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    torch.testing.assert_close(got.double(), want, **tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output_dtype", [torch.float32, torch.bfloat16])
def test_fused_gelu_equals_the_erf_gelu_of_the_exact_product(backend: str, output_dtype: torch.dtype) -> None:
    weight, x, bias = problem(48, 512, 2048, seed=7)
    x = x * 3  # pre-activations well into both tails of the GELU
    quantized_w, w_scales = cpu_int8.quantize_weight(weight)
    packed = cpu_int8_gemm.pack(quantized_w, w_scales)
    assert packed is not None
    quantized_x, scale, zero_point = cpu_int8.quantize_activation(x)
    got = cpu_int8_gemm.multiply(quantized_x, scale, zero_point, packed, bias, output_dtype, gelu=True,
                                 backend=backend)
    assert got is not None
    want = torch.nn.functional.gelu(exact(quantized_x, scale, zero_point, quantized_w, w_scales, bias))
    tolerance = {"atol": 2e-6, "rtol": 1e-5} if output_dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    torch.testing.assert_close(got.double(), want, **tolerance)


@needs_kernel
def test_packed_tiles_hold_every_weight_where_tdpbusd_reads_it() -> None:
    """Tile (block, slice), row r, bytes 4c..4c+3 = inputs 64*slice + 4r .. +3 of channel 16*block + c (read in
    order, 64 bytes at a time, the same bytes are VPDPBUSD's four inputs of 16 channels)."""
    out_features, in_features = 32, 128
    quantized = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    packed = cpu_int8_gemm.pack(quantized, torch.ones(out_features))
    assert packed is not None
    tiles = packed.tiles.view(out_features // 16, in_features // 64, 16, 16, 4)  # block, slice, row, column, byte
    unpacked = tiles.permute(0, 3, 1, 2, 4).reshape(out_features, in_features)
    assert torch.equal(unpacked, quantized)
    assert torch.equal(packed.column_sums, quantized.int().sum(dim=1, dtype=torch.int32))


@needs_kernel
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_int8_linear_takes_the_kernel_like_onednn(activation: str | None, monkeypatch) -> None:
    """int8_linear runs the kernel for decode batches (AMX: up to 64 rows, oneDNN beyond; VNNI: every batch, and
    the layer keeps no oneDNN copy of its weights); a oneDNN-only weight gives the same outputs (to float
    rounding) and the activation is applied either way."""
    weight, x, bias = problem(300, 512, 2048)
    packed = cpu_int8.pack_int8_weight(weight)
    assert packed.tiles is not None
    assert (packed.packed is None) == cpu_int8_gemm.takes_every_batch()
    onednn = cpu_int8.pack_int8_weight(weight, kernel=False)
    assert onednn.tiles is None and onednn.packed is not None
    calls = []
    multiply = cpu_int8_gemm.multiply
    monkeypatch.setattr(cpu_int8_gemm, "multiply", lambda *args, **kwargs: calls.append(args[0].shape[0])
                        or multiply(*args, **kwargs))
    for rows in (1, 48, 300):
        got = cpu_int8.int8_linear(x[:rows], packed, bias, activation)
        want = cpu_int8.int8_linear(x[:rows], onednn, bias, activation)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert calls == ([1, 48, 300] if cpu_int8_gemm.takes_every_batch() else [1, 48])
    three_d = cpu_int8.int8_linear(x[:48].view(6, 8, 512), packed, bias, activation)
    torch.testing.assert_close(three_d.view(48, 2048), cpu_int8.int8_linear(x[:48], packed, bias, activation))


@pytest.mark.parametrize("backend", [backend_param("vnni")])
@pytest.mark.parametrize("rows", [65, 256, 300, 513])
@pytest.mark.parametrize("output_dtype", [torch.float32, torch.bfloat16])
def test_vnni_takes_prefill_batches_exactly(backend: str, rows: int, output_dtype: torch.dtype) -> None:
    """Past 64 rows (prefill) and across its 256-row chunks the VNNI version is still the exact int8 product."""
    weight, x, bias = problem(rows, 768, 2304, seed=rows)
    quantized_w, w_scales = cpu_int8.quantize_weight(weight)
    packed = cpu_int8_gemm.pack(quantized_w, w_scales)
    assert packed is not None
    quantized_x, scale, zero_point = cpu_int8.quantize_activation(x)
    got = cpu_int8_gemm.multiply(quantized_x, scale, zero_point, packed, bias, output_dtype, backend=backend)
    assert got is not None
    want = exact(quantized_x, scale, zero_point, quantized_w, w_scales, bias)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if output_dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    torch.testing.assert_close(got.double(), want, **tolerance)


def test_the_kernel_steps_aside_for_shapes_it_does_not_take() -> None:
    weight = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    assert cpu_int8_gemm.pack(weight, torch.ones(24)) is None  # 24 output channels: not a multiple of 16
    assert not cpu_int8_gemm.applies(100, 16)
    if cpu_int8_gemm.available():
        packed = cpu_int8_gemm.pack(torch.zeros(16, 64, dtype=torch.int8), torch.ones(16))
        assert packed is not None
        too_many = torch.zeros(cpu_int8_gemm.MAX_ROWS + 1, 64, dtype=torch.uint8)
        if cpu_int8_gemm.available("amx"):  # AMX stops at 64 rows; VNNI takes any number
            assert cpu_int8_gemm.multiply(too_many, 1.0, 0, packed, None, torch.float32, backend="amx") is None
        assert cpu_int8_gemm.multiply(too_many[:, :32], 1.0, 0, packed, None, torch.float32) is None  # in != 64
        missing = [name for name in cpu_int8_gemm.BACKENDS if not cpu_int8_gemm.available(name)]
        rows = torch.zeros(4, 64, dtype=torch.uint8)
        for name in missing:  # a version this CPU lacks is refused, not run
            assert cpu_int8_gemm.multiply(rows, 1.0, 0, packed, None, torch.float32, backend=name) is None


@needs_kernel
def test_int8_engine_decodes_through_the_kernel_like_through_onednn(tiny_checkpoint: Path, monkeypatch) -> None:
    from neox_ray import LLM, SamplingParams

    prompts = [[5 + i] * (4 + 9 * i) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    llm = LLM(str(tiny_checkpoint), quantization="int8", max_num_seqs=8)
    assert llm.engine.executor.runner.model.embed_out.int8_weight.tiles is not None
    calls = []
    multiply = cpu_int8_gemm.multiply
    monkeypatch.setattr(cpu_int8_gemm, "multiply",
                        lambda *args, **kwargs: calls.append(1) or multiply(*args, **kwargs))
    ours = llm.generate(prompts, params)
    assert calls  # decode steps went through the kernel
    monkeypatch.setattr(cpu_int8_gemm, "pack", lambda *args, **kwargs: None)  # every linear on oneDNN
    monkeypatch.setattr(cpu_int8_gemm, "multiply", multiply)
    onednn = LLM(str(tiny_checkpoint), quantization="int8", max_num_seqs=8)
    assert onednn.engine.executor.runner.model.embed_out.int8_weight.tiles is None
    theirs = onednn.generate(prompts, params)
    for a, b in zip(ours, theirs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        diffs = [abs(x[t] - y[t]) for x, y, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs,
                                                    a.outputs[0].token_ids, strict=True)]
        assert max(diffs) < 1e-3
