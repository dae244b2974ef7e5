"""Explicit, JAX-style randomness built on the Threefry-2x32 counter-based generator.

A key is a plain ``int64`` tensor of shape ``[2]`` holding two unsigned 32-bit words.
Keys are values: they pass through ``torch.compile`` as ordinary tensor inputs (a new key
never triggers a recompile), and every random draw is a pure function of its key.  Nothing
here touches torch's global RNG.

The bits come from Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3", SC 2011), the generator behind ``jax.random``.  It is written in plain
``int64`` tensor arithmetic so it runs, and gives the same bits, on any device and inside a
compiled graph.

Example:
    >>> import fundp
    >>> key = fundp.random.key(0)
    >>> noise_key, data_key = fundp.random.split(key)
    >>> fundp.random.normal(noise_key, (2, 3)).shape
    torch.Size([2, 3])
    >>> bool((fundp.random.normal(noise_key, (4,)) == fundp.random.normal(noise_key, (4,))).all())
    True
"""

from __future__ import annotations

import secrets

import torch

__all__ = ["key", "os_key", "split", "fold_in", "bits", "uniform", "normal", "key_data"]

_MASK32 = 0xFFFFFFFF
_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_KEY_PARITY = 0x1BD11BDA
# High counter words reserved for key derivation; `bits` uses counter >> 32, which stays far below.
_SPLIT_DOMAIN = 0xFFFFFFFF
_FOLD_IN_DOMAIN = 0xFFFFFFFE


def _check_key(key: torch.Tensor, name: str = "key") -> None:
    if not isinstance(key, torch.Tensor) or key.shape != (2,) or key.dtype != torch.int64:
        raise TypeError(
            f"{name} must be a fundp key (an int64 tensor of shape [2], made by "
            f"fundp.random.key / split / fold_in), got {type(key).__name__}"
            + (f" of dtype {key.dtype} and shape {tuple(key.shape)}" if isinstance(key, torch.Tensor) else "")
        )


def key(seed: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Returns the key for an integer ``seed`` in ``[0, 2**64)``: words ``(seed >> 32, seed & 0xFFFFFFFF)``.

    Same seed, same key, same randomness everywhere.  For production runs use :func:`os_key`.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a Python int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return torch.tensor([(seed >> 32) & _MASK32, seed & _MASK32], dtype=torch.int64, device=device)


def os_key(*, device: torch.device | str | None = None) -> torch.Tensor:
    """Returns a key with 64 bits drawn from the operating system's entropy (``secrets``).

    Use it for production runs, where the noise must not be predictable from a seed in code.
    Store the key (it is a tensor) if the run must be resumable.
    """
    return key(secrets.randbits(64), device=device)


def key_data(key: torch.Tensor) -> tuple[int, int]:
    """Returns the two 32-bit words of ``key`` as Python ints (for logging and serialisation)."""
    _check_key(key)
    hi, lo = key.tolist()
    return int(hi), int(lo)


def _threefry2x32(key: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Threefry-2x32-20 of the counter words ``(x0, x1)`` (int64 tensors of 32-bit values) under ``key``.

    Values stay below 2**32 (masked after every add), so ``x << r < 2**63`` never overflows int64.
    The rounds work in place on fresh buffers: three times faster in eager mode, and
    ``torch.compile`` functionalises them all the same.  The inputs are not modified.
    """
    k0, k1 = key[0], key[1]
    k2 = k0 ^ k1 ^ _KEY_PARITY
    schedule = (k0, k1, k2)
    x0 = (x0 + k0).bitwise_and_(_MASK32)
    x1 = (x1 + k1).bitwise_and_(_MASK32)
    carry = torch.empty_like(x1)
    for block in range(5):
        for r in _ROTATIONS[4 * (block % 2): 4 * (block % 2) + 4]:
            x0.add_(x1).bitwise_and_(_MASK32)
            torch.bitwise_right_shift(x1, 32 - r, out=carry)  # rotate left by r ...
            x1.bitwise_left_shift_(r).bitwise_or_(carry).bitwise_and_(_MASK32).bitwise_xor_(x0)
        x0.add_(schedule[(block + 1) % 3]).bitwise_and_(_MASK32)
        x1.add_(schedule[(block + 2) % 3] + (block + 1)).bitwise_and_(_MASK32)
    return x0, x1


def split(key: torch.Tensor, num: int = 2) -> torch.Tensor:
    """Returns ``num`` new independent keys as a ``[num, 2]`` tensor (unpack it like a tuple)."""
    _check_key(key)
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    counters = torch.arange(num, dtype=torch.int64, device=key.device)
    # The high counter word tags the domain, so split keys never equal words drawn by `bits`.
    x0, x1 = _threefry2x32(key, torch.full_like(counters, _SPLIT_DOMAIN), counters)
    return torch.stack([x0, x1], dim=1)


def fold_in(key: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """Returns a new key that mixes the integer ``data`` (e.g. a step or rank) into ``key``.

    ``data`` may be a Python int or an integer tensor scalar in ``[0, 2**32)``; a tensor keeps the
    call free of recompiles under ``torch.compile`` when ``data`` changes every step.
    """
    _check_key(key)
    if isinstance(data, torch.Tensor):
        if data.dtype.is_floating_point or data.numel() != 1:
            raise TypeError("data must be an integer scalar tensor or a Python int")
        word = data.reshape(()).to(device=key.device, dtype=torch.int64) & _MASK32
    else:
        if isinstance(data, bool) or not isinstance(data, int) or not 0 <= data < 2**32:
            raise ValueError(f"data must be an int in [0, 2**32), got {data!r}")
        word = torch.tensor(data, dtype=torch.int64, device=key.device)
    x0, x1 = _threefry2x32(key, torch.full_like(word, _FOLD_IN_DOMAIN), word)
    return torch.stack([x0, x1])


def bits(key: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns two int64 tensors of ``shape`` holding independent uniform 32-bit words."""
    _check_key(key)
    count = 1
    for size in shape:
        count *= int(size)
    counters = torch.arange(count, dtype=torch.int64, device=key.device)
    hi, lo = _threefry2x32(key, counters >> 32, counters & _MASK32)
    return hi.reshape(shape), lo.reshape(shape)


def uniform(key: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns ``U(0, 1)`` samples of ``shape``, strictly inside (0, 1), with 53 bits of resolution.

    Computed in float64 as ``(k + 0.5) / 2**53`` for a uniform 53-bit integer ``k``, then cast.
    """
    hi, lo = bits(key, shape)
    k = (hi << 21) | (lo >> 11)  # 32 + 21 = 53 random bits
    return ((k.to(torch.float64) + 0.5) * 2.0**-53).to(dtype)


def normal(key: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns standard normal samples of ``shape``: ``Phi^{-1}(u)`` for 53-bit uniforms ``u``.

    The inverse-CDF transform is computed in float64, so the tails reach about 8.3 standard
    deviations (the smallest uniform is ``2**-54``).  This is the fast research-mode sampler;
    see :mod:`fundp.secure` for one that resists floating-point attacks.
    """
    u = uniform(key, shape, torch.float64)
    return torch.special.ndtri(u).to(dtype)
