"""Fault injection: SIGKILL and resume, SIGTERM/SIGUSR1 preemption, a kill during a checkpoint write,
non-finite steps, bad flags, and a torchrun elastic restart. Every test kills or corrupts something and
checks that no work beyond the last checkpoint is lost and that nothing is lost at all where promised."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import clip
import data
from distributed import run_main
from test_data import write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
COMPUTE_LOSS = clip.compute_loss


def command(out_dir, *extra, script="clip.py"):
    return [PY, os.path.join(ROOT, script), "--out-dir", str(out_dir), "--eval-samples", "64", "--log-every", "1",
            "--warmup", "3", *extra]


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out


def wait_for_step(out_dir, step, process, timeout=120):
    """Poll the run's log until a training line with at least `step` appears."""
    path, start = os.path.join(out_dir, "log.jsonl"), time.time()
    while time.time() - start < timeout:
        assert process.poll() is None, "the run ended before the fault could be injected"
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line).get("step", 0) for line in f if '"loss"' in line]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.02)
    raise TimeoutError(step)


def model_of(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def csv_source(root, n=160):
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    source, rows = data.SyntheticPairs("train", 32), ["filepath,caption"]
    for i in range(n):
        image, caption, _ = source[i]
        image.save(os.path.join(root, "img", f"{i}.png"))
        rows.append(f"img/{i}.png,{caption}")
    with open(os.path.join(root, "pairs.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return os.path.join(root, "pairs.csv")


# The improved recipe draws from torch's RNG in training (text dropout): nothing else may draw from it between
# steps (a DataLoader iterator started on resume, an evaluation between a checkpoint and the next step). The CSV
# source and nclip.py / xclip.py resume through the same code: tests/test_cluster.py (CSV, SIGINT) and
# tests/test_nclip.py::test_torchrun_smoke_and_resume check them.
@pytest.mark.parametrize("source", ["synthetic", "tar"])
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path, source):
    if source == "tar":
        os.makedirs(tmp_path / "tar")
        write_shards(str(tmp_path / "tar"), n_shards=4, per_shard=30)
        spec, flags = str(tmp_path / "tar" / "{00000..00003}.tar"), []
    else:
        spec, flags = "synthetic", ["--eval-every", "3"]
    args = ["--data", spec, "--workers", "2", "--steps", "16", "--batch-size", "8", "--save-every", "3",
            "--recipe", "improved", *flags]
    run_main("clip", command(tmp_path / "straight", *args)[2:])  # one torch thread, as these launches:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen(command(tmp_path / "killed", *args), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    wait_for_step(tmp_path / "killed", random.randint(4, 12), killed)
    killed.kill()  # SIGKILL: no handler runs
    assert killed.wait() == -signal.SIGKILL
    run(command(tmp_path / "killed", *args, "--resume", "auto"), env=env)
    assert_same(model_of(tmp_path / "straight"), model_of(tmp_path / "killed"))


def test_sigusr1_to_one_torchrun_rank_stops_every_rank_at_the_same_step(tmp_path):
    args = ["--steps", "400", "--batch-size", "8", "--save-every", "1000", "--workers", "0"]
    cmd = ([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
           + command(tmp_path / "run", *args)[1:])
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_step(tmp_path / "run", 3, process)
    workers = [p for p in children(process.pid) if "clip.py" in open(f"/proc/{p}/cmdline").read()]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGUSR1)  # only one rank gets the signal
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["step"] < 400  # both ranks contributed to the checkpoint of one step


def children(pid):
    """All descendants of a process, from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{task}/children") as f:
                kids = [int(k) for k in f.read().split()]
            out += kids
            todo += kids
    return out


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    script = (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "import clip\n"
        "clip.save_checkpoint(%r, {'step': 1, 'model': {'w': torch.ones(3)}})\n"
        "print('first saved', flush=True)\n"
        "clip.save_checkpoint(%r, {'step': 2, 'model': {'w': torch.zeros(400_000_000 // 4 * 4)}})\n"
    ) % (ROOT, str(tmp_path / "ckpt.pt"), str(tmp_path / "ckpt.pt"))
    process = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "first saved"
    tmp = tmp_path / "ckpt.pt.tmp"
    start = time.time()
    while not (tmp.exists() and tmp.stat().st_size > 0) and time.time() - start < 60:
        time.sleep(0.001)
    process.kill()
    process.wait()
    assert tmp.exists()  # the kill hit the write
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))


def nan_on(calls):
    """A compute_loss that returns NaN on the given (1-based) calls."""
    original, count = COMPUTE_LOSS, {"n": 0}

    def compute_loss(out, args):
        count["n"] += 1
        loss, logs = original(out, args)
        return (loss * float("nan") if count["n"] in calls else loss), logs
    return compute_loss


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    common = ["--steps", "8", "--batch-size", "8", "--workers", "0", "--eval-samples", "64", "--log-every", "1",
              "--warmup", "2"]
    monkeypatch.setattr(clip, "compute_loss", nan_on({3, 4}))
    clip.main(clip.parse_args(common + ["--out-dir", str(tmp_path / "skip")]))
    with open(tmp_path / "skip" / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["nonfinite_steps"] for r in log if "loss" in r] == [0, 0, 1, 1, 0, 0, 0, 0]
    optimizer = torch.load(tmp_path / "skip" / "ckpt.pt", weights_only=True)["optimizer"]
    assert all(int(s["step"]) == 6 for s in optimizer["state"].values())  # 8 steps, 2 of them skipped

    saved = []
    monkeypatch.setattr(clip, "compute_loss", nan_on(set(range(3, 100))))
    monkeypatch.setattr(clip, "save_checkpoint", lambda path, state: saved.append(
        (state["step"], {k: v.clone() for k, v in state["model"].items()})))
    with pytest.raises(SystemExit, match="3 steps in a row had a non-finite loss"):
        clip.main(clip.parse_args(common + ["--out-dir", str(tmp_path / "stop"), "--max-bad-steps", "3",
                                            "--save-every", "2"]))
    (step_2, good), (stop_step, last) = saved[0], saved[-1]
    assert step_2 == 2 and stop_step == 5
    assert_same(good, last)  # the stop checkpoint holds the weights of the last good step


def test_a_skipped_step_leaves_batchnorm_statistics_and_the_byol_teacher_alone(monkeypatch):
    """BatchNorm running statistics (SSL heads) and the BYOL EMA teacher move only with an applied step; a
    non-finite step, skipped by the scaler on the device, leaves them as they were (they used to move)."""
    args = clip.parse_args(["--ssl", "byol", "--batch-size", "8"])
    torch.manual_seed(0)
    raw_model, optimizer, scaler = clip.build_training(args, torch.device("cpu"), "fp32")
    precision, autocast = clip.mixed_precision(args, torch.device("cpu"))
    images = torch.randint(0, 256, (8, 1, 3, 32, 32), dtype=torch.uint8)
    tokens = data.tokenize([f"a caption number {i}" for i in range(8)], 20)[:, None]  # [8, 1, 20]

    def buffers_and_teacher():
        return {k: v.clone() for k, v in raw_model.state_dict().items() if "running" in k or "teacher" in k}

    before = buffers_and_teacher()
    monkeypatch.setattr(clip, "compute_loss", nan_on({1}))
    *_, applied = clip.train_step(raw_model, raw_model, optimizer, scaler, images, tokens, args, autocast, precision)
    assert not applied
    assert_same(before, buffers_and_teacher())
    *_, applied = clip.train_step(raw_model, raw_model, optimizer, scaler, images, tokens, args, autocast, precision)
    after = buffers_and_teacher()
    assert applied and not any(torch.equal(before[k], after[k]) for k in before if "running_mean" in k)
    assert not all(torch.equal(before[k], after[k]) for k in before if "teacher" in k)


def test_impossible_flags_fail_before_any_work_naming_the_flag(tmp_path, capsys):
    cases = [(["--batch-size", "0"], "--batch-size"), (["--resume", str(tmp_path / "none.pt")], "--resume"),
             (["--data", str(tmp_path / "none.csv")], "--data"), (["--data", str(tmp_path / "{0..3}.tar")], "--data"),
             (["--model", "ViT-Z/3"], "--model"), (["--lr", "0"], "--lr"), (["--steps", "-1"], "--steps"),
             (["--precision", "fp8"], "--precision"), (["--recipe", "basic", "--mlp-projector"], "--mlp-projector")]
    for argv, flag in cases:
        with pytest.raises(SystemExit) as e:
            clip.parse_args(argv)
        assert e.value.code == 2 and flag in capsys.readouterr().err, argv


def test_a_mostly_unreadable_tar_source_stops_before_training(tmp_path):
    import tarfile, io
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(10):
            for name, payload in ((f"{i:05d}.jpg", b"not a jpeg"), (f"{i:05d}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    # In this process: a SystemExit with a message is what prints one line and no traceback.
    with pytest.raises(SystemExit, match="10 of 10 probed samples are unreadable"):
        clip.main(clip.parse_args(command(tmp_path / "run", "--data", str(tmp_path / "00000.tar"),
                                          "--workers", "0")[2:]))
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")
    (tmp_path / "bad.csv").write_text("filepath,caption\n" + "".join(f"missing{i}.png,c {i}\n" for i in range(20)))
    with pytest.raises(SystemExit, match="probed samples are unreadable"):
        clip.main(clip.parse_args(command(tmp_path / "csv", "--data", str(tmp_path / "bad.csv"), "--workers", "0")[2:]))


def test_torchrun_elastic_restart_resumes_from_the_last_checkpoint(tmp_path):
    args = ["--steps", "16", "--batch-size", "8", "--save-every", "2", "--workers", "0", "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out_dir, restarts):
        return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"--max-restarts={restarts}",
                "--monitor-interval=0.2"] + command(out_dir, *args)[1:]

    run_main("clip", command(tmp_path / "straight", *args)[2:], world_size=2)
    process = subprocess.Popen(torchrun(tmp_path / "elastic", 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    wait_for_step(tmp_path / "elastic", 5, process)
    workers = [p for p in children(process.pid) if "clip.py" in open(f"/proc/{p}/cmdline").read()]
    os.kill(workers[-1], signal.SIGKILL)  # one worker dies; torchrun restarts both
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-2000:]
    assert "resumed from" in stdout
    assert_same(model_of(tmp_path / "straight"), model_of(tmp_path / "elastic"))
