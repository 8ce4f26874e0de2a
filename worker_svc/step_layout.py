"""A step laid out on the host: which token of which sequence goes where in the forward pass.

Pure functions of the Step and the sequence table, all array work (the only Python loops are over
the step's SequenceSteps, never over tokens or packed decodes). The runner packs what they
return into one buffer for the device (:mod:`worker_svc.step_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagewire.v1 import worker_pb2
from worker_svc.seq_table import SequenceTable
from worker_svc.step_inputs import FROM_DEVICE


@dataclass
class StepLayout:
    """Where each sequence of a step sits in the forward pass (one slot per sequence)."""

    ids: np.ndarray  # [T] input token ids, slot by slot; FROM_DEVICE: the row's last sample
    rows: np.ndarray  # [N] table row of each slot
    starts: np.ndarray  # [N] position of each slot's first token
    lens: np.ndarray  # [N] tokens of each slot
    slot: np.ndarray  # [len(step.seqs)] slot of each SequenceStep (packed decode i is slot i)
    num_decode: int  # single-token slots, all at the front


@dataclass
class SampleRows:
    """The rows that sample this step, in result order (decodes, then SequenceSteps)."""

    rows: np.ndarray  # table rows
    hidden_index: np.ndarray  # index into the step's hidden states
    output_index: np.ndarray  # index of the token being sampled in its sequence's output
    position: np.ndarray  # position the sampled token will take


def layout(step: worker_pb2.Step, drows: np.ndarray, srows: np.ndarray) -> StepLayout:
    """Forward order: decodes (packed, then one-token SequenceSteps), then multi-token chunks;
    the attention backend takes the single-token queries at the front apart."""
    seqs, d, nd = step.seqs, step.decodes, len(drows)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids) > 1)
    slot = np.empty(len(seqs), dtype=np.int64)
    slot[order] = np.arange(nd, nd + len(seqs))
    lens = np.ones(nd + len(seqs), dtype=np.int64)
    lens[nd:] = [max(len(seqs[i].token_ids), 1) for i in order]
    seq_ids: list[int] = []
    for i in order:
        seq_ids.extend(seqs[i].token_ids or [FROM_DEVICE])
    return StepLayout(
        ids=np.concatenate([np.full(nd, FROM_DEVICE, np.int64), np.asarray(seq_ids, np.int64)]),
        rows=np.concatenate([drows, srows[order]]),
        starts=np.concatenate([np.asarray(d.positions, dtype=np.int64),
                               np.fromiter((seqs[i].start_pos for i in order), np.int64)]),
        lens=lens,
        slot=slot,
        num_decode=int((lens == 1).sum()),
    )

def sample_rows(
step: worker_pb2.Step, lay: StepLayout, cu: np.ndarray, sampled: list[int]
) -> SampleRows:
    """The rows that sample (decodes, then the sampling SequenceSteps ``sampled``) and where
    their last hidden states are."""
    nd = len(step.decodes.seq_ids)
    at = np.concatenate([np.arange(nd), lay.slot[sampled]])  # forward slots, result order
    seq_index = np.fromiter((step.seqs[i].output_index for i in sampled), np.int64, len(sampled))
    return SampleRows(
        rows=lay.rows[at],
        hidden_index=cu[at + 1] - 1,
        output_index=np.concatenate(
            [np.asarray(step.decodes.output_indices, dtype=np.int64), seq_index]
        ),
        position=lay.starts[at] + lay.lens[at],
    )



def token_columns(
    lay: StepLayout, cu: np.ndarray, table: SequenceTable, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per token: its slot's index, its position and its KV slot; and the slots' block tables
    (as wide as the longest)."""
    owner = np.repeat(np.arange(len(lay.lens)), lay.lens)
    positions = lay.starts[owner] + np.arange(int(cu[-1])) - cu[:-1][owner]
    width = int(table.num_blocks[lay.rows].max())
    block_tables = table.block_tables[lay.rows, :width]
    slots = (block_tables[owner, positions // block_size].astype(np.int64) * block_size
             + positions % block_size)
    return owner, positions, slots, block_tables
