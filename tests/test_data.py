"""dni_fast.data: loaders, checksum verification and clear errors, on small
fake files made here (plus one check of the real data where it exists)."""
import gzip
import hashlib
import struct

import pytest
import torch

from dni_fast import data


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    data.clear_verification_cache()
    yield
    data.clear_verification_cache()


def _idx(magic: int, arr: torch.Tensor) -> bytes:
    header = struct.pack(">ii", magic, arr.shape[0]) + b"".join(struct.pack(">i", d) for d in arr.shape[1:])
    return gzip.compress(header + bytes(arr.flatten().tolist()))


def _write_sums(folder):
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
             for p in sorted(folder.iterdir()) if p.name != "SHA256SUMS"]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


WORD_TRAIN = "the cat sat\na dog ran far\n"
WORD_VALID = "the dog sat\n"
WORD_TEST = "a cat ran\n"
CHAR_TRAIN = "t h e _ c a t\na _ d o g\n"
CHAR_VALID = "t h e\n"
CHAR_TEST = "c a t _ a\n"


@pytest.fixture
def fake_root(tmp_path):
    """A data root like /work/shared/data, with tiny files and their SHA256SUMS."""
    g = torch.Generator().manual_seed(0)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    imgs = {"train": torch.randint(0, 256, (5, 28, 28), generator=g, dtype=torch.uint8),
            "test": torch.randint(0, 256, (3, 28, 28), generator=g, dtype=torch.uint8)}
    lbls = {"train": torch.tensor([0, 1, 2, 9, 5], dtype=torch.uint8), "test": torch.tensor([7, 3, 3], dtype=torch.uint8)}
    for split, (img_name, lbl_name) in data.MNIST_FILES.items():
        (mnist / img_name).write_bytes(_idx(2051, imgs[split]))
        (mnist / lbl_name).write_bytes(_idx(2049, lbls[split]))
    _write_sums(mnist)
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    for name, text in (("train.txt", WORD_TRAIN), ("valid.txt", WORD_VALID), ("test.txt", WORD_TEST)):
        (ptb / name).write_text(text)
    _write_sums(ptb)
    ptbc = tmp_path / "ptb-char"
    ptbc.mkdir()
    for name, text in (("ptb.char.train.txt", CHAR_TRAIN), ("ptb.char.valid.txt", CHAR_VALID),
                       ("ptb.char.test.txt", CHAR_TEST)):
        (ptbc / name).write_text(text)
    _write_sums(ptbc)
    return tmp_path, imgs, lbls


# -- good files ------------------------------------------------------------------
def test_mnist_loads_shapes_and_values(fake_root):
    root, imgs, lbls = fake_root
    for split in ("train", "test"):
        x, y = data.load_mnist(split, root)
        assert x.dtype == torch.uint8 and x.shape == imgs[split].shape
        assert torch.equal(x, imgs[split])
        assert y.dtype == torch.int64 and torch.equal(y, lbls[split].long())


def test_load_images_normalises_mnist(fake_root):
    root, imgs, _ = fake_root
    d = data.load_images("mnist", root)
    assert d.name == "mnist" and d.x_train.shape == (5, 1, 28, 28) and d.x_test.shape == (3, 1, 28, 28)
    assert d.input_dim == 784
    assert abs(d.x_train.mean().item()) < 1e-5 and abs(d.x_train.std().item() - 1) < 1e-4
    raw = imgs["train"].float() / 255
    assert torch.allclose(d.x_train[:, 0] * d.std + d.mean, raw, atol=1e-5)


def test_ptb_word_level(fake_root):
    root, _, _ = fake_root
    c = data.load_ptb("word", root)
    assert c.decode(c.train) == "the cat sat <eos> a dog ran far <eos>".split()
    assert c.decode(c.valid) == "the dog sat <eos>".split()
    assert c.decode(c.test) == "a cat ran <eos>".split()
    assert c.train.dtype == torch.int64 and len(c) == len(set(c.vocab)) == 8
    assert c.vocab[:4] == ["the", "cat", "sat", "<eos>"]  # ids in order of first appearance, train first


def test_ptb_char_level(fake_root):
    root, _, _ = fake_root
    c = data.load_ptb("char", root)
    assert c.decode(c.train) == list("the_cat") + ["<eos>"] + list("a_dog") + ["<eos>"]
    assert c.decode(c.test) == list("cat_a") + ["<eos>"]
    assert "_" in c.vocab and " " not in c.vocab


def test_max_lines_slice(fake_root):
    root, _, _ = fake_root
    c = data.load_ptb("word", root, max_lines=1)
    assert c.decode(c.train) == "the cat sat <eos>".split()


def test_env_var_selects_root(fake_root, monkeypatch):
    root, imgs, _ = fake_root
    monkeypatch.setenv(data.ENV_VAR, str(root))
    assert data.data_root() == root
    x, _ = data.load_mnist("test")
    assert torch.equal(x, imgs["test"])


def test_argument_beats_env_var(fake_root, monkeypatch, tmp_path_factory):
    root, _, _ = fake_root
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path_factory.mktemp("elsewhere")))
    assert data.data_root(root) == root


def test_verification_is_cached(fake_root, monkeypatch):
    root, _, _ = fake_root
    data.load_mnist("train", root)
    calls = []
    monkeypatch.setattr(data, "_sha256", lambda p: calls.append(p) or "0" * 64)
    data.load_mnist("train", root)  # cached: no hashing
    assert calls == []
    data.clear_verification_cache()
    with pytest.raises(data.ChecksumError):
        data.load_mnist("train", root)


def test_changed_file_is_verified_again(fake_root):
    root, _, _ = fake_root
    data.load_ptb("word", root)
    (root / "ptb" / "valid.txt").write_text("the dog sat on the mat\n")  # new size: cache key changes
    with pytest.raises(data.ChecksumError, match="valid.txt"):
        data.load_ptb("word", root)


