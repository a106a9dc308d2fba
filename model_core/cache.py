"""Per-session state of the causal DiT, as typed objects passed in and returned — never kept on a module.

* `KVCache` — one denoising step's self-attention cache: the sink's keys/values (stored *without* RoPE) and the
  previous chunk's keys/values (rotated to the fixed previous-chunk positions `[0, C)`).  Preallocated once per
  session with static shapes; a chunk overwrites the previous-chunk slot in place.  Nothing else is kept, so
  memory per session is constant however long the stream runs.
* `ConditionCache` — what is computed once per session: cross-attention keys/values of the prompt and the
  reference-image tokens for every block, and the timestep modulation of every denoising step and of the sink.
* `ChunkAudio` — the audio tokens (after the audio projection) of one chunk, per character, with each
  character's spatial region mask.

Shapes use L = blocks, B = batch (sessions), H = heads, D = head channels.  What may live here: the state objects
and their in-place updates (static shapes, no host syncs); nothing that computes attention or knows about Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Self-attention cache of one denoising step.

    sink_key, sink_value: [L, B, Ls, H, D]   sink tokens, no RoPE applied
    prev_key, prev_value: [L, B, Lp, H, D]   previous chunk, RoPE at frame positions [0, C)
    prev_valid:           [B] bool           False until the first chunk has run
    """

    sink_key: torch.Tensor
    sink_value: torch.Tensor
    prev_key: torch.Tensor
    prev_value: torch.Tensor
    prev_valid: torch.Tensor

    @classmethod
    def allocate(cls, *, num_layers: int, batch: int, sink_tokens: int, chunk_tokens: int, num_heads: int,
                 head_dim: int, device, dtype) -> "KVCache":
        def zeros(tokens):
            return torch.zeros(num_layers, batch, tokens, num_heads, head_dim, device=device, dtype=dtype)

        return cls(zeros(sink_tokens), zeros(sink_tokens), zeros(chunk_tokens), zeros(chunk_tokens),
                   torch.zeros(batch, dtype=torch.bool, device=device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sink_key, self.sink_value, self.prev_key,
                                                             self.prev_value, self.prev_valid))

    def set_sink(self, sink_key: torch.Tensor, sink_value: torch.Tensor) -> None:
        """Overwrite the sink (e.g. Adaptive Attention Sink) in place. sink_key/value: [L, B, Ls, H, D]."""
        self.sink_key.copy_(sink_key)
        self.sink_value.copy_(sink_value)

    def clone(self) -> "KVCache":
        return KVCache(*(t.clone() for t in (self.sink_key, self.sink_value, self.prev_key, self.prev_value,
                                             self.prev_valid)))


@dataclass
class ConditionCache:
    """Per-session conditioning, computed once when the session opens.

    text_key, text_value:   [L, B, Lt, H, D]   prompt cross-attention keys/values per block
    image_key, image_value: [L, B, Li, H, D]   reference-image cross-attention keys/values per block
    step_temb:              [S, B, dim]        time embedding per denoising step (S = steps)
    step_modulation:        [S, B, 6, dim]     block modulation per denoising step
    sink_temb, sink_modulation: [B, dim], [B, 6, dim]  the same for the clean sink (t = 0)
    """

    text_key: torch.Tensor
    text_value: torch.Tensor
    image_key: torch.Tensor
    image_value: torch.Tensor
    step_temb: torch.Tensor
    step_modulation: torch.Tensor
    sink_temb: torch.Tensor
    sink_modulation: torch.Tensor


@dataclass
class ChunkAudio:
    """Audio conditioning for the latent frames of one chunk.

    tokens:  [B, K, F, T, dim]  projected audio tokens per character (K), latent frame (F) and window token (T)
    regions: [B, K, S] float    1 where a character's audio may act on a spatial token (S = tokens per frame)
    """

    tokens: torch.Tensor
    regions: torch.Tensor


@dataclass
class ChunkRope:
    """RoPE tables of the streaming path, fixed for a session (Rolling RoPE: positions never grow).

    Each is a (cos, sin) pair of [tokens, D/2] float32: `current` at frame positions [C, 2C), `previous` at [0, C)
    (used once, to store the chunk's keys as the next previous chunk), `sink` at C + sink_rope_offset.
    """

    current: tuple[torch.Tensor, torch.Tensor]
    previous: tuple[torch.Tensor, torch.Tensor]
    sink: tuple[torch.Tensor, torch.Tensor]
    frame_positions: tuple[int, int]  # (min, max) frame position used, for bounds checks


