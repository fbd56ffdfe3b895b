"""Tests of ssl_losses.py: naive loop references written from the papers' equations, hand-checkable cases,
stop-gradients, Sinkhorn marginals, and 2 gloo processes on halves of a batch vs 1 process on all of it.

DDP convention under test. Each rank r returns a loss L_r computed from its local rows, and
mean_r L_r must equal the loss L of the whole batch in one process. DDP averages parameter gradients
over ranks, so the gradient that reaches rank r's local inputs, once every rank has run backward (the
collectives sum gradients across ranks inside backward), divided by the world size W, must equal dL/d(those
rows) in one process. That is what `test_two_processes_match_one` checks, loss by loss.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import ssl_losses
from distributed import run_distributed

B, D, K = 6, 5, 7  # naive-reference sizes
W, N_DIST = 2, 8  # distributed test: 2 ranks of 4 rows


# ---------------------------------------------------------------------------------------------------
# Naive references: explicit loops over samples and dimensions, float64


def naive_simclr(z1, z2, tau):
    z1, z2 = z1.double(), z2.double()
    N = len(z1)
    views = []  # the paper's order: 2k-1 and 2k are the two views of sample k
    for k in range(N):
        views += [z1[k] / z1[k].norm(), z2[k] / z2[k].norm()]

    def l(i, j):
        denominator = sum(torch.exp(views[i] @ views[k] / tau) for k in range(2 * N) if k != i)
        return -torch.log(torch.exp(views[i] @ views[j] / tau) / denominator)

    return sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(N)) / (2 * N)


def naive_byol(p, z):
    """BYOL eq. 2 as a squared distance of the normalised vectors (2 - 2 cos is its closed form)."""
    p, z = p.double(), z.detach().double()
    return sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(len(p))) / len(p)


def naive_barlow_twins(z1, z2, lambd, standardise=True):
    z1, z2 = z1.double(), z2.double()
    N, D = z1.shape

    def standardised(z, i):  # column i of z, centred and divided by its (biased) std over the batch
        mean = sum(z[n, i] for n in range(N)) / N
        var = sum((z[n, i] - mean) ** 2 for n in range(N)) / N
        return [(z[n, i] - mean) / torch.sqrt(var + 1e-5) for n in range(N)]

    column = standardised if standardise else lambda z, i: [z[n, i] for n in range(N)]
    a = [column(z1, i) for i in range(D)]
    b = [column(z2, j) for j in range(D)]
    loss = 0
    for i in range(D):
        for j in range(D):
            C_ij = sum(a[i][n] * b[j][n] for n in range(N)) / N
            loss = loss + ((1 - C_ij) ** 2 if i == j else lambd * C_ij**2)
    return loss


def naive_vicreg(z1, z2, sim_coeff, std_coeff, cov_coeff):
    z1, z2 = z1.double(), z2.double()
    N, D = z1.shape
    s = sum((z1[n, d] - z2[n, d]) ** 2 for n in range(N) for d in range(D)) / (N * D)

    def v_and_c(z):
        mean = [sum(z[n, d] for n in range(N)) / N for d in range(D)]
        cov = [[sum((z[n, i] - mean[i]) * (z[n, j] - mean[j]) for n in range(N)) / (N - 1) for j in range(D)]
               for i in range(D)]
        v = sum(torch.relu(1 - torch.sqrt(cov[d][d] + 1e-4)) for d in range(D)) / D
        c = sum(cov[i][j] ** 2 for i in range(D) for j in range(D) if i != j) / D
        return v, c

    v1, c1 = v_and_c(z1)
    v2, c2 = v_and_c(z2)
    return sim_coeff * s + std_coeff * (v1 / 2 + v2 / 2) + cov_coeff * (c1 + c2)


def naive_sinkhorn(scores, epsilon, iters):
    N, K = scores.shape
    Q = [[math.exp(scores[n, k].item() / epsilon) for n in range(N)] for k in range(K)]  # [K][N]
    total = sum(sum(row) for row in Q)
    Q = [[q / total for q in row] for row in Q]
    for _ in range(iters):
        for k in range(K):
            row_sum = sum(Q[k])
            Q[k] = [q / row_sum / K for q in Q[k]]
        for n in range(N):
            col_sum = sum(Q[k][n] for k in range(K))
            for k in range(K):
                Q[k][n] = Q[k][n] / col_sum / N
    return torch.tensor([[Q[k][n] * N for k in range(K)] for n in range(N)], dtype=torch.float64)  # [N, K]


def naive_swav(scores_a, scores_b, tau, epsilon, iters):
    q_a, q_b = naive_sinkhorn(scores_a, epsilon, iters), naive_sinkhorn(scores_b, epsilon, iters)
    a, b = scores_a.double(), scores_b.double()
    N, K = a.shape
    loss = 0
    for n in range(N):
        log_p_a = [a[n, k] / tau - torch.log(sum(torch.exp(a[n, j] / tau) for j in range(K))) for k in range(K)]
        log_p_b = [b[n, k] / tau - torch.log(sum(torch.exp(b[n, j] / tau) for j in range(K))) for k in range(K)]
        loss = loss - sum(q_b[n, k] * log_p_a[k] + q_a[n, k] * log_p_b[k] for k in range(K)) / 2
    return loss / N


def naive_swalip(h_image, h_text, scale, epsilon, iters):
    """The official SwALIPLoss (Fini et al., losses.py), loop for loop: logits of view l1 against the other
    modality's view l2, targets Sinkhorn of the unscaled logits, swapped to views (1 - l1, 1 - l2)."""
    h_image, h_text = h_image.double(), h_text.double()
    logits_image = [[h_image[:, l1] @ h_text[:, l2].t() for l2 in range(2)] for l1 in range(2)]
    logits_text = [[h_text[:, l1] @ h_image[:, l2].t() for l2 in range(2)] for l1 in range(2)]
    targets_image = [[naive_sinkhorn(x.detach(), epsilon, iters) for x in row] for row in logits_image]
    targets_text = [[naive_sinkhorn(x.detach(), epsilon, iters) for x in row] for row in logits_text]

    def cross_entropy(logits, targets):
        return -torch.mean(torch.sum(targets * torch.log_softmax(logits, dim=1), dim=1))

    loss = 0
    for l1 in range(2):
        for l2 in range(2):
            t1, t2 = 1 - l1, 1 - l2
            loss = loss + (cross_entropy(logits_image[l1][l2] * scale, targets_image[t1][t2])
                           + cross_entropy(logits_text[l1][l2] * scale, targets_text[t1][t2])) / 2
    return loss / 4


