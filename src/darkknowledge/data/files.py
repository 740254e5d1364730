"""A user's data from files (``--data PATH``): NumPy arrays, a folder of images per class, a CSV or Parquet table.

- ``.npz``: arrays ``x`` (inputs ``[N, ...]``, any numeric dtype) and ``y`` (integer labels ``[N]``); optional
  ``x_test``, ``y_test`` and ``classes`` (strings). Read without pickle.
- a folder holding ``x.npy`` and ``y.npy`` (optional ``x_test.npy``, ``y_test.npy``, ``classes.txt`` one name a
  line): ``x`` is memory-mapped, so it may be larger than RAM; batches read only their rows.
- an image folder in the ImageFolder convention: one sub-folder per class (sorted names are the classes), images
  that Pillow reads (PNG, JPEG, ...); with ``train/`` and ``test/`` sub-folders, those are the splits. All
  grayscale: ``[H, W]``; any colour: every image as RGB ``[3, H, W]``. ``image_size`` resizes (else all must
  share one size). Pixels stay uint8 in memory, ``/ 255`` at batch time (the built-in images' fast path).
- ``.csv`` / ``.parquet``: one row per case, numeric feature columns and a ``label_column`` (numbers or names;
  sorted distinct values are the classes). Features are standardised with the training file's per-column mean and
  standard deviation, a transform recorded in ``model.json`` and reapplied to any data the model is run on.

Every problem is one :class:`DarkKnowledgeError` naming the file and the fix. Loaded sets are cached per process
by (path, size, mtime, options).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import reading
from ..errors import DarkKnowledgeError
from ..memory import available_bytes
from .base import DatasetSplits
from .idx import one_line
from .transfer import ArrayTransferSet, Transform

DEFAULT_VALIDATION_FRACTION = 0.1  # of a user's training cases, when --val-size is not given
MAX_INPUT_DIMS = 4  # an input is [features], [H, W], [C, H, W] or [C, D, H, W]: what model.json records
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TABLE_SUFFIXES = (".csv", ".parquet")
FORMATS = ("a .npz file, a folder with x.npy and y.npy, a folder of class sub-folders of images, or a "
           ".csv/.parquet table")

_loaded: dict[tuple, DatasetSplits] = {}


def data_format(path: Path) -> str:
    """npz, npy, images or table: what ``path`` holds, or a one-line error."""
    if not path.exists():
        raise DarkKnowledgeError(f"--data {path}: no such file or folder; give {FORMATS}")
    if path.is_dir():
        return "npy" if (path / "x.npy").exists() else "images"
    reading.check_file(path, "--data", None)  # a FIFO or a device is no data file, whatever its name
    if path.suffix.lower() == ".npz":
        return "npz"
    if path.suffix.lower() in TABLE_SUFFIXES:
        return "table"
    raise DarkKnowledgeError(f"--data {path}: unknown format {path.suffix or '(no suffix)'}; give {FORMATS}")


def load_files(path: str | os.PathLike, label_column: str | None = None,
               image_size: tuple[int, int] | None = None, transform: Transform | None = None) -> DatasetSplits:
    """The training (and, where the files have one, test) set in ``path``; ``test`` is None when there is none.
    ``transform`` replaces the one the files would get (a saved model's, so its inputs are made as in training)."""
    path = Path(path).expanduser().resolve()
    kind = data_format(path)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, label_column, image_size, transform)
    if key not in _loaded:
        _loaded[key] = LOADERS[kind](path, label_column=label_column, image_size=image_size, transform=transform)
    return _loaded[key]


def _arrays(path: Path, x, y, classes, split: str, transform: Transform | None) -> ArrayTransferSet:
    what = f"{path} ({split})"
    if x.dtype.kind not in "biuf":
        raise DarkKnowledgeError(f"{what}: inputs x are {x.dtype}, not numbers; store numeric arrays")
    if not 2 <= x.ndim <= MAX_INPUT_DIMS + 1 or 0 in x.shape[1:]:
        raise DarkKnowledgeError(f"{what}: inputs x have shape {list(x.shape)}; give x as [N, features] or [N, ...] "
                                 f"with 1 to {MAX_INPUT_DIMS} non-empty dimensions per input (e.g. [N, C, H, W])")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DarkKnowledgeError(f"{what}: labels y must be integers [N] (class indices), got {y.dtype} "
                                 f"{list(y.shape)}; map class names to 0..C-1 first")
    if len(x) != len(y):
        raise DarkKnowledgeError(f"{what}: {len(x)} inputs but {len(y)} labels; give one label per input")
    if len(y) == 0:
        raise DarkKnowledgeError(f"{what}: no cases; the arrays are empty")
    if classes is not None and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
        raise DarkKnowledgeError(f"{what}: labels {int(y.min())}..{int(y.max())} lie outside the {len(classes)} "
                                 f"classes; fix y or list every class in classes")
    if int(y.min()) < 0:
        raise DarkKnowledgeError(f"{what}: label {int(y.min())} is negative; labels are class indices 0..C-1")
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    return ArrayTransferSet(x, y, classes, f"{path.name}/{split}", transform)


