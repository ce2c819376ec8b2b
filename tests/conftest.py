import os
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)                     # tiny_models, fixtures
sys.path.insert(0, os.path.dirname(HERE))    # benchmarks.baselines (the published algorithm)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """``cuda`` marks every test that needs a CUDA device: tests marked by hand, and the backend sweeps' cases
    parametrized with ``device="cuda"``. Without CUDA they skip. ``tools/gpu_check.sh`` runs ``pytest -m cuda``."""
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA")
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is not None and spec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)
        if skip is not None and item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vlm_qwen2():
    from tiny_models import tiny_vlm
    return tiny_vlm("qwen2_vl", seed=0)


@pytest.fixture(scope="session")
def vlm_qwen25():
    from tiny_models import tiny_vlm
    return tiny_vlm("qwen2_5_vl", seed=1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one torch thread is fastest, and robust to other jobs on a 2-core machine (modules use it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
