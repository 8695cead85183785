"""The network's upsampling geometry: how the mel's frames are stretched to the hop's samples."""

from __future__ import annotations

import math
from typing import Any

from utils.config import ConfigError


def upsample_factors(cfg: Any) -> list[int]:
    """The configured factors, or a factorisation of the hop; their product must be the hop."""
    hop = int(cfg.preprocess.hop_size)
    factors = cfg.model.diffwave.get("upsample_factors")
    if not factors:
        return factorize(hop)
    if math.prod(int(f) for f in factors) != hop:
        raise ConfigError(
            f"{cfg.get('config_path', 'config')}: model.diffwave.upsample_factors {list(factors)} "
            f"multiply to {math.prod(factors)}, not preprocess.hop_size {hop}"
        )
    return [int(f) for f in factors]


def factorize(hop: int) -> list[int]:
    """Two factors as equal as possible (three when the hop is large), largest last."""
    if hop > 1024:
        first = next(d for d in range(round(hop ** (1 / 3)), 0, -1) if hop % d == 0)
        if first > 1:  # a prime-ish hop has no small factor: keep two
            return [first, *factorize(hop // first)]
    low = next(d for d in range(math.isqrt(hop), 0, -1) if hop % d == 0)
    return [low, hop // low] if low > 1 else [hop]
