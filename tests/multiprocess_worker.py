"""One of two processes of test_sharding.test_two_processes: 4 CPU devices each, one (2, 4) mesh.

argv: model_dir port process_id prompts_json. Prints the greedy tokens as JSON on its last line."""

import json
import sys

import jax

model_dir, port, pid, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
try:
    import llama_jax

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = llama_jax.make_mesh(dp=2, tp=4)
    model = llama_jax.load(model_dir, dtype="float32", mesh=mesh)
    out = model.generate(prompts, max_new_tokens=12, stop_token_ids=[])
    print(json.dumps([c.token_ids for c in out]), flush=True)
finally:
    jax.distributed.shutdown()
