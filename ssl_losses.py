"""Visual self-supervised losses (SimCLR, BYOL/SimSiam, Barlow Twins, VICReg, SwAV) and SwALIP, exact under DDP,
and the CLIP + SSL baselines that clip.py's `--ssl NAME` adds to CLIP: per name, the heads that feed the loss.

Each loss function takes this rank's LOCAL embeddings ([b, D], the same b on every rank) and takes every batch
statistic (negatives, means, variances, covariances, cross-correlations, Sinkhorn sums) over the GLOBAL
batch of N = b * world_size samples. The convention, the same as clip.py's `clip_loss`:
  * the MEAN over ranks of the returned losses is the loss of the global batch (a term that is a mean over
    samples is this rank's mean; a term built from global statistics is the same number on every rank);
  * the collectives below are autograd-aware and SUM the gradient over ranks in their backward, so after
    DDP averages parameter gradients (divides by world_size) they equal those of one process that holds
    the whole global batch.
Softmax, cross-entropy and all statistics are computed in fp32. Without a process group (or with one
rank) the collectives are no-ops and every function is the plain single-process loss. Copy a function
together with the helpers it calls; the file imports only torch (and the standard library).

The baselines (SLIP, Mu et al. 2021; Fini et al. 2023, whose official code is github.com/facebookresearch/clip-rocket)
come last, one class per `--ssl` name: its heads on the towers' features (projectors, predictors, BYOL's EMA
teacher, SwAV's prototypes and their freeze), its loss on their outputs, its paper's equation in the docstring.
clip.py's CLIP holds one as `ssl_head` and adds its loss to InfoNCE with `--ssl-weight`.
"""

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
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
    def forward(ctx, x):  # also the backward, on the output gradient
        x = x.clone()  # never all-reduce autograd's buffer in place
        dist.all_reduce(x)
        return x

    backward = forward


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


# ---------------------------------------------------------------------------------------------------
# Building blocks of the heads: a BatchNorm over the global batch, MLP projectors, SwAV's prototypes


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch: the sums go through an
    autograd-aware all-reduce, so 2 ranks on halves compute exactly what 1 process computes on the whole
    batch, on gloo (CPU) and NCCL alike. (torch.nn.SyncBatchNorm does the same on GPUs only.)
    The running statistics of a step go to `pending_*` buffers first and become the running ones only if the
    step is applied (apply_running); buffers, updated in place, and not Python attributes, so that
    torch.compile traces them without a recompile per step."""

    STATISTICS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in self.STATISTICS:
            self.register_buffer("pending_" + name, getattr(self, name).clone(), persistent=False)

    def forward(self, x):  # [b, C]
        if not self.training:
            return super().forward(x)  # running statistics
        x = x.float()
        n = x.shape[0] * get_world_size()
        mean = all_reduce_with_grad(x.sum(0)) / n  # [C]
        var = all_reduce_with_grad(((x - mean) ** 2).sum(0)) / n  # [C], biased, as BatchNorm1d
        with torch.no_grad():  # the step's running statistics, held until the step is known to be applied
            self.pending_running_mean.lerp_(mean, self.momentum)
            self.pending_running_var.lerp_(var * n / max(1, n - 1), self.momentum)  # unbiased, as BatchNorm1d
            self.pending_num_batches_tracked += 1
        x = (x - mean) / torch.sqrt(var + self.eps)  # [b, C]
        return x * self.weight + self.bias if self.affine else x

    def apply_running(self, applied):
        """After the optimizer step: keep this step's running statistics only if the step was applied (a
        skipped non-finite step leaves them as they were). `applied`: a bool tensor on the device, no sync."""
        for name in self.STATISTICS:
            running, pending = getattr(self, name), getattr(self, "pending_" + name)
            running.copy_(torch.where(applied, pending, running))
            pending.copy_(running)

    @staticmethod
    def apply_all(model, applied):
        """apply_running on every BatchNorm of model."""
        for module in model.modules():
            if isinstance(module, BatchNorm):
                module.apply_running(applied)

    def _load_from_state_dict(self, *args, **kwargs):  # a loaded checkpoint's statistics are the pending ones too
        super()._load_from_state_dict(*args, **kwargs)
        for name in self.STATISTICS:
            getattr(self, "pending_" + name).copy_(getattr(self, name))


def mlp(dims, last_bn=False, last_affine=True):
    """Linear-BN-ReLU for every hidden width, then a Linear (and a BatchNorm if last_bn): the projectors
    and predictors of SimCLR, SimSiam, Barlow Twins and the strong branch of Fini et al."""
    layers = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out, bias=False), BatchNorm(d_out), nn.ReLU()]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=not last_bn))
    if last_bn:
        layers.append(BatchNorm(dims[-1], affine=last_affine))
    return nn.Sequential(*layers)


def per_view(head, features):
    """Apply a head to each view separately (its BatchNorm sees one view at a time): [B, V, C] -> [B, V, d]."""
    return torch.stack([head(features[:, v]) for v in range(features.shape[1])], dim=1)


class Prototypes(nn.Module):
    """K learnable unit-norm prototypes c_k [K, d] (SwAV; Fini et al.'s SwALIPV1, a weight-normalised Linear with
    the norm fixed at 1 and nn.Linear's initialisation), scores z . c_k of normalised embeddings, in fp32. As in the
    official code, the prototypes get no gradient in the first `freeze_iters` optimizer steps, so the optimizer
    skips them (no step, no weight decay, Adam moments and step count untouched). DDP skips them too
    (`self_averaged`): their gradient is averaged over ranks here, as DDP would."""

    def __init__(self, dim, K, freeze_iters):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(K, dim).uniform_(-(dim**-0.5), dim**-0.5))  # [K, d]
        self.freeze_iters, self.steps_done = freeze_iters, 0
        self.frozen = freeze_iters > 0  # a bool, not the count, in the forward: torch.compile recompiles once

    def forward(self, z):  # [B, d] -> [B, K]
        c = self.weight.detach() if self.frozen else AverageGradient.apply(self.weight)  # [K, d]
        with torch.autocast(z.device.type, enabled=False):  # fp32 scores, as nCLIP's: Sinkhorn divides them by 0.05
            return F.normalize(z.float(), dim=-1) @ F.normalize(c.float(), dim=-1).t()  # [B, K]

    def count_step(self):
        self.steps_done += 1
        self.frozen = self.steps_done < self.freeze_iters

    def get_extra_state(self):  # saved in the state dict, so a resumed run freezes for the same steps
        return {"steps_done": self.steps_done}

    def set_extra_state(self, state):
        self.steps_done = state["steps_done"]
        self.frozen = self.steps_done < self.freeze_iters


def self_averaged(model):
    """The names of model's parameters that average their own gradient over ranks (Prototypes): DDP skips them."""
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Prototypes)]


