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
CLIP + SSL (`--ssl NAME`): L + w * L_ssl; the SSL baseline's heads and L_ssl are in ssl_losses.py.

Launch:
  python clip.py                                                  # CPU: tiny model, synthetic data, ~3 min
  python clip.py --model ViT-B/16 --data /data/cc3m/{00000..00331}.tar --epochs 32 --batch-size 256   # 1 GPU
  torchrun --standalone --nproc_per_node=8 clip.py --model ViT-B/16 --data /data/cc3m/{00000..00331}.tar \
      --epochs 32 --batch-size 256 --wd 0.5 --resume auto   # 8 GPUs, global batch 2048 (CC3M: wd 0.5)
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD_NODE:29500 clip.py ...  # 2 nodes

Reference results: README.md "Results" (`python clip.py`, 3 seeds, zero-shot and linear probe, on a 2-core CPU).
"""

import argparse
import json
import math
import os
import time

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
        """{name: (image head, text head)}, functions of the features of self.visual / self.text (which evaluation runs
        once per batch for all heads) -> [b, D], the main one first; with the MLP projector also its head and the mix
        w s_linear + (1 - w) s_mlp, the cosine of the vectors [sqrt(w) z, sqrt(1 - w) h]."""
        unit = lambda layer: lambda f: F.normalize(layer(f), dim=-1)
        heads, w = {"linear": (unit(self.image_projection), unit(self.text_projection))}, self.mix_weight
        if self.has_mlp:
            heads["mlp"] = (unit(self.image_mlp), unit(self.text_mlp))
            heads["mix"] = tuple(lambda f, z=z, h=h: torch.cat([w**0.5 * z(f), (1 - w) ** 0.5 * h(f)], -1)
                                 for z, h in zip(heads["linear"], heads["mlp"]))
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
# The plumbing, the same in clip.py, nclip.py and xclip.py (tests/test_sync.py checks it): flags, towers, main, train.


# --- shared: plumbing ---
def common_args(parser):
    """The flags every method file has, with the same defaults."""
    data.add_args(parser)
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=list(PRESETS),
                   help="'tiny' trains on a laptop CPU in minutes; the ViT presets: 224 px, CLIP's text tower")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: ~1/3 more compute, room for a larger batch")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256,
                   help="per process (x world size: the contrastive batch; more negatives help); scale --lr with it")
    g.add_argument("--accum-steps", type=int, default=1, metavar="K",
                   help="gradient caching (Gao et al. 2021): the exact gradient of K x batch-size x world size pairs "
                        "for one more tower forward and one micro-batch's tower memory; try --grad-checkpointing first")
    g.add_argument("--steps", type=int, help="optimizer steps (default: --epochs x steps per epoch, else 600)")
    g.add_argument("--epochs", type=float, help="passes over the data (sets --steps when that is unset)")
    g.add_argument("--lr", type=float, help="peak learning rate (default, printed at start: tiny 3e-3 on the "
                   "synthetic shapes, 1e-3 on image files (chosen on the emoji set, README); ViT 5e-4, "
                   "L/14 4e-4, x sqrt(global batch / 4096) below 4096, as CLIP/SLIP). Fini et al.'s improved recipe: "
                   "3e-3 at 4096. Lower it if the loss spikes or turns non-finite")
    g.add_argument("--wd", type=float, help="AdamW weight decay on matrices and embeddings (default: tiny 0.1, ViT "
                   "presets 0.2 as CLIP); small data sets like CC3M prefer 0.5 (SLIP, Fini et al.)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98),
                   help="AdamW betas; CLIP's beta2 0.98 is steadier than 0.999 at large batch")
    g.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay (default: tiny 100, ViT "
                   "presets 2000 as CLIP)")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm to this (0: off)")
    g.add_argument("--max-bad-steps", type=int, default=20,
                   help="steps with a non-finite loss or gradient are skipped; this many in a row stop the run")
    g = parser.add_argument_group("system")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="default: fp32 on CPU, bf16 on A100/H100/L4 and newer GPUs, fp16 with a loss scale on V100/T4")
    g.add_argument("--compile", action="store_true", help="torch.compile: slower start (a minute or so), faster steps")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and augmentations")
    g.add_argument("--peak-tflops", type=float, help="the dense peak for the MFU column (default: known GPUs' own)")
    g = parser.add_argument_group("run")
    g.add_argument("--out-dir", default=f"runs/{METHOD}", help="where ckpt.pt, log.jsonl and run.json go")
    g.add_argument("--resume", help="'auto': continue from OUT_DIR/ckpt.pt if it exists; or a checkpoint's path")
    g.add_argument("--save-every", type=int, default=500,
                   help="steps between writes of OUT_DIR/ckpt.pt, which --resume auto continues; also at the end")
    g.add_argument("--keep-every", type=int, default=0,
                   help="steps between kept snapshots OUT_DIR/ckpt_STEP.pt (0: none), for eval_zeroshot.py or "
                        "--resume PATH later; each holds the optimizer too (about 3x the weights with AdamW)")
    g.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    eval_zeroshot.training_args(parser)  # --eval-* and the curves (--tensorboard, --wandb)
    return parser


def check_common_args(args, parser):
    """Refuse impossible values before any work, naming the flag."""
    for flag, low in (("batch_size", 1), ("accum_steps", 1), ("steps", 1), ("log_every", 1), ("save_every", 0),
                      ("eval_every", 0), ("warmup", 0), ("workers", 0), ("eval_samples", 1), ("max_bad_steps", 1),
                      ("train_num_samples", 1), ("keep_every", 0)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            parser.error(f"--{flag.replace('_', '-')} must be at least {low}, got {getattr(args, flag)}")
    optimiser_defaults(args)
    for flag in ("lr", "epochs", "peak_tflops"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.wd < 0 or args.grad_clip < 0:
        parser.error("--wd and --grad-clip must be >= 0")
    data.check_args(args, parser)
    # Under torchrun a rank may lack a file that another has (no shared file system): train() decides together.
    single = os.environ.get("WORLD_SIZE", "1") == "1"
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume) and single:
        parser.error(f"--resume {args.resume}: no such checkpoint file "
                     f"(use --resume auto to continue OUT_DIR/ckpt.pt if it exists)")
    eval_zeroshot.check_training_args(args, parser)
    return args


# --lr, --wd, --warmup by --model: (lr at the reference global batch, that batch, wd, warm-up steps). tiny: measured
# on the synthetic data (README, Results). ViT presets: CLIP (Radford et al. 2021, Table 20: 5e-4 for ViT-B, 4e-4 for
# ViT-L/14 at batch 32,768; wd 0.2; 2000 warm-up steps) and SLIP's CLIP baseline (5e-4 at 4096); below 4096 the rate
# shrinks with the square root of the global batch (Adam's square-root rule, Malladi et al. 2022, arXiv:2205.10287).
OPTIMISER_DEFAULTS = {"tiny": (3e-3, None, 0.1, 100), "ViT-L/14": (4e-4, 4096, 0.2, 2000),  # others: ViT_DEFAULTS
                      "tiny on real data": (1e-3, None, 0.1, 100)}  # the emoji set's validation concepts (README)
ViT_DEFAULTS = (5e-4, 4096, 0.2, 2000)


def optimiser_defaults(args):
    """--lr, --wd and --warmup not given <- OPTIMISER_DEFAULTS; args.lr_rule says where the rate came from."""
    real = f"{args.model} on real data"
    key = real if real in OPTIMISER_DEFAULTS and args.data != "synthetic" else args.model
    lr, reference, wd, warmup = OPTIMISER_DEFAULTS.get(key, ViT_DEFAULTS)
    batch = int(os.environ.get("WORLD_SIZE", "1")) * args.batch_size * args.accum_steps  # the global batch
    scaled = reference is not None and batch < reference and args.lr is None
    args.lr_rule = ("given" if args.lr is not None else f"{lr:g} x sqrt({batch} / {reference})" if scaled
                    else f"default for {key}")
    args.lr = args.lr if args.lr is not None else lr * (batch / reference) ** 0.5 if scaled else lr
    args.wd, args.warmup = (wd if args.wd is None else args.wd), (warmup if args.warmup is None else args.warmup)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common_args(parser)
    method_args(parser)
    args = resolve_method_args(check_common_args(parser.parse_args(argv), parser), parser)
    if args.compile and args.accum_steps > 1 and getattr(args, "text_dropout", 0) > 0:  # the improved recipe's
        parser.error("--compile with --accum-steps and text dropout: inductor's no-gradient pass and its replay are "
                     "two graphs whose dropout masks need not match, so the cached gradient would be wrong; use "
                     "--text-dropout 0 or leave out --compile")
    return args


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
    """Multi-head self-attention through F.scaled_dot_product_attention (flash kernels on GPU), one qkv projection."""

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
    """Causal Transformer as in CLIP: token + position embeddings, pre-LN blocks, LN, features at the end-of-text."""

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
    """Forward FLOPs of blocks on N tokens: 24 N C^2 in the qkv, output and MLP matmuls, 4 N^2 C in attention."""
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
    def forward(ctx, x):  # also the backward, on the output gradient
        x = x.clone()  # never all-reduce autograd's buffer in place
        dist.all_reduce(x)
        return x

    backward = forward


def all_reduce_with_grad(x):
    """Sum of x over ranks, differentiable (for statistics of the global batch); x itself on one process."""
    return AllReduceWithGrad.apply(x) if get_world_size() > 1 else x
# --- end shared: collectives ---


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


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
    if world_size > 1:  # a store prefix per torchrun attempt: else a restarted rank can read a dead rank's address
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world_size, device_id=device if device.type == "cuda" else None)
    with data.stop_requests() as stop:  # SIGTERM, SIGUSR1, SIGINT: the ranks agree to stop, save and exit 0
        try:
            return train(args, device, rank, world_size, stop)
        finally:
            eval_zeroshot.close_curves()
            if dist.is_initialized():
                dist.destroy_process_group()


def train(args, device, rank, world_size, stop):
    """Build, resume, then each step: step, log, checkpoint (or stop), evaluate; the final evaluation -> its record."""
    t_start, cuda = time.time(), device.type == "cuda"
    precision, autocast = mixed_precision(args, device)
    workers = args.workers if args.workers is not None else eval_zeroshot.default_workers()
    ckpt, ckpt_path = agree_on_checkpoint(args, rank, world_size)
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
    size, context_length = PRESETS[args.model]["image_size"], PRESETS[args.model]["context_length"]
    eval_sets = eval_zeroshot.open_eval_sets(args, size, context_length)  # bad input stops the run here, at once

    # Build and resume. The same seed on every rank gives the same initial weights.
    torch.manual_seed(args.seed)
    raw_model, optimizer, scaler = build_training(args, device, precision)
    torch.manual_seed(args.seed + rank)  # dropout and other model randomness differ per rank
    start_step, data_state, elapsed_before = resume(ckpt, ckpt_path, raw_model, optimizer, scaler, device)
    del ckpt
    image_views, text_views = train_views(args)
    loader = data.build_loader(
        args.data, args.batch_size * args.accum_steps, image_views, text_views, rank=rank, world_size=world_size,
        workers=workers, seed=args.seed, context_length=context_length, image_size=size, start_step=start_step,
        state=data_state, pin_memory=cuda, csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key,
        csv_separator=args.csv_separator, num_samples=args.train_num_samples)
    total_steps = args.steps or (math.ceil(args.epochs * loader.steps_per_epoch) if args.epochs else DEFAULT_STEPS)
    model = raw_model  # gradient caching calls the towers and the heads itself, and all-reduces by hand
    if world_size > 1 and args.accum_steps == 1:
        model = DDP(raw_model, device_ids=[device.index] if cuda else None)
    if args.compile and args.accum_steps > 1:
        raw_model.towers, raw_model.heads = torch.compile(raw_model.towers), torch.compile(raw_model.heads)
    elif args.compile:
        model = torch.compile(model)
    if rank == 0:
        eval_zeroshot.open_curves(args, resumed=ckpt_path is not None)
    announce(args, raw_model, loader, total_steps, precision, device, workers, eval_sets)
    meter = Meter(args, device, total_steps, loader.steps_per_epoch, t_start - elapsed_before,
                  args.peak_tflops or eval_zeroshot.gpu_peak_tflops(device, precision))

    def save(step, *names):  # every rank gives its random state and data position; rank 0 writes the files
        state = {"method": METHOD, "args": vars(args), "step": step, "model": raw_model.state_dict(),
                 "elapsed_s": time.time() - meter.started, "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "rng": all_gather_object(rng_state(device)),
                 "data": all_gather_object(loader.state_dict())}
        for name in names if rank == 0 else ():
            save_checkpoint(os.path.join(args.out_dir, name), state)

    def evaluate(step):  # every rank, on the raw model
        return {"step": step, **eval_zeroshot.evaluate_during_training(
            raw_model, eval_sets, args, context_length, device, autocast, workers, rank, world_size)}

    batches, bad_in_a_row = iter(loader), torch.zeros((), device=device)
    for step in range(start_step, total_steps):
        # Step: a batch, augmented on the device; the learning rate; one optimizer step.
        t_data = time.time()
        images, tokens, params = next(batches)  # params [B, V, P]: each view's on-device augmentation, on the CPU
        images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        images = augment.on_device(images, params)  # fp32 [B, V, 3, H, W], augmented and normalised
        data_time = time.time() - t_data
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args, total_steps)
        loss, logs, applied = train_step(model, raw_model, optimizer, scaler, images, tokens, args, autocast, precision)
        bad_in_a_row = (bad_in_a_row + 1) * ~applied
        # FLOPs at the captions' cut length; gradient caching runs the towers twice
        flops = raw_model.flops_per_sample(tokens.shape[-1], recompute=args.accum_steps > 1) * len(tokens)
        meter.add(loss, logs, applied, data_time, flops)
        done = step + 1

        # Log: the steps since the last line, averaged over ranks.
        if done % args.log_every == 0 or done == total_steps:
            meter.log(done, lr_at(step, args, total_steps), loader.skipped)

        # Stop or checkpoint. All ranks decide alike, on the max over ranks of (a signal arrived, bad steps in a row).
        stopping = False
        if done % STOP_CHECK_EVERY == 0 or done % args.log_every == 0 or done == total_steps:
            flags = torch.stack([torch.tensor(float("signal" in stop), device=device), bad_in_a_row.float()])
            if world_size > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signalled, bad = flags.tolist()
            if bad >= args.max_bad_steps:
                save(done, "ckpt.pt")
                raise SystemExit(f"{args.max_bad_steps} steps in a row had a non-finite loss or gradient; stopped at "
                                 f"step {done} with the last good weights saved in {args.out_dir}/ckpt.pt "
                                 f"(lower --lr or use --grad-clip)")
            stopping = signalled > 0
        keep = args.keep_every and done % args.keep_every == 0  # a snapshot kept besides the rolling ckpt.pt
        if (args.save_every and done % args.save_every == 0) or done == total_steps or stopping or keep:
            t_save = time.time()
            save(done, "ckpt.pt", *([f"ckpt_{done}.pt"] if keep else []))
            meter.t += time.time() - t_save  # the log interval's samples/s leaves checkpoint writes out
        if stopping and done < total_steps:
            record = {"step": done, "stopped_by": stop.get("signal", "another rank's signal")}
            eval_zeroshot.log_line(record, args.out_dir)
            print0(f"stopped by a signal at step {done} of {total_steps}; {args.out_dir}/ckpt.pt holds it: "
                   f"run the same command with --resume auto to continue")
            return {"step": done, "stopped": True}

        # Evaluate, every --eval-every steps and at the end.
        if args.eval_every and done % args.eval_every == 0 and done != total_steps:
            record = evaluate(done)
            meter.eval_time = record["eval_s"]
            meter.t += meter.eval_time  # the log interval's samples/s leaves the evaluation out
            eval_zeroshot.log_line(record, args.out_dir)
    result = evaluate(total_steps)
    if len(result) > 1:  # the run's last log line is its final evaluation (unless there is nothing to evaluate)
        eval_zeroshot.log_line(result, args.out_dir)
    return result


# The pieces of train. Resume: which checkpoint, loaded and put in place.
def agree_on_checkpoint(args, rank, world_size):
    """-> (the checkpoint every rank resumes from, or None; its path). Each rank looks on its own file system (nodes
    need not share one): OUT_DIR/ckpt.pt for --resume auto, or PATH. All ranks take the newest one some rank could
    read, sent to the ranks without it; one that no rank can read stops every rank with the same one-line error."""
    path, ckpt, error = args.resume, None, None
    if path == "auto":
        path = os.path.join(args.out_dir, "ckpt.pt")
        path = path if os.path.exists(path) else None
    if path is not None:
        try:
            ckpt = load_checkpoint(path, args)
        except SystemExit as e:
            error = str(e)
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


def resume(ckpt, ckpt_path, raw_model, optimizer, scaler, device):
    """A checkpoint's weights, optimizer, loss scale and this rank's random state into place -> (its step, this
    rank's data position, the training seconds of earlier attempts); (0, None, 0.0) without a checkpoint."""
    if not ckpt:
        return 0, None, 0.0
    raw_model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    data_state = None
    if len(ckpt["rng"]) == get_world_size():
        set_rng_state(ckpt["rng"][get_rank()], device)
        data_state = ckpt["data"][get_rank()]
    else:
        print0(f"note: the checkpoint was written by {len(ckpt['rng'])} ranks, not {get_world_size()}: random state "
               f"and tar-stream positions start afresh, so the run continues but not bit for bit")
    print0(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return ckpt["step"], data_state, ckpt.get("elapsed_s", 0.0)


# Build: precision, model and optimizer, the run's description.
def mixed_precision(args, device):
    """-> (precision, autocast context); default: fp32 on CPU, bf16 on GPUs that run it natively, else fp16."""
    precision = args.precision or eval_zeroshot.default_precision(device)
    if precision == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        print0(f"note: {torch.cuda.get_device_name(device)} has no bf16 tensor cores: --precision fp16 is faster")
    return precision, eval_zeroshot.autocast_context(precision, device)


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


def announce(args, raw_model, loader, total_steps, precision, device, workers, eval_sets):
    """OUT_DIR/run.json, and the start lines: steps, epochs, samples, global batch; evaluations; kept snapshots."""
    world_size, batch = get_world_size(), get_world_size() * args.batch_size * args.accum_steps
    if get_rank() == 0:
        with open(os.path.join(args.out_dir, "run.json"), "w") as f:
            json.dump({"method": METHOD, "args": vars(args), "world_size": world_size, "precision": precision,
                       "total_steps": total_steps, "steps_per_epoch": loader.steps_per_epoch,
                       **eval_zeroshot.machine(device), "parameters": sum(p.numel() for p in raw_model.parameters())},
                      f, indent=1)
    accum = f" x {args.accum_steps} micro-batches (gradient caching)" if args.accum_steps > 1 else ""
    print0(f"{METHOD}: {args.model} on {args.data}: {total_steps} steps = {total_steps / loader.steps_per_epoch:.4g} "
           f"epochs of {loader.steps_per_epoch * batch} samples ({total_steps * batch} samples in all), global batch "
           f"{batch} = {world_size} x {args.batch_size}{accum}; {precision} on {device.type}, {workers} loader "
           f"workers per rank")
    print0(f"optimiser: AdamW, lr {args.lr:.3g} ({args.lr_rule}), wd {args.wd:g}, {args.warmup} warm-up steps, cosine")
    print0(eval_zeroshot.eval_plan(eval_sets, args))
    if args.keep_every:
        print0(f"keeping {args.out_dir}/ckpt_STEP.pt every {args.keep_every} steps besides the rolling ckpt.pt")


# Step: the learning rate, the optimizer step, gradient caching.
def lr_at(step, args, total_steps):
    """Linear warm-up to --lr in --warmup steps, then cosine decay to 0."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, total_steps - args.warmup)))


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


# Log: the numbers of a log line (eval_zeroshot.log_line writes it).
class Meter:
    """The numbers of the log lines: sums over the steps since the last line, kept on the device (no host sync between
    lines); their data time, FLOPs and wall time (evaluations and checkpoint writes left out); where the run is."""

    def __init__(self, args, device, total_steps, steps_per_epoch, started, peak_tflops):
        self.args, self.device, self.total_steps, self.steps_per_epoch = args, device, total_steps, steps_per_epoch
        self.started, self.peak_tflops, self.eval_time = started, peak_tflops, 0.0  # started: counts earlier attempts
        self.reset()

    def reset(self):
        self.sums, self.steps, self.data_time, self.flops, self.t = {}, 0, 0.0, 0, time.time()
        self.nonfinite = torch.zeros((), device=self.device)

    def add(self, loss, logs, applied, data_time, flops):
        self.nonfinite += ~applied
        for k, v in {"loss": loss.detach(), **logs}.items():
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(applied, v.float(), 0.0)
        self.steps, self.data_time, self.flops = self.steps + 1, self.data_time + data_time, self.flops + flops

    def log(self, done, lr, skipped):
        """The log line of the steps up to `done`, each number averaged over the finite steps of all ranks."""
        args, keys, skipped = self.args, list(self.sums), torch.tensor(float(skipped), device=self.device)
        totals = torch.stack([self.sums[k] for k in keys] + [self.nonfinite, skipped])
        if get_world_size() > 1:
            dist.all_reduce(totals)  # summed over ranks
        totals, seconds = totals.tolist(), time.time() - self.t
        good = max(1, self.steps * get_world_size() - int(totals[-2]))  # finite steps of all ranks
        record = {"step": done, **{k: totals[i] / good for i, k in enumerate(keys)}, "lr": lr,
                  "samples_per_s_per_gpu": self.steps * args.batch_size * args.accum_steps / seconds,
                  "data_time": self.data_time / self.steps,
                  "mfu": self.flops / seconds / (self.peak_tflops * 1e12) if self.peak_tflops else None,
                  "peak_mem_gb": eval_zeroshot.peak_memory(self.device) / 2**30,
                  "skipped_samples": int(totals[-1]), "nonfinite_steps": int(totals[-2])}
        # Where the run is: time left = steps left at this interval's rate (evaluations excluded) + the
        # evaluations left (every --eval-every steps and one at the end) at the last one's duration.
        every = args.eval_every
        evals_left = 1 + (max(0, (self.total_steps - 1) // every - done // every) if every else 0)
        record.update(epoch=done / self.steps_per_epoch, elapsed_s=time.time() - self.started,
                      time_left_s=(self.total_steps - done) * seconds / self.steps + evals_left * self.eval_time)
        eval_zeroshot.log_line(record, args.out_dir)
        self.reset()


# Checkpoint: written whole or not at all, with every rank's random state.
def save_checkpoint(path, state):
    """Write to a temporary file, flush it to disk, then rename: a crash never leaves a half-written ckpt."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
# --- end shared: plumbing ---


if __name__ == "__main__":
    main(parse_args())
