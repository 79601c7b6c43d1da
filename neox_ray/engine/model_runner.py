"""Runs one step on one rank: builds the packed batch and attention metadata, runs the model, samples.

Owns the model, the paged KV cache tensor (one preallocated tensor, a view per attention layer), the
persistent input buffers (block tables kept across steps) and the sampler. It receives plain
:class:`StepInput` data and returns :class:`StepOutput`; it never decides what to run (scheduler) and
knows nothing of Ray (a Ray worker simply hosts one of these per rank).

Logits are only computed for the rows that need them: the last row of each sequence that samples, and
the rows whose next token is known when logprobs are asked for (scoring, prompt logprobs), in bounded
chunks so long documents never materialize full-vocabulary logits for all their tokens at once.
"""

from __future__ import annotations

import logging

import torch

from neox_ray.config import ModelConfig
from neox_ray.distributed import tp_rank, tp_world_size
from neox_ray.engine.cpu_tuning import keep_freed_memory_for_reuse
from neox_ray.engine.engine_config import EngineConfig, check_int8_device
from neox_ray.engine.input_buffers import InputBuffers
from neox_ray.engine.sampler import Sampler
from neox_ray.engine.step import StepInput, StepOutput, TokenLogprobs
from neox_ray.kernels import cpu_paged_attention, cpu_sampling
from neox_ray.layers import cpu_int8
from neox_ray.layers.attention import AttentionMetadata, resolve_backend
from neox_ray.layers.cpu_gemm import packing_supported
from neox_ray.loader import load_model, resolve_dtype

logger = logging.getLogger(__name__)

# Rows of full-vocab logits materialized at once for scoring. 256 rows of a 50k vocabulary are 51 MB of float32:
# 1024 (206 MB) cost a fresh mapping and ~50k page faults per chunk on the first pass; scoring.py's first pass on
# the 2-core Zen 4 box: 17.1-17.2 s at 1024, 15.6-15.8 s at 256 (the LM head runs as fast at 256 rows).
LOGPROB_CHUNK_ROWS = 256


# CPU default KV cache when neither num_kv_blocks nor kv_cache_memory is given: room for every sequence at
# max_model_len, capped at this many tokens, at this many bytes (vLLM's CPU backend also defaults to 4 GiB)
# and at this share of the memory still available after the weights are loaded. 128k tokens of pythia-1b in
# fp32 would be 34 GiB; and since the CPU cache's pages are only mapped as they are written, engines that
# share a machine (replicas of a batch job) do not see each other's caches at load, so a fixed cap keeps
# the sum of theirs predictable.
CPU_DEFAULT_CACHE_TOKENS = 1 << 17
CPU_DEFAULT_CACHE_BYTES = 4 << 30
CPU_DEFAULT_CACHE_MEMORY_SHARE = 0.5


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_int8_runs(device: torch.device, dtype: torch.dtype) -> None:
    """``quantization="int8"`` once ``auto`` device and dtype are resolved: one-line ValueErrors, before loading."""
    check_int8_device(str(device))
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"quantization int8 takes dtype float32 or bfloat16 activations, not {dtype}")
    if not cpu_int8.int8_supported(dtype):
        raise ValueError(cpu_int8.UNSUPPORTED_MESSAGE)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(requested)


