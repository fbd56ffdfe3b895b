"""Zero-shot evaluation: prompt-ensemble classifiers and classification metrics.

The training scripts call `zeroshot_classify` for their periodic evaluation; every rank takes a shard of
the images and the counts are summed over ranks, so the numbers equal those of one process.

Prompt ensemble (Radford et al. 2021, Sec. 3.1.4): for class c with templates t_1..t_M,
    w_c = normalize( 1/M sum_m normalize(f_text(t_m(c))) ),   score(x, c) = <normalize(f_image(x)), w_c>
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import augment
import data


@torch.no_grad()
def build_classifier(encode_text, classnames, templates, context_length, device, batch_size=512):
    """-> [D, C]: one unit-norm prompt-ensemble embedding per class (columns)."""
    prompts = [template.format(name) for name in classnames for template in templates]  # C * M strings
    tokens = data.tokenize(prompts, context_length)  # [C * M, L]
    features = torch.cat([
        F.normalize(encode_text(tokens[i : i + batch_size].to(device)).float(), dim=-1)
        for i in range(0, len(prompts), batch_size)
    ])  # [C * M, D]
    features = features.view(len(classnames), len(templates), -1).mean(1)  # [C, D]
    return F.normalize(features, dim=-1).t().contiguous()  # [D, C]


def classification_counts(logits, labels, num_classes):
    """logits [N, C], labels [N] -> dict of summable counts: top-1 and top-5 hits, per-class hits and totals."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [N, 5]
    hit1 = top5[:, 0] == labels  # [N]
    hit5 = (top5 == labels[:, None]).any(1)  # [N]
    return {
        "n": torch.tensor(float(len(labels)), device=logits.device),
        "top1": hit1.sum().float(),
        "top5": hit5.sum().float(),
        "class_hits": torch.bincount(labels[hit1], minlength=num_classes).float(),  # [C]
        "class_total": torch.bincount(labels, minlength=num_classes).float(),  # [C]
    }


def metrics_from_counts(counts):
    """Summed counts -> top1, top5 and mean per-class recall (classes that have images), as fractions."""
    present = counts["class_total"] > 0
    return {
        "top1": (counts["top1"] / counts["n"]).item(),
        "top5": (counts["top5"] / counts["n"]).item(),
        "mean_per_class_recall": (counts["class_hits"][present] / counts["class_total"][present]).mean().item(),
    }


class LabeledImages(torch.utils.data.Dataset):
    """(PIL image, caption-or-None, label) source -> (uint8 [3, H, W] eval view, label)."""

    def __init__(self, source, image_size):
        self.source, self.view = source, augment.EvalView(image_size)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        image, _, label = self.source[index]
        return self.view(image), label


@torch.no_grad()
def zeroshot_classify(heads, dataset, classnames, templates, context_length, device, batch_size=256,
                      workers=0, autocast=None, rank=0, world_size=1):
    """Zero-shot top-1/top-5/per-class recall of every head on `dataset`, sharded over ranks.
    heads: {name: (encode_image, encode_text)}, each returning features [N, D] (normalised here)."""
    autocast = autocast or torch.autocast(device.type, enabled=False)
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=workers)
    classifiers = {}
    with autocast:
        for name, (_, encode_text) in heads.items():
            classifiers[name] = build_classifier(encode_text, classnames, templates, context_length, device)
    empty = classification_counts(torch.zeros(0, len(classnames), device=device), torch.zeros(0, dtype=torch.long, device=device), len(classnames))
    counts = {name: dict(empty) for name in heads}
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        for name, (encode_image, _) in heads.items():
            with autocast:
                features = encode_image(images)
            logits = F.normalize(features.float(), dim=-1) @ classifiers[name]  # [n, C]
            c = classification_counts(logits, labels, len(classnames))
            counts[name] = {k: counts[name][k] + c[k] for k in c}
    results = {}
    for name, c in counts.items():
        if world_size > 1:
            for v in c.values():
                dist.all_reduce(v)
        results[name] = metrics_from_counts(c)
    return results


def synthetic_eval_set(image_size, seed=0):
    """The held-out split of the synthetic data, with its class names and prompt templates."""
    source = data.SyntheticPairs("val", image_size, seed=seed)
    return LabeledImages(source, image_size), data.SYNTHETIC_CLASSNAMES, data.SYNTHETIC_TEMPLATES
