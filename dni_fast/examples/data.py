"""Data loaders for the examples: MNIST, Penn Treebank (word and character
level), and embedded defaults that need no files.

Real data sets are read from a data folder laid out as::

    <root>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <root>/ptb/{train,valid,test}.txt
    <root>/ptb-char/ptb.char.{train,valid,test}.txt

Every file is checked, before it is read, against the SHA-256 of the
published file, which this module knows (``OFFICIAL_SHA256``): no checksum
file is needed. (A file this module does not know is checked against a
``SHA256SUMS`` file in its folder instead.) A file is hashed at most once per
process. The root is, in order: the ``root`` argument, ``$DNI_FAST_DATA``,
then ``../shared/data`` relative to the current directory or to the checkout
(the folder holding the ``dni_fast`` package), the first that exists.

Where they come from (``SOURCES``): MNIST (LeCun, Cortes and Burges), the
four IDX files as published; Penn Treebank in Mikolov's preprocessing, the
``data/ptb.*.txt`` (word level: ``train.txt`` etc. here) and
``data/ptb.char.*.txt`` members of his ``simple-examples.tgz``. On a machine
that is online, :func:`fetch` (``python -m dni_fast.examples.data fetch
mnist ptb ptb-char --root DIR``) downloads them from there and keeps them only
if their hashes match.

Embedded defaults (no files):

* :func:`load_digits` -- scikit-learn's 8x8 digits (1,797 images), upsampled
  bilinearly to 28x28 so that the MNIST models run on it unchanged;
* :func:`synthetic_text` -- a small generated English-like corpus for the
  language-model examples (word and character level);
* :func:`copy_task_episode` -- the copy task (Graves et al. 2014) used in the
  paper's RNN experiments.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import random
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "DataError", "DataNotFoundError", "ChecksumError",
    "OFFICIAL_SHA256", "SOURCES", "fetch", "expected_sha256",
    "find_data_root", "data_root", "verified_path", "clear_verification_cache",
    "read_idx", "load_mnist", "load_digits", "ImageData", "load_images",
    "Corpus", "load_ptb", "synthetic_text", "synthetic_corpus", "load_text",
    "copy_task_episode",
]

PathLike = Union[str, os.PathLike]

ENV_VAR = "DNI_FAST_DATA"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
PTB_FILES = {
    "word": ("ptb", {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}),
    "char": ("ptb-char", {"train": "ptb.char.train.txt", "valid": "ptb.char.valid.txt",
                          "test": "ptb.char.test.txt"}),
}
EOS = "<eos>"

#: SHA-256 of the published files, by "<folder>/<file>".
OFFICIAL_SHA256: Dict[str, str] = {
    "mnist/train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "mnist/train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "mnist/t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "mnist/t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "ptb/train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb/valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb/test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    "ptb-char/ptb.char.train.txt": "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
    "ptb-char/ptb.char.valid.txt": "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
    "ptb-char/ptb.char.test.txt": "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
}

_SIMPLE_EXAMPLES = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
#: Where each folder's files are published: (kind, urls, {file: member in the archive}).
#: ``kind`` is "files" (``url + file``) or "tgz" (members of one archive). Mirrors are tried in order.
SOURCES: Dict[str, Tuple[str, Tuple[str, ...], Dict[str, str]]] = {
    "mnist": ("files", ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
              {n: n for n in (*MNIST_FILES["train"], *MNIST_FILES["test"])}),
    "ptb": ("tgz", (_SIMPLE_EXAMPLES,), {"train.txt": "./simple-examples/data/ptb.train.txt",
                                         "valid.txt": "./simple-examples/data/ptb.valid.txt",
                                         "test.txt": "./simple-examples/data/ptb.test.txt"}),
    "ptb-char": ("tgz", (_SIMPLE_EXAMPLES,), {f"ptb.char.{s}.txt": f"./simple-examples/data/ptb.char.{s}.txt"
                                              for s in ("train", "valid", "test")}),
}

_HOW_TO_FIX = (f"set {ENV_VAR} to the folder that holds mnist/, ptb/ and ptb-char/, pass the folder explicitly, "
               f"download the published files into one (online: `python -m dni_fast.examples.data fetch mnist ptb "
               f"ptb-char --root DIR`), or use the embedded default that needs no files "
               f"(--data digits for the MNIST examples, --data synthetic for the language-model examples)")


class DataError(RuntimeError):
    """A data set cannot be used as it is on disk."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The data folder, a data file or its SHA256SUMS is missing."""