class ModelRunner:
    def __init__(self, config: EngineConfig, max_model_len: int, model_config: ModelConfig | None = None):
        self.config = config
        self.max_model_len = max_model_len
        self.model_config = model_config or ModelConfig.from_pretrained(config.model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        if config.int8:
            check_int8_runs(self.device, self.dtype)
        self.kv_cache_dtype = torch.int8 if config.kv_cache_dtype == "int8" else self.dtype
        self.attention_backend = resolve_backend(config.attention_backend, self.device, config.block_size)
        self.model = load_model(config.model, self.model_config, self.dtype, self.device,
                                self.attention_backend, config.allow_pickle)
        self.decode_path = "grouped"  # GPU without flash-attn (flash-attn ignores it)
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()
            if config.int8:
                self.model.pack_weights_for_cpu(quantize_int8=True)
            elif packing_supported(self.dtype):
                self.model.pack_weights_for_cpu()
            use_kernel = (self.attention_backend == "sdpa"
                          and cpu_paged_attention.available(self.dtype, self.kv_cache_dtype))
            self.decode_path = "kernel" if use_kernel else "views"
        self.sampler = Sampler(config.seed)
        self.inputs = InputBuffers(config.block_size)
        self.num_kv_blocks = self._decide_num_blocks()
        self._allocate_kv_cache(self.num_kv_blocks)

    # ---- KV cache ------------------------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        mc = self.model_config
        local_heads = mc.num_attention_heads // tp_world_size()
        element = torch.tensor([], dtype=self.kv_cache_dtype).element_size()
        row_bytes = mc.head_dim * element + (4 if self.kv_cache_dtype == torch.int8 else 0)  # + a float32 scale
        return 2 * mc.num_hidden_layers * self.config.block_size * local_heads * row_bytes

    def _decide_num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_memory is not None:
            budget = cfg.kv_cache_memory
        elif self.device.type == "cuda":  # pragma: no cover - needs a GPU
            budget = self._profile_gpu_budget()
        else:
            tokens = min(cfg.max_num_seqs * self.max_model_len, CPU_DEFAULT_CACHE_TOKENS)
            wanted = -(-tokens // cfg.block_size) * self.kv_bytes_per_block
            available = available_memory_bytes()
            caps = [CPU_DEFAULT_CACHE_BYTES] + ([int(available * CPU_DEFAULT_CACHE_MEMORY_SHARE)] if available else [])
            budget = min([wanted, *caps])
            if budget < wanted:
                limit = ("half of the memory available" if available and budget < CPU_DEFAULT_CACHE_BYTES
                         else f"the CPU default of {CPU_DEFAULT_CACHE_BYTES / 2**30:.0f} GiB")
                logger.info("KV cache: %.2f GiB (%s), room for %d tokens; kv_cache_memory or num_kv_blocks sets it",
                            budget / 2**30, limit, budget // self.kv_bytes_per_block * cfg.block_size)
        blocks = budget // self.kv_bytes_per_block
        if blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of {self.kv_bytes_per_block} bytes")
        return int(blocks)

    def _profile_gpu_budget(self) -> int:  # pragma: no cover - needs a GPU
        """Runs the largest step once without a cache, then gives the KV cache what is left of
        gpu_memory_utilization of the card."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = self.config.max_num_batched_tokens
        meta = AttentionMetadata.for_plain_forward([tokens], self.device)
        with torch.no_grad():
            ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
            hidden = self.model(ids, torch.arange(tokens, device=self.device), meta)
            self.model.compute_logits(hidden[-256:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        return int(total * self.config.gpu_memory_utilization - peak)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        local_heads = mc.num_attention_heads // tp_world_size()
        # (layers, k/v, blocks, block_size, heads, head_dim): one tensor, one view per layer.
        shape = (mc.num_hidden_layers, 2, num_blocks, self.config.block_size, local_heads, mc.head_dim)
        # On CPU left unwritten: both CPU decode paths and prefill read only slots this sequence wrote, so the
        # cache needs no zeros, and the kernel maps its pages in as they are first written. Zero-filling it at
        # load took 13 s (2.5M page faults) and 10 GB of resident memory for pythia-160m's default 128k-token
        # fp32 cache on the 2-core dev VM, before any request. The GPU's padded gather reads past a context's
        # end (masked, but garbage could be NaN), so there it is zeroed.
        zeroed = not (self.device.type == "cpu" and self.decode_path in ("kernel", "views"))

        def allocate(size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return (torch.zeros if zeroed else torch.empty)(size, dtype=dtype, device=self.device)

        self.kv_cache = allocate(shape, self.kv_cache_dtype)
        # An int8 cache keeps a float32 scale per (slot, head) of keys and of values.
        self.kv_scales = allocate(shape[:-1], torch.float32) if self.kv_cache_dtype == torch.int8 else None
        for i, attention in enumerate(self.model.attention_layers):
            attention.kv_cache = self.kv_cache[i]
            attention.kv_scales = None if self.kv_scales is None else self.kv_scales[i]

    # ---- one step ------------------------------------------------------------------------------------
    def execute(self, step: StepInput) -> StepOutput:
        """One step. The engine may call it from its forward-pass thread (async_scheduling), where the CUDA
        device is not inherited, hence the guard."""
        if self.device.type == "cuda":  # pragma: no cover - needs a GPU
            with torch.cuda.device(self.device):
                return self._execute(step)
        return self._execute(step)

    @torch.no_grad()
    def _execute(self, step: StepInput) -> StepOutput:
        device = self.device
        arrays = self.inputs.prepare(step)
        starts = arrays.query_start_loc
        meta = AttentionMetadata(
            query_start_loc=starts, context_lens=arrays.context_lens,
            slot_mapping=arrays.slot_mapping.to(device), block_tables=arrays.block_tables.to(device)).to(
                device, self.config.block_size, self.decode_path, num_cache_blocks=self.num_kv_blocks)
        hidden = self.model(arrays.input_ids.to(device), arrays.positions.to(device), meta)

        output = StepOutput()
        sampling_rows = [(i, s.seq_id, s.sampling) for i, s in enumerate(step.sequences) if s.sampling is not None]
        if sampling_rows:
            last_rows = torch.tensor([starts[i + 1] - 1 for i, _, _ in sampling_rows], device=device)
            logits = self.model.compute_logits(hidden[last_rows])
            if tp_rank() == 0:
                results = self.sampler(logits, [sampling for _, _, sampling in sampling_rows])
                output.samples = {seq_id: r for (_, seq_id, _), r in zip(sampling_rows, results, strict=True)}
        # Sequences asking for the same number of top alternatives share one pass over their rows, in chunks
        # of LOGPROB_CHUNK_ROWS: fewer, same-sized LM-head calls than one per sequence (a scoring step packs
        # several windows), so the heap is not fragmented by logits buffers of every size.
        by_top_k: dict[int, list[tuple[int, int]]] = {}
        for i, seq in enumerate(step.sequences):
            if seq.logprob_targets:
                by_top_k.setdefault(seq.num_top_logprobs, []).append((i, starts[i] + seq.first_logprob_row))
        for top_k, members in by_top_k.items():
            targets = [t for i, _ in members for t in step.sequences[i].logprob_targets]
            slices = [hidden[first: first + len(step.sequences[i].logprob_targets)] for i, first in members]
            rows = slices[0] if len(slices) == 1 else torch.cat(slices)
            combined = self._target_logprobs(rows, targets, top_k)
            if tp_rank() != 0:
                continue
            offset = 0
            for i, _ in members:
                seq = step.sequences[i]
                end = offset + len(seq.logprob_targets)
                output.prompt_logprobs[seq.seq_id] = TokenLogprobs(
                    combined.logprobs[offset:end],
                    None if combined.top_logprobs is None else combined.top_logprobs[offset:end])
                offset = end
        return output

    def _target_logprobs(self, hidden_rows: torch.Tensor, targets: list[int], top_k: int) -> TokenLogprobs:
        target_tensor = torch.tensor(targets, dtype=torch.long, device=hidden_rows.device)
        logprobs: list[float] = []
        top: list[list[tuple[int, float]]] | None = [] if top_k > 0 else None
        for start in range(0, len(targets), LOGPROB_CHUNK_ROWS):
            chunk = slice(start, start + LOGPROB_CHUNK_ROWS)
            logits = self.model.compute_logits(hidden_rows[chunk])
            if top_k <= 1 and cpu_sampling.applies(logits):  # no (rows, vocab) log-softmax is written
                log_normalizer = cpu_sampling.logsumexp(logits).unsqueeze(1)
                chosen = logits.gather(1, target_tensor[chunk].unsqueeze(1)) - log_normalizer
                logprobs.extend(chosen.squeeze(1).tolist())
                if top is not None:  # the top-1 alternative (loglikelihood's "is it the argmax")
                    best = cpu_sampling.argmax(logits).unsqueeze(1)
                    best_logprob = logits.gather(1, best) - log_normalizer
                    top.extend([(token, value)] for token, value in zip(best.squeeze(1).tolist(),
                                                                        best_logprob.squeeze(1).tolist(), strict=True))
                continue
            log_softmax = torch.log_softmax(logits, dim=-1)
            logprobs.extend(log_softmax.gather(1, target_tensor[chunk].unsqueeze(1)).squeeze(1).tolist())
            if top is not None:
                values, ids = log_softmax.topk(top_k, dim=-1)
                top.extend(list(zip(r_ids, r_vals, strict=True))
                           for r_ids, r_vals in zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprobs(logprobs, top)

