"""``quantization="int8"`` on CPU: the int8 GEMM against ``F.linear``, the int8 model against fp32, every surface
that takes the option, every combination it refuses, and what happens when torch lacks the int8 op.

Tolerances: int8 weights (per output channel) and uint8 activations (per tensor) round each factor to ~1/250
of its range, so one linear's output is off by ~1% (relative norm); two tiny layers plus the LM head measure
about 2-2.6% on every variant here (fp32 or bf16 activations). The bounds are 5%: double what we see, and
still far below what a wrong scale, layout or transposition gives (O(100%)). Greedy tokens are not compared:
a random tiny model's top logits are often closer together than int8's error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from checkpoints import VARIANTS
from test_cpu_kernels import linear_problem
from test_model import LENGTHS, packed_logits, random_batch

from neox_ray.engine.engine_config import EngineConfig, flag_fields
from neox_ray.engine.model_runner import check_int8_runs
from neox_ray.engine.schema import SettingsError
from neox_ray.kernels import cpu_quantize
from neox_ray.layers import cpu_int8
from neox_ray.loader import load_model

needs_int8 = pytest.mark.skipif(not cpu_int8.int8_supported(torch.float32),
                                reason="this torch build or CPU has no oneDNN int8 linear")
TOLERANCE = 0.05


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return cpu_int8.relative_error(got, want)


# ---- the GEMM ---------------------------------------------------------------------------------------------
@needs_int8
@pytest.mark.parametrize("activation", [None, *cpu_int8.FUSED_ACTIVATIONS, "quick_gelu"])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_int8_linear_is_close_to_f_linear(activation: str | None, rows: int) -> None:
    weight, bias, x, want = linear_problem(rows, activation)
    packed = cpu_int8.pack_int8_weight(weight)
    assert relative(cpu_int8.int8_linear(x, packed, bias, activation), want) < 0.02
    assert relative(cpu_int8.int8_linear(x, packed, None), F.linear(x, weight)) < 0.02
    out16 = cpu_int8.int8_linear(x.bfloat16(), packed, bias.bfloat16(), activation)
    assert out16.dtype == torch.bfloat16 and relative(out16, want) < 0.03


def test_weight_quantization_is_per_output_channel_and_symmetric() -> None:
    weight = torch.tensor([[1.0, -2.0, 0.5], [100.0, 0.0, -50.0]])
    quantized, scales = cpu_int8.quantize_weight(weight)
    assert quantized.dtype == torch.int8
    torch.testing.assert_close(scales, torch.tensor([2.0, 100.0]) / 127)
    assert quantized[:, :2].tolist() == [[64, -127], [127, 0]]  # each row's largest magnitude maps to 127
    torch.testing.assert_close(quantized.float() * scales[:, None], weight, atol=0.4, rtol=0.0)


def test_activation_quantization_keeps_zero_exact_and_both_quantizers_agree(monkeypatch) -> None:
    x = torch.tensor([[-1.0, 0.0, 0.25, 3.0], [0.5, -0.75, 2.0, 1.0]])
    values, scale, zero_point = cpu_int8.quantize_activation(x)
    assert values.dtype == torch.uint8 and values[0, 1] == zero_point
    torch.testing.assert_close((values.float() - zero_point) * scale, x, atol=scale / 2 + 1e-6, rtol=0.0)
    plain = cpu_int8._quantize_plain(x)
    assert torch.equal(plain[0], values) and plain[1:] == pytest.approx((scale, zero_point))
    positive = cpu_int8._quantize_plain(torch.tensor([[2.0, 4.0]]))
    assert positive[2] == 0 and positive[0].tolist() == [[128, 255]]  # the range always includes 0


# ---- the model --------------------------------------------------------------------------------------------
@needs_int8
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int8_model_logits_stay_close_to_fp32(variant_dirs, variant: str) -> None:
    reference_model = load_model(variant_dirs[variant], dtype="float32")
    sequences = random_batch(LENGTHS, reference_model.config.vocab_size)
    reference = packed_logits(reference_model, sequences)
    model = load_model(variant_dirs[variant], dtype="float32")
    model.pack_weights_for_cpu(quantize_int8=True)
    assert relative(packed_logits(model, sequences), reference) < TOLERANCE
    # The float weights are released: only the int8 copies remain (a tied head keeps the embedding's).
    layer = model.gpt_neox.layers[0]
    assert layer.attention.query_key_value.weight.numel() == 0 and layer.mlp.dense_4h_to_h.weight.numel() == 0
    assert layer.mlp.dense_h_to_4h.int8_weight is not None and model.embed_out.int8_weight is not None
    assert model.embed_out.weight.numel() == (0 if not model.config.tie_word_embeddings
                                              else model.config.vocab_size * model.config.hidden_size)


@needs_int8
def test_int8_with_bfloat16_activations_stays_close_to_fp32(variant_dirs) -> None:
    if not cpu_int8.int8_supported(torch.bfloat16):
        pytest.skip("no bfloat16 int8 linear here")
    reference_model = load_model(variant_dirs["pythia"], dtype="float32")
    sequences = random_batch(LENGTHS, reference_model.config.vocab_size)
    model = load_model(variant_dirs["pythia"], dtype="bfloat16")
    model.pack_weights_for_cpu(quantize_int8=True)
    assert relative(packed_logits(model, sequences), packed_logits(reference_model, sequences)) < TOLERANCE


@needs_int8
def test_llm_with_int8_generates_and_scores_close_to_fp32(tiny_checkpoint: Path) -> None:
    from neox_ray import LLM, SamplingParams

    prompts = [[5 + i] * (4 + 9 * i) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, prompt_logprobs=0)
    results = {}
    for quantization in (None, "int8"):
        llm = LLM(str(tiny_checkpoint), quantization=quantization, max_num_seqs=4)
        embed_out = llm.engine.executor.runner.model.embed_out
        assert (embed_out.int8_weight is not None) == (quantization == "int8")
        results[quantization] = llm.generate(prompts, params)
    for prompt, full, quantized in zip(prompts, results[None], results["int8"], strict=True):
        assert len(quantized.outputs[0].token_ids) == 5
        want = torch.tensor([entry[t] for entry, t in zip(full.prompt_logprobs[1:], prompt[1:], strict=True)])
        got = torch.tensor([entry[t] for entry, t in zip(quantized.prompt_logprobs[1:], prompt[1:], strict=True)])
        assert (got - want).abs().max() < 0.3  # logprobs ~-6 here; 2% logit error moves them by < 0.1


# ---- surfaces ---------------------------------------------------------------------------------------------
def test_every_surface_takes_the_option(tmp_path: Path) -> None:
    from neox_ray.batch import cli as batch_cli
    from neox_ray.batch.config import load_job_config, validate_job_config
    from neox_ray.serve.cli import add_parser, resolve_config
    from neox_ray.serve.deployment import ServeArgs

    assert "quantization" in {spec.name for spec in flag_fields()}
    assert EngineConfig.from_kwargs("/m").quantization is None
    assert EngineConfig.from_kwargs("/m", quantization="int8").int8
    assert not EngineConfig.from_kwargs("/m", quantization="none").int8
    # neox-ray generate / score: the flag lands in the job's engine mapping
    for build in (batch_cli.build_generate_parser, batch_cli.build_score_parser):
        args = build(argparse.ArgumentParser()).parse_args(["--quantization", "int8"])
        assert args.quantization == "int8"
    path = tmp_path / "job.yaml"
    path.write_text("model: /m\ninput: /in\noutput: /out\nengine: {quantization: int8, dtype: bfloat16}\n")
    assert load_job_config("generate", path).engine_config.quantization == "int8"
    (tmp_path / "plain.yaml").write_text("model: /m\ninput: /in\noutput: /out\n")
    args = batch_cli.build_generate_parser(argparse.ArgumentParser()).parse_args(
        ["--config", str(tmp_path / "plain.yaml"), "--quantization", "int8"])
    config = load_job_config("generate", args.config, batch_cli.overrides_from_args("generate", args))
    assert config.engine_config.int8
    assert validate_job_config("score", {"model": "/m", "input": "/in", "output": "/out",
                                         "engine": {"quantization": "int8"}}).engine_config.int8
    # neox-ray serve: flag -> the application's args.engine, validated by ServeArgs
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    engine = resolve_config(parser.parse_args(["serve", "--model", "/m", "--quantization", "int8"])
                            )["applications"][0]["args"]["engine"]
    assert engine == {"quantization": "int8"}
    assert ServeArgs(model="/m", engine=engine).engine_config().int8
    with pytest.raises(SystemExit):  # choices come from the Literal type
        parser.parse_args(["serve", "--quantization", "int4"])


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "cuda"}, "quantization int8 runs on CPU only for now (device is 'cuda'); use device=cpu"),
    ({"device": "cuda:1"}, "quantization int8 runs on CPU only for now (device is 'cuda:1'); use device=cpu"),
    ({"dtype": "float16"}, "quantization int8 takes dtype float32 or bfloat16 activations, not float16"),
    ({"dtype": "fp16"}, "quantization int8 takes dtype float32 or bfloat16 activations, not fp16"),
])
def test_invalid_combinations_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        EngineConfig.from_kwargs("/m", quantization="int8", **kwargs)
    assert str(excinfo.value) == message
    EngineConfig.from_kwargs("/m", **kwargs)  # fine without int8


def test_unknown_quantization_names_the_field() -> None:
    with pytest.raises(SettingsError, match=r"^quantization must be one of 'none' or 'int8', got 'int4'$"):
        EngineConfig.from_kwargs("/m", quantization="int4")


def test_bad_combinations_fail_in_serve_args_and_batch_configs() -> None:
    from neox_ray.batch.config import JobConfigError, validate_job_config
    from neox_ray.serve.deployment import ServeArgs

    with pytest.raises(ValueError, match="runs on CPU only"):
        ServeArgs(model="/m", engine={"quantization": "int8", "device": "cuda"})
    with pytest.raises(JobConfigError, match="not float16"):
        validate_job_config("generate", {"model": "/m", "input": "/in", "output": "/out",
                                         "engine": {"quantization": "int8", "dtype": "float16"}})


def test_resolved_device_and_dtype_are_checked_before_loading(monkeypatch) -> None:
    """``device=auto`` on a GPU machine, or a dtype only known after ``auto``: refused by the model runner."""
    with pytest.raises(ValueError, match=r"runs on CPU only for now \(device is 'cuda:0'\)"):
        check_int8_runs(torch.device("cuda", 0), torch.float32)
    with pytest.raises(ValueError, match="not torch.float16"):
        check_int8_runs(torch.device("cpu"), torch.float16)
    monkeypatch.setattr(cpu_int8, "int8_supported", lambda dtype: False)
    with pytest.raises(ValueError) as excinfo:
        check_int8_runs(torch.device("cpu"), torch.float32)
    assert str(excinfo.value) == cpu_int8.UNSUPPORTED_MESSAGE and "\n" not in cpu_int8.UNSUPPORTED_MESSAGE


def test_llm_refuses_int8_when_torch_lacks_the_op(tiny_checkpoint: Path, monkeypatch) -> None:
    from neox_ray import LLM

    def missing(weight: torch.Tensor) -> cpu_int8.Int8Weight:
        raise AttributeError("'_OpNamespace' 'onednn' object has no attribute 'qlinear_prepack'")

    monkeypatch.setattr(cpu_int8, "pack_int8_weight", missing)
    cpu_int8.int8_supported.cache_clear()
    try:
        assert cpu_int8.int8_supported(torch.float32) is False
        with pytest.raises(ValueError, match="quantization int8 needs torch's oneDNN int8 linear"):
            LLM(str(tiny_checkpoint), quantization="int8")
    finally:
        monkeypatch.undo()
        cpu_int8.int8_supported.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 48), (300, 96), (0, 8)])
def test_quantizer_kernel_gives_the_plain_ops_values(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    if not cpu_quantize.available(dtype):
        pytest.skip("the CPU quantizer kernel did not build here (no C compiler)")
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 3 + 0.5).to(dtype)
    got, want = cpu_quantize.quantize(x), cpu_int8._quantize_plain(x)
    assert got is not None and torch.equal(got[0], want[0]) and got[1:] == pytest.approx(want[1:], rel=1e-12)


def test_without_the_kernel_or_torchs_fused_quantizer_plain_ops_quantize(monkeypatch) -> None:
    def missing(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        raise RuntimeError("quantize_per_tensor_dynamic was removed")

    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    want = cpu_int8._quantize_plain(x)
    monkeypatch.setenv("NEOX_RAY_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_int8, "_quantize_fused", missing)
    cpu_quantize._library.cache_clear()
    cpu_int8._fused_quantizer_works.cache_clear()
    try:
        assert cpu_quantize.quantize(x) is None and not cpu_int8._fused_quantizer_works()
        got = cpu_int8.quantize_activation(x)
        assert torch.equal(got[0], want[0]) and got[1:] == pytest.approx(want[1:])
    finally:
        monkeypatch.undo()
        cpu_quantize._library.cache_clear()
        cpu_int8._fused_quantizer_works.cache_clear()


# ---- tensor parallelism -----------------------------------------------------------------------------------
@needs_int8
def test_sharded_linears_quantize_each_ranks_slice_per_output_channel() -> None:
    """Column-parallel ranks hold whole output channels (their scales equal the full weight's); row-parallel
    ranks hold a slice of every channel's inputs and scale it by its own max: still per output channel, and
    the summed partial products stay as close to the full product as one int8 GEMM is."""
    from neox_ray import distributed
    from neox_ray.layers.linear import ColumnParallelLinear, RowParallelLinear

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=generator), torch.randn(96, generator=generator)
    x = torch.randn(9, 64, generator=generator)
    full_scales = cpu_int8.quantize_weight(weight)[1]
    column_outputs, row_partials = [], []
    try:
        for rank in range(2):
            distributed._STATE.rank, distributed._STATE.world_size = rank, 2
            column = ColumnParallelLinear(64, 96)
            column.weight.data, column.bias.data = weight[rank * 48:(rank + 1) * 48], bias[rank * 48:(rank + 1) * 48]
            column.quantize_for_cpu()
            assert column.int8_weight is not None
            torch.testing.assert_close(column.int8_weight.scales, full_scales[rank * 48:(rank + 1) * 48])
            column_outputs.append(column(x))
            row = RowParallelLinear(64, 96, reduce_results=False)
            row.weight.data, row.bias.data = weight[:, rank * 32:(rank + 1) * 32], bias
            row.quantize_for_cpu()
            row_partials.append(row(x[:, rank * 32:(rank + 1) * 32]))  # the bias comes from rank 0 only
    finally:
        distributed._STATE.rank, distributed._STATE.world_size = 0, 1
    want = F.linear(x, weight, bias)
    assert relative(torch.cat(column_outputs, dim=-1), want) < 0.02
    assert relative(row_partials[0] + row_partials[1], want) < 0.02


@pytest.mark.ray
@pytest.mark.slow
@needs_int8
def test_int8_under_tensor_parallelism_stays_close_to_fp32(ray_session, tiny_checkpoint: Path) -> None:
    from neox_ray import LLM, SamplingParams

    prompts = [[5 + i] * (4 + 9 * i) for i in range(3)]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    reference = LLM(str(tiny_checkpoint), block_size=4).generate(prompts, params)
    llm = LLM(str(tiny_checkpoint), quantization="int8", tensor_parallel_size=2, block_size=4,
              worker_num_cpus=0.25, placement_timeout_s=30)
    try:
        for prompt, ours, ref in zip(prompts, llm.generate(prompts, params), reference, strict=True):
            diffs = [abs(a[t] - b[t]) for a, b, t in zip(ours.prompt_logprobs[1:], ref.prompt_logprobs[1:],
                                                        prompt[1:], strict=True)]
            assert max(diffs) < 0.3
    finally:
        llm.shutdown()
