"""The worker's grammar masks: the fused masked fill against its oracle, and padding ids."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from kernels.reference import apply_token_bitmask
from pagewire.grammar import Compiler, matcher
from pagewire.structured import StructuredOutput
from worker_svc.constraints import Constraints, apply_bitmask


def test_fused_masked_fill_equals_the_reference_on_a_subset_of_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    for vocab in (1000, 1024, 4099):
        logits = torch.randn(6, vocab, generator=gen)
        words = (vocab + 31) // 32
        mask = torch.randint(-(2**31), 2**31 - 1, (6, words), dtype=torch.int32, generator=gen)
        rows = [0, 2, 5]
        fast, ref = logits.clone(), logits.clone()
        apply_bitmask(fast, mask, rows)
        apply_token_bitmask(ref, mask, torch.tensor(rows))
        assert torch.equal(fast, ref)
        assert torch.equal(fast[[1, 3, 4]], logits[[1, 3, 4]]), "other rows untouched"
        assert torch.isinf(fast[rows]).any() and not torch.isinf(fast[rows]).all()


def test_padding_ids_past_the_tokenizer_are_never_allowed(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    padded = len(tok) + 40  # a model whose embedding is padded past the tokenizer
    m = matcher(Compiler(tok, padded, [1]).compile(StructuredOutput("json_object", "")))
    mask = torch.zeros(1, (padded + 31) // 32, dtype=torch.int32)
    m.fill_next_token_bitmask(mask, 0)
    logits = torch.zeros(1, padded)
    apply_token_bitmask(logits, mask, torch.tensor([0]))
    assert torch.isinf(logits[0, len(tok):]).all()
    assert not torch.isinf(logits[0, : len(tok)]).all()


def test_a_finished_row_allows_all_and_a_replayed_one_continues(tiny_model: Path) -> None:
    c = Constraints(tiny_model, 1024, [1, 4])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok.encode("beta", add_special_tokens=False)
    spec = StructuredOutput("choice", json.dumps(["alpha", "beta"]))
    done = c.start(spec, [*ids, 1])  # the whole choice and EOS: terminated
    mid = c.start(spec, ids[:1])  # one token in
    mask = c.fill([done, mid], [0, 1], 2)
    assert done.done and (mask[0] == -1).all()
    allowed = [t for t in range(1024) if (int(mask[1, t // 32]) >> (t % 32)) & 1]
    assert ids[1] in allowed and 1 not in allowed
    c.close()
