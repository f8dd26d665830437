"""Tiny random Hugging Face Llama checkpoints, made with transformers, for parity tests."""

import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

# Small, prime-ish dimensions so that shape bugs cannot hide. Together they cover GQA groups 1, 3, 4
# (and 2), tied and untied heads, Llama 3 rope scaling on (positions past the original context) and
# off, head_dim != dim / heads, and a sharded save.
TINY = {
    "g1_tied": dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=5, intermediate_size=72,
                    tie_word_embeddings=True),
    "g3_scaled_headdim": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                              intermediate_size=88, tie_word_embeddings=False,
                              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=16)),
    "g4_sharded": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
                       tie_word_embeddings=False),
    "g2_tied_scaled": dict(hidden_size=36, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           intermediate_size=60, tie_word_embeddings=True,
                           rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=8)),
}
SEQ = 48  # past original_max_position_embeddings (16 and 8) where scaling is on


# For sharding: 8 KV heads and every split dimension divisible by 8.
KV8 = dict(hidden_size=64, num_attention_heads=16, num_key_value_heads=8, head_dim=8, intermediate_size=128,
           tie_word_embeddings=False, vocab_size=256)


def make_hf_model(tmp_path, name, **save_kwargs):
    kw = dict(vocab_size=211, num_hidden_layers=3, max_position_embeddings=128, rope_theta=10000.0,
              rms_norm_eps=1e-5, initializer_range=0.25, bos_token_id=1, eos_token_id=2)
    kw.update(KV8 if name == "kv8" else TINY[name])
    torch.manual_seed(sum(map(ord, name)))
    model = LlamaForCausalLM(HFConfig(**kw)).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight cannot hide
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    path = tmp_path / name
    model.save_pretrained(path, **save_kwargs)
    return model, path
