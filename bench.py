"""Benchmark the training step of clip.py, nclip.py or xclip.py, optionally against OpenCLIP in the same run.

It times the method file's own `train_step` (forward, loss, backward, optimizer) on random tensors, so no
data loading is counted, and prints samples/s per process, MFU and peak memory for every configuration.

  python bench.py                                            # tiny and ViT-B/32 (batch 16) on this machine
  python bench.py --model ViT-B/16 --batch-size 256 --device cuda --compile --compare-openclip
  python bench.py --method xclip --model tiny --batch-size 64 128 256
  python bench.py --loader                                   # + the real loader; decode+augment images/s
  python bench.py --model tiny --batch-size 128 --accum-steps 2     # gradient caching: 2 x 128 pairs a step
  python bench.py --csv-memory 2000000                        # only: loader workers' memory on a 2M-row CSV
  python bench.py --eval-memory                               # only: RAM of an ImageNet-shaped zero-shot evaluation

The steps go through TOKEN_BATCHES token batches in turn, whose captions have realistic lengths by default
(--captions cc3m, see CAPTION_MEAN below): our text tower runs up to each batch's last end-of-text token, as
in training (the `tokens` column gives the mean length run); --captions full fills every caption to the
context length.
--compare-openclip builds OpenCLIP's CLIP with the same tower sizes, vocabulary and context length, and
times its training step as its training script runs it (ClipLoss, AdamW without weight decay on gains and
biases, the same precision, all context_length positions of the same captions), alternating with ours so
that machine drift hits both; the last line is the median ratio of samples/s. OpenCLIP is needed only for
this flag: `pip install open_clip_torch`.
--loader also times the step with the real synthetic-data loader (data time per step), and decodes and
augments 224 px JPEGs from a tar shard written to a temporary folder: images/s in one loader process; and
the loader alone (synthetic 32 px, 224 px JPEG tar shards) with 1 and 2 workers.
--csv-memory ROWS measures only this, and times no step: it writes a CSV of ROWS pairs to a temporary folder, builds
the training loader with 4 workers and prints each worker's memory (RSS, PSS and USS, its private memory, from
/proc/PID/smaps_rollup) once the loader has given a few batches, then again after 4 workers have read every row's
path and caption once in a random order, as they do over an epoch. A worker that writes the refcount of a Python
object copies the memory page holding it: USS is what each worker adds.
--eval-memory measures only this: the peak resident memory (ru_maxrss) of the zero-shot evaluation that a training
run makes at every --eval-every (eval_zeroshot.evaluate_during_training, one process, CPU), on an ImageNet-shaped
set written to a temporary folder: 1000 WordNet-id folders holding 1 or 2 tiny PNGs (1500 images), ImageNet's 80
templates (--eval-templates M: the first M), nclip.py's tiny towers with its base-size head, K = 32768 prototypes
(the zero-shot embeddings are K-dimensional). It prints the peak and its growth over the peak once the model is built.
"""

import argparse
import importlib
import io
import itertools
import json
import math
import os
import statistics
import tarfile
import tempfile
import time

import torch

import augment
import data
import eval_zeroshot

