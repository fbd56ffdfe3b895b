"""CLIP: contrastive language-image pre-training (Radford et al. 2021, arXiv:2103.00020), with the improved
recipe and the CLIP + SSL baselines of Fini et al. 2023 ("Improved baselines for vision-language pre-training",
arXiv:2305.08675) and SLIP (Mu et al. 2021, arXiv:2112.12750).

An image tower and a text tower map a batch of N (image, caption) pairs to unit vectors
I = normalize(W_i f(x)) and T = normalize(W_t g(t)); with a learnable scale s = exp(t), clamped at s <= 100,
    L = 1/2 [ CE(s I T^T, y) + CE(s T I^T, y) ],   y_i = i          (symmetric InfoNCE)
Under DDP every rank scores its own rows against the columns gathered from all ranks, with a gather that
passes gradients back to their owners, so the gradient equals one process holding the global batch.
Improved recipe (`--recipe improved`): per direction L = (g + A l) / (1 + A), g the InfoNCE of the weak pair,
l the mean InfoNCE (label smoothing 0.1, own MLP projector and temperature) of the A^2 strong-view pairs.
CLIP + SSL (`--ssl NAME`): L + w * L_ssl, L_ssl from ssl_losses.py.

Launch:
  python clip.py                                                  # CPU: tiny model, synthetic data, ~3 min
  python clip.py --model ViT-B/16 --data /data/cc3m/{00000..00331}.tar --epochs 32 --batch-size 256   # 1 GPU
  torchrun --standalone --nproc_per_node=8 clip.py --model ViT-B/16 --data /data/cc3m/{00000..00331}.tar \
      --epochs 32 --batch-size 256 --lr 5e-4 --wd 0.5 --warmup 2000 --resume auto   # 8 GPUs, global batch 2048
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD_NODE:29500 clip.py ...  # 2 nodes

Reference result: `python clip.py` (tiny, 600 steps x 256 pairs) on a 2-core CPU without a GPU: zero-shot top-1
0.978 on 64 held-out synthetic classes (3 seeds: 0.981, 0.969, 0.984), 2.6-3.2 min each; README.md "Results".

Layout: the method comes first (its flags, model and heads, loss and `compute_loss`); everything after
`# --- shared: plumbing ---` (common flags, towers, distributed helpers, training loop, checkpoints, logs)
is the same in clip.py, nclip.py and xclip.py.
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import resource
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import augment
import data
import eval_zeroshot
import ssl_losses

METHOD = "clip"


# =====================================================================================================================
# The method: CLIP (Radford et al. 2021), the improved recipe (Fini et al. 2023), CLIP + SSL. Its flags, its
# model and heads, its loss; the shared plumbing is below.


RECIPES = {  # --recipe presets (Fini et al. 2023, official code); a component flag given explicitly wins
    "basic": dict(strong_views=0, weak_crop_scale=0.9, strong_image_augment=False, text_augment=False,
                  mlp_projector=False, label_smoothing=0.0, text_dropout=0.0),
    "improved": dict(strong_views=2, weak_crop_scale=0.5, strong_image_augment=True, text_augment=True,
                     mlp_projector=True, label_smoothing=0.1, text_dropout=0.2),
}


def method_args(parser):
    g = parser.add_argument_group("improved recipe (Fini et al. 2023): --recipe sets every flag of this group "
                                  "that is not given explicitly")
    g.add_argument("--recipe", default="basic", choices=list(RECIPES),
                   help="basic: CLIP of Radford et al. 2021; improved: 'CLIP rocket', all components below on")
    g.add_argument("--strong-views", type=int, default=None,
                   help="A: strong (image, text) views per sample besides the weak pair; 0 is plain CLIP "
                        "(improved: 2). Each view costs one more image and one more text forward")
    g.add_argument("--weak-crop-scale", type=float, default=None,
                   help="smallest crop area of the weak image view (basic 0.9, as OpenCLIP; improved 0.5, as SLIP)")
    g.add_argument("--strong-image-augment", action=argparse.BooleanOptionalAction, default=None,
                   help="strong image views are SimCLR-style (crop 0.08-1, colour jitter, grayscale, blur, flip) "
                        "rather than more weak crops")
    g.add_argument("--text-augment", action=argparse.BooleanOptionalAction, default=None,
                   help="stop-word removal (p 0.8) on every caption view, and one EDA op (swap or deletion) on "
                        "strong caption views")
    g.add_argument("--mlp-projector", action=argparse.BooleanOptionalAction, default=None,
                   help="strong pairs go through their own MLP projector (Linear-BN-ReLU twice, Linear) with their own "
                        "temperature; off: through the linear projectors with the main temperature")
    g.add_argument("--mlp-hidden", type=int, default=None,
                   help="hidden width of the MLP projector (default 4096; 256 for tiny)")
    g.add_argument("--label-smoothing", type=float, default=None,
                   help="label smoothing of the strong-pair InfoNCE terms (improved: 0.1); the weak pair has none")
    g.add_argument("--text-dropout", type=float, default=None,
                   help="dropout on the text tower's residual stream, strong caption views only (the paper: 0.2 on "
                        "CC3M, 0.05 on CC12M, 0 on larger data)")
    g.add_argument("--mix-weight", type=float, default=0.5,
                   help="evaluation: the 'mix' head scores w * s_linear + (1 - w) * s_mlp")

    g = parser.add_argument_group("CLIP + SSL baselines (SLIP, Mu et al. 2021; Fini et al. 2023)")
    g.add_argument("--ssl", default="none", choices=["none"] + list(ssl_losses.SSL_HEADS),
                   help="add a self-supervised loss: simclr on two extra SimCLR image views (SLIP); simsiam, byol, "
                        "barlow, vicreg between the image and the text embedding (SiamLIP, BYOLIP, BarLIP, VICReg); "
                        "swav on learned prototypes, weak pair (SwALIPV1); swalip, the strong pairs with the other "
                        "modality's batch as prototypes (SwALIP, needs --strong-views 2)")
    g.add_argument("--ssl-weight", type=float, default=None,
                   help="weight of the SSL term (default: simclr/simsiam/byol 1, barlow 0.025, vicreg 0.04, "
                        "swav/swalip 0.2)")
    g.add_argument("--ema", type=float, default=0.99, help="byol: momentum of the EMA teacher (BYOLIP: 0.99)")
    g.add_argument("--swav-freeze-iters", type=int, default=100,
                   help="swav: the prototypes get no update (no gradient step, no weight decay) in the first N "
                        "optimizer steps, as SwAV and SwALIPV1 (--swalip-freeze-proto-iters) do; raise it with "
                        "the warm-up if the assignments collapse early")


def resolve_method_args(args, parser):
    """Fill the recipe's values into the flags not given, and refuse combinations that mean nothing."""
    explicit = {k for k in RECIPES["basic"] if getattr(args, k) is not None}
    if args.ssl == "simclr" and args.weak_crop_scale is None:
        args.weak_crop_scale = 0.5  # SLIP crops the CLIP view with scale (0.5, 1), in both recipes
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mlp_hidden is None:
        args.mlp_hidden = 256 if args.model == "tiny" else 4096
    if args.ssl in ("swav", "swalip") and args.label_smoothing > 0:
        if "label_smoothing" in explicit:  # Fini et al. run SwALIP without label smoothing
            parser.error(f"--ssl {args.ssl} runs without label smoothing (as SwALIP); drop --label-smoothing")
        args.label_smoothing = 0.0
    if args.ssl == "swalip" and args.strong_views != 2:
        parser.error("--ssl swalip swaps between two strong views: use --strong-views 2 (or --recipe improved)")
    if args.swav_freeze_iters < 0:
        parser.error(f"--swav-freeze-iters must be >= 0, got {args.swav_freeze_iters}")
    if args.ssl_weight is None:
        args.ssl_weight = ssl_losses.SSL_HEADS[args.ssl].weight if args.ssl != "none" else 0.0
    strong_only = {"strong_image_augment", "mlp_projector", "label_smoothing", "text_dropout"}
    if args.strong_views == 0 and any(getattr(args, k) for k in strong_only & explicit):
        flags = "/--".join(sorted(k.replace("_", "-") for k in strong_only & explicit))
        parser.error(f"--{flags} act on strong views: set --strong-views > 0 (or --recipe improved)")
    if args.strong_views < 0 or not 0 < args.weak_crop_scale <= 1 or not 0 <= args.text_dropout < 1:
        parser.error("--strong-views must be >= 0, --weak-crop-scale in (0, 1], --text-dropout in [0, 1)")
    return args


