"""Visual self-supervised losses (SimCLR, BYOL/SimSiam, Barlow Twins, VICReg, SwAV) and SwALIP, exact under DDP.

Each function takes this rank's LOCAL embeddings ([b, D], the same b on every rank) and takes every batch
statistic (negatives, means, variances, covariances, cross-correlations, Sinkhorn sums) over the GLOBAL
batch of N = b * world_size samples. The convention, the same as clip.py's `clip_loss`:
  * the MEAN over ranks of the returned losses is the loss of the global batch (a term that is a mean over
    samples is this rank's mean; a term built from global statistics is the same number on every rank);
  * the collectives below are autograd-aware and SUM the gradient over ranks in their backward, so after
    DDP averages parameter gradients (divides by world_size) they equal those of one process that holds
    the whole global batch.
Softmax, cross-entropy and all statistics are computed in fp32. Without a process group (or with one
rank) the collectives are no-ops and every function is the plain single-process loss. Copy a function
together with the helpers it calls; the file imports only torch.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------
# Distributed helpers


# --- shared: collectives ---
def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


class AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward is also a sum over ranks: every rank's input reaches every rank's
    output, so its gradient is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x):
    """Sum of x over ranks, differentiable (for statistics of the global batch); x itself on one process."""
    return AllReduceWithGrad.apply(x) if get_world_size() > 1 else x
# --- end shared: collectives ---


# --- shared: gather ---
class GatherWithGrad(torch.autograd.Function):
    """all_gather of [b, D] into [world * b, D] whose backward hands each rank the gradient of its own
    slice summed over all ranks (an all-reduce, then the rank's slice; this works on gloo and NCCL)."""

    @staticmethod
    def forward(ctx, x):  # [b, D]
        parts = [torch.empty_like(x) for _ in range(get_world_size())]  # world x [b, D]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # [N, D]

    @staticmethod
    def backward(ctx, grad):  # [N, D]
        grad = grad.clone()  # never all-reduce autograd's buffer in place
        dist.all_reduce(grad)  # sum over ranks of d(loss on rank r) / d(every feature)
        b = grad.shape[0] // get_world_size()
        return grad[get_rank() * b : (get_rank() + 1) * b]  # [b, D]


def gather_with_grad(x):
    """All ranks' rows of x in rank order, differentiable; x itself on one process."""
    return GatherWithGrad.apply(x) if get_world_size() > 1 else x
# --- end shared: gather ---


def _off_diagonal(M):  # [D, D] -> [D * (D - 1)], every entry but the diagonal
    D = M.shape[0]
    return M.flatten()[:-1].view(D - 1, D + 1)[:, 1:].flatten()


# ---------------------------------------------------------------------------------------------------
# Losses


def simclr_loss(z1, z2, temperature=0.1):
    """NT-Xent (Chen, Kornblith, Norouzi, Hinton 2020, SimCLR, arXiv:2002.05709, eq. 1), tau = 0.1 as in
    SLIP (Mu et al. 2021). z1, z2: projections [b, D] of two views, L2-normalised here.
        l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)
        L = 1 / (2N) sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ]      over the 2N views of the global batch
    Each rank scores its 2b anchors against all 2N views (gathered with gradient) and returns the mean over
    its anchors; the mean over ranks is L."""
    b = z1.shape[0]
    N = b * get_world_size()
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)  # [b, D] each
    anchors = torch.cat([z1, z2])  # [2b, D]: this rank's views, view 1 then view 2
    candidates = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])  # [2N, D]: all views 1, all views 2
    logits = anchors @ candidates.t() / temperature  # [2b, 2N]
    i = torch.arange(b, device=z1.device) + b * get_rank()  # [b] global index of this rank's samples
    self_index = torch.cat([i, i + N])  # [2b] column of each anchor itself
    positive = torch.cat([i + N, i])  # [2b] column of the other view of the same sample
    is_self = F.one_hot(self_index, 2 * N).bool()  # [2b, 2N]
    logits = logits.masked_fill(is_self, float("-inf"))  # [2b, 2N], the sum runs over k != i
    return F.cross_entropy(logits, positive)


