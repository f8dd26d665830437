"""Shared fixtures. Eight fake CPU devices for the sharding tests; they must exist before JAX starts."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
from smollm2 import _cache_root, prepare_smollm2  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, cached outside the repo."""
    return prepare_smollm2(_cache_root() / "smollm2-135m-instruct-hf")


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_dir):
    """The transformers fp32 reference model, loaded once per session."""
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_dir):
    """transformers' own tokenizer for SmolLM2: the reference."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def llama3_model_path(tmp_path_factory) -> pathlib.Path:
    """Meta's Llama 3 tokenizer.model, rebuilt from quicktok's bundled vocab (sha256 checked)."""
    from llama3_tokenizer import build_llama3_tokenizer_model

    path = tmp_path_factory.getbasetemp() / "llama3_tokenizer" / "tokenizer.model"
    if not path.exists():
        build_llama3_tokenizer_model(path)
    return path


def default_model_env() -> dict:
    """The environment of a user's run: $LLAMA_JAX_CACHE outside the repo and kept across test runs,
    the default model prepared in it beforehand (so parallel runs do not wait on one conversion),
    one device (no XLA_FLAGS)."""
    from llama_jax.default_model import default_model_path

    cache = _cache_root() / "default-model-cache"
    # JAX's compiled programs persist there too (the CLI does this by itself; the examples do not),
    # so that later test runs skip most compilation.
    env = dict(os.environ, LLAMA_JAX_CACHE=str(cache), JAX_COMPILATION_CACHE_DIR=str(cache / "jax-compile"),
               PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    with mock.patch.dict(os.environ, LLAMA_JAX_CACHE=env["LLAMA_JAX_CACHE"]):  # only that: jax may start here
        default_model_path(progress=False)
    return env


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The training tests' tiny models (test_train, test_lora), one set per module: name ->
    (transformers model, its directory, our Llama), untied with GQA and RoPE scaling, and tied."""
    import llama_jax
    from tiny_models import make_hf_model

    tmp = tmp_path_factory.mktemp("train_models")
    out = {}
    for name in ("g3_scaled_headdim", "g1_tied"):
        hf, path = make_hf_model(tmp, name)
        out[name] = (hf, path, llama_jax.load(path, dtype="float32"))
    return out


@pytest.fixture
def untied(models):
    return models["g3_scaled_headdim"]