class ChecksumError(DataError):
    """A data file's SHA-256 differs from the published one (or its folder's SHA256SUMS)."""


# ---------------------------------------------------------------------------
# Where the data lives
# ---------------------------------------------------------------------------
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]  # <checkout>/dni_fast/examples/data.py


def _candidates(root: Optional[PathLike]) -> List[Tuple[Path, str]]:
    if root is not None:
        return [(Path(root), "the root argument")]
    env = os.environ.get(ENV_VAR)
    if env:
        return [(Path(env), f"${ENV_VAR}")]
    return [(Path.cwd().parent / "shared" / "data", "../shared/data from the current directory"),
            (_repo_root().parent / "shared" / "data", "../shared/data from the dni_fast checkout")]


def find_data_root(root: Optional[PathLike] = None) -> Optional[Path]:
    """The data root that :func:`data_root` would use, or ``None`` where none exists."""
    for path, _ in _candidates(root):
        if path.is_dir():
            return path
    return None


def _auto_root(root: Optional[PathLike]) -> Optional[Path]:
    """The data root for an ``"auto"`` choice: ``None`` (use the embedded data) only where no root was named;
    a root named by the argument or ``$DNI_FAST_DATA`` must exist (a typo must not silently train on the
    embedded data)."""
    if root is not None or os.environ.get(ENV_VAR):
        return data_root(root)
    return find_data_root(root)


def _named(root: Optional[PathLike]) -> str:
    """How the data root was named (``""``: it was not, the default places were searched)."""
    if root is not None:
        return f"{root} (given as an argument)"
    env = os.environ.get(ENV_VAR)
    return f"{env} (${ENV_VAR})" if env else ""


def _refuse_named_root_without(r: Optional[Path], root: Optional[PathLike], folder: str, embedded: str) -> None:
    """``--data auto`` falls back to the embedded data only where no root was named: a named root ``r`` without
    ``folder/`` is a path one level off, named."""
    if r is not None and _named(root):
        raise DataNotFoundError(f"{r / folder} does not exist: the data root {_named(root)} has no {folder}/ "
                                f"folder (a path one level off?). To fix: name the folder that holds {folder}/, "
                                f"fetch it (python -m dni_fast.examples.data fetch {folder} --root {r}), or ask "
                                f"for the embedded data by name ({embedded})")


def data_root(root: Optional[PathLike] = None) -> Path:
    """The data root: ``root``, else ``$DNI_FAST_DATA``, else ``../shared/data``
    (from the current directory or from the checkout). Raises
    :class:`DataNotFoundError` naming every place it looked."""
    found = find_data_root(root)
    if found is not None:
        return found
    tried = "; ".join(f"{p} ({why})" for p, why in _candidates(root))
    raise DataNotFoundError(f"no data folder found (looked at: {tried}). To fix: {_HOW_TO_FIX}")


# ---------------------------------------------------------------------------
# Verification against the published hashes, once per file and process
# ---------------------------------------------------------------------------
_verified: Dict[Tuple[str, int, int], str] = {}
_lock = threading.Lock()


def clear_verification_cache() -> None:
    """Forget which files were verified (the next read hashes them again)."""
    with _lock:
        _verified.clear()


