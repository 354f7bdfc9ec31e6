"""scripts/gpu_check.py: the service half of the GPU check on a small slice (docs/gpu-check.md).

On the CPU this is the check's rehearsal; with a CUDA device (``-m cuda``) it is the check
that the service's learner trains on the GPU and that its checkpoint predicts the same on
the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.support import REPO_ROOT, load_script

gpu_check = load_script(REPO_ROOT / "scripts" / "gpu_check.py", "spacenet_tests_gpu_check")


def _check(device: str) -> dict:
    torch.manual_seed(0)
    return gpu_check.service_check(device, limit_per_class=60, epochs=1)


@pytest.mark.slow
def test_service_half_on_cpu_learns_three_tasks_and_restores_them_exactly() -> None:
    report = _check("cpu")
    assert report["model_version"] == 3 and [t["task"] for t in report["tasks"]] == [0, 1, 2]
    assert report["device_info"] == {"cpu": ""} and report["parameters_on"] == ["cpu"]
    assert report["cpu_agreement"] == 1.0 and report["cpu_max_score_diff"] == 0.0
    assert report["dead_letters"] == 0 and report["ok"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_service_half_on_cuda_trains_there_and_a_cpu_copy_agrees() -> None:
    report = _check("cuda")
    assert report["device"].startswith("cuda") and report["parameters_on"] == ["cuda"]
    assert report["masks_on"] == ["cuda"] and report["device_info"].get(report["device"])
    assert report["cpu_agreement"] == 1.0 and report["cpu_max_score_diff"] <= gpu_check.ATOL
    assert report["ok"]
