"""augment.on_device: each photometric op against torchvision's per-image functions on the same parameters (and
against Pillow, the previous pipeline), the ops in each image's drawn order, the params' path from (seed,
sample) through the loader to the training step, and the reduced-size JPEG decoding."""

import io
import random

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

import augment
import clip
import data

P = len(augment.IDENTITY)


def smooth_images(n, size=24, seed=0):
    """uint8 [n, 3, size, size]: random colours, smoothly varying (as photos are; noise would exaggerate 8-bit
    rounding), plus a gray and a saturated image to hit the hue formula's edge cases."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=(size, size), mode="bilinear", align_corners=True)
    x[0], x[1] = x[0].mean(0), 0  # gray (no hue), black
    x[1, 0] = 1.0  # pure red: v = r, ties of max/min channels
    return (x * 255).round().to(torch.uint8)


def per_image(fn, x, factors):
    """torchvision's function image by image, each with its own factor."""
    return torch.stack([fn(x[i], float(factors[i])) for i in range(len(x))])


# Tolerances against torchvision on float images (fp32, [0, 1]):
#   brightness: same formula, exact up to fp32 rounding;
#   contrast, saturation, grayscale: our luma weights are Pillow's ITU-R 601-2 (0.299, 0.587, 0.114), torchvision
#       uses 0.2989 for red, so Y differs by at most 1e-4 * R;
#   hue: both go through HSV in fp32 with different formulas: fp32 rounding, about 1e-6;
#   blur: the same sampled Gaussian and mirrored padding, separable here, a 2-D kernel in torchvision.
@pytest.mark.parametrize("op, reference, low, high, atol", [
    (augment.brightness, TF.adjust_brightness, 0.6, 1.4, 1e-6),
    (augment.contrast, TF.adjust_contrast, 0.6, 1.4, 2e-4),
    (augment.saturation, TF.adjust_saturation, 0.6, 1.4, 2e-4),
    (augment.hue, TF.adjust_hue, -0.1, 0.1, 1e-5),
])
def test_each_jitter_op_matches_torchvision_per_image(op, reference, low, high, atol):
    x = smooth_images(8).float() / 255
    factors = torch.linspace(low, high, 8)
    assert torch.allclose(op(x.clone(), factors), per_image(reference, x, factors), atol=atol, rtol=0)


def test_grayscale_and_blur_match_torchvision():
    x = smooth_images(6).float() / 255
    assert torch.allclose(augment.luma(x), TF.rgb_to_grayscale(x), atol=2e-4, rtol=0)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.3])
    radius = 6  # 3 sigma of the largest sigma: what on_device takes
    reference = torch.stack([TF.gaussian_blur(x[i], 2 * radius + 1, float(sigma[i])) for i in range(6)])
    assert torch.allclose(augment.gaussian_blur(x, sigma, radius), reference, atol=1e-5, rtol=0)


# Against Pillow on uint8 images (the previous pipeline, through torchvision's PIL path), in grey levels:
#   brightness, contrast, saturation: Pillow rounds its result to uint8 (and contrast its mean, saturation its
#       grayscale) -> about 1 level;
#   hue: Pillow converts to 8-bit HSV and back, and torchvision's PIL path truncates the shift to whole steps of
#       1/255 turn: one step moves a saturated channel by about 6 levels (measured: at most 13, 0.6 on average).
@pytest.mark.parametrize("op, reference, low, high, max_levels, mean_levels", [
    (augment.brightness, TF.adjust_brightness, 0.6, 1.4, 1.0, 0.6),
    (augment.contrast, TF.adjust_contrast, 0.6, 1.4, 1.5, 0.6),
    (augment.saturation, TF.adjust_saturation, 0.6, 1.4, 1.5, 0.6),
    (augment.hue, TF.adjust_hue, -0.1, 0.1, 16.0, 1.0),
])
def test_each_jitter_op_is_close_to_pillow(op, reference, low, high, max_levels, mean_levels):
    x8 = smooth_images(8)
    factors = torch.linspace(low, high, 8)
    ours = op(x8.float() / 255, factors) * 255  # [8, 3, H, W], grey levels
    pil = torch.stack([TF.pil_to_tensor(reference(TF.to_pil_image(x8[i]), float(factors[i]))) for i in range(8)])
    error = (ours - pil.float()).abs()
    assert error.max() <= max_levels and error.mean() <= mean_levels