def _read_sums(folder: Path) -> Dict[str, str]:
    sums_path = folder / "SHA256SUMS"
    if not sums_path.is_file():
        raise DataNotFoundError(f"{sums_path} is missing: every data folder needs a SHA256SUMS file "
                                f"(`sha256sum FILES > SHA256SUMS` in the folder, from a trusted copy). To fix: {_HOW_TO_FIX}")
    sums: Dict[str, str] = {}
    for n, line in enumerate(sums_path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{sums_path}:{n}: not a sha256sum line: {line!r}")
        digest, name = parts
        sums[name.lstrip("*").strip()] = digest.lower()
    return sums


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expected_sha256(folder: PathLike, name: str) -> str:
    """The SHA-256 that ``folder/name`` must have: the published file's when
    this module knows it (``OFFICIAL_SHA256``), else the entry in
    ``folder/SHA256SUMS``."""
    folder = Path(folder)
    known = OFFICIAL_SHA256.get(f"{folder.name}/{name}")
    if known is not None:
        return known
    sums = _read_sums(folder)
    if name not in sums:
        raise DataNotFoundError(f"{name} is not a file dni_fast knows, and {folder / 'SHA256SUMS'} has no entry for "
                                f"it, so {folder / name} cannot be verified. To fix: {_HOW_TO_FIX}")
    return sums[name]


def verified_path(folder: PathLike, name: str) -> Path:
    """``folder/name`` after checking its SHA-256 (:func:`expected_sha256`).

    The result is cached per process, keyed by the file's path, size and
    modification time, so a second call costs one ``stat``. Raises
    :class:`DataNotFoundError` (no file) or :class:`ChecksumError` (a hash
    mismatch), each naming the file and the fix.
    """
    folder = Path(folder)
    path = folder / name
    if not path.is_file():
        raise DataNotFoundError(f"data file {path} is missing. To fix: {_HOW_TO_FIX}")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _verified:
            return path
    expected = expected_sha256(folder, name)
    actual = _sha256(path)
    if actual != expected:
        raise ChecksumError(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}; the file is "
                            f"corrupt or not the published one. Replace it with a good copy. To fix: {_HOW_TO_FIX}")
    with _lock:
        _verified[key] = actual
    return path


# ---------------------------------------------------------------------------
# Download from the published locations (online machines only)
# ---------------------------------------------------------------------------
def _download(url: str, dest: Path, timeout: float) -> None:
    import urllib.request

    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)  # a download cut short leaves nothing behind


def fetch(names: Sequence[str] = ("mnist", "ptb", "ptb-char"), root: Optional[PathLike] = None,
          timeout: float = 60.0, mirrors: Optional[Dict[str, Sequence[str]]] = None) -> Path:
    """Download the data sets ``names`` (``mnist``, ``ptb``, ``ptb-char``) from
    their published locations (``SOURCES``; ``mirrors`` replaces a folder's
    URLs) into ``root`` (default ``$DNI_FAST_DATA``, else ``./data``), keep
    each file only if its SHA-256 is the published one, and return the root.
    Files already there and verified are not downloaded again."""
    import tarfile
    import tempfile

    root = Path(root if root is not None else os.environ.get(ENV_VAR) or "data")
    for name in names:
        if name not in SOURCES:
            raise ValueError(f"unknown data set {name!r}; choose from {', '.join(SOURCES)}")
        kind, urls, files = SOURCES[name]
        urls = tuple((mirrors or {}).get(name, urls))
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        todo = [f for f in files if not _is_good(folder, f)]
        if not todo:
            continue
        errors = []
        for url in urls:
            try:
                if kind == "files":
                    for f in todo:
                        _download(url + f, folder / f, timeout)
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        archive = Path(tmp) / "archive.tgz"
                        _download(url, archive, timeout)
                        with tarfile.open(archive) as tar:
                            for f in todo:
                                member = tar.extractfile(files[f])
                                if member is None:
                                    raise DataError(f"{url} has no file {files[f]}")
                                (folder / f).write_bytes(member.read())
            except Exception as e:  # network errors, a missing member: try the next mirror
                errors.append(f"{url}: {type(e).__name__}: {e}")
                for f in todo:  # what this mirror left half-written or unverified is not kept
                    if not _is_good(folder, f):
                        (folder / f).unlink(missing_ok=True)
                continue
            bad = [f for f in todo if not _is_good(folder, f)]
            for f in bad:
                (folder / f).unlink(missing_ok=True)
            if not bad:
                break
            errors.append(f"{url}: {', '.join(bad)} did not match the published SHA-256 (deleted)")
        else:
            raise DataError(f"could not fetch {name} into {folder}: " + "; ".join(errors))
    return root


