"""At scale (DESIGN.md, section 4): counting tar shards reads each header once, spread over the ranks, and none where
the writer recorded the counts; a resumed tar stream seeks to its position instead of reading the data before it;
CSV rows live in compact arrays, not one Python object per string."""

import gzip
import io
import json
import os
import tarfile
import tracemalloc

import pytest
import torch

import augment
import data
from distributed import run_distributed
from test_data import add_file, jpeg_bytes, write_shards

VIEWS = [augment.CLIPView(16)], [augment.TextView()]


# --- counting ------------------------------------------------------------------------------------------------------

def shard_names(folder, n):
    return [os.path.join(folder, f"{i:05d}.tar") for i in range(n)]


def count_on_a_rank(rank, world_size, root):
    """Runs in a spawned gloo process: the count of both folders, and the shards whose tar headers this rank opened."""
    opened, real_open = [], tarfile.open

    def counting_open(name=None, *args, **kwargs):
        opened.append(os.path.basename(name))
        return real_open(name, *args, **kwargs)

    tarfile.open = counting_open  # count_tar_samples opens each shard through it
    by_headers = data.count_samples(shard_names(os.path.join(root, "plain"), 2000), rank, world_size)
    opened_plain = list(opened)
    opened.clear()
    by_records = data.count_samples(shard_names(os.path.join(root, "recorded"), 2001), rank, world_size)
    return by_headers, opened_plain, by_records, list(opened)


def test_two_ranks_count_their_own_share_of_the_headers_and_none_where_counts_are_recorded(tmp_path):
    """2000 shards of 1 or 2 samples: each rank opens only its half of the shards (rank 0 used to open all of them
    while the other ranks waited in a collective); with img2dataset's _stats.json files or a sizes.json no tar is
    opened, except a shard whose stats file is unreadable."""
    plain, recorded = tmp_path / "plain", tmp_path / "recorded"
    plain.mkdir()
    recorded.mkdir()
    shards = []  # of 1 and 2 samples; the count reads headers only, so any bytes do (and keys may repeat)
    for n in (1, 2):
        with tarfile.open(fileobj=io.BytesIO(), mode="w") as tar:
            for j in range(n):
                add_file(tar, f"{j}.jpg", b"x")
                add_file(tar, f"{j}.txt", b"a caption")
            shards.append(tar.fileobj.getvalue())
    sizes = {}
    for i, path in enumerate(shard_names(str(plain), 2000)):
        with open(path, "wb") as f:
            f.write(shards[i % 2])
        name = os.path.basename(path)
        os.symlink(path, recorded / name)
        if i < 1000:
            sizes[name] = 1 + i % 2  # OpenCLIP's sizes.json for the first half
        else:  # img2dataset's stats for the second half
            stats = {"count": 5, "successes": 1 + i % 2, "failed_to_download": 4 - i % 2}
            (recorded / name.replace(".tar", "_stats.json")).write_text(json.dumps(stats))
    (recorded / "sizes.json").write_text(json.dumps(sizes))
    with tarfile.open(recorded / "02000.tar", "w") as tar:  # its stats file is broken: counted from its headers
        for j in range(3):
            add_file(tar, f"x{j}.jpg", b"x")
    (recorded / "02000_stats.json").write_text("{not json")

    (headers_0, opened_0, records_0, reopened_0), (headers_1, opened_1, records_1, reopened_1) = run_distributed(
        count_on_a_rank, 2, str(tmp_path))
    assert headers_0 == headers_1 == 3000
    assert len(opened_0) == len(opened_1) == 1000 and not set(opened_0) & set(opened_1)
    assert records_0 == records_1 == 3003
    assert sorted(reopened_0 + reopened_1) == ["02000.tar"]


def test_num_samples_skips_the_count_and_a_long_count_reports_progress(tmp_path, monkeypatch, capsys):
    write_shards(str(tmp_path), n_shards=2, per_shard=4)
    spec = str(tmp_path / "{00000..00001}.tar")
    assert data.count_samples(data.expand_braces(spec), progress_every_s=0) == 4 + 2  # the 2nd shard is cut in half
    assert "rank 0: counted the samples of 2 of its 2 shards" in capsys.readouterr().err

    def refuse(*args, **kwargs):
        raise AssertionError("counted although num_samples was given")

    monkeypatch.setattr(data, "count_samples", refuse)
    loader = data.build_loader(spec, 2, *VIEWS, context_length=8, num_samples=100)
    assert loader.steps_per_epoch == 50


# --- resuming a tar stream ----------------------------------------------------------------------------------------