def reference_view(x, p):
    """One image, uint8 [3, H, W], with its params [P], by torchvision's functions one after the other."""
    y = x.float() / 255
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(4):
        op = int(p[augment.ORDER + k])
        if p[op] != augment.IDENTITY[op]:
            y = ops[op](y, float(p[op]))
    if p[augment.GRAY]:
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    if p[augment.SIGMA]:
        y = TF.gaussian_blur(y, 2 * 6 + 1, float(p[augment.SIGMA]))  # radius 3 * max sigma (2) of the batch
    if p[augment.FLIP]:
        y = TF.hflip(y)
    return TF.normalize(y, augment.MEAN, augment.STD)


def test_on_device_applies_each_images_ops_in_its_own_order():
    """A batch [B=3, V=2] with identity views, each op alone, different orders, grayscale, blur, flip: on_device
    equals the per-image reference; identity views are exactly augment.normalize (the CLIP view's path)."""
    x = smooth_images(6).view(3, 2, 3, 24, 24)
    rows = [list(augment.IDENTITY) for _ in range(6)]
    rows[1][:4] = [1.3, 0.7, 1.2, 0.08]  # all four, in the identity order
    rows[2][:4], rows[2][4:8] = [0.8, 1.3, 0.6, -0.05], [3, 2, 1, 0]  # all four, reversed
    rows[3][:4], rows[3][4:8], rows[3][augment.GRAY] = [1.2, 1.0, 1.4, 0.0], [2, 0, 3, 1], 1.0
    rows[4][augment.SIGMA], rows[4][augment.FLIP] = 2.0, 1.0
    rows[5][:4], rows[5][4:8], rows[5][augment.SIGMA] = [1.0, 0.6, 1.0, 0.1], [1, 3, 0, 2], 0.7
    params = torch.tensor(rows).view(3, 2, P)
    out = augment.on_device(x, params)
    assert out.shape == (3, 2, 3, 24, 24) and out.dtype == torch.float32
    flat_x, flat_out = x.view(6, 3, 24, 24), out.view(6, 3, 24, 24)
    assert torch.equal(flat_out[0], augment.normalize(flat_x[0]))
    for i in range(6):  # 1e-4 in [0, 1] (the luma weights) is about 4e-4 after dividing by the std
        assert torch.allclose(flat_out[i], reference_view(flat_x[i], params.view(6, P)[i]), atol=5e-4, rtol=0), i
    # The order matters: the same factors in another order give another image.
    other = params.clone()
    other.view(6, P)[2, 4:8] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert not torch.allclose(augment.on_device(x, other).view(6, 3, 24, 24)[2], flat_out[2], atol=1e-3)


def test_on_device_runs_in_fp32_under_autocast():
    x, params = smooth_images(2).view(2, 1, 3, 24, 24), torch.tensor([augment.IDENTITY] * 2).view(2, 1, P)
    params[1, 0, augment.SIGMA] = 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = augment.on_device(x, params)
    assert out.dtype == torch.float32 and torch.equal(out, augment.on_device(x, params))


def improved_views():
    return clip.train_views(clip.parse_args(["--recipe", "improved"]))  # tiny preset: 32 px


def test_params_come_from_seed_and_sample_whatever_the_workers():
    """Images and params of a batch are those of the samples' (seed, epoch, index), with 0 or 2 workers."""
    image_views, text_views = improved_views()
    batches = []
    for workers in (0, 2):
        loader = data.build_loader("synthetic", 8, image_views, text_views, workers=workers, seed=3, context_length=20,
                                   image_size=32, start_step=2)
        it = iter(loader)
        batches.append([next(it) for _ in range(2)])
        del it, loader
    for (i0, t0, p0), (i2, t2, p2) in zip(*batches):
        assert p0.shape == (8, 3, P) and p0.dtype == torch.float32
        assert torch.equal(i0, i2) and torch.equal(t0, t2) and torch.equal(p0, p2)
    # the same params as the sample's own views, drawn here from (seed, epoch, index)
    sampler = data.EpochBatches(len(data.SyntheticPairs("train", 32)), 8, seed=3, start_step=2)
    keys = next(iter(sampler))
    dataset = data.PairDataset(data.SyntheticPairs("train", 32, seed=3), image_views, text_views, 20, seed=3)
    for row, key in enumerate(keys):
        images, _, params, *_ = dataset[key]
        assert torch.equal(images, batches[0][0][0][row]) and torch.equal(params, batches[0][0][2][row])
    p = batches[0][0][2]
    assert torch.equal(p[:, 0], torch.tensor(augment.IDENTITY).expand(8, P))  # the weak view: no photometric op
    assert (p[:, 1:, augment.BRIGHTNESS] != 1).any() and (p[:, 1:, augment.SIGMA] > 0).any()


