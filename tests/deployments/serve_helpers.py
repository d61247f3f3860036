"""Helpers for tests that start Ray Serve: tiny model directories and Ray settings for a loaded 2-core box."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

# On a busy 2-core machine the HTTP proxy can take longer than Serve's 5 s readiness check to come up.
RAY_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def save_tiny_pair(root: Path, tokenizer_dir: str) -> tuple[str, str]:
    """A tiny random Qwen2 target and a draft that mostly agrees with it, saved with the real tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from ..conftest import perturbed_copy

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         max_position_embeddings=512, tie_word_embeddings=False)
    target = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)
    draft = perturbed_copy(target, 0.2, 1)
    paths = []
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths[0], paths[1]


def apply_ray_env() -> None:
    os.environ.update(RAY_ENV)


# Ray's workers take ports 10002-19999 by default; below that sit Ray's fixed ports (6379, 8265, 10001).
_FIRST_FREE_PORT = 20000


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands out for bind(0) and outgoing connections (Linux's default where unreadable)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port nothing listens on now, so a developer's `make serve` on 8000 or another test's server is
    never the one a test talks to.

    It lies between Ray's worker ports and the kernel's ephemeral range: a port the OS picked for bind(0)
    is free only until the OS picks it again, and `serve run` starts a dozen processes that bind port 0
    and connect out before its proxy binds, so one of them took it in CI ("Failed to bind to address")."""
    low, high = _FIRST_FREE_PORT, ephemeral_port_range()[0]
    if high - low < 100:  # a kernel whose ephemeral range starts low: no safe band, let the OS choose
        low, high = 0, 1
    for port in random.sample(range(low, high), min(200, high - low)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free TCP port in [{low}, {high})")


@contextlib.contextmanager
def ray_temp_root() -> Iterator[str]:
    """A fresh, short Ray temp root (Ray's socket paths have a length limit), set as RAY_TMPDIR for this
    process and its children, and removed afterwards, on failure too.

    RAY_TMPDIR, not only `temp_dir`: `ray.cluster_utils.Cluster` writes the head's address under the default
    temp root (`$RAY_TMPDIR/ray`, else `/tmp/ray`) whatever `temp_dir` says, and a machine that never ran
    Ray has no `/tmp/ray`."""
    root = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    os.makedirs(os.path.join(root, "ray"))
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = root
    try:
        yield root
    finally:
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(root, ignore_errors=True)
