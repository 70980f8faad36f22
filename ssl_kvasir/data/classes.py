"""The class table: names, spellings and the paper's order.

HyperKvasir spells seven of its 23 classes differently in the released archive's folders and in the official
split file (``hemorrhoids`` vs ``hemorroids``, ``polyps`` vs ``polyp``, ...). A :class:`ClassTable` maps every
spelling to one index. For HyperKvasir that index is the paper's order A..W (Fig. 8 of Borgli et al. 2020),
which is also the column order of the authors' published prediction files, so a model's logits, a confusion
matrix and a prediction file all share one axis.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ClassInfo:
    """One labeled class.

    Attributes:
        index: position in the table (the model's output index).
        folder: the canonical name: the class folder in the archive.
        aliases: other accepted spellings (for HyperKvasir: the split file's name).
        tract: ``upper-gi-tract`` or ``lower-gi-tract`` (empty for generic data sets).
        category: the archive's category folder (empty for generic data sets).
    """

    index: int
    folder: str
    aliases: tuple[str, ...] = ()
    tract: str = ""
    category: str = ""

    @property
    def letter(self) -> str:
        """The paper's letter (A..W for HyperKvasir), or ``#<index>`` past Z."""
        return string.ascii_uppercase[self.index] if self.index < 26 else f"#{self.index}"

    @property
    def split_name(self) -> str:
        """The spelling used by the official split file (the folder name where there is no other)."""
        return self.aliases[0] if self.aliases else self.folder

    @property
    def archive_dir(self) -> str:
        """The class folder's path below ``labeled-images/`` in the archive."""
        return "/".join(p for p in (self.tract, self.category, self.folder) if p)


class ClassTable(Sequence[ClassInfo]):
    """An ordered set of classes whose lookups accept every spelling of a name."""

    def __init__(self, classes: Iterable[ClassInfo]):
        self._classes = tuple(classes)
        self._lookup: dict[str, int] = {}
        for i, c in enumerate(self._classes):
            if c.index != i:
                raise ValueError(f"class {c.folder!r} has index {c.index}, expected {i}")
            for name in (c.folder, *c.aliases):
                key = name.lower()
                if self._lookup.get(key, i) != i:
                    raise ValueError(f"class name {name!r} is used by two classes")
                self._lookup[key] = i

    @classmethod
    def from_names(cls, names: Iterable[str]) -> ClassTable:
        """A table of plain names (a generic image-folder data set), in the order given."""
        return cls(ClassInfo(index=i, folder=n) for i, n in enumerate(names))

    def __getitem__(self, i):
        return self._classes[i]

    def __len__(self) -> int:
        return len(self._classes)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup

    def index(self, name: str) -> int:  # type: ignore[override]
        """The index of a class by any of its spellings (case-insensitive).

        Raises:
            KeyError: with the list of valid names, when ``name`` is not a class.
        """
        try:
            return self._lookup[name.lower()]
        except KeyError:
            valid = ", ".join(c.folder for c in self._classes)
            raise KeyError(f"unknown class name {name!r}; valid names: {valid}") from None

    @property
    def names(self) -> list[str]:
        """Canonical (folder) names in index order."""
        return [c.folder for c in self._classes]

    @property
    def letters(self) -> list[str]:
        return [c.letter for c in self._classes]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassTable) and self._classes == other._classes

    def __hash__(self) -> int:
        return hash(self._classes)

    def __repr__(self) -> str:
        return (
            f"ClassTable({len(self)} classes: {', '.join(self.names[:4])}{', ...' if len(self) > 4 else ''})"
        )


_UPPER, _LOWER = "upper-gi-tract", "lower-gi-tract"
_LANDMARK, _FINDING = "anatomical-landmarks", "pathological-findings"
_MUCOSA, _THERAPY = "quality-of-mucosal-views", "therapeutic-interventions"

# (folder, split-file spelling or "", tract, category), in the paper's order A..W.
_HYPERKVASIR = [
    ("barretts", "", _UPPER, _FINDING),
    ("bbps-0-1", "", _LOWER, _MUCOSA),
    ("bbps-2-3", "", _LOWER, _MUCOSA),
    ("dyed-lifted-polyps", "", _LOWER, _THERAPY),
    ("dyed-resection-margins", "", _LOWER, _THERAPY),
    ("hemorrhoids", "hemorroids", _LOWER, _FINDING),
    ("ileum", "", _LOWER, _LANDMARK),
    ("impacted-stool", "", _LOWER, _MUCOSA),
    ("cecum", "normal-cecum", _LOWER, _LANDMARK),
    ("pylorus", "normal-pylorus", _UPPER, _LANDMARK),
    ("z-line", "normal-z-line", _UPPER, _LANDMARK),
    ("esophagitis-a", "oesophagitis-a", _UPPER, _FINDING),
    ("esophagitis-b-d", "oesophagitis-b-d", _UPPER, _FINDING),
    ("polyps", "polyp", _LOWER, _FINDING),
    ("retroflex-rectum", "", _LOWER, _LANDMARK),
    ("retroflex-stomach", "", _UPPER, _LANDMARK),
    ("barretts-short-segment", "short-segment-barretts", _UPPER, _FINDING),
    ("ulcerative-colitis-grade-0-1", "", _LOWER, _FINDING),
    ("ulcerative-colitis-grade-1-2", "", _LOWER, _FINDING),
    ("ulcerative-colitis-grade-2-3", "", _LOWER, _FINDING),
    ("ulcerative-colitis-grade-1", "", _LOWER, _FINDING),
    ("ulcerative-colitis-grade-2", "", _LOWER, _FINDING),
    ("ulcerative-colitis-grade-3", "", _LOWER, _FINDING),
]

HYPERKVASIR_CLASSES = ClassTable(
    ClassInfo(index=i, folder=folder, aliases=(alias,) if alias else (), tract=tract, category=category)
    for i, (folder, alias, tract, category) in enumerate(_HYPERKVASIR)
)
"""The 23 labeled HyperKvasir classes in the paper's order (index 0..22 = letters A..W)."""
