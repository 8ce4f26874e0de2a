"""M-RoPE positions (Qwen2.5-VL) against transformers' ``get_rope_index``, however a prompt is cut.

The worker works out a token's (temporal, height, width) position from its sequence's image
grids alone, for any chunk: one that starts or ends inside an image's placeholder run (chunked
prefill), one that starts mid-sequence (a prefix-cache hit), and decodes past the prompt (the
sequence's ``rope_delta``). Each must equal what transformers computes for the whole prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import vlm_cases

from worker_svc.models.config import ModelConfig
from worker_svc.models.refusal import Unsupported
from worker_svc.mrope_positions import chunk_positions, grids, sequence_offsets, step_positions

MERGE = 2


def case(model: Path, seeds: list[int], text: str = "Where and what?"):
    """(prompt ids, ImageInputs, transformers' [3, L] positions, its rope delta)."""
    inputs = vlm_cases.hf_inputs(model, text, [vlm_cases.image(s) for s in seeds])
    hf = vlm_cases.hf_model(model).model
    kw = {"image_grid_thw": inputs["image_grid_thw"]} if seeds else {}
    with torch.inference_mode():
        pos, delta = hf.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], **kw)
    ids = inputs["input_ids"][0].tolist()
    return ids, vlm_cases.image_inputs(model, inputs), pos[:, 0].numpy(), int(delta[0, 0])


@pytest.mark.parametrize("seeds", [[], [0], [1, 3], [4, 2, 1]])
def test_every_cut_of_the_prompt_gets_transformers_positions(qwenvl_model: Path, seeds) -> None:
    ids, images, want, delta = case(qwenvl_model, seeds)
    g = grids(images, MERGE)
    assert len({im.length for im in images}) == len(images)  # sizes differ: so do the runs
    for chunk in (1, 5, 16, len(ids)):
        for first in range(chunk):  # a cache hit or an earlier chunk ends at ``first``
            cuts = [0, *range(first or chunk, len(ids), chunk), len(ids)]
            got = np.concatenate([chunk_positions(g, a, b - a)[0]
                                  for a, b in zip(cuts, cuts[1:], strict=False) if b > a], axis=1)
            np.testing.assert_array_equal(got, want)
    assert sequence_offsets(g)[0] == delta


def test_decodes_add_the_rope_delta_and_image_chunks_get_3d_positions(qwenvl_model: Path
                                                                      ) -> None:
    """One step: a decode past its images, a prefill chunk that starts inside an image (a
    prefix hit at a block boundary), a text-only prefill; laid out as the runner lays them."""
    ids_a, images_a, _, delta_a = case(qwenvl_model, [3, 1])
    ids_b, images_b, want_b, _ = case(qwenvl_model, [2], "Another one")
    ga, gb = grids(images_a, MERGE), grids(images_b, MERGE)
    start_b = images_b[0].offset + 3  # inside the image
    starts = np.array([len(ids_a) + 4, start_b, 0])  # decode, chunk, text-only chunk
    lens = np.array([1, len(ids_b) - start_b, 6])
    rows = np.array([0, 1, 2])
    delta = np.array([delta_a, sequence_offsets(gb)[0], 0])
    until = np.array([sequence_offsets(ga)[1], sequence_offsets(gb)[1], 0])
    owner = np.repeat(np.arange(3), lens)
    cu = np.concatenate([[0], np.cumsum(lens)])
    positions = starts[owner] + np.arange(cu[-1]) - cu[:-1][owner]
    by_slot = {0: ga, 1: gb}
    flat, full = step_positions(positions, owner, starts, lens, rows, delta, until,
                                lambda slot: by_slot.get(slot))
    assert full is not None and full.shape == (3, cu[-1])
    assert flat[0] == len(ids_a) + 4 + delta_a and (full[:, 0] == flat[0]).all()
    np.testing.assert_array_equal(full[:, 1 : cu[2]], want_b[:, start_b:])
    np.testing.assert_array_equal(full[:, cu[2]:], np.tile(np.arange(6), (3, 1)))
    # The same step without the image chunk needs no 3-D positions at all.
    keep = owner != 1
    flat2, full2 = step_positions(positions[keep], np.where(owner[keep] == 2, 1, 0),
                                  starts[[0, 2]], lens[[0, 2]], rows[[0, 2]], delta, until,
                                  lambda slot: ga if slot == 0 else None)
    assert full2 is None and flat2[0] == flat[0]


def test_images_whose_runs_do_not_match_their_grid_are_refused(qwenvl_model: Path) -> None:
    _, (im,), _, _ = case(qwenvl_model, [0])
    im.length += 1
    with pytest.raises(ValueError, match="does not give its"):
        grids([im], MERGE)
    del im.grid_thw[:]
    with pytest.raises(ValueError, match="no grid_thw"):
        grids([im], MERGE)


def test_mrope_section_is_read_for_qwen2_5_vl_and_refused_elsewhere() -> None:
    text = {"architectures": ["Qwen2_5_VLTextModel"], "vocab_size": 64, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                "mrope_section": [4, 6, 6]}}
    assert ModelConfig.from_hf(text).mrope_section == (4, 6, 6)
    with pytest.raises(Unsupported, match="mrope_section"):
        ModelConfig.from_hf({**text, "rope_parameters": {"mrope_section": [4, 6, 8]}})
    with pytest.raises(Unsupported, match="mrope_section"):
        ModelConfig.from_hf({**text, "architectures": ["Qwen2ForCausalLM"]})
    legacy = {**text, "rope_parameters": None, "rope_scaling": {"type": "mrope",
                                                                "mrope_section": [4, 6, 6]}}
    assert ModelConfig.from_hf(legacy).mrope_section == (4, 6, 6)
