"""Evaluation of clip.py, nclip.py and xclip.py checkpoints: zero-shot classification, image-text retrieval,
linear probe. The training scripts evaluate with `evaluate_during_training` (`zeroshot_classify` and `retrieve`,
these same functions) while they train: this tool on a kept `ckpt_STEP.pt` reports the numbers that the run logged
at that step. They also take from here what is not about training a method: their evaluation flags, log lines and
TensorBoard / W&B curves, the machine's precision, loader workers, peak FLOP/s and memory.

  python eval_zeroshot.py --checkpoint runs/clip/ckpt.pt     # the held-out synthetic images of the training log
  python eval_zeroshot.py --checkpoint runs/clip/ckpt_2000.pt --dataset imagenet --data-dir /data/imagenet
  python eval_zeroshot.py --checkpoint ckpt.pt --dataset cifar10 --data-dir /data/cifar --linear-probe --out r.json
  python eval_zeroshot.py --checkpoint ckpt.pt --retrieval /data/flickr30k/test.csv --gallery gallery.png
  torchrun --standalone --nproc_per_node=8 eval_zeroshot.py --checkpoint ckpt.pt \
      --dataset imagenet --data-dir /data/imagenet

Protocols
  Zero-shot classification with prompt ensembles (Radford et al. 2021, arXiv:2103.00020, Sec. 3.1.4): with
  templates t_1..t_M,  w_c = normalize(1/M sum_m normalize(f_text(t_m(c)))),
  score(x, c) = <normalize(f_image(x)), w_c>.
  Top-1, top-5 and mean per-class recall (the mean over classes of the fraction of their images ranked first,
  CLIP's metric for unbalanced sets, its Appendix A). Every head of `model.zeroshot_heads()` is scored, the
  first being the main one (improved recipe: linear, mlp, mix; nCLIP: square roots of the prototype
  distributions, whose cosine is the Bhattacharyya coefficient).
  Retrieval: recall@1/5/10 as on the Flickr30k / MSCOCO test splits of Karpathy & Fei-Fei (2015), where an
  image has several captions. Image->text: an image is a hit at k when any of its captions is among the k
  best-scoring captions; text->image: a caption is a hit at k when its own image is among the k best images.
  Linear probe (CLIP Appendix A.3; SLIP reports the same measurement): multinomial logistic regression by
  full-batch L-BFGS on frozen, L2-normalised image-tower features before the projection (I_f in CLIP's Fig. 3).
  The L2 strength is picked from PROBE_WEIGHT_DECAYS on a random 20% of the train split (ties: the stronger),
  the classifier refit on all of it and scored on the test split.
  Ties, everywhere: an item's rank is the number of wrong items scoring at least as high as the best right one
  (pessimistic: a tie never helps), so no number depends on a sort order.

Datasets (--dataset, --data-dir DIR), every image through augment.EvalView at the checkpoint's image size;
--eval-samples N takes N images evenly spaced through the set (by default, on the set that the training run
evaluated on, the run's own --eval-samples: the top-1 is the log's zeroshot_DATASET_top1 of that step)
  synthetic    the 'val' split of data.SyntheticPairs (2048 images), drawn with the checkpoint's --seed.
               Probe: PROBE_SYNTHETIC_SAMPLES images of the train split.
  imagenet     DIR/val (else DIR) holds the 1000 WordNet-id folders (n01440764, ...); OpenAI's class names and
               80 templates from eval_data/prompts.json, in sorted-wnid order. Probe: DIR/train.
  cifar10/100  torchvision's layout, DIR/cifar-10-batches-py or DIR/cifar-100-python (the extracted python
               archives, never downloaded); OpenAI's names and 18 templates. Probe: train vs test split.
  folder       any ImageFolder, DIR/val, else DIR/test, else DIR; class names are the folder names with '_' as
               spaces, templates FOLDER_TEMPLATES. Probe: DIR/train, with the same class folders.
  --retrieval PAIRS.csv: one row per caption, image paths relative to the CSV; its images are the distinct paths.
Distributed: rank r encodes items r, r + W, r + 2W, ...; each scores its own images (the image and text towers run
once per batch for all heads; the prompts are averaged class by class as they are encoded) and gathers in dataset
order only the rank of each image's class (retrieval and the probe: the features), so every number equals that of
one process, and memory does not grow with the embedding size times the number of images or templates.
Output: a table; --out JSON with top1, top5, mean_per_class_recall (fractions, main head), i2t_r1 ... t2i_r10,
linear_top1, and every head's numbers under "heads"; --gallery PNG: 6 classes, each with its 5 best-scoring
images and their scores.
"""

import argparse
import functools
import importlib
import importlib.util
import json
import os
import platform
import re
import resource
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import augment
import data

METHODS = ("clip", "nclip", "xclip")  # the only modules a checkpoint may name
PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_data", "prompts.json")
FOLDER_TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.", "a cropped photo of a {}.",
                    "a bright photo of a {}.", "a good photo of the {}."]  # generic ones among OpenAI's 80
