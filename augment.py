"""Image and text augmentations, reproducible from a seed.

Every view is called as `view(x, rng)` where `rng` is a `random.Random` that the data loader seeds from
(seed, epoch, sample index, view index). No view touches a global random state, so a sample's views are the
same in any DataLoader worker, on any rank, and after a resume.

An image view is split in two. In the loader, per sample on the CPU: the random resized crop, resized to the
final size, and the draw of every random number of the view. A view returns the uint8 image [3, H, W] (a quarter
of the bytes of a float one on its way to the GPU) and its on-device parameters, P numbers (columns below;
IDENTITY for a view that needs none), which travel with the batch as a float32 tensor [B, V, P]. On the training
device, batched: `on_device(images, params)` applies colour jitter, grayscale, Gaussian blur and the horizontal
flip with each view's own parameters, in fp32, and normalises. Done per sample in PIL, those per-pixel ops (the
HSV round trip of the hue above all) made one loader process 4-5x slower on the improved recipe's three views
than on one CLIP view; now a view costs the CPU a crop and a resize.

Image views:
  CLIPView     random resized crop + resize: the CLIP training view (Radford et al. 2021 use a random
               square crop; OpenCLIP uses scale (0.9, 1); the weak view of Fini et al. 2023 uses (0.5, 1)).
  StrongView   SimCLR-style view (Chen et al. 2020) as in Fini et al. 2023 / SLIP: crop scale (0.08, 1),
               colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8 (the four ops in random order), grayscale p 0.2,
               Gaussian blur sigma 0.1-2 p 0.5, horizontal flip p 0.5.
  EvalView     resize the shorter side, centre crop: the evaluation view (a uint8 image only).
Text views:
  TextView     stop-word removal (p 0.8 in Fini et al.) and optionally one EDA op (Wei & Zou 2019):
               random swap or random deletion.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# OpenAI CLIP's normalisation constants (Radford et al. 2021, released preprocessing).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# The on-device parameters of one view, one float32 row: the jitter factors of brightness, contrast and
# saturation and the hue shift (in turns), ORDER[k] = which of those four ops (0-3) runs k-th, grayscale (0/1),
# blur sigma in pixels (0: no blur), horizontal flip (0/1). IDENTITY changes nothing: the CLIP view.
BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, GRAY, SIGMA, FLIP = 0, 1, 2, 3, 4, 8, 9, 10
IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as Pillow's convert("L")
RATIO = (3 / 4, 4 / 3)  # aspect ratios of the random resized crops


def to_tensor(img):
    """PIL image -> uint8 tensor [3, H, W]."""
    array = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # [H, W, 3] uint8
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # [3, H, W]


def pixels(img):
    """PIL image -> uint8 tensor [3, H, W] over one copy of its pixels in (H, W, 3) order (channels last), the
    layout in which F.interpolate resizes uint8 fastest. The loader converts each image once; views slice it."""
    return torch.from_numpy(np.array(img if img.mode == "RGB" else img.convert("RGB"))).permute(2, 0, 1)


def resized_crop(x, box, size):
    """uint8 [3, H, W] -> its `box` (left, top, right, bottom) resized to uint8 [3, size, size], contiguous.
    Bicubic with antialiasing: F.interpolate's antialiased path follows Pillow's resampling
    (a = -0.5, support scaled when shrinking) and agrees with Image.resize(BICUBIC, box=box) to about one grey
    level, at about half of Pillow's time."""
    left, top, right, bottom = box
    crop = x[None, :, top:bottom, left:right]  # [1, 3, h, w], a view
    crop = crop.contiguous(memory_format=torch.channels_last)  # the one copy
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]  # [3, size, size], channels last


def normalize(images):
    """uint8 images [..., 3, H, W] -> float32, scaled to [0, 1] and standardised per channel."""
    return standardize(images.float() / 255.0)


