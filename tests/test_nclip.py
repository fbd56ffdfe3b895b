"""nclip.py and xclip.py: the loss against naive references, collapse checks, 2 processes vs 1, smoke
runs under torchrun, resume."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import clip
import nclip
import xclip
from distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--eval-samples", "64", "--workers", "0", "--log-every", "1"]


def naive_sinkhorn(scores, epsilon=0.05, iters=3):
    """Sinkhorn-Knopp with explicit loops over prototypes and samples."""
    N, K = scores.shape
    Q = [[math.exp(scores[n, k].item() / epsilon) for n in range(N)] for k in range(K)]  # [K][N]
    total = sum(sum(row) for row in Q)
    Q = [[v / total for v in row] for row in Q]
    for _ in range(iters):
        Q = [[v / (sum(row) * K) for v in row] for row in Q]
        columns = [sum(Q[k][n] for k in range(K)) for n in range(N)]
        Q = [[Q[k][n] / (columns[n] * N) for n in range(N)] for k in range(K)]
    return torch.tensor([[Q[k][n] * N for k in range(K)] for n in range(N)], dtype=torch.float64)


def naive_nclip_loss(z_image, z_text, student_temp, teacher_temp, reg_weight, targets):
    b, K = z_image.shape
    p = {m: torch.stack([torch.stack([torch.exp(z[n, k] / student_temp) for k in range(K)]) for n in range(b)])
         for m, z in (("I", z_image), ("T", z_text))}
    p = {m: v / v.sum(1, keepdim=True) for m, v in p.items()}
    if targets == "sinkhorn":
        q = {"I": naive_sinkhorn(z_image.detach()), "T": naive_sinkhorn(z_text.detach())}
    else:
        q = {m: torch.softmax(z.detach() / teacher_temp, 1) for m, z in (("I", z_image), ("T", z_text))}
    prediction = 0.0
    for n in range(b):
        for k in range(K):
            prediction = prediction - q["T"][n, k] * torch.log(p["I"][n, k]) - q["I"][n, k] * torch.log(p["T"][n, k])
    prediction = prediction / (2 * b)
    regulariser = 0.0
    for m in ("I", "T"):
        p_bar = [sum(p[m][n, k] for n in range(b)) / b for k in range(K)]
        regulariser = regulariser + (math.log(K) + sum(v * torch.log(v) for v in p_bar)) / 2
    return prediction + reg_weight * regulariser


@pytest.mark.parametrize("targets", ["softmax", "sinkhorn"])
def test_nclip_loss_matches_the_naive_reference(targets):
    g = torch.Generator().manual_seed(0)
    z_image = torch.rand(6, 5, generator=g, dtype=torch.float64) * 2 - 1
    z_text = torch.rand(6, 5, generator=g, dtype=torch.float64) * 2 - 1
    z_image.requires_grad_(), z_text.requires_grad_()
    expected = naive_nclip_loss(z_image, z_text, 0.1, 0.04, 0.7, targets)
    loss, stats = nclip.nclip_loss(z_image, z_text, 0.1, 0.04, 0.7, targets)
    assert torch.allclose(loss.double(), expected, atol=1e-5)
    g_expected = torch.autograd.grad(expected, (z_image, z_text))
    g_got = torch.autograd.grad(loss, (z_image, z_text))
    for a, b in zip(g_got, g_expected):
        assert torch.allclose(a.double(), b, atol=1e-5)
    assert 0 < stats["prototypes_used"] <= 5


def test_sinkhorn_matches_the_naive_loop_and_balances_samples():
    scores = torch.rand(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = nclip.sinkhorn(scores)
    assert torch.allclose(q.double(), naive_sinkhorn(scores), atol=1e-6)
    assert torch.allclose(q.sum(1), torch.ones(8, dtype=q.dtype), atol=1e-6)  # each sample's target sums to 1


def one_hot_scores(prototypes, K, high=1.0, low=-1.0):
    scores = torch.full((len(prototypes), K), low)
    scores[torch.arange(len(prototypes)), torch.tensor(prototypes)] = high
    return scores


def test_a_collapsed_batch_costs_more_than_a_spread_one_with_the_same_confidence():
    K = 8
    collapsed = one_hot_scores([0] * 8, K)  # every sample on prototype 0
    spread = one_hot_scores(list(range(8)), K)  # one sample per prototype, same per-sample confidence
    for targets in ("softmax", "sinkhorn"):
        l_collapsed, s_collapsed = nclip.nclip_loss(collapsed, collapsed, targets=targets)
        l_spread, s_spread = nclip.nclip_loss(spread, spread, targets=targets)
        assert l_collapsed > l_spread + 1.0, targets
        assert s_collapsed["prototypes_used"] == 1 and s_spread["prototypes_used"] == K
        assert s_collapsed["entropy_batch_mean"] < s_spread["entropy_batch_mean"]
    # the same per-sample entropy in both batches: only the batch-level regulariser tells them apart
    assert math.isclose(s_collapsed["entropy_per_sample"].item(), s_spread["entropy_per_sample"].item(), rel_tol=1e-6)


def test_targets_are_sharper_than_the_predictions_they_supervise():
    scores = F.normalize(torch.randn(64, 32, generator=torch.Generator().manual_seed(2)), dim=1)  # cosine-sized
    p = torch.softmax(scores / 0.1, 1)
    for q in (torch.softmax(scores / 0.04, 1), nclip.sinkhorn(scores)):
        assert nclip.entropy(q).mean() < nclip.entropy(p).mean() - 0.1


def test_prototype_scores_are_fp32_under_bf16_autocast():
    """bf16 resolves ~0.008 near 1, an error of 0.1-0.2 in a logit at tau 0.04-0.1: the head computes the
    normalised-bottleneck x prototypes product in fp32 even inside autocast."""
    torch.manual_seed(0)
    head = nclip.PrototypeHead(16, 32, 8, 64)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = head(x)  # [4, 64]
        z = F.normalize(head.mlp(x).float(), dim=-1)  # [4, 8], the bottleneck as autocast computes it
    assert scores.dtype == torch.float32
    expected = z.double() @ F.normalize(head.prototypes.double(), dim=-1).t()  # [4, 64]
    assert torch.allclose(scores.double(), expected, atol=1e-6)


# --- distributed -------------------------------------------------------------------------------------

def loss_inputs():
    g = torch.Generator().manual_seed(3)
    return {"image_features": F.normalize(torch.randn(8, 6, generator=g), dim=1),
            "text_features": F.normalize(torch.randn(8, 6, generator=g), dim=1),
            "image_scores": torch.rand(8, 5, generator=g) * 2 - 1, "text_scores": torch.rand(8, 5, generator=g) * 2 - 1}


def losses_and_gradients(rows):
    inputs = {k: v[rows].clone().requires_grad_() for k, v in loss_inputs().items()}
    out = {}
    for targets in ("softmax", "sinkhorn"):
        loss, _ = nclip.nclip_loss(inputs["image_scores"], inputs["text_scores"], targets=targets)
        out[f"nclip_{targets}"] = (loss.detach(),
                                   torch.autograd.grad(loss, (inputs["image_scores"], inputs["text_scores"])))
    loss, _ = xclip.xclip_loss(inputs["image_features"], inputs["text_features"], torch.tensor(10.0),
                               inputs["image_scores"], inputs["text_scores"], clip_weight=0.3, nclip_weight=0.7)
    out["xclip"] = (loss.detach(), torch.autograd.grad(loss, list(inputs.values())))
    return out


def half(rank, world_size):
    return losses_and_gradients(slice(rank * 4, rank * 4 + 4))


def test_two_processes_on_halves_equal_one_process():
    whole = losses_and_gradients(slice(0, 8))
    halves = run_distributed(half, 2)
    for name, (loss, grads) in whole.items():
        assert torch.allclose((halves[0][name][0] + halves[1][name][0]) / 2, loss, atol=1e-6), name
        for r in range(2):  # each rank's input gradient is W x the global one (DDP divides by W)
            for got, expected in zip(halves[r][name][1], grads):
                assert torch.allclose(got / 2, expected[r * 4 : r * 4 + 4], atol=1e-6), name


# --- runs --------------------------------------------------------------------------------------------

def run(script, args, nproc=1):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable])
    out = subprocess.run(cmd + [os.path.join(ROOT, script)] + args, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"} if nproc > 1 else None)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.parametrize("script", ["nclip.py", "xclip.py"])
def test_torchrun_smoke_and_resume(tmp_path, script):
    common = ["--steps", "4", "--batch-size", "8", "--warmup", "2"] + FAST
    run(script, common + ["--out-dir", str(tmp_path / "ddp"), "--batch-size", "4"], nproc=2)
    ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    assert ddp["method"] == script[:-3] and ddp["step"] == 4
    run(script, common + ["--out-dir", str(tmp_path / "straight")])
    run(script, common + ["--out-dir", str(tmp_path / "resumed"), "--steps", "2"])
    run(script, common + ["--out-dir", str(tmp_path / "resumed"), "--resume", "auto"])
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    assert '"prototypes_used"' in log[0] and '"zeroshot_synthetic_top1"' in log[-1]


def test_xclip_with_zero_nclip_weight_trains_like_clip(tmp_path):
    """xCLIP with beta = 0 and CLIP start from the same towers and take the same first step."""
    torch.manual_seed(0)
    a = clip.CLIP("tiny")
    torch.manual_seed(0)
    b = xclip.XCLIP("tiny")
    shared = [k for k in a.state_dict()
              if k.startswith(("visual.", "text.", "image_projection", "text_projection", "logit_scale"))]
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in shared)
    images = torch.randint(0, 256, (6, 1, 3, 32, 32), dtype=torch.uint8)
    tokens = torch.randint(0, 1000, (6, 1, 20))
    tokens[:, :, 9] = clip.data.EOT_TOKEN
    la, _ = clip.compute_loss(a(images, tokens), clip.parse_args([]))
    lb, _ = xclip.compute_loss(b(images, tokens), xclip.parse_args(["--nclip-weight", "0"]))
    assert torch.allclose(la, lb)
