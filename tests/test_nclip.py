"""nclip.py and xclip.py: the loss against naive references, collapse checks, 2 processes vs 1, smoke
runs under torchrun, resume."""

import json
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


def naive_nclip_loss(z_image, z_text, student_temp, teacher_temp, reg_weight, targets, sharpness=0.0):
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
    per_sample = sum(-p[m][n, k] * torch.log(p[m][n, k]) for m in ("I", "T") for n in range(b) for k in range(K))
    return prediction + reg_weight * regulariser + sharpness * per_sample / (2 * b)


@pytest.mark.parametrize("targets", ["softmax", "sinkhorn"])
def test_nclip_loss_matches_the_naive_reference(targets):
    g = torch.Generator().manual_seed(0)
    z_image = torch.rand(6, 5, generator=g, dtype=torch.float64) * 2 - 1
    z_text = torch.rand(6, 5, generator=g, dtype=torch.float64) * 2 - 1
    z_image.requires_grad_(), z_text.requires_grad_()
    expected = naive_nclip_loss(z_image, z_text, 0.1, 0.04, 0.7, targets, sharpness=0.6)
    loss, stats = nclip.nclip_loss(z_image, z_text, 0.1, 0.04, 0.7, targets, sharpness=0.6)
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


@pytest.mark.parametrize("K", [1024, 4096])
def test_targets_are_never_flatter_than_sharp_predictions_when_prototypes_outnumber_samples(K):
    """K > N (the ViT presets: K 32768 against a few thousand samples): Sinkhorn's equal share 1/K per
    prototype would spread every sample over >= K/N prototypes, flatter than a confident prediction, and drive
    the predictions back to uniform. nCLIP caps each prototype at 1/N instead: confident targets stay so."""
    N, g = 256, torch.Generator().manual_seed(3)
    scores = torch.full((N, K), -0.2) + 0.01 * torch.randn(N, K, generator=g)  # [N, K]
    scores[torch.arange(N), torch.randperm(K, generator=g)[:N]] = 0.9  # each sample prefers its own prototype
    p = torch.softmax(scores / 0.1, 1)  # [N, K], the predictions at tau_s
    q = nclip.sinkhorn(scores, capped=True)  # [N, K]
    assert torch.allclose(q.sum(1), torch.ones(N), atol=1e-5)
    assert nclip.entropy(q).mean() <= nclip.entropy(p).mean()
    assert nclip.entropy(nclip.sinkhorn(scores)).mean() > math.log(K / N)  # uncapped: at least K/N prototypes
    _, stats = nclip.nclip_loss(scores, scores)  # the loss takes the capped targets: a small prediction loss
    assert stats["prediction_loss"] < 2.0 < math.log(K / N) + 0.7


def toy_training(steps=80, K=512, **loss_options):
    """The nCLIP heads trained on paired toy features (64 classes, a class embedding per modality plus noise of
    the same size): the end-of-run diagnostics. In-process, one thread: a few seconds."""
    g = torch.Generator().manual_seed(0)
    classes, dim = 64, 32
    embed_image, embed_text = torch.randn(classes, dim, generator=g), torch.randn(classes, dim, generator=g)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: faster on one thread than on two contended ones
    heads = nclip.PrototypeHead(dim, 64, 16, K), nclip.PrototypeHead(dim, 64, 16, K)
    optimizer = torch.optim.AdamW([p for h in heads for p in h.parameters()], lr=3e-3)
    for _ in range(steps):
        y = torch.randint(0, classes, (256,), generator=g)  # [256] labels of a batch
        x_image = embed_image[y] + torch.randn(256, dim, generator=g)  # [256, dim]
        x_text = embed_text[y] + torch.randn(256, dim, generator=g)  # [256, dim]
        loss, stats = nclip.nclip_loss(heads[0](x_image), heads[1](x_text), **loss_options)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return {k: float(v) for k, v in stats.items()}


def test_a_short_training_run_does_not_collapse():
    """The collapse of the default loss before this fix, reproduced on toy features: without the per-sample
    entropy term every output goes uniform (H(p) = log K, the prediction loss log K: a fixed point the
    mean-entropy term does not penalise). With it, outputs are confident and spread over many prototypes."""
    K = 512
    trained = toy_training(K=K)
    assert trained["entropy_per_sample"] < math.log(K) - 2 and trained["prototypes_used"] >= 64
    collapsed = toy_training(K=K, sharpness=0.0)
    assert collapsed["entropy_per_sample"] > math.log(K) - 0.3


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


@pytest.mark.parametrize("module", [nclip, xclip], ids=["nclip.py", "xclip.py"])
def test_torchrun_smoke_and_resume(tmp_path, module):
    """torchrun with 2 ranks trains and writes a checkpoint of the method; a run stopped after 2 steps and resumed
    ends with the weights and losses of a straight run (in this process: resume goes through the same code as
    clip.py's, whose SIGKILL and signal tests run separate processes with loader workers)."""
    script = f"{module.__name__}.py"
    common = ["--steps", "4", "--batch-size", "8", "--warmup", "2"] + FAST
    run(script, common + ["--out-dir", str(tmp_path / "ddp"), "--batch-size", "4"], nproc=2)
    ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    assert ddp["method"] == module.__name__ and ddp["step"] == 4
    module.main(module.parse_args(common + ["--out-dir", str(tmp_path / "straight")]))
    module.main(module.parse_args(common + ["--out-dir", str(tmp_path / "resumed"), "--steps", "2"]))
    module.main(module.parse_args(common + ["--out-dir", str(tmp_path / "resumed"), "--resume", "auto"]))
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    assert '"prototypes_used"' in log[0] and '"zeroshot_synthetic_top1"' in log[-1]
    losses = [[line for line in (tmp_path / d / "log.jsonl").read_text().splitlines() if '"loss"' in line]
              for d in ("straight", "resumed")]
    assert [json.loads(line)["loss"] for line in losses[0]] == [json.loads(line)["loss"] for line in losses[1]]


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
