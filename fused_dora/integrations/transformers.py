"""One line for transformers' ``Trainer`` and TRL's trainers: ``callbacks=[FusedDoraCallback()]``.

    trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[FusedDoraCallback()])
    trainer = SFTTrainer(model="...", peft_config=LoraConfig(use_dora=True, ...), ...,
                         callbacks=[FusedDoraCallback()])   # TRL builds the PEFT model itself

The callback calls :func:`fused_dora.integrations.peft.enable_fused_dora` on the trainer's model
when the trainer is built and again when training begins (TRL may wrap or rebuild the model in
between), and logs the number of fused layers once on the "fused_dora" logger. Correctness
through training needs nothing more: the norm is computed in every training forward, so the
default optimizer (``adamw_torch_fused``, which bumps no version counters) is safe.
Importing this module imports transformers (the ``peft`` extra).
"""
import logging
from typing import Any, Optional

import torch.nn as nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..routes import check_route
from ..validation import check_backend, check_dropout_semantics
from .peft import enable_fused_dora, fused_dora_status

logger = logging.getLogger(__name__)


class FusedDoraCallback(TrainerCallback):
    """Serve the trainer's PEFT DoRA layers with fused_dora's kernels.

    ``dropout_semantics``, ``backend`` and ``route`` are passed to ``enable_fused_dora``; ``warn=False``
    silences its warning about layers that can never be served (they keep PEFT's forward).
    """

    def __init__(self, dropout_semantics: str = "fused", *, backend: str = "auto", warn: bool = True,
                 route: Optional[str] = None) -> None:
        check_dropout_semantics(dropout_semantics)
        check_backend(backend)
        if route is not None:
            check_route(route)
        self.dropout_semantics, self.backend, self.warn, self.route = dropout_semantics, backend, warn, route
        self.fused_layers: Optional[int] = None  # after the first switch: how many layers it switched

    def _switch(self, model: Optional[nn.Module]) -> None:
        if model is None:
            return
        first = self.fused_layers is None
        self.fused_layers = enable_fused_dora(model, self.dropout_semantics, backend=self.backend,
                                              warn=self.warn and first, route=self.route)
        if first:
            counts = fused_dora_status(model).counts
            logger.info("FusedDoraCallback: %d PEFT DoRA layers served by fused_dora (%s)", self.fused_layers,
                        ", ".join(f"{status}: {n}" for status, n in counts.items()) or "no DoRA layers")

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        self._switch(model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        self._switch(model)
