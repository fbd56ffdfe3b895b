"""Mixed precision on the CPU (bf16 autocast, fp16 with its loss scale) for every method and option, what must
stay fp32 under autocast, and the precision and MFU peak chosen for a GPU by its name and compute capability."""

import collections
import importlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import clip
import eval_zeroshot
from cases import CASES, IDS, make_batch, one_layer_towers, train_steps
from distributed import run_distributed

# bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 0.4%). On the first step (the same weights) the
# loss differs from fp32's by the rounding of the towers' activations: measured at most 0.6% (--ssl simclr),
# so 2% is the bound. Later steps also carry the weights' drift at lr 5e-4 (measured up to 4.5%): 10%.
FIRST_STEP_REL, LATER_REL = 0.02, 0.10


def assert_close_to_fp32(fp32, bf16, case=""):
    assert all(math.isfinite(x) for x in bf16), (case, bf16)
    assert bf16[0] == pytest.approx(fp32[0], rel=FIRST_STEP_REL), case
    assert bf16 == pytest.approx(fp32, rel=LATER_REL), case


@pytest.mark.parametrize("name,flags", CASES, ids=IDS)
def test_bf16_trains_close_to_fp32(name, flags):
    fp32, _ = train_steps(name, flags, precision="fp32")
    bf16, _ = train_steps(name, flags, precision="bf16")
    assert_close_to_fp32(fp32, bf16)


def every_case_in_both_precisions(rank, world_size):
    results = {}
    for n, f in CASES:
        with one_layer_towers(importlib.import_module(n)):
            results[" ".join([n] + f)] = tuple(train_steps(n, f, steps=2, precision=p, rank=rank,
                                                           world_size=world_size)[0] for p in ("fp32", "bf16"))
    return results


def test_bf16_trains_close_to_fp32_on_two_processes():
    """DDP over 2 gloo processes, each on half of the batch: the same bounds, on every rank. One block per tower
    (what DDP adds, the all-reduces of gradients and statistics, is in the heads and the losses; the towers' depth
    is tested in one process above)."""
    for results in run_distributed(every_case_in_both_precisions, 2):
        for case, (fp32, bf16) in results.items():
            assert_close_to_fp32(fp32, bf16, case)


class LowPrecisionOps(TorchDispatchMode):
    """Counts the operators that produce a bf16/fp16 tensor, other than views, copies and gathers."""
    MOVES = ("select", "slice", "view", "unbind", "t.default", "transpose", "expand", "alias", "detach", "clone",
             "_to_copy", "cat", "stack", "split", "unsqueeze", "squeeze", "permute", "all_gather")

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            low = isinstance(o, torch.Tensor) and o.dtype in (torch.bfloat16, torch.float16)
            if low and not any(m in str(func) for m in self.MOVES):
                self.ops[str(func)] += 1
        return out


@pytest.mark.parametrize("name,flags", CASES, ids=IDS)
def test_what_must_be_fp32_is_fp32_under_bf16_autocast(name, flags):
    """The towers run in bf16; the losses (softmax, cross-entropy, Sinkhorn, the SSL terms), BatchNorm's
    statistics and the prototype scores run in fp32, as the method docstrings say."""
    module = importlib.import_module(name)
    args = module.parse_args(flags + ["--precision", "bf16"])
    torch.manual_seed(0)
    model = module.build_model(args)
    images, tokens = make_batch(args, module, 0, 8)
    batchnorm_outputs = []
    for m in model.modules():
        if type(m).__name__ == "BatchNorm":
            m.register_forward_hook(lambda m, i, o: batchnorm_outputs.append((o.dtype, m.pending_running_var.dtype)))
    _, autocast = module.mixed_precision(args, torch.device("cpu"))
    with autocast:
        out = model(images, tokens)
    assert out.get("image", out.get("image_scores")).dtype in (torch.bfloat16, torch.float32)
    assert all(dtypes == (torch.float32, torch.float32) for dtypes in batchnorm_outputs)
    assert len(batchnorm_outputs) > 0 or not any(s in flags for s in ("simsiam", "byol", "barlow", "improved"))
    for key in ("image_scores", "text_scores") + (("ssl_image", "ssl_text") if "swav" in flags else ()):
        if key in out:
            assert out[key].dtype == torch.float32, key  # prototype scores
    recorder = LowPrecisionOps()
    with recorder:
        loss, logs = module.compute_loss(out, args)
    assert recorder.ops == {} and loss.dtype == torch.float32