def _is_good(folder: Path, name: str) -> bool:
    try:
        verified_path(folder, name)
        return True
    except DataError:
        return False


# ---------------------------------------------------------------------------
# MNIST (IDX, gzip)
# ---------------------------------------------------------------------------
_IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1 dim; images: 3 dims


def read_idx(path: PathLike, expected_magic: Optional[int] = None) -> torch.Tensor:
    """Read a gzip-compressed (or plain) IDX file of unsigned bytes: magic
    2049 (labels, ``(N,)``) or 2051 (images, ``(N, rows, cols)``), big-endian
    header. Returns a ``uint8`` tensor."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX data ({type(e).__name__}: {e})") from e
    if len(raw) < 8:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic, n = struct.unpack(">ii", raw[:8])
    if magic not in _IDX_MAGIC:
        raise DataError(f"{path}: bad IDX magic number {magic} (expected 2049 for labels or 2051 for images)")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"{path}: IDX magic number {magic}, expected {expected_magic}")
    ndim = _IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    dims = (n,) + struct.unpack(">" + "i" * (ndim - 1), raw[8:header])
    count = 1
    for d in dims:
        count *= d
    if len(raw) - header != count:
        raise DataError(f"{path}: IDX header says shape {dims} ({count} bytes) but {len(raw) - header} bytes follow")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(*dims)


def load_mnist(split: str = "train", root: Optional[PathLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` (``"train"`` or ``"test"``): ``(images uint8 (N, 28, 28),
    labels int64 (N,))``, verified against the published SHA-256."""
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = data_root(root) / "mnist"
    img_name, lbl_name = MNIST_FILES[split]
    images = read_idx(verified_path(folder, img_name), 2051)
    labels = read_idx(verified_path(folder, lbl_name), 2049)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {img_name} has {images.shape[0]} images but {lbl_name} has {labels.shape[0]} labels")
    return images, labels.long()


def load_digits(test_fraction: float = 0.2, size: int = 28, seed: int = 0) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 8x8 digits (1,797 images, 0-16 grey levels), scaled to
    0-255 ``uint8`` and upsampled bilinearly to ``size x size`` (28 by
    default, so MNIST models run unchanged; ``size=8`` keeps the original
    64 pixels). A stratified split fixed by ``seed``: ``{'train': (x, y),
    'test': (x, y)}``, ``x`` uint8 ``(N, size, size)``, ``y`` int64."""
    from dni_fast.examples._extras import require

    _sk_digits = require("sklearn.datasets", "the embedded digits data set").load_digits

    d = _sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    if size != 8:
        x = torch.nn.functional.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


@dataclass
class ImageData:
    """Normalised images ``(N, 1, H, W)`` float32 and int64 labels, ready for
    the examples. ``name`` is ``"mnist"`` or ``"digits"``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float
    n_classes: int = 10

    @property
    def input_dim(self) -> int:
        return self.x_train[0].numel()


def load_images(name: str = "auto", root: Optional[PathLike] = None, limit_train: Optional[int] = None,
                limit_test: Optional[int] = None) -> ImageData:
    """``name``: ``"mnist"`` (needs the files), ``"digits"`` (embedded), or
    ``"auto"`` (MNIST when a data root with ``mnist/`` exists, else digits).
    Pixels are normalised by the training set's mean and std."""
    if name == "auto":
        r = _auto_root(root)
        name = "mnist" if r is not None and (r / "mnist").is_dir() else "digits"
        if name == "digits":
            _refuse_named_root_without(r, root, "mnist", "--data digits")
    if name == "mnist":
        (xtr, ytr), (xte, yte) = load_mnist("train", root), load_mnist("test", root)
    elif name == "digits":
        d = load_digits()
        (xtr, ytr), (xte, yte) = d["train"], d["test"]
    else:
        raise ValueError(f"unknown image data set {name!r}; choose auto, mnist or digits")
    if limit_train:
        xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    if limit_test:
        xte, yte = xte[:limit_test], yte[:limit_test]
    xtr = xtr.float().div_(255.0)
    xte = xte.float().div_(255.0)
    mean, std = xtr.mean().item(), xtr.std().item()
    return ImageData(name, ((xtr - mean) / std)[:, None], ytr, ((xte - mean) / std)[:, None], yte, mean, std)