def bytes_read():
    """Bytes this process has read through read(2) so far, whatever the file API."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def write_heavy_shards(root, n_shards=6, per_shard=24):
    """Shards whose samples also carry 4 KiB of other data (as a .json or a second image would), so that bytes read
    tell how many samples were read."""
    for s in range(n_shards):
        with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                add_file(tar, f"{key}.jpg", jpeg_bytes((10 * i, 40 * s, 90)))
                add_file(tar, f"{key}.txt", f"shard {s} sample {i}".encode())
                add_file(tar, f"{key}.bin", os.urandom(4096))
    return str(os.path.join(root, "{00000..%05d}.tar" % (n_shards - 1)))


def test_a_resumed_tar_stream_seeks_to_its_block_and_equals_the_uninterrupted_stream(tmp_path):
    """The resumed loader reads at most one shard's worth before its first sample (it used to read every byte before
    its position: here 4 of the 6 shards), and then gives the uninterrupted loader's batches, across the epoch end.
    Its data state is a few numbers that survive JSON and torch.load(weights_only=True)."""
    spec = write_heavy_shards(str(tmp_path))
    shard_bytes = os.path.getsize(tmp_path / "00000.tar")
    common = dict(workers=0, context_length=12, num_samples=144, shuffle_buffer=8)
    straight = iter(data.build_loader(spec, 4, *VIEWS, **common))
    reference = [next(straight) for _ in range(40)]  # 36 steps per epoch
    first = data.build_loader(spec, 4, *VIEWS, **common)
    batches = iter(first)
    for _ in range(25):
        next(batches)
    state = first.state_dict()
    assert len(json.dumps(state)) < 200
    torch.save(json.loads(json.dumps(state)), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)

    resumed = iter(data.build_loader(spec, 4, *VIEWS, start_step=25, state=state, **common))
    before = bytes_read()
    batch = next(resumed)
    read = bytes_read() - before
    assert read <= shard_bytes, f"{read} bytes read before the first sample of the resumed stream"
    for got, want in zip([batch] + [next(resumed) for _ in range(14)], reference[25:]):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_tar_stream_resumed_after_any_sample_goes_on_as_the_uninterrupted_one(tmp_path):
    """Every position of two epochs over small shards with a corrupt sample, a sample without caption and a cut
    shard, shuffle blocks crossing shard ends: the state a sample carries resumes the stream at the next sample."""
    write_shards(str(tmp_path), n_shards=4, per_shard=5)
    urls = data.expand_braces(str(tmp_path / "{00000..00003}.tar"))

    def stream(state=None):
        return iter(data.TarShards(urls, *VIEWS, context_length=12, shuffle_buffer=4, epochs=2, state=state))

    straight = [(data.decode(tokens[0]), epoch, tuple(after.tolist()))
                for images, tokens, params, bad, stream_, epoch, after in stream()]
    assert len(straight) > 30 and len({s[1] for s in straight}) == 2
    for k, (_, epoch, after) in enumerate(straight[:-1]):
        resumed = stream({0: (epoch, *after)})
        assert [data.decode(next(resumed)[1][0]) for _ in range(min(3, len(straight) - k - 1))] == \
               [s[0] for s in straight[k + 1 : k + 4]], k


@pytest.mark.parametrize("compressed", [False, True])
def test_tar_samples_start_at_a_saved_offset(tmp_path, compressed):
    """tar_samples from the offset it gave for the next sample reads on from there: a seek in a plain tar, a read
    from the beginning in a compressed one (no random access)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(5):
            add_file(tar, f"{i:05d}.jpg", jpeg_bytes((i, 0, 0)))
            add_file(tar, f"{i:05d}.txt", f"caption {i}".encode())
    path = tmp_path / ("shard.tar.gz" if compressed else "shard.tar")
    path.write_bytes(gzip.compress(buffer.getvalue()) if compressed else buffer.getvalue())
    samples = list(data.tar_samples(str(path)))
    assert [key for key, _, _ in samples] == [f"{i:05d}" for i in range(5)] and samples[-1][2] is None
    assert list(data.tar_samples(str(path), samples[1][2])) == samples[2:]


def test_an_old_tar_stream_state_is_loaded_with_a_note(tmp_path, capsys):
    """A checkpoint of the data.py before byte offsets saved [epoch, samples read] per stream: it still loads."""
    spec = write_heavy_shards(str(tmp_path), n_shards=2, per_shard=8)
    old_state = {"step": 2, "streams": {"0": [0, 8]}, "workers": 0}
    loader = data.build_loader(spec, 4, *VIEWS, workers=0, context_length=12, start_step=2, state=old_state,
                               num_samples=16)
    images, tokens, params = next(iter(loader))
    assert images.shape[0] == 4 and "from an older data.py" in capsys.readouterr().err


# --- CSV rows -----------------------------------------------------------------------------------------------------

def test_csv_rows_are_held_in_compact_arrays_not_one_object_per_string(tmp_path):
    """Loader workers write the refcount of every Python object they read, so each worker ends up with its own
    copy of the pages that hold one: with a str per path and caption that is gigabytes per worker at 10M rows."""
    n = 20_000
    rows = ["filepath,caption"] + [f"img/{i}.jpg,caption number {i}" for i in range(n)]
    rows[7] = '/abs/7.jpg,"café, ☕ and a comma"'
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    tracemalloc.start()
    try:
        source = data.CsvPairs(str(tmp_path / "pairs.csv"))
        blocks = sum(stat.count for stat in tracemalloc.take_snapshot().statistics("filename"))
    finally:
        tracemalloc.stop()
    assert blocks < n // 10, f"{blocks} memory blocks held for {n} rows"
    assert len(source) == len(source.paths) == len(source.captions) == n
    assert source.paths[0] == str(tmp_path / "img" / "0.jpg") and source.paths[6] == "/abs/7.jpg"
    assert source.captions[6] == "café, ☕ and a comma" and source.captions[-1] == f"caption number {n - 1}"
    assert list(source.captions)[:2] == ["caption number 0", "caption number 1"]
    with pytest.raises(IndexError):
        source.captions[n]


def test_the_csv_memory_bench_measures_every_loader_worker():
    import bench

    rows = bench.csv_memory(2000, workers=2, batch_size=8, batches=2)
    assert [(when[:5], process) for when, process, *_ in rows] == [
        ("after", "main"), ("after", "worker 0"), ("after", "worker 1")] * 2
    assert all(rss > 0 and pss > 0 and uss > 0 for *_, rss, pss, uss in rows)
