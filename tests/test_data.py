"""data.py and augment.py: tokenizer, synthetic set, CSV and tar sources, sharding, determinism."""

import io
import os
import random
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

import augment
import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- tokenizer ---------------------------------------------------------------------------------------

def test_tokenizer_loads_with_the_network_blocked():
    code = ("import socket\n"
            "def refuse(*a, **k): raise OSError('network blocked by the test')\n"
            "socket.socket.connect = refuse; socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
            "import data; print(data.tokenize(['a red circle']).shape)\n")
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": "/nonexistent-cache", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 77])" in out.stdout


def test_tokenize_ends_with_eot_and_pads():
    tokens = data.tokenize(["a red circle", "word " * 200], context_length=16)
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    short, long = tokens[0].tolist(), tokens[1].tolist()
    n = short.index(data.EOT_TOKEN)
    assert data.get_encoding().decode(short[:n]) == "a red circle"
    assert short[n + 1:] == [data.PAD_TOKEN] * (16 - n - 1)
    assert long[-1] == data.EOT_TOKEN and data.EOT_TOKEN not in long[:-1]  # truncated, still ends with EOT
    assert data.get_encoding().n_vocab == data.VOCAB_SIZE


def test_special_token_text_is_ordinary_text():
    tokens = data.tokenize(["before <|endoftext|> after"], context_length=32)[0].tolist()
    assert tokens.count(data.EOT_TOKEN) == 1  # only the one we append
    assert data.decode(torch.tensor(tokens)) == "before <|endoftext|> after"


# --- synthetic data ----------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_seed_dependent():
    a, b = data.SyntheticPairs("train", 32, seed=0), data.SyntheticPairs("train", 32, seed=0)
    c = data.SyntheticPairs("train", 32, seed=1)
    for i in (0, 5, 12345):
        (ia, ca, la), (ib, cb, lb) = a[i], b[i]
        assert ia.tobytes() == ib.tobytes() and ca == cb and la == lb
    assert any(a[i][0].tobytes() != c[i][0].tobytes() for i in range(8))
    held_out = data.SyntheticPairs("val", 32, seed=0)
    assert all(held_out[i][0].tobytes() != a[i][0].tobytes() for i in range(8))


def test_synthetic_classes_are_balanced_and_named_in_captions():
    source = data.SyntheticPairs("val", 32)
    n_classes = len(data.SYNTHETIC_CLASSNAMES)
    assert n_classes >= 40 and 1 / n_classes < 0.03
    labels = [source[i][2] for i in range(2 * n_classes)]
    assert sorted(labels) == sorted(list(range(n_classes)) * 2)
    for i in range(n_classes):
        _, caption, label = source[i]
        colour, shape = data.SYNTHETIC_CLASSNAMES[label].split()
        assert colour in caption and shape in caption


@pytest.mark.parametrize("size", [32, 224])
def test_synthetic_any_size(size):
    image, caption, _ = data.SyntheticPairs("train", size)[3]
    assert image.size == (size, size) and image.mode == "RGB" and caption


# --- augmentations -----------------------------------------------------------------------------------

def test_views_are_deterministic_under_a_seed_and_have_the_right_shape():
    image = augment.pixels(data.SyntheticPairs("train", 64)[0][0])
    for view in (augment.CLIPView(48), augment.StrongView(48), augment.CLIPView(48, scale=(0.5, 1.0))):
        (x, p), (y, q) = view(image, random.Random(7)), view(image, random.Random(7))
        assert x.shape == (3, 48, 48) and x.dtype == torch.uint8 and torch.equal(x, y)
        assert len(p) == len(augment.IDENTITY) and p == q
        assert any(not torch.equal(x, view(image, random.Random(s))[0]) for s in range(8, 12))
    x = augment.EvalView(40)(Image.new("RGB", (80, 50)))
    assert x.shape == (3, 40, 40)
    norm = augment.normalize(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8))
    assert norm.dtype == torch.float32 and torch.allclose(norm[0, :, 0, 0],
                                                          (1 - torch.tensor(augment.MEAN)) / torch.tensor(augment.STD))