class CLIP(nn.Module):
    """Two towers, a linear projection each and the learnable temperature t (scale s = exp(t)). Improved recipe:
    strong_views A > 0 strong (image, text) views per sample, text dropout on them, and (mlp_projector) their own MLP
    projector and temperature. ssl != 'none': that SSL baseline's heads (ssl_losses.py, with its loss), `ssl_head`."""

    def __init__(self, model="tiny", vocab_size=data.VOCAB_SIZE, strong_views=0, mlp_projector=False,
                 mlp_hidden=4096, text_dropout=0.0, mix_weight=0.5, ssl="none", ema=0.99, swav_freeze_iters=100):
        super().__init__()
        cfg = PRESETS[model]
        vw, tw, D = cfg["vision_width"], cfg["text_width"], cfg["embed_dim"]
        self.strong_views, self.text_dropout, self.mix_weight = strong_views, text_dropout, mix_weight
        self.visual = VisionTower(cfg["image_size"], cfg["patch_size"], vw, cfg["vision_layers"], cfg["vision_heads"])
        self.text = TextTower(vocab_size, cfg["context_length"], tw, cfg["text_layers"], cfg["text_heads"])
        self.image_projection = nn.Linear(vw, D, bias=False)
        self.text_projection = nn.Linear(tw, D, bias=False)
        nn.init.normal_(self.image_projection.weight, std=vw**-0.5)
        nn.init.normal_(self.text_projection.weight, std=tw**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # t; s = exp(t) starts at 1/0.07
        self.has_mlp = strong_views > 0 and mlp_projector
        if self.has_mlp:  # Fini et al.: strong pairs get their own projector and temperature (init 1/0.1)
            self.image_mlp = ssl_losses.mlp([vw, mlp_hidden, mlp_hidden, D])
            self.text_mlp = ssl_losses.mlp([tw, mlp_hidden, mlp_hidden, D])
            self.mlp_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.1)))
        self.ssl_head = ssl_losses.build_head(ssl, self.visual, self.text, model == "tiny", ema, swav_freeze_iters)
        DDP._set_params_and_buffers_to_ignore_for_model(self, ssl_losses.self_averaged(self))  # SwAV's prototypes

    def encode_image(self, images):  # [B, 3, H, W] -> [B, D], unit norm
        return F.normalize(self.image_projection(self.visual(images)), dim=-1)

    def encode_text(self, tokens):  # [B, L] -> [B, D], unit norm
        return F.normalize(self.text_projection(self.text(tokens)), dim=-1)

    def forward(self, images, tokens):
        """images [B, V, 3, H, W]: the weak view, A strong views, then (ssl simclr) two SimCLR views;
        tokens [B, 1 + A, L]: the caption's weak view, then A strong views. -> dict of embeddings."""
        return self.heads(self.towers(images, tokens))

    def towers(self, images, tokens, teacher=True):
        """The towers on every view -> {"image": [B, V, Cv], "text": [B, 1 + A, Ct]}, and those of BYOL's EMA
        teacher unless teacher=False. Gradient caching (--accum-steps) runs this per micro-batch."""
        run = lambda visual, text: tower_features(visual, text, images, tokens, self.strong_views, self.text_dropout)
        features = run(self.visual, self.text)
        if teacher and self.ssl_head is not None:
            features.update(self.ssl_head.teacher_features(run))
        return features

    def heads(self, features):
        """Tower features (a whole batch) -> the embeddings and scores the loss takes."""
        f_image, f_text, A = features["image"], features["text"], self.strong_views  # [B, V, Cv], [B, 1 + A, Ct]
        out = {"image": F.normalize(self.image_projection(f_image[:, 0]), dim=-1),  # [B, D]
               "text": F.normalize(self.text_projection(f_text[:, 0]), dim=-1),  # [B, D]
               "logit_scale": self.logit_scale.exp()}
        if A > 0:
            heads = (self.image_mlp, self.text_mlp) if self.has_mlp else (self.image_projection, self.text_projection)
            out["strong_image"] = F.normalize(ssl_losses.per_view(heads[0], f_image[:, 1 : 1 + A]), dim=-1)  # [B, A, D]
            out["strong_text"] = F.normalize(ssl_losses.per_view(heads[1], f_text[:, 1:]), dim=-1)  # [B, A, D]
            out["strong_logit_scale"] = (self.mlp_logit_scale if self.has_mlp else self.logit_scale).exp()
        if self.ssl_head is not None:
            out.update(self.ssl_head(features))  # ssl_* keys
        return out

    def after_step(self, applied):
        """After each optimizer step (applied: a bool tensor, False for a skipped step): clamp the temperatures (not in
        the forward, which cuts their gradient), keep BatchNorm statistics of applied steps, update the SSL head."""
        with torch.no_grad():
            for t in [self.logit_scale] + ([self.mlp_logit_scale] if self.has_mlp else []):
                t.clamp_(0, math.log(100))
            ssl_losses.BatchNorm.apply_all(self, applied)
        if self.ssl_head is not None:
            self.ssl_head.after_step(self, applied)

    def zeroshot_heads(self):
        """{name: (encode_image, encode_text)} for zero-shot evaluation, the main one first; with the MLP projector
        also its head and the mix w s_linear + (1 - w) s_mlp, the cosine of the vectors [sqrt(w) z, sqrt(1 - w) h]."""
        heads, w = {"linear": (self.encode_image, self.encode_text)}, self.mix_weight
        if self.has_mlp:
            mlp_image = lambda x: F.normalize(self.image_mlp(self.visual(x)), dim=-1)
            mlp_text = lambda t: F.normalize(self.text_mlp(self.text(t)), dim=-1)
            heads["mlp"] = (mlp_image, mlp_text)
            heads["mix"] = (lambda x: torch.cat([w**0.5 * self.encode_image(x), (1 - w) ** 0.5 * mlp_image(x)], -1),
                            lambda t: torch.cat([w**0.5 * self.encode_text(t), (1 - w) ** 0.5 * mlp_text(t)], -1))
        return heads

    def flops_per_sample(self, text_length=None, recompute=False):
        """Training FLOPs per pair (forward + backward = 3 forwards) of the towers and projections on every view,
        captions cut at text_length tokens; BYOL's teacher adds a forward, gradient caching a towers' forward."""
        image_views = 1 + self.strong_views + getattr(self.ssl_head, "extra_image_views", 0)
        towers = image_views * self.visual.flops() + (1 + self.strong_views) * self.text.flops(text_length)
        forward = towers + 2 * (self.image_projection.weight.numel() + self.text_projection.weight.numel())
        return 3 * forward + (forward if hasattr(self.ssl_head, "teacher") else 0) + (towers if recompute else 0)


