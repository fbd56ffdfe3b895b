"""Image and text augmentations, reproducible from a seed.

Every transform is called as `view(x, rng)` where `rng` is a `random.Random` that the data loader seeds
from (seed, epoch, sample index, view index). No transform touches a global random state, so a sample's
views are the same in any DataLoader worker, on any rank, and after a resume.

Images stay PIL until the end of a view and leave it as uint8 tensors [3, H, W]: the crop, resize and
colour ops run in Pillow's C code inside the loader workers, and a uint8 batch is a quarter of the bytes
of a float one on its way to the GPU. `normalize` turns them into the floats the towers take, on the
device, inside the training step.

Image views:
  CLIPView     random resized crop + resize: the CLIP training view (Radford et al. 2021 use a random
               square crop; OpenCLIP uses scale (0.9, 1); the weak view of Fini et al. 2023 uses (0.5, 1)).
  StrongView   SimCLR-style view (Chen et al. 2020) as in Fini et al. 2023 / SLIP: crop scale (0.08, 1),
               colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, Gaussian blur sigma 0.1-2 p 0.5,
               horizontal flip p 0.5.
  EvalView     resize the shorter side, centre crop: the evaluation view.
Text views:
  TextView     stop-word removal (p 0.8 in Fini et al.) and optionally one EDA op (Wei & Zou 2019):
               random swap or random deletion.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

# OpenAI CLIP's normalisation constants (Radford et al. 2021, released preprocessing).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(img):
    """PIL image -> uint8 tensor [3, H, W]."""
    array = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # [H, W, 3] uint8
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # [3, H, W]


def normalize(images):
    """uint8 images [..., 3, H, W] -> float32, scaled to [0, 1] and standardised per channel."""
    mean = torch.tensor(MEAN, device=images.device).view(3, 1, 1)  # [3, 1, 1]
    std = torch.tensor(STD, device=images.device).view(3, 1, 1)  # [3, 1, 1]
    return (images.float() / 255.0 - mean) / std  # [..., 3, H, W]


def resized_crop_box(width, height, rng, scale, ratio=(3 / 4, 4 / 3)):
    """The crop box of a random resized crop (same sampling rule as torchvision's RandomResizedCrop):
    area fraction uniform in `scale`, log aspect ratio uniform in log(`ratio`), 10 tries, else a centre
    crop at the nearest allowed aspect ratio. Returns (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class CLIPView:
    """Random resized crop to `size` x `size` (bicubic), nothing else."""

    def __init__(self, size, scale=(0.9, 1.0)):
        self.size, self.scale = size, tuple(scale)

    def __call__(self, img, rng):
        box = resized_crop_box(img.width, img.height, rng, self.scale)
        return to_tensor(img.resize((self.size, self.size), Image.BICUBIC, box=box))


class EvalView:
    """Resize the shorter side to `size` (bicubic), then centre crop `size` x `size`."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img, rng=None):
        scale = self.size / min(img.width, img.height)
        w, h = max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))
        if (w, h) != img.size:
            img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return to_tensor(img.crop((left, top, left + self.size, top + self.size)))


def color_jitter(img, rng, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1):
    """torchvision's ColorJitter on a PIL image: the four ops in random order, each factor uniform
    in [1 - x, 1 + x] (hue: shift uniform in [-hue, hue] of a full turn)."""
    ops = ["brightness", "contrast", "saturation", "hue"]
    rng.shuffle(ops)
    for op in ops:
        if op == "brightness":
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - brightness, 1 + brightness))
        elif op == "contrast":
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - contrast, 1 + contrast))
        elif op == "saturation":
            img = ImageEnhance.Color(img).enhance(rng.uniform(1 - saturation, 1 + saturation))
        else:
            h, s, v = img.convert("HSV").split()
            shift = int(round(rng.uniform(-hue, hue) * 255))
            h = Image.fromarray((np.asarray(h).astype(np.int16) + shift).astype(np.uint8), "L")  # wraps
            img = Image.merge("HSV", (h, s, v)).convert("RGB")
    return img


class StrongView:
    """The SimCLR-style strong view of Fini et al. 2023 (and SLIP's SimCLR views)."""

    def __init__(self, size, scale=(0.08, 1.0), jitter_p=0.8, gray_p=0.2, blur_p=0.5, flip_p=0.5):
        self.size, self.scale = size, tuple(scale)
        self.jitter_p, self.gray_p, self.blur_p, self.flip_p = jitter_p, gray_p, blur_p, flip_p

    def __call__(self, img, rng):
        box = resized_crop_box(img.width, img.height, rng, self.scale)
        img = img.convert("RGB").resize((self.size, self.size), Image.BICUBIC, box=box)
        if rng.random() < self.jitter_p:
            img = color_jitter(img, rng)
        if rng.random() < self.gray_p:
            img = img.convert("L").convert("RGB")
        if rng.random() < self.blur_p:
            img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        if rng.random() < self.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img)


# ---------------------------------------------------------------------------------------------------
# Text

# A plain English stop-word list (articles, pronouns, auxiliaries, prepositions, conjunctions), in the
# spirit of NLTK's list, which Fini et al. use; built in so that nothing is downloaded.
STOPWORDS = frozenset("""
a an the this that these those some any each every all both either neither
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves what which who whom whose
am is are was were be been being have has had having do does did doing will would shall should
can could may might must ought
and but or nor so yet if then else than because as until while
of at by for with about against between into through during before after above below to from up
down in out on off over under again further once here there when where why how
no not only own same too very just also
s t d ll m o re ve y don didn doesn isn aren wasn weren hasn haven hadn won wouldn shouldn couldn
""".split())


def _is_stopword(word):
    return word.strip(".,;:!?\"'()[]").lower() in STOPWORDS


def remove_stopwords(text, rng, p=0.8):
    """With probability p, drop the stop-words; keep the text if nothing would be left."""
    if p <= 0 or rng.random() >= p:
        return text
    kept = [w for w in text.split() if not _is_stopword(w)]
    return " ".join(kept) if kept else text


def random_swap(text, rng, n=1):
    """Swap two random words, n times (EDA's random swap)."""
    words = text.split()
    for _ in range(n if len(words) > 1 else 0):
        i, j = rng.randrange(len(words)), rng.randrange(len(words))
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def random_deletion(text, rng, p=0.1):
    """Drop each word with probability p; keep one random word if all would go (EDA's deletion)."""
    words = text.split()
    if len(words) <= 1:
        return text
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept) if kept else rng.choice(words)


def eda(text, rng):
    """One EDA op, as in Fini et al. 2023: synonym replacement 0.4, swap 0.4, deletion 0.2. Synonym
    replacement needs WordNet, which we do not ship, so we renormalise the other two: swap with
    probability 2/3, deletion (p 0.1 per word) with probability 1/3."""
    if rng.random() < 2 / 3:
        return random_swap(text, rng)
    return random_deletion(text, rng)


class TextView:
    """Caption -> caption: stop-word removal with probability `stopword_p`, then one EDA op if `eda`."""

    def __init__(self, stopword_p=0.0, eda=False):
        self.stopword_p, self.eda = stopword_p, eda

    def __call__(self, text, rng):
        text = remove_stopwords(text, rng, self.stopword_p)
        return eda(text, rng) if self.eda else text
