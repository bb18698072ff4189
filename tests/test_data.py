"""dni_fast.examples.data: loaders, checksum verification and clear errors, on small
fake files made here (plus one check of the real data where it exists)."""
import gzip
import hashlib
import struct

import pytest
import torch

from dni_fast.examples import data


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    data.clear_verification_cache()
    yield
    data.clear_verification_cache()


def _idx(magic: int, arr: torch.Tensor) -> bytes:
    header = struct.pack(">ii", magic, arr.shape[0]) + b"".join(struct.pack(">i", d) for d in arr.shape[1:])
    return gzip.compress(header + bytes(arr.flatten().tolist()))


def _publish(monkeypatch, folder):
    """Make the package know the tiny fake files' hashes as the published ones
    (the real table holds the real files' hashes; no SHA256SUMS is written)."""
    for p in sorted(folder.iterdir()):
        monkeypatch.setitem(data.OFFICIAL_SHA256, f"{folder.name}/{p.name}", hashlib.sha256(p.read_bytes()).hexdigest())


WORD_TRAIN = "the cat sat\na dog ran far\n"
WORD_VALID = "the dog sat\n"
WORD_TEST = "a cat ran\n"
CHAR_TRAIN = "t h e _ c a t\na _ d o g\n"
CHAR_VALID = "t h e\n"
CHAR_TEST = "c a t _ a\n"


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """A data root like /work/shared/data, with tiny files whose hashes the package knows."""
    g = torch.Generator().manual_seed(0)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    imgs = {"train": torch.randint(0, 256, (5, 28, 28), generator=g, dtype=torch.uint8),
            "test": torch.randint(0, 256, (3, 28, 28), generator=g, dtype=torch.uint8)}
    lbls = {"train": torch.tensor([0, 1, 2, 9, 5], dtype=torch.uint8), "test": torch.tensor([7, 3, 3], dtype=torch.uint8)}
    for split, (img_name, lbl_name) in data.MNIST_FILES.items():
        (mnist / img_name).write_bytes(_idx(2051, imgs[split]))
        (mnist / lbl_name).write_bytes(_idx(2049, lbls[split]))
    _publish(monkeypatch, mnist)
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    for name, text in (("train.txt", WORD_TRAIN), ("valid.txt", WORD_VALID), ("test.txt", WORD_TEST)):
        (ptb / name).write_text(text)
    _publish(monkeypatch, ptb)
    ptbc = tmp_path / "ptb-char"
    ptbc.mkdir()
    for name, text in (("ptb.char.train.txt", CHAR_TRAIN), ("ptb.char.valid.txt", CHAR_VALID),
                       ("ptb.char.test.txt", CHAR_TEST)):
        (ptbc / name).write_text(text)
    _publish(monkeypatch, ptbc)
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


def test_published_files_need_no_checksum_file(fake_root):
    root, _, _ = fake_root
    assert not list(root.rglob("SHA256SUMS"))
    data.load_ptb("word", root)


def test_unknown_file_is_verified_by_its_folders_sha256sums(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "extra.txt").write_text("hello\n")
    with pytest.raises(data.DataNotFoundError, match="SHA256SUMS"):
        data.verified_path(folder, "extra.txt")
    digest = hashlib.sha256(b"hello\n").hexdigest()
    (folder / "SHA256SUMS").write_text(f"{digest}  other.txt\n")
    with pytest.raises(data.DataNotFoundError, match="no entry for it"):
        data.verified_path(folder, "extra.txt")
    (folder / "SHA256SUMS").write_text(f"{digest}  extra.txt\n")
    assert data.verified_path(folder, "extra.txt") == folder / "extra.txt"


def test_the_package_knows_every_published_file():
    assert set(data.OFFICIAL_SHA256) == {f"{name}/{f}" for name, (_, _, files) in data.SOURCES.items() for f in files}
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in data.OFFICIAL_SHA256.values())


# -- fetch: download from the published locations, verified ----------------------------
@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_downloads_and_verifies(fake_root, server, tmp_path):
    import tarfile

    src, _, _ = fake_root
    www, url = server
    (www / "mnist").mkdir()
    for p in (src / "mnist").iterdir():
        (www / "mnist" / p.name).write_bytes(p.read_bytes())
    with tarfile.open(www / "simple-examples.tgz", "w:gz") as tar:  # Mikolov's archive layout
        for folder in ("ptb", "ptb-char"):
            for name, member in data.SOURCES[folder][2].items():
                tar.add(src / folder / name, arcname=member)
    dest = tmp_path / "fetched"
    mirrors = {"mnist": [url + "missing/", url + "mnist/"],  # the first mirror fails: the next one is tried
               "ptb": [url + "simple-examples.tgz"], "ptb-char": [url + "simple-examples.tgz"]}
    assert data.fetch(["mnist", "ptb", "ptb-char"], dest, mirrors=mirrors) == dest
    data.clear_verification_cache()
    x, _ = data.load_mnist("train", dest)
    assert x.shape == (5, 28, 28)
    for level in ("word", "char"):
        got, want = data.load_ptb(level, dest), data.load_ptb(level, src)
        assert got.decode(got.train) == want.decode(want.train)