def tower_features(visual, text, images, tokens, strong_views, text_dropout):
    """A pair of towers on every view: images [B, V, 3, H, W] -> [B, V, Cv]; tokens [B, 1 + A, L] -> [B, 1 + A, Ct],
    the A strong captions with text dropout (BYOL's teacher runs its towers through this too)."""
    B, A = len(images), strong_views
    f_image = visual(images.flatten(0, 1)).unflatten(0, (B, images.shape[1]))  # [B, V, Cv]
    f_text = text(tokens[:, 0])[:, None]  # [B, 1, Ct], no dropout on the weak view
    if A > 0:
        f_strong = text(tokens[:, 1:].flatten(0, 1), dropout=text_dropout)  # [B * A, Ct]
        f_text = torch.cat([f_text, f_strong.unflatten(0, (B, A))], dim=1)  # [B, 1 + A, Ct]
    return {"image": f_image, "text": f_text}


def build_model(args):
    return CLIP(args.model, strong_views=args.strong_views, mlp_projector=args.mlp_projector,
                mlp_hidden=args.mlp_hidden, text_dropout=args.text_dropout, mix_weight=args.mix_weight,
                ssl=args.ssl, ema=args.ema,
                swav_freeze_iters=getattr(args, "swav_freeze_iters", 100))  # absent from older checkpoints' args


def train_views(args):
    """The views the loader makes of each sample: a weak image crop and the caption; A strong views of
    each (improved recipe); two more SimCLR image views for --ssl simclr."""
    size = PRESETS[args.model]["image_size"]
    weak = augment.CLIPView(size, scale=(args.weak_crop_scale, 1.0))
    strong = augment.StrongView(size) if args.strong_image_augment else weak
    stopword_p = 0.8 if args.text_augment else 0.0
    simclr_views = [augment.StrongView(size)] * (2 if args.ssl == "simclr" else 0)
    image_views = [weak] + [strong] * args.strong_views + simclr_views
    strong_text = augment.TextView(stopword_p, eda=args.text_augment)
    text_views = [augment.TextView(stopword_p)] + [strong_text] * args.strong_views
    return image_views, text_views


# --- shared: clip-loss ---
def clip_loss(image_features, text_features, logit_scale, label_smoothing=0.0):
    """Symmetric InfoNCE (Radford et al. 2021, Fig. 3), exact under DDP.

    image_features, text_features: this rank's L2-normalised features [b, D]; logit_scale: s = exp(t).
        L_rank = 1/2 [ CE(s I_local T_all^T, y) + CE(s T_local I_all^T, y) ],   y = arange(b) + b * rank
    The mean of L_rank over ranks is the loss of the global batch, and since `gather_with_grad` returns
    each rank the gradient of every rank's loss with respect to its features, DDP's averaged gradient is
    that of one process holding the whole batch. Logits and softmax are computed in fp32."""
    b = image_features.shape[0]
    all_image = gather_with_grad(image_features).float()  # [N, D], N = b * world
    all_text = gather_with_grad(text_features).float()  # [N, D]
    labels = torch.arange(b, device=image_features.device) + b * get_rank()  # [b]
    logits_image = logit_scale * image_features.float() @ all_text.t()  # [b, N]
    logits_text = logit_scale * text_features.float() @ all_image.t()  # [b, N]
    return (F.cross_entropy(logits_image, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits_text, labels, label_smoothing=label_smoothing)) / 2


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
# --- end shared: clip-loss ---


def compute_loss(out, args):
    """The method's loss from the model outputs -> (loss, {name: value to log}).
    Plain CLIP: the InfoNCE g of the (weak) pair. Improved recipe (Fini et al. 2023), per direction:
        L = (g + A l) / (1 + A),   l = mean over the A^2 (strong image view, strong text view) pairs of
    InfoNCE with label smoothing. CLIP + SSL: L + ssl_weight * L_ssl."""
    g = clip_loss(out["image"], out["text"], out["logit_scale"])
    loss, logs = g, {"logit_scale": out["logit_scale"].detach()}
    if "strong_image" in out:
        A = out["strong_image"].shape[1]
        l = torch.stack([clip_loss(out["strong_image"][:, a], out["strong_text"][:, b], out["strong_logit_scale"],
                                   args.label_smoothing) for a in range(A) for b in range(A)]).mean()
        loss = (g + A * l) / (1 + A)
        logs.update(weak_loss=g.detach(), strong_loss=l.detach(),
                    strong_logit_scale=out["strong_logit_scale"].detach())
    if args.ssl != "none":
        s = ssl_losses.ssl_loss(out, args.ssl)
        loss = loss + args.ssl_weight * s
        logs["ssl_loss"] = s.detach()
    return loss, logs


# =====================================================================================================================
# Everything below is the same in clip.py, nclip.py and xclip.py (tests/test_sync.py checks it): common
# flags, the towers, distributed helpers, the training loop, checkpoints, logging.


