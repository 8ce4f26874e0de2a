"""Step.decodes (DecodeBatch): packed decodes of held sequences, run with the SequenceSteps."""

from __future__ import annotations

from transformers import AutoModelForCausalLM
from worker_steps import Driver, hf_logits

from pagewire.v1 import common_pb2, worker_pb2
from worker_svc.runner import ModelRunner

GREEDY = common_pb2.SamplingParams(temperature=0.0)
PROMPTS = {
    1: [0, 17, 99, 5, 300, 42, 8, 250, 3, 77, 12],
    2: [0, 400],
    3: [0, 9, 9, 9, 9, 9, 9, 9],
    4: [0, 512, 7, 33, 33, 901],
}


def hf_greedy(hf: AutoModelForCausalLM, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(hf_logits(hf, ids)[-1].argmax()))
    return ids[len(prompt):]


def mixed_params() -> dict[int, common_pb2.SamplingParams]:
    return {
        1: GREEDY,
        2: common_pb2.SamplingParams(temperature=1.0, top_p=0.9, seed=7),
        3: common_pb2.SamplingParams(temperature=0.8, seed=11, presence_penalty=1.0,
                                     frequency_penalty=0.5, repetition_penalty=1.3, logprobs=2),
        4: common_pb2.SamplingParams(temperature=1.2, top_k=20, min_p=0.05, seed=3, min_tokens=4),
    }


def test_packed_decodes_give_the_tokens_of_the_equivalent_sequence_steps(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    results = {}
    for packed in (True, False):
        driver = Driver(runner, packed=packed)
        for sid, prompt in PROMPTS.items():
            driver.add(sid, prompt, mixed_params()[sid])
        outputs = driver.run(n_out=12, chunk=5)
        results[packed] = (outputs, [list(lp.top_token_ids) for lp in driver.tracks[3].logprobs])
    assert results[True] == results[False]
    assert results[True][0][1] == hf_greedy(hf, PROMPTS[1], 12), "crosses 3 block boundaries"
    assert len(results[True][1]) == 12


def decode(step: worker_pb2.Step, seq_id: int, position: int, new_block: int, index: int) -> None:
    d = step.decodes
    d.seq_ids.append(seq_id)
    d.positions.append(position)
    d.new_block_ids.append(new_block)
    d.output_indices.append(index)


def test_result_lists_decodes_first_then_sampling_sequence_steps_in_step_order(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    runner.reset()
    prompts = {1: [0, 5, 6], 2: [0, 7, 8], 3: [0, 9, 10], 5: [0, 11], 6: [0, 12, 13, 14, 15, 16]}
    first = worker_pb2.Step(step_id=1)
    for sid in (1, 2, 3):
        first.seqs.add(seq_id=sid, token_ids=prompts[sid], block_ids=[2 * sid], sample=True,
                       new=True, sampling=GREEDY)
    assert list(runner.execute(first).seq_ids) == [1, 2, 3]
    second = worker_pb2.Step(step_id=2)
    decode(second, 3, position=3, new_block=-1, index=1)
    decode(second, 1, position=3, new_block=-1, index=1)
    second.seqs.add(seq_id=5, token_ids=prompts[5], block_ids=[10], sample=True, new=True,
                    sampling=GREEDY)
    second.seqs.add(seq_id=6, token_ids=prompts[6][:3], block_ids=[12, 13], sample=False,
                    new=True, sampling=GREEDY)
    second.seqs.add(seq_id=2, start_pos=3, sample=True, output_index=1)
    result = runner.execute(second)
    assert list(result.seq_ids) == [3, 1, 5, 2], "6 does not sample"
    expected = [hf_greedy(hf, prompts[3], 2)[1], hf_greedy(hf, prompts[1], 2)[1],
                hf_greedy(hf, prompts[5], 1)[0], hf_greedy(hf, prompts[2], 2)[1]]
    assert list(result.token_ids) == expected


def test_decode_of_an_unknown_sequence_is_reported_and_the_step_not_run(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    runner.reset()
    prompt = [0, 1, 2, 3]
    first = worker_pb2.Step(step_id=1)
    first.seqs.add(seq_id=1, token_ids=prompt, block_ids=[0], sample=True, new=True,
                   sampling=GREEDY)
    runner.execute(first)
    bad = worker_pb2.Step(step_id=2)
    decode(bad, 1, position=4, new_block=1, index=1)
    decode(bad, 99, position=4, new_block=2, index=1)
    result = runner.execute(bad)
    assert list(result.unknown_seq_ids) == [99] and not result.token_ids
    retry = worker_pb2.Step(step_id=3)
    decode(retry, 1, position=4, new_block=1, index=1)
    assert list(runner.execute(retry).token_ids) == [hf_greedy(hf, prompt, 2)[1]], (
        "the rejected step appended no block"
    )
