"""Explicit, JAX-style randomness built on the Threefry-2x32 counter-based generator.

A key is a plain ``int64`` tensor of shape ``[2]`` holding two unsigned 32-bit words.
Keys are values: they pass through ``torch.compile`` as ordinary tensor inputs (a new key
never triggers a recompile), and every random draw is a pure function of its key.  Nothing
here touches torch's global RNG.

The bits come from Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3", SC 2011), the generator behind ``jax.random``.  It is written in plain
integer tensor arithmetic so it runs, and gives the same bits, on any device and inside a
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

import math
import secrets
from typing import Any

import torch

from fundp._validate import check_int

__all__ = ["key", "os_key", "split", "fold_in", "bits", "uniform", "normal", "key_data"]

_MASK32 = 0xFFFFFFFF
_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_KEY_PARITY = 0x1BD11BDA
# High counter words reserved for key derivation; `bits` uses counter >> 32, which stays far below.
_SPLIT_DOMAIN = 0xFFFFFFFF
_FOLD_IN_DOMAIN = 0xFFFFFFFE


def _is_tracing(tensor: torch.Tensor) -> bool:
    """True inside ``torch.compile`` / ``vmap``, where reading a tensor's values is not possible."""
    if torch.compiler.is_compiling():
        return True
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(tensor))
    except AttributeError:  # pragma: no cover - old torch
        return False


def _check_key(key: Any, name: str = "key") -> None:
    """Raises unless ``key`` is a fundp key: an int64 tensor of shape ``[2]`` of words in ``[0, 2**32)``.

    Shape and dtype are always checked.  The word values are checked for keys on the CPU outside
    ``torch.compile``; reading an accelerator key would synchronise with the device, so those are
    trusted (every key made by :func:`key`, :func:`split`, :func:`fold_in` or loaded by
    :func:`fundp.checkpoint.load` is valid).
    """
    if not isinstance(key, torch.Tensor) or key.shape != (2,) or key.dtype != torch.int64:
        raise TypeError(
            f"{name} must be a fundp key (an int64 tensor of shape [2], made by "
            f"fundp.random.key / split / fold_in), got {type(key).__name__}"
            + (f" of dtype {key.dtype} and shape {tuple(key.shape)}" if isinstance(key, torch.Tensor) else "")
        )
    if key.device.type == "cpu" and not _is_tracing(key):
        words = key.tolist()
        if not all(0 <= word <= _MASK32 for word in words):
            raise ValueError(
                f"{name} must hold two unsigned 32-bit words, each in [0, 2**32), got {words}: "
                "make keys with fundp.random.key / split / fold_in"
            )


