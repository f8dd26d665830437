"""Training, in parts: `config` (TrainConfig, the schedule, AdamW with torch's clipping), `loss` (the
chunked next-token loss), `trainer` (the jitted step and the Trainer: checkpoints, evaluation,
export), `loop` (`fit`, what `llama-jax train` runs). Documents are packed into rows with attention
kept inside each document (llama_jax.data).

It matches PyTorch step for step (tests/test_train.py): the loss is transformers' `labels=` loss,
AdamW is torch.optim.AdamW's, and the schedule and clipping are torch's.
"""

from llama_jax.data import pack_documents
from llama_jax.train.config import REMAT_POLICIES, TrainConfig, lr_at, optimizer
from llama_jax.train.loop import fit
from llama_jax.train.loss import chunked_cross_entropy, loss_sums
from llama_jax.train.trainer import RUN_FILE, Trainer, TrainingDiverged, gradient_program, update_program

__all__ = ["REMAT_POLICIES", "RUN_FILE", "TrainConfig", "Trainer", "TrainingDiverged", "chunked_cross_entropy", "fit",
           "gradient_program", "loss_sums", "lr_at", "optimizer", "pack_documents", "update_program"]
