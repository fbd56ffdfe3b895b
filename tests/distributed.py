"""Run a function in several gloo processes on this machine, for the 2-process-vs-1-process tests; run a method's
main() as `python` or `torchrun` would, without their launch."""

import importlib
import multiprocessing.forkserver
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world_size, port, out_dir, args):
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


# The processes fork from one server process per test session that imported torch and the method files once
# (a fresh interpreter, no threads yet): a spawned process spent about 4 s of CPU importing them, twice per call.
multiprocessing.forkserver.set_forkserver_preload(["torch", "torch.distributed", "clip", "nclip", "xclip", "data",
                                                   "eval_zeroshot", "ssl_losses", "augment"])


def run_distributed(fn, world_size=2, *args):
    """fn(rank, world_size, *args) in `world_size` fresh processes joined in a gloo group; returns the
    list of their return values (anything torch.save can write). fn must be a module-level function."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(fn, world_size, _free_port(), out_dir, args), nprocs=world_size,
                           start_method="forkserver")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def _main_worker(rank, module, argv, world_size, port, cwds, out_dir):
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the tests' launches
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cwds:
        os.chdir(cwds[rank])
    method, ending = importlib.import_module(module), None
    try:
        method.main(method.parse_args(argv))  # parse_args reads WORLD_SIZE (the global batch's defaults)
    except SystemExit as e:  # a one-line error: its message, for the test to read
        ending = e.code
    torch.save(ending, os.path.join(out_dir, f"{rank}.pt"))


def run_main(module, argv, world_size=1, cwds=None, timeout=240, errors_expected=False):
    """`python MODULE.py ARGV` (world_size 1) or `torchrun --nproc_per_node=W MODULE.py ARGV` with one torch thread,
    in processes of the fork server: the same training without the launch (about 4 s of CPU per interpreter), for
    the uninterrupted runs that interrupted ones are compared with. cwds: each rank's working directory.
    -> each rank's SystemExit code (its one-line error), or None where main() returned; a one-line error fails
    the test unless errors_expected. A hang fails the test."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_main_worker, args=(module, list(argv), world_size, _free_port(), cwds, out_dir),
                                     nprocs=world_size, join=False, start_method="forkserver")
        deadline = time.time() + timeout
        while not context.join(timeout=0.5):
            if time.time() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{module}.main({' '.join(argv)}) on {world_size} ranks: no end in {timeout} s")
        endings = [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
    assert errors_expected or all(e in (None, 0) for e in endings), f"{module}.main({' '.join(argv)}): {endings}"
    return endings