def standardize(x):
    """float images [..., 3, H, W] in [0, 1] -> standardised per channel with CLIP's MEAN and STD."""
    mean = torch.tensor(MEAN, device=x.device).view(3, 1, 1)  # [3, 1, 1]
    std = torch.tensor(STD, device=x.device).view(3, 1, 1)  # [3, 1, 1]
    return (x - mean) / std  # [..., 3, H, W]


def resized_crop_box(width, height, rng, scale, ratio=RATIO):
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


def draft_side(views):
    """The smallest sqrt(W * H) a decoded image may have so that every crop of every view still has at least the
    view's output size per side: then the crop is only ever shrunk, as from the full-size image. A crop covers an
    area fraction >= scale[0] at an aspect ratio in RATIO, so both its sides are >= sqrt(RATIO[0] scale[0] W H).
    The loader decodes large JPEGs at 1/2, 1/4 or 1/8 size (Image.draft) down to this side, no further (None: no
    views, full size)."""
    return max((view.size / math.sqrt(RATIO[0] * view.scale[0]) for view in views), default=None)


class CLIPView:
    """Random resized crop to `size` x `size` (bicubic), nothing else."""

    def __init__(self, size, scale=(0.9, 1.0)):
        self.size, self.scale = size, tuple(scale)

    def __call__(self, x, rng):
        """uint8 image [3, H, W] (`pixels`) -> (uint8 view [3, size, size], IDENTITY params: P numbers)"""
        box = resized_crop_box(x.shape[-1], x.shape[-2], rng, self.scale)
        return resized_crop(x, box, self.size), IDENTITY


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


class StrongView:
    """The SimCLR-style strong view of Fini et al. 2023 (and SLIP's SimCLR views). The crop here; colour
    jitter (torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1): factors uniform in [1 - x, 1 + x], hue shift in
    [-0.1, 0.1] turns, the four ops in random order), grayscale and blur drawn here, applied by on_device."""

    def __init__(self, size, scale=(0.08, 1.0), jitter_p=0.8, gray_p=0.2, blur_p=0.5, flip_p=0.5,
                 jitter=(0.4, 0.4, 0.4, 0.1), sigma=(0.1, 2.0)):
        self.size, self.scale, self.jitter, self.sigma = size, tuple(scale), tuple(jitter), tuple(sigma)
        self.jitter_p, self.gray_p, self.blur_p, self.flip_p = jitter_p, gray_p, blur_p, flip_p

    def __call__(self, x, rng):
        """uint8 image [3, H, W] (`pixels`) -> (uint8 view [3, size, size], params: P numbers)"""
        box = resized_crop_box(x.shape[-1], x.shape[-2], rng, self.scale)
        params = list(IDENTITY)
        if rng.random() < self.jitter_p:
            order = [BRIGHTNESS, CONTRAST, SATURATION, HUE]
            rng.shuffle(order)
            params[ORDER : ORDER + 4] = order
            *factors, hue = self.jitter
            params[BRIGHTNESS : HUE] = [rng.uniform(1 - x, 1 + x) for x in factors]
            params[HUE] = rng.uniform(-hue, hue)
        params[GRAY] = float(rng.random() < self.gray_p)
        if rng.random() < self.blur_p:
            params[SIGMA] = rng.uniform(*self.sigma)
        params[FLIP] = float(rng.random() < self.flip_p)
        return resized_crop(x, box, self.size), tuple(params)


# ---------------------------------------------------------------------------------------------------
# The photometric ops, on the training device: x float [n, 3, H, W] in [0, 1], f one factor per image [n].

def luma(x):
    return sum(w * x[:, c : c + 1] for c, w in enumerate(LUMA))  # Y = .299 R + .587 G + .114 B   [n, 1, H, W]


def blend(x, y, f):
    return torch.lerp(y, x, f.view(-1, 1, 1, 1)).clamp_(0, 1)  # clip(f x + (1 - f) y)


def brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)  # x' = clip(f x)


def contrast(x, f):
    return blend(x, luma(x).mean((1, 2, 3), keepdim=True), f)  # x' = clip(f x + (1 - f) mean(Y))