# ---------------------------------------------------------------------------------------------------
# Helpers


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def loss_and_grads(fn, *inputs):
    """fn(*inputs) and the gradient of each input (None where none flows)."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = fn(*inputs)
    loss.backward()
    return loss.detach(), [None if x.grad is None else x.grad.detach() for x in inputs]


def check_against_naive(fn, naive, *inputs, atol=1e-5):
    loss, grads = loss_and_grads(fn, *inputs)
    loss_ref, grads_ref = loss_and_grads(naive, *[x.double() for x in inputs])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), loss_ref, atol=atol, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None) == (g_ref is None)
        if g is not None:
            torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=1e-4)


# [4, 3]: centred, mutually orthogonal columns with biased variance 1
HADAMARD = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])


# ---------------------------------------------------------------------------------------------------
# Against the naive references


def test_simclr_matches_naive():
    check_against_naive(lambda a, b: ssl_losses.simclr_loss(a, b, 0.1), lambda a, b: naive_simclr(a, b, 0.1),
                        randn(B, D, seed=0), randn(B, D, seed=1))
    check_against_naive(lambda a, b: ssl_losses.simclr_loss(a, b, 0.5), lambda a, b: naive_simclr(a, b, 0.5),
                        randn(B, D, seed=2), randn(B, D, seed=3))


def test_byol_loss_matches_naive_and_stops_gradient():
    check_against_naive(ssl_losses.byol_loss, naive_byol, randn(B, D, seed=4), randn(B, D, seed=5))
    _, (grad_p, grad_z) = loss_and_grads(ssl_losses.byol_loss, randn(B, D, seed=4), randn(B, D, seed=5))
    assert grad_z is None and grad_p.abs().sum() > 0


def test_barlow_twins_matches_naive():
    z1, z2 = randn(B, D, seed=6), randn(B, D, seed=7)
    check_against_naive(ssl_losses.barlow_twins_loss, lambda a, b: naive_barlow_twins(a, b, 5e-3), z1, z2)
    check_against_naive(lambda a, b: ssl_losses.barlow_twins_loss(a, b, lambd=0.5),
                        lambda a, b: naive_barlow_twins(a, b, 0.5), z1, 0.5 * z1 + z2)
    # BarLIP: C = z1^T z2 / N of the projector's (BatchNorm) outputs, with no standardisation in the loss
    check_against_naive(lambda a, b: ssl_losses.barlow_twins_loss(a, b, standardise=False),
                        lambda a, b: naive_barlow_twins(a, b, 5e-3, standardise=False), 2 * z1 + 1, z2)


def test_swalip_matches_the_official_loops():
    h_image = F.normalize(randn(B, 2, D, seed=24), dim=-1)  # [B, 2 views, D]
    h_text = F.normalize(randn(B, 2, D, seed=25), dim=-1)
    for scale in (10.0, 3.0):
        check_against_naive(lambda a, b: ssl_losses.swalip_loss(a, b, torch.tensor(scale)),
                            lambda a, b: naive_swalip(a, b, scale, 0.05, 3), h_image, h_text)


def test_vicreg_matches_naive():
    z1, z2 = 0.3 * randn(B, D, seed=8), 0.3 * randn(B, D, seed=9)  # std < 1, so the hinge is active
    check_against_naive(ssl_losses.vicreg_loss, lambda a, b: naive_vicreg(a, b, 25.0, 25.0, 1.0), z1, z2, atol=1e-4)
    check_against_naive(lambda a, b: ssl_losses.vicreg_loss(a, b, 1.0, 2.0, 3.0),
                        lambda a, b: naive_vicreg(a, b, 1.0, 2.0, 3.0), z1, z1 + 0.1 * z2)


@pytest.mark.parametrize("iters", [0, 1, 3, 10])
def test_sinkhorn_matches_naive(iters):
    scores = F.normalize(randn(B, D, seed=10), dim=-1) @ F.normalize(randn(K, D, seed=11), dim=-1).t()  # [B, K] cosines
    torch.testing.assert_close(ssl_losses.sinkhorn(scores, 0.05, iters).double(), naive_sinkhorn(scores, 0.05, iters),
                               atol=1e-6, rtol=1e-4)


def test_swav_matches_naive():
    scores_a, scores_b = 0.5 * randn(B, K, seed=12), 0.5 * randn(B, K, seed=13)
    loss = ssl_losses.swav_loss(scores_a, scores_b)
    torch.testing.assert_close(loss.double(), naive_swav(scores_a, scores_b, 0.1, 0.05, 3), atol=1e-5, rtol=1e-5)
    loss = ssl_losses.swav_loss(scores_a, scores_b, temperature=0.5, epsilon=0.2, iters=5)
    torch.testing.assert_close(loss.double(), naive_swav(scores_a, scores_b, 0.5, 0.2, 5), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Hand-checkable cases


def test_simclr_hand_cases():
    z = torch.ones(B, D)  # all 2N views identical: every logit 1/tau, 2N - 1 candidates
    assert ssl_losses.simclr_loss(z, z).item() == pytest.approx(math.log(2 * B - 1), rel=1e-6)
    e = torch.eye(D)  # sample i = e_i in both views: positive 1, the 2N - 2 negatives 0
    tau = 0.5
    expected = math.log(1 + (2 * D - 2) * math.exp(-1 / tau))
    assert ssl_losses.simclr_loss(e, 3 * e, tau).item() == pytest.approx(expected, rel=1e-6)


def test_byol_loss_hand_cases():  # 2 - 2 cos: 0 when aligned, 2 when orthogonal, 4 when opposite
    p = randn(B, D, seed=14)
    assert ssl_losses.byol_loss(p, 2 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert ssl_losses.byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)
    e = torch.eye(2)
    assert ssl_losses.byol_loss(e, e.flip(0)).item() == pytest.approx(2.0, abs=1e-7)


def test_barlow_twins_hand_cases():
    eps, D3 = 1e-5, HADAMARD.shape[1]
    C_ii = 1 / math.sqrt(1 + eps) ** 2  # standardised columns: unit norm / N up to eps, mutually orthogonal
    assert ssl_losses.barlow_twins_loss(HADAMARD, HADAMARD).item() == pytest.approx(D3 * (1 - C_ii) ** 2, abs=1e-9)
    # standardisation makes the loss invariant to per-dimension scale and shift
    assert ssl_losses.barlow_twins_loss(HADAMARD, 3 * HADAMARD + 2).item() == pytest.approx(0.0, abs=1e-8)
    assert ssl_losses.barlow_twins_loss(HADAMARD, -HADAMARD).item() == pytest.approx(D3 * (1 + C_ii) ** 2, rel=1e-6)
    # all columns equal: C = 1 everywhere (up to eps), only the off-diagonal term remains: lambda * D (D - 1)
    z = HADAMARD[:, :1].repeat(1, 3)
    assert ssl_losses.barlow_twins_loss(z, z, lambd=0.1).item() == pytest.approx(0.1 * 3 * 2, rel=1e-4)
    # without standardisation the scale counts: C = HADAMARD^T (3 HADAMARD) / 4 = 3 I
    assert ssl_losses.barlow_twins_loss(HADAMARD, HADAMARD, standardise=False).item() == pytest.approx(0.0, abs=1e-12)
    assert ssl_losses.barlow_twins_loss(HADAMARD, 3 * HADAMARD, standardise=False).item() == pytest.approx(D3 * 4.0)


def test_vicreg_hand_cases():
    # orthogonal centred columns with unbiased std sqrt(4/3) > 1: no hinge, no covariance, no invariance
    assert ssl_losses.vicreg_loss(HADAMARD, HADAMARD).item() == pytest.approx(0.0, abs=1e-7)
    # a shift of one in every entry: only the invariance term, MSE = 1
    assert ssl_losses.vicreg_loss(HADAMARD, HADAMARD + 1).item() == pytest.approx(25.0, rel=1e-6)
    # collapse to a constant: std = sqrt(1e-4) = 0.01 in every dimension of both branches
    z = torch.full((4, 3), 0.7)
    assert ssl_losses.vicreg_loss(z, z).item() == pytest.approx(25.0 * 0.99, rel=1e-6)


def test_sinkhorn_hand_case_and_marginals():
    uniform = ssl_losses.sinkhorn(torch.zeros(B, K))
    torch.testing.assert_close(uniform, torch.full((B, K), 1 / K))
    scores = 0.1 * randn(B, K, seed=15)
    Q = ssl_losses.sinkhorn(scores, iters=3)
    torch.testing.assert_close(Q.sum(1), torch.ones(B))  # columns (samples) are normalised last: exact
    assert not torch.allclose(Q.sum(0), torch.full((K,), B / K), atol=1e-3)  # prototypes: not yet balanced
    Q = ssl_losses.sinkhorn(scores, iters=50)
    torch.testing.assert_close(Q.sum(1), torch.ones(B))
    torch.testing.assert_close(Q.sum(0), torch.full((K,), B / K), atol=1e-4, rtol=1e-4)
    assert (Q >= 0).all()


def test_sinkhorn_is_stable_and_shift_invariant():
    scores = 0.5 * randn(B, K, seed=16)
    for iters in (0, 3):  # a constant cancels in Q /= sum(Q), even one whose exp overflows fp32 (exp(210))
        big = ssl_losses.sinkhorn(scores + 10.0, iters=iters)
        assert torch.isfinite(big).all()
        torch.testing.assert_close(big, ssl_losses.sinkhorn(scores, iters=iters), atol=1e-6, rtol=1e-4)
    # a constant per prototype (row of Q) cancels in the first row normalisation, a constant per sample does not
    Q = ssl_losses.sinkhorn(scores)
    torch.testing.assert_close(ssl_losses.sinkhorn(scores + torch.linspace(-1, 1, K)), Q, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(ssl_losses.sinkhorn(scores + torch.linspace(-1, 1, B)[:, None]), Q, atol=1e-3)


def test_swav_hand_case_and_targets_carry_no_gradient():
    zeros = torch.zeros(B, K)
    assert ssl_losses.swav_loss(zeros, zeros).item() == pytest.approx(math.log(K), rel=1e-6)
    scores_a, scores_b = 0.5 * randn(B, K, seed=17), 0.5 * randn(B, K, seed=18)
    T = 0.1
    _, (grad_a, grad_b) = loss_and_grads(ssl_losses.swav_loss, scores_a, scores_b)
    # with fixed targets, d/ds_a of -1/2 mean_n sum_k q_b log softmax(s_a / T) = (softmax(s_a / T) - q_b) / (2 B T)
    q_a, q_b = ssl_losses.sinkhorn(scores_a), ssl_losses.sinkhorn(scores_b)
    torch.testing.assert_close(grad_a, (torch.softmax(scores_a / T, -1) - q_b) / (2 * B * T))
    torch.testing.assert_close(grad_b, (torch.softmax(scores_b / T, -1) - q_a) / (2 * B * T))
    assert not ssl_losses.sinkhorn(scores_a.clone().requires_grad_(True)).requires_grad


# ---------------------------------------------------------------------------------------------------
# 2 processes on halves vs 1 process on the whole batch


LOSSES = {
    "simclr": lambda a, b: ssl_losses.simclr_loss(a, b, 0.2),
    "byol": ssl_losses.byol_loss,
    "barlow_twins": lambda a, b: ssl_losses.barlow_twins_loss(a, b, lambd=0.1),
    "barlow_twins_raw": lambda a, b: ssl_losses.barlow_twins_loss(a, b, lambd=0.1, standardise=False),
    "vicreg": ssl_losses.vicreg_loss,
    "swav": lambda a, b: ssl_losses.swav_loss(a, b, temperature=0.2, epsilon=0.1, iters=3),
    "swalip": lambda a, b: ssl_losses.swalip_loss(a, b, torch.tensor(4.0), epsilon=0.1, iters=3),
}


def distributed_inputs():
    embeddings = 0.5 * randn(N_DIST, D, seed=20), 0.5 * randn(N_DIST, D, seed=21)
    scores = 0.2 * randn(N_DIST, K, seed=22), 0.2 * randn(N_DIST, K, seed=23)
    views = F.normalize(randn(N_DIST, 2, D, seed=26), dim=-1), F.normalize(randn(N_DIST, 2, D, seed=27), dim=-1)
    return {name: scores if name == "swav" else views if name == "swalip" else embeddings for name in LOSSES}


def every_loss_on_my_half(rank, world_size, inputs):
    """Runs in each gloo process: every loss, its gradients, and Sinkhorn, on this rank's rows."""
    b = N_DIST // world_size
    rows = slice(rank * b, (rank + 1) * b)
    out = {}
    for name, fn in LOSSES.items():
        out[name] = loss_and_grads(fn, *[x[rows] for x in inputs[name]])
    scores = inputs["swav"][0][rows]
    out["sinkhorn3"] = ssl_losses.sinkhorn(scores, 0.1, 3)
    out["sinkhorn50"] = ssl_losses.sinkhorn(scores, 0.1, 50)
    return out


