"""Every method and option as (method file, flags), and a few deterministic steps of each: the cases of the
mixed-precision, torch.compile and gradient-caching tests."""

import contextlib
import importlib

import torch

import data

CASES = ([("clip", []), ("clip", ["--recipe", "improved"])]
         + [("clip", ["--ssl", s]) for s in ("simclr", "simsiam", "byol", "barlow", "vicreg", "swav")]
         + [("clip", ["--recipe", "improved", "--ssl", "swalip"]), ("nclip", []), ("xclip", [])])
IDS = [" ".join([name] + flags) for name, flags in CASES]


@contextlib.contextmanager
def one_layer_towers(module):
    """Within it, the tiny preset has one block per tower: what compiles is the same code, in a fraction of the
    time. The preset is restored after, so later tests (and the checkpoints they write) see the real one."""
    tiny = module.PRESETS["tiny"]
    module.PRESETS["tiny"] = dict(tiny, vision_layers=1, text_layers=1)
    try:
        yield
    finally:
        module.PRESETS["tiny"] = tiny


def make_batch(args, module, step, batch_size, rank=0, world_size=1):
    """The global batch of `step` (random images, captions of mixed lengths), this rank's rows of it."""
    image_views, text_views = module.train_views(args)
    g = torch.Generator().manual_seed(step)
    size = module.PRESETS[args.model]["image_size"]
    images = torch.randint(0, 256, (batch_size, len(image_views), 3, size, size), dtype=torch.uint8, generator=g)
    words = torch.randint(0, 50, (batch_size * len(text_views), 9), generator=g).tolist()
    captions = [" ".join(f"w{w}" for w in row[: 2 + i % 8]) for i, row in enumerate(words)]
    context = module.PRESETS[args.model]["context_length"]
    tokens = data.tokenize(captions, context).view(batch_size, len(text_views), context)  # [B, T, L]
    rows = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
    return images[rows], data.trim_tokens(tokens[rows])


def train_steps(name, flags, steps=3, batch_size=8, precision="fp32", compile_backend=None, rank=0, world_size=1,
                device="cpu", ddp=None):
    """`steps` optimizer steps of train_step from the same initial weights -> (losses, final parameters).
    Under DDP (world_size > 1, or ddp=True; a process group already joined) each rank takes its rows of the
    global batch."""
    module = importlib.import_module(name)
    args = module.parse_args(flags + ["--batch-size", str(batch_size // world_size), "--precision", precision,
                                      "--warmup", "1"] + (["--compile"] if compile_backend else []))
    device = torch.device(device)
    torch.manual_seed(args.seed)
    raw_model, optimizer, scaler = module.build_training(args, device, precision)
    torch.manual_seed(args.seed + rank)
    _, autocast = module.mixed_precision(args, device)
    if ddp or (ddp is None and world_size > 1 and args.accum_steps == 1):  # gradient caching all-reduces itself
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(raw_model, device_ids=device_ids)
    else:
        model = raw_model
    if compile_backend:
        model = torch.compile(model, backend=compile_backend)
    losses = []
    for step in range(steps):
        images, tokens = (x.to(device) for x in make_batch(args, module, step, batch_size, rank, world_size))
        for group in optimizer.param_groups:
            group["lr"] = args.lr
        loss, _, applied = module.train_step(model, raw_model, optimizer, scaler, images, tokens, args, autocast,
                                             precision)
        assert applied
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in raw_model.state_dict().items() if torch.is_tensor(v)}
