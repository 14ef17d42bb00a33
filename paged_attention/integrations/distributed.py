"""Tensor-parallel serving over `mx.distributed` (design: adr/0012-tensor-parallel.md).

A model sharded with mlx-lm's own `model.shard(group)` holds 1/N of every layer's query and KV
heads on each rank; the Engine then runs unchanged on every rank, each rank's pools holding its
own KV heads only. What this module adds:

- `launched_group()`, `shard(model, group)`, `load(path, group)`: the group `mlx.launch` set up,
  and a model sharded over it (head counts checked before mlx-lm splits anything).
- `TensorParallel`: what the Engine does per step when sharded: an all-gather of a digest of the
  step's plan on the first steps (every rank raises `RankMismatch` on a difference, so none
  waits in a collective), and rank 0's sampled tokens for every rank.
- `fail_fast(group)`: a side channel (TCP to rank 0) and a watchdog, so that a rank that raises
  or dies makes every other rank exit non-zero naming it, instead of waiting in a collective.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time

import numpy as np

import mlx.core as mx

from ..errors import PagedAttentionError


class RankMismatch(PagedAttentionError):
    """Ranks of a tensor-parallel group disagree about a step (their plans differ)."""


class Unshardable(PagedAttentionError, NotImplementedError):
    """The model cannot be split over the group (no `shard`, or heads that do not divide)."""


# -- the group and the model ----------------------------------------------------------------
def launched_group():
    """The group `mlx.launch` (ring, MPI, NCCL) started this process in, or None when it runs
    alone (a group of one)."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def model_group(model):
    """The group a model was sharded over by `model.shard(group)` (None: not sharded)."""
    layers = getattr(model, "layers", None) or []
    for layer in layers:
        proj = getattr(getattr(layer, "self_attn", None), "q_proj", None)
        group = getattr(proj, "group", None)
        if group is not None:
            return group if group.size() > 1 else None
    return None


def check_heads(num_heads: int, num_kv_heads: int, size: int) -> None:
    """Head-parallel sharding gives each rank whole heads: both counts must divide."""
    for name, n in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
        if n % size:
            raise Unshardable(f"model: {name} = {n} does not split over {size} ranks; "
                              "tensor parallelism gives each rank whole heads")


def shard(model, group):
    """Shard `model` in place over `group` with mlx-lm's own `model.shard`; returns it."""
    if not hasattr(model, "shard"):
        raise Unshardable(f"model: {type(model).__module__} has no shard(group) in mlx-lm "
                          "(tensor parallelism exists for llama, qwen2, qwen3, ...)")
    for layer in model.layers:
        a = layer.self_attn
        check_heads(a.n_heads, a.n_kv_heads, group.size())
    model.shard(group)
    mx.eval(model.parameters())
    _tick()
    return model


def load(path: str, group):
    """(model, tokenizer) of a local mlx-lm directory, sharded over `group` by mlx-lm's own
    `sharded_load` (each rank reads only what it keeps)."""
    from mlx_lm.utils import sharded_load
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    heads = cfg.get("num_attention_heads")
    if heads is not None:
        check_heads(heads, cfg.get("num_key_value_heads", heads), group.size())
    out = sharded_load(path, tensor_group=group)
    _tick()
    return out


# -- per-step agreement ---------------------------------------------------------------------
class TensorParallel:
    """The Engine's side of a sharded model: ranks check that they plan alike, and sample alike.

    Every scheduling decision is a function of the requests and of earlier tokens, which are
    the same on every rank; `check_steps` steps of plan digests prove it on the run at hand."""

    def __init__(self, group, *, check_steps: int = 8):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.check_steps = check_steps
        self.checked = 0

    def check_plan(self, step: int, parts) -> None:
        """All-gather a digest of the step's plan (`parts`: arrays and ints); every rank raises
        `RankMismatch` naming the ranks that differ from rank 0."""
        if self.checked >= self.check_steps:
            return
        self.checked += 1
        h = hashlib.blake2b(digest_size=16)
        for p in parts:
            a = np.ascontiguousarray(np.asarray(p))
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
        mine = np.frombuffer(h.digest(), np.int32)
        every = np.array(mx.distributed.all_gather(mx.array(mine)[None], group=self.group,
                                                   stream=mx.cpu)).reshape(self.size, -1)
        _tick()
        differ = [r for r in range(1, self.size) if not np.array_equal(every[r], every[0])]
        if differ:
            raise RankMismatch(
                f"tensor parallel: step {step}: the plan of rank(s) {differ} differs from rank "
                f"0's (this is rank {self.rank}); every rank must see the same requests, "
                "arguments and sampler")

    def agree(self, tokens: list[int]) -> list[int]:
        """Rank 0's sampled tokens, on every rank (a sampler's random state need not match)."""
        mine = np.asarray(tokens, np.int32) if self.rank == 0 else np.zeros(len(tokens), np.int32)
        out = mx.distributed.all_sum(mx.array(mine), group=self.group, stream=mx.cpu).tolist()
        _tick()
        return out


# -- faults: a side channel to rank 0 and a watchdog ----------------------------------------
_GUARD: "_Guard | None" = None


def _tick() -> None:
    """A collective finished: the watchdog's proof of progress."""
    if _GUARD is not None:
        _GUARD.last = time.monotonic()