# ---------------------------------------------------------------------------
# Text: Penn Treebank and the embedded corpus
# ---------------------------------------------------------------------------
@dataclass
class Corpus:
    """A tokenised corpus: ``train``/``valid``/``test`` int64 token ids and the
    vocabulary (ids in order of first appearance, train first)."""

    name: str
    level: str
    vocab: List[str] = field(default_factory=list)
    train: torch.Tensor = None  # type: ignore[assignment]
    valid: torch.Tensor = None  # type: ignore[assignment]
    test: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.stoi: Dict[str, int] = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, tokens: Sequence[str]) -> torch.Tensor:
        ids = []
        for t in tokens:
            i = self.stoi.get(t)
            if i is None:
                i = self.stoi[t] = len(self.vocab)
                self.vocab.append(t)
            ids.append(i)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> List[str]:
        return [self.vocab[int(i)] for i in ids]


def _tokens(lines: Sequence[str]) -> List[str]:
    """One token per word (word level) or character (char level, where the file
    separates characters by spaces), plus ``<eos>`` at the end of every line."""
    out: List[str] = []
    for line in lines:
        out.extend(line.split())
        out.append(EOS)
    return out


def load_ptb(level: str = "word", root: Optional[PathLike] = None, max_lines: Optional[int] = None) -> Corpus:
    """Penn Treebank, ``level="word"`` (``ptb/``, 10k words + ``<eos>``) or
    ``"char"`` (``ptb-char/``: characters separated by spaces, ``_`` is the
    word boundary; 49 symbols + ``<eos>``). Every line ends with ``<eos>``.
    ``max_lines`` keeps only the first lines of each split (a quick slice)."""
    if level not in PTB_FILES:
        raise ValueError(f"level must be 'word' or 'char', got {level!r}")
    sub, files = PTB_FILES[level]
    folder = data_root(root) / sub
    corpus = Corpus(f"ptb-{level}", level)
    for split in ("train", "valid", "test"):
        with open(verified_path(folder, files[split]), encoding="utf-8") as f:
            lines = f.read().splitlines()
        if max_lines:
            lines = lines[:max_lines]
        setattr(corpus, split, corpus.encode(_tokens(lines)))
    return corpus


_NOUNS = ["cat", "dog", "bird", "child", "teacher", "farmer", "market", "river", "city", "garden", "engineer",
          "doctor", "student", "company", "village", "ship"]
_VERBS = ["sees", "likes", "finds", "follows", "helps", "builds", "watches", "visits", "sells", "paints"]
_ADJS = ["old", "small", "green", "quiet", "busy", "bright", "cold", "large", "happy", "strange"]
_PLACES = ["near the river", "in the city", "by the old mill", "at the market", "under the bridge", "on the hill"]
_ADVS = ["today", "again", "slowly", "every morning", "at night", "once"]


def _sentence(rng: random.Random) -> str:
    def np_() -> str:
        det = rng.choice(["the", "a", "every", "one"])
        adj = rng.choice(_ADJS) + " " if rng.random() < 0.5 else ""
        return f"{det} {adj}{rng.choice(_NOUNS)}"

    s = f"{np_()} {rng.choice(_VERBS)} {np_()}"
    if rng.random() < 0.4:
        s += " " + rng.choice(_PLACES)
    if rng.random() < 0.3:
        s += f" and {rng.choice(_VERBS)} {np_()}"
    if rng.random() < 0.3:
        s += " " + rng.choice(_ADVS)
    if rng.random() < 0.15:  # a long-range bracket: "( ... )" must be closed
        s = f"( {s} )"
    return s


def synthetic_text(n_lines: int, seed: int = 0) -> List[str]:
    """``n_lines`` sentences from a small probabilistic grammar (about 70
    words), deterministic given ``seed``. The embedded stand-in for PTB."""
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n_lines)]


