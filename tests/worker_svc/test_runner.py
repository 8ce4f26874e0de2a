"""The worker's model runner against transformers on the same weights, step by step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagewire.v1 import common_pb2, worker_pb2
from worker_svc.runner import ModelRunner

GREEDY = common_pb2.SamplingParams(temperature=0.0)


def hf_greedy(hf: AutoModelForCausalLM, prompt: list[int], n: int) -> list[int]:
    """Argmax continuation without early stopping (the runner does not know about EOS)."""
    ids = torch.tensor([prompt])
    out = []
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(hf(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_mixed_chunked_prefill_and_decode_steps_match_transformers(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    runner.reset()
    prompts = {1: [0, 17, 99, 5, 300, 42, 8, 250, 3, 77, 12], 2: [0, 400], 3: [0, 9, 9, 9, 9, 9, 9, 9]}
    n_out = 8
    expected = {sid: hf_greedy(hf, p, n_out) for sid, p in prompts.items()}
    blocks = {1: list(range(0, 8)), 2: list(range(8, 16)), 3: list(range(16, 24))}
    outputs: dict[int, list[int]] = {sid: [] for sid in prompts}

    def run(step: worker_pb2.Step) -> None:
        result = runner.execute(step)
        assert not result.unknown_seq_ids
        for sid, tok in zip(result.seq_ids, result.token_ids, strict=True):
            outputs[sid].append(tok)

    # Step 1: seq 1 prefills its first 6 tokens (no sample), seq 2 prefills whole.
    step = worker_pb2.Step(step_id=1)
    step.seqs.add(seq_id=1, start_pos=0, token_ids=prompts[1][:6], block_ids=blocks[1][:2],
                  sample=False, new=True, sampling=GREEDY)
    step.seqs.add(seq_id=2, start_pos=0, token_ids=prompts[2], block_ids=blocks[2],
                  sample=True, new=True, sampling=GREEDY)
    run(step)
    # Step 2: seq 1 finishes its prefill (appending blocks), seq 2 decodes, seq 3 prefills.
    step = worker_pb2.Step(step_id=2)
    step.seqs.add(seq_id=1, start_pos=6, token_ids=prompts[1][6:], block_ids=blocks[1][2:], sample=True)
    step.seqs.add(seq_id=2, start_pos=2, token_ids=[outputs[2][-1]], sample=True)
    step.seqs.add(seq_id=3, start_pos=0, token_ids=prompts[3], block_ids=blocks[3], sample=True,
                  new=True, sampling=GREEDY)
    run(step)
    # Decodes; odd steps name the token explicitly, even ones say "the one you sampled last".
    while min(len(o) for o in outputs.values()) < n_out:
        step = worker_pb2.Step(step_id=3)
        for sid, p in prompts.items():
            if len(outputs[sid]) < n_out:
                explicit = len(outputs[sid]) % 2 == 1
                step.seqs.add(seq_id=sid, start_pos=len(p) + len(outputs[sid]) - 1,
                              token_ids=[outputs[sid][-1]] if explicit else [], sample=True)
        run(step)
    assert outputs == expected


def test_a_step_stores_kv_without_asking_each_layer_for_skipped_slots(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner knows its step has no -1 slot (it checked on the host), so every layer stores
    through the backend's store_kv, not the write_kv that inspects the mapping per call."""
    assert runner.backend.store_kv is not None
    calls = {"store": 0}

    def refuse(*args: object) -> None:
        raise AssertionError("write_kv called: a layer checked the slot mapping itself")

    def store(*args: object) -> None:
        calls["store"] += 1
        store_kv(*args)

    store_kv = runner.backend.store_kv
    monkeypatch.setattr(runner, "backend", dataclasses.replace(runner.backend, write_kv=refuse,
                                                               store_kv=store))
    runner.reset()
    step = worker_pb2.Step(step_id=1)
    step.seqs.add(seq_id=5, start_pos=0, token_ids=[0, 1, 2], block_ids=[0], sample=True, new=True,
                  sampling=GREEDY)
    assert runner.execute(step).token_ids
    assert calls["store"] == runner.model.cfg.num_hidden_layers


def test_unknown_sequence_is_reported_not_guessed(runner: ModelRunner) -> None:
    runner.reset()
    step = worker_pb2.Step(step_id=9)
    step.seqs.add(seq_id=77, start_pos=5, token_ids=[], sample=True)
    result = runner.execute(step)
    assert list(result.unknown_seq_ids) == [77] and not result.token_ids


def test_released_sequences_are_forgotten(runner: ModelRunner) -> None:
    runner.reset()
    step = worker_pb2.Step(step_id=1)
    step.seqs.add(seq_id=5, start_pos=0, token_ids=[0, 1, 2], block_ids=[0], sample=True, new=True,
                  sampling=GREEDY)
    assert list(runner.execute(step).seq_ids) == [5]
    runner.execute(worker_pb2.Step(step_id=2, release_seq_ids=[5]))
    decode = worker_pb2.Step(step_id=3)
    decode.decodes.seq_ids.append(5)
    decode.decodes.positions.append(3)
    decode.decodes.new_block_ids.append(-1)
    decode.decodes.output_indices.append(1)
    assert list(runner.execute(decode).unknown_seq_ids) == [5]