def test_text_ops():
    text = "a photo of the red circle on a dark background"
    assert augment.remove_stopwords(text, random.Random(0), p=1.0) == "photo red circle dark background"
    assert augment.remove_stopwords("the a of", random.Random(0), p=1.0) == "the a of"  # nothing left: keep
    assert augment.remove_stopwords(text, random.Random(0), p=0.0) == text
    swapped = augment.random_swap(text, random.Random(3))
    assert sorted(swapped.split()) == sorted(text.split()) and swapped != text
    deleted = augment.random_deletion(text, random.Random(1), p=0.5)
    assert 1 <= len(deleted.split()) < len(text.split()) and set(deleted.split()) <= set(text.split())
    view = augment.TextView(stopword_p=0.8, eda=True)
    assert [view(text, random.Random(s)) for s in range(20)] == [view(text, random.Random(s)) for s in range(20)]


# --- CSV ---------------------------------------------------------------------------------------------

def write_png(path, colour):
    Image.new("RGB", (40, 30), colour).save(path)


@pytest.fixture
def csv_dir(tmp_path):
    (tmp_path / "img").mkdir()
    rows = ["filepath,caption"]
    for i in range(8):
        write_png(tmp_path / "img" / f"{i}.png", (30 * i, 0, 0))
        rows.append(f"img/{i}.png,picture number {i}")
    rows.append("img/missing.png,a file that is not there")
    rows.append("img/3.png,")  # empty caption
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows.append("img/corrupt.png,a corrupt image")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_csv_skips_and_counts_bad_rows(csv_dir):
    source = data.CsvPairs(str(csv_dir / "pairs.csv"))
    assert len(source) == 11
    dataset = data.PairDataset(source, [augment.CLIPView(16)], [augment.TextView()], context_length=8)
    seen, skipped = [], 0
    for i in range(len(source)):
        images, tokens, params, n_bad, *_ = dataset[(0, i)]
        assert images.shape == (1, 3, 16, 16) and tokens.shape == (1, 8)
        seen.append(data.decode(tokens[0]))
        skipped += n_bad
    # rows 8 (missing file), 9 (empty caption), 10 (corrupt image) each fall through to the next readable row,
    # wrapping round to row 0: asking for 8 passes over 3 bad rows, 9 over 2, 10 over 1
    assert skipped == 6
    assert set(seen) == {f"picture number {i}" for i in range(8)}


def test_csv_errors_name_the_column_and_the_flag(csv_dir):
    with pytest.raises(ValueError, match="no column 'path'.*--csv-img-key"):
        data.CsvPairs(str(csv_dir / "pairs.csv"), img_key="path")
    with pytest.raises(ValueError, match="--csv-caption-key"):
        data.CsvPairs(str(csv_dir / "pairs.csv"), caption_key="text")
    (csv_dir / "pairs.tsv").write_text("filepath\tcaption\nimg/0.png\tzero\n")
    assert len(data.CsvPairs(str(csv_dir / "pairs.tsv"))) == 1
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.CsvPairs(str(csv_dir / "nope.csv"))


