"""Evaluation during training on real image files, kept snapshots, progress on the log lines, TensorBoard and
W&B: each test reads back what a run wrote (log, snapshots, event files) and compares it with an independent
measurement (eval_zeroshot.py on the snapshot, the step arithmetic, log.jsonl)."""

import json
import os
import signal
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import data
import eval_zeroshot as ez

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
CLASSES = 6  # classes of the held-out folder


def noisy_image(source, index, rng):
    """A synthetic image at 48 px (the tiny model sees 32) with Gaussian pixel noise -> (PIL image, caption, label)"""
    image, caption, label = source[index]
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (48, 48, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), caption, label


def real_looking_data(root, n_train=64, n_heldout=37):
    """Noisy JPEG training pairs in a CSV; a held-out ImageFolder of PNGs (6 classes, 37 images: not a multiple of
    2 ranks); a retrieval CSV of 9 held-out images with 13 captions. -> (train CSV, folder, retrieval CSV)"""
    rng = np.random.default_rng(0)
    train, rows = data.SyntheticPairs("train", 48), ["filepath,caption"]
    os.makedirs(os.path.join(root, "train"))
    for i in range(n_train):
        image, caption, _ = noisy_image(train, i, rng)
        image.save(os.path.join(root, "train", f"{i}.jpg"), quality=85)
        rows.append(f"train/{i}.jpg,{caption}")
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")

    val, pairs = data.SyntheticPairs("val", 48), ["filepath,caption"]
    indices = [64 * k + c for k in range(7) for c in range(CLASSES)][:n_heldout]  # label = index % 64
    for n, i in enumerate(indices):
        image, caption, label = noisy_image(val, i, rng)
        folder = os.path.join(root, "heldout", "val", data.SYNTHETIC_CLASSNAMES[label].replace(" ", "_"))
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{i}.png"))
        if n < 9:
            path = os.path.relpath(os.path.join(folder, f"{i}.png"), root)
            pairs += [f"{path},{caption}"] + ([f"{path},a {data.SYNTHETIC_CLASSNAMES[label]}"] if n % 2 else [])
    with open(os.path.join(root, "pairs.csv"), "w") as f:
        f.write("\n".join(pairs) + "\n")
    return os.path.join(root, "train.csv"), os.path.join(root, "heldout"), os.path.join(root, "pairs.csv")


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_torchrun_logs_the_held_out_folders_zero_shot_top1_that_eval_zeroshot_reports_for_each_kept_snapshot(
        tmp_path):
    """Done when: 2 ranks train on a CSV of image files and evaluate a held-out ImageFolder (and a retrieval CSV)
    every 3 steps and at the end; the CLI on the kept ckpt_STEP.pt, in one process, reports the logged numbers."""
    train_csv, heldout, pairs = real_looking_data(str(tmp_path))
    run = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "clip.py"),
           "--data", train_csv, "--eval-dataset", "folder", "--eval-data-dir", heldout, "--eval-retrieval", pairs,
           "--eval-every", "3", "--keep-every", "3", "--steps", "6", "--batch-size", "8", "--warmup", "2",
           "--lr", "1e-2", "--workers", "1", "--log-every", "1", "--save-every", "0", "--out-dir", str(run)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "6 steps = 1.5 epochs of 64 samples (96 samples in all), global batch 16 = 2 x 8" in out.stdout
    assert f"zero-shot on folder (37 images, {CLASSES} classes) and retrieval on {pairs} (9 images, 13 captions), " \
           f"every 3 steps and at the end" in out.stdout

    log = read_log(run)
    train_lines = [r for r in log if "loss" in r]
    assert [r["epoch"] for r in train_lines] == [s / 4 for s in range(1, 7)]  # 64 pairs / global batch 16
    elapsed = [r["elapsed_s"] for r in train_lines]
    assert 0 < elapsed[0] and elapsed == sorted(elapsed)
    evals = {r["step"]: r for r in log if "zeroshot_folder_top1" in r}
    assert list(evals) == [3, 6] and log[-1] is evals[6]  # the run's last line is its final evaluation
    assert train_lines[-1]["time_left_s"] == evals[3]["eval_s"]  # no step left; the final evaluation, as long as
    assert train_lines[-2]["time_left_s"] > evals[3]["eval_s"]  # the last one; before it one more step
    assert sorted(os.listdir(run)) == ["ckpt.pt", "ckpt_3.pt", "ckpt_6.pt", "log.jsonl", "run.json"]
    for step, logged in evals.items():
        record = ez.main(["--checkpoint", str(run / f"ckpt_{step}.pt"), "--dataset", "folder", "--data-dir", heldout,
                          "--retrieval", pairs, "--workers", "0"])
        assert record["step"] == step and record["images"] == 37 and record["classes"] == CLASSES
        assert logged["eval_head"] == record["head"] == "linear"
        assert logged["zeroshot_folder_top1"] == record["top1"] and logged["zeroshot_folder_top5"] == record["top5"]
        recalls = [f"{way}_r{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)]
        assert [logged[f"retrieval_{k}"] for k in recalls] == [record[k] for k in recalls]
    snapshots = [torch.load(run / f"ckpt_{step}.pt", weights_only=True)["model"] for step in (3, 6)]
    assert not all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])  # two models, not one