# --- shared: plumbing ---
def common_args(parser):
    """The flags every method file has, with the same defaults."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (drawn shapes, the default), a .csv/.tsv of image paths and captions, or tar "
                        "shards in img2dataset layout such as '/data/cc3m/{00000..00331}.tar'")
    g.add_argument("--csv-img-key", default="filepath", help="CSV column holding image paths (relative to the file)")
    g.add_argument("--csv-caption-key", default="caption", help="CSV column holding captions")
    g.add_argument("--csv-separator", default=None, help="CSV separator (default: tab for .tsv, comma otherwise)")
    g.add_argument("--train-num-samples", type=int, default=None,
                   help="tar shards: samples per epoch (default: counted from the tar headers at start)")
    g.add_argument("--workers", type=int, default=None,
                   help="data loader processes per rank (default: CPUs per rank - 1, at most 8). Raise it if the "
                        "logged data_time is more than a few percent of the step time")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=list(PRESETS),
                   help="tower sizes: 'tiny' trains on a laptop CPU in minutes; the ViT presets use CLIP's "
                        "12-layer text tower (width 768 for ViT-L/14) at 224 px")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: ~1/3 more compute, much less "
                        "memory; use it when a larger per-GPU batch matters more than speed")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256,
                   help="per process; the contrastive batch is batch-size x world size. Larger batches give more "
                        "negatives, which helps contrastive losses; scale --lr with it")
    g.add_argument("--accum-steps", type=int, default=1, metavar="K",
                   help="gradient caching (Gao et al. 2021): each step takes K micro-batches of --batch-size per "
                        "process, runs the towers on them one at a time, the heads and the loss once on all of "
                        "them: the gradient of one step on K x batch-size x world size pairs (every pair a "
                        "negative of every other), with the towers' activation memory of one micro-batch, for "
                        "one more tower forward. Use it when --grad-checkpointing still leaves the batch too small")
    g.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: --epochs x steps per epoch, or 600 if neither is given)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data (sets --steps when that is unset)")
    g.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate. SLIP and Fini et al. use 3e-3 at batch 4096 (ViT-B/16); CLIP used 5e-4 at "
                        "batch 32k. Lower it if the loss spikes or turns non-finite")
    g.add_argument("--wd", type=float, default=0.1,
                   help="AdamW weight decay on matrices and embeddings (not on gains, biases, temperatures). "
                        "0.1-0.2 is usual; small data sets like CC3M prefer 0.5")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98),
                   help="AdamW betas; CLIP's beta2 0.98 is steadier than 0.999 at large batch")
    g.add_argument("--warmup", type=int, default=100,
                   help="linear warm-up steps before the cosine decay; about 1 epoch, or 2k-10k steps at scale")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm to this (0: off)")
    g.add_argument("--max-bad-steps", type=int, default=20,
                   help="a step whose loss or gradient is not finite is skipped; this many in a row stop the run "
                        "with a checkpoint of the last good state")

    g = parser.add_argument_group("system")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (default: bf16 on GPUs with compute capability 8.0 or newer (A100, H100, "
                        "L4, ...), fp16 on older GPUs (V100, T4), fp32 on CPU); fp16 uses a dynamic loss scale")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model: slower start (a minute or more), faster steps")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and augmentations")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="the accelerator's dense peak for the MFU column (default: looked up for known GPUs)")

    g = parser.add_argument_group("run")
    g.add_argument("--out-dir", default=f"runs/{METHOD}", help="where ckpt.pt, log.jsonl and run.json go")
    g.add_argument("--resume", default=None,
                   help="'auto': continue from OUT_DIR/ckpt.pt if it exists; or the path of a checkpoint")
    g.add_argument("--save-every", type=int, default=500,
                   help="steps between writes of the rolling OUT_DIR/ckpt.pt that --resume auto continues (and one "
                        "at the end)")
    g.add_argument("--keep-every", type=int, default=0,
                   help="steps between kept snapshots OUT_DIR/ckpt_STEP.pt (0: none), for eval_zeroshot.py or "
                        "--resume PATH later; each holds the optimizer too (about 3x the weights with AdamW)")
    g.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    g.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="also write every logged number as a TensorBoard scalar to DIR (default: OUT_DIR/tensorboard); "
                        "needs `pip install tensorboard`")
    g.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log every number to this Weights & Biases project (`pip install wandb`); with "
                        "WANDB_MODE=offline it stays in OUT_DIR/wandb, for `wandb sync` later")

    g = parser.add_argument_group("evaluation during training, on every rank (eval_zeroshot.py gives the same numbers "
                                  "for a checkpoint of the same step)")
    g.add_argument("--eval-dataset", default=None, choices=["synthetic", "imagenet", "cifar10", "cifar100", "folder",
                                                            "none"],
                   help="zero-shot classification set (default: synthetic when --data is synthetic, else none); the "
                        "layouts of eval_zeroshot.py: imagenet: DIR/val holds the 1000 WordNet-id folders; "
                        "cifar10/100: torchvision's python archives in DIR; folder: an ImageFolder in DIR/val, "
                        "DIR/test or DIR")
    g.add_argument("--eval-data-dir", default=None, metavar="DIR",
                   help="where --eval-dataset lives (all but synthetic)")
    g.add_argument("--eval-retrieval", default=None, metavar="PAIRS.csv",
                   help="also image<->text recall@1/5/10 on a CSV with one row per caption (image paths relative to "
                        "it, columns as --csv-img-key/--csv-caption-key), e.g. the Flickr30k or COCO test split")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: only at the end)")
    g.add_argument("--eval-samples", type=int, default=None,
                   help="evaluate on this many images, evenly spaced through the set (default: all), to evaluate "
                        "often on a large set")
    return parser


def check_common_args(args, parser):
    """Refuse impossible values before any work, naming the flag."""
    for flag, low in (("batch_size", 1), ("accum_steps", 1), ("steps", 1), ("log_every", 1), ("save_every", 0),
                      ("eval_every", 0), ("warmup", 0), ("workers", 0), ("eval_samples", 1), ("max_bad_steps", 1),
                      ("train_num_samples", 1), ("keep_every", 0)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            parser.error(f"--{flag.replace('_', '-')} must be at least {low}, got {getattr(args, flag)}")
    for flag in ("lr", "epochs", "peak_tflops"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.wd < 0 or args.grad_clip < 0:
        parser.error("--wd and --grad-clip must be >= 0")
    if data.source_kind(args.data) == "csv" and not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file")
    if data.source_kind(args.data) == "tar" and not any(os.path.exists(u) for u in data.expand_braces(args.data)):
        parser.error(f"--data {args.data}: no shard of this pattern exists")
    # Under torchrun a rank may lack a file that another has (no shared file system): train() decides together.
    single = os.environ.get("WORLD_SIZE", "1") == "1"
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume) and single:
        parser.error(f"--resume {args.resume}: no such checkpoint file "
                     f"(use --resume auto to continue OUT_DIR/ckpt.pt if it exists)")
    if args.eval_dataset is None:  # zero-shot on drawn shapes says nothing about a model trained on other data
        args.eval_dataset = "synthetic" if args.data == "synthetic" else "none"
    needs_dir = args.eval_dataset not in ("synthetic", "none")
    if needs_dir and not (args.eval_data_dir and os.path.isdir(args.eval_data_dir)):
        parser.error(f"--eval-dataset {args.eval_dataset} needs --eval-data-dir, an existing folder "
                     f"(got {args.eval_data_dir!r})")
    if args.eval_data_dir and not needs_dir:
        parser.error(f"--eval-data-dir is read with --eval-dataset imagenet, cifar10, cifar100 or folder, "
                     f"not {args.eval_dataset}")
    if args.eval_retrieval and not os.path.isfile(args.eval_retrieval):
        parser.error(f"--eval-retrieval {args.eval_retrieval}: no such file")
    if args.eval_every and args.eval_dataset == "none" and not args.eval_retrieval:
        parser.error("--eval-every: nothing to evaluate; give --eval-dataset and/or --eval-retrieval")
    if args.tensorboard == "":
        args.tensorboard = os.path.join(args.out_dir, "tensorboard")
    for flag in ("tensorboard", "wandb"):
        if getattr(args, flag) is not None and importlib.util.find_spec(flag) is None:
            parser.error(f"--{flag} needs the {flag} package: pip install {flag}")
    return args


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common_args(parser)
    method_args(parser)
    return resolve_method_args(check_common_args(parser.parse_args(argv), parser), parser)


PRESETS = {  # image tower (ViT) and text tower (causal Transformer) sizes, and the joint embedding width
    "tiny": dict(image_size=32, patch_size=8, vision_width=64, vision_layers=4, vision_heads=2,
                 context_length=20, text_width=64, text_layers=4, text_heads=2, embed_dim=64),
    "ViT-S/16": dict(image_size=224, patch_size=16, vision_width=384, vision_layers=12, vision_heads=6,
                     context_length=77, text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "ViT-B/32": dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                     context_length=77, text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "ViT-B/16": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                     context_length=77, text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "ViT-L/14": dict(image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                     context_length=77, text_width=768, text_layers=12, text_heads=12, embed_dim=768),
}


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash / memory-efficient kernels
    on GPU), with q, k and v from one fused projection."""

    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):  # x [B, N, C]
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, h, N, C/h]
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, h, N, C/h]
        return self.out(x.transpose(1, 2).reshape(B, N, C))  # [B, N, C]


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width, heads, causal):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):  # [B, N, C]
        x = x + self.attn(self.ln_1(x))  # [B, N, C]
        return x + self.mlp(self.ln_2(x))  # [B, N, C]


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, causal) for _ in range(layers))
        self.grad_checkpointing = False
        for block in self.blocks:  # CLIP's initialisation (Radford et al. 2021, released code)
            nn.init.normal_(block.attn.qkv.weight, std=width**-0.5)
            nn.init.normal_(block.attn.out.weight, std=width**-0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp[0].weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp[2].weight, std=width**-0.5 * (2 * layers) ** -0.5)
            for linear in (block.attn.qkv, block.attn.out, block.mlp[0], block.mlp[2]):
                nn.init.zeros_(linear.bias)

    def forward(self, x, dropout=0.0):  # x [B, N, C]
        for block in self.blocks:
            if dropout > 0:  # dropout on the residual stream before each block (Fini et al. 2023's text dropout)
                x = F.dropout(x, dropout, training=True)
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        return x