def test_fp16_loss_scale_skips_a_non_finite_step_and_backs_off(monkeypatch):
    """fp16 on the CPU (autocast float16, GradScaler starting at 2^16, fused AdamW): a step whose gradient is inf
    is skipped (weights, Adam state and step count untouched) and the scale halves; the next step applies."""
    args = clip.parse_args(["--precision", "fp16", "--batch-size", "8", "--warmup", "1"])
    device = torch.device("cpu")
    torch.manual_seed(0)
    raw_model, optimizer, scaler = clip.build_training(args, device, "fp16")
    precision, autocast = clip.mixed_precision(args, device)
    assert precision == "fp16" and optimizer.defaults["fused"] and scaler.get_scale() == 2.0**16
    images, tokens = make_batch(args, clip, 0, 8)
    weight = raw_model.text_projection.weight
    hook = weight.register_hook(lambda g: torch.full_like(g, float("inf")))  # an overflow in one gradient
    before = {k: v.clone() for k, v in raw_model.state_dict().items()}
    loss, _, applied = clip.train_step(raw_model, raw_model, optimizer, scaler, images, tokens, args, autocast,
                                       precision)
    assert not applied and math.isfinite(loss.item()) and scaler.get_scale() == 2.0**15
    assert all(torch.equal(before[k], v) for k, v in raw_model.state_dict().items())
    assert all(len(s) == 0 or s["step"].item() == 0 for s in optimizer.state.values())
    hook.remove()
    _, _, applied = clip.train_step(raw_model, raw_model, optimizer, scaler, images, tokens, args, autocast,
                                    precision)
    assert applied and scaler.get_scale() == 2.0**15 and not torch.equal(before["text_projection.weight"], weight)


# --- a GPU's precision and peak, from its name and compute capability (no GPU needed) -----------------------

@pytest.mark.parametrize("gpu,capability,precision,peak_16,peak_32", [
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16", 989, 494.5), ("NVIDIA H100 PCIe", (9, 0), "bf16", 756, 378),
    ("NVIDIA H100 NVL", (9, 0), "bf16", 835, 417.5), ("NVIDIA H200", (9, 0), "bf16", 989, 494.5),
    ("NVIDIA H200 NVL", (9, 0), "bf16", 835, 417.5), ("NVIDIA GH200 480GB", (9, 0), "bf16", 989, 494.5),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16", 312, 156), ("NVIDIA A100 80GB PCIe", (8, 0), "bf16", 312, 156),
    ("NVIDIA A10G", (8, 6), "bf16", 70, 35), ("NVIDIA L40S", (8, 9), "bf16", 362, 183),
    ("NVIDIA L40", (8, 9), "bf16", 181, 90.5), ("NVIDIA L4", (8, 9), "bf16", 121, 60),
    ("Tesla V100-SXM2-32GB", (7, 0), "fp16", 125, 15.7), ("Tesla T4", (7, 5), "fp16", 65, 8.1),
    ("Some Future GPU", (10, 0), "bf16", None, None)])
@pytest.mark.parametrize("method", ["clip", "nclip", "xclip"])
@pytest.mark.filterwarnings("ignore:CUDA is not available")  # torch.autocast("cuda") made on a CPU-only machine
def test_precision_and_mfu_peak_follow_the_exact_gpu(method, gpu, capability, precision, peak_16, peak_32,
                                                     monkeypatch, capsys):
    module = importlib.import_module(method)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # says yes on V100 and T4 too
    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    chosen, autocast = module.mixed_precision(module.parse_args([]), cuda)
    assert chosen == precision == eval_zeroshot.default_precision(cuda)
    assert autocast.fast_dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
    peak = eval_zeroshot.gpu_peak_tflops  # the table of GPU peaks lives with the precision rule in eval_zeroshot.py
    assert peak(cuda, precision) == peak_16 and peak(cuda, "fp32") == peak_32
    module.mixed_precision(module.parse_args(["--precision", "bf16"]), cuda)  # asked for: used, with a note
    assert ("no bf16 tensor cores" in capsys.readouterr().out) == (capability < (8, 0))
    assert peak(torch.device("cpu"), "bf16") is None
    assert module.mixed_precision(module.parse_args([]), torch.device("cpu"))[0] == "fp32"
