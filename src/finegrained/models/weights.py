"""Reading, writing and merging pretrained weights as flat ``{name: array}`` dicts.

Only formats that cannot run code are read: ``.safetensors`` and ``.npz`` without object
arrays. Pickled checkpoints (``.pt``, ``.pth``, ``.pkl``, ``.ckpt``) are refused, because
loading one executes whatever it contains.

``merge_params`` is the one mechanism for every transfer regime (in the manner of
big_vision's ``merge_params``): start from the freshly initialised model, take every
pretrained tensor whose name and shape fit, keep the classifier head (and whatever
``dont_load`` names) from the initialisation, and report every tensor that does not fit in
one error rather than the first one.

Every ``.safetensors`` file the pipeline writes (:func:`save_weights`) carries in its
metadata the sha256 of its own content (:data:`CONTENT_KEY`: the header without that key,
in canonical form, then the tensor bytes), and every read checks it (:func:`read_tensors`),
so a weights file whose bytes changed after its job wrote it (init, pretrained, trained,
a checkpoint's phase weights) is refused, naming the file, wherever it is read. Files made
elsewhere carry no such record and are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from finegrained.errors import WeightsError
from finegrained.fileio import atomic_output

log = logging.getLogger(__name__)

PICKLED_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
#: The metadata key holding a file's own content hash (see the module docstring).
CONTENT_KEY = "finegrained.content_sha256"

CONVERT_HINT = (
    "convert it once on your side with torch and safetensors installed:\n"
    "  python -c \"import sys, torch; from safetensors.torch import save_file; "
    "sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True); "
    "sd = sd.get('state_dict', sd); "
    "save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])\" "
    "model.pth model.safetensors"
)


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` or ``.npz`` file, by name."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLED_SUFFIXES:
        raise WeightsError(
            f"{path}: pickled checkpoints ({', '.join(PICKLED_SUFFIXES)}) are refused, "
            f"because loading one runs arbitrary code; use .safetensors or .npz instead - "
            + CONVERT_HINT)
    if suffix not in (".safetensors", ".npz"):
        raise WeightsError(f"{path}: unknown weights format {suffix!r}; expected "
                           f".safetensors or .npz (pickled formats are refused - "
                           + CONVERT_HINT + ")")
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if suffix == ".safetensors":
        from safetensors.numpy import load
        raw = path.read_bytes()
        try:
            tensors = dict(load(raw))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise WeightsError(f"{path}: not a readable safetensors file: {exc}") from exc
        _check_content(path, raw)
        return tensors
    return _read_npz(path)


def _split(raw: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and its tensor bytes."""
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def _content_sha256(header: Mapping, data: bytes) -> str:
    """The sha256 of a file's header (without :data:`CONTENT_KEY`, canonical JSON) and data."""
    metadata = {k: v for k, v in header.get("__metadata__", {}).items() if k != CONTENT_KEY}
    canonical = {k: v for k, v in header.items() if k != "__metadata__"}
    if metadata:
        canonical["__metadata__"] = metadata
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())
    digest.update(data)
    return digest.hexdigest()


def _check_content(path: Path, raw: bytes) -> None:
    """Refuse a file whose bytes differ from those its writer hashed (no record: as is)."""
    header, data = _split(raw)
    recorded = header.get("__metadata__", {}).get(CONTENT_KEY)
    if recorded is not None and recorded != (actual := _content_sha256(header, data)):
        raise WeightsError(f"{path}: changed since it was written: its content hashes to "
                           f"{actual}, the file records {recorded}; rerun the job that "
                           f"writes it (or delete it)")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    # np.load would take a non-zip file for a pickle (and refuse it); name the real problem.
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: not a readable .npz file (not a zip archive)")
    tensors = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for name in archive.files:
                try:
                    tensors[name] = archive[name]
                except ValueError as exc:  # "Object arrays cannot be loaded when allow_pickle=False"
                    raise WeightsError(
                        f"{path}: array {name!r} holds Python objects (pickled data), which "
                        f"is refused; save plain numeric arrays instead") from exc
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise WeightsError(f"{path}: not a readable .npz file: {exc}") from exc
    return tensors


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (``{}`` if none, and for ``.npz``)."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        return {}
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(f"{path}: metadata is only read from .safetensors files")
    from safetensors import safe_open
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable safetensors file: {exc}") from exc
    metadata.pop(CONTENT_KEY, None)
    return metadata


def weights_metadata(*, arch: str, num_classes: int, class_names: Sequence[str] | None = None,
                     input_recipe: str | None = None, source: str | None = None,
                     **extra: Any) -> dict[str, str]:
    """Metadata for ``save_weights``: every value a string, ``class_names`` as JSON."""
    meta = {"arch": arch, "num_classes": str(int(num_classes))}
    if class_names is not None:
        if len(class_names) != num_classes:
            raise WeightsError(f"{len(class_names)} class names for {num_classes} classes")
        meta["class_names"] = json.dumps(list(class_names))
    if input_recipe is not None:
        meta["input_recipe"] = input_recipe
    if source is not None:
        meta["source"] = source
    meta.update({key: value if isinstance(value, str) else json.dumps(value)
                 for key, value in extra.items()})
    return meta


