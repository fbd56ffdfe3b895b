"""Gradient caching (--accum-steps K): K micro-batches of b give the gradient, the losses and the weights of one
step on K x b, for every method and option, in one process and on 2 gloo processes; the text dropout of the
towers is replayed exactly; through main(), the data, logs and a resume follow the K x b batch."""

import importlib
import json
import os
from contextlib import nullcontext

import pytest
import torch

from cases import CASES, IDS, make_batch, one_layer_towers, train_steps
from distributed import run_distributed

NO_DROPOUT = ["--text-dropout", "0"]  # K x b and 2b draw different dropout masks; test_dropout_is_replayed checks it


def no_dropout(flags):
    return flags + NO_DROPOUT if "--recipe" in flags else flags


def first_step_gradients(name, flags, K, batch_size=8):
    """d loss / d parameters of the first step, plain backward (K = 1) or gradient caching (K > 1)."""
    module = importlib.import_module(name)
    args = module.parse_args(flags + ["--batch-size", str(batch_size // K), "--accum-steps", str(K)])
    torch.manual_seed(0)
    model, _, scaler = module.build_training(args, torch.device("cpu"), "fp32")
    images, tokens = make_batch(args, module, 0, batch_size)
    if K > 1:
        loss, _ = module.cached_gradient(model, images, tokens, args, nullcontext(), scaler)
    else:
        loss, _ = module.compute_loss(model(images, tokens), args)
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(a, b, case):
    assert a[0] == pytest.approx(b[0], rel=1e-6), case
    assert a[1].keys() == b[1].keys(), case
    for k in a[1]:  # float32 sums in another order: 1e-4 of the tensor's largest entry (errors are ~1e-6 of it)
        error, scale = (a[1][k] - b[1][k]).abs().max(), b[1][k].abs().max()
        assert error <= 1e-4 * scale + 1e-8, (case, k, error, scale)


@pytest.mark.parametrize("name,flags", CASES, ids=IDS)
def test_two_micro_batches_equal_one_batch_of_twice_the_size(name, flags):
    """One block per tower: what gradient caching must get right (the replay, the heads and losses on the whole
    batch, the gradients handed back) does not depend on the towers' depth."""
    flags = no_dropout(flags)
    with one_layer_towers(importlib.import_module(name)):
        assert_same_gradients(first_step_gradients(name, flags, 2), first_step_gradients(name, flags, 1), name)
        # 3 steps: the same losses; the weights agree to Adam's float noise (it divides by sqrt(v): on parameters
        # whose gradient is ~0, float rounding becomes an update of up to ~lr), far below a step's change
        (cached, cached_weights), (plain, plain_weights) = (train_steps(name, flags + ["--accum-steps", str(K)],
                                                                        batch_size=8) for K in (2, 1))
    assert cached == pytest.approx(plain, rel=1e-5)
    for k, v in plain_weights.items():
        assert torch.allclose(cached_weights[k], v, atol=1e-3), k


def test_dropout_is_replayed():
    """With text dropout on (improved recipe, 0.2), the towers' second pass draws the first pass's masks: the
    cached gradient equals the gradient of one graph through both micro-batches under the same random state."""
    import clip

    args = clip.parse_args(["--recipe", "improved", "--batch-size", "4", "--accum-steps", "2"])
    torch.manual_seed(0)
    model, _, scaler = clip.build_training(args, torch.device("cpu"), "fp32")
    images, tokens = make_batch(args, clip, 0, 8)
    torch.manual_seed(1)
    cached_loss, _ = clip.cached_gradient(model, images, tokens, args, nullcontext(), scaler)
    cached = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    after_cached = torch.get_rng_state()
    model.zero_grad()
    torch.manual_seed(1)
    parts = [model.towers(x, t) for x, t in zip(images.chunk(2), tokens.chunk(2))]  # the same draws, in order
    assert torch.equal(torch.get_rng_state(), after_cached)  # and the random stream goes on where it would
    loss, _ = clip.compute_loss(model.heads({k: torch.cat([p[k] for p in parts]) for k in parts[0]}), args)
    loss.backward()
    assert_same_gradients((cached_loss.item(), cached),
                          (loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}),
                          "dropout")


DDP_CASES = [("clip", ["--recipe", "improved", "--ssl", "barlow"]), ("nclip", []), ("xclip", [])]


def cached_on_two_processes(rank, world_size):
    return [[train_steps(name, no_dropout(flags) + ["--accum-steps", "2"], steps=steps, batch_size=8, rank=rank,
                         world_size=world_size) for steps in (1, 3)] for name, flags in DDP_CASES]


def test_two_processes_with_two_micro_batches_equal_one_process_with_the_whole_batch():
    """2 ranks x 2 micro-batches x 2 pairs against 1 process x 8 pairs: the heads' BatchNorm, Sinkhorn and the
    negatives see the global batch, and the gradient all-reduce by hand averages like DDP. The weights after one
    step (Adam's float noise grows with the steps, see above), the losses of 3 steps."""
    two = run_distributed(cached_on_two_processes, 2)
    for i, (name, flags) in enumerate(DDP_CASES):
        (_, plain_weights), (plain, _) = (train_steps(name, no_dropout(flags), steps=s, batch_size=8) for s in (1, 3))
        mean_over_ranks = [sum(two[r][i][1][0][step] for r in range(2)) / 2 for step in range(3)]
        assert mean_over_ranks == pytest.approx(plain, rel=1e-5), name
        for rank in range(2):
            weights = two[rank][i][0][1]
            for k, v in plain_weights.items():
                assert torch.allclose(weights[k], v, atol=1e-4), (name, k)


def run(args):
    import clip

    clip.main(clip.parse_args(args))  # in this process; the loader workers are forked from it


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_a_run_with_accum_steps_trains_like_the_big_batch_and_resumes_exactly(tmp_path):
    """Through main() with 2 loader workers: --accum-steps 2 --batch-size 4 reads the samples of --batch-size 8
    (the data position advances by K micro-batches a step) and logs its losses, samples/s of the 8 pairs and
    MFU with the towers' second forward; a run stopped after 2 steps and resumed ends with the weights of a
    straight run."""
    common = ["--steps", "3", "--warmup", "1", "--workers", "2", "--log-every", "1", "--eval-dataset", "none"]
    run(common + ["--batch-size", "8", "--out-dir", str(tmp_path / "big")])
    run(common + ["--batch-size", "4", "--accum-steps", "2", "--out-dir", str(tmp_path / "cached")])
    run(common + ["--batch-size", "4", "--accum-steps", "2", "--out-dir", str(tmp_path / "resumed"), "--steps", "2"])
    run(common + ["--batch-size", "4", "--accum-steps", "2", "--out-dir", str(tmp_path / "resumed"), "--resume",
                  "auto"])
    big, cached = losses(tmp_path / "big"), losses(tmp_path / "cached")
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in big], rel=1e-5)
    assert [r["loss"] for r in losses(tmp_path / "resumed")] == [r["loss"] for r in cached]
    weights = [torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("cached", "resumed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