PROBE_WEIGHT_DECAYS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]  # L2 strengths the linear probe chooses from
PROBE_SYNTHETIC_SAMPLES = 4096  # synthetic train images for the linear probe: a few seconds on a CPU
RECALL_AT = (1, 5, 10)

# ---------------------------------------------------------------------------------------------------
# Classifier and metrics


@torch.no_grad()
def build_classifier(encode_text, classnames, templates, context_length, device, batch_size=512):
    """encode_text: tokens [B, L] -> [B, D], or -> {head: [B, D]} -> [D, C] (or {head: [D, C]}): one unit-norm
    prompt-ensemble embedding per class (columns). The unit-norm template embeddings are summed class by class as
    each batch of prompts is encoded: memory [C, D] per head, never [C * M, D] (ImageNet's 80 templates at nCLIP's
    D = 32768 would be 10.5 GB)."""
    prompts = [template.format(name) for name in classnames for template in templates]  # C * M strings
    tokens = data.tokenize(prompts, context_length)  # [C * M, L]
    classes = torch.arange(len(classnames), device=device).repeat_interleave(len(templates))  # [C * M]
    sums = {}  # {head: [C, D]}
    for i in range(0, len(prompts), batch_size):
        out = encode_text(data.trim_tokens(tokens[i : i + batch_size]).to(device))  # [b, D] or {head: [b, D]}
        for name, f in (out.items() if isinstance(out, dict) else [(None, out)]):
            f = F.normalize(f.float(), dim=-1)  # [b, D]
            sums.setdefault(name, f.new_zeros(len(classnames), f.shape[-1])).index_add_(0, classes[i : i + len(f)], f)
    classifiers = {name: F.normalize(w, dim=-1).t().contiguous() for name, w in sums.items()}  # {head: [D, C]}
    return classifiers if isinstance(out, dict) else classifiers[None]


def pessimistic_rank(scores, positive):
    """scores [N, M], positive bool [N, M] (at least one per row) -> [N]: the 0-based rank of each row's best
    positive when ties go against it = the number of negatives scoring >= it. A NaN score ranks last."""
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))  # [N, M]
    best = scores.masked_fill(~positive, float("-inf")).max(1).values  # [N]
    return ((scores >= best[:, None]) & ~positive).sum(1)  # [N]


def classification_metrics(logits, labels, num_classes):
    """logits [N, C], labels [N] -> top1, top5 and mean per-class recall (over classes that have images)."""
    return rank_metrics(pessimistic_rank(logits, F.one_hot(labels, num_classes).bool()), labels, num_classes)


def rank_metrics(rank, labels, num_classes):
    """rank [N]: each image's pessimistic rank of its class, labels [N] -> the metrics of `classification_metrics`."""
    hit = (rank == 0).float()  # [N]
    class_hits = torch.zeros(num_classes, device=rank.device).index_add_(0, labels, hit)  # [C]
    class_total = torch.bincount(labels, minlength=num_classes).float()  # [C]
    present = class_total > 0
    return {"top1": hit.mean().item(), "top5": (rank < 5).float().mean().item(),
            "mean_per_class_recall": (class_hits[present] / class_total[present]).mean().item()}


def retrieval_metrics(image_features, text_features, text_to_image):
    """image_features [N, D], text_features [T, D] (unit norm), text_to_image [T]: the image of each caption
    -> i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10 as fractions."""
    scores = image_features.float() @ text_features.float().t()  # [N, T]
    images = torch.arange(len(image_features), device=scores.device)  # [N]
    positive = text_to_image.to(scores.device)[None, :] == images[:, None]  # [N, T]
    ranks = {"i2t": pessimistic_rank(scores, positive), "t2i": pessimistic_rank(scores.t(), positive.t())}
    return {f"{way}_r{k}": (rank < k).float().mean().item() for way, rank in ranks.items() for k in RECALL_AT}


# ---------------------------------------------------------------------------------------------------
# Encoding a dataset, sharded over ranks


