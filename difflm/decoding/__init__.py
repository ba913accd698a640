"""Decoding: every sampler of the paper behind one batched, seeded `generate`.

    from difflm.decoding import DecodeConfig, generate
    out = generate(model, input_ids, DecodeConfig(method="conv", gen_length=256, steps=64, kernel_size=129,
                   top_k=1, seed=0), mask_id=126336, eos_id=126081, attention_mask=None)
    out.sequences, out.nfe
"""

from difflm.decoding.config import METHODS, DecodeConfig
from difflm.decoding.loop import GenerateOutput, generate, item_seed

__all__ = ["METHODS", "DecodeConfig", "GenerateOutput", "generate", "item_seed"]