def test_the_training_loop_applies_the_params_of_its_batch(tmp_path, monkeypatch):
    """A CSV of constant-colour images, the improved recipe, one step: train_step gets on_device's output of the
    loader's batch; a strong view with grayscale drawn comes out gray, the weak view keeps its colour."""
    (tmp_path / "img").mkdir()
    rows = ["filepath,caption"]
    for i in range(16):
        Image.new("RGB", (40, 36), (200, 60 + 4 * i, 30)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,an orange picture number {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    seen = {}
    real_on_device, real_train_step = augment.on_device, clip.train_step

    def on_device(images, params):
        seen["params"], seen["out"] = params.clone(), real_on_device(images, params)
        return seen["out"]

    def train_step(model, raw_model, optimizer, scaler, images, *rest):
        seen.setdefault("images", images)
        return real_train_step(model, raw_model, optimizer, scaler, images, *rest)

    monkeypatch.setattr(augment, "on_device", on_device)
    monkeypatch.setattr(clip, "train_step", train_step)
    clip.main(clip.parse_args(["--recipe", "improved", "--data", str(tmp_path / "pairs.csv"), "--steps", "1",
                               "--batch-size", "16", "--workers", "0", "--seed", "1", "--eval-dataset", "none",
                               "--out-dir", str(tmp_path / "run")]))
    images, params = seen["images"], seen["params"]
    assert images is seen["out"] and images.dtype == torch.float32 and images.shape == (16, 3, 3, 32, 32)
    rgb = images * torch.tensor(augment.STD).view(3, 1, 1) + torch.tensor(augment.MEAN).view(3, 1, 1)  # [0, 1]
    gray = params[..., augment.GRAY] > 0  # [16, 3]
    assert gray[:, 1:].any() and not gray[:, 0].any()
    spread = rgb.amax(2) - rgb.amin(2)  # [16, 3, 32, 32]: 0 where R = G = B
    assert spread[gray].max() < 1e-5
    assert spread[:, 0].min() > 0.3  # the weak view: the orange is untouched


def jpeg(width, height):
    x = torch.linspace(0, 255, width).to(torch.uint8).expand(height, width)
    buffer = io.BytesIO()
    Image.fromarray(torch.stack([x, x.flip(1), x // 2], -1).numpy()).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_large_jpegs_are_decoded_smaller_only_as_far_as_every_crop_keeps_its_resolution():
    big = jpeg(1600, 1200)
    small_views = [augment.CLIPView(32, (0.5, 1)), augment.StrongView(32)]
    side = augment.draft_side(small_views)  # 32 / sqrt(3/4 * 0.08) = 131 px
    image = data.load_image(io.BytesIO(big), side)
    assert image.size == (200, 150) and image.mode == "RGB"  # 1/8: sqrt(200 * 150) = 173 >= 131; 1/16 is not offered
    smallest = min(min(b[2] - b[0], b[3] - b[1]) for b in
                   (augment.resized_crop_box(200, 150, random.Random(s), (0.08, 1)) for s in range(2000)))
    assert smallest >= 32  # every crop is shrunk to 32 px or kept, never enlarged
    assert data.load_image(io.BytesIO(big), augment.draft_side([augment.StrongView(224)])).size == (1600, 1200)
    assert data.load_image(io.BytesIO(big), augment.draft_side([augment.CLIPView(224)])).size == (400, 300)
    assert data.load_image(io.BytesIO(big)).size == (1600, 1200)  # no views given: full size