def _splits(path: Path, get: Callable[[str], Any], classes, transform) -> DatasetSplits:
    train = _arrays(path, get("x"), get("y"), classes, "train", transform)
    classes = train.classes
    test = None
    if get("x_test") is not None or get("y_test") is not None:
        if get("x_test") is None or get("y_test") is None:
            raise DarkKnowledgeError(f"{path}: give both x_test and y_test, or neither")
        test = _arrays(path, get("x_test"), get("y_test"), classes, "test", train.transform)
        if test.input_shape != train.input_shape:
            raise DarkKnowledgeError(f"{path}: x_test has inputs of shape {list(test.input_shape)} but x has "
                                     f"{list(train.input_shape)}; both must hold the same kind of input")
    return DatasetSplits(train=train, test=test)


def load_npz(path: Path, transform: Transform | None = None, **_) -> DatasetSplits:
    reading.check_file(path, "--data", available_bytes())  # its arrays are read whole
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DarkKnowledgeError(f"{path}: cannot read it as a .npz archive ({one_line(e)}); save it with "
                                 "numpy.savez(path, x=..., y=...)") from None
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            raise DarkKnowledgeError(f"{path}: no array {' or '.join(missing)} (it holds {', '.join(archive.files)}); "
                                     "save inputs as x and labels as y: numpy.savez(path, x=..., y=...)")
        try:
            arrays = {k: archive[k] for k in archive.files}
        except ValueError as e:  # object arrays would need pickle
            raise DarkKnowledgeError(f"{path}: {one_line(e)}; store numbers (and classes as strings), not "
                                     "Python objects") from None
    classes = arrays.get("classes")
    return _splits(path, arrays.get, [str(c) for c in classes.tolist()] if classes is not None else None,
                   transform)


