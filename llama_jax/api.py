"""The public entry points: `load` and the `Llama` handle."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import attention, orbax_io, sharding
from llama_jax import generate as gen
from llama_jax.checkpoint import read_hf_params
from llama_jax.config import LlamaConfig
from llama_jax.model import Transformer, default_dtype


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens):
    logits, _ = nnx.merge(graphdef, state)(tokens)
    return sharding.replicated(logits)


class Llama:
    """A loaded model: `config`, `tokenizer`, `mesh`, `logits`, `generate`, `chat`, `stream`."""

    def __init__(self, model: Transformer, *, tokenizer=None, chat_format=None, mesh=None,
                 unstack_layers: bool = True):
        attention.resolve(model.config.attention_impl)  # fails now, not at the first call
        if unstack_layers:
            model.unstack_layers()
        sharding.place(model, mesh)
        self.config: LlamaConfig = model.config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self._chat_format = chat_format
        # Split once: the jitted hot paths take this pure state, so nothing re-traces per call.
        self._graphdef, self._state = nnx.split(model)

    def _on_mesh(self):
        """The context the jitted calls run in: the model's mesh, or nothing."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _batch_sharding(self, ndim: int):
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, P("data", *(None,) * (ndim - 1)))

    def _check_batch(self, b: int):
        if self.mesh is not None and b % self.mesh.shape["data"]:
            raise ValueError(f"batch of {b} is not divisible by the mesh's data axis (dp={self.mesh.shape['data']})")

    @property
    def model(self) -> Transformer:
        return nnx.merge(self._graphdef, self._state)

    def _check_ids(self, token_ids, what="token_ids") -> np.ndarray:
        if not len(token_ids) or any(not len(row) for row in token_ids):
            raise ValueError(f"{what}: empty batch or empty sequence")
        if len({len(row) for row in token_ids}) != 1:
            raise ValueError(f"{what}: sequences must have equal lengths, got {sorted({len(r) for r in token_ids})}")
        ids = np.asarray(token_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{what}: token ids must be integers")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"{what}: token id {int(bad[0])} outside the vocabulary [0, {self.config.vocab_size})")
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{what}: length {ids.shape[1]} exceeds the context ({self.config.max_seq_len})")
        return ids.astype(np.int32)

    def init_cache(self, batch: int, max_len: int):
        """A zero KV cache for `batch` sequences of up to `max_len` tokens, on the mesh when sharded
        (batch over 'data', KV heads over 'model')."""
        device = None if self.mesh is None else NamedSharding(self.mesh, sharding.CACHE_SPEC)
        return self.model.init_cache(batch, max_len, device=device)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The checkpoint's stop ids: config.json's and the tokenizer's (generation_config.json)."""
        ids = list(self.config.eos_ids)
        if self.tokenizer is not None:
            ids += [i for i in self.tokenizer.eos_ids if i not in ids]
        return tuple(ids)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
            if self.tokenizer.add_bos and self.tokenizer.bos_id is not None:
                ids = [self.tokenizer.bos_id] + ids
            return ids
        return [int(i) for i in prompt]

    def _sampling(self, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids) -> gen.SamplingParams:
        stops = self.eos_ids if stop_token_ids is None else tuple(int(i) for i in stop_token_ids)
        params = gen.SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                                    top_p=top_p, seed=int(seed), stop_token_ids=stops)
        params.check(self.config.vocab_size)
        return params

    def _check_prompts(self, prompts, params: gen.SamplingParams) -> list[list[int]]:
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            raise ValueError("prompts must be a list of prompts (strings or lists of token ids)")
        if not len(prompts):
            raise ValueError("prompts: empty list")
        ids = [self._prompt_ids(p) for p in prompts]
        self._check_batch(len(ids))
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompts[{i}]: empty prompt")
            self._check_ids([p], what=f"prompts[{i}]")
            if len(p) + params.max_new_tokens > self.config.max_seq_len:
                raise ValueError(f"prompts[{i}]: {len(p)} prompt tokens + max_new_tokens {params.max_new_tokens} "
                                 f"exceed the context ({self.config.max_seq_len})")
        return ids

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
        params = self._sampling(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids)
        ids = self._check_prompts(prompts, params)
        out = [[] for _ in ids]
        t0, ttft = time.perf_counter(), None
        for chunk in gen.generate_ids(self, ids, params):
            ttft = time.perf_counter() - t0 if ttft is None else ttft
            for row, new in zip(out, chunk):
                row += new
        total = time.perf_counter() - t0
        steps = max(len(row) for row in out) - 1
        timings = {"time_to_first_token_s": ttft, "total_s": total,
                   "decode_tokens_per_s": steps / (total - ttft) if steps > 0 and total > ttft else None}
        return [self._completion(p, row, params, timings) for p, row in zip(ids, out)]

    def _completion(self, prompt, ids, params, timings) -> gen.Completion:
        stopped = bool(ids) and ids[-1] in params.stop_token_ids
        return gen.Completion(token_ids=ids, text=self._text(ids, params.stop_token_ids),
                              finish_reason="stop" if stopped else "length", prompt_token_ids=prompt,
                              timings=dict(timings))

    def stream(self, prompt, **sampling):
        """Yields text pieces of one prompt's completion as the device produces them."""
        params = self._sampling(**{"temperature": 0.0, "top_k": None, "top_p": None, "seed": 0,
                                   "stop_token_ids": None, **sampling})
        if self.tokenizer is None:
            raise ValueError("stream needs a tokenizer")
        [ids] = self._check_prompts([prompt], params)
        new, shown = [], ""
        for [chunk] in gen.generate_ids(self, [ids], params):
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
        if self._chat_format is None:
            raise ValueError("this model has no chat format (no tokenizer or chat template)")
        return self._chat_format.encode_dialog(messages, add_generation_prompt=True)

    def chat(self, messages, **sampling) -> gen.Completion:
        """Answers a dialog (a list of {"role", "content"} dicts) in the checkpoint's chat format."""
        sampling.setdefault("max_new_tokens", 256)
        return self.generate([self.chat_prompt(messages)], **sampling)[0]

    def logits(self, token_ids) -> np.ndarray:
        """Full-sequence logits: token_ids, a batch of equal-length lists of ids [B, T] ->
        float32 numpy array [B, T, V]."""
        ids = self._check_ids(token_ids)
        self._check_batch(len(ids))
        with self._on_mesh():
            tokens = jax.device_put(ids, self._batch_sharding(2))
            return np.asarray(_logits(self._graphdef, self._state, tokens))


