"""The diffusers host on a real (tiny, seeded) StableDiffusionPipeline with SD's CLIP tokenizer."""

import numpy as np
import pytest
import torch

from lib_spm import GateSettings
from lib_spm.hosts.diffusers import SPMPipeline, TextEncoderConcepts, row_texts
from models import tiny_pipeline
from spm_helpers import hook_counts, random_spm


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_row_texts_follow_the_pipeline_layout():
    assert row_texts(["a", "b"], ["n1", "n2"], 2, True) == ["n1", "n1", "n2", "n2", "a", "a", "b", "b"]
    assert row_texts(["a"], None, 1, True) == ["", "a"]
    assert row_texts(["a", "b"], None, 1, False) == ["a", "b"]
    with pytest.raises(ValueError):
        row_texts(["a", "b"], ["n"], 1, True)


def test_concept_encoder_uses_sd_token_ids(pipe):
    enc = TextEncoderConcepts([pipe.tokenizer], [pipe.text_encoder])
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert enc.tokens(["a red circle"]) == [(320, 736, 7117)]
    e = enc.encode(["circle", "a blue square"])
    assert e.shape == (2, 77, pipe.text_encoder.config.hidden_size)


def test_pipeline_rows_get_their_own_gates_and_detach_is_exact(pipe):
    spm = random_spm(pipe.unet, ["circle"], std=0.5)
    kw = dict(num_inference_steps=2, guidance_scale=4.0, height=16, width=16, output_type="np")
    prompts = ["a red circle", "a blue square"]
    base = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kw).images
    before = hook_counts(pipe.unet)
    with SPMPipeline(pipe, [(spm, 1.0)], gate=GateSettings(metric="tokenuni")) as run:
        images = run(prompts, negative_prompt=["", ""], generator=torch.Generator().manual_seed(0), **kw).images
        gates = run.session.last_gates[:, 0].tolist()
    # rows: uncond "", uncond "", cond "a red circle", cond "a blue square"
    assert gates == [0.0, 0.0, 1.0, 0.0]
    assert not np.allclose(images[0], base[0]) and np.array_equal(images[1], base[1])
    assert hook_counts(pipe.unet) == before
    assert np.array_equal(pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kw).images, base)