def load_npy_folder(path: Path, transform: Transform | None = None, **_) -> DatasetSplits:
    def get(name: str):
        file = path / f"{name}.npy"
        if not file.exists():
            if name == "y":
                raise DarkKnowledgeError(f"{path}: x.npy has no y.npy beside it; save the labels as y.npy")
            return None
        # inputs memory-mapped (larger than RAM is fine); labels are small and read whole
        reading.check_file(file, "--data", None if name.startswith("x") else available_bytes())
        try:
            return np.load(file, mmap_mode="r" if name.startswith("x") else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DarkKnowledgeError(f"{file}: cannot read it as a .npy array ({one_line(e)}); save it with "
                                     "numpy.save") from None
    names = path / "classes.txt"
    classes = [line.strip() for line in reading.read_bytes(names, "--data", reading.TEXT_LIMIT)
               .decode("utf-8", errors="replace").splitlines() if line.strip()] if names.exists() else None
    return _splits(path, get, classes, transform)


def _parse_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return int(h), int(w)


def _class_folders(root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DarkKnowledgeError(f"{root}: no class sub-folders; put each class's images in a sub-folder named "
                                 f"after the class ({root}/CLASS/IMAGE.png), or give {FORMATS}")
    return folders


def _read_images(root: Path, classes: list[str], size: tuple[int, int] | None, split: str):
    from PIL import Image, UnidentifiedImageError  # Pillow: imported only for image folders

    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not found:
            raise DarkKnowledgeError(f"{folder}: class folder {name!r} holds no images "
                                     f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder")
        files += found
        labels += [label] * len(found)
    images, colour = [], False
    for file in files:
        reading.check_file(file, "--data", reading.TEXT_LIMIT)
        try:
            with Image.open(file) as image:
                image.load()
                colour = colour or image.mode not in ("L", "1", "I;16", "I", "F")
                images.append(image.copy())
        except (OSError, UnidentifiedImageError) as e:
            raise DarkKnowledgeError(f"{file}: Pillow cannot read it ({one_line(e)}); remove or replace the "
                                     "file") from None
    mode = "RGB" if colour else "L"
    first = images[0].size
    pixels = []
    for file, image in zip(files, images):
        image = image.convert(mode)
        if size is not None:
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        elif image.size != first:
            raise DarkKnowledgeError(f"{file}: {image.size[0]}x{image.size[1]} pixels, but {files[0]} has "
                                     f"{first[0]}x{first[1]}; pass --image-size to resize every image to one size")
        array = np.asarray(image, dtype=np.uint8)
        pixels.append(array.transpose(2, 0, 1) if colour else array)  # channels first: [3, H, W]
    return np.stack(pixels), np.asarray(labels, dtype=np.int64)


def load_image_folder(path: Path, image_size=None, transform: Transform | None = None, **_) -> DatasetSplits:
    size = _parse_size(image_size)
    split_roots = {name: path / name for name in ("train", "test") if (path / name).is_dir()}
    train_root = split_roots.get("train", path)
    classes = [p.name for p in _class_folders(train_root)]
    x, y = _read_images(train_root, classes, size, "train")
    train = ArrayTransferSet(torch.from_numpy(x), y, classes, f"{path.name}/train", transform)
    test = None
    if "test" in split_roots:
        extra = sorted({p.name for p in _class_folders(split_roots["test"])} - set(classes))
        if extra:
            raise DarkKnowledgeError(f"{split_roots['test']}: classes {extra} are not in {train_root}; the test "
                                     "split must use the training split's classes")
        present = [c for c in classes if (split_roots["test"] / c).is_dir()]
        xt, yt = _read_images(split_roots["test"], present, size or x.shape[-2:], "test")
        yt = np.asarray([classes.index(present[i]) for i in yt], dtype=np.int64)
        if xt.shape[1:] != x.shape[1:]:
            raise DarkKnowledgeError(f"{split_roots['test']}: images of shape {list(xt.shape[1:])} but training "
                                     f"images are {list(x.shape[1:])}; use one colour mode, or --image-size")
        test = ArrayTransferSet(torch.from_numpy(xt), yt, classes, f"{path.name}/test", train.transform)
    return DatasetSplits(train=train, test=test)


def read_table(path: Path, text: bool = False):
    """A CSV (with a header row), Parquet or JSON Lines file as a pandas DataFrame, read whole; one line when it
    cannot be. ``text``: a table of texts, where an empty CSV cell stays "" (not NaN)."""
    try:
        import pandas as pd
    except ImportError:
        raise DarkKnowledgeError(f"{path}: reading tables needs pandas (and pyarrow for Parquet); install the "
                                 "tables extra: pip install 'darkknowledge[tables]'") from None
    reading.check_file(path, "--data", available_bytes())  # read whole
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        return pd.read_csv(path, keep_default_na=False, na_values=[]) if text else pd.read_csv(path)
    except ImportError as e:
        raise DarkKnowledgeError(f"{path}: {one_line(e)}; install the tables extra: "
                                 "pip install 'darkknowledge[tables]'") from None
    except Exception as e:  # pandas raises many kinds for a malformed file
        raise DarkKnowledgeError(f"{path}: cannot read the table ({one_line(e)}); give a CSV with a header row, "
                                 "a Parquet file or JSON Lines") from None


def load_table(path: Path, label_column: str | None = None, transform: Transform | None = None,
               **_) -> DatasetSplits:
    import pandas as pd
    frame = read_table(path)
    label_column = label_column or "label"
    if label_column not in frame.columns:
        raise DarkKnowledgeError(f"{path}: no label column {label_column!r} (columns: "
                                 f"{', '.join(map(str, frame.columns[:12]))}); pass --label-column NAME")
    features = frame.drop(columns=[label_column])
    text = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if text:
        raise DarkKnowledgeError(f"{path}: feature columns {', '.join(text[:6])} are not numeric; encode them as "
                                 "numbers or drop them")
    if features.shape[1] == 0 or len(frame) == 0:
        raise DarkKnowledgeError(f"{path}: no feature columns or no rows beside the label column {label_column!r}")
    missing = [str(c) for c in features.columns[features.isna().any()]]
    if missing:
        raise DarkKnowledgeError(f"{path}: missing values in {', '.join(missing[:6])}; fill or drop them")
    labels = frame[label_column]
    if labels.isna().any():
        raise DarkKnowledgeError(f"{path}: {int(labels.isna().sum())} rows have no label in {label_column!r}; "
                                 "fill or drop them")
    values = sorted(labels.unique().tolist(), key=lambda v: (isinstance(v, str), v))
    index = {v: i for i, v in enumerate(values)}
    x = np.array(features.to_numpy(dtype=np.float32))  # writable: pandas may hand out a read-only view
    y = labels.map(index).to_numpy(dtype=np.int64)
    if transform is None:  # standardise each feature by the training file's statistics
        std = x.std(0)
        transform = Transform(mean=tuple(float(m) for m in x.mean(0)),
                              std=tuple(float(s) if s > 0 else 1.0 for s in std))
    return DatasetSplits(train=ArrayTransferSet(torch.from_numpy(x), y, [str(v) for v in values],
                                                f"{path.name}/train", transform), test=None)


LOADERS: dict[str, Callable[..., DatasetSplits]] = {"npz": load_npz, "npy": load_npy_folder,
                                                     "images": load_image_folder, "table": load_table}
