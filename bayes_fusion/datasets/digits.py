"""Multi-feature handwritten digits built from scikit-learn's bundled ``load_digits`` images.

The same construction as the UCI "multiple features" benchmark: several genuinely different
descriptions of each 8x8 digit image (1797 images, 10 classes):

* ``blocks``: local averages -- mean intensity of each 2x2 block (16 features);
* ``fourier``: magnitudes of the low-frequency 2-D discrete Fourier coefficients
  ``|F(u, v)|``, ``0 <= u, v <= 3`` without the constant term (15 features), shift invariant;
* ``profile``: projection counts -- ink per row and per column (16 features);
* ``moments``: scale-normalized central image moments ``eta_pq``, ``2 <= p + q <= 4``
  (12 features), translation and scale invariant (the geometric cousins of Zernike moments).

Every feature is standardized. scikit-learn (an optional dependency: ``pip install
bayes-fusion[examples]``) ships the images; nothing is downloaded.
"""

from __future__ import annotations

import torch

from .nutrimouse import MultiViewData

VIEWS = ("blocks", "fourier", "profile", "moments")


def _blocks(img: torch.Tensor) -> torch.Tensor:
    return img.reshape(-1, 4, 2, 4, 2).mean(dim=(2, 4)).reshape(-1, 16)


def _fourier(img: torch.Tensor) -> torch.Tensor:
    mag = torch.fft.fft2(img).abs()[:, :4, :4].reshape(-1, 16)
    return mag[:, 1:]


def _profile(img: torch.Tensor) -> torch.Tensor:
    return torch.cat([img.sum(2), img.sum(1)], dim=1)


def _moments(img: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(8.0, dtype=img.dtype), torch.arange(8.0, dtype=img.dtype), indexing="ij"
    )
    m00 = img.sum((1, 2)).clamp_min(1e-9)
    cx = (img * xs).sum((1, 2)) / m00
    cy = (img * ys).sum((1, 2)) / m00
    dx = xs.unsqueeze(0) - cx[:, None, None]
    dy = ys.unsqueeze(0) - cy[:, None, None]
    feats = []
    for order in (2, 3, 4):
        for p in range(order + 1):
            q = order - p
            mu = (img * dx**p * dy**q).sum((1, 2))
            feats.append(mu / m00 ** (1 + order / 2))
    return torch.stack(feats, dim=1)


def load_digits_views(views=VIEWS, dtype: torch.dtype = torch.float32) -> MultiViewData:
    """Load the multi-view digits.

    :param views: which views, in order (any of ``"blocks"``, ``"fourier"``, ``"profile"``,
        ``"moments"``).
    :returns: :class:`MultiViewData` with target ``"digit"``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits_views needs scikit-learn: pip install 'bayes-fusion[examples]'"
        ) from exc
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"views: expected names from {VIEWS}, got {unknown}")
    digits = load_digits()
    img = torch.tensor(digits.images, dtype=torch.float64)
    makers = {"blocks": _blocks, "fourier": _fourier, "profile": _profile, "moments": _moments}
    out, names = [], []
    for view in views:
        x = makers[view](img)
        x = (x - x.mean(0)) / x.std(0).clamp_min(1e-9)
        out.append(x.to(dtype))
        names.append([f"{view}_{i}" for i in range(x.shape[1])])
    return MultiViewData(
        views=out,
        view_names=list(views),
        feature_names=names,
        targets={"digit": torch.tensor(digits.target, dtype=torch.long)},
        classes={"digit": [str(i) for i in range(10)]},
        description="scikit-learn load_digits (UCI optdigits test set), multi-feature views",
    )
