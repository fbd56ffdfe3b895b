"""The text tower runs only up to the batch's last end-of-text token (data.trim_tokens): the features and
gradients of the full context, on every text path (loader, weak and strong captions, evaluation prompts,
retrieval captions), with FLOPs counted at the length run."""

import csv
import json
import os

import pytest
import torch

import clip
import data
import eval_zeroshot as ez
import nclip
import xclip

L = clip.PRESETS["tiny"]["context_length"]  # 20


def captions(lengths, seed=0):
    """Tokens [..., L] as data.tokenize lays them out: `lengths` [...] random ids, EOT, then padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50000, (*lengths.shape, L), generator=g)  # [..., L]
    position = torch.arange(L)  # [L]
    tokens[position == lengths[..., None]] = data.EOT_TOKEN
    tokens[position > lengths[..., None]] = data.PAD_TOKEN
    return tokens


def assert_same(got, want):
    """fp32 CPU: equal up to rounding. The cut batch runs matmuls of other shapes, whose sums go in another
    order: measured differences are about 1e-6 of each tensor's largest value; a caption that lost its EOT
    changes its features by O(1)."""
    assert got.keys() == want.keys()
    for k in want:
        difference, largest = (got[k] - want[k]).abs().max().item(), want[k].abs().max().item()
        assert difference <= 1e-5 * largest, f"{k}: differs by {difference:.3g}, largest value {largest:.3g}"


def test_cut_batches_give_the_features_and_gradients_of_the_full_context():
    torch.manual_seed(0)
    model = clip.CLIP("tiny", strong_views=2)  # tokens [B, 1 + 2, L]: the weak and two strong captions
    images = torch.randint(0, 256, (4, 3, 3, 32, 32), dtype=torch.uint8)
    lengths = torch.tensor([[2, 5, 0], [7, 3, 4], [11, 1, 6], [9, 8, 13]])  # the last EOT is at position 13
    weights = torch.randn(4, 3, 64)

    def run(tokens):  # -> the text features of every view and the gradients of a loss on them
        model.zero_grad()
        out = model(images, tokens)
        features = torch.cat([out["text"][:, None], out["strong_text"]], 1)  # [B, 3, D]
        (weights * features).sum().backward()
        return {"features": features.detach(),
                **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}

    full = captions(lengths)
    cut = data.trim_tokens(full)
    assert cut.shape == (4, 3, 16) and torch.equal(cut, full[..., :16])  # 14 positions, rounded up to 8 x 2
    assert_same(run(full[..., :14]), run(full))  # the exact cut too
    assert_same(run(cut), run(full))

    # A caption that fills the whole context: a batch holding it is not cut; any other caption, encoded in a
    # batch cut to its own length, gets the features it has in the full batch.
    lengths[1, 2] = L - 1
    full = captions(lengths).flatten(0, 1)  # [12, L]
    with torch.no_grad():
        want = model.text(full)  # [12, C]
        assert data.trim_tokens(full).shape == (12, L)
        for i in range(len(full)):
            cut = data.trim_tokens(full[i : i + 1], multiple=1)  # [1, length + 1]
            assert cut.shape[-1] == lengths.flatten()[i] + 1
            assert data.trim_tokens(full[i : i + 1]).shape[-1] == min(L, -(-cut.shape[-1] // 8) * 8)
            assert_same({"features": model.text(cut)}, {"features": want[i : i + 1]})


@pytest.mark.parametrize("module", [clip, nclip, xclip])
def test_flops_count_the_text_length_run(module):
    model = module.build_model(module.parse_args(["--model", "tiny"]))
    text = model.text
    per_length = {n: model.flops_per_sample(text_length=n) for n in (8, 16, L)}
    assert per_length[L] == model.flops_per_sample()
    # training = 3 forwards of each text view (clip: and of the projection, which does not depend on the length)
    assert per_length[L] - per_length[8] == 3 * (text.flops(L) - text.flops(8))
    assert text.flops(16) == 4 * (24 * 16 * 64**2 + 4 * 16**2 * 64)  # 4 blocks of width 64 on 16 tokens


def test_every_text_path_runs_the_cut_length(tmp_path, monkeypatch):
    """A one-step run (loader worker, in-training evaluation), then the evaluation CLI with retrieval: the
    text tower never sees the padded context; the log's MFU counts the length run. (Strong captions go
    through the same collate: test above for the model on them.)"""
    lengths, forward = [], clip.TextTower.forward
    monkeypatch.setattr(clip.TextTower, "forward", lambda self, tokens, dropout=0.0:
                        lengths.append(tokens.shape[-1]) or forward(self, tokens, dropout))
    run = str(tmp_path / "run")
    clip.main(clip.parse_args(["--steps", "1", "--batch-size", "8", "--workers", "1", "--eval-samples", "16",
                               "--peak-tflops", "1", "--out-dir", run, "--log-every", "1"]))
    with open(os.path.join(run, "log.jsonl")) as f:
        record = json.loads(f.readline())
    assert lengths[0] < L  # the training step
    flops = clip.build_model(clip.parse_args([])).flops_per_sample(text_length=lengths[0])
    assert record["mfu"] * 1e12 / record["samples_per_s_per_gpu"] == pytest.approx(flops, rel=1e-9)

    rows = [("filepath", "caption")]
    for i in range(3):
        image, caption, _ = data.SyntheticPairs("val", 32)[i]
        image.save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", caption))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    evaluated = len(lengths)
    ez.main(["--checkpoint", os.path.join(run, "ckpt.pt"), "--eval-samples", "8", "--retrieval",
             str(tmp_path / "pairs.csv"), "--workers", "0", "--device", "cpu"])
    assert len(lengths) > evaluated  # prompts and retrieval captions of the CLI; before: in-training prompts
    assert all(n < L for n in lengths[1:]), lengths
