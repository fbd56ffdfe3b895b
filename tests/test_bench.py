"""bench.py: every flag runs and prints numbers a reader can trust (samples counted, rows for each preset)."""
import functools
import json
import re

import pytest

import bench


def rates(text, pattern):
    return [float(m) for m in re.findall(pattern, text)]


def test_our_step_is_timed_for_each_batch_size_and_written_to_out(capsys, tmp_path):
    out = tmp_path / "results.json"
    bench.main(bench.parse_args(["--model", "tiny", "--batch-size", "4", "8", "--steps", "2", "--warmup", "1",
                                 "--repeats", "2", "--device", "cpu", "--out", str(out)]))
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("tiny")]
    assert [(r[1], r[2]) for r in rows] == [("4", "fp32"), ("8", "fp32")]
    assert all(float(r[4]) > 0 for r in rows)
    assert float(rows[0][3]) < 20  # mean text length run: CC3M-like captions of 4 stop well before the context
    results = json.loads(out.read_text())  # what was printed, unrounded
    assert results["device"] == "cpu" and results["torch"] == bench.torch.__version__
    for row, record in zip(rows, results["rows"]):
        assert (record["model"], record["batch_size"], record["precision"]) == ("tiny", int(row[1]), "fp32")
        assert float(row[4]) == round(record["samples_per_s"], 1) and len(record["samples_per_s_each"]) == 2
        assert record["mfu"] is None and record["peak_mem_gib"] is None  # no GPU: no peak, no device memory


def test_full_captions_run_the_whole_context(capsys):
    bench.main(bench.parse_args(["--model", "tiny", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                                 "--repeats", "1", "--device", "cpu", "--captions", "full"]))
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("tiny"))
    assert float(row[3]) == 20  # the tiny preset's context length


def test_loader_bench_times_both_sources_for_each_worker_count():
    rows = bench.loader_bench([0, 2], batch_size=4, batches=6)
    assert [(name, n) for name, n, _ in rows] == [("synthetic 32 px", 0), ("synthetic 32 px", 2),
                                                  ("224 px JPEG tar shards", 0), ("224 px JPEG tar shards", 2)]
    assert all(rate > 0 for _, _, rate in rows)


def test_loader_flag_prints_the_loader_lines(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "jpeg_shard",
                        lambda path, n=256, size=(320, 256), real=bench.jpeg_shard: real(path, n=min(n, 16), size=size))
    monkeypatch.setattr(bench, "loader_bench", functools.partial(bench.loader_bench, batch_size=8, batches=4))
    bench.main(bench.parse_args(["--model", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                                 "--repeats", "1", "--device", "cpu", "--loader", "--out", str(tmp_path / "r.json")]))
    out = capsys.readouterr().out
    assert len(rates(out, r"with the real loader .*: ([\d.]+) samples/s")) == 1
    assert len(rates(out, r"decode \+ augment.*: ([\d.]+) samples/s")) == 3
    assert len(rates(out, r"loader alone.*: ([\d.]+) samples/s")) == 4
    with open(tmp_path / "r.json") as f:  # per recipe: the CPU part's samples/s, the device part's ms per batch
        rows = json.load(f)["decode_augment"]
    assert [(r["recipe"], r["image_views"]) for r in rows] == [("CLIP view", 1), ("improved recipe", 3),
                                                               ("--ssl simclr", 3)]
    assert all(r["cpu_samples_per_s"] > 0 and r["device_ms_per_batch_64"] > 0 for r in rows)


def test_compare_openclip_ends_with_the_median_ratio(capsys, tmp_path):
    pytest.importorskip("open_clip")  # installed only for the benchmark, never a requirement
    bench.main(bench.parse_args(["--model", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                                 "--repeats", "1", "--device", "cpu", "--compare-openclip",
                                 "--out", str(tmp_path / "results.json")]))
    printed = capsys.readouterr().out.strip().splitlines()
    row = next(line.split() for line in printed if line.startswith("tiny"))
    # columns: model batch precision tokens ours MFU mem theirs mem ratio; the rates are rounded to 0.1, so the
    # ratio is checked against the unrounded rates of --out (they used to be compared with the rounded ones)
    record = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert record["ratio"] == pytest.approx(record["samples_per_s"] / record["openclip_samples_per_s"])  # 1 repeat
    assert float(row[-1]) == round(record["ratio"], 2) and float(row[7]) == round(record["openclip_samples_per_s"], 1)
    assert printed[-2] == f"ratio ours/openclip: {record['ratio']:.2f}"


def test_accum_steps_times_the_whole_step(tmp_path):
    out = tmp_path / "results.json"
    bench.main(bench.parse_args(["--model", "tiny", "--batch-size", "4", "--accum-steps", "2", "--steps", "1",
                                 "--warmup", "1", "--repeats", "1", "--device", "cpu", "--out", str(out)]))
    record = json.loads(out.read_text())["rows"][0]
    assert (record["batch_size"], record["accum_steps"]) == (4, 2) and record["samples_per_s"] > 0
