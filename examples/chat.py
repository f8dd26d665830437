"""A scripted two-turn chat: the history is a list of messages, each reply is appended to it.

    python examples/chat.py [MODEL_DIR]

MODEL_DIR needs a chat template (an Instruct model). Without it, the default model:
SmolLM2-135M-Instruct, converted on first use. `llama-jax chat` is the interactive version.
"""

import sys

import llama_jax
from llama_jax.default_model import default_model_path

path = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
model = llama_jax.load(path)

messages = [{"role": "system", "content": "You are a concise assistant."}]
for question in ["What is the capital of France? Answer in one sentence.", "And of Germany?"]:
    messages.append({"role": "user", "content": question})
    print(f"user: {question}\nassistant: ", end="", flush=True)
    # chat_prompt renders the history in the model's chat format, ending with an open assistant turn.
    # (model.chat(messages) does the same without streaming and returns a Completion.)
    reply = ""
    for piece in model.stream(model.chat_prompt(messages), max_new_tokens=48):
        print(piece, end="", flush=True)
        reply += piece
    print()
    messages.append({"role": "assistant", "content": reply})