def gather_in_order(x, n, world_size):
    """This rank's rows x of items rank, rank + W, ... -> all n items in dataset order, on every rank."""
    m = -(-n // world_size)  # rows of the largest shard
    padded = x.new_zeros((m,) + x.shape[1:])  # [m, ...]
    padded[: len(x)] = x
    shards = [torch.empty_like(padded) for _ in range(world_size)]  # W x [m, ...]
    dist.all_gather(shards, padded)
    return torch.stack(shards, 1).reshape(world_size * m, *x.shape[1:])[:n]  # [m, W, ...] -> [n, ...]: item j * W + r


def tower_and_heads(tower, heads):
    """A tower and heads {name: fn(tower features) -> [b, D]} -> fn(inputs) -> {name: [b, D]}: the tower runs once
    per batch, for all heads."""
    def encode(inputs):
        features = tower(inputs)  # [b, width]
        return {name: head(features) for name, head in heads.items()}
    return encode


@torch.no_grad()
def encode_dataset(encode, dataset, device, batch_size=256, workers=0, autocast=None, rank=0, world_size=1,
                   collate_fn=None, reduce=None):
    """encode: fn(inputs) -> {name: [b, D]}, dataset of (input, label) -> ({name: unit-norm float [N, D]},
    labels [N]), every item of the dataset in order, on every rank; each rank encodes its shard once.
    collate_fn: the loader's (caption datasets: data.collate, which cuts each batch after its last EOT).
    reduce: fn(features {name: [b, D]}, labels [b]) -> {key: [b, ...]}, applied to each batch: only what it returns
    is kept and gathered (zero-shot classification: the rank of each image's class, not its features)."""
    if len(dataset) < world_size:
        raise ValueError(f"{len(dataset)} items cannot be shared by {world_size} ranks")
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    # generator: the base seed of the workers comes from it, not from torch's global RNG, which an evaluation
    # during training must leave as it is (the run's dropout masks; a resumed run restores the RNG of its checkpoint)
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn,
                                         worker_init_fn=data.ignore_stop_signals,  # a run's signal is for the run
                                         generator=torch.Generator())
    features, labels = {}, []
    for inputs, y in loader:
        inputs, y = inputs.to(device, non_blocking=True), y.to(device)
        with autocast or nullcontext():
            out = encode(inputs)  # {name: [b, D]}
        out = {name: F.normalize(f.float(), dim=-1) for name, f in out.items()}  # {name: [b, D]}
        for name, x in (reduce(out, y) if reduce else out).items():
            features.setdefault(name, []).append(x)  # [b, ...]
        labels.append(y)
    features, labels = {k: torch.cat(v) for k, v in features.items()}, torch.cat(labels)  # [n_r, ...], [n_r]
    if world_size > 1:
        features = {k: gather_in_order(v, len(dataset), world_size) for k, v in features.items()}  # [N, ...]
        labels = gather_in_order(labels, len(dataset), world_size)  # [N]
    return features, labels


def side(model, heads, i):
    """The image (i = 0) or text (i = 1) encoder of every head of `model.zeroshot_heads()` -> fn(inputs) ->
    {name: [b, D]}: the model's tower (visual, text) once per batch, then each head on its features."""
    return tower_and_heads((model.visual, model.text)[i], {name: head[i] for name, head in heads.items()})


def zeroshot_classifiers(model, heads, classnames, templates, context_length, device, autocast=None):
    with autocast or nullcontext():
        return build_classifier(side(model, heads, 1), classnames, templates, context_length, device)  # {name: [D, C]}


def class_ranks(classifiers, num_classes, keep=(), scores_of=None):
    """-> encode_dataset's reduce: per head of classifiers {name: [D, C]} the pessimistic rank of each image's class
    [b] (all that zero-shot classification keeps of an image), the features of the heads named in `keep` as they
    are, and under "scores" the scores [b, C] of the head `scores_of` (the CLI's gallery)."""
    def reduce(features, labels):  # {name: [b, D]}, [b]
        positive = F.one_hot(labels, num_classes).bool()  # [b, C]
        out = {name: pessimistic_rank(features[name] @ w, positive) for name, w in classifiers.items()}  # {name: [b]}
        out.update({name: features[name] for name in keep})
        if scores_of is not None:
            out["scores"] = features[scores_of] @ classifiers[scores_of]  # [b, C]
        return out
    return reduce


def zeroshot_classify(model, dataset, classnames, templates, context_length, device, batch_size=256,
                      workers=0, autocast=None, rank=0, world_size=1):
    """Zero-shot top-1/top-5/per-class recall of every head of `model.zeroshot_heads()` on `dataset` of (uint8
    image, label), sharded over ranks: each rank scores its own images; only the ranks of their classes are gathered.
    -> {name: metrics}"""
    heads = model.zeroshot_heads()
    classifiers = zeroshot_classifiers(model, heads, classnames, templates, context_length, device, autocast)
    ranks, labels = encode_dataset(side(model, heads, 0), dataset, device, batch_size, workers, autocast, rank,
                                   world_size, reduce=class_ranks(classifiers, len(classnames)))  # {name: [N]}, [N]
    return {name: rank_metrics(ranks[name], labels, len(classnames)) for name in heads}


def retrieve(model, images, captions, device, batch_size=256, workers=0, autocast=None, rank=0, world_size=1):
    """Image<->text recall@k of every head of `model.zeroshot_heads()` on `retrieval_set`'s (images, captions),
    sharded over ranks (the features are gathered: retrieval sets are small). -> {name: {i2t_r1, ..., t2i_r10}}"""
    common = dict(device=device, batch_size=batch_size, workers=workers, autocast=autocast, rank=rank,
                  world_size=world_size)
    heads = model.zeroshot_heads()
    image_features, _ = encode_dataset(side(model, heads, 0), images, **common)
    text_features, text_to_image = encode_dataset(side(model, heads, 1), captions,
                                                  collate_fn=functools.partial(data.collate, tokens_at=0), **common)
    return {name: retrieval_metrics(image_features[name], text_features[name], text_to_image) for name in heads}


