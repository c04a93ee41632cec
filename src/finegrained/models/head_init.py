"""Initialise a new classifier head from a pretrained one by matching class names.

A "lucky break": when the pretrained network already knows some of the target species
(the iNaturalist-birds MobileNetV2 knows most North American birds), the columns of its
classifier for those species are a far better start than random ones. Target classes are
matched to source classes by a normalised name; matched columns are copied, the rest of
the new head keeps its initial values.

Name normalisation (``normalise_name``) produces a matching key, not a display name:

* a CUB ``NNN.`` prefix is dropped (``001.Black_footed_Albatross``);
* parenthesised qualifiers are dropped, so the NABirds classes ``Blue-winged Teal (Male)``
  and ``Blue-winged Teal (Female/juvenile)`` both match the source ``Blue-winged Teal``
  (several target classes may share one source class; that is intended);
* case is folded; ``’`` counts as ``'``; a possessive ``'s`` is dropped, because CUB
  writes ``Anna_Hummingbird`` for ``Anna's Hummingbird``; other apostrophes are dropped;
* spaces, hyphens and underscores are removed altogether, so ``Le_Conte_Sparrow`` meets
  ``LeConte's Sparrow`` and ``Black-and-white`` meets ``Black_and_white``.

Matching is exact on that key; no fuzzy matching, so a match is never a guess. A source
class may carry several names (iNat labels carry the scientific and the common name);
a target matches it through any of them.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import numpy as np

from finegrained.errors import DataError, WeightsError

_CUB_PREFIX = re.compile(r"^\s*\d+\s*\.\s*")
_PARENTHESISED = re.compile(r"\([^()]*\)")
_POSSESSIVE = re.compile(r"'s\b")
_SEPARATORS = re.compile(r"[\s_\-']+")
_INAT_LABEL = re.compile(r"^(?P<scientific>[^()]*?)\s*\((?P<common>[^()]*)\)\s*$")


def normalise_name(name: str) -> str:
    """Matching key of a class name (see the module docstring for the rules)."""
    key = _CUB_PREFIX.sub("", name)
    key = _PARENTHESISED.sub(" ", key)
    key = key.casefold().replace("\u2019", "'").replace("\u2018", "'")
    key = _POSSESSIVE.sub("", key)
    return _SEPARATORS.sub("", key)


def parse_inat_label(line: str) -> tuple[str, ...]:
    """Names of one iNat label line: ``'Poecile atricapillus (Black-capped Chickadee)'`` ->
    ``('Black-capped Chickadee', 'Poecile atricapillus')``; a line without a common name
    (``'background'``) gives just itself."""
    line = line.strip()
    match = _INAT_LABEL.match(line)
    if match is None:
        return (line,)
    return (match["common"].strip(), match["scientific"].strip())


def read_inat_labels(path: str | os.PathLike) -> list[tuple[str, ...]]:
    """All label lines of an iNat label file, each as the names ``parse_inat_label`` gives;
    list index = output index of the classifier."""
    try:
        with open(path, encoding="utf-8") as f:
            return [parse_inat_label(line) for line in f.read().splitlines()]
    except FileNotFoundError:
        raise DataError(path, "class name file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"class name file is not UTF-8 text: {exc}") from None


def _names(entry: str | Sequence[str]) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry)


def match_classes(target_names: Sequence[str],
                  source_names: Sequence[str | Sequence[str]]) -> dict[int, int]:
    """``{target index: source index}`` for every target whose normalised name equals a
    normalised name of a source class. Each source entry is a name or a tuple of alternative
    names. When two source classes share a key the first one wins (a label file listing a
    name twice is a defect of that file, not a reason to refuse)."""
    by_key: dict[str, int] = {}
    for source_index, entry in enumerate(source_names):
        for name in _names(entry):
            key = normalise_name(name)
            if key:
                by_key.setdefault(key, source_index)
    mapping = {}
    for target_index, name in enumerate(target_names):
        source_index = by_key.get(normalise_name(name))
        if source_index is not None:
            mapping[target_index] = source_index
    return mapping


def init_head_from_source(head_kernel: np.ndarray, head_bias: np.ndarray,
                          source_kernel: np.ndarray, source_bias: np.ndarray,
                          mapping: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``head_kernel`` (in, out) and ``head_bias`` (out,) whose column / entry
    ``t`` is replaced by the source's column / entry ``mapping[t]``; unmatched ones are
    left as they were."""
    head_kernel = np.array(head_kernel, copy=True)
    head_bias = np.array(head_bias, copy=True)
    source_kernel = np.asarray(source_kernel)
    source_bias = np.asarray(source_bias)
    if head_kernel.ndim != 2 or source_kernel.ndim != 2:
        raise WeightsError(f"head kernels must be 2-D (in, out); got {head_kernel.shape} "
                           f"and source {source_kernel.shape}")
    if head_kernel.shape[0] != source_kernel.shape[0]:
        raise WeightsError(f"head input width {head_kernel.shape[0]} differs from the "
                           f"source head's {source_kernel.shape[0]} (kernels are (in, out): "
                           f"{head_kernel.shape} vs {source_kernel.shape})")
    if head_bias.shape != (head_kernel.shape[1],) or source_bias.shape != (source_kernel.shape[1],):
        raise WeightsError(f"bias shapes {head_bias.shape} / {source_bias.shape} do not fit "
                           f"kernels {head_kernel.shape} / {source_kernel.shape}")
    if not mapping:
        return head_kernel, head_bias
    targets = np.fromiter(mapping.keys(), dtype=np.int64)
    sources = np.fromiter(mapping.values(), dtype=np.int64)
    for what, idx, size in (("target", targets, head_kernel.shape[1]),
                            ("source", sources, source_kernel.shape[1])):
        bad = idx[(idx < 0) | (idx >= size)]
        if bad.size:
            raise WeightsError(f"{what} class indices out of range 0..{size - 1}: "
                               f"{bad.tolist()}")
    head_kernel[:, targets] = source_kernel[:, sources]
    head_bias[targets] = source_bias[sources]
    return head_kernel, head_bias


def head_init_report(target_names: Sequence[str],
                     source_names: Sequence[str | Sequence[str]],
                     mapping: Mapping[int, int]) -> dict:
    """JSON-ready summary of a head initialisation: counts, the matched pairs and the
    unmatched target names (the caller writes it with ``fileio.write_json``)."""
    return {
        "num_target_classes": len(target_names),
        "num_source_classes": len(source_names),
        "num_matched": len(mapping),
        "num_source_classes_used": len(set(mapping.values())),
        "matched": [
            {"target_index": t, "target_name": target_names[t],
             "source_index": s, "source_name": _names(source_names[s])[0]}
            for t, s in sorted(mapping.items())
        ],
        "unmatched_targets": [name for i, name in enumerate(target_names) if i not in mapping],
        "normalisation": "CUB 'NNN.' prefix and (qualifiers) dropped, casefold, possessive "
                         "'s dropped, spaces/hyphens/underscores/apostrophes removed",
    }