class VisionTower(nn.Module):
    """ViT as in CLIP: patch embedding, class token, LN, pre-LN blocks, LN on the class token -> [B, width]."""

    def __init__(self, image_size, patch_size, width, layers, heads):
        super().__init__()
        self.image_size, self.patch_size, self.width, self.layers = image_size, patch_size, width, layers
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(width**-0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)

    def forward(self, images):  # uint8 [B, 3, H, W] (normalised here) or float, already normalised
        x = augment.normalize(images) if images.dtype == torch.uint8 else images  # [B, 3, H, W]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, P, C]
        cls = self.class_embedding.to(x.dtype).expand(len(x), 1, -1)  # [B, 1, C]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, P + 1, C]
        x = self.transformer(self.ln_pre(x))  # [B, P + 1, C]
        return self.ln_post(x[:, 0])  # [B, C]

    def flops(self):
        """Forward FLOPs per image (2 per multiply-add), counting matmuls and attention."""
        patches = (self.image_size // self.patch_size) ** 2
        patch_embedding = 2 * patches * 3 * self.patch_size**2 * self.width
        return patch_embedding + transformer_flops(patches + 1, self.width, self.layers)


class TextTower(nn.Module):
    """Causal Transformer as in CLIP: token + position embeddings, pre-LN blocks, LN, features at the
    end-of-text token -> [B, width]."""

    def __init__(self, vocab_size, context_length, width, layers, heads):
        super().__init__()
        self.context_length, self.width, self.layers = context_length, width, layers
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer = Transformer(width, layers, heads, causal=True)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, tokens, dropout=0.0):  # tokens [B, L], any L <= context_length
        # Batches come cut after their last EOT (data.trim_tokens): under the causal mask no later position reaches
        # an EOT, so the features are those of the full context (with dropout: in distribution), at less compute.
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # [B, L, C]
        x = self.transformer(x, dropout)  # [B, L, C]
        eot = (tokens == data.EOT_TOKEN).int().argmax(dim=1)  # [B] position of the first end-of-text token
        return self.ln_final(x[torch.arange(len(x), device=x.device), eot])  # [B, C]

    def flops(self, length=None):
        """Forward FLOPs per caption run on `length` tokens (default: the full context)."""
        return transformer_flops(length or self.context_length, self.width, self.layers)


def transformer_flops(tokens, width, layers):
    """Forward FLOPs of `layers` blocks on `tokens` tokens: 24 N C^2 in the qkv, output and MLP matmuls,
    4 N^2 C in the two attention products."""
    return layers * (24 * tokens * width**2 + 4 * tokens**2 * width)


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


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


# Dense peak TFLOP/s for the MFU column, from NVIDIA's data sheets (without sparsity): (pattern matched on
# torch.cuda.get_device_name, 16-bit tensor cores (bf16; fp16 on V100/T4), fp32 matmuls (TF32 from Ampere on)).
# The first match wins, so each exact part comes before its family: an H100 PCIe or NVL is not an H100 SXM.
GPU_PEAK_TFLOPS = [
    (r"H100.*(PCIe|PCIE)", 756, 378), (r"H100 NVL", 835, 417.5), (r"H200 NVL", 835, 417.5),
    (r"H100|H200|GH200", 989, 494.5), (r"A100", 312, 156), (r"A10G", 70, 35), (r"L40S", 362, 183),
    (r"L40\b", 181, 90.5), (r"L4\b", 121, 60), (r"V100", 125, 15.7), (r"T4\b", 65, 8.1),
]
DEFAULT_STEPS = 600
STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on stopping (one tiny all-reduce, read on the host)


def main(args):
    """Single process (`python X.py`) or one of several (`torchrun`): set up, train, always tear down."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        # A store prefix per torchrun attempt (--max-restarts): without it a restarted rank can read the address
        # of a rank of the failed attempt and fail to connect (seen with gloo on torch 2.14).
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world_size, device_id=device if device.type == "cuda" else None)
    # SIGTERM (a scheduler's kill), SIGUSR1 (SLURM's warning before the time limit) and SIGINT (Ctrl-C) only
    # raise a flag: within STOP_CHECK_EVERY steps the ranks agree to stop, save a checkpoint and exit 0;
    # `--resume auto` continues. Loader workers ignore these signals (data.ignore_stop_signals). A signal to the
    # process group under torchrun arrives twice (directly, then forwarded by the agent): a repeat within 2 s is
    # the same request; a later one ends the process at once.
    stop = {}

    def handler(signum, frame):
        if "signal" in stop and time.time() - stop["at"] > 2.0:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        stop.setdefault("signal", signal.Signals(signum).name)
        stop.setdefault("at", time.time())

    previous = {s: signal.signal(s, handler) for s in data.STOP_SIGNALS}
    try:
        return train(args, device, rank, world_size, stop)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        close_curves()
        if dist.is_initialized():
            dist.destroy_process_group()


def resolve_resume(args):
    """--resume -> the checkpoint path to load, or None (auto, and no checkpoint yet)."""
    if args.resume == "auto":
        path = os.path.join(args.out_dir, "ckpt.pt")
        return path if os.path.exists(path) else None
    return args.resume


def agree_on_checkpoint(args, rank, world_size):
    """-> (the checkpoint every rank resumes from, or None; its path). Each rank looks on its own file system
    (nodes need not share one): OUT_DIR/ckpt.pt for --resume auto, PATH for --resume PATH. The newest
    checkpoint that some rank could read is the one all ranks take: ranks without it receive it from the
    rank that has it (a broadcast), so ranks never start from different steps or optimizer states. A
    checkpoint no rank can read stops every rank with the same one-line error."""
    path = resolve_resume(args)
    ckpt, error = None, None
    if path is not None:
        try:
            ckpt = load_checkpoint(path, args)
        except SystemExit as e:
            error = str(e)
    if world_size == 1:
        if error:
            raise SystemExit(error)
        return ckpt, path
    reports = all_gather_object({"step": ckpt["step"] if ckpt else None, "error": error, "path": path})
    steps = [r["step"] for r in reports if r["step"] is not None]
    if not steps:
        errors = [r["error"] for r in reports if r["error"]]
        if errors:  # every rank stops with the same message
            raise SystemExit(errors[0] + (f" (on {len(errors)} of {world_size} ranks)" if len(errors) > 1 else ""))
        return None, None  # --resume auto and no checkpoint anywhere: a fresh start
    source = next(r for r, report in enumerate(reports) if report["step"] == max(steps))
    if any(report["step"] != max(steps) for report in reports):
        box = [ckpt if rank == source else None]
        dist.broadcast_object_list(box, src=source)  # only when some rank lacks it: no shared file system
        ckpt = box[0]
        print0(f"rank {source} holds the newest checkpoint (step {max(steps)}); the ranks without it received it")
    return ckpt, reports[source]["path"]


def load_checkpoint(path, args):
    """Load with weights_only=True (no pickled code runs) and check it belongs to this method and preset."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")
    if not isinstance(ckpt, dict) or "method" not in ckpt or "model" not in ckpt:
        raise SystemExit(f"{path}: not a checkpoint of these scripts")
    if ckpt["method"] != METHOD:
        raise SystemExit(f"{path}: a {ckpt['method']}.py checkpoint cannot resume {METHOD}.py")
    if ckpt["args"]["model"] != args.model:
        raise SystemExit(f"{path}: model preset {ckpt['args']['model']!r}, but --model is {args.model!r}")
    return ckpt


