"""The worker's vision-language models against transformers, for each family: LLaVA (its own
CLIP tower, projector and decoder) and Qwen2.5-VL (window-attention ViT, patch merger, the Qwen2
decoder with M-RoPE positions).

Image features must equal transformers' ``get_image_features``; then whole requests with 0, 1
and 2 images run through the runner as the scheduler drives it, with prefill chunks that split
placeholder runs across steps and blocks (and, for Qwen2.5-VL, so its 3-D positions and the
offset after each image), and must give transformers' greedy tokens exactly and its
log-probabilities at every prompt position within 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import vlm_cases
from family_models import runner_for
from worker_steps import BS, Driver

from pagewire.images import pixels
from pagewire.v1 import common_pb2

N_OUT = 8
TEXTS = ("What is in this picture?", "Describe both, briefly.", "Say something.")


def test_image_features_equal_transformers(vlm_model: Path) -> None:
    runner = runner_for(vlm_model)
    images = [vlm_cases.image(0), vlm_cases.image(1), vlm_cases.image(3)]
    inputs = vlm_cases.hf_inputs(vlm_model, "hi", images)
    grid = {"image_grid_thw": inputs["image_grid_thw"]} if "image_grid_thw" in inputs else {}
    with torch.inference_mode():
        ref = vlm_cases.hf_model(vlm_model).model.get_image_features(
            pixel_values=inputs["pixel_values"], **grid).pooler_output
    ours = runner.model.vision
    assert ours is not None
    for im, want in zip(vlm_cases.image_inputs(vlm_model, inputs), ref, strict=True):
        got = ours.encode(torch.from_numpy(pixels(im).copy()), tuple(im.grid_thw))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1 << 30, 7])
def test_requests_with_0_1_2_images_match_transformers(vlm_model: Path, chunk: int) -> None:
    runner = runner_for(vlm_model)
    driver = Driver(runner)
    cases = {}
    for sid, n_images in enumerate((0, 1, 2, 1), start=1):
        imgs = [vlm_cases.image(sid * 3 + j) for j in range(n_images)]
        inputs = vlm_cases.hf_inputs(vlm_model, TEXTS[sid % 3], imgs)
        ids = inputs["input_ids"][0].tolist()
        images = vlm_cases.image_inputs(vlm_model, inputs)
        assert len(images) == n_images
        cases[sid] = (inputs, ids)
        params = common_pb2.SamplingParams(temperature=0.0, prompt_logprobs=0)
        driver.add(sid, ids, params, images=images)
    got = driver.run(N_OUT, chunk=chunk)
    for sid, (inputs, ids) in cases.items():
        assert got[sid] == vlm_cases.hf_generate(vlm_model, inputs, N_OUT), sid
        with torch.inference_mode():
            ref = vlm_cases.hf_model(vlm_model)(**inputs).logits[0].float().log_softmax(-1)
        lps = [lp for c in driver.tracks[sid].prompt_logprobs for lp in c.positions]
        want = torch.tensor([float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)])
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in lps]), want, atol=1e-4,
                                   rtol=0)
    # Every image encoded once, however many chunks its placeholders were split over.
    assert runner.encoder.encoded == 4


def test_a_different_image_changes_the_answer(vlm_model: Path) -> None:
    """The oracle is sharp: the image, not only the text, decides the greedy tokens."""
    outs = {
        tuple(vlm_cases.hf_generate(vlm_model, vlm_cases.hf_inputs(
            vlm_model, TEXTS[0], [vlm_cases.image(seed)]), N_OUT))
        for seed in range(4)
    }
    assert len(outs) == 4


def test_preempted_image_request_recomputes_the_same_tokens(vlm_model: Path) -> None:
    runner = runner_for(vlm_model)
    driver = Driver(runner)
    inputs = vlm_cases.hf_inputs(vlm_model, TEXTS[1], [vlm_cases.image(5), vlm_cases.image(6)])
    ids = inputs["input_ids"][0].tolist()
    images = vlm_cases.image_inputs(vlm_model, inputs)
    driver.add(1, ids, common_pb2.SamplingParams(temperature=0.0), images=images)
    driver.run(3, chunk=9)
    driver.preempt(1)
    assert driver.run(N_OUT, chunk=9)[1] == vlm_cases.hf_generate(vlm_model, inputs, N_OUT)
    assert runner.encoder.encoded == 4  # twice each: the resend rebuilt the cache


def test_a_prefix_hit_that_starts_inside_an_image_gives_the_same_tokens(vlm_model: Path
                                                                        ) -> None:
    """The scheduler reuses whole cached blocks, so a hit may end inside a placeholder run: the
    worker gets the sequence ``new`` from there with all its images, encodes the cut image for
    the rest of its run and (Qwen2.5-VL) positions every token after the earlier images."""
    runner = runner_for(vlm_model)
    driver = Driver(runner)
    inputs = vlm_cases.hf_inputs(vlm_model, TEXTS[2], [vlm_cases.image(7), vlm_cases.image(8)])
    ids = inputs["input_ids"][0].tolist()
    images = vlm_cases.image_inputs(vlm_model, inputs)
    greedy = common_pb2.SamplingParams(temperature=0.0)
    driver.add(1, ids, greedy, images=images)
    driver.run(N_OUT, chunk=9)
    second = images[1]
    cached = (second.offset + second.length // 2) // BS * BS  # whole blocks, mid second image
    assert second.offset < cached < second.offset + second.length
    driver.add_prefix_hit(2, 1, cached, ids, greedy, images=images)
    out = driver.run(N_OUT, chunk=5)
    assert out[2] == out[1] == vlm_cases.hf_generate(vlm_model, inputs, N_OUT)


def test_pixels_round_trip_through_the_message(llava_model: Path) -> None:
    inputs = vlm_cases.hf_inputs(llava_model, "x", [vlm_cases.image(2)])
    (im,) = vlm_cases.image_inputs(llava_model, inputs)
    assert (pixels(im) == inputs["pixel_values"][0].numpy()).all()
    assert im.length == 36 and len(im.hash) == 16


def test_a_sparse_llava_hf_config_reads_as_transformers_reads_it() -> None:
    """llava-hf's config.json leaves most of the decoder to LlamaConfig's defaults."""
    from transformers import LlavaConfig

    from pagewire.model_dir import text_config
    from worker_svc.models.config import ModelConfig
    from worker_svc.models.vision import VisionConfig

    hf = {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
        "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
        "projector_hidden_act": "gelu", "tie_word_embeddings": False, "torch_dtype": "float16",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures":
                        ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                        "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                        "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                          "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    }
    ours = ModelConfig.from_hf(text_config(hf))
    ref = LlavaConfig(**{k: v for k, v in hf.items() if k != "architectures"}).text_config
    assert (ours.hidden_size, ours.intermediate_size, ours.num_hidden_layers,
            ours.num_attention_heads, ours.num_key_value_heads, ours.head_dim,
            ours.vocab_size) == (ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers,
                                 ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim,
                                 ref.vocab_size) == (4096, 11008, 32, 32, 32, 128, 32064)
    assert not ours.tie_word_embeddings and ours.activation == "silu"
    vision = VisionConfig.from_hf(hf)
    assert vision.tokens_per_image == 576 and vision.num_layers == 23 and vision.act == "quick_gelu"


def test_a_flat_qwen2_5_vl_hub_config_reads_as_transformers_reads_it() -> None:
    """Qwen2.5-VL's hub config.json keeps the decoder's keys at the top level and names M-RoPE
    in transformers 4's rope_scaling; transformers moves them into its text config."""
    from transformers import Qwen2_5_VLConfig

    from pagewire.model_dir import text_config
    from worker_svc.models.config import ModelConfig
    from worker_svc.models.qwen_vision import QwenVisionConfig

    hf = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
        "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
        "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28,
        "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 152064,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                          "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                          "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                          "temporal_patch_size": 2},
    }
    ours = ModelConfig.from_hf(text_config(hf))
    ref = Qwen2_5_VLConfig(**{k: v for k, v in hf.items() if k != "architectures"})
    t, v = ref.text_config, ref.vision_config
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_key_value_heads, ours.head_dim,
            ours.vocab_size, ours.rms_norm_eps) == (t.hidden_size, t.num_hidden_layers,
                                                     t.num_key_value_heads, 128, t.vocab_size,
                                                     t.rms_norm_eps)
    assert ours.mrope_section == tuple(t.rope_parameters["mrope_section"]) == (16, 24, 24)
    assert ours.rope["full_attention"].theta == t.rope_parameters["rope_theta"]
    assert ours.qkv_bias and not ours.tie_word_embeddings and ours.sliding_window is None
    vision = QwenVisionConfig.from_hf(hf)
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.window_size,
            vision.merge, vision.in_channels, vision.out_hidden_size, vision.full_blocks) == (
        v.depth, v.hidden_size, v.num_heads, v.window_size, v.spatial_merge_size,
        v.in_channels, v.out_hidden_size, frozenset(v.fullatt_block_indexes))
    assert vision.image_token_id == ref.image_token_id
