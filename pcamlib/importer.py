"""Import image folders and the Kaggle layout into PCam-format HDF5 files.

Two source layouts are supported:

- :func:`import_image_folders`: ``src/{split}/{0,1}/*.{jpg,jpeg,png,tif,tiff}``, the label
  being the folder name (the layout of the shared real PCam subset).
- :func:`import_kaggle`: the Kaggle "Histopathologic Cancer Detection" layout,
  ``src/train/<id>.tif`` plus ``src/train_labels.csv`` (``id,label``), split into
  train/valid/test by a seeded stratified split.

Images are decoded with PIL and must already be 96x96 RGB: nothing is ever resized or
converted. Every import runs in two passes: a cheap header check (size and mode, no
decoding) that fixes the number of rows, then decoding and writing chunk by chunk, so
memory stays bounded. All splits are written into a staging folder inside ``dest`` and
moved into place only once every split succeeded: a failing import leaves the files
already in ``dest`` untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pcamlib.errors import InputError

from .pcam import IMAGE_SHAPE, SPLITS, PCamFormatError, PCamWriter, check_split, file_name

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
"""File extensions read from label folders (case-insensitive)."""

ON_BAD: tuple[str, ...] = ("error", "skip")
"""Accepted values of ``on_bad``."""

LABEL_DIRS: tuple[str, ...] = ("0", "1")
"""Label folder names of the image-folder layout."""

KAGGLE_LABELS_CSV = "train_labels.csv"
"""Label file of the Kaggle layout."""

_PATCH_RE = re.compile(r"patch(\d+)")
_HEIGHT, _WIDTH, _CHANNELS = IMAGE_SHAPE


@dataclass(frozen=True)
class SkippedFile:
    """An image left out under ``on_bad="skip"``.

    Attributes:
        path: The image file.
        reason: What was wrong with it.
    """

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class SplitImport:
    """What was imported into one split.

    Attributes:
        split: Split name.
        rows: Rows written.
        positives: Rows labelled 1.
        skipped: Images left out (only under ``on_bad="skip"``).
        seconds: Time spent checking, decoding and writing this split.
    """

    split: str
    rows: int
    positives: int
    skipped: list[SkippedFile] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ImportResult:
    """Outcome of an import.

    Attributes:
        src: Source folder.
        dest: Destination folder (holds the PCam-format files).
        splits: Per split, in :data:`~pcamlib.pcam.SPLITS` order.
        seconds: Wall time of the whole import.
    """

    src: Path
    dest: Path
    splits: dict[str, SplitImport]
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        """Rows written over all splits."""
        return sum(s.rows for s in self.splits.values())

    @property
    def positives(self) -> int:
        """Rows labelled 1 over all splits."""
        return sum(s.positives for s in self.splits.values())

    @property
    def skipped(self) -> list[SkippedFile]:
        """Images left out over all splits."""
        return [f for s in self.splits.values() for f in s.skipped]

    def summary(self) -> str:
        """Human-readable report: one line per split, then every skipped file."""
        lines = [f"imported {self.src} -> {self.dest} in {self.seconds:.1f} s"]
        for s in self.splits.values():
            lines.append(
                f"  {s.split}: {s.rows:,} rows, {s.positives:,} positives, "
                f"{len(s.skipped):,} skipped, {s.seconds:.1f} s"
            )
        skipped = self.skipped
        if skipped:
            lines.append(f"skipped {len(skipped):,} bad images:")
            lines.extend(f"  {f}" for f in skipped)
        return "\n".join(lines)


@dataclass(frozen=True)
class _Item:
    """One source image: where it is, its label and its meta row."""

    path: Path
    label: int
    meta: dict


class _Plan(NamedTuple):
    """One split to write: its images, those already skipped, time spent, meta columns."""

    items: list[_Item]
    skipped: list[SkippedFile]
    seconds: float
    columns: list[str]


class _BadImage(Exception):
    """An image that cannot be imported; the message says why."""


def _check_on_bad(on_bad: str) -> None:
    if on_bad not in ON_BAD:
        raise InputError(f"on_bad must be one of {', '.join(map(repr, ON_BAD))}; got {on_bad!r}")


def _check_image(im: Image.Image) -> None:
    if im.size != (_WIDTH, _HEIGHT):
        raise _BadImage(
            f"image is {im.size[0]}x{im.size[1]} (width x height), expected "
            f"{_WIDTH}x{_HEIGHT}; images are never resized"
        )
    if im.mode != "RGB":
        raise _BadImage(f"image mode is {im.mode!r}, expected 'RGB'; images are never converted")


def _probe(path: Path) -> None:
    """Check size and mode from the header only (no decoding); raise :class:`_BadImage`."""
    try:
        with Image.open(path) as im:
            _check_image(im)
    except _BadImage:
        raise
    except Exception as err:  # PIL raises many types for unreadable files
        raise _BadImage(f"not a readable image ({type(err).__name__}: {err})") from None


def _decode(path: Path) -> np.ndarray:
    """Decode one image to a 96 x 96 x 3 uint8 array; raise :class:`_BadImage`."""
    try:
        with Image.open(path) as im:
            _check_image(im)
            im.load()
            arr = np.asarray(im)
    except _BadImage:
        raise
    except Exception as err:  # truncated or corrupt data behind a valid header
        raise _BadImage(f"cannot decode image ({type(err).__name__}: {err})") from None
    if arr.shape != IMAGE_SHAPE or arr.dtype != np.uint8:
        raise _BadImage(f"decoded to {arr.shape} {arr.dtype}, expected {IMAGE_SHAPE} uint8")
    return arr


def _bad(path: Path, reason: str) -> PCamFormatError:
    return PCamFormatError(f"{path}: {reason} (on_bad='skip' leaves bad images out)")


def _check_headers(
    items: list[_Item], on_bad: str, progress: bool, desc: str
) -> tuple[list[_Item], list[SkippedFile]]:
    """First pass: keep the items whose header is fine; raise or skip the others."""
    good: list[_Item] = []
    skipped: list[SkippedFile] = []
    for item in tqdm(items, desc=desc, unit="img", disable=not progress, leave=False):
        try:
            _probe(item.path)
        except _BadImage as err:
            if on_bad == "error":
                raise _bad(item.path, str(err)) from None
            skipped.append(SkippedFile(item.path, str(err)))
            continue
        good.append(item)
    return good, skipped


def _write_split(
    stage: Path,
    split: str,
    items: list[_Item],
    columns: Sequence[str],
    *,
    on_bad: str,
    chunk_rows: int,
    progress: bool,
) -> tuple[int, int, list[SkippedFile]]:
    """Second pass: decode and write ``items`` into ``stage``, chunk by chunk.

    An image whose header passed but whose data cannot be decoded raises under
    ``on_bad="error"``. Under ``"skip"`` the remaining images are still decoded (not
    written) to find every such file, then the split is rewritten once without them, so
    the declared length is always right.

    Returns:
        Rows written, positives, and the images skipped in this pass.
    """
    skipped: list[SkippedFile] = []
    for _attempt in range(2):
        if not items:
            raise PCamFormatError(f"{split}: no readable images left to import")
        failures: list[SkippedFile] = []
        writer = PCamWriter(stage, split, len(items), meta=True)
        try:
            with tqdm(
                total=len(items), desc=f"import {split}", unit="img", disable=not progress
            ) as bar:
                for start in range(0, len(items), chunk_rows):
                    chunk = items[start:start + chunk_rows]
                    images = np.empty((len(chunk), *IMAGE_SHAPE), dtype=np.uint8)
                    for i, item in enumerate(chunk):
                        try:
                            images[i] = _decode(item.path)
                        except _BadImage as err:
                            if on_bad == "error":
                                raise _bad(item.path, str(err)) from None
                            failures.append(SkippedFile(item.path, str(err)))
                    bar.update(len(chunk))
                    if not failures:
                        labels = np.fromiter((it.label for it in chunk), np.uint8, len(chunk))
                        meta = pd.DataFrame([it.meta for it in chunk], columns=list(columns))
                        if "source_row" in meta.columns:
                            meta["source_row"] = meta["source_row"].astype("Int64")
                        writer.write(images, labels, meta)
            if not failures:
                info = writer.close()
                return info.length, info.positives, skipped
        except BaseException:
            writer.abort()
            raise
        writer.abort()
        skipped.extend(failures)
        bad = {f.path for f in failures}
        items = [it for it in items if it.path not in bad]
    raise PCamFormatError(
        f"{split}: images changed while being imported (new decoding failures on the "
        "second pass); rerun the import"
    )


def _run_import(
    src: Path,
    dest: Path,
    plan: dict[str, _Plan],
    *,
    on_bad: str,
    chunk_rows: int,
    progress: bool,
    started: float,
) -> ImportResult:
    """Write every planned split into a staging folder, then move all into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".pcam-import-", dir=dest))
    results: dict[str, SplitImport] = {}
    try:
        for split in SPLITS:
            if split not in plan:
                continue
            items, skipped, seconds, columns = plan[split]
            t0 = time.perf_counter()
            rows, positives, late = _write_split(
                stage, split, items, columns,
                on_bad=on_bad, chunk_rows=chunk_rows, progress=progress,
            )
            results[split] = SplitImport(
                split=split,
                rows=rows,
                positives=positives,
                skipped=skipped + late,
                seconds=seconds + time.perf_counter() - t0,
            )
        # Every split is complete and validated: only now replace files in ``dest``.
        for split in results:
            for kind in ("x", "y", "meta"):
                os.replace(stage / file_name(split, kind), dest / file_name(split, kind))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ImportResult(
        src=src, dest=dest, splits=results, seconds=time.perf_counter() - started
    )


