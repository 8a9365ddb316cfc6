import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny embedded Krea 2 (Raw, Turbo, text encoder, VAE), written once per test session."""
    from krea2_train.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny VAE's convolutions are ~30x slower with 2 threads on a busy 2-core box (OpenMP spin-waits)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def demo_images(tmp_path):
    """The first 4 demo posters with their captions, in a fresh folder (a small dataset for multi-process runs)."""
    import shutil
    from pathlib import Path

    data = tmp_path / "data"
    data.mkdir()
    for png in sorted((Path(__file__).resolve().parents[1] / "datasets" / "demo").glob("*.png"))[:4]:
        shutil.copy(png, data / png.name)
        shutil.copy(png.with_suffix(".txt"), data / png.with_suffix(".txt").name)
    return data
