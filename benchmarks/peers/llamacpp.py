"""llama.cpp as a peer: ``llama-server`` with continuous batching over GGUF files of the same checkpoint.

:func:`prepare` builds ``llama-server`` once from the llama.cpp source vendored in the ``llama-cpp-python``
sdist (``pip download``, then CMake: ``GGML_NATIVE=ON``, no curl, no OpenSSL, no web UI, only the server
target; ~10+ minutes on 2 cores) and converts a checkpoint directory to GGUF with that tree's
``convert_hf_to_gguf.py`` (f32, bf16 or q8_0; run in the peers' virtual environment, with the tree's own
``gguf-py``). Everything is cached under ``<bench cache>/llama.cpp/``: ``source/``, ``build/bin/llama-server``
and ``gguf/<checkpoint>-<type>.gguf``; a step is redone only when its output is missing (or the checkpoint is
newer than its GGUF file).

:func:`run` starts the server (``-t``/``-tb`` threads, 16 slots sharing one unified KV cache sized for 16 of
the workload's longest requests, no RAM prompt cache), sends one warm-up request, then every job at once to
``/completion`` with the prompt as token ids (no BOS is added to a token-id prompt), greedy (``top_k`` 1,
temperature 0), ``n_predict`` = ``max_tokens``, ``ignore_eos`` and no prompt caching; the server queues what
its slots cannot take yet. It checks that every reply evaluated exactly the prompt's tokens and returned
exactly ``max_tokens`` tokens, reads the server's peak RSS, and stops it. The KV cache keeps llama.cpp's default
type (f16) at every weight precision, as llama.cpp users run it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from peers import PeerRun, PeerUnavailable, cache_root, peer_python, process_peak_rss_mib, run_logged

SDIST = "llama-cpp-python==0.3.36"
PRECISIONS = ("f32", "bf16", "q8_0")
SLOTS = 16


def _root() -> Path:
    return cache_root() / "llama.cpp"


def _source() -> Path:
    """The vendored llama.cpp tree, unpacked from the sdist (downloaded with pip on first use)."""
    source = _root() / "source"
    if (source / "CMakeLists.txt").exists():
        return source
    download = _root() / "download"
    download.mkdir(parents=True, exist_ok=True)
    if not list(download.glob("llama_cpp_python-*.tar.gz")):
        print(f"  llama.cpp: pip download {SDIST} (sdist, ~75 MB)", flush=True)
        run_logged([sys.executable, "-m", "pip", "download", SDIST, "--no-binary", ":all:", "--no-deps",
                    "-d", str(download)], _root() / "logs" / "download.log", f"pip download {SDIST}")
    archive = sorted(download.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tempfile.TemporaryDirectory(dir=_root()) as scratch, tarfile.open(archive) as sdist:
        prefix = archive.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
        members = [member for member in sdist.getmembers() if member.name.startswith(prefix)]
        if not members:
            raise PeerUnavailable(f"{archive.name} has no vendor/llama.cpp")
        sdist.extractall(scratch, members=members, filter="data")
        shutil.rmtree(source, ignore_errors=True)
        Path(scratch, prefix).rename(source)
    return source


def server_binary() -> Path:
    """``llama-server``, built on first use."""
    binary = _root() / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise PeerUnavailable(f"building llama-server needs {tool}, which is not on PATH")
    source = _source()
    build = _root() / "build"
    jobs = str(os.cpu_count() or 2)
    print(f"  llama.cpp: building llama-server in {build} (first run only: ~10+ minutes on 2 cores)", flush=True)
    start = time.perf_counter()
    run_logged(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"],
               _root() / "logs" / "configure.log", "configuring llama.cpp")
    run_logged(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs],
               _root() / "logs" / "build.log", "building llama-server")
    print(f"  llama.cpp: built in {time.perf_counter() - start:.0f} s", flush=True)
    return binary


def gguf_file(model_dir: Path, precision: str) -> Path:
    """The checkpoint converted to GGUF at ``precision`` (f32, bf16 or q8_0), converted on first use."""
    if precision not in PRECISIONS:
        raise ValueError(f"llama.cpp precision must be one of {PRECISIONS}, got {precision!r}")
    target = _root() / "gguf" / f"{model_dir.name}-{precision}.gguf"
    weights = model_dir / "model.safetensors"
    if target.exists() and (not weights.exists() or target.stat().st_mtime >= weights.stat().st_mtime):
        return target
    source = _source()
    python = peer_python()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    environment = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    print(f"  llama.cpp: converting {model_dir.name} to {precision} GGUF", flush=True)
    run_logged([str(python), str(source / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", precision,
                "--outfile", str(partial)], _root() / "logs" / f"convert-{target.stem}.log",
               f"convert_hf_to_gguf.py --outtype {precision}", env=environment)
    partial.rename(target)
    return target


def prepare(model_dir: Path, precisions: tuple[str, ...] = PRECISIONS) -> None:
    server_binary()
    for precision in precisions:
        gguf_file(model_dir, precision)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class _CrashedLoading(RuntimeError):
    pass


def _start_server(command: list[str], base: str, log: Path, timeout: float = 300.0) -> subprocess.Popen:
    """Starts ``llama-server`` and waits until it answers /health; a server that dies while loading raises
    :class:`_CrashedLoading`."""
    with log.open("w") as server_log:
        server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise _CrashedLoading(f"llama-server exited with {server.returncode} while loading; see {log}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    _stop(server)
    raise RuntimeError(f"llama-server did not become healthy in {timeout:.0f} s; see {log}")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def run(model_dir: Path, jobs: list[tuple[list[int], int]], threads: int, precision: str, passes: int = 1) -> PeerRun:
    """Generates ``jobs`` (prompt token ids, max_tokens) greedily through ``llama-server``, ``passes`` times."""
    binary, model = server_binary(), gguf_file(model_dir, precision)
    longest = max(len(prompt) + max_tokens for prompt, max_tokens in jobs)
    context = SLOTS * (-(-longest // 256) * 256)  # every slot can hold the longest request at once
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = _root() / "logs" / f"server-{model.stem}.log"
    command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(threads), "-tb", str(threads), "-np", str(SLOTS), "-c", str(context), "--kv-unified",
               "--cont-batching", "--cache-ram", "0", "--no-webui"]
    notes = [f"{SLOTS} slots", f"context {context}", model.name]
    try:
        server = _start_server(command, base, log)
    except _CrashedLoading as crash:
        # ggml's AMX int8 path (chosen by weight repacking on CPUs with AMX) segfaults in the warm-up of
        # this build on the 2-core Xeon VM (q8_0; like ggml-org/llama.cpp#20824); without repacking the
        # plain AVX-512 kernels run.
        print(f"  {crash}; retrying with --no-repack", flush=True)
        server = _start_server([*command, "--no-repack"], base, log)
        notes.append("--no-repack (the repacked AMX path crashed)")
    try:

        def complete(prompt: list[int], max_tokens: int) -> dict:
            return _post(base + "/completion", {
                "prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                "cache_prompt": False, "return_tokens": True, "stream": False}, timeout=3600)

        complete([11] * 16, 4)  # warm-up
        seconds = []
        for _ in range(passes):
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                replies = list(pool.map(lambda job: complete(*job), jobs))
            seconds.append(time.perf_counter() - start)
        peak = process_peak_rss_mib(server.pid)
    finally:
        _stop(server)
    for index, ((prompt, max_tokens), reply) in enumerate(zip(jobs, replies, strict=True)):
        if reply["tokens_evaluated"] != len(prompt):
            raise RuntimeError(f"job {index}: llama-server evaluated {reply['tokens_evaluated']} prompt tokens, "
                               f"the prompt has {len(prompt)}")
        if reply["tokens_predicted"] != max_tokens or len(reply["tokens"]) != max_tokens:
            raise RuntimeError(f"job {index}: llama-server returned {reply['tokens_predicted']} tokens "
                               f"({len(reply['tokens'])} listed), {max_tokens} were requested")
    tokens = sum(reply["tokens_predicted"] for reply in replies)
    return PeerRun(tokens, seconds, peak, ", ".join(notes))
