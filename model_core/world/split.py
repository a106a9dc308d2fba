"""The world's train / held-out split, fixed by the world seed and written down in every dataset's manifest.

    WorldSplit(seed, identities=1200).held_out_identity(i) / held_out_sentence(k) / held_out_voice(name)
    split.identities("train" | "eval") , split.sample_sentence(rng, "train" | "eval"), split.voices(...)
    split.record() -> dict          what a manifest stores; WorldSplit.from_record(...) rebuilds and checks it

Held out (never in a training clip): every tenth identity by a seeded permutation, one sentence in twenty by a
seeded hash of its index (the sentence pool is a bijection, so distinct indices are distinct texts), and one voice
(`speech.HELD_OUT_VOICE`). Eval clips use only held-out identities, sentences and the held-out voice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sentences import POOL_SIZE
from .speech import HELD_OUT_VOICE, VOICES

PARTS = ("train", "eval")
_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """splitmix64's finaliser: a well-spread hash of an integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


@dataclass(frozen=True)
class WorldSplit:
    seed: int = 0
    identity_count: int = 1200
    held_out_identity_fraction: float = 0.1
    held_out_sentence_modulus: int = 20
    held_out_voice: str = HELD_OUT_VOICE
    _eval_ids: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.identity_count < 20:
            raise ValueError(f"identities={self.identity_count} is invalid: at least 20")
        if self.held_out_voice not in VOICES:
            raise ValueError(f"held-out voice {self.held_out_voice!r} is unknown; allowed: {', '.join(VOICES)}")
        order = np.random.default_rng([self.seed, 104729]).permutation(self.identity_count)
        count = max(3, int(round(self.identity_count * self.held_out_identity_fraction)))
        object.__setattr__(self, "_eval_ids", frozenset(int(i) for i in order[:count]))

    @staticmethod
    def _check_part(part: str) -> None:
        if part not in PARTS:
            raise ValueError(f"split={part!r} is invalid: allowed {', '.join(PARTS)}")

    def held_out_identity(self, identity_id: int) -> bool:
        return identity_id in self._eval_ids

    def held_out_sentence(self, index: int) -> bool:
        return _mix64(index ^ (self.seed * 0x2545F4914F6CDD1D & _MASK64)) % self.held_out_sentence_modulus == 0

    def identities(self, part: str) -> list[int]:
        self._check_part(part)
        return [i for i in range(self.identity_count) if self.held_out_identity(i) == (part == "eval")]

    def voices(self, part: str) -> list[str]:
        self._check_part(part)
        return [self.held_out_voice] if part == "eval" else [v for v in VOICES if v != self.held_out_voice]

    def sample_sentence(self, rng: np.random.Generator, part: str) -> int:
        self._check_part(part)
        while True:
            index = int(rng.integers(POOL_SIZE))
            if self.held_out_sentence(index) == (part == "eval"):
                return index

    def record(self) -> dict:
        return {"seed": self.seed, "identity_count": self.identity_count,
                "held_out_identity_fraction": self.held_out_identity_fraction,
                "held_out_sentence_modulus": self.held_out_sentence_modulus, "held_out_voice": self.held_out_voice,
                "held_out_identities": sorted(self._eval_ids),
                "held_out_sentence_rule": "splitmix64(index ^ seed*0x2545F4914F6CDD1D) % modulus == 0"}

    @classmethod
    def from_record(cls, record: dict) -> "WorldSplit":
        split = cls(seed=record["seed"], identity_count=record["identity_count"],
                    held_out_identity_fraction=record["held_out_identity_fraction"],
                    held_out_sentence_modulus=record["held_out_sentence_modulus"],
                    held_out_voice=record["held_out_voice"])
        if sorted(split._eval_ids) != list(record["held_out_identities"]):
            raise ValueError("the manifest's held-out identities differ from what its seed gives: the split changed")
        return split
