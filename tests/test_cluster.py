"""The path users take on a cluster, on this CPU: signals sent to the whole process group while loader workers
run (as torchrun's agent, SLURM and Ctrl-C send them), two torchrun "nodes" that share no file system, and
decisions (stop on a signal, stop after non-finite steps) that every rank takes together."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from distributed import run_main
from test_data import write_shards
from test_reliability import ROOT, PY, assert_same, children, command, csv_source, model_of, run, wait_for_step

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def source(kind, tmp_path):
    if kind == "csv":
        return csv_source(str(tmp_path / "csv"), n=96)
    if kind == "tar":
        os.makedirs(tmp_path / "tar")
        write_shards(str(tmp_path / "tar"), n_shards=4, per_shard=40)
        return str(tmp_path / "tar" / "{00000..00003}.tar")
    return "synthetic"


def group_is_gone(pgid, timeout=20):
    """True once no process of the group is left (loader workers included)."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SLURM = TORCHRUN[:3] + ["--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1"] + TORCHRUN[3:]  # README's sbatch


@pytest.mark.parametrize("kind, sig, launch, resume", [("synthetic", signal.SIGTERM, [PY], False),
                                                       ("csv", signal.SIGINT, [PY], True),
                                                       ("tar", signal.SIGTERM, TORCHRUN, True),
                                                       ("synthetic", signal.SIGUSR1, SLURM, False)],
                         ids=["synthetic-SIGTERM", "csv-SIGINT", "torchrun-tar-SIGTERM", "slurm-SIGUSR1"])
def test_a_signal_to_the_process_group_saves_and_resume_equals_an_uninterrupted_run(tmp_path, kind, sig, launch,
                                                                                     resume):
    """The scheduler's kill (SIGTERM to the group; torchrun's agent forwards it, so ranks see it twice), SLURM's
    warning (SIGUSR1) and Ctrl-C (SIGINT) reach the loader workers too: they must not die of it. The run saves,
    exits 0, leaves no process behind, and `--resume auto` ends with the weights of a run never stopped (checked
    once per launcher, with the sources whose position is hardest to restore: a CSV and tar streams; the synthetic
    source resumes in tests/test_reliability.py's SIGKILL test). (A signal to one process is the same request:
    tests/test_reliability.py sends SIGUSR1 to one torchrun rank.)"""
    args = ["--data", source(kind, tmp_path), "--workers", "2", "--steps", "24", "--batch-size", "8",
            "--save-every", "1000", "--eval-samples", "8"]
    torchrun = launch != [PY]
    if torchrun:
        args[args.index("--workers") + 1] = "1"  # 4 tar shards = 2 ranks x 2 streams at most
    if resume:
        run_main("clip", command(tmp_path / "straight", *args)[2:], world_size=2 if torchrun else 1)
    process = subprocess.Popen(launch + command(tmp_path / "stopped", *args)[1:], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    wait_for_step(tmp_path / "stopped", 3, process)
    assert len([p for p in children(process.pid)]) >= 2  # loader workers (and torchrun's ranks) are running
    os.killpg(process.pid, sig)  # the whole group: launcher, ranks and loader workers
    stdout, stderr = process.communicate(timeout=120)
    # torchrun's agent itself exits 1 after it forwarded the signal (its SignalException); its workers exit 0
    assert process.returncode == (1 if torchrun else 0), stderr[-3000:]
    assert "--resume auto" in stdout and "killed by signal" not in stderr and "exitcode" not in stderr
    assert group_is_gone(process.pid), "a loader worker or rank was left behind"
    step = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)["step"]
    with open(tmp_path / "stopped" / "log.jsonl") as f:
        last = json.loads(f.readlines()[-1])
    assert last["stopped_by"] == sig.name  # what stopped it, in the log
    assert 3 <= step == last["step"] < 24  # saved at the step it stopped (--save-every is 1000)
    if resume:
        run(launch + command(tmp_path / "stopped", *args, "--resume", "auto")[1:], env=ENV)
        assert_same(model_of(tmp_path / "straight"), model_of(tmp_path / "stopped"))


