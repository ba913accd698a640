"""One seeding function and one MASK-at--inf log-softmax for the whole package (`difflm.seeding`, `difflm.subs`)."""

from __future__ import annotations

import pytest
import torch

from difflm.seeding import hash_seed, item_generator, item_seed, seed_for
from difflm.subs import log_probs, without_mask


def test_seed_values_are_pinned():
    # Values of the seeds before they moved to difflm.seeding (training: blake2b of the parts' repr; generation
    # and lm-eval: sha256 of "seed:key"). A change here changes every resumed run's noise and every
    # generated output: a resumed run would no longer replay the interrupted one.
    assert seed_for(0, "epoch", 3) == 8405428280607487038
    assert seed_for(7, "train", "r2ft", 12) == 2050658536492423708
    assert seed_for(0, "lora-init") == 1569426695638142270
    assert seed_for(1, "dropout", 5, 0, 2) == 5715269581394071489
    assert item_seed(0, "prompt-0") == 14300882960016851
    assert item_seed(123, 4) == 8845226899388115826
    assert item_seed(0, "a\x1fb") == 6817279117638812494


def test_every_caller_uses_the_one_implementation():
    from difflm.decoding import item_seed as decoding_item_seed
    from difflm.training import losses

    assert losses.seed_for is seed_for
    assert decoding_item_seed is item_seed  # difflm.decoding re-exports the one implementation
    for seed, key in [(0, "prompt-0"), (123, 4), (2**40, "id with spaces"), (5, "")]:
        assert decoding_item_seed(seed, key) == item_seed(seed, key)
    a, b = item_generator(3, "context", "continuation"), torch.Generator().manual_seed(item_seed(3, "context\x1fcontinuation"))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert torch.equal(torch.rand(4, generator=losses.example_generator(0, "train", 5)),
                       torch.rand(4, generator=torch.Generator().manual_seed(seed_for(0, "train", 5))))


def test_hash_seed_is_63_bits_and_names_its_algorithms():
    seeds = {hash_seed(str(i), alg) for i in range(200) for alg in ("blake2b", "sha256")}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="blake2b or sha256"):
        hash_seed("x", "md5")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_mask_copies_to_float32_and_removes_only_the_mask(dtype):
    logits = torch.randn(2, 3, 7).to(dtype)
    before = logits.clone()
    out = without_mask(logits, 5)
    assert torch.equal(logits, before)  # the input is untouched, also when it is float32 already
    assert out.dtype == torch.float32 and torch.isneginf(out[..., 5]).all()
    keep = [0, 1, 2, 3, 4, 6]
    assert torch.equal(out[..., keep], before.float()[..., keep])
    lp = log_probs(logits, 5)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 3)) and torch.isneginf(lp[..., 5]).all()
    assert torch.equal(without_mask(logits, None), before.float())  # an AR model has no MASK