# Caption lengths of the default token batches, in cl100k tokens before the end-of-text token: lognormal with
# mean 13 and standard deviation 6 (median 12, 99th percentile 33, 99.9th 46), cut to the context. Web
# captions are short: CC3M's average 10.3 words (Sharma et al. 2018, "Conceptual Captions", ACL), about 13
# cl100k tokens; the lognormal is our model of the spread and the tail. The text tower runs up to a batch's
# longest caption + EOT, rounded up to a multiple of 8: at batch 16 that is 29 positions on average (of 77), at
# batch 256 44, at 1024 54 (26, 41 and 51 before rounding).
CAPTION_MEAN, CAPTION_SD = 13.0, 6.0
TOKEN_BATCHES = 8  # the steps cycle through this many token batches, so that the batch's longest caption varies


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="clip", choices=["clip", "nclip", "xclip"])
    p.add_argument("--model", nargs="+", default=None, help="presets to time (default: tiny and ViT-B/32)")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="per process (default: 256 for tiny, 16 otherwise)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"],
                   help="default: as the training scripts")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (and OpenCLIP's)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per configuration (alternating with OpenCLIP)")
    p.add_argument("--captions", default="cc3m", choices=["cc3m", "full"],
                   help="caption lengths of the token batches: cc3m (CAPTION_MEAN) or full (every caption fills "
                        "the context, the text tower's worst case)")
    p.add_argument("--compare-openclip", action="store_true")
    p.add_argument("--loader", action="store_true", help="also time with the real loader, and JPEG decode+augment")
    p.add_argument("--accum-steps", type=int, default=1, metavar="K",
                   help="gradient caching: each step takes K micro-batches of --batch-size (samples/s counts all "
                        "K x batch-size pairs; OpenCLIP, if compared, gets the K x batch-size batch in one piece)")
    p.add_argument("--extra", default="", help="more flags for the method file, e.g. '--recipe improved'")
    p.add_argument("--csv-memory", type=int, default=None, metavar="ROWS",
                   help="only measure the loader workers' memory on a CSV of ROWS pairs (e.g. 2000000)")
    p.add_argument("--eval-memory", action="store_true",
                   help="only measure the peak RAM of a zero-shot evaluation on an ImageNet-shaped set, K = 32768")
    p.add_argument("--eval-templates", type=int, default=80, help="--eval-memory: the first M of the 80 templates")
    p.add_argument("--out", default=None, metavar="RESULTS.json",
                   help="also write every number printed (unrounded), with the machine and versions, to this file")
    return p.parse_args(argv)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, batch, steps, warmup, device):
    """samples/s of `step(batch)` over `steps` calls after `warmup` calls, and the peak GPU memory (GiB)."""
    for _ in range(warmup):
        step(batch)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return steps * len(batch[0]) / elapsed, peak


def random_tokens(batch_size, text_views, context_length, captions="cc3m", seed=0):
    """int64 [B, T, L] laid out as data.tokenize lays them out: random ids below 50000, EOT (the largest id, where
    OpenCLIP pools) after each caption, then padding. Caption lengths: `cc3m` draws them (CAPTION_MEAN), `full`
    gives every caption context_length - 1 tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50000, (batch_size, text_views, context_length), generator=g)  # [B, T, L]
    if captions == "full":
        lengths = torch.full((batch_size, text_views), context_length - 1)  # [B, T]
    else:
        sigma2 = math.log(1 + (CAPTION_SD / CAPTION_MEAN) ** 2)  # lognormal with this mean and sd
        normal = torch.randn(batch_size, text_views, generator=g)  # [B, T]
        lengths = (math.log(CAPTION_MEAN) - sigma2 / 2 + sigma2**0.5 * normal).exp().round().long()  # [B, T]
        lengths = lengths.clamp(1, context_length - 1)
    position = torch.arange(context_length)  # [L]
    tokens[position == lengths[..., None]] = data.EOT_TOKEN
    tokens[position > lengths[..., None]] = data.PAD_TOKEN
    return tokens


def random_batch(preset, batch_size, image_views=1, text_views=1, captions="cc3m"):
    """uint8 images [B, V, 3, H, W] and TOKEN_BATCHES full-context token batches [B, T, L], on the CPU."""
    g = torch.Generator().manual_seed(0)
    size = preset["image_size"]
    images = torch.randint(0, 256, (batch_size, image_views, 3, size, size), dtype=torch.uint8, generator=g)
    return images, [random_tokens(batch_size, text_views, preset["context_length"], captions, seed)
                    for seed in range(TOKEN_BATCHES)]


def ours(method, preset, batch_size, device, args):
    """Our train_step with the method file's own model, optimizer and scaler, on token batches cut after
    their last end-of-text token as the training loader cuts them. -> (..., the full-context token batches)"""
    module = importlib.import_module(method)
    flags = ["--model", preset, "--device", device.type] + (["--precision", args.precision] if args.precision else [])
    flags += (["--grad-checkpointing"] if args.grad_checkpointing else []) + (["--compile"] if args.compile else [])
    flags += ["--accum-steps", str(args.accum_steps)] + args.extra.split()
    train_args = module.parse_args(flags)
    batch_size *= train_args.accum_steps  # a step's samples
    precision, autocast = module.mixed_precision(train_args, device)
    raw_model, optimizer, scaler = module.build_training(train_args, device, precision)
    model = torch.compile(raw_model) if args.compile else raw_model
    image_views, text_views = module.train_views(train_args)
    images, tokens = random_batch(module.PRESETS[preset], batch_size, len(image_views), len(text_views), args.captions)
    batch = (images.to(device), [data.trim_tokens(t).to(device) for t in tokens])
    steps = itertools.count()

    def step(b):  # b: (images, token batches), one token batch after the other
        text = b[1][next(steps) % len(b[1])]
        module.train_step(model, raw_model, optimizer, scaler, b[0], text, train_args, autocast, precision)
    flops = statistics.mean(raw_model.flops_per_sample(t.shape[-1], recompute=train_args.accum_steps > 1)
                            for t in batch[1])
    return step, batch, flops, precision, module, train_args, tokens


def openclip(method_module, preset, batch_size, device, precision, args, tokens):
    """OpenCLIP's CLIP with the same sizes, trained as open_clip_train does: ClipLoss, AdamW (foreach),
    autocast, logit scale clamped after the step; on token batches [B, L] in turn, all L positions, as
    OpenCLIP's loader pads every caption to the context length."""
    import open_clip
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = method_module.PRESETS[preset]
    model = CLIP(cfg["embed_dim"],
                 CLIPVisionCfg(layers=cfg["vision_layers"], width=cfg["vision_width"],
                               head_width=cfg["vision_width"] // cfg["vision_heads"],
                               patch_size=cfg["patch_size"], image_size=cfg["image_size"]),
                 CLIPTextCfg(context_length=cfg["context_length"], vocab_size=data.VOCAB_SIZE, width=cfg["text_width"],
                             heads=cfg["text_heads"], layers=cfg["text_layers"]), output_dict=True).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
                                  lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else torch.autocast(device.type, enabled=False))
    loss_fn, compiled = ClipLoss(), torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, cfg["image_size"], cfg["image_size"], generator=g).to(device)
    batch = (images, [t.to(device) for t in tokens])
    steps = itertools.count()

    def step(b):
        with autocast:
            out = compiled(b[0], b[1][next(steps) % len(b[1])])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
    return step, batch, open_clip.__version__