def two_nodes(tmp_path, name, *extra, port):
    """Two torchrun launchers (--nnodes 2, one rank each) joined through a c10d rendezvous, each in its own
    working directory with a relative --out-dir: like two nodes without a shared file system."""
    processes = []
    for node in range(2):
        cwd = tmp_path / f"node{node}"
        os.makedirs(cwd, exist_ok=True)
        cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", name,
               os.path.join(ROOT, "clip.py"), "--out-dir", "run", "--log-every", "1", "--warmup", "3",
               "--eval-samples", "8", "--batch-size", "8", "--workers", "1", *extra]
        processes.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=ENV))
    return [(p.wait(timeout=240), *p.communicate()) for p in processes]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_without_a_shared_file_system_resume_together(tmp_path):
    """Only the node of rank 0 holds the checkpoint. On resume, whichever node rank 0 lands on, every rank
    continues from that checkpoint (sent to the rank without it) and the run ends with the weights of an
    uninterrupted one. A --resume PATH that no node has stops both with the same one-line error, no hang.
    (The resume runs as two torchrun nodes; the first run and the missing path as two ranks, each in its own
    working directory: the same code, without two launchers.)"""
    nodes = [tmp_path / f"node{n}" for n in range(2)]
    for node in nodes:
        os.makedirs(node)
    argv = ["--out-dir", "run", "--log-every", "1", "--warmup", "3", "--eval-samples", "8", "--batch-size", "8",
            "--workers", "1", "--steps", "8"]  # those of two_nodes()
    assert run_main("clip", argv + ["--keep-every", "5"], 2, cwds=nodes) == [None, None]  # the first run, as ranks
    holders = [tmp_path / f"node{n}" / "run" for n in range(2) if os.path.exists(tmp_path / f"node{n}" / "run")]
    assert len(holders) == 1  # rank 0 alone writes checkpoints
    uninterrupted = model_of(holders[0])
    os.replace(holders[0] / "ckpt_5.pt", holders[0] / "ckpt.pt")  # as if the run had stopped at step 5

    second = two_nodes(tmp_path, "second", "--steps", "8", "--resume", "auto", port=free_port())
    assert all(rc == 0 for rc, _, _ in second), second[0][2][-2000:] + second[1][2][-2000:]
    assert any("received it" in out for _, out, _ in second)  # the rank without the checkpoint got it
    final = [torch.load(tmp_path / f"node{n}" / "run" / "ckpt.pt", weights_only=True)
             for n in range(2) if os.path.exists(tmp_path / f"node{n}" / "run" / "ckpt.pt")]
    final = max(final, key=lambda c: c["step"])
    assert final["step"] == 8
    assert_same(uninterrupted, final["model"])

    missing = run_main("clip", argv + ["--resume", "nowhere.pt"], 2, cwds=nodes, errors_expected=True)
    assert all("nowhere.pt: not a loadable checkpoint" in str(error) for error in missing), missing


NAN_ON_RANK_1 = """
import sys
sys.path.insert(0, {root!r})
import os, clip, torch
compute_loss = clip.compute_loss
def nan_on_rank_1(out, args):
    loss, logs = compute_loss(out, args)
    return (loss * float("nan") if os.environ["RANK"] == "1" else loss), logs
clip.compute_loss = nan_on_rank_1
clip.main(clip.parse_args())
"""


def test_non_finite_steps_on_one_rank_stop_every_rank_together(tmp_path):
    """A loss that turns NaN on rank 1 only: both ranks skip those steps (the gradients are all-reduced) and
    both stop at the same step with --max-bad-steps, one checkpoint, no hang. Before, the count was per rank,
    so rank 1 stopped alone while rank 0 waited in the next collective."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1.format(root=ROOT))
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "--out-dir",
           str(tmp_path / "run"), "--steps", "50", "--batch-size", "8", "--workers", "1", "--max-bad-steps", "3",
           "--log-every", "1", "--eval-samples", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=ENV)
    assert out.returncode != 0 and "3 steps in a row had a non-finite loss" in out.stderr
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2  # both ranks reached the checkpoint of step 3
