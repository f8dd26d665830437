"""The public entry points: `load` and the `Llama` handle."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import ops, orbax_io, requests, sharding
from llama_jax import generate as gen
from llama_jax.checkpoint import read_hf_params
from llama_jax.config import LlamaConfig, default_dtype
from llama_jax.model import Transformer


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens, positions):
    logits, _ = nnx.merge(graphdef, state)(tokens, positions)
    return sharding.replicated(logits)


class Llama:
    """A loaded model: `config`, `tokenizer`, `mesh`, `logits`, `generate`, `chat`, `stream`.

    A thin handle: the model is split once into `graphdef` and `state` (its arrays), which the
    jitted functions of llama_jax.generate take, so nothing re-traces per call."""

    def __init__(self, model: Transformer, *, tokenizer=None, chat_format=None, mesh=None,
                 unstack_layers: bool = True):
        ops.resolve(model.config.attention_impl)  # fails now, not at the first call
        if unstack_layers:
            model.unstack_layers()
        sharding.place(model, mesh)
        self.config: LlamaConfig = model.config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.chat_format = chat_format
        self.graphdef, self.state = nnx.split(model)

    @property
    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.state)

    def init_cache(self, batch: int, max_len: int):
        """A zero KV cache for `batch` sequences of up to `max_len` tokens, on the mesh when sharded
        (split by batch and KV heads, as llama_jax.sharding says)."""
        return gen.init_cache(self.graphdef, self.state, batch, max_len, self.mesh)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The checkpoint's stop ids: config.json's and the tokenizer's (generation_config.json)."""
        ids = list(self.config.eos_ids)
        if self.tokenizer is not None:
            ids += [i for i in self.tokenizer.eos_ids if i not in ids]
        return tuple(ids)

    def _request(self, prompts, max_new_tokens, **sampling) -> tuple[list[list[int]], requests.SamplingParams]:
        params = requests.sampling_params(max_new_tokens=max_new_tokens, **sampling,
                                          vocab_size=self.config.vocab_size, eos_ids=self.eos_ids)
        ids = requests.check_prompts(prompts, tokenizer=self.tokenizer, vocab_size=self.config.vocab_size,
                                     max_len=self.config.max_seq_len, max_new_tokens=params.max_new_tokens)
        sharding.check_batch(self.mesh, len(ids))
        return ids, params

    def _text(self, ids: list[int], stops) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([i for i in ids if i not in stops])

    def generate(self, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stop_token_ids=None) -> list[gen.Completion]:
        """Generates a completion for each prompt (a string, or a list of token ids), batched.

        temperature 0 is greedy; top_k and top_p restrict sampling; the same seed gives the same
        output. stop_token_ids=None stops on the checkpoint's eos ids, [] on none. Returns one
        Completion per prompt (token_ids: the generated ids only)."""
        ids, params = self._request(prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed, stop_token_ids=stop_token_ids)
        rows, timings = gen.generate_all(self.graphdef, self.state, ids, params, mesh=self.mesh)
        stops = params.stop_token_ids
        return [gen.Completion(token_ids=row, text=self._text(row, stops),
                               finish_reason="stop" if row and row[-1] in stops else "length",
                               prompt_token_ids=p, timings=dict(timings)) for p, row in zip(ids, rows)]

    def stream(self, prompt, *, max_new_tokens: int, **sampling):
        """Yields text pieces of one prompt's completion as the device produces them."""
        if self.tokenizer is None:
            raise ValueError("stream needs a tokenizer")
        [ids], params = self._request([prompt], max_new_tokens, **sampling)
        new, shown = [], ""
        for [chunk] in gen.generate_ids(self.graphdef, self.state, [ids], params, mesh=self.mesh):
            new += chunk
            text = self._text(new, params.stop_token_ids)
            # Hold back a piece that ends inside a multi-byte character.
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        text = self._text(new, params.stop_token_ids)
        if len(text) > len(shown):
            yield text[len(shown):]

    def chat_prompt(self, messages) -> list[int]:
        """The token ids of a dialog (a list of {"role", "content"} dicts) with an open assistant turn."""
        if self.chat_format is None:
            raise ValueError("this model has no chat format (no tokenizer or chat template)")
        return self.chat_format.encode_dialog(messages, add_generation_prompt=True)

    def chat(self, messages, **sampling) -> gen.Completion:
        """Answers a dialog (a list of {"role", "content"} dicts) in the checkpoint's chat format."""
        sampling.setdefault("max_new_tokens", 256)
        return self.generate([self.chat_prompt(messages)], **sampling)[0]

    def logits(self, token_ids, positions=None) -> np.ndarray:
        """Full-sequence logits: token_ids, a batch of equal-length lists of ids [B, T] ->
        float32 numpy array [B, T, V]. positions [B, T] (ints, default 0..T-1) place the sequence
        anywhere in the context."""
        ids = requests.check_token_ids(token_ids, vocab_size=self.config.vocab_size, max_len=self.config.max_seq_len)
        sharding.check_batch(self.mesh, len(ids))
        pos = requests.check_positions(positions, ids.shape, max_len=self.config.max_seq_len)
        with sharding.on_mesh(self.mesh):
            tokens = jax.device_put(ids, sharding.batch_sharding(self.mesh, 2))
            pos = jax.device_put(pos, sharding.batch_sharding(self.mesh, 2))
            return np.asarray(_logits(self.graphdef, self.state, tokens, pos))