def rank0_host() -> str:
    """Where rank 0 listens for the side channel: its ring hostfile address, NCCL's host, or
    this machine (MPI launches name no address; they are assumed local)."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile):
        try:
            with open(hostfile) as f:
                hosts = json.load(f)
            return str(hosts[0][0]).rsplit(":", 1)[0]
        except (ValueError, IndexError, KeyError, TypeError):
            pass
    return os.environ.get("NCCL_HOST_IP", "127.0.0.1")


class _Guard:
    def __init__(self, group, timeout_s: float, grace_s: float, out):
        self.rank, self.size = group.rank(), group.size()
        self.timeout_s, self.grace_s, self.out = timeout_s, grace_s, out
        self.last = time.monotonic()
        self.peers: dict[int, socket.socket] = {}     # rank 0: rank -> connection
        self.up: socket.socket | None = None          # ranks > 0: the connection to rank 0
        self.closing = False
        self.lock = threading.Lock()
        listener = None
        port = 0
        if self.rank == 0:
            listener = socket.create_server(("", 0))
            port = listener.getsockname()[1]
        # The group is healthy here: one collective tells every rank the port.
        port = int(mx.distributed.all_sum(mx.array([port], mx.int32), group=group,
                                          stream=mx.cpu).item())
        if self.rank == 0:
            listener.settimeout(max(timeout_s, 30.0))
            try:
                for _ in range(self.size - 1):
                    conn, _ = listener.accept()
                    r = int(conn.recv(16).split(b"\n", 1)[0])
                    self.peers[r] = conn
            finally:
                listener.close()
            for r, conn in self.peers.items():
                threading.Thread(target=self._read, args=(conn, r), daemon=True).start()
        else:
            self.up = socket.create_connection((rank0_host(), port), timeout=max(timeout_s, 30.0))
            self.up.settimeout(None)
            self.up.sendall(f"{self.rank}\n".encode())
            threading.Thread(target=self._read, args=(self.up, 0), daemon=True).start()
        if timeout_s:
            threading.Thread(target=self._watch, daemon=True).start()

    def _exit(self, message: str) -> None:
        print(f"paged-attn: error: rank {self.rank}: {message}", file=self.out, flush=True)
        os._exit(1)

    def _send(self, conns, line: str) -> None:
        for c in conns:
            with contextlib.suppress(OSError):
                c.sendall(line.encode())

    def _read(self, conn: socket.socket, peer: int) -> None:
        buf = b""
        while True:
            try:
                chunk = conn.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                if self.closing:
                    return
                who, what = peer, "exited without a word (killed or crashed)"
                break
            buf += chunk
            if b"\n" not in buf:
                continue
            line, buf = buf.split(b"\n", 1)
            kind, _, rest = line.decode(errors="replace").partition(" ")
            if kind == "BYE":
                return
            if kind == "FAIL":
                who_s, _, what = rest.partition(" ")
                who = int(who_s)
                break
        if self.rank == 0:   # relay to every other rank before going
            self._send([c for r, c in self.peers.items() if r != who],
                       f"FAIL {who} {what}\n")
        self._exit(f"stopping: rank {who} failed: {what}")

    def _watch(self) -> None:
        while not self.closing:
            time.sleep(min(1.0, self.timeout_s / 4))
            idle = time.monotonic() - self.last
            if idle > self.timeout_s and not self.closing:
                self._send(list(self.peers.values()) + ([self.up] if self.up else []),
                           f"FAIL {self.rank} no collective finished in {idle:.0f} s "
                           "(a peer stuck?)\n")
                self._exit(f"stopping: no collective finished in {idle:.0f} s (timeout "
                           f"{self.timeout_s:.0f} s): a peer rank is stuck or gone")

    def failed(self, exc: BaseException) -> None:
        # A peer's failure may surface here first as the backend's own error (ring: 'connection
        # to a peer was lost'): give the side channel a moment to name the rank that went.
        time.sleep(self.grace_s)
        what = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        self.closing = True
        self._send(list(self.peers.values()) + ([self.up] if self.up else []),
                   f"FAIL {self.rank} {what}\n")

    def finished(self, group) -> None:
        # Nobody leaves before everybody is done: a rank failing later is still heard.
        mx.eval(mx.distributed.all_sum(mx.array([1], mx.int32), group=group, stream=mx.cpu))
        self.closing = True
        self._send(list(self.peers.values()) + ([self.up] if self.up else []), "BYE\n")
        for c in list(self.peers.values()) + ([self.up] if self.up else []):
            with contextlib.suppress(OSError):
                c.close()


@contextlib.contextmanager
def fail_fast(group, *, timeout_s: float = 300.0, grace_s: float = 1.0, out=None):
    """Within: a rank that raises tells every other rank (which prints the rank and its error
    and exits 1) and re-raises; a rank that dies is noticed by its closed connection; no
    collective finishing in `timeout_s` seconds (0: no watchdog) ends the rank too.

    Ranks reach rank 0 over TCP at `rank0_host()` on a port rank 0 picks and shares through
    one collective on entry; on a clean exit every rank meets in one more before leaving."""
    global _GUARD
    if group is None or group.size() < 2:
        yield None
        return
    guard = _Guard(group, timeout_s, grace_s, out or sys.stderr)
    _GUARD = guard
    try:
        yield guard
    except BaseException as exc:
        guard.failed(exc)
        print(f"paged-attn: error: rank {guard.rank} failed: {type(exc).__name__}: {exc}",
              file=guard.out, flush=True)
        raise
    else:
        guard.finished(group)
    finally:
        _GUARD = None
