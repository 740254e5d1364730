"""The IDX datasets' files: names, sizes, SHA-256 checksums, official mirrors, and verified download.

Checksums are those of the original gzip files (the MD5s torchvision checks match the same files).
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .. import __version__
from ..errors import DarkKnowledgeError
from .idx import hash_file, one_line, sha256_file

DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class RemoteFile:
    """One original file: its name on the mirrors and on disk, its size and SHA-256."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class IdxSource:
    """A dataset shipped as the four MNIST-style IDX files."""

    name: str
    classes: tuple[str, ...]
    homepage: str
    mirrors: tuple[str, ...]  # base URLs, tried in order
    train_images: RemoteFile
    train_labels: RemoteFile
    test_images: RemoteFile
    test_labels: RemoteFile

    @property
    def files(self) -> tuple[RemoteFile, ...]:
        return self.train_images, self.train_labels, self.test_images, self.test_labels


SOURCES: dict[str, IdxSource] = {
    "mnist": IdxSource(
        name="mnist",
        classes=tuple(str(d) for d in range(10)),
        homepage="http://yann.lecun.com/exdb/mnist/",
        # The S3 copy first: it is what torchvision uses, and the original site often refuses scripts.
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        train_images=RemoteFile("train-images-idx3-ubyte.gz", 9912422,
                                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        train_labels=RemoteFile("train-labels-idx1-ubyte.gz", 28881,
                                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        test_images=RemoteFile("t10k-images-idx3-ubyte.gz", 1648877,
                               "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        test_labels=RemoteFile("t10k-labels-idx1-ubyte.gz", 4542,
                               "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ),
    "fashion-mnist": IdxSource(
        name="fashion-mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        train_images=RemoteFile("train-images-idx3-ubyte.gz", 26421880,
                                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        train_labels=RemoteFile("train-labels-idx1-ubyte.gz", 29515,
                                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        test_images=RemoteFile("t10k-images-idx3-ubyte.gz", 4422102,
                               "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        test_labels=RemoteFile("t10k-labels-idx1-ubyte.gz", 5148,
                               "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    ),
}


def fetch_url(url: str, out: BinaryIO) -> None:
    """Stream ``url`` into ``out``. The only network access; tests replace it."""
    request = urllib.request.Request(url, headers={"User-Agent": f"darkknowledge/{__version__}"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        shutil.copyfileobj(response, out, 1 << 20)


def ensure_files(source: IdxSource, folder: Path, download: bool) -> None:
    """Make sure ``folder`` holds the source's four original files, downloading missing ones if allowed."""
    missing = [f for f in source.files if not (folder / f.name).is_file()]
    if missing and not download:
        names = ", ".join(f.name for f in missing)
        hint = ""
        if (folder.parent / missing[0].name).is_file():
            hint = (f" ({missing[0].name} is in {folder.parent}: the data folder must be the parent of "
                    f"{source.name}/, not {source.name}/ itself)")
        raise DarkKnowledgeError(
            f"{source.name}: {'file' if len(missing) == 1 else 'files'} {names} not found in {folder}{hint}; "
            f"put the four original IDX .gz files there, set DARKKNOWLEDGE_DATA or --data-dir to their parent "
            f"folder, or pass --download")
    for remote in source.files:
        if remote in missing:
            download_file(source, remote, folder)  # verified before it is renamed into place
        else:
            _verify(source, remote, folder / remote.name)


def _verify(source: IdxSource, remote: RemoteFile, path: Path) -> None:
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise DarkKnowledgeError(f"{source.name}: cannot read {path} ({one_line(e)}); check its permissions") from None
    if digest != remote.sha256:
        raise DarkKnowledgeError(
            f"{source.name}: checksum mismatch for {path} (SHA-256 {digest[:16]}..., expected "
            f"{remote.sha256[:16]}...; {path.stat().st_size} bytes, expected {remote.size}); the file is damaged "
            f"or not the original: delete it and pass --download, or copy the original again")


def download_file(source: IdxSource, remote: RemoteFile, folder: Path) -> None:
    """Fetch ``remote`` into ``folder`` from the first mirror that serves the right bytes.

    Bytes go to a temporary file beside the target and are renamed into place only once their SHA-256 matches,
    so an interrupted or bad download never leaves a file under the real name.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{remote.name}.", suffix=".part", dir=folder)
    except OSError as e:
        raise DarkKnowledgeError(f"{source.name}: cannot write to {folder} ({one_line(e)}); "
                                 f"pass --data-dir a writable folder") from None
    os.close(fd)
    failures = []
    try:
        for url in (base + remote.name for base in source.mirrors):
            try:
                with open(tmp, "wb") as out:
                    fetch_url(url, out)
                    out.flush()
                    os.fsync(out.fileno())  # durable before the rename makes it visible
            except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
                failures.append(f"{url} ({one_line(e)})")
                continue
            if hash_file(Path(tmp)) == remote.sha256:
                os.replace(tmp, folder / remote.name)
                return
            failures.append(f"{url} (SHA-256 checksum mismatch: {os.path.getsize(tmp)} bytes that are not "
                            f"the original file)")
    finally:
        Path(tmp).unlink(missing_ok=True)
    raise DarkKnowledgeError(f"{source.name}: could not download {remote.name}: {'; '.join(failures)}; "
                             f"copy the four original files by hand from {source.homepage} into {folder}")