def saturation(x, f):
    return blend(x, luma(x), f)  # x' = clip(f x + (1 - f) Y)


def hue(x, shift):
    """(h, s, v) -> ((h + shift) mod 1, s, v), through HSV: value v = max(R, G, B), chroma c = v - min(R, G, B)
    (both unchanged by the shift); back with channel = v - c clip(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6,
    n = 5, 3, 1 for R, G, B."""
    r, g, b = x.unbind(1)  # [n, H, W] each
    v = x.amax(1)  # [n, H, W]
    c = v - x.amin(1)  # [n, H, W]
    safe = torch.where(c > 0, c, 1)  # where c = 0 the hue is arbitrary (gray): any h gives back v
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))  # 60°
    h = (h / 6 + shift.view(-1, 1, 1)) % 1  # [n, H, W] the shifted hue, in turns
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * h[:, None]) % 6  # [n, 3, H, W]
    return v[:, None] - c[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)  # [n, 3, H, W]


def gaussian_blur(x, sigma, radius):
    """Separable Gaussian blur, sigma per image, kernel taps -radius..radius, mirrored padding (as torchvision's
    gaussian_blur). Each image's channels are groups of one depthwise conv, with that image's kernel."""
    n, C, H, W = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # [K]
    kernel = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)  # [n, K]  g(t) = exp(-t^2 / 2 sigma^2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [n C, K], sums to 1
    y = F.pad(x.reshape(1, n * C, H, W), (radius,) * 4, mode="reflect")  # [1, n C, H + 2r, W + 2r]
    y = F.conv2d(y, kernel.view(n * C, 1, 1, -1), groups=n * C)  # [1, n C, H + 2r, W] along rows
    y = F.conv2d(y, kernel.view(n * C, 1, -1, 1), groups=n * C)  # [1, n C, H, W] along columns
    return y.view(n, C, H, W)


def on_device(images, params):
    """uint8 images [..., 3, H, W] on the training device, their views' params [..., P] as the loader made them
    (on the CPU) -> float32 images [..., 3, H, W]: colour jitter (each image's four ops in its own order),
    grayscale, Gaussian blur, horizontal flip, then normalised. Each op runs, batched, on the images that need it:
    their indices come from the CPU params, so nothing waits for the device. In fp32 whatever autocast is on."""
    shape, device = images.shape, images.device
    p = params.reshape(-1, len(IDENTITY)).float().cpu()  # [N, P]
    q = p.to(device, non_blocking=True)  # [N, P]

    def rows(mask):  # [N] bool on the CPU -> the indices of the images to change, on the device (None: none)
        index = mask.nonzero().flatten()
        return index.to(device, non_blocking=True) if len(index) else None

    with torch.autocast(device.type, enabled=False):
        x = images.reshape(-1, *shape[-3:]).float() / 255  # [N, 3, H, W] in [0, 1]
        for k in range(4):  # the k-th op of each image's colour jitter
            for op, fn in enumerate((brightness, contrast, saturation, hue)):
                i = rows((p[:, ORDER + k] == op) & (p[:, op] != IDENTITY[op]))
                if i is not None:
                    x[i] = fn(x[i], q[i, op])
        i = rows(p[:, GRAY] > 0)
        if i is not None:
            x[i] = luma(x[i]).expand(-1, 3, -1, -1)  # R = G = B = Y
        i = rows(p[:, SIGMA] > 0)
        if i is not None:  # kernel radius 3 sigma (99.7% of the weight), at most the image size allows
            radius = min(math.ceil(3 * float(p[:, SIGMA].max())), shape[-1] - 1, shape[-2] - 1)
            x[i] = gaussian_blur(x[i], q[i, SIGMA], radius)
        i = rows(p[:, FLIP] > 0)
        if i is not None:  # x'(u, v) = x(u, W - 1 - v); here, not in the loader, where it cost a copy of each view
            x[i] = x[i].flip(-1)
        return standardize(x).view(shape)  # [..., 3, H, W]


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