class AverageGradient(torch.autograd.Function):
    """Identity whose backward averages the gradient over ranks: what DDP does for the parameters it syncs."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if get_world_size() == 1:
            return grad
        grad = grad.clone()  # never all-reduce autograd's buffer in place
        dist.all_reduce(grad)
        return grad / get_world_size()



# ---------------------------------------------------------------------------------------------------
# The CLIP + SSL baselines of clip.py's --ssl NAME: per name its heads on the towers' features and its loss
# on their outputs. Widths are the papers' (hidden, output), and narrower ones for the tiny preset (small).


class SSLHead(nn.Module):
    """What clip.py's CLIP asks of its `ssl_head`. forward(features) -> the outputs the loss takes (keys ssl_*),
    from the towers' features {"image": [B, V, Cv], "text": [B, 1 + A, Ct]} of the weak view, the A strong views
    and (SLIP) its extra image views; loss(out) -> the SSL term. The hooks below do nothing unless overridden."""

    weight = 1.0  # the default --ssl-weight
    extra_image_views = 0  # image views the loader adds for this head

    def teacher_features(self, run):
        """Features of an EMA teacher's towers (BYOL); run(visual, text) runs a pair of towers on the batch's views."""
        return {}

    def after_step(self, model, applied):
        """After the optimizer step; applied: a bool tensor on the device, False when the step was skipped."""


def mean_over_pairs(term, A):
    """Fini et al.'s cross-modal terms: term(image view, text view) averaged over the weak pair (0, 0) and the A^2
    (strong image view, strong text view) pairs."""
    pairs = [(0, 0)] + [(1 + a, 1 + b) for a in range(A) for b in range(A)]
    return torch.stack([term(i, t) for i, t in pairs]).mean()


class SLIP(SSLHead):
    """SLIP (Mu et al. 2021, arXiv:2112.12750): SimCLR within the image modality. Two extra SimCLR views of each
    image (the loader puts them last) through the image tower and an MLP (4096, 4096, 256),
        L_ssl = NT-Xent(z1, z2), tau = 0.1   (simclr_loss)"""

    extra_image_views = 2

    def __init__(self, vision_width, text_width, small=False):
        super().__init__()
        hidden, out = (256, 64) if small else (4096, 256)
        self.project_image = mlp([vision_width, hidden, hidden, out])

    def forward(self, features):
        f_image = features["image"]  # [B, V, Cv], the two SimCLR views last
        return {"ssl_z1": self.project_image(f_image[:, -2]), "ssl_z2": self.project_image(f_image[:, -1])}  # [B, d]

    @staticmethod
    def loss(out):
        return simclr_loss(out["ssl_z1"], out["ssl_z2"], temperature=0.1)


class SiamLIP(SSLHead):
    """SiamLIP (Fini et al. 2023): SimSiam across modalities. Per modality a projector ending in a non-affine
    BatchNorm (hidden 2048, output 128) and a predictor per direction: p_I, predicted from the image's z_I, targets
    the caption's z_T and p_T targets z_I, with D(p, z) = 2 - 2 cos(p, sg(z)) (byol_loss):
        L_ssl = mean over the weak and the A^2 strong pairs (i, t) of 1/2 [ D(p_I,i, z_T,t) + D(p_T,t, z_I,i) ]"""

    def __init__(self, vision_width, text_width, small=False):
        super().__init__()
        hidden, out = (256, 64) if small else (2048, 128)
        self.project_image = mlp([vision_width, hidden, out], last_bn=True, last_affine=False)
        self.project_text = mlp([text_width, hidden, out], last_bn=True, last_affine=False)
        self.predict_text = mlp([out, hidden, out])  # from the image embedding, predicts the text target
        self.predict_image = mlp([out, hidden, out])

    def forward(self, features):
        f_image, f_text = features["image"], features["text"]  # [B, 1 + A, Cv], [B, 1 + A, Ct]
        z_image = per_view(self.project_image, f_image[:, : f_text.shape[1]])  # [B, 1 + A, d]
        z_text = per_view(self.project_text, f_text)  # [B, 1 + A, d]
        return {"ssl_image": z_image, "ssl_text": z_text,
                "ssl_image_pred": per_view(self.predict_text, z_image),  # [B, 1 + A, d]
                "ssl_text_pred": per_view(self.predict_image, z_text)}  # [B, 1 + A, d]

    @staticmethod
    def loss(out):
        def D(i, t):  # image view i predicts text view t, and the reverse
            return (byol_loss(out["ssl_image_pred"][:, i], out["ssl_text"][:, t])
                    + byol_loss(out["ssl_text_pred"][:, t], out["ssl_image"][:, i])) / 2

        return mean_over_pairs(D, out["ssl_image"].shape[1] - 1)


class BYOLIP(SiamLIP):
    """BYOLIP (Fini et al. 2023): SiamLIP whose targets z come from an EMA teacher (BYOL, Grill et al. 2020,
    arXiv:2006.07733): copies of the towers and projectors that get no gradient and, after each applied step,
        xi <- tau xi + (1 - tau) theta,   tau = 0.99 (--ema)
    Like the official one, the teacher runs in training mode (batch statistics, text dropout on strong captions)."""

    def __init__(self, visual, text, small=False, ema=0.99):
        super().__init__(visual.width, text.width, small)
        self.ema = ema
        self.teacher = nn.ModuleDict({"visual": copy.deepcopy(visual), "text": copy.deepcopy(text),
                                      "project_image": copy.deepcopy(self.project_image),
                                      "project_text": copy.deepcopy(self.project_text)})
        self.teacher.requires_grad_(False)

    def teacher_features(self, run):
        with torch.no_grad():
            f = run(self.teacher["visual"], self.teacher["text"])
        return {"teacher_image": f["image"], "teacher_text": f["text"]}  # [B, 1 + A, Cv], [B, 1 + A, Ct]

    def forward(self, features):
        out = super().forward(features)
        with torch.no_grad():  # the targets: the teacher's projectors on the teacher's tower features
            out["ssl_image"] = per_view(self.teacher["project_image"], features["teacher_image"])  # [B, 1 + A, d]
            out["ssl_text"] = per_view(self.teacher["project_text"], features["teacher_text"])  # [B, 1 + A, d]
        return out

    @torch.no_grad()
    def after_step(self, model, applied):
        weight = (1 - self.ema) * applied.float()  # 0 for a skipped step: the teacher stays
        students = {"visual": model.visual, "text": model.text, "project_image": self.project_image,
                    "project_text": self.project_text}
        for name, student in students.items():
            for teacher, parameter in zip(self.teacher[name].parameters(), student.parameters()):
                teacher.lerp_(parameter, weight)


class BarLIP(SSLHead):
    """BarLIP (Fini et al. 2023): Barlow Twins across modalities. 3-layer projectors (hidden 3000, output 8192)
    ending in an affine BatchNorm, so the loss standardises no further: C = z_I^T z_T / N over the global batch,
        L_ssl = mean over the weak and the A^2 strong pairs of  sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2,
    lambda = 5e-3 (barlow_twins_loss with standardise=False), weight 0.025."""

    weight = 0.025
    last_bn = True

    def __init__(self, vision_width, text_width, small=False):
        super().__init__()
        hidden, out = (256, 256) if small else (3000, 8192)
        self.project_image = mlp([vision_width, hidden, hidden, out], last_bn=self.last_bn)
        self.project_text = mlp([text_width, hidden, hidden, out], last_bn=self.last_bn)

    def forward(self, features):
        f_image, f_text = features["image"], features["text"]  # [B, 1 + A, Cv], [B, 1 + A, Ct]
        return {"ssl_image": per_view(self.project_image, f_image[:, : f_text.shape[1]]),  # [B, 1 + A, d]
                "ssl_text": per_view(self.project_text, f_text)}  # [B, 1 + A, d]

    @staticmethod
    def loss(out):
        return mean_over_pairs(lambda i, t: barlow_twins_loss(out["ssl_image"][:, i], out["ssl_text"][:, t],
                                                              standardise=False), out["ssl_image"].shape[1] - 1)


class VICRegLIP(BarLIP):
    """VICReg (Bardes et al. 2022) across modalities, in neither paper: BarLIP's pairs and projector shape, ending
    in a Linear; L_ssl = mean over the pairs of vicreg_loss(z_I, z_T) (25/25/1), weight 0.04."""

    weight = 0.04
    last_bn = False

    @staticmethod
    def loss(out):
        return mean_over_pairs(lambda i, t: vicreg_loss(out["ssl_image"][:, i], out["ssl_text"][:, t]),
                               out["ssl_image"].shape[1] - 1)


class SwALIPV1(SSLHead):
    """SwALIPV1 (Fini et al.'s code; SwAV, Caron et al. 2020, across modalities), on the weak pair: a projector per
    modality (hidden 2048, output 128) and K = 3000 unit-norm prototypes shared by both; each modality's scores
    z . c / 0.1 against the Sinkhorn assignment of the other's (swav_loss), weight 0.2. The prototypes get no
    update in the first freeze_iters optimizer steps (--swav-freeze-iters)."""

    weight = 0.2

    def __init__(self, vision_width, text_width, small=False, freeze_iters=100):
        super().__init__()
        hidden, out, K = (256, 64, 256) if small else (2048, 128, 3000)
        self.project_image, self.project_text = mlp([vision_width, hidden, out]), mlp([text_width, hidden, out])
        self.prototypes = Prototypes(out, K, freeze_iters)

    def forward(self, features):
        return {"ssl_image": self.prototypes(self.project_image(features["image"][:, 0])),  # [B, K]
                "ssl_text": self.prototypes(self.project_text(features["text"][:, 0]))}  # [B, K]

    @staticmethod
    def loss(out):
        return swav_loss(out["ssl_image"], out["ssl_text"], temperature=0.1)

    def after_step(self, model, applied):
        self.prototypes.count_step()


class SwALIP(SSLHead):
    """SwALIP (Fini et al. 2023, the variant of the paper's tables): no head of its own. swalip_loss on the two
    strong views' embeddings (clip.py's MLP projector) and their learnable temperature, with the other modality's
    global batch as the prototypes; weight 0.2. Needs --strong-views 2."""

    weight = 0.2

    def forward(self, features):
        return {}

    @staticmethod
    def loss(out):
        return swalip_loss(out["strong_image"], out["strong_text"], out["strong_logit_scale"])


SSL_HEADS = {"simclr": SLIP, "simsiam": SiamLIP, "byol": BYOLIP, "barlow": BarLIP, "vicreg": VICRegLIP,
             "swav": SwALIPV1, "swalip": SwALIP}


def build_head(name, visual, text, small=False, ema=0.99, freeze_iters=100):
    """The head of --ssl NAME on the towers visual and text (None for 'none'); small: the tiny preset's widths."""
    if name in ("simclr", "simsiam", "barlow", "vicreg"):
        return SSL_HEADS[name](visual.width, text.width, small)
    if name == "byol":  # the teacher copies the towers
        return BYOLIP(visual, text, small, ema)
    if name == "swav":
        return SwALIPV1(visual.width, text.width, small, freeze_iters)
    return SwALIP() if name == "swalip" else None


def ssl_loss(out, name):
    """The SSL term of --ssl NAME from the outputs of clip.py's CLIP."""
    return SSL_HEADS[name].loss(out)
