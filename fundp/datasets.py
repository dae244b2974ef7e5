"""Small real data sets for notebooks, examples and smoke tests (no download).

Only scikit-learn's bundled **digits** for now: 1797 grey-scale 8x8 images of the digits 0-9,
shipped inside scikit-learn itself, so nothing is fetched from the network.  scikit-learn is an
optional dependency (``pip install 'fundp[examples]'``), imported only when a loader is called.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fundp._validate import check_int, check_real

__all__ = ["DigitsSplit", "load_digits_split"]


class DigitsSplit(NamedTuple):
    """A train / test split; unpacks as ``(x_train, y_train), (x_test, y_test) = split``.

    ``train`` and ``test`` are ``(x: Tensor[n, 64], y: LongTensor[n])`` pairs.

    Example:
      >>> import torch
      >>> from fundp.datasets import DigitsSplit
      >>> split = DigitsSplit(train=(torch.zeros(3, 64), torch.zeros(3, dtype=torch.long)),
      ...                     test=(torch.zeros(1, 64), torch.zeros(1, dtype=torch.long)))
      >>> (x_train, y_train), (x_test, y_test) = split
      >>> tuple(x_train.shape), tuple(x_test.shape)
      ((3, 64), (1, 64))
    """

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def load_digits_split(
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> DigitsSplit:
    """scikit-learn's digits, shuffled by ``seed`` and split into train and test tensors.

    Pixels (integers ``0..16``) are divided by 16, so ``x`` lies in ``[0, 1]``; ``y`` holds the
    class ``0..9``.  The shuffle is ``torch.randperm(1797, generator=Generator().manual_seed(seed))``
    (torch's global RNG is untouched); the first ``int((1 - test_fraction) * 1797)`` shuffled
    images are the training set.  The defaults give 1437 train and 360 test images, the same split
    as ``examples/train_digits.py`` makes for the same seed.

    Args:
      test_fraction: share of the 1797 images held out, in ``(0, 1)``; both parts are non-empty.
      seed: seed of the shuffle (an int).
      dtype: floating dtype of ``x``.
      device: where the tensors go (default: the CPU).

    Returns:
      :class:`DigitsSplit` ``((x_train [n_train, 64], y_train [n_train]),
      (x_test [n_test, 64], y_test [n_test]))``.

    Raises:
      ImportError: scikit-learn is not installed.
      ValueError / TypeError: a bad argument (the message names it).

    Example:
      >>> import fundp.datasets
      >>> (x_train, y_train), (x_test, y_test) = fundp.datasets.load_digits_split(seed=0)
      >>> tuple(x_train.shape), tuple(y_train.shape), tuple(x_test.shape)
      ((1437, 64), (1437,), (360, 64))
      >>> float(x_train.min()), float(x_train.max()), y_train.dtype
      (0.0, 1.0, torch.int64)
    """
    test_fraction = check_real("test_fraction", test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    seed = check_int("seed", seed)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    try:
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    except ImportError as error:
        raise ImportError(
            "fundp.datasets.load_digits_split needs scikit-learn: pip install 'fundp[examples]' "
            "(or pip install scikit-learn)"
        ) from error

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float64).to(dtype) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int((1.0 - test_fraction) * len(y))
    if not 0 < split < len(y):
        raise ValueError(f"test_fraction={test_fraction} leaves an empty train or test set of {len(y)} images")
    x, y = x.to(device), y.to(device)
    return DigitsSplit(train=(x[:split], y[:split]), test=(x[split:], y[split:]))
