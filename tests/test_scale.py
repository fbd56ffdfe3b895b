"""At scale (DESIGN.md, section 4): counting tar shards reads each header once, spread over the ranks, and none where
the writer recorded the counts."""

import io
import json
import os
import tarfile

import augment
import data
from distributed import run_distributed
from test_data import add_file, write_shards

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