def test_keep_every_keeps_snapshots_and_a_kill_during_a_snapshot_write_leaves_the_others_intact(tmp_path):
    """The run is killed (SIGKILL) while it writes ckpt_6.pt: the half-written file never takes that name, and
    ckpt_2.pt, ckpt_4.pt and the rolling ckpt.pt load, each with its step's weights."""
    script = (
        "import sys, time, torch; sys.path.insert(0, %r)\n"
        "import clip\n"
        "save = torch.save\n"
        "def slow_save(obj, f, *args, **kwargs):\n"
        "    if 'ckpt_6.pt' in f.name:  # write a part, then hang: the kill comes here\n"
        "        f.write(b'half a checkpoint'); f.flush(); print('writing', f.name, flush=True); time.sleep(300)\n"
        "    save(obj, f, *args, **kwargs)\n"
        "torch.save = slow_save\n"
        "clip.main(clip.parse_args(sys.argv[1:]))\n"
    ) % ROOT
    run = tmp_path / "run"
    process = subprocess.Popen([PY, "-c", script, "--steps", "8", "--keep-every", "2", "--save-every", "3",
                                "--batch-size", "8", "--warmup", "2", "--workers", "0", "--eval-dataset", "none",
                                "--out-dir", str(run)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = process.stdout.readline()
    while line and not line.startswith("writing"):
        line = process.stdout.readline()
    process.kill()
    assert process.wait() == -signal.SIGKILL and line.strip().endswith("ckpt_6.pt.tmp")  # a temporary name
    assert sorted(f for f in os.listdir(run) if f.startswith("ckpt")) == [
        "ckpt.pt", "ckpt_2.pt", "ckpt_4.pt", "ckpt_6.pt.tmp"]
    kept = {step: torch.load(run / f"ckpt_{step}.pt", weights_only=True) for step in (2, 4)}
    rolling = torch.load(run / "ckpt.pt", weights_only=True)  # written before the snapshot of the same step
    assert [kept[2]["step"], kept[4]["step"], rolling["step"]] == [2, 4, 6]
    assert not all(torch.equal(kept[2]["model"][k], kept[4]["model"][k]) for k in kept[2]["model"])
    assert ez.load_model(str(run / "ckpt_4.pt"), "cpu")[3] == 4  # eval_zeroshot.py reads a snapshot


def test_bad_evaluation_inputs_stop_the_run_before_training_with_one_line(tmp_path, capsys):
    train_csv, heldout, pairs = real_looking_data(str(tmp_path), n_train=16, n_heldout=6)
    flag_cases = [(["--eval-dataset", "folder"], "--eval-dataset folder needs --eval-data-dir"),
                  (["--eval-dataset", "imagenet", "--eval-data-dir", str(tmp_path / "nowhere")],
                   "--eval-dataset imagenet needs --eval-data-dir, an existing folder"),
                  (["--eval-data-dir", heldout], "--eval-data-dir is read with --eval-dataset imagenet"),
                  (["--eval-retrieval", str(tmp_path / "none.csv")], "--eval-retrieval"),
                  (["--data", train_csv, "--eval-every", "10"], "--eval-every: nothing to evaluate"),
                  (["--keep-every", "-1"], "--keep-every must be at least 0")]
    for argv, message in flag_cases:
        with pytest.raises(SystemExit) as e:
            clip.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv

    (tmp_path / "flat").mkdir()  # images but no class folders
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
    (tmp_path / "columns.csv").write_text("path,caption\nx.png,a red circle\n")
    (tmp_path / "missing.csv").write_text("filepath,caption\nnot_there.png,a red circle\n")
    run_cases = [(["--eval-dataset", "folder", "--eval-data-dir", str(tmp_path / "flat")],
                  "--eval-dataset folder: .*flat.*class"),
                 (["--eval-dataset", "imagenet", "--eval-data-dir", heldout],
                  "--eval-dataset imagenet: .* must hold the 1000 WordNet-id class folders"),
                 (["--eval-retrieval", str(tmp_path / "columns.csv")], "--eval-retrieval .*no column 'filepath'"),
                 (["--eval-retrieval", str(tmp_path / "missing.csv")], "--eval-retrieval .*1 of 1 images are missing")]
    for argv, message in run_cases:
        out_dir = tmp_path / "run"
        with pytest.raises(SystemExit, match=message) as e:
            clip.main(clip.parse_args(["--data", train_csv, "--batch-size", "8", "--workers", "0",
                                       "--out-dir", str(out_dir), *argv]))
        assert "\n" not in str(e.value) and os.listdir(out_dir) == [], argv  # nothing trained, logged or saved


def numbers_of(log):
    """{tag: [(step, value)]} of every number in log.jsonl, tagged eval/KEY for evaluation keys, else train/KEY."""
    out = {}
    for record in log:
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                section = "eval" if k.startswith(("zeroshot_", "retrieval_", "eval_")) else "train"
                out.setdefault(f"{section}/{k}", []).append((record["step"], v))
    return out


def test_tensorboard_gets_every_logged_number(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in requirements.txt: pip install -r requirements.txt "
                                              "(CI's .ci/run does) to run this test")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    clip.main(clip.parse_args(["--steps", "4", "--batch-size", "8", "--warmup", "2", "--workers", "0", "--log-every",
                               "1", "--eval-every", "2", "--eval-samples", "64", "--tensorboard",
                               "--out-dir", str(run)]))
    events = EventAccumulator(str(run / "tensorboard")).Reload()  # the default DIR: OUT_DIR/tensorboard
    expected = numbers_of(read_log(run))
    assert {"train/loss", "train/time_left_s", "eval/zeroshot_synthetic_top1", "eval/eval_s"} <= expected.keys()
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag  # stored as float32
    assert [s for s, _ in expected["eval/zeroshot_synthetic_top1"]] == [2, 4]


def fake_wandb():
    """A stand-in for the wandb package that records init's arguments, the logged numbers and finish()."""
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, numbers, step=None):
            calls["log"].append((step, dict(numbers)))

        def finish(self):
            calls["finish"] += 1

    module = types.ModuleType("wandb")
    module.__spec__ = ModuleSpec("wandb", None)  # what importlib.util.find_spec reports for an imported module
    module.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    return module, calls


def test_wandb_gets_every_logged_number_and_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch, capsys):
    """Also the default evaluation with real training data: none, said once at the start, and no final line
    with a score that says nothing (the synthetic set)."""
    module, calls = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    train_csv, _, _ = real_looking_data(str(tmp_path), n_train=32, n_heldout=1)
    run = tmp_path / "run"
    common = ["--data", train_csv, "--batch-size", "8", "--warmup", "2", "--workers", "0", "--log-every", "1",
              "--wandb", "my-project", "--out-dir", str(run)]
    clip.main(clip.parse_args(common + ["--steps", "3"]))
    assert capsys.readouterr().out.count("evaluation: none; this run reports no zero-shot accuracy") == 1
    clip.main(clip.parse_args(common + ["--steps", "5", "--resume", "auto"]))
    log = read_log(run)
    assert all("loss" in r for r in log) and [r["step"] for r in log] == [1, 2, 3, 4, 5]  # no evaluation line
    assert [(step, numbers) for step, numbers in calls["log"]] == [
        (r["step"], {f"train/{k}": v for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
        for r in log]
    first, resumed = calls["init"]
    assert first["project"] == "my-project" and first["dir"] == str(run) and first["config"]["lr"] == 1e-3
    assert resumed["id"] == first["id"] and resumed["resume"] == "allow" and calls["finish"] == 2
    assert log[-1]["elapsed_s"] > log[2]["elapsed_s"]  # the elapsed time goes on over the restart


@pytest.mark.parametrize("flag", ["tensorboard", "wandb"])
def test_a_missing_curve_package_is_named_with_its_pip_command(monkeypatch, capsys, flag):
    monkeypatch.setitem(sys.modules, flag, None)  # as if not installed: find_spec says None, import fails
    with pytest.raises(SystemExit):
        clip.parse_args([f"--{flag}", "x"])
    assert f"--{flag} needs the {flag} package: pip install {flag}" in capsys.readouterr().err
