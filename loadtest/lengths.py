"""Token-length distributions given on the command line: "128" (fixed) or "64:256" (uniform, inclusive)."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class LengthSpec:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        try:
            low, _, high = text.partition(":")
            spec = cls(int(low), int(high or low))
        except ValueError:
            raise ValueError(f"not a length: {text!r} (use N or LOW:HIGH)") from None
        if spec.low < 1 or spec.high < spec.low:
            raise ValueError(f"not a length: {text!r} (need 1 <= LOW <= HIGH)")
        return spec

    @classmethod
    def fixed(cls, n: int) -> LengthSpec:
        return cls(n, n)

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"