def load(path: str | os.PathLike, *, dtype=None, mesh=None, attention_impl: str = "auto",
         norm_impl: str = "auto", unstack_layers: bool = True) -> Llama:
    """Loads a model directory: a Hugging Face one (config.json with model.safetensors, or shards
    with model.safetensors.index.json) or one made by `llama-jax convert` (Orbax).

    dtype: parameter and compute dtype ("float32" or "bfloat16"); None picks float32 on CPU and
    bfloat16 on GPU. mesh: a ('data', 'model') mesh from `make_mesh`; each parameter goes straight
    onto its sharding (from Orbax each device reads only its shard). attention_impl ("auto", "xla",
    "pallas", "cudnn") and norm_impl ("auto", "xla", "pallas") choose the kernels; "auto" is pallas
    on GPU and xla on CPU."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    dtype = jnp.dtype(dtype or default_dtype()).name
    impls = dict(attention_impl=attention_impl, norm_impl=norm_impl)
    if orbax_io.is_converted(path):
        config = dataclasses.replace(orbax_io.read_config(path), param_dtype=dtype, dtype=dtype, **impls)
        r = 1 if mesh is None else sharding.kv_replication(config, mesh.shape["model"])
        # With KV heads to repeat, wk/wv are restored whole and repeated on the host.
        shardings = None if mesh is None or r > 1 else _stacked_shardings(config, mesh)
        _, params = orbax_io.read_converted(path, dtype=dtype, shardings=shardings)
    elif os.path.isfile(os.path.join(path, "config.json")):
        config = LlamaConfig.from_hf(path, param_dtype=dtype, dtype=dtype, **impls)
        r = 1 if mesh is None else sharding.kv_replication(config, mesh.shape["model"])
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
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract)))
    shapes = nnx.to_pure_dict(nnx.state(abstract))
    return jax.tree.map(lambda spec, a: NamedSharding(mesh, sharding.logical_to_mesh(tuple(spec), a.shape, mesh)),
                        specs, shapes, is_leaf=lambda x: isinstance(x, P))


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
