"""Test settings shared by the whole suite.

TRITON_INTERPRET must be set before any kernel module is imported, so the
generated Triton megakernels run on the CPU through Triton's interpreter.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: one intra-op thread is faster, and on a shared
# 2-core machine extra threads spin against other processes (25x slower seen).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