_KV_BATCH_DIM = {"sink_key": 1, "sink_value": 1, "prev_key": 1, "prev_value": 1, "prev_valid": 0}
_CONDITION_BATCH_DIM = {"text_key": 1, "text_value": 1, "image_key": 1, "image_value": 1, "step_temb": 1,
                        "step_modulation": 1, "sink_temb": 0, "sink_modulation": 0}


def _batch_map(state, dims: dict[str, int], fn):
    return type(state)(**{name: fn(getattr(state, name), dim) for name, dim in dims.items()})


class SessionPool:
    """The score state of many sessions of one shape, preallocated once and indexed by slot, as static-cache LLM
    servers keep their KV caches.

        pool = SessionPool(capacity=4)
        slot = pool.add(owner, caches, condition)     copies a new session's state into the lowest free slot
        caches, condition = pool.views(slot, count)   views of `count` consecutive slots (no copy)
        cache = pool.gather_cache(slots, step)        a copy of any slots' caches of one step (slots not consecutive)
        pool.scatter(slots, step, cache)              ... and their new previous-chunk entries written back
        moved = pool.remove(slot)                     frees the slot; the last session moves into it

    Per owned step one `KVCache` and one `ConditionCache` whose batch dimension is the slot (batch-major within each
    block: `prev_key[l]` is [slots, tokens, heads, head_dim], contiguous). A session's caches and conditioning are
    views of its slot, so its own steps write the pool in place; a batch of sessions in consecutive slots is a view
    of the range, and one forward per step over it reads and writes every session's state where it lives, gathering
    and copying nothing. `remove` keeps the occupied slots consecutive ([0, size)) by moving the last session into the
    freed slot (one session's state copied once, at close), so a batch of every open session is always a view. When
    the pool is full its capacity doubles (one copy of every slot) and every owner is re-pointed. `gathered_bytes`
    counts what the non-consecutive path copied, which the bench reports.

    `owner` is anything with assignable `caches` and `condition` attributes (a `stages.ScoreSession`): the pool
    re-points them when a growth or a compaction moves its state.
    """

    def __init__(self, capacity: int = 4):
        if capacity < 1:
            raise ValueError(f"capacity={capacity} is invalid: at least 1")
        self.capacity = capacity
        self.caches: dict[int, KVCache] = {}
        self.condition: ConditionCache | None = None
        self.owners: list = []                       # slot -> owner; slots [0, len) are occupied
        self.gathered_bytes = 0
        self.growths = 0

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def nbytes(self) -> int:
        tensors = [getattr(cache, name) for cache in self.caches.values() for name in _KV_BATCH_DIM]
        if self.condition is not None:
            tensors += [getattr(self.condition, name) for name in _CONDITION_BATCH_DIM]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _allocate(self, capacity: int, caches: dict[int, KVCache], condition: ConditionCache):
        def empty(template: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(template.shape)
            shape[dim] = capacity
            return torch.zeros(shape, dtype=template.dtype, device=template.device)

        return ({k: _batch_map(cache, _KV_BATCH_DIM, empty) for k, cache in caches.items()},
                _batch_map(condition, _CONDITION_BATCH_DIM, empty))

    def add(self, owner, caches: dict[int, KVCache], condition: ConditionCache) -> int:
        """Copy one session's state (batch 1) into the next slot and point `owner` at its views. Returns the slot."""
        if not self.caches:
            self.caches, self.condition = self._allocate(self.capacity, caches, condition)
        elif sorted(caches) != sorted(self.caches):
            raise ValueError(f"a session owning steps {sorted(caches)} cannot join a pool of steps "
                             f"{sorted(self.caches)}")
        if len(self.owners) == self.capacity:
            self._grow()
        slot = len(self.owners)
        self.owners.append(owner)
        views, condition_view = self.views(slot)
        for k, cache in caches.items():
            _copy_into(views[k], cache, _KV_BATCH_DIM)
        _copy_into(condition_view, condition, _CONDITION_BATCH_DIM)
        owner.caches, owner.condition = views, condition_view
        return slot

    def _grow(self) -> None:
        capacity = self.capacity * 2
        caches, condition = self._allocate(capacity, self.caches, self.condition)
        size = len(self.owners)
        for k, cache in self.caches.items():
            _copy_into(_batch_map(caches[k], _KV_BATCH_DIM, lambda t, dim: t.narrow(dim, 0, size)),
                       _batch_map(cache, _KV_BATCH_DIM, lambda t, dim: t.narrow(dim, 0, size)), _KV_BATCH_DIM)
        _copy_into(_batch_map(condition, _CONDITION_BATCH_DIM, lambda t, dim: t.narrow(dim, 0, size)),
                   _batch_map(self.condition, _CONDITION_BATCH_DIM, lambda t, dim: t.narrow(dim, 0, size)),
                   _CONDITION_BATCH_DIM)
        self.caches, self.condition, self.capacity = caches, condition, capacity
        self.growths += 1
        for slot, owner in enumerate(self.owners):
            owner.caches, owner.condition = self.views(slot)

    def slot_of(self, owner) -> int:
        for slot, held in enumerate(self.owners):
            if held is owner:
                return slot
        raise KeyError("this session holds no slot of the pool")

    def views(self, slot: int, count: int = 1) -> tuple[dict[int, KVCache], ConditionCache]:
        """The state of slots [slot, slot + count): views of the pool, batch dimension `count`."""
        if not (0 <= slot and slot + count <= len(self.owners)):
            raise IndexError(f"slots [{slot}, {slot + count}) are not all occupied (size {len(self.owners)})")

        def narrow(t: torch.Tensor, dim: int) -> torch.Tensor:
            return t.narrow(dim, slot, count)

        return ({k: _batch_map(cache, _KV_BATCH_DIM, narrow) for k, cache in self.caches.items()},
                _batch_map(self.condition, _CONDITION_BATCH_DIM, narrow))

    def gather_cache(self, slots: list[int], step: int) -> KVCache:
        """A copy of step `step`'s caches of any `slots`, in that order (the fallback when they are not consecutive;
        one step's copy at a time, so a batch needs one stacked cache of extra memory whatever its step count)."""
        return _batch_map(self.caches[step], _KV_BATCH_DIM, self._taker(slots))

    def gather_condition(self, slots: list[int]) -> ConditionCache:
        return _batch_map(self.condition, _CONDITION_BATCH_DIM, self._taker(slots))

    def _taker(self, slots: list[int]):
        index = torch.tensor(slots, device=self.condition.text_key.device)

        def take(t: torch.Tensor, dim: int) -> torch.Tensor:
            taken = t.index_select(dim, index)
            self.gathered_bytes += taken.numel() * taken.element_size()
            return taken

        return take

    def scatter(self, slots: list[int], step: int, cache: KVCache) -> None:
        """Write a gathered batch's new previous-chunk entries of `step` back to their slots (a step never changes
        the sink)."""
        index = torch.tensor(slots, device=cache.prev_key.device)
        own = self.caches[step]
        for name in ("prev_key", "prev_value", "prev_valid"):
            value = getattr(cache, name)
            getattr(own, name).index_copy_(_KV_BATCH_DIM[name], index, value)
            self.gathered_bytes += value.numel() * value.element_size()

    def remove(self, owner) -> object | None:
        """Free `owner`'s slot. The session in the last slot moves into it (returned, re-pointed), so the occupied
        slots stay consecutive; None when nothing moved."""
        slot = self.slot_of(owner)
        last = len(self.owners) - 1
        moved = None
        if slot != last:
            moved = self.owners[last]
            source, source_condition = self.views(last)
            target, target_condition = self.views(slot)
            for k in self.caches:
                _copy_into(target[k], source[k], _KV_BATCH_DIM)
            _copy_into(target_condition, source_condition, _CONDITION_BATCH_DIM)
            self.owners[slot] = moved
            moved.caches, moved.condition = target, target_condition
        self.owners.pop()
        return moved


def _copy_into(target, source, dims: dict[str, int]) -> None:
    for name in dims:
        getattr(target, name).copy_(getattr(source, name))


class GatheredCaches:
    """The `caches` of `sampler.denoise` for a batch whose slots are not consecutive: reading step k gathers the
    slots' caches of step k from the pool (a copy); assigning it writes their new previous-chunk entries back. Only
    one step's gathered copy exists at a time."""

    def __init__(self, pool: SessionPool, slots: list[int]):
        self.pool, self.slots = pool, slots

    def __getitem__(self, index: int) -> KVCache:
        return self.pool.gather_cache(self.slots, index)

    def __setitem__(self, index: int, cache: KVCache) -> None:
        self.pool.scatter(self.slots, index, cache)