def load(path: str | os.PathLike, *, dtype=None, mesh=None, attention_impl: str = "auto",
         norm_impl: str = "auto", prefill_chunk: int | None = None, unstack_layers: bool = True) -> Llama:
    """Loads a model directory: a Hugging Face one (config.json with model.safetensors, or shards
    with model.safetensors.index.json) or one made by `llama-jax convert` (Orbax).

    dtype: parameter and compute dtype ("float32" or "bfloat16"); None picks float32 on CPU and
    bfloat16 on GPU. mesh: a ('data', 'model') mesh from `make_mesh`; each parameter goes straight
    onto its sharding (from Orbax each device reads only its shard). attention_impl ("auto", "xla",
    "pallas", "cudnn") and norm_impl ("auto", "xla", "pallas") choose the kernels; "auto" is pallas
    on GPU and xla on CPU. prefill_chunk: prompt tokens per prefill step (a multiple of 16; None:
    2048); a longer prompt is prefilled chunk by chunk at bounded memory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    dtype = jnp.dtype(dtype or default_dtype()).name
    tp = 1 if mesh is None else sharding.axis_size("kv_heads", mesh)
    impls = dict(attention_impl=attention_impl, norm_impl=norm_impl, prefill_chunk=prefill_chunk)
    if orbax_io.is_converted(path):
        config = dataclasses.replace(orbax_io.read_config(path), param_dtype=dtype, dtype=dtype, **impls)
        r = sharding.kv_replication(config, tp)
        # With KV heads to repeat, wk/wv are restored whole and repeated on the host.
        shardings = None if mesh is None or r > 1 else _stacked_shardings(config, mesh)
        _, params = orbax_io.read_converted(path, dtype=dtype, shardings=shardings)
    elif os.path.isfile(os.path.join(path, "config.json")):
        config = LlamaConfig.from_hf(path, param_dtype=dtype, dtype=dtype, **impls)
        r = sharding.kv_replication(config, tp)
        params = read_hf_params(path, config, np.dtype(jnp.dtype(dtype)))
    else:
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory) and no "
                                f"{orbax_io.CONFIG_FILE} (not a converted one)")
    config, params = sharding.replicate_kv_heads(config, params, r)
    tokenizer, chat_format = _load_tokenizer(path)
    return Llama(_build(config, params), tokenizer=tokenizer, chat_format=chat_format, mesh=mesh,
                 unstack_layers=unstack_layers)


def _stacked_shardings(config: LlamaConfig, mesh) -> dict:
    """The NamedSharding of every stacked parameter, from its logical axes."""
    return sharding.param_shardings(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), mesh)


def _load_tokenizer(path: str):
    """The checkpoint's tokenizer and chat format, or (None, None) for a weights-only directory."""
    from llama_jax.chat import chat_format_for
    from llama_jax.tokenizer import load_tokenizer

    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.model", "tokenizer.json")):
        return None, None
    tokenizer = load_tokenizer(path)
    try:
        chat_format = chat_format_for(path, tokenizer)
    except ValueError:  # a base model without a chat template: generate works, chat says why not
        chat_format = None
    return tokenizer, chat_format


def _build(config: LlamaConfig, params: dict) -> Transformer:
    """A Transformer whose parameters are `params` (a nested dict of arrays), with no random init."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    # Host arrays stay on the host here: `Llama` places each one on its device(s).
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def from_config(config: LlamaConfig, *, seed: int = 0, mesh=None, unstack_layers: bool = True) -> Llama:
    """A randomly initialized model (for tests and benchmarks)."""
    return Llama(Transformer(config, rngs=nnx.Rngs(seed)), mesh=mesh, unstack_layers=unstack_layers)


__all__ = ["Llama", "load", "from_config"]