def save_checkpoint(path, state):
    """Write to a temporary file, flush it to disk, then rename: a crash never leaves a half-written ckpt."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def peak_memory(device):
    """Bytes: the peak of GPU memory allocated by tensors, or on a CPU the peak resident memory of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def all_gather_object(obj):
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


CURVES = []  # (write(numbers, step), close()) of rank 0's TensorBoard / W&B writers while a run is open


def open_curves(args, resumed):
    """Rank 0: writers for --tensorboard and --wandb, imported only when asked. They get the numbers of every
    log record; log.jsonl stays the run's record. A resumed run continues its W&B run (id in OUT_DIR/wandb_id)."""
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard)

        def to_tensorboard(numbers, step):
            for tag, value in numbers.items():
                writer.add_scalar(tag, value, step)
            writer.flush()
        CURVES.append((to_tensorboard, writer.close))
    if args.wandb:
        import wandb

        id_file = os.path.join(args.out_dir, "wandb_id")
        if not (resumed and os.path.exists(id_file)):
            with open(id_file, "w") as f:
                f.write(os.urandom(6).hex())
        with open(id_file) as f:
            run = wandb.init(project=args.wandb, id=f.read(), resume="allow", dir=args.out_dir, config=vars(args),
                             name=os.path.basename(os.path.abspath(args.out_dir)))
        CURVES.append((lambda numbers, step: run.log(numbers, step=step), run.finish))


def close_curves():
    while CURVES:
        CURVES.pop()[1]()