def key(seed: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Returns the key for an integer ``seed`` in ``[0, 2**64)``: words ``(seed >> 32, seed & 0xFFFFFFFF)``.

    Same seed, same key, same randomness everywhere.  For production runs use :func:`os_key`.

    Example:
      >>> import torch, fundp
      >>> fundp.random.key(2**32 + 5).tolist()
      [1, 5]
    """
    seed = check_int("seed", seed, minimum=0, maximum=2**64 - 1)
    return torch.tensor([(seed >> 32) & _MASK32, seed & _MASK32], dtype=torch.int64, device=device)


def os_key(*, device: torch.device | str | None = None) -> torch.Tensor:
    """Returns a key with 64 bits drawn from the operating system's entropy (``secrets``).

    Use it for production runs, where the noise must not be predictable from a seed in code.
    Store the key (it is a tensor) if the run must be resumable.  Under ``torch.distributed``
    every rank must use the *same* key: draw it once with
    :func:`fundp.distributed.shared_os_key`, never by calling ``os_key()`` on each rank.

    Example:
      >>> import torch, fundp
      >>> fundp.random.os_key().shape
      torch.Size([2])
    """
    return key(secrets.randbits(64), device=device)


def key_data(key: torch.Tensor) -> tuple[int, int]:
    """Returns the two 32-bit words of ``key`` as Python ints (for logging and serialisation).

    Example:
      >>> import torch, fundp
      >>> fundp.random.key_data(fundp.random.key(7))
      (0, 7)
    """
    _check_key(key)
    hi, lo = key.tolist()
    if not (0 <= hi <= _MASK32 and 0 <= lo <= _MASK32):
        raise ValueError(f"key must hold two unsigned 32-bit words, each in [0, 2**32), got {[hi, lo]}")
    return int(hi), int(lo)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in ``[0, 2**32)`` -> int32 tensors holding the same 32 bits."""
    return (((words + 2**31) & _MASK32) - 2**31).to(torch.int32)


def _threefry2x32(key: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Threefry-2x32-20 of the counter words ``(x0, x1)`` (int64 tensors of 32-bit values) under ``key``.

    The rounds run on int32 tensors, whose additions and left shifts wrap modulo ``2**32`` exactly
    as Threefry's do; the right shift of a rotation is arithmetic on int32, so its sign-extended
    bits are masked off.  Half the memory traffic of int64 arithmetic: twice as fast in eager mode.
    The rounds work in place on fresh buffers (``torch.compile`` functionalises them all the
    same); the inputs are not modified.  Returns int64 tensors of 32-bit values.
    """
    k0, k1 = _as_int32(key[0]), _as_int32(key[1])
    k2 = k0 ^ k1 ^ _as_int32(torch.tensor(_KEY_PARITY, dtype=torch.int64, device=key.device))
    schedule = (k0, k1, k2)
    x0 = _as_int32(x0) + k0
    x1 = _as_int32(x1) + k1
    carry = torch.empty_like(x1)
    for block in range(5):
        for r in _ROTATIONS[4 * (block % 2): 4 * (block % 2) + 4]:
            x0.add_(x1)
            torch.bitwise_right_shift(x1, 32 - r, out=carry)  # rotate left by r ...
            carry.bitwise_and_((1 << r) - 1)
            x1.bitwise_left_shift_(r).bitwise_or_(carry).bitwise_xor_(x0)
        x0.add_(schedule[(block + 1) % 3])
        x1.add_(schedule[(block + 2) % 3] + (block + 1))
    return x0.to(torch.int64) & _MASK32, x1.to(torch.int64) & _MASK32


def split(key: torch.Tensor, num: int = 2) -> torch.Tensor:
    """Returns ``num`` new independent keys as a ``[num, 2]`` tensor (unpack it like a tuple).

    Example:
      >>> import torch, fundp
      >>> noise_key, model_key = fundp.random.split(fundp.random.key(0))
      >>> fundp.random.split(fundp.random.key(0), 3).shape
      torch.Size([3, 2])
    """
    _check_key(key)
    num = check_int("num", num, minimum=1)
    counters = torch.arange(num, dtype=torch.int64, device=key.device)
    # The high counter word tags the domain, so split keys never equal words drawn by `bits`.
    x0, x1 = _threefry2x32(key, torch.full_like(counters, _SPLIT_DOMAIN), counters)
    return torch.stack([x0, x1], dim=1)


def _check_fold_in_data(data: Any) -> None:
    if isinstance(data, torch.Tensor):
        if data.numel() != 1 or data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool:
            raise TypeError(
                f"data must be an int in [0, 2**32) or an integer tensor with one element, "
                f"got a {data.dtype} tensor of shape {tuple(data.shape)}"
            )
        if data.device.type == "cpu" and not _is_tracing(data):
            value = int(data.reshape(()))
            if not 0 <= value <= _MASK32:
                raise ValueError(f"data must be in [0, 2**32), got {value}")
    else:
        check_int("data", data, minimum=0, maximum=_MASK32)


def fold_in(key: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """Returns a new key that mixes the integer ``data`` (e.g. a step or rank) into ``key``.

    ``data`` is a 32-bit unsigned word: a Python int (or NumPy / whole-number value) in
    ``[0, 2**32)``, or an integer tensor with one element holding such a value; a tensor keeps the
    call free of recompiles under ``torch.compile`` when ``data`` changes every step.  Out-of-range
    values raise instead of wrapping around (``-1`` and ``2**32 - 1`` would otherwise give the same
    key); like keys, tensor values are checked on the CPU outside ``torch.compile``.

    Example:
      >>> import torch, fundp
      >>> key = fundp.random.key(0)
      >>> bool(torch.equal(fundp.random.fold_in(key, 3), fundp.random.fold_in(key, torch.tensor(3))))
      True
    """
    _check_key(key)
    _check_fold_in_data(data)
    if isinstance(data, torch.Tensor):
        word = data.reshape(()).to(device=key.device, dtype=torch.int64) & _MASK32
    else:
        word = torch.tensor(int(data), dtype=torch.int64, device=key.device)
    x0, x1 = _threefry2x32(key, torch.full_like(word, _FOLD_IN_DOMAIN), word)
    return torch.stack([x0, x1])


def _count(shape: Any) -> int:
    try:
        sizes = [int(size) for size in shape]
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints, got {shape!r}") from None
    count = 1
    for size in sizes:
        if size < 0:
            raise ValueError(f"shape must hold sizes >= 0, got {tuple(shape)}")
        count *= size
    return count


def _bits(key: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    counters = torch.arange(count, dtype=torch.int64, device=key.device)
    return _threefry2x32(key, counters >> 32, counters & _MASK32)


def bits(key: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns two int64 tensors of ``shape`` holding independent uniform 32-bit words.

    Example:
      >>> import torch, fundp
      >>> hi, lo = fundp.random.bits(fundp.random.key(0), (3,))
      >>> bool(((hi >= 0) & (hi < 2**32)).all())
      True
    """
    _check_key(key)
    hi, lo = _bits(key, _count(shape))
    return hi.reshape(shape), lo.reshape(shape)


def _uniform_from_bits(hi: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniforms from two 32-bit words each: ``(k + 1/2) 2**-52`` for the top 52 bits ``k``, in ``dtype``.

    Every ``(k + 1/2) 2**-52`` is exact in float64 (53 significant bits), so the float64 values lie
    in ``[2**-53, 1 - 2**-53]``, symmetric about 1/2.  Rounding to a narrower ``dtype`` could give
    1 (and 0 in float16), so the result is clamped to ``[tiny, 1 - eps / 2]`` of that dtype: the
    smallest positive normal number and the largest number below 1.
    """
    k = (hi << 20) | (lo >> 12)  # 32 + 20 = 52 random bits
    u = (k.to(torch.float64) + 0.5) * 2.0**-52
    if dtype == torch.float64:
        return u
    info = torch.finfo(dtype)
    return u.to(dtype).clamp_(min=info.tiny, max=1.0 - info.eps / 2)


def _check_dtype(dtype: Any) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def uniform(key: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns ``U(0, 1)`` samples of ``shape``, strictly inside (0, 1): never 0, never 1.

    Each sample is ``(k + 1/2) 2**-52`` for a uniform 52-bit integer ``k``, computed exactly in
    float64 (so ``log(u)`` and ``log(1 - u)`` are always finite), then rounded to ``dtype`` and
    clamped to the dtype's ``[tiny, 1 - eps/2]``.  The intervals, inclusive:

    * float64: ``[2**-53, 1 - 2**-53]``;
    * float32: ``[2**-53, 1 - 2**-24]`` (values above ``1 - 2**-25`` would round to 1);
    * bfloat16: ``[2**-53, 1 - 2**-8]``;
    * float16: ``[2**-14, 1 - 2**-11]`` (values below its smallest normal number are raised to it).

    Example:
      >>> import torch, fundp
      >>> u = fundp.random.uniform(fundp.random.key(0), (1000,))
      >>> bool(((u > 0) & (u < 1)).all())
      True
    """
    _check_key(key)
    _check_dtype(dtype)
    count = _count(shape)
    hi, lo = _bits(key, count)
    return _uniform_from_bits(hi, lo, dtype).reshape(shape)


def normal(key: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns standard normal samples of ``shape`` by Box–Muller on 52-bit uniforms.

    With ``m = ceil(n / 2)`` and uniforms ``u_1..u_2m`` from the key (:func:`uniform` in float64),
    the samples are ``sqrt(-2 ln u_j) cos(2 pi u_{m+j})`` followed by
    ``sqrt(-2 ln u_j) sin(2 pi u_{m+j})`` (the first ``n`` of them), computed in float64: the
    tails reach about 8.57 standard deviations (the smallest uniform is ``2**-53``).  Box–Muller
    rather than the inverse CDF because it vectorises (several times faster compiled).  This is
    the fast research-mode sampler; see :mod:`fundp.secure` for one that resists floating-point
    attacks.

    Example:
      >>> import torch, fundp
      >>> fundp.random.normal(fundp.random.key(0), (2, 3)).shape
      torch.Size([2, 3])
    """
    _check_key(key)
    _check_dtype(dtype)
    count = _count(shape)
    half = (count + 1) // 2
    hi, lo = _bits(key, 2 * half)
    u = _uniform_from_bits(hi, lo, torch.float64)
    radius, angle = _box_muller(u[:half], u[half:])
    samples = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])
    return samples[:count].reshape(shape).to(dtype)


def _box_muller(u_radius: torch.Tensor, u_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(-2 ln u_radius), 2 pi u_angle)``, elementwise in float64: :func:`normal`'s samples are
    ``radius * cos(angle)`` and ``radius * sin(angle)``.  One definition, so that
    :func:`fundp.sharding.normal_at` (any subset of the stream) equals :func:`normal` bit for bit."""
    return torch.sqrt(-2.0 * torch.log(u_radius)), (2.0 * math.pi) * u_angle