def _check_chunk_rows(chunk_rows: int) -> None:
    if chunk_rows <= 0:
        raise InputError(f"chunk_rows must be positive, got {chunk_rows}")


# --------------------------------------------------------------------------- folders


def _sort_key(item: _Item) -> tuple:
    row = item.meta.get("source_row")
    name = item.path.name
    # PCam's patchNNNNNNN files sort by official row (numerically, whatever the padding),
    # any other names after them by name; the label breaks ties.
    return (0, row, name, item.label) if row is not None else (1, 0, name, item.label)


def _list_split(src: Path, split: str) -> tuple[list[_Item], list[tuple[Path, Path]]]:
    """Image files of one split folder, in row order, and names found in both label folders."""
    split_dir = src / split
    if not split_dir.is_dir():
        raise PCamFormatError(f"{split_dir}: split folder not found")
    extra = sorted(
        p.name for p in split_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in LABEL_DIRS
    )
    if extra:
        raise PCamFormatError(
            f"{split_dir}: unexpected folders {extra}; label folders must be named 0 and 1"
        )
    items: list[_Item] = []
    by_name: dict[str, Path] = {}
    both: list[tuple[Path, Path]] = []
    for label_name in LABEL_DIRS:
        label_dir = split_dir / label_name
        if not label_dir.is_dir():
            raise PCamFormatError(
                f"{label_dir}: label folder missing (expected {split_dir / '0'} and "
                f"{split_dir / '1'})"
            )
        with os.scandir(label_dir) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if not entry.is_file():
                    continue
                path = Path(entry.path)
                if name in by_name:
                    both.append((by_name[name], path))
                by_name[name] = path
                match = _PATCH_RE.fullmatch(path.stem)
                meta = {
                    "source_file": path.relative_to(src).as_posix(),
                    "label": int(label_name),
                    "source_row": int(match.group(1)) if match else None,
                }
                items.append(_Item(path, int(label_name), meta))
    if not items:
        raise PCamFormatError(
            f"{split_dir}: no images in {split_dir / '0'} or {split_dir / '1'} "
            f"(looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    items.sort(key=_sort_key)
    return items, both


def import_image_folders(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    on_bad: str = "error",
    chunk_rows: int = 1024,
    progress: bool = True,
) -> ImportResult:
    """Import ``src/{split}/{0,1}/*`` image folders into PCam-format files in ``dest``.

    Rows are ordered by file name across both label folders; files named
    ``patchNNNNNNN`` (the shared real PCam subset) are ordered by that number, which is
    the row index in the official split, so the official row order is kept. The order
    is deterministic. Each image must be 96x96 RGB (JPEG, PNG or TIFF); nothing is
    resized or converted. The meta CSV of each split has columns ``source_file`` (path
    relative to ``src``), ``label`` and, when any file is named ``patchNNNNNNN``,
    ``source_row`` (empty for other names).

    Args:
        src: Folder holding ``train``, ``valid`` and/or ``test``, each with label
            folders ``0`` and ``1``.
        dest: Destination folder (created if needed).
        splits: Splits to import; None imports every split folder present.
        on_bad: ``"error"`` raises on the first bad image; ``"skip"`` leaves bad images
            out and lists them in the result.
        chunk_rows: Images decoded and written per chunk (bounds memory).
        progress: Show progress bars.

    Returns:
        Rows, positives, skipped files and timings per split.

    Raises:
        PCamFormatError: a missing or empty folder, a file name present in both label
            folders, or (under ``on_bad="error"``) an unreadable image, one that is not
            96x96 or not RGB, naming the file and what was expected versus found. Files
            already in ``dest`` are left untouched.
        ValueError: an unknown split name or option.
    """
    started = time.perf_counter()
    src, dest = Path(src), Path(dest)
    _check_on_bad(on_bad)
    _check_chunk_rows(chunk_rows)
    if not src.is_dir():
        raise PCamFormatError(f"{src}: source folder not found")
    if splits is None:
        splits = [s for s in SPLITS if (src / s).is_dir()]
        if not splits:
            found = sorted(p.name for p in src.iterdir() if p.is_dir())
            raise PCamFormatError(
                f"{src}: no split folders: expected one or more of {', '.join(SPLITS)} "
                f"(found folders {found})"
            )
    else:
        splits = [check_split(s) for s in splits]
        if not splits:
            raise InputError("splits is empty: name at least one split, or pass None")
    plan: dict[str, _Plan] = {}
    for split in SPLITS:
        if split not in splits:
            continue
        t0 = time.perf_counter()
        items, both = _list_split(src, split)
        skipped: list[SkippedFile] = []
        if both:
            first = both[0]
            reason = "the same file name is in both label folders 0 and 1"
            if on_bad == "error":
                raise _bad(
                    first[0], f"{reason} ({first[1]}; {len(both)} such names in {split})"
                )
            clash = {p.name for pair in both for p in pair}
            skipped = [SkippedFile(it.path, reason) for it in items if it.path.name in clash]
            items = [it for it in items if it.path.name not in clash]
        items, bad = _check_headers(items, on_bad, progress, f"check {split}")
        columns = ["source_file", "label"]
        if any(it.meta["source_row"] is not None for it in items):
            columns.append("source_row")
        plan[split] = _Plan(items, skipped + bad, time.perf_counter() - t0, columns)
    return _run_import(
        src, dest, plan, on_bad=on_bad, chunk_rows=chunk_rows, progress=progress,
        started=started,
    )


# ---------------------------------------------------------------------------- Kaggle


def _read_kaggle_labels(csv_path: Path) -> pd.DataFrame:
    """Read and check ``train_labels.csv``: columns id and label, labels 0/1, unique ids."""
    if not csv_path.is_file():
        raise PCamFormatError(
            f"{csv_path}: label file not found (the Kaggle layout has train/<id>.tif and "
            f"{KAGGLE_LABELS_CSV} with columns id,label)"
        )
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PCamFormatError(f"{csv_path}: not a readable CSV: {err}") from err
    missing = [c for c in ("id", "label") if c not in table.columns]
    if missing:
        raise PCamFormatError(
            f"{csv_path}: missing column(s) {missing}; expected columns id,label "
            f"(found {list(table.columns)})"
        )
    if table.empty:
        raise PCamFormatError(f"{csv_path}: no rows")
    ids = table["id"].str.strip()
    empty = np.flatnonzero((ids == "").to_numpy())
    if empty.size:
        raise PCamFormatError(f"{csv_path}: empty id on data row {empty[0] + 1}")
    labels = table["label"].str.strip()
    bad = np.flatnonzero(~labels.isin(["0", "1"]).to_numpy())
    if bad.size:
        i = bad[0]
        raise PCamFormatError(
            f"{csv_path}: label must be 0 or 1; id {ids.iloc[i]!r} (data row {i + 1}) has "
            f"{labels.iloc[i]!r} ({bad.size:,} bad rows)"
        )
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        names = list(dict.fromkeys(dup))
        raise PCamFormatError(
            f"{csv_path}: duplicate ids: {', '.join(map(repr, names[:5]))}"
            + (f" and {len(names) - 5:,} more" if len(names) > 5 else "")
        )
    return pd.DataFrame({"id": ids, "label": labels.astype(np.uint8)})


def _split_counts(n: int, valid_fraction: float, test_fraction: float) -> dict[str, int]:
    """Rows of one class per split: rounded fractions, at least one in every split."""
    counts = {
        "valid": max(1, round(valid_fraction * n)) if valid_fraction > 0 else 0,
        "test": max(1, round(test_fraction * n)) if test_fraction > 0 else 0,
    }
    while counts["valid"] + counts["test"] > n - 1:  # train keeps at least one
        larger = max(counts, key=lambda k: counts[k])
        counts[larger] -= 1
    counts["train"] = n - counts["valid"] - counts["test"]
    return counts


def _stratified_split(
    labels: np.ndarray, valid_fraction: float, test_fraction: float, seed: int, where: Path
) -> dict[str, np.ndarray]:
    """Seeded stratified split of row indices into train/valid/test (each sorted).

    Each class is split on its own with :func:`sklearn.model_selection.train_test_split`
    and rounded counts, so every split gets at least one image of each class even for
    tiny inputs (sklearn's ``stratify=`` may leave a class out of a small split).
    """
    from sklearn.model_selection import train_test_split  # heavy; only needed here

    names = ["train"] + [s for s, f in (("valid", valid_fraction), ("test", test_fraction)) if f]
    parts: dict[str, list[np.ndarray]] = {s: [] for s in names}
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        if len(idx) < len(names):
            raise PCamFormatError(
                f"{where}: {len(idx)} usable image(s) labelled {cls}; need at least "
                f"{len(names)} to put one of each class in every split ({', '.join(names)})"
            )
        counts = _split_counts(len(idx), valid_fraction, test_fraction)
        rest = idx
        for split in ("test", "valid"):
            if counts[split]:
                rest, taken = train_test_split(rest, test_size=counts[split], random_state=seed)
                parts[split].append(taken)
        parts["train"].append(rest)
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def import_kaggle(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    on_bad: str = "error",
    chunk_rows: int = 1024,
    progress: bool = True,
) -> ImportResult:
    """Import the Kaggle "Histopathologic Cancer Detection" layout into PCam-format files.

    The source holds ``train/<id>.tif`` and ``train_labels.csv`` (columns ``id,label``).
    The labelled images are split into train/valid/test by a seeded stratified split:
    each class is divided by the given fractions (rounded, at least one image per split),
    so every split holds both classes. Within a split, rows keep the order of the CSV.
    The meta CSV of each split has columns ``source_file`` (``train/<id>.tif``),
    ``label`` and ``kaggle_id``. Images must be 96x96 RGB; nothing is resized or
    converted. Bad images are found before splitting, so under ``on_bad="skip"`` the
    split is made over the usable images.

    Args:
        src: Folder with ``train/`` and ``train_labels.csv``.
        dest: Destination folder (created if needed).
        valid_fraction: Share of each class put in ``valid`` (0 for no valid split).
        test_fraction: Share of each class put in ``test`` (0 for no test split).
        seed: Seed of the split; the same seed and data give the same split.
        on_bad: ``"error"`` raises on the first bad image; ``"skip"`` leaves bad images
            out and lists them in the result.
        chunk_rows: Images decoded and written per chunk (bounds memory).
        progress: Show progress bars.

    Returns:
        Rows, positives, skipped files and timings per split.

    Raises:
        PCamFormatError: a missing or malformed label file (no id/label columns, a label
            not 0 or 1, duplicate ids), an id without its image file, too few images of
            a class to give each split one, or (under ``on_bad="error"``) a bad image,
            naming the file and what was expected versus found. Files already in
            ``dest`` are left untouched.
        ValueError: fractions out of range or an unknown option.
    """
    started = time.perf_counter()
    src, dest = Path(src), Path(dest)
    _check_on_bad(on_bad)
    _check_chunk_rows(chunk_rows)
    for name, frac in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 <= frac < 1:
            raise InputError(f"{name} must be in [0, 1), got {frac}")
    if valid_fraction + test_fraction >= 1:
        raise InputError(
            f"valid_fraction + test_fraction must be below 1, got {valid_fraction + test_fraction}"
        )
    if not src.is_dir():
        raise PCamFormatError(f"{src}: source folder not found")
    csv_path = src / KAGGLE_LABELS_CSV
    table = _read_kaggle_labels(csv_path)
    image_dir = src / "train"
    if not image_dir.is_dir():
        raise PCamFormatError(f"{image_dir}: image folder not found (expected train/<id>.tif)")
    items: list[_Item] = []
    missing: list[tuple[str, Path]] = []
    for kaggle_id, label in zip(table["id"], table["label"], strict=True):
        path = image_dir / f"{kaggle_id}.tif"
        if not path.is_file():
            missing.append((kaggle_id, path))
            continue
        meta = {"source_file": f"train/{path.name}", "label": int(label), "kaggle_id": kaggle_id}
        items.append(_Item(path, int(label), meta))
    if missing:
        kaggle_id, path = missing[0]
        raise PCamFormatError(
            f"{csv_path}: id {kaggle_id!r} has no image: expected {path}"
            + (f" ({len(missing):,} ids without an image)" if len(missing) > 1 else "")
        )
    t0 = time.perf_counter()
    items, skipped = _check_headers(items, on_bad, progress, "check images")
    check_seconds = time.perf_counter() - t0
    labels = np.fromiter((it.label for it in items), np.uint8, len(items))
    assignment = _stratified_split(labels, valid_fraction, test_fraction, seed, csv_path)
    columns = ["source_file", "label", "kaggle_id"]
    plan: dict[str, _Plan] = {}
    for split, idx in assignment.items():
        share = len(idx) / max(len(items), 1)
        plan[split] = _Plan([items[i] for i in idx], [], check_seconds * share, columns)
    # Images skipped by the header check belong to no split yet: report them under train.
    plan["train"].skipped.extend(skipped)
    return _run_import(
        src, dest, plan, on_bad=on_bad, chunk_rows=chunk_rows, progress=progress,
        started=started,
    )