def log(record, args):
    """Rank 0: print one line, append the record to OUT_DIR/log.jsonl and pass its numbers to the curve writers
    (tags train/KEY, and eval/KEY for evaluation results). Keys ending in _s are durations in seconds."""
    if get_rank() != 0:
        return

    def field(k, v):
        if k.endswith("_s") and isinstance(v, (int, float)):
            return f"{k} {v:.1f}" if v < 60 else f"{k} {int(v) // 3600}:{int(v) // 60 % 60:02d}:{int(v) % 60:02d}"
        return f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
    print(" | ".join(field(k, v) for k, v in record.items()), flush=True)
    with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    numbers = {f"{'eval' if k.startswith(('zeroshot_', 'retrieval_', 'eval_')) else 'train'}/{k}": v
               for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    for write, _ in CURVES:
        write(numbers, record["step"])


def open_eval_sets(args):
    """The sets of --eval-dataset and --eval-retrieval, opened before training so that bad input stops the run at
    once. -> (classification (images, class names, templates) or None, retrieval (images, captions) or None)"""
    size, context_length = PRESETS[args.model]["image_size"], PRESETS[args.model]["context_length"]
    classification = retrieval = None
    if args.eval_dataset != "none":
        images, _, classnames, templates = eval_zeroshot.classification_sets(
            args.eval_dataset, args.eval_data_dir, size, args.seed, flag="--eval-dataset")
        classification = eval_zeroshot.subset(images, args.eval_samples), classnames, templates
    if args.eval_retrieval:
        retrieval = eval_zeroshot.retrieval_set(args.eval_retrieval, size, context_length, args.csv_img_key,
                                                args.csv_caption_key, args.csv_separator, flag="--eval-retrieval")
    return classification, retrieval


def eval_plan(eval_sets, args):
    """The run's start line about evaluation: what and when, or that there is none."""
    (classification, retrieval), what = eval_sets, []
    if classification:
        what.append(f"zero-shot on {args.eval_dataset} ({len(classification[0])} images, "
                    f"{len(classification[1])} classes)")
    if retrieval:
        what.append(f"retrieval on {args.eval_retrieval} ({len(retrieval[0])} images, {len(retrieval[1])} captions)")
    if not what:
        return ("evaluation: none; this run reports no zero-shot accuracy (--eval-dataset imagenet --eval-data-dir "
                "DIR, or cifar10, cifar100, folder, synthetic; --eval-retrieval PAIRS.csv)")
    when = f"every {args.eval_every} steps and at the end" if args.eval_every else "at the end"
    return f"evaluation: {' and '.join(what)}, {when}"


def evaluate(raw_model, eval_sets, args, device, autocast, workers=0):
    """Zero-shot top-1/top-5 on --eval-dataset and recall@k on --eval-retrieval, with eval_zeroshot's functions.
    Every rank runs it on the raw model and encodes its share; the features are gathered in dataset order, so the
    numbers are those of one process. -> {} or a record whose keys name the set: zeroshot_imagenet_top1,
    zeroshot_imagenet_top1_mlp (another head), retrieval_i2t_r1, ..., eval_head (the head of the keys without a
    head's name), eval_s (seconds)."""
    classification, retrieval = eval_sets
    if classification is None and retrieval is None:
        return {}
    t, heads = time.time(), raw_model.zeroshot_heads()
    main_head = next(iter(heads))
    common = dict(device=device, workers=workers, autocast=autocast, rank=get_rank(), world_size=get_world_size())
    record = {}
    raw_model.eval()
    if classification:
        results = eval_zeroshot.zeroshot_classify(heads, *classification, PRESETS[args.model]["context_length"],
                                                  **common)
        name = f"zeroshot_{args.eval_dataset}"
        record[f"{name}_top1"], record[f"{name}_top5"] = results[main_head]["top1"], results[main_head]["top5"]
        record.update({f"{name}_top1_{head}": m["top1"] for head, m in results.items() if head != main_head})
    if retrieval:
        results = eval_zeroshot.retrieve(heads, *retrieval, **common)
        record.update({f"retrieval_{k}": v for k, v in results[main_head].items()})
    raw_model.train()
    record["eval_head"], record["eval_s"] = main_head, time.time() - t
    return record


def mixed_precision(args, device):
    """-> (precision, autocast context). Default: fp32 on CPU; on a GPU bf16 where its tensor cores run it
    (compute capability 8.0 and newer), else fp16 with a dynamic loss scale (V100 and T4 emulate bf16, slowly,
    though torch.cuda.is_bf16_supported() says yes)."""
    precision = args.precision or eval_zeroshot.default_precision(device)
    if precision == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        print0(f"note: {torch.cuda.get_device_name(device)} has no bf16 tensor cores: --precision fp16 is faster")
    if precision == "fp32":
        return precision, nullcontext()
    return precision, torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def gpu_peak_tflops(device, precision):
    """The GPU's dense peak for MFU in this precision (GPU_PEAK_TFLOPS); None on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((peaks for pattern, *peaks in GPU_PEAK_TFLOPS if re.search(pattern, name)), None)
    return None if peaks is None else peaks[1] if precision == "fp32" else peaks[0]


def build_training(args, device, precision):
    """The model, AdamW (fused; no weight decay on gains, biases and temperatures) and the gradient scaler."""
    raw_model = build_model(args).to(device)
    for tower in (raw_model.visual, raw_model.text):
        tower.transformer.grad_checkpointing = args.grad_checkpointing
    decay = [p for p in raw_model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in raw_model.parameters() if p.requires_grad and p.ndim < 2]  # gains, biases, temperatures
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), eps=1e-6, fused=True)
    # A GradScaler in every precision: for fp16 it is the dynamic loss scale; in all precisions it checks
    # the gradients for inf/NaN and, with the fused AdamW, skips such a step on the device without a sync.
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 if precision == "fp16" else 1.0)
    return raw_model, optimizer, scaler


def train_step(model, raw_model, optimizer, scaler, images, tokens, args, autocast, precision):
    """One optimizer step (bench.py times this very function). -> (loss, logs), still on the device."""
    if args.compile:  # batches differ in text length (data.trim_tokens): one graph for all, not a static one first
        torch._dynamo.maybe_mark_dynamic(tokens, tokens.dim() - 1)  # measured: 1 compile instead of 2
    if args.accum_steps > 1:
        loss, logs = cached_gradient(raw_model, images, tokens, args, autocast, scaler)
    else:
        with autocast:
            out = model(images, tokens)
        loss, logs = compute_loss(out, args)  # outside autocast: the loss runs in fp32
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # also finds inf/NaN gradients (after DDP's all-reduce: the same on every rank)
    found_inf = sum(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())  # 0 or 1
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
    scaler.step(optimizer)  # skipped when a gradient is inf/NaN
    scaler.update(None if precision == "fp16" else 1.0)  # only fp16 needs a loss scale other than 1
    optimizer.zero_grad(set_to_none=True)
    applied = found_inf == 0  # on the device (no sync), and agreed by the ranks, whose gradients are all-reduced
    raw_model.after_step(applied)
    return loss, logs, applied


def cached_gradient(raw_model, images, tokens, args, autocast, scaler):
    """Gradient caching (Gao et al. 2021, arXiv:2101.06983): the gradient of the loss on the whole batch
    (K = --accum-steps micro-batches), with one micro-batch of tower activations in memory at a time.
      1. towers on each micro-batch without gradient: features f_k (and the random state before each);
      2. heads and loss once on all features, with gradient: dL/dp for the heads' parameters, and
         g_k = dL/df_k, kept (BatchNorm, Sinkhorn, the negatives: all see the whole batch, exactly);
      3. each micro-batch through the towers again with gradient, the same random state (text dropout):
         backward of f_k with g_k adds its share of dL/dp for the towers' parameters.
    Ranks then average their gradients with one all-reduce (DDP's, by hand: its hooks expect one forward and
    one backward per step). -> (loss, logs)"""
    device = images.device
    micro = list(zip(images.chunk(args.accum_steps), tokens.chunk(args.accum_steps)))
    states, features = [], []
    with torch.no_grad(), autocast:
        for x, t in micro:
            states.append(rng_state(device))
            features.append(raw_model.towers(x, t))
    end_state = rng_state(device)
    whole = {k: torch.cat([f[k] for f in features]).requires_grad_() for k in features[0]}  # [K * b, ...] each
    with autocast:
        out = raw_model.heads(whole)
    loss, logs = compute_loss(out, args)
    scaler.scale(loss).backward()
    start = 0
    for (x, t), state in zip(micro, states):
        set_rng_state(state, device)
        with autocast:
            replayed = raw_model.towers(x, t, teacher=False)  # the BYOL teacher's towers need no second run
        keys = [k for k in replayed if whole[k].grad is not None]
        torch.autograd.backward([replayed[k] for k in keys], [whole[k].grad[start : start + len(x)] for k in keys])
        start += len(x)
    set_rng_state(end_state, device)
    if get_world_size() > 1:
        ignored = set(getattr(raw_model, "_ddp_params_and_buffers_to_ignore", ()))
        grads = [p.grad for n, p in raw_model.named_parameters() if p.grad is not None and n not in ignored]
        flat = torch.cat([g.flatten() for g in grads]) / get_world_size()
        dist.all_reduce(flat)
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))
    return loss, logs


def train(args, device, rank, world_size, stop):
    """Build, resume, loop (log, checkpoint, evaluate, stop on a signal), final evaluation -> its record."""
    t_start, cuda = time.time(), device.type == "cuda"
    precision, autocast = mixed_precision(args, device)
    workers = args.workers
    if workers is None:  # the CPUs of this node shared by its ranks, one left for the rank itself, at most 8
        cpus_per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = max(0, min(8, cpus_per_rank - 1))
    ckpt, ckpt_path = agree_on_checkpoint(args, rank, world_size)
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
    eval_sets = open_eval_sets(args)

    # Model, optimizer. The same seed on every rank gives the same initial weights.
    torch.manual_seed(args.seed)
    raw_model, optimizer, scaler = build_training(args, device, precision)
    torch.manual_seed(args.seed + rank)  # dropout and other model randomness differ per rank

    # Resume: weights, optimizer, loss scale, step, random state and data position.
    start_step, data_state, elapsed_before = 0, None, 0.0
    if ckpt:
        elapsed_before = ckpt.get("elapsed_s", 0.0)  # the training time of the run's earlier attempts
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_step = ckpt["step"]
        if len(ckpt["rng"]) == world_size:
            set_rng_state(ckpt["rng"][rank], device)
            data_state = ckpt["data"][rank]
        else:
            print0(f"note: the checkpoint was written by {len(ckpt['rng'])} ranks, not {world_size}: random state and "
                   f"tar-stream positions start afresh, so the run continues but not bit for bit")
        print0(f"resumed from {ckpt_path} at step {start_step}")
        del ckpt

    image_views, text_views = train_views(args)
    loader = data.build_loader(
        args.data, args.batch_size * args.accum_steps, image_views, text_views, rank=rank, world_size=world_size,
        workers=workers, seed=args.seed, context_length=PRESETS[args.model]["context_length"],
        image_size=PRESETS[args.model]["image_size"], start_step=start_step, state=data_state, pin_memory=cuda,
        csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key, csv_separator=args.csv_separator,
        num_samples=args.train_num_samples)
    total_steps = args.steps or (math.ceil(args.epochs * loader.steps_per_epoch) if args.epochs else DEFAULT_STEPS)

    if args.accum_steps > 1:  # gradient caching calls the towers and the heads itself, and all-reduces by hand
        model = raw_model
        if args.compile:
            raw_model.towers, raw_model.heads = torch.compile(raw_model.towers), torch.compile(raw_model.heads)
    else:
        model = DDP(raw_model, device_ids=[device.index] if cuda else None) if world_size > 1 else raw_model
        if args.compile:
            model = torch.compile(model)
    peak_tflops = args.peak_tflops or gpu_peak_tflops(device, precision)
    if rank == 0:
        run_info = {"method": METHOD, "args": vars(args), "world_size": world_size, "precision": precision,
                    "total_steps": total_steps, "steps_per_epoch": loader.steps_per_epoch, "torch": torch.__version__,
                    "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                    "parameters": sum(p.numel() for p in raw_model.parameters())}
        with open(os.path.join(args.out_dir, "run.json"), "w") as f:
            json.dump(run_info, f, indent=1)
        open_curves(args, resumed=ckpt_path is not None)
    batch = world_size * args.batch_size * args.accum_steps
    accum = f" x {args.accum_steps} micro-batches (gradient caching)" if args.accum_steps > 1 else ""
    print0(f"{METHOD}: {args.model} on {args.data}: {total_steps} steps = {total_steps / loader.steps_per_epoch:.4g} "
           f"epochs of {loader.steps_per_epoch * batch} samples ({total_steps * batch} samples in all), global batch "
           f"{batch} = {world_size} x {args.batch_size}{accum}; {precision} on {device.type}, {workers} loader "
           f"workers per rank")
    print0(eval_plan(eval_sets, args))
    if args.keep_every:
        print0(f"keeping {args.out_dir}/ckpt_STEP.pt every {args.keep_every} steps besides the rolling ckpt.pt")

    def lr_at(step):  # linear warm-up, then cosine decay to 0
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, total_steps - args.warmup)))

    def checkpoint_state(step):
        return {"method": METHOD, "args": vars(args), "step": step, "model": raw_model.state_dict(),
                "elapsed_s": elapsed_before + time.time() - t_start,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": all_gather_object(rng_state(device)), "data": all_gather_object(loader.state_dict())}

    batches = iter(loader)
    sums, n_sum, bad_in_a_row = {}, 0, torch.zeros((), device=device)
    bad_total, data_time, t_log, flops = torch.zeros((), device=device), 0.0, time.time(), 0
    eval_time = 0.0  # seconds of the last evaluation, for the time left
    for step in range(start_step, total_steps):
        t_data = time.time()
        images, tokens, params = next(batches)  # params [B, V, P]: each view's on-device augmentation, on the CPU
        images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        images = augment.on_device(images, params)  # fp32 [B, V, 3, H, W], augmented and normalised
        data_time += time.time() - t_data
        # at the captions' cut length; gradient caching runs the towers twice
        flops += raw_model.flops_per_sample(tokens.shape[-1], recompute=args.accum_steps > 1) * len(tokens)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)

        loss, logs, applied = train_step(model, raw_model, optimizer, scaler, images, tokens, args, autocast, precision)
        bad_in_a_row = (bad_in_a_row + 1) * ~applied
        bad_total += ~applied
        for k, v in {"loss": loss.detach(), **logs}.items():
            sums[k] = sums.get(k, 0.0) + torch.where(applied, v.float(), 0.0)
        n_sum += 1

        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            keys = list(sums)
            skipped = torch.tensor(float(loader.skipped), device=device)
            totals = torch.stack([sums[k] for k in keys] + [bad_total, skipped])  # summed over ranks below
            if world_size > 1:
                dist.all_reduce(totals)
            totals, elapsed = totals.tolist(), time.time() - t_log
            good = max(1, n_sum * world_size - int(totals[-2]))  # finite steps of all ranks
            samples_per_s = n_sum * args.batch_size * args.accum_steps / elapsed
            record = {"step": done, **{k: totals[i] / good for i, k in enumerate(keys)}, "lr": lr_at(step)}
            record["samples_per_s_per_gpu"] = samples_per_s
            record["data_time"] = data_time / n_sum
            record["mfu"] = flops / elapsed / (peak_tflops * 1e12) if peak_tflops else None
            record["peak_mem_gb"] = peak_memory(device) / 2**30
            record["skipped_samples"], record["nonfinite_steps"] = int(totals[-1]), int(totals[-2])
            # Where the run is: time left = steps left at this interval's rate (evaluations excluded) + the
            # evaluations left (every --eval-every steps and one at the end) at the last one's duration.
            evals_left = 1 + (max(0, (total_steps - 1) // args.eval_every - done // args.eval_every)
                              if args.eval_every else 0)
            record["epoch"] = done / loader.steps_per_epoch
            record["elapsed_s"] = elapsed_before + time.time() - t_start
            record["time_left_s"] = (total_steps - done) * elapsed / n_sum + evals_left * eval_time
            log(record, args)
            sums, n_sum, bad_total, data_time, flops = {}, 0, torch.zeros((), device=device), 0.0, 0
            t_log = time.time()
        stopping = False
        if done % STOP_CHECK_EVERY == 0 or done % args.log_every == 0 or done == total_steps:
            # Decisions every rank takes together: the max over ranks of (a signal arrived, bad steps in a row).
            flags = torch.stack([torch.tensor(float("signal" in stop), device=device), bad_in_a_row.float()])
            if world_size > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signalled, bad = flags.tolist()
            if bad >= args.max_bad_steps:
                state = checkpoint_state(done)
                if rank == 0:
                    save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), state)
                raise SystemExit(f"{args.max_bad_steps} steps in a row had a non-finite loss or gradient; stopped at "
                                 f"step {done} with the last good weights saved in {args.out_dir}/ckpt.pt "
                                 f"(lower --lr or use --grad-clip)")
            stopping = signalled > 0
        keep = args.keep_every and done % args.keep_every == 0  # a snapshot kept besides the rolling ckpt.pt
        if (args.save_every and done % args.save_every == 0) or done == total_steps or stopping or keep:
            t_save = time.time()
            state = checkpoint_state(done)
            if rank == 0:
                save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), state)
                if keep:
                    save_checkpoint(os.path.join(args.out_dir, f"ckpt_{done}.pt"), state)
            t_log += time.time() - t_save  # the log interval's samples/s leaves checkpoint writes out
        if stopping and done < total_steps:
            log({"step": done, "stopped_by": stop.get("signal", "another rank's signal")}, args)
            print0(f"stopped by a signal at step {done} of {total_steps}; {args.out_dir}/ckpt.pt holds it: "
                   f"run the same command with --resume auto to continue")
            return {"step": done, "stopped": True}
        if args.eval_every and done % args.eval_every == 0 and done != total_steps:
            record = {"step": done, **evaluate(raw_model, eval_sets, args, device, autocast, workers)}
            eval_time = record["eval_s"]
            t_log += eval_time  # the throughput of the log interval leaves the evaluation out
            log(record, args)

    result = {"step": total_steps, **evaluate(raw_model, eval_sets, args, device, autocast, workers)}
    if len(result) > 1:  # the run's last log line is its final evaluation (unless there is nothing to evaluate)
        log(result, args)
    return result
# --- end shared: plumbing ---


if __name__ == "__main__":
    main(parse_args())