# -- clear errors ------------------------------------------------------------------
def test_corrupt_file_raises_with_both_hashes(fake_root):
    root, _, _ = fake_root
    path = root / "mnist" / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    expected = hashlib.sha256(raw).hexdigest()
    raw[len(raw) // 2] ^= 0x01  # one byte changed
    path.write_bytes(bytes(raw))
    actual = hashlib.sha256(raw).hexdigest()
    with pytest.raises(data.ChecksumError) as e:
        data.load_mnist("test", root)
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and expected in msg and actual in msg
    assert data.ENV_VAR in msg and "--data digits" in msg  # says how to fix it


def test_corrupt_text_file_raises(fake_root):
    root, _, _ = fake_root
    path = root / "ptb-char" / "ptb.char.train.txt"
    path.write_bytes(path.read_bytes().replace(b"d", b"D", 1))
    with pytest.raises(data.ChecksumError, match="ptb.char.train.txt"):
        data.load_ptb("char", root)


def test_missing_file_raises(fake_root):
    root, _, _ = fake_root
    (root / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataNotFoundError) as e:
        data.load_mnist("train", root)
    assert "train-labels-idx1-ubyte.gz" in str(e.value) and data.ENV_VAR in str(e.value)
    assert isinstance(e.value, FileNotFoundError)


def test_missing_sha256sums_raises(fake_root):
    root, _, _ = fake_root
    (root / "ptb" / "SHA256SUMS").unlink()
    with pytest.raises(data.DataNotFoundError, match="SHA256SUMS"):
        data.load_ptb("word", root)


def test_file_without_checksum_entry_raises(fake_root):
    root, _, _ = fake_root
    sums = root / "ptb" / "SHA256SUMS"
    sums.write_text("".join(l + "\n" for l in sums.read_text().splitlines() if "test.txt" not in l))
    with pytest.raises(data.DataNotFoundError, match="no entry for test.txt"):
        data.load_ptb("word", root)


def test_missing_folder_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    assert data.find_data_root() is None
    with pytest.raises(data.DataNotFoundError, match="nowhere"):
        data.load_mnist()
    with pytest.raises(data.DataNotFoundError, match=data.ENV_VAR):
        data.data_root()


def test_missing_subfolder_raises(fake_root):
    root, _, _ = fake_root
    for p in (root / "ptb-char").iterdir():
        p.unlink()
    (root / "ptb-char").rmdir()
    with pytest.raises(data.DataNotFoundError, match="ptb.char.train.txt"):
        data.load_ptb("char", root)


def test_bad_idx_magic_raises(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(_idx(1234, torch.zeros(2, 2, dtype=torch.uint8)))
    with pytest.raises(data.DataError, match="magic"):
        data.read_idx(p)
    p.write_bytes(_idx(2049, torch.zeros(3, dtype=torch.uint8)))
    with pytest.raises(data.DataError, match="expected 2051"):
        data.read_idx(p, 2051)


def test_truncated_idx_raises(tmp_path):
    p = tmp_path / "x.gz"
    good = gzip.decompress(_idx(2051, torch.zeros(2, 4, 4, dtype=torch.uint8)))
    p.write_bytes(gzip.compress(good[:-3]))
    with pytest.raises(data.DataError, match="bytes follow"):
        data.read_idx(p)


def test_auto_falls_back_to_embedded(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    assert data.load_images("auto", limit_train=10, limit_test=10).name == "digits"
    assert data.load_text("auto", "char").name == "synthetic-char"


# -- embedded defaults ---------------------------------------------------------------
def test_digits():
    d = data.load_digits()
    (xtr, ytr), (xte, yte) = d["train"], d["test"]
    assert xtr.shape[1:] == (28, 28) and xtr.dtype == torch.uint8
    assert len(xtr) + len(xte) == 1797 and 340 <= len(xte) <= 380
    assert set(ytr.tolist()) == set(range(10)) == set(yte.tolist())
    d8 = data.load_digits(size=8)
    assert d8["train"][0].shape[1:] == (8, 8)
    assert torch.equal(data.load_digits()["test"][0], xte)  # deterministic


def test_synthetic_corpus():
    w = data.synthetic_corpus("word", n_train=50, n_valid=5, n_test=5)
    c = data.synthetic_corpus("char", n_train=50, n_valid=5, n_test=5)
    assert w.train.numel() > 200 and "<eos>" in w.vocab and len(w) < 100
    assert "_" in c.vocab and all(len(t) == 1 or t == "<eos>" for t in c.vocab)
    assert torch.equal(data.synthetic_corpus("word", n_train=50, n_valid=5, n_test=5).train, w.train)


def test_copy_task_episode():
    g = torch.Generator().manual_seed(0)
    x, y = data.copy_task_episode(4, 5, n_symbols=8, generator=g)
    assert x.shape == y.shape == (11, 4)
    assert torch.equal(y[6:], x[:5]) and (y[:6] == -1).all()
    assert (x[5] == 8).all() and (x[6:] == 9).all() and x[:5].max() < 8


# -- the real data, where it exists ----------------------------------------------------
def test_real_data_if_present():
    root = data.find_data_root()
    if root is None or not (root / "mnist" / "SHA256SUMS").is_file():
        pytest.skip("no real data folder here (set DNI_FAST_DATA)")
    x, y = data.load_mnist("test", root)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,) and int(y.min()) == 0 and int(y.max()) == 9
    if (root / "ptb").is_dir():
        assert len(data.load_ptb("word", root)) == 10000
    if (root / "ptb-char").is_dir():
        assert len(data.load_ptb("char", root)) == 50