def save_weights(path: str | os.PathLike, flat: Mapping[str, Any], *,
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``flat`` as a ``.safetensors`` file atomically, with string ``metadata``
    (see ``weights_metadata``)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(f"{path}: weights are saved as .safetensors")
    if metadata is not None:
        bad = {k: type(v).__name__ for k, v in metadata.items()
               if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise WeightsError(f"{path}: safetensors metadata keys and values must be strings; "
                               f"not: {bad}")
    # np.asarray(order='C'), not ascontiguousarray, which turns 0-d arrays into (1,)
    tensors = {name: np.asarray(value, order="C") for name, value in flat.items()}
    data = _deterministic_safetensors(tensors, metadata)
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


def _deterministic_safetensors(tensors: Mapping[str, np.ndarray],
                               metadata: Mapping[str, str] | None) -> bytes:
    """The safetensors bytes of ``tensors`` with a header in sorted key order and the
    file's content hash (:data:`CONTENT_KEY`) in its metadata.

    safetensors keeps the metadata in a hash map, so its key order (and so the file's bytes)
    changes from one process to the next; equal weights must give equal files (hashes in
    provenance, resumed runs). The tensor data and offsets are the library's own; only the
    JSON header is written again, sorted and space-padded to 8 bytes as the format allows.
    """
    from safetensors.numpy import save
    raw = save(dict(tensors), metadata=dict(metadata) if metadata is not None else None)
    header, data = _split(raw)
    header.setdefault("__metadata__", {})[CONTENT_KEY] = _content_sha256(header, data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _shape(array) -> tuple[int, ...]:
    return tuple(np.shape(array))


def merge_params(init: Mapping[str, Any], loaded: Mapping[str, Any], *,
                 replace_head: bool = True, head_prefix: str = "head/",
                 dont_load: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], dict]:
    """Initial tensors overwritten by the pretrained ones that fit.

    ``init`` and ``loaded`` are flat ``{name: array}`` dicts in the model's naming. Names
    starting with ``head_prefix`` (when ``replace_head``) and names that fully match one of
    the ``dont_load`` regular expressions are kept from ``init``, whatever ``loaded`` holds
    for them. Every other name must be in both with the same shape; all that are not are
    listed in one ``WeightsError``. Loaded tensors take the dtype of the initial ones.

    Returns ``(merged, report)``; ``report`` is JSON-ready, for the log.
    """
    try:
        patterns = [re.compile(p) for p in dont_load]
    except re.error as exc:
        raise WeightsError(f"bad dont_load pattern: {exc}") from exc

    def keep_from_init(name: str) -> bool:
        return ((replace_head and name.startswith(head_prefix))
                or any(p.fullmatch(name) for p in patterns))

    missing, wrong_shape = [], []
    merged: dict[str, np.ndarray] = {}
    kept, cast = [], []
    for name, value in init.items():
        value = np.asarray(value)
        if keep_from_init(name):
            merged[name] = value
            kept.append(name)
        elif name not in loaded:
            missing.append(f"  missing from the pretrained weights: {name} "
                           f"(model {_shape(value)}, pretrained: absent)")
        elif _shape(loaded[name]) != value.shape:
            wrong_shape.append(f"  wrong shape: {name} (model {value.shape}, "
                               f"pretrained {_shape(loaded[name])})")
        else:
            source = np.asarray(loaded[name])
            if source.dtype != value.dtype:
                cast.append(name)
            merged[name] = source.astype(value.dtype, copy=False)
    unexpected = [f"  unexpected in the pretrained weights: {name} "
                  f"(model: absent, pretrained {_shape(loaded[name])})"
                  for name in loaded if name not in init and not keep_from_init(name)]
    problems = missing + unexpected + wrong_shape
    if problems:
        raise WeightsError(
            f"{len(problems)} pretrained tensor(s) do not fit the model "
            f"({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong_shape)} wrong shape); keep them from the initialisation with "
            f"dont_load regexes if that is intended:\n" + "\n".join(problems))
    ignored = sorted(name for name in loaded if keep_from_init(name))
    report = {
        "loaded": len(merged) - len(kept),
        "total": len(merged),
        "kept_from_init": kept,
        "replaced_head": bool(replace_head and any(n.startswith(head_prefix) for n in kept)),
        "dont_load": list(dont_load),
        "ignored_from_pretrained": ignored,
        "cast_dtype": cast,
    }
    log.info("pretrained weights: %d of %d tensors loaded, %d kept from init%s",
             report["loaded"], report["total"], len(kept),
             " (head replaced)" if report["replaced_head"] else "")
    return merged, report


def load_pretrained(model, source: str | os.PathLike | Mapping[str, Any], *, arch: str,
                    replace_head: bool = True, dont_load: Sequence[str] = ()) -> dict:
    """Load pretrained weights (a file or a ``{name: array}`` dict, in any layout that
    ``convert.to_flat`` knows) into ``model`` in place; returns ``merge_params``' report."""
    from finegrained.models.convert import to_flat
    from finegrained.models.params import assign_state, flatten_state

    tensors = source if isinstance(source, Mapping) else read_tensors(source)
    merged, report = merge_params(flatten_state(model), to_flat(tensors, arch),
                                  replace_head=replace_head, dont_load=dont_load)
    assign_state(model, merged)
    if not isinstance(source, Mapping):
        report["source"] = os.fspath(source)
    return report
