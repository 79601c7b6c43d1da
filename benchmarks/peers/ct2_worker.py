"""Runs inside the peers' virtual environment: greedy generation of a job list with a CTranslate2 model.

    python ct2_worker.py MODEL_DIR COMPUTE_TYPE THREADS BATCH_SIZE [PASSES] < jobs.json  # [[ids, max_tokens], ...]

Prints one JSON object: generated tokens, the seconds of each of the PASSES (default 1) timed passes, peak RSS
(MiB) of this process. CTranslate2 generates a
batch to one ``max_length``, so jobs are sorted by ``max_tokens`` (longest first) and cut into batches of
``BATCH_SIZE``, each generated to its longest ``max_tokens`` with ``min_length`` equal to it (no early end of
sequence); only the requested tokens count. Prompts go in as the vocabulary's token strings of the same ids.
Imports only ctranslate2 and the standard library: it knows nothing of neox-ray or the comparison.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import ctranslate2


def main() -> None:
    model_dir, compute_type, threads, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    passes = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    jobs: list[tuple[list[int], int]] = [(list(prompt), int(max_tokens)) for prompt, max_tokens in json.load(sys.stdin)]
    generator = ctranslate2.Generator(model_dir, device="cpu", compute_type=compute_type, intra_threads=threads,
                                      inter_threads=1)
    with open(f"{model_dir}/vocabulary.json") as vocabulary_file:
        vocabulary: list[str] = json.load(vocabulary_file)

    def generate(batch: list[tuple[list[int], int]]) -> list[int]:
        longest = max(max_tokens for _, max_tokens in batch)
        results = generator.generate_batch([[vocabulary[token] for token in prompt] for prompt, _ in batch],
                                           max_length=longest, min_length=longest, sampling_topk=1, beam_size=1,
                                           include_prompt_in_result=False)
        return [len(result.sequences_ids[0]) for result in results]

    generate([([11] * 16, 4)])  # warm-up
    order = sorted(range(len(jobs)), key=lambda index: -jobs[index][1])
    produced = [0] * len(jobs)
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            for index, count in zip(batch, generate([jobs[index] for index in batch]), strict=True):
                produced[index] = count
        seconds.append(time.perf_counter() - start)
    short = [index for index, (_, max_tokens) in enumerate(jobs) if produced[index] < max_tokens]
    print(json.dumps({
        "tokens": sum(max_tokens for _, max_tokens in jobs), "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "generated": sum(produced), "short_jobs": short, "compute_type": generator.compute_type,
    }))


if __name__ == "__main__":
    main()
