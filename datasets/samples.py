"""The records a dataset loader returns: one :class:`Sample` per image, grouped by category."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One image of a category.

    ``key`` is the path relative to the dataset root in POSIX form; it is the identity used in
    manifests, so it never depends on where the data lives on a given machine.
    """

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normals, else the defect type (folder name)
    mask_path: Path | None
    split: str  # "train" or "test"
    key: str


@dataclass
class CategoryData:
    """All samples of one category, train and test, in a stable (key-sorted) order."""

    dataset: str
    category: str
    root: Path
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)

    @property
    def test_normal(self) -> list[Sample]:
        return [s for s in self.test if s.label == 0]

    @property
    def test_anomalous(self) -> list[Sample]:
        return [s for s in self.test if s.label == 1]

    def counts(self) -> dict[str, int]:
        """Image counts as docs/protocol.md §1 tabulates them."""
        return {
            "train": len(self.train),
            "test_good": len(self.test_normal),
            "test_anomalous": len(self.test_anomalous),
        }