def jpeg_shard(path, n=256, size=(320, 256)):
    """A tar shard of n JPEG photos-like images (synthetic shapes + noise) with captions."""
    source = data.SyntheticPairs("train", max(size))
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            image, caption, _ = source[i]
            image = image.resize(size).effect_spread(4)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            for name, payload in ((f"{i:06d}.jpg", buffer.getvalue()), (f"{i:06d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


RECIPES = {"CLIP view": [], "improved recipe": ["--recipe", "improved"], "--ssl simclr": ["--ssl", "simclr"]}


def decode_bench(device, rounds=3, batch_size=64, repeats=5):
    """Per recipe of clip.py (RECIPES, at 224 px): samples/s of one loader process reading, decoding and cropping
    JPEGs from a tar shard and drawing every view's random parameters (the CPU part of the views), in this
    process with one thread, as PyTorch runs a DataLoader worker; the recipes take turns, `rounds` times (median),
    so that drift of the machine hits all alike. And the milliseconds of augment.on_device (the device part:
    colour jitter, grayscale, blur, normalisation) on one batch of `batch_size` samples, median of `repeats`.
    -> [(recipe, image views, samples/s, ms per batch)]"""
    import clip  # the recipes are clip.py's

    data.get_encoding()  # loaded once per process, not counted
    views = {name: clip.train_views(clip.parse_args(["--model", "ViT-B/16", *flags]))  # 224 px
             for name, flags in RECIPES.items()}
    rates, batches, threads = {name: [] for name in RECIPES}, {}, torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "00000.tar")
        jpeg_shard(path)
        torch.set_num_threads(1)
        try:
            for _ in range(rounds):
                for name, (image_views, text_views) in views.items():
                    start, samples = time.perf_counter(), []
                    for sample in data.TarShards([path], image_views, text_views, epochs=1):
                        samples.append((sample[0], sample[2]))  # (images, params): a batch to time on_device with
                    rates[name].append(len(samples) / (time.perf_counter() - start))
                    batches[name] = samples[:batch_size]
        finally:
            torch.set_num_threads(threads)
    rows = []
    for name, samples in batches.items():
        images = torch.stack([s[0] for s in samples]).to(device)  # uint8 [B, V, 3, 224, 224]
        params = torch.stack([s[1] for s in samples])  # [B, V, P], on the CPU as the loader gives it
        times = []
        for _ in range(repeats + 1):  # the first call warms up, untimed
            synchronize(device)
            t = time.perf_counter()
            augment.on_device(images, params)
            synchronize(device)
            times.append(time.perf_counter() - t)
        rows.append((name, len(views[name][0]), statistics.median(rates[name]), 1000 * statistics.median(times[1:])))
    return rows


def loader_bench(workers, batch_size=64, batches=48):
    """Samples/s of the training loader alone (build_loader, CLIP view + caption), by worker count: the
    synthetic data at 32 px, and 224 px JPEGs from 4 tar shards written to a temporary folder."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(4):
            jpeg_shard(os.path.join(tmp, f"{i:05d}.tar"), n=batch_size * batches // 4 + batch_size)
        for name, spec, size in (("synthetic 32 px", "synthetic", 32),
                                 ("224 px JPEG tar shards", os.path.join(tmp, "{00000..00003}.tar"), 224)):
            views = [augment.CLIPView(size)], [augment.TextView(0.0)]
            for n in workers:
                loader = iter(data.build_loader(spec, batch_size, *views, workers=n, image_size=size))
                for _ in range(2 * n):  # workers started; their first batches, made in parallel, not counted
                    next(loader)
                start = time.perf_counter()
                for _ in range(batches - 2 * n):
                    next(loader)
                rows.append((name, n, (batches - 2 * n) * batch_size / (time.perf_counter() - start)))
                loader.close()  # its workers stop now, before the shards are deleted or the next loader forks
    return rows


def memory_mib(pid):
    """(RSS, PSS, USS) of a process in MiB, from /proc/PID/smaps_rollup (Linux). USS: its private pages."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        kib = {line.split(":")[0]: int(line.split()[1]) for line in f if line.rstrip().endswith("kB")}
    return kib["Rss"] / 1024, kib["Pss"] / 1024, (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024


class RowReader(torch.utils.data.Dataset):
    """Reads rows of a CsvPairs (path and caption), not their images: an epoch's accesses of the rows, fast."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return len(self.source.paths[index]) + len(self.source.captions[index])


def csv_memory(rows, workers=4, batch_size=128, batches=8):
    """Memory of the training loader's workers on a CSV of `rows` pairs (images: 64 small PNGs that the rows share):
    [(when, process, RSS, PSS, USS)] in MiB, for the main process and each worker, after `batches` batches per
    worker, then after `workers` workers have read every row once (RowReader) in a random order."""
    import multiprocessing

    out = []

    def measure(when):
        ours = [os.getpid()] + [p.pid for p in multiprocessing.active_children()]
        out.extend((when, "main" if pid == os.getpid() else f"worker {k}", *memory_mib(pid))
                   for k, pid in enumerate(ours, start=-1))

    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "img"))
        source = data.SyntheticPairs("train", 24)
        for i in range(64):
            source[i][0].save(os.path.join(tmp, "img", f"{i}.png"))
        with open(os.path.join(tmp, "pairs.csv"), "w") as f:
            f.write("filepath,caption\n")
            f.writelines(f"img/{i % 64}.png,{source[i % 512][1]} (pair {i})\n" for i in range(rows))
        loader = data.build_loader(os.path.join(tmp, "pairs.csv"), batch_size, [augment.CLIPView(24)],
                                   [augment.TextView()], workers=workers, image_size=24, context_length=32)
        batch_iter = iter(loader)
        for _ in range(batches * workers):
            next(batch_iter)
        measure(f"after {batches} batches of {batch_size} per worker")
        pairs = loader.dataloader.dataset.source
        loader.close()
        reader = torch.utils.data.DataLoader(RowReader(pairs), batch_size=4096, shuffle=True, num_workers=workers,
                                             collate_fn=sum, persistent_workers=True, generator=torch.Generator())
        for _ in reader:  # persistent workers: still alive after the epoch, holding what they touched
            pass
        measure("after every row was read once")
        del reader
    return out


def eval_memory(templates=80, prototypes=32768, classes=1000):
    """Peak resident memory (MiB) of evaluate_during_training on an ImageNet-shaped set (see the docstring).
    -> {"baseline_mib": peak once the model is built, "peak_mib": peak after the evaluation, "top1": ...}"""
    import resource
    from unittest import mock

    from PIL import Image

    import nclip

    peak_mib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    with tempfile.TemporaryDirectory() as root:
        for c in range(classes):
            os.makedirs(os.path.join(root, "val", f"n{c:08d}"))
            for i in range(1 + c % 2):
                Image.new("RGB", (8, 8), (c % 256, i * 80, 30)).save(os.path.join(root, "val", f"n{c:08d}", f"{i}.png"))
        args = nclip.parse_args(["--model", "tiny", "--prototypes", str(prototypes), "--eval-dataset", "imagenet",
                                 "--eval-data-dir", root, "--device", "cpu"])
        torch.manual_seed(0)
        model = nclip.build_model(args)
        cfg = nclip.PRESETS[args.model]
        classnames, all_templates = eval_zeroshot.load_prompts("imagenet")
        with mock.patch.object(eval_zeroshot, "load_prompts", lambda name: (classnames, all_templates[:templates])):
            eval_sets = eval_zeroshot.open_eval_sets(args, cfg["image_size"], cfg["context_length"])
        baseline = peak_mib()
        record = eval_zeroshot.evaluate_during_training(model, eval_sets, args, cfg["context_length"],
                                                        torch.device("cpu"), None)
        return {"images": len(eval_sets[0][0]), "classes": classes, "templates": templates, "prototypes": prototypes,
                "baseline_mib": baseline, "peak_mib": peak_mib(), "top1": record["zeroshot_imagenet_top1"],
                "eval_s": record["eval_s"]}


def main(args):
    if args.eval_memory:
        r = eval_memory(args.eval_templates)
        print(f"eval memory: nclip.py tiny, K = {r['prototypes']}, {r['images']} images, {r['classes']} classes x "
              f"{r['templates']} templates, one CPU process: peak RSS {r['peak_mib']:.0f} MiB, "
              f"{r['peak_mib'] - r['baseline_mib']:.0f} MiB over the {r['baseline_mib']:.0f} MiB once the model is "
              f"built (top-1 {r['top1']:.4f}, {r['eval_s']:.1f} s)")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(r, f, indent=1)
        return r
    if args.csv_memory:
        rows = csv_memory(args.csv_memory)
        print(f"csv memory: {args.csv_memory} rows, build_loader with 4 workers; MiB per process")
        for when, process, rss, pss, uss in rows:
            print(f"{when:<45} {process:<9} RSS {rss:8.1f}  PSS {pss:8.1f}  USS {uss:8.1f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"csv_rows": args.csv_memory, "memory_mib": rows}, f, indent=1)
        return rows
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    presets = args.model or ["tiny", "ViT-B/32"]
    results = {"method": args.method, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "steps": args.steps, "repeats": args.repeats, "captions": args.captions, "compile": args.compile,
               "extra": args.extra, "rows": []}
    print(f"bench: {args.method}.py on {results['device']} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, {args.steps} steps x {args.repeats}, {args.captions} caption lengths"
          + (f", {args.accum_steps} micro-batches of `batch` per step" if args.accum_steps > 1 else ""))
    print(f"{'model':<10}{'batch':>6}{'precision':>10}{'tokens':>7}{'ours/s':>10}{'MFU':>7}{'mem GiB':>9}"
          f"{'openclip/s':>12}{'mem GiB':>9}{'ratio':>7}")
    ratios = []
    for preset in presets:
        for batch_size in args.batch_size or [256 if preset == "tiny" else 16]:
            step, batch, flops, precision, module, train_args, tokens = ours(args.method, preset, batch_size, device,
                                                                             args)
            other = (openclip(module, preset, batch_size * args.accum_steps, device, precision, args,
                              [t[:, 0] for t in tokens])
                     if args.compare_openclip else None)
            mine, theirs, mem, their_mem = [], [], None, None
            for _ in range(args.repeats):  # alternate, so that drift of the machine hits both alike
                rate, mem = measure(step, batch, args.steps, args.warmup, device)
                mine.append(rate)
                if other:
                    rate, their_mem = measure(other[0], other[1], args.steps, args.warmup, device)
                    theirs.append(rate)
            peak = eval_zeroshot.gpu_peak_tflops(device, precision)
            mfu = flops * statistics.median(mine) / (peak * 1e12) if peak else None
            length = statistics.mean(t.shape[-1] for t in batch[1])  # text positions run, mean over the batches
            record = {"model": preset, "batch_size": batch_size, "accum_steps": args.accum_steps,
                      "precision": precision, "text_length": length,
                      "samples_per_s": statistics.median(mine), "mfu": mfu, "peak_mem_gib": mem,
                      "samples_per_s_each": mine}
            row = (f"{preset:<10}{batch_size:>6}{precision:>10}{length:>7.1f}{statistics.median(mine):>10.1f}"
                   f"{f'{mfu:.1%}' if mfu is not None else '-':>7}{f'{mem:.2f}' if mem is not None else '-':>9}")
            if other:
                ratio = statistics.median(a / b for a, b in zip(mine, theirs))  # per repeat, then the median
                ratios.append(ratio)
                record.update(openclip_samples_per_s=statistics.median(theirs), openclip_peak_mem_gib=their_mem,
                              openclip_samples_per_s_each=theirs, ratio=ratio, openclip_version=other[2])
                row += (f"{statistics.median(theirs):>12.1f}"
                        f"{f'{their_mem:.2f}' if their_mem is not None else '-':>9}{ratio:>7.2f}")
            results["rows"].append(record)
            print(row, flush=True)
            del step, batch, other, tokens
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.loader:
        preset = presets[0]
        module = importlib.import_module(args.method)
        train_args = module.parse_args(["--model", preset])
        batch_size = (args.batch_size or [256 if preset == "tiny" else 16])[0]
        precision, autocast = module.mixed_precision(train_args, device)
        raw_model, optimizer, scaler = module.build_training(train_args, device, precision)
        loader = iter(data.build_loader("synthetic", batch_size, *module.train_views(train_args),
                                        workers=max(0, (os.cpu_count() or 1) - 1),
                                        context_length=module.PRESETS[preset]["context_length"],
                                        image_size=module.PRESETS[preset]["image_size"],
                                        pin_memory=device.type == "cuda"))
        waited, start = 0.0, None
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                synchronize(device)
                start, waited = time.perf_counter(), 0.0
            t = time.perf_counter()
            images, tokens, params = next(loader)
            images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
            images = augment.on_device(images, params)  # as the training loop does
            waited += time.perf_counter() - t
            module.train_step(raw_model, raw_model, optimizer, scaler, images, tokens, train_args, autocast, precision)
        synchronize(device)
        elapsed = time.perf_counter() - start
        loader.close()  # workers stopped before other loaders fork (a forked copy of a live loader complains at exit)
        print(f"with the real loader ({preset}, synthetic data, batch {batch_size}): "
              f"{args.steps * batch_size / elapsed:.1f} samples/s, "
              f"data time {waited / args.steps * 1000:.1f} ms/step ({waited / elapsed:.0%} of the step)")
        results["real_loader"] = {"model": preset, "batch_size": batch_size,
                                  "samples_per_s": args.steps * batch_size / elapsed,
                                  "data_time_ms_per_step": waited / args.steps * 1000}
        results["decode_augment"] = []
        for name, views, rate, ms in decode_bench(device):
            print(f"decode + augment, 224 px JPEG from a tar shard, one process: {rate:.0f} samples/s ({name}, "
                  f"{views} image view{'s' if views > 1 else ''}); on the device {ms:.1f} ms per batch of 64 "
                  f"({device.type})")
            results["decode_augment"].append({"recipe": name, "image_views": views, "cpu_samples_per_s": rate,
                                              "device_ms_per_batch_64": ms})
        base = results["decode_augment"][0]["cpu_samples_per_s"]
        print("one loader process, samples/s relative to the CLIP view: " +
              ", ".join(f"{r['recipe']} {r['cpu_samples_per_s'] / base:.2f}x" for r in results["decode_augment"]))
        results["loader_alone"] = []
        for name, workers, rate in loader_bench([1, 2]):
            print(f"loader alone, {name}, CLIP view, {workers} worker{'s' if workers > 1 else ''}: "
                  f"{rate:.0f} samples/s")
            results["loader_alone"].append({"data": name, "workers": workers, "samples_per_s": rate})
    if ratios:
        results["ratio"] = statistics.median(ratios)
        print(f"ratio ours/openclip: {results['ratio']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main(parse_args())
