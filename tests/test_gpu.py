"""The GPU check, for whoever has a CUDA GPU at hand: `python -m pytest -q -m gpu -s` (skipped without CUDA).

Each method trains a few steps in bf16 on the GPU, eager and compiled (inductor, Triton kernels), close to fp32;
DDP over NCCL gives exactly the plain step on one GPU; torchrun runs a method file end to end; bench.py then
prints samples/s per GPU, MFU and peak memory of ViT-B/16 at batch 256 (against OpenCLIP if installed)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from cases import train_steps
from test_precision import assert_close_to_fp32

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU_CASES = [("clip", []), ("clip", ["--recipe", "improved", "--ssl", "byol"]), ("nclip", []), ("xclip", [])]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name,flags", GPU_CASES, ids=[" ".join([n] + f) for n, f in GPU_CASES])
def test_bf16_on_the_gpu_trains_close_to_fp32(name, flags, compiled):
    torch._dynamo.reset()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference in full fp32
    try:
        fp32, _ = train_steps(name, flags, precision="fp32", device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    backend = "inductor" if compiled else None
    with torch._inductor.config.patch(fallback_random=True):  # eager's random numbers in compiled code
        bf16, _ = train_steps(name, flags, precision="bf16", device="cuda", compile_backend=backend)
    assert_close_to_fp32(fp32, bf16, name)


def test_ddp_over_nccl_equals_the_plain_step_on_one_gpu(tmp_path):
    """World size 1 over NCCL: DDP's gradient all-reduce and the gather with gradient go through NCCL."""
    import clip

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        plain = train_steps("xclip", [], device="cuda:0", ddp=False)
        ddp = train_steps("xclip", [], device="cuda:0", ddp=True)
        x = torch.randn(4, 3, device="cuda", requires_grad=True)
        (clip.GatherWithGrad.apply(x) * 3).sum().backward()  # all_gather forward, all_reduce backward, via NCCL
        assert torch.equal(x.grad, torch.full_like(x, 3.0))
    finally:
        dist.destroy_process_group()
    assert ddp[0] == pytest.approx(plain[0], rel=1e-6)
    for k, v in plain[1].items():
        assert torch.allclose(ddp[1][k], v, atol=1e-6), k


def test_torchrun_trains_each_method_in_bf16_with_compile(tmp_path):
    for method in ("clip", "nclip", "xclip"):
        out = tmp_path / method
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        f"{method}.py", "--steps", "30", "--compile", "--precision", "bf16", "--eval-samples", "256",
                        "--out-dir", str(out)], cwd=ROOT, check=True, timeout=900)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert all(r["nonfinite_steps"] == 0 for r in log if "loss" in r)
        assert log[-1]["zeroshot_synthetic_top1"] > 1 / 64  # above chance after 30 steps


def test_bench_vit_b16_batch_256(tmp_path):
    """Prints the numbers to compare with README.md "On a GPU" (run pytest with -s to see them)."""
    out = tmp_path / "results.json"
    compare = ["--compare-openclip"] if importlib.util.find_spec("open_clip") else []
    subprocess.run([sys.executable, "bench.py", "--model", "ViT-B/16", "--batch-size", "256", "--device", "cuda",
                    "--compile", "--out", str(out)] + compare, cwd=ROOT, check=True, timeout=1800)
    row = json.loads(out.read_text())["rows"][0]
    assert row["samples_per_s"] > 0 and row["peak_mem_gib"] > 0
    assert row["mfu"] is not None, "unknown GPU name: add it to GPU_PEAK_TFLOPS"