def synthetic_corpus(level: str = "word", n_train: int = 2000, n_valid: int = 200, n_test: int = 200,
                     seed: int = 0) -> Corpus:
    """The embedded text corpus at ``level`` ``"word"`` or ``"char"``. The
    character level mimics ``ptb.char``: characters, ``_`` between words."""
    if level not in ("word", "char"):
        raise ValueError(f"level must be 'word' or 'char', got {level!r}")
    corpus = Corpus(f"synthetic-{level}", level)
    for split, n, s in (("train", n_train, seed), ("valid", n_valid, seed + 1), ("test", n_test, seed + 2)):
        lines = synthetic_text(n, s)
        if level == "char":
            lines = [" ".join(line.replace(" ", "_")) for line in lines]
        setattr(corpus, split, corpus.encode(_tokens(lines)))
    return corpus


def load_text(name: str = "auto", level: str = "word", root: Optional[PathLike] = None,
              max_lines: Optional[int] = None) -> Corpus:
    """``name``: ``"ptb"`` (needs the files), ``"synthetic"`` (embedded) or
    ``"auto"`` (PTB when the data root has it, else synthetic)."""
    if level not in PTB_FILES:
        raise ValueError(f"unknown level {level!r}; choose {' or '.join(map(repr, PTB_FILES))}")
    if name == "auto":
        r = _auto_root(root)
        name = "ptb" if r is not None and (r / PTB_FILES[level][0]).is_dir() else "synthetic"
        if name == "synthetic":
            _refuse_named_root_without(r, root, PTB_FILES[level][0], "--data synthetic")
    if name == "ptb":
        return load_ptb(level, root, max_lines)
    if name == "synthetic":
        return synthetic_corpus(level)
    raise ValueError(f"unknown text data set {name!r}; choose auto, ptb or synthetic")


# ---------------------------------------------------------------------------
# Copy task
# ---------------------------------------------------------------------------
def copy_task_episode(batch: int, length: int, n_symbols: int = 8,
                      generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One copy-task episode per batch row (Graves et al. 2014, as in the DNI
    paper, with symbols instead of bit vectors): ``length`` random symbols, a
    delimiter, then ``length`` blank steps during which the symbols must be
    reproduced in order.

    Returns ``inputs`` int64 ``(2*length+1, batch)`` with symbols in
    ``0..n_symbols-1``, ``n_symbols`` for the delimiter and ``n_symbols+1`` for
    blank, and ``targets`` int64 of the same shape, ``-1`` (ignore) except at
    the ``length`` recall steps.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    seq = torch.randint(0, n_symbols, (length, batch), generator=generator)
    delim = torch.full((1, batch), n_symbols, dtype=torch.long)
    blank = torch.full((length, batch), n_symbols + 1, dtype=torch.long)
    inputs = torch.cat([seq, delim, blank])
    targets = torch.cat([torch.full((length + 1, batch), -1, dtype=torch.long), seq])
    return inputs, targets


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dni_fast.examples.data fetch NAMES [--root DIR]`` or ``check [--root DIR]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dni_fast.examples.data", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and verify the published files")
    # (checked below: argparse checks a "*" positional's empty or default list against its choices as one value,
    # and `fetch` alone failed)
    f.add_argument("names", nargs="*", help=f"any of {', '.join(SOURCES)} (default: all)")
    f.add_argument("--root", default=None)
    c = sub.add_parser("check", help="verify every known file under a data root")
    c.add_argument("--root", default=None)
    args = p.parse_args(argv)
    if args.cmd == "fetch":
        unknown = [n for n in args.names if n not in SOURCES]
        if unknown:
            f.error(f"unknown data set(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
        print(f"fetched into {fetch(args.names or list(SOURCES), args.root)}")
        return 0
    root = data_root(args.root)
    bad = 0
    for key in OFFICIAL_SHA256:
        folder, name = key.split("/")
        try:
            verified_path(root / folder, name)
            print(f"ok       {root / key}")
        except DataError as e:
            bad += 1
            print(f"FAILED   {root / key}: {str(e).split('. To fix')[0]}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
