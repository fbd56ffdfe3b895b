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


# pytest -n 2 hands tests to its workers in collection order: the longest first (measured, under -n 2), so that no
# long test starts last while the other worker sits idle. Only an order: a name missing here runs after these.
LONGEST_FIRST = """
    test_inductor_compile_through_main
    test_a_signal_to_the_process_group_saves_and_resume_equals_an_uninterrupted_run
    test_two_nodes_without_a_shared_file_system_resume_together
    test_a_short_default_run_learns
    test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run
    test_torchrun_elastic_restart_resumes_from_the_last_checkpoint
    test_compiled_ddp_on_two_processes_trains_like_eager
    test_torchrun_two_processes_equal_one_process_with_the_global_batch
    test_torchrun_logs_the_held_out_folders_zero_shot_top1_that_eval_zeroshot_reports_for_each_kept_snapshot
    test_non_finite_steps_on_one_rank_stop_every_rank_together
    test_bf16_trains_close_to_fp32_on_two_processes
    test_torchrun_smoke_and_resume
    test_two_processes_with_two_micro_batches_equal_one_process_with_the_whole_batch
""".split()  # the shared trained run (test_a_short_default_run_learns) brings its xdist_group


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.originalname, len(rank)))  # stable: the rest keep their order


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