@pytest.fixture(scope="module")
def two_process_results():
    return run_distributed(every_loss_on_my_half, W, distributed_inputs())


@pytest.mark.parametrize("name", list(LOSSES))
def test_two_processes_match_one(two_process_results, name):
    inputs = distributed_inputs()[name]
    loss, grads = loss_and_grads(LOSSES[name], *inputs)  # one process, whole batch
    rank_losses = torch.stack([r[name][0] for r in two_process_results])
    torch.testing.assert_close(rank_losses.mean(), loss, atol=1e-6, rtol=1e-5)
    if name in ("barlow_twins", "barlow_twins_raw"):  # built only from global statistics: the same on every rank
        torch.testing.assert_close(rank_losses, loss.expand(W), atol=1e-6, rtol=1e-5)
    b = N_DIST // W
    for i, g in enumerate(grads):
        if g is None:  # a stop-gradient input: none on any rank either
            assert all(r[name][1][i] is None for r in two_process_results)
            continue
        # after every rank's backward, DDP averages: (rank r's gradient) / W must be the global one
        for rank, r in enumerate(two_process_results):
            torch.testing.assert_close(r[name][1][i] / W, g[rank * b : (rank + 1) * b], atol=1e-6, rtol=1e-4)


def test_two_process_sinkhorn_matches_one(two_process_results):
    scores = distributed_inputs()["swav"][0]
    for key, iters in (("sinkhorn3", 3), ("sinkhorn50", 50)):
        Q = torch.cat([r[key] for r in two_process_results])  # [N, K]
        torch.testing.assert_close(Q, ssl_losses.sinkhorn(scores, 0.1, iters), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(Q.sum(0), torch.full((K,), N_DIST / K), atol=1e-5, rtol=1e-5)
