"""The training code of the shipped model, each stage for a few steps on one small batch: the loss of
what the stage trains falls, and what it must leave alone stays as it was. (The real run takes ~40 min
and is not part of the suite: `python -m training.train --out DIR`.)"""
from __future__ import annotations

import pytest
import torch

from llava_gguf import shapes
from training import train as T

STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cfg = T.Config(train_scenes=32, clip_batch=16, lm_batch=8, proj_batch=8, qa_batch=8)
    tok = tmp_path_factory.mktemp("tok")
    T.write_tokenizer(tok, shapes.corpus(300), sp_vocab=cfg.sp_vocab, image_size=shapes.IMAGE_SIZE)
    torch.manual_seed(0)
    return T.Data(cfg, tok)


def _losses(module, params, step, lr: float) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr)
    out = []
    module.train()
    for _ in range(STEPS):
        loss, _ = step(0)  # the same batch each time
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def _falls(losses: list[float]) -> bool:
    """The last three steps' mean at least 10% under the first step's loss, and under the first three's."""
    return sum(losses[-3:]) / 3 < min(0.9 * losses[0], sum(losses[:3]) / 3)


def test_clip_stage(data):
    torch.manual_seed(1)
    model = T.Contrastive(data.cfg, len(data.tok))
    assert _falls(_losses(model, model.parameters(), T.clip_step(model, data), 2e-4))


def test_language_model_stage(data):
    from transformers import LlamaForCausalLM

    torch.manual_seed(2)
    model = LlamaForCausalLM(T.text_config(data.cfg, len(data.tok), data.pad_id))
    assert _falls(_losses(model, model.parameters(), T.lm_step(model, data), 1e-3))


@pytest.mark.parametrize("name", ["projector", "qa"])
def test_llava_stages(data, name):
    torch.manual_seed(3)
    model = T.build_llava(data.cfg, data)
    params = T.llava_params(model, name)
    vision = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    lm = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    assert _falls(_losses(model, params, T.llava_step(model, data, name), 3e-3 if name == "projector" else 1e-3))
    # the vision tower is frozen in both stages; the language model in stage 1
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in vision.items())
    lm_same = all(torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in lm.items())
    assert lm_same == (name == "projector")


def test_prompt_is_what_the_runtime_renders(data):
    """Training prompts are the Vicuna prompt the runtime renders from the shipped chat template, token
    for token (the image token repeated once per image row, as LLaVA's processor expands it)."""
    from llava_gguf.convert.families.llava15 import VICUNA_TEMPLATE
    from llava_gguf.runtime.prompt import IMAGE_PLACEHOLDER, Message, render_with_images

    q = shapes.scene("test", 0).questions()[0]
    text = render_with_images([VICUNA_TEMPLATE], [Message("user", q.text, n_images=1)], bos="<s>", eos="</s>")
    head, tail = text.split(IMAGE_PLACEHOLDER)
    expected = ([data.bos] + data.encode(head) + [data.image_id] * data.n_image + data.encode(tail))
    assert data.prompt(q.text) == expected
    assert data.prompt(q.text) == shapes.hf_prompt(data.tok, q.text, data.image_id, data.n_image)


def test_an_interrupted_stage_resumes_to_the_same_weights(data, tmp_path):
    """A stage stopped after its last saved state and run again ends with the weights of an
    uninterrupted run: the data of a step, the learning rate and the optimizer state are restored."""
    from transformers import LlamaForCausalLM

    def fresh():
        torch.manual_seed(4)
        return LlamaForCausalLM(T.text_config(data.cfg, len(data.tok), data.pad_id))

    straight = fresh()
    T.run_stage("lm", tmp_path / "a", straight, straight.parameters(), 6, 1e-3, T.lm_step(straight, data),
                save_every=3)

    class Stop(Exception):
        pass

    first = fresh()
    step = T.lm_step(first, data)

    def stops_at_4(i):
        if i == 4:
            raise Stop
        return step(i)

    stops_at_4.metric = step.metric
    with pytest.raises(Stop):
        T.run_stage("lm", tmp_path / "b", first, first.parameters(), 6, 1e-3, stops_at_4, save_every=3)
    resumed = fresh()  # a new process: new model, state from disk (step 3)
    T.run_stage("lm", tmp_path / "b", resumed, resumed.parameters(), 6, 1e-3, T.lm_step(resumed, data), save_every=3)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not torch.allclose(a["lm_head.weight"], fresh().state_dict()["lm_head.weight"])
