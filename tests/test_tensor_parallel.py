"""Tensor parallelism on CPU (gloo): TP=2/4 shard groups on Ray against TP=1, load-time slices, failures."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from checkpoints import build_hf_checkpoint
from safetensors.torch import load_file

from neox_ray import LLM, SamplingParams

TP_OPTIONS = dict(block_size=4, worker_num_cpus=0.25, placement_timeout_s=30)


@pytest.fixture(scope="module")
def odd_vocab_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # vocab 510 does not split evenly over 4 ranks: the last vocab shard is zero-padded.
    return build_hf_checkpoint(tmp_path_factory.mktemp("tp") / "odd_vocab", vocab_size=510, seed=3)


@pytest.fixture(scope="module")
def reference(odd_vocab_checkpoint: Path):
    return LLM(str(odd_vocab_checkpoint), block_size=4)


def prompts(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 400, (n,), generator=generator).tolist() for n in (5, 23, 40, 11)]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(("tp", "async_scheduling"), [(2, False), (4, False), (2, True)],
                         ids=["tp2", "tp4", "tp2-async_scheduling"])
def test_tensor_parallel_matches_single_rank(ray_session, odd_vocab_checkpoint: Path, reference: LLM, tp: int,
                                             async_scheduling: bool):
    """(With async_scheduling the engine drives the shard group from its forward-pass thread.)"""
    llm = LLM(str(odd_vocab_checkpoint), tensor_parallel_size=tp, async_scheduling=async_scheduling, **TP_OPTIONS)
    try:
        logprob_params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        ours_all, refs = llm.generate(prompts(), logprob_params), reference.generate(prompts(), logprob_params)
        for ours, ref in zip(ours_all, refs, strict=True):
            diffs = [abs(a[t] - b[t]) for a, b, t in zip(ours.prompt_logprobs[1:], ref.prompt_logprobs[1:],
                                                        ours.prompt_token_ids[1:], strict=False)]
            assert max(diffs) < 1e-4
        greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts(1), greedy)] == \
               [o.outputs[0].token_ids for o in reference.generate(prompts(1), greedy)]
        seeded = SamplingParams(temperature=0.8, top_k=50, max_tokens=16, seed=5, ignore_eos=True)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts(2), seeded)] == \
               [o.outputs[0].token_ids for o in reference.generate(prompts(2), seeded)]
        ours_scores = llm.score(prompts(3), window=16, stride=8)
        ref_scores = reference.score(prompts(3), window=16, stride=8)
        for a, b in zip(ours_scores, ref_scores, strict=False):
            assert a.num_tokens == b.num_tokens and a.nll == pytest.approx(b.nll, rel=1e-5)
    finally:
        llm.shutdown()


def test_each_rank_loads_only_its_slices(odd_vocab_checkpoint: Path) -> None:
    from neox_ray import distributed
    from neox_ray.loader import load_model

    full = load_file(odd_vocab_checkpoint / "model.safetensors")
    try:
        for rank in range(2):
            distributed._STATE.rank, distributed._STATE.world_size = rank, 2
            model = load_model(odd_vocab_checkpoint)
            params = dict(model.named_parameters())
            qkv = full["gpt_neox.layers.0.attention.query_key_value.weight"]  # (3 * 64, 64), rows per head
            assert torch.equal(params["gpt_neox.layers.0.attention.query_key_value.weight"],
                               qkv[rank * 96:(rank + 1) * 96])  # 2 whole heads of (q, k, v) rows
            assert torch.equal(params["gpt_neox.layers.0.attention.query_key_value.bias"],
                               full["gpt_neox.layers.0.attention.query_key_value.bias"][rank * 96:(rank + 1) * 96])
            dense = full["gpt_neox.layers.0.attention.dense.weight"]
            assert torch.equal(params["gpt_neox.layers.0.attention.dense.weight"], dense[:, rank * 32:(rank + 1) * 32])
            assert torch.equal(params["gpt_neox.layers.0.attention.dense.bias"],
                               full["gpt_neox.layers.0.attention.dense.bias"])  # replicated
            h4 = full["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
            assert torch.equal(params["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"], h4[:, rank * 64:(rank + 1) * 64])
            embed = full["embed_out.weight"]  # 510 rows -> 255 per rank
            assert torch.equal(params["embed_out.weight"], embed[rank * 255:(rank + 1) * 255])
        distributed._STATE.rank, distributed._STATE.world_size = 3, 4  # last of 4 ranks: 128 rows, 126 real
        model = load_model(odd_vocab_checkpoint)
        shard = dict(model.named_parameters())["gpt_neox.embed_in.weight"]
        assert shard.shape == (128, 64)
        assert torch.equal(shard[:126], full["gpt_neox.embed_in.weight"][384:])
        assert torch.count_nonzero(shard[126:]) == 0
    finally:
        distributed._STATE.rank, distributed._STATE.world_size = 0, 1


@pytest.mark.ray
def test_heads_not_divisible_is_a_clear_error(ray_session, odd_vocab_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"):
        LLM(str(odd_vocab_checkpoint), tensor_parallel_size=3, **TP_OPTIONS)


@pytest.mark.ray
def test_more_resources_than_the_cluster_has_fails_fast(ray_session, odd_vocab_checkpoint: Path) -> None:
    from neox_ray.ray.shard_group import ShardGroupError

    start = time.monotonic()
    with pytest.raises(ShardGroupError, match="needs 2 GPU"):
        LLM(str(odd_vocab_checkpoint), tensor_parallel_size=2, block_size=4, worker_num_gpus=1.0)
    with pytest.raises(ShardGroupError, match="needs 400 CPU"):
        LLM(str(odd_vocab_checkpoint), tensor_parallel_size=2, block_size=4, worker_num_cpus=200.0)
    assert time.monotonic() - start < 10


@pytest.mark.ray
@pytest.mark.slow
def test_placement_that_cannot_be_satisfied_now_times_out(ray_session, odd_vocab_checkpoint: Path) -> None:
    from neox_ray.ray.shard_group import ShardGroupError

    total = ray_session.cluster_resources()["CPU"]
    blocker = ray_session.util.placement_group([{"CPU": total - 0.5}])
    ray_session.get(blocker.ready(), timeout=30)
    try:
        start = time.monotonic()
        with pytest.raises(ShardGroupError, match="could not place 2 workers"):
            LLM(str(odd_vocab_checkpoint), tensor_parallel_size=2, block_size=4, worker_num_cpus=0.5,
                placement_timeout_s=3)
        assert time.monotonic() - start < 20
    finally:
        ray_session.util.remove_placement_group(blocker)


@pytest.mark.ray
@pytest.mark.slow
def test_worker_death_mid_generation_fails_promptly_and_group_rebuilds(ray_session, odd_vocab_checkpoint: Path):
    from neox_ray.ray.shard_group import ShardGroupError

    llm = LLM(str(odd_vocab_checkpoint), tensor_parallel_size=2, **TP_OPTIONS)
    victim = llm.engine.executor.workers[1]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            llm.generate([[5] * 8] * 4, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    ray_session.kill(victim)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors and isinstance(errors[0], ShardGroupError), errors
    assert "rank 1 died" in str(errors[0])
    assert time.monotonic() - killed_at < 15
    rebuilt = LLM(str(odd_vocab_checkpoint), tensor_parallel_size=2, **TP_OPTIONS)
    try:
        out = rebuilt.generate([[5] * 8], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        rebuilt.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_shard_group_inside_a_ray_data_actor(ray_session, odd_vocab_checkpoint: Path, reference: LLM,
                                             tmp_path: Path) -> None:
    """A batch job whose engine actors each drive a TP=2 shard group gives LLM's (TP=1) greedy outputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from neox_ray.batch.config import validate_job_config
    from neox_ray.batch.runner import run_job
    from neox_ray.batch.sink import read_output

    rows = prompts(4) + prompts(5)
    pq.write_table(pa.table({"prompt": [" ".join(map(str, p)) for p in rows], "id": [f"r{i}" for i in range(8)]}),
                   tmp_path / "in.parquet")
    config = validate_job_config("generate", {
        "model": str(odd_vocab_checkpoint), "input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"),
        "sampling": {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True},
        "engine": {"device": "cpu", "dtype": "float32", "tensor_parallel_size": 2, "block_size": 4,
                   "worker_num_cpus": 0.25},
        "replicas": {"num_replicas": 1, "num_cpus": 0.25, "batch_size": 4, "max_concurrent_batches": 2},
        "progress_interval_s": 1000.0})
    run_job(config, log=lambda _line: None)
    out = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    texts = [" ".join(map(str, p)) for p in rows]
    expected = reference.generate(texts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert all(out[f"r{i}"]["error"] is None for i in range(8))
    assert [out[f"r{i}"]["generated_text"] for i in range(8)] == [e.outputs[0].text for e in expected]


@pytest.mark.ray
@pytest.mark.slow
def test_shard_group_inside_a_serve_replica(ray_session, odd_vocab_checkpoint: Path, reference: LLM) -> None:
    import json
    import socket
    import urllib.request

    from ray import serve

    from neox_ray.serve.deployment import ServeArgs, build_application

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from ray.serve.context import _get_global_client

    port = _get_global_client().http_config.port  # Serve may already run for another test module
    args = ServeArgs(model=str(odd_vocab_checkpoint), served_model_name="tp2", replica_num_cpus=0.25,
                     engine={"device": "cpu", "dtype": "float32", "tensor_parallel_size": 2, "block_size": 4,
                             "worker_num_cpus": 0.25})
    serve.run(build_application(args), name="neox-tp2", route_prefix="/neox-tp2")
    try:
        body = {"model": "tp2", "prompt": "12 7 301 44", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/neox-tp2/v1/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            text = json.loads(response.read())["choices"][0]["text"]
        expected = reference.generate(["12 7 301 44"], SamplingParams(temperature=0.0, max_tokens=8,
                                                                      ignore_eos=True))[0].outputs[0].text
        assert text == expected
    finally:
        serve.delete("neox-tp2")