def test_fetch_rejects_a_file_that_is_not_the_published_one(fake_root, server, tmp_path):
    src, _, _ = fake_root
    www, url = server
    (www / "mnist").mkdir()
    for p in (src / "mnist").iterdir():
        (www / "mnist" / p.name).write_bytes(p.read_bytes() + (b"x" if "t10k-labels" in p.name else b""))
    dest = tmp_path / "fetched"
    with pytest.raises(data.DataError, match="did not match the published SHA-256"):
        data.fetch(["mnist"], dest, mirrors={"mnist": [url + "mnist/"]})
    assert not (dest / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()  # the bad file is not kept
    assert (dest / "mnist" / "train-images-idx3-ubyte.gz").exists()


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


def test_auto_falls_back_to_embedded_only_where_no_root_was_named(tmp_path, monkeypatch):
    # nothing named and no ../shared/data: the embedded data
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "_repo_root", lambda: tmp_path / "checkout")
    assert data.load_images("auto", limit_train=10, limit_test=10).name == "digits"
    assert data.load_text("auto", "char").name == "synthetic-char"
    # a root named by $DNI_FAST_DATA or the argument that does not exist is a typo: named, never skipped
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(data.DataNotFoundError, match="nowhere"):
        data.load_images("auto")
    with pytest.raises(data.DataNotFoundError, match="nowhere"):
        data.load_text("auto", "char")
    monkeypatch.delenv(data.ENV_VAR)
    with pytest.raises(data.DataNotFoundError, match="elsewhere"):
        data.load_images("auto", root=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="unknown level 'bogus'"):
        data.load_text("auto", "bogus")


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


def test_missing_extra_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[examples\]" in the dni_fast checkout'):
        data.load_digits()


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
    if root is None or not (root / "mnist").is_dir():
        pytest.skip("no real data folder here (set DNI_FAST_DATA)")
    for sums in root.glob("*/SHA256SUMS"):  # the provider's checksum files agree with the package's table
        for line in sums.read_text().split("\n"):
            if line.strip():
                digest, name = line.split()
                assert data.OFFICIAL_SHA256[f"{sums.parent.name}/{name}"] == digest
    x, y = data.load_mnist("test", root)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,) and int(y.min()) == 0 and int(y.max()) == 9
    if (root / "ptb").is_dir():
        assert len(data.load_ptb("word", root)) == 10000
    if (root / "ptb-char").is_dir():
        assert len(data.load_ptb("char", root)) == 50


# -- found by review -------------------------------------------------------------------------------------------
def test_auto_with_a_named_root_that_lacks_the_data_set_names_it(fake_root, monkeypatch, tmp_path):
    """A root named by $DNI_FAST_DATA (or the argument) that holds no mnist/ (ptb-char/) is a path one level
    off: named, never silently replaced by the embedded data."""
    empty = tmp_path / "other"
    empty.mkdir()
    monkeypatch.setenv(data.ENV_VAR, str(empty))
    with pytest.raises(data.DataNotFoundError, match="mnist"):
        data.load_images("auto")
    with pytest.raises(data.DataNotFoundError, match="ptb-char"):
        data.load_text("auto", "char")
    monkeypatch.delenv(data.ENV_VAR)
    with pytest.raises(data.DataNotFoundError, match="given as an argument"):
        data.load_images("auto", root=empty)
    assert data.load_images("digits", root=empty, limit_train=10, limit_test=10).name == "digits"


def test_a_fetch_that_fails_midway_keeps_no_unverified_file(fake_root, server, tmp_path):
    www, url = server
    (www / "mnist").mkdir()
    (www / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"x" * 1000)  # the rest is missing: 404
    dest = tmp_path / "fetched"
    with pytest.raises(data.DataError, match="could not fetch mnist"):
        data.fetch(["mnist"], dest, mirrors={"mnist": [url + "mnist/"]})
    assert not any((dest / "mnist").iterdir())


def test_fetch_command_without_names_means_all(monkeypatch):
    got = []
    monkeypatch.setattr(data, "fetch", lambda names, root: got.append(list(names)) or "x")
    assert data.main(["fetch"]) == 0 and got == [list(data.SOURCES)]