def subset(dataset, n=None):
    """n items evenly spaced through `dataset` (all of it if n is None or larger): every class of a set stored
    class by class (ImageFolder, the synthetic split's 64-class cycle) keeps its share."""
    if n is None or n >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, [i * len(dataset) // n for i in range(n)])


# ---------------------------------------------------------------------------------------------------
# Datasets: every evaluation set yields (uint8 image [3, S, S], label)


class LabeledImages(torch.utils.data.Dataset):
    """A source of (PIL image, [caption,] label) -> (uint8 [3, S, S] eval view, label)."""

    def __init__(self, source, image_size):
        self.source, self.view = source, augment.EvalView(image_size)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        item = self.source[index]
        return self.view(item[0]), item[-1]


class ImageFiles(torch.utils.data.Dataset):
    """Image paths -> (PIL image, its index)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return data.load_image(self.paths[index]), index


def synthetic_eval_set(image_size, seed=0):
    """The held-out split of the synthetic data, with its class names and prompt templates."""
    source = data.SyntheticPairs("val", image_size, seed=seed)
    return LabeledImages(source, image_size), data.SYNTHETIC_CLASSNAMES, data.SYNTHETIC_TEMPLATES


def load_prompts(name):
    with open(PROMPTS) as f:
        prompts = json.load(f)[name]
    return prompts["classnames"], prompts["templates"]


def image_folder(root, what):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(root)
    except OSError as e:  # no such folder, no class folders, or a class folder without images
        raise SystemExit(f"{what} {root}: {str(e)[:300]}") from None


def classification_sets(name, data_dir, image_size, seed=0, probe=False, flag="--dataset"):
    """-> (test set, train set for the linear probe if `probe` else None, class names, templates). Errors name
    `flag` (the training scripts call this for their --eval-dataset)."""
    if name == "synthetic":
        test, classnames, templates = synthetic_eval_set(image_size, seed)
        train = LabeledImages(data.SyntheticPairs("train", image_size, seed), image_size) if probe else None
        return test, train, classnames, templates
    if not data_dir or not os.path.isdir(data_dir):
        raise SystemExit(f"{flag} {name} needs --data-dir, an existing folder (got {data_dir!r})")
    import torchvision.datasets  # imported here: it costs seconds that training runs need not pay

    if name in ("cifar10", "cifar100"):
        cifar = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            test = cifar(data_dir, train=False, download=False)
            train = cifar(data_dir, train=True, download=False) if probe else None
        except RuntimeError:  # torchvision: "Dataset not found or corrupted" (a missing file or a bad checksum)
            files = ",".join([f for f, _ in cifar.train_list + cifar.test_list] + [cifar.meta["filename"]])
            raise SystemExit(f"{flag} {name}: no intact copy in {data_dir}: expected "
                             f"{os.path.join(data_dir, cifar.base_folder)}/{{{files}}} "
                             f"(the extracted python archive)") from None
        classnames, templates = load_prompts(name)
    else:
        test_dir = next((os.path.join(data_dir, s) for s in ("val", "test")
                         if os.path.isdir(os.path.join(data_dir, s))), data_dir)
        test = image_folder(test_dir, f"{flag} {name}:")
        train = image_folder(os.path.join(data_dir, "train"), "--linear-probe needs a train split:") if probe else None
        if train is not None and train.classes != test.classes:
            raise SystemExit(f"--linear-probe: {data_dir}/train and {test_dir} have different class folders")
        if name == "imagenet":
            classnames, templates = load_prompts("imagenet")
            if len(test.classes) != len(classnames) or not all(re.fullmatch(r"n\d{8}", c) for c in test.classes):
                raise SystemExit(f"{flag} imagenet: {test_dir} must hold the {len(classnames)} WordNet-id class "
                                 f"folders (n01440764, ...); found {len(test.classes)} "
                                 f"({', '.join(test.classes[:3])}, ...)")
        else:
            classnames, templates = [c.replace("_", " ") for c in test.classes], FOLDER_TEMPLATES
    return (LabeledImages(test, image_size), train if train is None else LabeledImages(train, image_size),
            classnames, templates)


def retrieval_set(path, image_size, context_length, img_key="filepath", caption_key="caption", separator=None,
                  flag="--retrieval"):
    """A CSV of (image path, caption) rows -> (images: dataset of (uint8 image, index), captions: dataset of
    (tokens [L], index of the caption's image)). Errors name `flag`."""
    if not os.path.isfile(path):
        raise SystemExit(f"{flag} {path}: no such file")
    try:
        pairs = data.CsvPairs(path, img_key, caption_key, separator)
        captions = [data.check_caption(c) for c in pairs.captions]
    except ValueError as e:
        raise SystemExit(f"{flag} {path}: {e}") from None
    paths = list(dict.fromkeys(pairs.paths))  # distinct images, in order of first appearance
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"{flag} {path}: {len(missing)} of {len(paths)} images are missing, e.g. {missing[0]}")
    index = {p: i for i, p in enumerate(paths)}
    text_to_image = torch.tensor([index[p] for p in pairs.paths])  # [T]
    tokens = data.tokenize(captions, context_length)  # [T, L]
    return LabeledImages(ImageFiles(paths), image_size), torch.utils.data.TensorDataset(tokens, text_to_image)


# ---------------------------------------------------------------------------------------------------
# Linear probe


def fit_logistic_regression(x, y, num_classes, weight_decay, max_iter=200):
    """argmin over W, b of  mean_i CE(x_i W + b, y_i) + weight_decay / 2 ||W||^2,  by full-batch L-BFGS.
    x [N, D], y [N] -> (W [D, C], b [C])."""
    W = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)  # [D, C]
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)  # [C]
    optimizer = torch.optim.LBFGS([W, b], max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + weight_decay / 2 * W.square().sum()  # []
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return W.detach(), b.detach()


def linear_probe(train_x, train_y, test_x, test_y, num_classes, weight_decays=PROBE_WEIGHT_DECAYS, holdout=0.2, seed=0):
    """Test top-1 of logistic regression on L2-normalised features; the weight decay is the one with the best
    top-1 on a random `holdout` part of train (ties: the larger), refit on all of train. -> (top1, weight decay)"""
    train_x, test_x = F.normalize(train_x.float(), dim=-1), F.normalize(test_x.float(), dim=-1)  # [N, D], [M, D]
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)).to(train_x.device)  # [N]
    n_held = max(1, round(holdout * len(order)))
    held, fit = order[:n_held], order[n_held:]

    def top1(x, y, W, b):
        return classification_metrics(x @ W + b, y, num_classes)["top1"]

    scores = [(top1(train_x[held], train_y[held],
                    *fit_logistic_regression(train_x[fit], train_y[fit], num_classes, wd)), wd)
              for wd in weight_decays]
    best = max(scores)[1]
    return top1(test_x, test_y, *fit_logistic_regression(train_x, train_y, num_classes, best)), best