def byol_loss(p, z):
    """BYOL (Grill et al. 2020, arXiv:2006.07733, eq. 2): the squared distance of the L2-normalised
    prediction and (stop-gradient) target,
        L(p, z) = mean_i || p_i / ||p_i|| - sg(z_i) / ||z_i|| ||^2 = 2 - 2 mean_i cos(p_i, sg(z_i))
    p: predictions [b, D] (receive gradient); z: targets [b, D] (detached here). Fini et al.'s SiamLIP and
    BYOLIP use this form. SimSiam (Chen & He 2021, arXiv:2011.10566, eq. 1) writes D(p, z) = -cos(p, sg(z)) =
    L / 2 - 1: the same minimiser with half the gradient. No batch statistic: the rank returns its local
    mean, and the mean over ranks is the global mean."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()  # [b] -> scalar


def barlow_twins_loss(z1, z2, lambd=5e-3, standardise=True):
    """Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny 2021, arXiv:2103.03230, eq. 1-2), lambda = 5e-3.
        z_n = (z - mean_batch z) / sqrt(var_batch z + 1e-5)  per dimension (the code's BatchNorm1d(affine=False))
        C = z1_n^T z2_n / N,    L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2
    standardise=False skips z_n = ...: C = z1^T z2 / N, for projectors that end in a BatchNorm of their own
    (Fini et al.'s BarLIP ends in an affine BatchNorm, whose scale and shift the loss then sees). Mean,
    (biased) variance and C are sums over the global batch through `all_reduce_with_grad`, so every rank
    returns the same global L. No loss scale here: Fini et al. (BarLIP) multiply L by 0.025 outside."""
    N = z1.shape[0] * get_world_size()

    def standardised(z):  # [b, D] -> [b, D], with global-batch statistics
        mean = all_reduce_with_grad(z.sum(0)) / N  # [D]
        var = all_reduce_with_grad(((z - mean) ** 2).sum(0)) / N  # [D]
        return (z - mean) / torch.sqrt(var + 1e-5)  # [b, D]

    z1, z2 = z1.float(), z2.float()  # [b, D] each
    if standardise:
        z1, z2 = standardised(z1), standardised(z2)  # [b, D] each
    C = all_reduce_with_grad(z1.t() @ z2) / N  # [D, D] cross-correlation over the global batch
    return ((1 - torch.diagonal(C)) ** 2).sum() + lambd * (_off_diagonal(C) ** 2).sum()


def vicreg_loss(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg (Bardes, Ponce, LeCun 2022, arXiv:2105.04906, eq. 1-6), lambda, mu, nu = 25, 25, 1:
        L = lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')]
        s = mean_i ||z_i - z'_i||^2 / D,   v(Z) = mean_j relu(1 - sqrt(Var(z^j) + 1e-4)),
        c(Z) = sum_{i != j} Cov(Z)_ij^2 / D
    As in the authors' code, v is halved per branch and Var/Cov divide by N - 1. The invariance term s is
    this rank's mean (the mean over ranks is the global mean); v and c use the global batch (a [D, D]
    all-reduce, like Barlow Twins; the official code all-gathers [N, D] instead) and are equal on all ranks."""
    N = z1.shape[0] * get_world_size()
    z1, z2 = z1.float(), z2.float()  # [b, D] each
    D = z1.shape[1]
    s = F.mse_loss(z1, z2)  # invariance, local mean over b * D entries

    def variance_covariance(z):  # [b, D] -> (v, c), with global-batch statistics
        mean = all_reduce_with_grad(z.sum(0)) / N  # [D]
        z_c = z - mean  # [b, D] centred
        cov = all_reduce_with_grad(z_c.t() @ z_c) / (N - 1)  # [D, D] unbiased covariance
        std = torch.sqrt(torch.diagonal(cov) + 1e-4)  # [D]
        return F.relu(1 - std).mean(), (_off_diagonal(cov) ** 2).sum() / D

    v1, c1 = variance_covariance(z1)
    v2, c2 = variance_covariance(z2)
    return sim_coeff * s + std_coeff * (v1 + v2) / 2 + cov_coeff * (c1 + c2)


# --- shared: sinkhorn ---
@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iters=3, capped=False):
    """Sinkhorn-Knopp (Cuturi 2013, arXiv:1306.0895) as in SwAV (Caron et al. 2020, arXiv:2006.09882, eq. 3
    and its distributed_sinkhorn code), over the global batch. scores: this rank's rows [b, K].
        Q = exp(scores / epsilon)^T [K, N],  Q /= sum(Q),
        repeat: rows (prototypes) -> 1/K, columns (samples) -> 1/N
    capped=True, for K > N: a prototype's total is only capped at 1/N (one sample's worth) instead of set to
    1/K, which would spread every sample over at least K/N prototypes, flatter than sharp predictions.
    Returns N * Q^T [b, K]: each sample's assignment sums to 1 (exactly; the prototype marginals N/K only
    approximately after few iterations). Sums over samples are all-reduced, so the targets are those of the
    global batch. The global max of scores / epsilon is subtracted before exp (it cancels in Q /= sum(Q)), so
    nothing overflows; an entry underflows to 0 only if its score lies ~85 epsilon below the max."""
    world = get_world_size()
    N, K = scores.shape[0] * world, scores.shape[1]
    logits = scores.float() / epsilon  # [b, K]
    m = logits.max()  # scalar
    if world > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX)  # the max over the global batch
    Q = torch.exp(logits - m).t()  # [K, b], this rank's columns of the [K, N] matrix
    Q /= all_reduce_with_grad(Q.sum())  # the global Q sums to 1
    for _ in range(iters):
        rows = all_reduce_with_grad(Q.sum(dim=1, keepdim=True))  # [K, 1], every prototype's total
        if capped and K > N:
            Q *= torch.clamp(1 / (N * rows), max=1.0)  # [K, b], every prototype's total: at most 1/N
        else:
            Q /= rows * K  # [K, b], every prototype's total: 1/K
        Q /= Q.sum(dim=0, keepdim=True) * N  # [K, b], every sample's total: 1/N (columns are local)
    return (Q * N).t()  # [b, K], rows sum to 1