def test_a_mostly_unreadable_source_stops_with_a_clear_error(tmp_path):
    rows = ["filepath,caption"] + [f"missing{i}.png,caption {i}" for i in range(20)]
    (tmp_path / "bad.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit, match="unreadable"):  # one line at start-up, no traceback
        data.build_loader(str(tmp_path / "bad.csv"), 2, [augment.CLIPView(16)], [augment.TextView()])
    source = data.CsvPairs(str(tmp_path / "bad.csv"))
    dataset = data.PairDataset(source, [augment.CLIPView(16)], [augment.TextView()], max_bad_in_a_row=5)
    with pytest.raises(RuntimeError, match="5 unreadable samples in a row"):
        dataset[(0, 0)]


# --- tar shards --------------------------------------------------------------------------------------

def jpeg_bytes(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def add_file(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_shards(root, n_shards=4, per_shard=6):
    """Shards of good samples 'sample S-I'; shard 0 also holds a corrupt JPEG and a sample without a
    caption; the last shard is truncated in the middle of a sample. Returns the good captions."""
    good = []
    for s in range(n_shards):
        path = os.path.join(root, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                add_file(tar, f"{key}.jpg", jpeg_bytes((10 * i, 20 * s, 100)))
                add_file(tar, f"{key}.txt", f"sample {s}-{i}".encode())
                add_file(tar, f"{key}.json", b"{}")
                good.append(f"sample {s}-{i}")
            if s == 0:
                add_file(tar, "bad01.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
                add_file(tar, "bad01.txt", b"corrupt image")
                add_file(tar, "bad02.jpg", jpeg_bytes((0, 0, 0)))  # no caption
        if s == n_shards - 1:
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)
            with tarfile.open(path, "r|") as tar:  # what survives the cut
                survivors = set()
                try:
                    for m in tar:
                        if m.name.endswith(".txt"):
                            survivors.add(tar.extractfile(m).read().decode())
                except tarfile.ReadError:
                    pass
            good = [g for g in good if not g.startswith(f"sample {s}-") or g in survivors]
    return good


def read_epoch(urls, rank, world_size, workers, epoch_count=1, seed=0):
    dataset = data.TarShards(urls, [augment.CLIPView(16)], [augment.TextView()], context_length=12, seed=seed,
                             rank=rank, world_size=world_size, workers=workers, shuffle_buffer=4, epochs=epoch_count)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    out = []
    for images, tokens, params, bad, stream, epoch, position in loader:
        assert images.shape == (1, 3, 16, 16)
        out.append((int(epoch), data.decode(tokens[0]), int(bad)))
    return out


def test_tar_shards_skip_bad_samples_and_a_truncated_shard(tmp_path):
    good = write_shards(str(tmp_path))
    urls = data.expand_braces(str(tmp_path / "{00000..00003}.tar"))
    assert len(urls) == 4 and urls[0].endswith("00000.tar")
    samples = read_epoch(urls, rank=0, world_size=1, workers=0)
    assert sorted(s[1] for s in samples) == sorted(good)
    assert sum(s[2] for s in samples) >= 2  # corrupt JPEG and missing caption (+ the truncated shard)


def test_two_ranks_two_workers_read_each_good_sample_once_per_epoch(tmp_path):
    good = write_shards(str(tmp_path), n_shards=8)
    urls = data.expand_braces(str(tmp_path / "{00000..00007}.tar"))
    per_rank = [read_epoch(urls, rank, 2, workers=2, epoch_count=2) for rank in range(2)]
    epochs = [[text for rank in per_rank for e, text, _ in rank if e == epoch] for epoch in (0, 1)]
    for texts in epochs:
        assert sorted(texts) == sorted(good)  # every good sample exactly once per epoch
    assert epochs[0] != epochs[1]  # and in another order the next epoch
    with pytest.raises(ValueError, match="fewer --workers or more shards"):
        data.TarShards(urls[:3], [], [], world_size=2, workers=2)


def test_expand_braces():
    assert data.expand_braces("a/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar"]
    assert data.expand_braces("{x,y}/{01..02}.tar::z.tar") == ["x/01.tar", "x/02.tar", "y/01.tar", "y/02.tar", "z.tar"]


# --- loader ------------------------------------------------------------------------------------------

def test_rank_batches_side_by_side_equal_the_single_process_batch():
    one = data.EpochBatches(100, batch_size=8, rank=0, world_size=1, seed=3)
    two = [data.EpochBatches(100, batch_size=4, rank=r, world_size=2, seed=3) for r in range(2)]
    it1, it2 = iter(one), [iter(s) for s in two]
    for _ in range(30):  # crosses epoch boundaries (12 steps per epoch)
        assert next(it1) == next(it2[0]) + next(it2[1])
    epoch0 = [i for b in list(zip(range(12), iter(one))) for i in b[1]]
    assert len(set(epoch0)) == 96  # no repeats within an epoch; the tail of 4 is dropped
    resumed = iter(data.EpochBatches(100, batch_size=8, seed=3, start_step=17))
    straight = iter(one)
    for _ in range(17):
        next(straight)
    assert [next(resumed) for _ in range(10)] == [next(straight) for _ in range(10)]


def test_loader_batches_do_not_depend_on_the_number_of_workers():
    views = ([augment.CLIPView(16), augment.StrongView(16)], [augment.TextView(0.8), augment.TextView(0.8, eda=True)])
    batches = []
    for workers in (0, 2):
        loader = data.build_loader("synthetic", 6, *views, workers=workers, seed=5, context_length=24, image_size=16,
                                   start_step=3)
        it = iter(loader)
        batches.append([next(it) for _ in range(3)])
        assert loader.step == 6
    for (i0, t0, p0), (i2, t2, p2) in zip(*batches):
        assert i0.shape == (6, 2, 3, 16, 16) and i0.dtype == torch.uint8 and t0.shape[:2] == (6, 2)
        assert t0.shape[2] <= 24  # cut after the batch's last end-of-text token
        assert p0.shape == (6, 2, len(augment.IDENTITY)) and p0.dtype == torch.float32
        assert torch.equal(i0, i2) and torch.equal(t0, t2) and torch.equal(p0, p2)


def test_tar_loader_resumes_at_the_same_sample(tmp_path):
    write_shards(str(tmp_path), n_shards=4, per_shard=10)
    spec = str(tmp_path / "{00000..00003}.tar")
    views = ([augment.CLIPView(16)], [augment.TextView()])
    straight = data.build_loader(spec, 3, *views, workers=2, context_length=12)
    it = iter(straight)
    reference = [data.decode(next(it)[1][0, 0]) for _ in range(12)]
    first = data.build_loader(spec, 3, *views, workers=2, context_length=12)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    resumed = data.build_loader(spec, 3, *views, workers=2, context_length=12, start_step=5, state=state)
    it = iter(resumed)
    assert [data.decode(next(it)[1][0, 0]) for _ in range(7)] == reference[5:]


def test_tar_samples_are_counted_as_they_are_grouped(tmp_path):
    """Names with './' or a dotted directory: count_tar_samples (the epoch length) must count the samples that
    tar_samples yields. It used to cut keys at the first dot of the whole path: one sample per shard."""
    path = str(tmp_path / "shard.tar")
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            add_file(tar, f"./{i:06d}.jpg", jpeg_bytes((10 * i, 0, 0)))
            add_file(tar, f"./{i:06d}.txt", f"caption {i}".encode())
        for i in range(2):
            add_file(tar, f"v1.2/{i:06d}.seg.png", b"mask")  # another part of the same sample
            add_file(tar, f"v1.2/{i:06d}.jpg", jpeg_bytes((0, 10 * i, 0)))
            add_file(tar, f"v1.2/{i:06d}.txt", f"dotted {i}".encode())
    grouped = [key for key, files, _ in data.tar_samples(path) if "jpg" in files]
    assert len(grouped) == 5 and data.count_tar_samples([path]) == 5


def test_an_unreadable_shard_is_reported_when_counting(tmp_path, capsys):
    (tmp_path / "broken.tar").write_bytes(b"not a tar file at all" * 100)
    assert data.count_tar_samples([str(tmp_path / "broken.tar")]) == 0
    assert "cannot count the samples of shard" in capsys.readouterr().err


def test_resuming_a_tar_stream_with_another_worker_count_is_refused(tmp_path):
    write_shards(str(tmp_path), n_shards=4, per_shard=6)
    spec = str(tmp_path / "{00000..00003}.tar")
    views = [augment.CLIPView(16)], [augment.TextView()]
    loader = data.build_loader(spec, 2, *views, workers=2, context_length=8)
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    assert state["workers"] == 2
    with pytest.raises(SystemExit, match="resume with --workers 2"):
        data.build_loader(spec, 2, *views, workers=1, context_length=8, start_step=1, state=state)
    data.build_loader(spec, 2, *views, workers=2, context_length=8, start_step=1, state=state)  # same count: fine


def test_a_process_left_holding_a_loader_mid_epoch_still_exits():
    """Loader workers ignore SIGTERM (they must survive a signal to the process group), and multiprocessing
    stops daemonic children at exit with SIGTERM, then joins them: a loader left mid-epoch (the training
    loader always is) used to make the process wait forever after its last line (the suite did, on CI)."""
    script = ("import augment, data\n"
              "loader = data.build_loader('synthetic', 8, [augment.CLIPView(32)], [augment.TextView()], workers=2,\n"
              "                           context_length=20, image_size=32)\n"
              "batches = iter(loader); next(batches)\n"
              "print('done', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "done\n" and "Error" not in result.stderr, result.stderr
