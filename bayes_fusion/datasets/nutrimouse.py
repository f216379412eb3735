"""The nutrimouse data (Martin et al. 2007): 40 mice, genes x lipids, diet and genotype."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor


@dataclass
class MultiViewData:
    """Several views of the same rows plus labels.

    :ivar views: list of ``(N, d_m)`` float tensors.
    :ivar view_names: name of each view.
    :ivar feature_names: per view, the name of each feature.
    :ivar targets: label name -> ``(N,)`` int64 tensor.
    :ivar classes: label name -> class names (index = label value).
    """

    views: list[Tensor]
    view_names: list[str]
    feature_names: list[list[str]]
    targets: dict[str, Tensor]
    classes: dict[str, list[str]]
    description: str = ""

    @property
    def num_rows(self) -> int:
        return self.views[0].shape[0]


def _read_csv(name: str) -> tuple[list[str], list[list[str]]]:
    path = resources.files("bayes_fusion.datasets") / "data" / "nutrimouse" / name
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _labels(name: str) -> tuple[Tensor, list[str]]:
    _, rows = _read_csv(name)
    values = [r[0] for r in rows]
    classes = sorted(set(values))
    return torch.tensor([classes.index(v) for v in values]), classes


def load_nutrimouse(standardize: bool = True, dtype: torch.dtype = torch.float32) -> MultiViewData:
    """Load nutrimouse: views ``gene`` ``(40, 120)`` and ``lipid`` ``(40, 21)``; targets
    ``diet`` (5 classes) and ``genotype`` (2 classes).

    :param standardize: center and scale every feature to unit variance (recommended: the
        fusion priors and initialisation assume O(1) inputs).
    :returns: :class:`MultiViewData`.
    """
    views, names = [], []
    for view in ("gene", "lipid"):
        header, rows = _read_csv(f"{view}.csv")
        x = torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float64)
        if standardize:
            x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
        views.append(x.to(dtype))
        names.append(header)
    diet, diet_classes = _labels("diet.csv")
    genotype, genotype_classes = _labels("genotype.csv")
    return MultiViewData(
        views=views,
        view_names=["gene", "lipid"],
        feature_names=names,
        targets={"diet": diet, "genotype": genotype},
        classes={"diet": diet_classes, "genotype": genotype_classes},
        description="Martin et al. (2007), Hepatology 45(3):767-777; see data/nutrimouse.",
    )