# ---------------------------------------------------------------------------------------------------
# Gallery


def draw_gallery(path, dataset, scores, labels, classnames, rows=6, per_row=5, tile=96):
    """Write a PNG: for `rows` classes spread over the class list, the `per_row` images of `dataset` with the
    highest score for that class (scores [N, C]), each with its score; green frame: the image is of that
    class, red: of another. -> [(class, [(image index, score), ...]), ...], the rows drawn."""
    C = scores.shape[1]
    classes = sorted({round(i * (C - 1) / max(1, rows - 1)) for i in range(rows)})
    label_width, header, row_height = 150, 20, tile + 24
    canvas = Image.new("RGB", (label_width + per_row * (tile + 6), header + len(classes) * row_height), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.text((4, 4), f"class prompt: its {per_row} best-scoring images and their cosine scores "
                      f"(green frame: that class)",
              fill="black", font=font)
    picks = []
    for r, c in enumerate(classes):
        top = torch.sort(scores[:, c].float().cpu(), descending=True, stable=True).indices[:per_row].tolist()
        picks.append((c, [(i, scores[i, c].item()) for i in top]))
        y = header + r * row_height + 4
        draw.text((4, y + tile // 2 - 6), classnames[c][:24], fill="black", font=font)
        for k, i in enumerate(top):
            image = dataset[i][0]  # uint8 [3, S, S]
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
            pil = pil.resize((tile, tile), Image.NEAREST if pil.width < tile else Image.BICUBIC)
            x = label_width + k * (tile + 6)
            canvas.paste(pil, (x, y))
            draw.rectangle([x - 2, y - 2, x + tile + 1, y + tile + 1], outline="green" if labels[i] == c else "red",
                           width=2)
            draw.text((x, y + tile + 2), f"{scores[i, c].item():.3f}", fill="black", font=font)
    canvas.save(path)
    return picks


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def load_model(path, device):
    """A checkpoint of clip.py, nclip.py or xclip.py -> (model in eval mode on `device`, method module,
    training args, step). Loaded with weights_only=True: a file holding pickled code is refused before it runs."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, not a torch file, or pickled objects other than tensors and containers
        reason = f"{type(e).__name__}: {(str(e) or '?').splitlines()[0]}"
        if "Weights only" in str(e):
            reason = "it holds pickled objects other than tensors; nothing was run"
        raise SystemExit(f"--checkpoint {path}: not a loadable checkpoint ({reason})") from None
    if (not isinstance(ckpt, dict) or not {"method", "args", "model"} <= ckpt.keys()
            or not isinstance(ckpt["args"], dict)):
        raise SystemExit(f"--checkpoint {path}: not a checkpoint of clip.py, nclip.py or xclip.py")
    if ckpt["method"] not in METHODS:
        raise SystemExit(f"--checkpoint {path}: unknown method {ckpt['method']!r} (known: {', '.join(METHODS)})")
    try:
        module = importlib.import_module(ckpt["method"])
    except ImportError as e:
        raise SystemExit(f"--checkpoint {path}: a {ckpt['method']}.py checkpoint, "
                         f"but {ckpt['method']}.py cannot be imported ({e})") from None
    train_args = argparse.Namespace(**ckpt["args"])
    try:
        model = module.build_model(train_args)
        model.load_state_dict(ckpt["model"])
    except (AttributeError, KeyError, RuntimeError, TypeError) as e:
        raise SystemExit(f"--checkpoint {path}: its weights do not fit {ckpt['method']}.py's model "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return model.to(device).eval(), module, train_args, ckpt.get("step")


# ---------------------------------------------------------------------------------------------------
# The machine, for this tool and the training scripts: precision, loader workers, peak FLOP/s and memory


def default_precision(device):
    """fp32 on CPU; on a GPU bf16 where its tensor cores run it (compute capability 8.0 and newer: A100, H100,
    L4, ...), else fp16 (V100, T4: torch.cuda.is_bf16_supported() says yes there, for a slow emulation)."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


def autocast_context(precision, device):
    """The autocast context of a precision (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def default_workers():
    """Loader processes per rank: the CPUs of this node shared by its ranks, one left for the rank itself, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


# Dense peak TFLOP/s, from NVIDIA's data sheets (without sparsity): (pattern matched on torch.cuda.get_device_name,
# 16-bit tensor cores (bf16; fp16 on V100/T4), fp32 matmuls (TF32 from Ampere on)). The first match wins, so each
# exact part comes before its family: an H100 PCIe or NVL is not an H100 SXM.
GPU_PEAK_TFLOPS = [
    (r"H100.*(PCIe|PCIE)", 756, 378), (r"H100 NVL", 835, 417.5), (r"H200 NVL", 835, 417.5),
    (r"H100|H200|GH200", 989, 494.5), (r"A100", 312, 156), (r"A10G", 70, 35), (r"L40S", 362, 183),
    (r"L40\b", 181, 90.5), (r"L4\b", 121, 60), (r"V100", 125, 15.7), (r"T4\b", 65, 8.1),
]


def gpu_peak_tflops(device, precision):
    """The GPU's dense peak in this precision, for MFU; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((peaks for pattern, *peaks in GPU_PEAK_TFLOPS if re.search(pattern, name)), None)
    return None if peaks is None else peaks[1] if precision == "fp32" else peaks[0]


def machine(device):
    """The library versions and the device, for a training run's OUT_DIR/run.json."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"torch": torch.__version__, "python": platform.python_version(), "device": name}


def peak_memory(device):
    """Bytes: the peak of GPU memory allocated by tensors, or on a CPU the peak resident memory of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------
# Evaluation, log lines and curves during training: what clip.py, nclip.py and xclip.py call for them


def training_args(parser):
    """The flags of clip.py, nclip.py and xclip.py for evaluation and curves during training."""
    g = parser.add_argument_group("evaluation during training, on every rank (eval_zeroshot.py gives the same numbers "
                                  "for a checkpoint of the same step), and curves")
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
    g.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="also write every logged number as a TensorBoard scalar to DIR (default: OUT_DIR/tensorboard); "
                        "needs `pip install tensorboard`")
    g.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log every number to this Weights & Biases project (`pip install wandb`); with "
                        "WANDB_MODE=offline it stays in OUT_DIR/wandb, for `wandb sync` later")


def check_training_args(args, parser):
    """Refuse evaluation and curve flags that cannot work, naming the flag; fill in the defaults."""
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


def open_eval_sets(args, image_size, context_length):
    """The sets of --eval-dataset and --eval-retrieval, opened before training so that bad input stops the run at
    once. -> (classification (images, class names, templates) or None, retrieval (images, captions) or None)"""
    classification = retrieval = None
    if args.eval_dataset != "none":
        images, _, classnames, templates = classification_sets(
            args.eval_dataset, args.eval_data_dir, image_size, args.seed, flag="--eval-dataset")
        classification = subset(images, args.eval_samples), classnames, templates
    if args.eval_retrieval:
        retrieval = retrieval_set(args.eval_retrieval, image_size, context_length, args.csv_img_key,
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


def evaluate_during_training(model, eval_sets, args, context_length, device, autocast, workers=0, rank=0,
                             world_size=1):
    """Zero-shot top-1/top-5 on --eval-dataset and recall@k on --eval-retrieval. Every rank runs it on the raw model
    (not the DDP wrapper) and encodes and scores its share; what is gathered (the ranks of the images' classes,
    retrieval's features) is in dataset order, so the numbers are those of one process. -> {} or a record whose
    keys name the set: zeroshot_imagenet_top1, zeroshot_imagenet_top1_mlp (another head), retrieval_i2t_r1, ...,
    eval_head (the head of the keys without a head's name), eval_s (seconds)."""
    classification, retrieval = eval_sets
    if classification is None and retrieval is None:
        return {}
    t, main_head = time.time(), next(iter(model.zeroshot_heads()))
    common = dict(device=device, workers=workers, autocast=autocast, rank=rank, world_size=world_size)
    record = {}
    model.eval()
    if classification:
        results = zeroshot_classify(model, *classification, context_length, **common)
        name = f"zeroshot_{args.eval_dataset}"
        record[f"{name}_top1"], record[f"{name}_top5"] = results[main_head]["top1"], results[main_head]["top5"]
        record.update({f"{name}_top1_{head}": m["top1"] for head, m in results.items() if head != main_head})
    if retrieval:
        results = retrieve(model, *retrieval, **common)
        record.update({f"retrieval_{k}": v for k, v in results[main_head].items()})
    model.train()
    record["eval_head"], record["eval_s"] = main_head, time.time() - t
    return record


CURVES = []  # rank 0's TensorBoard / W&B writers while a training run is open: (write(numbers, step), close)


def open_curves(args, resumed):
    """Rank 0: the writers of --tensorboard and --wandb, imported only when asked, for the numbers of every log
    record (log.jsonl stays the run's record). A resumed run continues its W&B run (id in OUT_DIR/wandb_id)."""
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


def log_line(record, out_dir):
    """Rank 0: a training run's record as one printed line, appended to OUT_DIR/log.jsonl and passed to the curve
    writers (tags train/KEY, or eval/KEY for evaluation results). Keys ending in _s are durations in seconds."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return

    def field(k, v):
        if k.endswith("_s") and isinstance(v, (int, float)):
            return f"{k} {v:.1f}" if v < 60 else f"{k} {int(v) // 3600}:{int(v) // 60 % 60:02d}:{int(v) % 60:02d}"
        return f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
    print(" | ".join(field(k, v) for k, v in record.items()), flush=True)
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    numbers = {f"{'eval' if k.startswith(('zeroshot_', 'retrieval_', 'eval_')) else 'train'}/{k}": v
               for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    for write, _ in CURVES:
        write(numbers, record["step"])


def close_curves():
    while CURVES:
        CURVES.pop()[1]()


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="ckpt.pt written by clip.py, nclip.py or xclip.py")
    p.add_argument("--dataset", choices=["synthetic", "imagenet", "cifar10", "cifar100", "folder"],
                   help="zero-shot classification set (layouts: see the module docstring; default: synthetic for a "
                        "checkpoint trained on it, else none: the drawn shapes say nothing about a model of real data)")
    p.add_argument("--data-dir", default=None, help="where the --dataset lives (all but synthetic)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="evaluate on N images evenly spaced through the set (default: all; on the training run's "
                        "own --eval-dataset: its --eval-samples)")
    p.add_argument("--retrieval", default=None, metavar="PAIRS.csv",
                   help="also image<->text recall@1/5/10 on a CSV with one row per caption")
    p.add_argument("--csv-img-key", default="filepath",
                   help="--retrieval CSV column of image paths (relative to the CSV)")
    p.add_argument("--csv-caption-key", default="caption", help="--retrieval CSV column of captions")
    p.add_argument("--csv-separator", default=None,
                   help="--retrieval CSV separator (default: tab for .tsv, comma otherwise)")
    p.add_argument("--linear-probe", action="store_true",
                   help="also logistic regression on frozen image-tower features")
    p.add_argument("--probe-samples", type=int, default=None,
                   help=f"linear probe: train images, evenly spaced through the train split "
                        f"(default: synthetic {PROBE_SYNTHETIC_SAMPLES}, others all)")
    p.add_argument("--out", default=None, metavar="results.json", help="write the results as JSON")
    p.add_argument("--gallery", default=None, metavar="gallery.png", help="draw the top-5 images of 6 class prompts")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward, per process")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader processes per rank (default: CPUs per rank - 1, at most 8)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (default: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU)")
    args = p.parse_args(argv)
    for flag, minimum in (("batch_size", 1), ("eval_samples", 1), ("probe_samples", 2), ("workers", 0)):
        if getattr(args, flag) is not None and getattr(args, flag) < minimum:
            p.error(f"--{flag.replace('_', '-')} must be at least {minimum}")
    return args


def print_table(record):
    first = next(iter(record["heads"].values()))
    print(f"{record['method']}.py checkpoint {record['checkpoint']}, step {record['step']} | "
          f"{record['dataset'] or 'no zero-shot set'}: {record['images']} images, {record['classes']} classes"
          + (f" | retrieval: {record['retrieval']}" if "retrieval" in record else ""))
    widths = {k: max(7, len(k)) + 2 for k in first}
    print("head      " + "".join(f"{k:>{w}}" for k, w in widths.items()) + "   (percent; first row: the main head)")
    for name, metrics in record["heads"].items():
        print(f"{name:<10}" + "".join(f"{100 * metrics[k]:>{w}.2f}" for k, w in widths.items()))
    if "linear_top1" in record:
        print(f"linear probe top-1 {100 * record['linear_top1']:.2f} (weight decay {record['linear_weight_decay']:g}, "
              f"{record['probe_samples']} train images)")


def evaluate(args, device, rank=0, world_size=1):
    """The CLI's work, on every rank; rank 0 prints and writes the files. -> the JSON record."""
    model, module, train_args, step = load_model(args.checkpoint, device)
    size, context_length = (module.PRESETS[train_args.model][k] for k in ("image_size", "context_length"))
    if args.dataset is None and getattr(train_args, "data", "synthetic") == "synthetic":
        args.dataset = "synthetic"  # the held-out shapes of the training run's own log
    if args.dataset is None and (args.linear_probe or not args.retrieval):
        raise SystemExit(f"--checkpoint {args.checkpoint}: trained on {train_args.data}, not on the synthetic shapes: "
                         f"give --dataset (imagenet, cifar10, cifar100, folder; synthetic to score the shapes anyway)"
                         f"{'' if args.linear_probe else ' and/or --retrieval PAIRS.csv'}")
    # Every input is opened before the first forward, so bad input stops the run at once.
    dataset, probe_train, classnames, templates = classification_sets(
        args.dataset, args.data_dir, size, getattr(train_args, "seed", 0), args.linear_probe) if args.dataset else \
        ([], None, [], [])
    # By default the images of the training run's own evaluation when this is its --eval-dataset (synthetic also
    # for runs before that flag took other sets): the numbers of its log.
    same_set = args.dataset == getattr(train_args, "eval_dataset", "synthetic")
    dataset = subset(dataset, args.eval_samples or (getattr(train_args, "eval_samples", None) if same_set else None))
    if args.retrieval:
        images, captions = retrieval_set(args.retrieval, size, context_length, args.csv_img_key, args.csv_caption_key,
                                         args.csv_separator)
    if args.linear_probe:
        k = min(args.probe_samples or (PROBE_SYNTHETIC_SAMPLES if args.dataset == "synthetic" else len(probe_train)),
                len(probe_train))
        probe_train = torch.utils.data.Subset(probe_train,
                                              torch.linspace(0, len(probe_train) - 1, k).round().long().tolist())

    workers = args.workers if args.workers is not None else default_workers()
    autocast = autocast_context(args.precision or default_precision(device), device)
    common = dict(device=device, batch_size=args.batch_size, workers=workers, autocast=autocast, rank=rank,
                  world_size=world_size)

    heads = model.zeroshot_heads()
    main_head = next(iter(heads))
    probe_head = {"linear probe": (lambda f: f, None)} if args.linear_probe else {}
    results = {name: {} for name in heads}
    if args.dataset:  # one pass of the image tower: every head's ranks, the probe's features, the gallery's scores
        classifiers = zeroshot_classifiers(model, heads, classnames, templates, context_length, device, autocast)
        reduce = class_ranks(classifiers, len(classnames), list(probe_head), main_head if args.gallery else None)
        out, labels = encode_dataset(side(model, {**heads, **probe_head}, 0), dataset, reduce=reduce, **common)
        results = {name: rank_metrics(out[name], labels, len(classnames)) for name in heads}
    record = {"checkpoint": args.checkpoint, "method": module.__name__, "step": step, "dataset": args.dataset,
              "images": len(dataset), "classes": len(classnames), "head": main_head}
    if args.retrieval:
        for name, metrics in retrieve(model, images, captions, **common).items():
            results[name].update(metrics)
        record["retrieval"] = f"{len(images)} images, {len(captions)} captions"
    record.update(results[record["head"]])
    if args.linear_probe:
        train_x, train_y = encode_dataset(side(model, probe_head, 0), probe_train, **common)  # {.: [k, width]}, [k]
        top1, weight_decay = linear_probe(train_x["linear probe"], train_y, out["linear probe"], labels,
                                          len(classnames))
        record.update(linear_top1=top1, linear_weight_decay=weight_decay, probe_samples=len(probe_train))
    record["heads"] = results

    if rank == 0:
        print_table(record)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
        if args.gallery and args.dataset:
            draw_gallery(args.gallery, dataset, out["scores"], labels.tolist(), classnames)  # scores [N, C]
    return record


def main(argv=None):
    """`python eval_zeroshot.py ...` or under torchrun (one rank per process); inside an existing process
    group (as in the tests) it uses that group."""
    args = parse_args(argv)
    world_size, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise SystemExit(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    own_group = world_size > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    try:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return evaluate(args, device, rank, world_size)
    finally:
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
