"""A decode workload that drives any backend like a serving loop, with a host mirror.

Sequences join, grow one token per step, fork (sharing blocks, so appends copy on write) and
finish, over a fragmented pool. Every K/V write and block copy is applied both to the
backend's pool and to a numpy mirror, so the reference answer is computed from independent
host state. Tests, the soak and experiments all use this one loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import reference
from ..block_manager import BlockManager
from ..host_arrays import from_bf16_bits, to_bf16_bits
from ..interface import PagedAttention

NP_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.float32}


def representable(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to values `dtype` holds exactly, stored in the mirror's numpy dtype.

    numpy has no bfloat16: the mirror holds float32 rounded the way the backends round a
    bfloat16 pool's rows (host_arrays), so it holds exactly what such a pool holds.
    """
    if dtype != "bfloat16":
        return x.astype(NP_DTYPES[dtype])
    return from_bf16_bits(to_bf16_bits(x))


def fragmented_tables(rng: np.random.Generator, lens, block_size: int,
                      spare_blocks: int = 3) -> tuple[int, np.ndarray]:
    """(num_blocks, tables int32 [B, max blocks + 1]) for sequences of `lens` tokens: each one's
    blocks a random, disjoint pick of a pool of their total plus `spare_blocks`, in random
    order; unused entries (and the spare last column) 0. One permutation of the pool is drawn."""
    need = [-(-int(n) // block_size) for n in lens]
    num_blocks = sum(need) + spare_blocks
    perm = rng.permutation(num_blocks)
    tables = np.zeros((len(need), max(need, default=0) + 1), np.int32)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at:at + n]
        at += n
    return num_blocks, tables


def uniform_tables(rng: np.random.Generator, batch: int, context: int,
                   block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tables int32 [B, blocks per sequence], lens int32 [B]) for `batch` sequences at the
    full `context`, over a pool of exactly their blocks in random order (fragmented): the
    decode benches' and `paged-attn tune`'s points."""
    per = -(-context // block_size)
    tables = rng.permutation(batch * per).astype(np.int32).reshape(batch, per)
    return tables, np.full(batch, context, np.int32)


@dataclass
class WorkloadConfig:
    batch: int = 4
    num_kv_heads: int = 2
    group_size: int = 4          # Hq / Hkv
    head_dim: int = 64
    block_size: int = 16
    dtype: str = "float16"
    window: int | None = None
    max_prompt: int = 48         # initial context lengths are drawn from [0, max_prompt]
    max_context: int = 304       # a sequence that reaches this length finishes
    fork_every: int = 37         # every n-th step one sequence forks (shares its blocks)
    finish_every: int = 53       # every n-th step one sequence finishes and a new one joins
    num_blocks: int | None = None
    seed: int = 0
    max_chunk: int = 0           # 0: one token per sequence per step, through decode(); > 0:
                                 # ragged steps through plan/run: new prompts prefill in chunks
                                 # of up to max_chunk tokens beside running decodes, and run()
                                 # writes every step's K/V
    kv_dtype: str | None = None  # a quantized pool (kv_formats): the mirror then holds the
    kv_group_size: int = 64      # reference's dequantized values, what attention must read
    k_scale: float = 1.0
    v_scale: float = 1.0


@dataclass
class StepResult:
    step: int
    out: np.ndarray
    ref: np.ndarray
    rms: float


@dataclass
class DecodeWorkload:
    backend: PagedAttention
    cfg: WorkloadConfig
    path: str = "auto"
    steps_done: int = 0
    history: list = field(default_factory=list)

    def __post_init__(self):
        c = self.cfg
        self.rng = np.random.default_rng(c.seed)
        self.np_dtype = NP_DTYPES[c.dtype]
        # Room for every sequence at max_context, twice over for copy-on-write of forks.
        per_seq = -(-(c.max_context + 1) // c.block_size)
        self.num_blocks = c.num_blocks or 2 * c.batch * per_seq + 16
        self.manager = BlockManager(self.num_blocks, c.block_size, fragmented=True, seed=c.seed)
        self.pool = self.backend.create_pool(self.num_blocks, c.block_size, c.num_kv_heads,
                                             c.head_dim, c.dtype, kv_dtype=c.kv_dtype,
                                             kv_group_size=c.kv_group_size, k_scale=c.k_scale,
                                             v_scale=c.v_scale)
        self.kv_format = self.pool.spec.kv_format
        if self.kv_format is not None:
            self.np_dtype = np.float32
        shape = (self.num_blocks, c.block_size, c.num_kv_heads, c.head_dim)
        self.mirror_k = np.zeros(shape, self.np_dtype)
        self.mirror_v = np.zeros(shape, self.np_dtype)
        self.seqs: list[int] = []
        self.pending: dict[int, int] = {}  # ragged mode: prompt tokens not yet prefilled
        self._next_id = 0
        for _ in range(c.batch):
            self._join()

    # -- pool writes, applied to backend and mirror --------------------------------------------
    def _random_kv(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        shape = (n, c.num_kv_heads, c.head_dim)
        return (representable(self.rng.standard_normal(shape), c.dtype),
                representable(self.rng.standard_normal(shape), c.dtype))

    def _write(self, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        self.backend.write_kv(self.pool, slots, k, v)
        self._mirror(slots, k, v)

    def _mirror(self, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """The mirror holds what the pool must hold: the rows, or (quantized pool) the reference
        arithmetic's dequantized rows."""
        fmt, dt = self.kv_format, self.cfg.dtype
        b, off = np.divmod(slots, self.cfg.block_size)
        if fmt is not None and not self.backend.kv_quantization_exact:
            # The device broke some rounding ties its own way (ADR 0011): the reference attends
            # over what the pool holds (its storage is checked against the reference elsewhere).
            kk, vv = self.pool.to_numpy()
            k, v = kk[b, off], vv[b, off]
        elif fmt is not None:
            k = fmt.dequantize(fmt.quantize(k, dt, "k"), dt, "k")
            v = fmt.dequantize(fmt.quantize(v, dt, "v"), dt, "v")
        self.mirror_k[b, off] = k
        self.mirror_v[b, off] = v

    def _copy(self, copies) -> None:
        if copies:
            self.backend.copy_blocks(self.pool, copies)
            src, dst = np.array(copies).T
            self.mirror_k[dst] = self.mirror_k[src]
            self.mirror_v[dst] = self.mirror_v[src]

    # -- sequence life cycle -------------------------------------------------------------------
    def _join(self, position: int | None = None) -> None:
        sid, self._next_id = self._next_id, self._next_id + 1
        n = int(self.rng.integers(0, self.cfg.max_prompt + 1))
        if self.cfg.max_chunk:
            self.manager.add_sequence(sid, 0)  # its prompt arrives in chunks through run()
            self.pending[sid] = n
        else:
            slots = self.manager.add_sequence(sid, n)
            if n:
                self._write(slots, *self._random_kv(n))
        if position is None:
            self.seqs.append(sid)
        else:
            self.seqs[position] = sid

    def _fork(self) -> None:
        i = int(self.rng.integers(len(self.seqs)))
        j = (i + 1) % len(self.seqs)
        if i == j:
            return
        child, self._next_id = self._next_id, self._next_id + 1
        self.manager.free(self.seqs[j])
        self.manager.fork(self.seqs[i], child)
        self.seqs[j] = child

    def _finish(self, i: int) -> None:
        self.manager.free(self.seqs[i])
        self._join(position=i)

    # -- one decode step -----------------------------------------------------------------------
    def step(self, check: bool = True) -> StepResult | None:
        """One decode step; with check=False the reference is skipped and None returned (the
        backend's output is still read back, which forces lazy backends to run)."""
        c = self.cfg
        self.steps_done += 1
        if c.fork_every and self.steps_done % c.fork_every == 0:
            self._fork()
        if c.finish_every and self.steps_done % c.finish_every == 0:
            self._finish(int(self.rng.integers(len(self.seqs))))
        for i, sid in enumerate(self.seqs):
            if self.manager.context_len(sid) >= c.max_context:
                self._finish(i)
        if c.max_chunk:
            return self._ragged_step(check)
        slots, copies = self.manager.append_batch(self.seqs, 1)
        self._copy(copies)
        self._write(slots, *self._random_kv(len(self.seqs)))
        q = self.rng.standard_normal((len(self.seqs), c.num_kv_heads * c.group_size, c.head_dim))
        q = representable(q, c.dtype)
        tables = self.manager.block_tables(self.seqs)
        lens = self.manager.context_lens(self.seqs)
        out = np.asarray(self.backend.decode(q, self.pool, tables, lens, window=c.window,
                                             path=self.path), dtype=np.float64)
        if not check:
            return None
        ref = reference.decode(q, self.mirror_k, self.mirror_v, tables, lens, window=c.window)
        return StepResult(self.steps_done, out, ref, reference.rms(out, ref))

    def _ragged_step(self, check: bool) -> StepResult | None:
        """One plan for the whole batch: prompt chunks and decode rows (and now and then a
        sequence with no query) side by side; run() writes the new K/V, then attends."""
        c = self.cfg
        counts = []
        for sid in self.seqs:
            left = self.pending.get(sid, 0)
            if left:
                n = min(left, int(self.rng.integers(1, c.max_chunk + 1)))
                self.pending[sid] = left - n
            else:
                n = 0 if self.rng.random() < 0.1 else 1
            counts.append(n)
        slots = []
        for sid, n in zip(self.seqs, counts):  # in order: a fork's shared tail copies first
            s, copies = self.manager.append_slots(sid, n)
            self._copy(copies)
            slots.append(s)
        slots = np.concatenate(slots)
        k, v = self._random_kv(slots.size)
        hq = c.num_kv_heads * c.group_size
        q = representable(self.rng.standard_normal((slots.size, hq, c.head_dim)), c.dtype)
        tables = self.manager.block_tables(self.seqs)
        lens = self.manager.context_lens(self.seqs)
        plan = self.backend.plan(self.pool, tables, lens, num_q_heads=hq, query_lens=counts,
                                 slot_mapping=slots, window=c.window, path=self.path)
        out = self.backend.to_numpy(self.backend.run(plan, q, self.pool, k, v)).astype(np.float64)
        self._mirror(slots, k, v)   # after the write: a device's own quantization is read back
        if not check:
            return None
        ref = reference.ragged(q, self.mirror_k, self.mirror_v, tables, lens, counts,
                               window=c.window)
        return StepResult(self.steps_done, out, ref, reference.rms(out, ref))

    def close(self) -> None:
        self.manager.release_all()