# --- end shared: sinkhorn ---


def swav_loss(scores_a, scores_b, temperature=0.1, epsilon=0.05, iters=3):
    """SwAV swapped prediction (Caron et al. 2020, arXiv:2006.09882, eq. 1-2), tau = 0.1:
        L = 1/2 [ l(z_a, q_b) + l(z_b, q_a) ],  l(z, q) = -sum_k q_k log softmax(z . c / tau)_k
    scores_a, scores_b: prototype scores z . c [b, K] of two views (or, in SwALIP, of image and text).
    Targets q = sinkhorn(scores) carry no gradient; their sums run over the global batch. Each rank
    returns the mean of l over its samples; the mean over ranks is the global mean."""
    q_a, q_b = sinkhorn(scores_a, epsilon, iters), sinkhorn(scores_b, epsilon, iters)  # [b, K] each
    log_p_a = F.log_softmax(scores_a.float() / temperature, dim=-1)  # [b, K]
    log_p_b = F.log_softmax(scores_b.float() / temperature, dim=-1)  # [b, K]
    return -((q_b * log_p_a).sum(-1) + (q_a * log_p_b).sum(-1)).mean() / 2


def swalip_loss(h_image, h_text, logit_scale, epsilon=0.05, iters=3):
    """SwALIP (Fini et al. 2023, arXiv:2305.08675; the official code's SwALIPLoss): SwAV's swapped prediction
    across two views, with the other modality's (global) batch as the prototypes.
    h_image, h_text: L2-normalised embeddings [b, 2, D] of two views of each sample (Fini et al.: the two
    strong views, MLP projector); logit_scale: s, the learnable scale of those embeddings. For image view a
    and caption view c, with H_c the captions of view c gathered over all ranks [N, D],
        S_ac = h_image_a H_c^T [b, N],    Q_ac = sinkhorn(S_ac)  (no gradient; the N captions are the prototypes)
        L = 1/4 sum_{a, c} 1/2 [ CE(s S_ac, Q_a'c') + CE(s S'_ca, Q'_c'a') ],   a' = 1 - a, c' = 1 - c
    where S', Q' are the same with the modalities exchanged (captions scored against gathered images). Each
    pair of views is trained towards the assignment computed from the other two views. Each rank returns
    the mean over its rows; the gathered columns pass their gradient back to their owners, so DDP's gradient
    is that of one process (the official all-gather has no gradient on more than one GPU)."""
    assert h_image.shape[1] == h_text.shape[1] == 2, "SwALIP swaps between exactly two views"
    all_image, all_text = gather_with_grad(h_image.float()), gather_with_grad(h_text.float())  # [N, 2, D] each
    S_image = [[h_image[:, a].float() @ all_text[:, c].t() for c in range(2)] for a in range(2)]  # 2 x 2 x [b, N]
    S_text = [[h_text[:, c].float() @ all_image[:, a].t() for a in range(2)] for c in range(2)]  # 2 x 2 x [b, N]
    Q_image = [[sinkhorn(S, epsilon, iters) for S in row] for row in S_image]  # 2 x 2 x [b, N]
    Q_text = [[sinkhorn(S, epsilon, iters) for S in row] for row in S_text]  # 2 x 2 x [b, N]

    def cross_entropy(S, Q):  # mean over rows of -sum_k Q_k log softmax(s S)_k
        return -(Q * F.log_softmax(logit_scale * S, dim=-1)).sum(-1).mean()

    terms = [cross_entropy(S_image[a][c], Q_image[1 - a][1 - c]) + cross_entropy(S_text[c][a], Q_text[1 - c][1 - a])
             for a in range(2) for c in range(2)]  # 4 x scalar
    return torch.stack(terms).mean() / 2
