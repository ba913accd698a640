"""Shared pytest fixtures: tiny checkpoints built once per session (each in well under a second)."""

import os
from pathlib import Path

import pytest

# Never reach for the Hub in tests (a miss otherwise costs ~50 s of retries), even when pytest runs bare.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tests use tiny matrices: one thread is as fast, and far faster when other processes load the CPUs."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path | None:
    """`../shared/data` next to the repo (or $DIFFLM_SHARED_DATA); None in users' clones."""
    path = Path(os.environ.get("DIFFLM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def tiny_llada_dir(tmp_path_factory) -> Path:
    """A random tiny checkpoint in LLaDA's own format, with the tiny tokenizer."""
    from difflm.testing import build_tiny_llada_checkpoint

    return build_tiny_llada_checkpoint(tmp_path_factory.mktemp("tiny_llada"))


@pytest.fixture(scope="session")
def tiny_native_llada_dir(tmp_path_factory) -> Path:
    """The same model in difflm's native bidirectional-Llama format."""
    from difflm.testing import build_tiny_native_llada

    return build_tiny_native_llada(tmp_path_factory.mktemp("tiny_native_llada"))
