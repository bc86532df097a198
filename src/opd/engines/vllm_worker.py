"""The methods opd adds to a vLLM server's workers (``--worker-extension-cls opd.engines.vllm_worker.WeightFiles``).

vLLM mixes this class into each worker of the server; the trainer calls its methods through the server's
``/collective_rpc`` route (present when the server runs with ``VLLM_SERVER_DEV_MODE=1``), with string
arguments only. It needs opd installed in the server's Python. Nothing here imports vLLM: this module is
also imported by opd itself (every module of ``engines`` is).
"""

from __future__ import annotations

import torch

from .weight_files import read_weight_files, retie_output_layer


class WeightFiles:
    """Worker extension: reload the model in place from the weight files the trainer wrote (``engines.weight_files``)."""

    def opd_load_weights(self, directory: str) -> int:
        """Load every weight in ``directory``'s parts into this worker's model (in checkpoint format, so a tensor-
        parallel worker takes its own shard), tie a tied output layer to the new embedding again, and return how
        many tensors were read."""
        count = 0

        def counted():
            nonlocal count
            for pair in read_weight_files(directory):
                count += 1
                yield pair

        with torch.no_grad():
            self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
            retie_output_layer(self.model_runner.get_model())
        return count
