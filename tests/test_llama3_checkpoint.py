"""A Llama 3 style checkpoint end to end: Meta's tiktoken tokenizer.model beside a (tiny, random)
model with the real 128256-token vocabulary, through load, generate, chat and convert."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

import llama_jax
from llama_jax.chat import Llama3ChatFormat
from llama_jax.tokenizer import Llama3Tokenizer

BOS, END_OF_TEXT, EOT = 128000, 128001, 128009


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, llama3_model_path):
    cfg = HFConfig(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0,
                   rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64),
                   tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=END_OF_TEXT, initializer_range=0.1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama3") / "model"
    model.save_pretrained(path)
    shutil.copy(llama3_model_path, path / "tokenizer.model")
    # Like Llama 3.x Instruct: generation stops on <|end_of_text|>, <|eom_id|> and <|eot_id|>.
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": [128001, 128008, 128009]}))
    return model, path


def test_load_picks_the_tiktoken_tokenizer_and_llama3_stops(llama3_dir):
    hf, path = llama3_dir
    model = llama_jax.load(path, dtype="float32")
    assert isinstance(model.tokenizer, Llama3Tokenizer)
    assert set(model.eos_ids) == {END_OF_TEXT, 128008, EOT}
    ids = model.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        ref = hf(torch.tensor([[BOS] + ids])).logits.numpy()
    np.testing.assert_allclose(model.logits([[BOS] + ids]), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_string_prompts_start_with_bos_and_chat_uses_metas_format(llama3_dir, llama3_model_path):
    _, path = llama3_dir
    model = llama_jax.load(path, dtype="float32")
    out = model.generate(["The capital of France is"], max_new_tokens=4, stop_token_ids=[])[0]
    assert out.prompt_token_ids == [BOS] + model.tokenizer.encode("The capital of France is")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|eot_id|>"}]
    ids = model.chat_prompt(messages)
    assert ids == Llama3ChatFormat(Llama3Tokenizer(llama3_model_path)).encode_dialog(messages)
    assert ids[0] == BOS and ids.count(EOT) == 2  # the user's "<|eot_id|>" stays text
    assert ids[-4:] == [128006, 78191, 128007, 271]  # an open assistant header
    reply = model.chat(messages, max_new_tokens=3)
    assert reply.prompt_token_ids == ids and len(reply.token_ids) <= 3


def test_convert_keeps_the_tokenizer(llama3_dir, tmp_path):
    from checkpoints_tools.convert import convert

    _, path = llama3_dir
    dst = tmp_path / "converted"
    convert(str(path), str(dst), dtype="float32", progress=False)
    assert (dst / "tokenizer.model").read_bytes() == (path / "tokenizer.model").read_bytes()
    a = llama_jax.load(path, dtype="float32")
    b = llama_jax.load(dst)
    assert isinstance(b.tokenizer, Llama3Tokenizer) and set(b.eos_ids) == set(a.eos_ids)
    prompt = ["Once upon a time"]
    assert (b.generate(prompt, max_new_tokens=6, stop_token_ids=[])[0].token_ids
            == a.generate(prompt, max_new_tokens=6, stop_token_ids=[])[0].token_ids)
