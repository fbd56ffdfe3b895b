import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: each worker one core for the torch ops in its process
        import torch

        torch.set_num_threads(1)
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (`python -m pytest -q -m gpu`); skipped without one")


@pytest.fixture(scope="session")
def trained_clip(tmp_path_factory):  # its tests share an xdist_group: one worker trains it once
    """One short clip.py run per test session (the default configuration at 150 steps of 128 pairs, in this
    process), for the tests that need a trained checkpoint: its learning, and eval_zeroshot.py reproducing its
    log. 512 evaluation images of seed 3: another seed or set of images gives another top-1. -> its OUT_DIR"""
    import clip

    out_dir = str(tmp_path_factory.mktemp("trained_clip"))
    clip.main(clip.parse_args(["--steps", "150", "--batch-size", "128", "--warmup", "30", "--eval-samples", "512",
                               "--seed", "3", "--log-every", "50", "--workers", "0", "--out-dir", out_dir]))
    return out_dir
