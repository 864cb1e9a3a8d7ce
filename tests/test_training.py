"""The training code of the shipped model, each stage for a few steps on one small batch: the loss of
what the stage trains falls, and what it must leave alone stays as it was. (The real run takes ~37 min
and is not part of the suite: `python -m training.train --out DIR`.)"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_gguf.demo import shapes
from training import train as T

STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cfg = T.Config(train_scenes=32, clip_batch=16, lm_batch=8, proj_batch=8, qa_batch=8, qa_polish_steps=0)
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


def test_set_parses_each_field_as_its_type():
    """`python -m training.train --set FIELD=VALUE`: ints, floats and booleans by name ("false" is False,
    not the truthy string), and a one-line error for an unknown field or a value of the wrong type."""
    assert T.Config().scaled(0.1).qa_polish_steps == T.Config().qa_polish_steps // 10  # --steps-scale covers it
    cfg = T.with_fields(T.Config(), ["qa_steps=10", "qa_lr=3e-4", "whiten=false"])
    assert (cfg.qa_steps, cfg.qa_lr, cfg.whiten) == (10, 3e-4, False)
    assert T.with_fields(cfg, ["whiten=True"]).whiten is True
    for bad, says in (("whiten=maybe", "whiten takes a bool"), ("qa_steps=1.5", "qa_steps takes a int"),
                      ("nope=1", "is not FIELD=VALUE"), ("qa_steps", "is not FIELD=VALUE")):
        with pytest.raises(ValueError, match=says):
            T.with_fields(T.Config(), [bad])
    p = subprocess.run([sys.executable, "-m", "training.train", "--out", "/nonexistent/x", "--set", "whiten=maybe"],
                       capture_output=True, text=True, cwd=Path(T.__file__).parents[1])
    assert p.returncode != 0 and p.stderr.strip().count("\n") == 0 and "whiten takes a bool" in p.stderr
    p = subprocess.run([sys.executable, "-m", "training.train", "--out", "/nonexistent/x", "--set", "clip_patch_weight=0",
                        "--set", "clip_place_weight=0.2"], capture_output=True, text=True, cwd=Path(T.__file__).parents[1])
    assert p.returncode != 0 and p.stderr.strip().count("\n") == 0 and "needs clip_patch_weight > 0" in p.stderr
    assert not Path("/nonexistent/x").exists()


def test_clip_stage_image_caption_contrast_alone(data):
    """`clip_patch_weight=0`: batches of pixels and captions only, no patch head."""
    from dataclasses import replace

    kept = data.patches
    data.patches = None
    try:
        torch.manual_seed(1)
        model = T.Contrastive(replace(data.cfg, clip_patch_weight=0.0), len(data.tok))
        assert len(data.clip_batch(0)) == 3 and not hasattr(model, "p_proj")
        assert _falls(_losses(model, model.parameters(), T.clip_step(model, data), 2e-4))
    finally:
        data.patches = kept


def test_clip_stage_with_the_patch_phrase_contrast(data):
    """`clip_patch_weight` (on by default): stage a's batches carry each patch's label and the phrases, the
    loss adds the patch/phrase term (larger than the image/caption loss alone on the same batch) and falls."""
    assert data.cfg.clip_patch_weight > 0 and data.patches is not None and not data.cfg.clip_place_weight
    torch.manual_seed(1)
    model = T.Contrastive(data.cfg, len(data.tok))
    batch = data.clip_batch(0)
    assert len(batch) == 6 and batch[3].shape == (data.cfg.clip_batch, 36) and (batch[3] >= 0).any()
    assert not hasattr(model, "q_proj")
    assert torch.equal(batch[3][: data.cfg.clip_batch // 2],
                       T.patch_labels(data.scenes, data.pixels)[
                           torch.from_numpy(data.rng("clip", 0).choice(len(data.scenes), data.cfg.clip_batch // 2,
                                                                        replace=False))])
    with torch.no_grad():
        assert model(*batch)[0] > model(*batch[:3])[0]
    assert _falls(_losses(model, model.parameters(), T.clip_step(model, data), 2e-4))


def test_clip_stage_with_the_places(data):
    """`clip_place_weight` > 0: the batches also carry the 9 places' phrases, and the loss adds each shape
    patch against its grid cell's place (larger again), through a projection of its own, and falls."""
    from dataclasses import replace

    cfg = data.cfg
    data.cfg = replace(cfg, clip_place_weight=0.2)
    try:
        torch.manual_seed(1)
        model = T.Contrastive(data.cfg, len(data.tok))
        batch = data.clip_batch(0)
        assert len(batch) == 8 and batch[4].shape[0] == len(T.PHRASES) and batch[6].shape[0] == len(shapes.POSITIONS)
        assert data.tok.decode(batch[6][0][batch[7][0] > 0], skip_special_tokens=True).strip() == shapes.POSITIONS[0]
        assert hasattr(model, "q_proj")
        with torch.no_grad():
            assert model(*batch)[0] > model(*batch[:6])[0] > model(*batch[:3])[0]
        assert _falls(_losses(model, model.parameters(), T.clip_step(model, data), 2e-4))
    finally:
        data.cfg = cfg


def test_grid_positions_say_where_each_patch_is(data):
    """`vision_position_std`: the tower's position table starts as a 2-D sine/cosine grid of that scale (the
    class token's row zero, every patch's row distinct, the patch's row and column a linear function of it),
    and nothing else of the model's initialisation changes: at 0 the table is transformers' own (std 0.02)
    and every other weight is the same draw, so the shipped run's configuration still reproduces it."""
    from dataclasses import replace

    g = T.grid_positions(6, 128, 0.5)
    assert g.shape == (37, 128) and not g[0].any() and abs(g[1:].std().item() - 0.5) < 1e-4
    assert torch.cdist(g[1:], g[1:]).add(torch.eye(36) * 1e9).min() > 0.1  # 36 distinct places
    where = torch.tensor([divmod(i, 6) for i in range(36)], dtype=torch.float64)
    x = torch.cat([g[1:].double(), torch.ones(36, 1, dtype=torch.float64)], 1)
    assert (x @ torch.linalg.pinv(x) @ where - where).abs().max() < 1e-6

    models = []
    for std in (0.0, 0.5):
        torch.manual_seed(1)
        models.append(T.Contrastive(replace(data.cfg, vision_position_std=std), len(data.tok)))
    name = "vision.embeddings.position_embedding.weight"
    plain, grid = (dict(m.state_dict()) for m in models)
    assert torch.equal(grid[name], g) and abs(plain[name].std().item() - 0.02) < 0.005
    assert plain.keys() == grid.keys() and all(torch.equal(plain[k], grid[k]) for k in plain if k != name)


def test_patch_labels_name_the_shape_each_patch_shows():
    """A small shape sits on one patch of its cell, a large one on three or four (the middle of the
    cell); every labelled patch is in a shape's cell and names that shape's colour and kind."""
    import numpy as np

    scenes = [shapes.scene("val", i) for i in range(60)]
    pixels = np.stack([np.asarray(sc.image(), dtype=np.uint8) for sc in scenes])
    labels = T.patch_labels(scenes, pixels)
    for sc, lab in zip(scenes, labels.tolist()):
        want: set[int] = set()
        for s in sc.shapes:
            row, col = divmod(s.cell, 3)
            cell = {(2 * row + a) * 6 + 2 * col + b for a in (0, 1) for b in (0, 1)}
            got = {p for p in cell if lab[p] >= 0}
            assert len(got) == 1 if s.size == "small" else len(got) >= 3
            assert {T.PHRASES[lab[p]] for p in got} == {f"{s.color} {s.shape}"}
            assert {int(T.PATCH_CELLS[p]) for p in cell} == {s.cell}  # the place a patch is contrasted with
            want |= got
        assert {p for p in range(36) if lab[p] >= 0} == want


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
    features = T.tower_features(model, data.pixels)
    step = T.llava_step(model, data, name, features)
    assert _falls(_losses(model, params, step, 3e-3 if name == "projector" else 1e-3))
    # the vision tower is frozen in both stages; the language model in stage 1
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in vision.items())
    lm_same = all(torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in lm.items())
    assert lm_same == (name == "projector")


def test_stage_2_begins_with_the_projector_alone(data, tmp_path):
    """Stage 2's first phase (`qa_frozen_steps`) trains the projector on the questions with the language
    model frozen; its final state is kept, so a stage run again goes on from it instead of training it
    again; the joint phase reads the data from the step after the frozen phase's last on."""
    from dataclasses import replace

    def fresh(seed):
        torch.manual_seed(seed)
        return T.build_llava(data.cfg, data)

    model = fresh(8)
    lm = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    proj = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    cfg = replace(data.cfg, qa_frozen_steps=4, qa_recital_steps=0, qa_steps=0, val_questions=5, whiten=False)
    T.stage_llava(cfg, tmp_path, data, model, "qa")
    trained = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    assert all(torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in lm.items())
    assert not any(torch.equal(v, trained[k]) for k, v in proj.items())
    assert torch.load(tmp_path / "qa" / "frozen" / "state.pt", weights_only=False)["step"] == 4
    # run again (the stage's model not saved yet), from other initial weights: the frozen phase's weights
    # come from its state, not from training again
    shutil.rmtree(tmp_path / "qa" / "model")
    again = fresh(9)
    T.stage_llava(cfg, tmp_path, data, again, "qa")
    assert all(torch.equal(v, again.model.multi_modal_projector.state_dict()[k]) for k, v in trained.items())
    features = T.tower_features(again, data.pixels)
    with torch.no_grad():
        a, _ = T.llava_step(again, data, "qa", features, offset=4)(0)
        b, _ = T.llava_step(again, data, "qa", features)(4)
        c, _ = T.llava_step(again, data, "qa", features)(0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_captions_and_questions_run_apart_give_the_mixed_batch_loss(data):
    """Stage 2 runs a batch's captions and its conversations and recitals as two padded groups
    (`llava_groups`): the same scenes, and the loss and token accuracy of the batch padded as one."""
    import torch.nn.functional as F

    torch.manual_seed(7)
    model = T.build_llava(data.cfg, data).eval()
    features = T.tower_features(model, data.pixels)
    groups = data.llava_groups("qa", 0, data.cfg.qa_batch, 0.4, 0.3)
    idx, ids, mask, lab = data.llava_batch("qa", 0, data.cfg.qa_batch, 0.4, 0.3)
    assert len(groups) == 2 and sorted(torch.cat([g[0] for g in groups]).tolist()) == sorted(idx.tolist())
    assert max(g[1].shape[1] for g in groups) == ids.shape[1] > min(g[1].shape[1] for g in groups)
    with torch.no_grad():
        logits = T.llava_logits(model, features[idx], ids, mask)
        want = F.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100)
        got, acc = T.llava_step(model, data, "qa", features, share=0.4, recitals=0.3)(0)
    assert torch.allclose(got, want, atol=1e-5)
    assert abs(acc - float(T.token_accuracy(logits, lab))) < 1e-6


def test_language_model_text_asks_about_a_caption_in_the_image_rows_place(data):
    """Stage b's questions come after their scene's caption, placed where the runtime puts the image
    rows (`USER: {caption}\n{question} ASSISTANT: {answer}`): the question part is token for token the
    runtime's, the caption is context (not a target), and every answer is the scene's truth."""
    ids, mask, lab = data.lm_batch(0)
    grounded = 0
    for i in range(len(ids)):
        n = int(mask[i].sum())
        seq, tgt = ids[i, :n].tolist(), lab[i, :n].tolist()
        text = data.tok.decode(seq[1:-1])
        if "ASSISTANT:" not in text:  # a caption alone: all of it is the target
            assert tgt[1:] == seq[1:]
            continue
        grounded += 1
        caption, rest = text.removeprefix("USER: ").split("\n", 1)
        question, answer = rest.split(" ASSISTANT: ")
        sc = next(s for s in data.scenes if s.caption() == caption.strip())
        q = next(q for q in sc.questions() if q.text == question)
        assert answer == q.answer.capitalize()
        tail = data.encode(f"\n{question} ASSISTANT:") + data.encode(answer) + [data.eos]
        assert seq[-len(tail):] == tail and tgt[-len(tail):] == tail  # the runtime's tokens, all targets
        assert set(tgt[:-len(tail)]) == {-100}  # BOS, "USER: " and the caption: context
    assert grounded >= len(ids) // 2
    _, _, val = data.lm_batch(T.LM_VALIDATION, answers_only=True)
    assert all(len([t for t in row.tolist() if t != -100]) <= 4 for row in val)  # answer + EOS only


def test_prompt_is_what_the_runtime_renders(data):
    """Training prompts are the Vicuna prompt the runtime renders from the shipped chat template, token
    for token (the image token repeated once per image row, as LLaVA's processor expands it)."""
    from llava_gguf.families.llava15 import VICUNA_TEMPLATE
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


def test_cached_tower_features_give_transformers_forward(data):
    """The LLaVA stages run the frozen tower once per run (`tower_features`) and the rest per step
    (`llava_logits`): the logits are LlavaForConditionalGeneration's own for the same batch."""
    torch.manual_seed(5)
    model = T.build_llava(data.cfg, data).eval()
    idx, ids, mask, _ = data.llava_batch("qa", 0, 4, 0.5)
    with torch.no_grad():
        ours = T.llava_logits(model, T.tower_features(model, data.pixels)[idx], ids, mask)
        theirs = model(pixel_values=T.Data.normalize(data.pixels[idx.numpy()]), input_ids=ids,
                       attention_mask=mask).logits
    keep = mask.bool()
    assert torch.allclose(ours[keep], theirs[keep], atol=1e-4, rtol=1e-4)


def test_whitening_changes_how_the_projector_learns_not_what_it_computes(data, tmp_path):
    """The projector trains on whitened features (`Whitening`): absorbed into `linear_1`, the model gives
    the same logits from whitened features as before from the raw ones; removed again, the weights are
    the original ones. And the whitened features are what the name says: mean 0, covariance identity
    (less in directions under the floor)."""
    torch.manual_seed(6)
    model = T.build_llava(data.cfg, data).eval()
    raw = T.tower_features(model, data.pixels)
    white = T.Whitening(raw)
    z = white.apply(raw).flatten(0, 1).double()
    assert z.mean(0).abs().max() < 1e-4
    cov = torch.cov(z.T)
    var = torch.diagonal(cov)  # uncorrelated; unit variance but in directions under the floor (less)
    assert torch.allclose(cov, torch.diag(var), atol=1e-6)
    assert (var < 1 + 1e-6).all() and (var > 1 - 1e-6).sum() > raw.shape[-1] // 2
    before = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    idx, ids, mask, _ = data.llava_batch("qa", 0, 4, 0.5)
    with torch.no_grad():
        want = T.llava_logits(model, raw[idx], ids, mask)
        white.absorb(model)
        assert not torch.allclose(model.model.multi_modal_projector.linear_1.weight, before["linear_1.weight"])
        got = T.llava_logits(model, white.apply(raw)[idx], ids, mask)
        white.remove(model)
    keep = mask.bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-4, rtol=1e-4)
    after = model.model.multi_modal_projector.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-5) for k in before)
    # kept with a stage's saved states, so a resumed stage removes exactly the whitening it trained in
    white.save(tmp_path / "whitening.pt")
    again = T.Whitening.load(tmp_path / "whitening.pt")
    assert all(torch.equal(getattr(white, k), getattr(again, k)) for k in ("mean", "basis", "inverse"))


def test_conversations_ask_only_what_the_image_answers(data):
    """A training conversation (qa_turns > 1) starts with the prompt the evaluation asks, trains only
    the answers and the EOS after each, and never asks a colour, shape or "is there" follow-up about a
    shape an earlier turn already named (its answer would be in the text)."""
    from dataclasses import replace

    import numpy as np

    d = T.Data.__new__(T.Data)
    d.__dict__.update(data.__dict__)
    d.cfg = replace(data.cfg, qa_turns=6)
    turns_seen = 0
    for i, sc in enumerate(d.scenes):
        rng = np.random.default_rng(i)
        first = sc.questions()[np.random.default_rng(i).integers(len(shapes.QUESTION_KINDS))]
        ids, lab = d.conversation(sc, rng)
        prompt = d.prompt(first.text)
        assert ids[:len(prompt)] == prompt and all(x == -100 for x in lab[:len(prompt)])
        text = d.tok.decode([t for t in ids if t != d.image_id], skip_special_tokens=True)
        segments = text.split(" ASSISTANT:")
        questions = [segments[0].split("\n", 1)[1]] + [s.split("USER: ", 1)[1] for s in segments[1:-1]]
        answers = [s.split(" USER:")[0].strip() for s in segments[1:]]
        named: set = set()
        for q_text, a in zip(questions, answers):
            q = _every_question(sc)[q_text]
            assert shapes.is_correct(a, q.answer), (q_text, a, q.answer)
            if q.kind in ("color", "shape", "exists"):
                assert not (sc.mentioned(q) & named), (text, q_text)
            named |= sc.mentioned(q)
        turns_seen += len(questions)
        # trained: each answer's tokens and one EOS after each (in place of the next turn's first token)
        trained = [x for x in lab if x != -100]
        assert trained.count(d.eos) == len(questions)
        assert len(trained) == sum(len(d.encode(a)) for a in answers) + len(questions)
    assert turns_seen > 2 * len(d.scenes)


def test_position_weight_makes_position_questions_that_much_likelier(data):
    """qa_position_weight=w: a conversation's first question asks where a shape is w times as often as
    each other kind (w=1: the uniform draw, which the test above replays)."""
    from dataclasses import replace

    import numpy as np

    d = T.Data.__new__(T.Data)
    d.__dict__.update(data.__dict__)
    pos = shapes.QUESTION_KINDS.index("position")
    for w, share in ((1.0, 1 / 5), (3.0, 3 / 7)):
        d.cfg = replace(data.cfg, qa_position_weight=w)
        rng = np.random.default_rng(0)
        kinds = [d.first_kind(rng) for _ in range(7000)]
        assert abs(kinds.count(pos) / len(kinds) - share) < 0.02, (w, kinds.count(pos))
        assert set(kinds) == set(range(len(shapes.QUESTION_KINDS)))
    d.cfg = replace(data.cfg, qa_position_weight=1.0)  # the uniform draw: one integers() call, as before the knob
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    assert all(d.first_kind(r1) == int(r2.integers(len(shapes.QUESTION_KINDS))) for _ in range(200))
    d.cfg = replace(data.cfg, qa_position_weight=1e9)
    for i, sc in enumerate(d.scenes):
        ids, _ = d.conversation(sc, np.random.default_rng(i))
        prompt = d.prompt(sc.questions()[pos].text)
        assert ids[:len(prompt)] == prompt
    d.cfg = replace(data.cfg, qa_position_weight=1.0)  # the polish phase's weight, passed past the config's
    for i, sc in enumerate(d.scenes):
        ids, _ = d.conversation(sc, np.random.default_rng(i), position_weight=1e9)
        prompt = d.prompt(sc.questions()[pos].text)
        assert ids[:len(prompt)] == prompt


def _every_question(sc: shapes.Scene) -> dict[str, shapes.Question]:
    """Every question the generator can ask about a scene, by its text, with the true answer."""
    Q = shapes.Question
    out = [Q("count", t, shapes.COUNTS[len(sc.shapes) - 1]) for t in shapes.COUNT_QUESTIONS]
    for s in sc.shapes:
        out += [Q("color", t.format(s=s.shape), s.color) for t in shapes.COLOR_QUESTIONS]
        out += [Q("shape", t.format(c=s.color), s.shape) for t in shapes.SHAPE_QUESTIONS]
        out.append(Q("position", shapes.POSITION_QUESTION.format(c=s.color, s=s.shape), s.position))
    out += [shapes.exists_question(sc, c, sh) for c in shapes.COLORS for sh in shapes.SHAPES]
    return {q.text: q for q in out}


def test_recitals_name_each_shape_then_its_attribute(data):
    """Stage 2's recital phase (`Data.recital`): after the image rows, a word for what is recited, then
    every shape of the scene named and followed by its colour, kind, position, or whether it is there
    (with one absent shape, answered "No"): only the attributes (and the EOS) are targets, each the
    scene's truth."""
    import numpy as np

    kinds = set()
    for k in range(24):
        sc = data.scenes[k]
        ids, lab = data.recital(sc, np.random.default_rng(k))
        assert len(ids) == len(lab) and ids[-1] == lab[-1] == data.eos
        start = ids.index(data.image_id) + data.n_image
        assert ids[start:start + 2] == data.encode("\n")
        kind, *words = data.tok.decode(ids[start + 2:-1]).split()
        kinds.add(kind)
        marker = len(data.encode(kind))
        assert set(lab[:start + 2 + marker]) == {-100}
        targets = data.tok.decode([t for t in lab[start + 2 + marker:-1] if t != -100]).split()
        truth = {"color": {s.shape: s.color for s in sc.shapes}, "shape": {s.color: s.shape for s in sc.shapes},
                 "Where": {f"{s.color} {s.shape}": s.position for s in sc.shapes}}.get(kind)
        if truth is not None:
            said, n = " ".join(words), 0
            for key, value in truth.items():
                assert f"{key} {value.capitalize()}" in said
                n += len(value.split())
            assert len(targets) == n
        else:
            assert kind == "there"
            pairs = [(words[i], words[i + 1], words[i + 2]) for i in range(0, len(words), 3)]
            present = {(s.color, s.shape) for s in sc.shapes}
            assert [p[2] for p in pairs].count("No") == 1 and targets == [p[2] for p in pairs]
            assert all((c, sh) in present if a == "Yes" else (c, sh) not in present for c, sh, a in pairs)
    assert kinds == {"color", "shape", "Where", "there"}


def test_recital_phase_trains_both_then_the_questions_go_on_after_it(data, tmp_path, monkeypatch):
    """With `qa_recital_steps`, stage 2's phases run frozen -> recitals -> questions: the frozen phase on
    questions alone, the recital phase on recitals alone and training the language model too (its final
    state kept), and the question phase's data from the step after both earlier phases' on, with its
    share of captions and recitals. With `qa_polish_steps`, the polish phase follows the question phase
    (whose final state is then kept too) on the data after it, first questions drawn with
    `qa_polish_position_weight` and every earlier phase's with `qa_position_weight`."""
    from dataclasses import replace

    torch.manual_seed(10)
    model = T.build_llava(data.cfg, data)
    cfg = replace(data.cfg, qa_frozen_steps=2, qa_recital_steps=3, qa_steps=2, qa_polish_steps=2, val_questions=5,
                  whiten=False)
    lm = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    calls = []
    real = data.llava_groups

    def recorded(stage, step, batch, caption_share, recital_share=0.0, position_weight=None):
        calls.append((step, caption_share, recital_share, position_weight))
        return real(stage, step, batch, caption_share, recital_share, position_weight)

    monkeypatch.setattr(data, "llava_groups", recorded)
    T.stage_llava(cfg, tmp_path, data, model, "qa")
    monkeypatch.undo()
    joint = (cfg.qa_caption_share, cfg.qa_recital_share)
    w = cfg.qa_polish_position_weight
    assert w != cfg.qa_position_weight
    assert calls == [(0, 0.0, 0.0, None), (1, 0.0, 0.0, None), (2, 0.0, 1.0, None), (3, 0.0, 1.0, None),
                     (4, 0.0, 1.0, None), (5, *joint, None), (6, *joint, None), (7, *joint, w), (8, *joint, w)]
    assert torch.load(tmp_path / "qa" / "recital" / "state.pt", weights_only=False)["step"] == 3
    assert torch.load(tmp_path / "qa" / "state.pt", weights_only=False)["step"] == 2
    # interrupted in the polish phase (the stage's model not saved, the polish phase's state not either): run
    # again (the same assembled model: the frozen tower's features are computed before any state loads),
    # every earlier phase loads its final state and only the polish phase trains, to the same weights
    final = {k: v.clone() for k, v in model.state_dict().items()}
    shutil.rmtree(tmp_path / "qa" / "model")
    calls.clear()
    torch.manual_seed(10)
    again = T.build_llava(data.cfg, data)
    monkeypatch.setattr(data, "llava_groups", recorded)
    T.stage_llava(cfg, tmp_path, data, again, "qa")
    monkeypatch.undo()
    assert calls == [(7, *joint, w), (8, *joint, w)]
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in final.items())
    assert not all(torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in lm.items())
    features = T.tower_features(model, data.pixels)
    step = T.llava_step(model, data, "qa", features, share=0.0, recitals=1.0)
    params = T.llava_params(model, "qa")
    assert _falls(_losses(model, params, step, 1e-3))


def test_token_embeddings_start_at_the_configured_scale(data, tmp_path):
    """`text_embed_std`: stage b's language model starts with its token embeddings at that standard
    deviation (transformers' 0.02 leaves the token's identity swamped in the residual stream)."""
    from dataclasses import replace

    cfg = replace(data.cfg, lm_steps=0, text_embed_std=1.0)
    lm = T.stage_lm(cfg, tmp_path, data)
    std = float(lm.model.embed_tokens.weight.std())
    assert 0.9 < std < 1.1


def test_export_measures_the_saved_checkpoint_on_the_test_split(data, tmp_path):
    """`export` saves a float16 checkpoint with training.json and a model card; the test split figures in
    both are those of the saved weights as transformers loads them (fp32), and the card says "interim"
    while they are under 95%. A directory this command did not write is not replaced."""
    import json

    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(4)
    model = T.build_llava(data.cfg, data)
    dest = tmp_path / "m"
    T.export(data.cfg, model, data, dest, {"qa": {"val_accuracy": 0.5}}, 1.0, test_scenes=3)
    test = json.loads((dest / "training.json").read_text())["metrics"]["test"]
    pairs = shapes.test_split(3)
    assert test["n"] == len(pairs) == 15 and set(test["by_kind"]) == set(shapes.QUESTION_KINDS)
    saved = LlavaForConditionalGeneration.from_pretrained(dest, dtype=torch.float32)
    assert next(LlavaForConditionalGeneration.from_pretrained(dest).parameters()).dtype == torch.float16
    assert test["accuracy"] == shapes.accuracy(shapes.hf_answers(saved, data.tok, pairs), pairs)
    card = (dest / "README.md").read_text()
    assert f"transformers at fp32: {test['accuracy']:.1%}" in card
    assert ("Status: interim" in card) == (test["accuracy"] < 0.95)
    assert not list(tmp_path.glob("m.*"))  # no .partial or .old left behind
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(SystemExit):
        T.export(data.cfg, model, data, other, {}, 1.0, test_scenes=1)
    assert list(other.iterdir()) == []


def test_status_note_names_the_kind_left_behind():
    by_kind = {"color": 1.0, "shape": 0.99, "count": 0.98, "position": 0.73, "exists": 0.998}
    note = " ".join(T.status_note({"accuracy": 0.944, "by_kind": by_kind}).split())
    assert note.startswith("**Status: interim**") and "94.4%" in note and "position questions (73.0%" in note and "98.0%-100.0%" in note
    assert T.status_note({"accuracy": 0.95, "by_kind": by_kind}) == ""


def test_a_run_directory_from_before_a_field_existed_is_the_same_run(tmp_path):
    """`same_run`: a stored config.json without a field that was added since is the run with that field at
    its default (or, where the default is not what such a run did, at `BEFORE_FIELD`'s value), not at another
    value; a config that differs in a stored field is another run."""
    import json
    from dataclasses import asdict, replace

    stored = tmp_path / "config.json"
    assert T.same_run(stored, T.Config())  # nothing stored yet
    old = asdict(T.Config())
    del old["qa_position_weight"]
    stored.write_text(json.dumps(old))
    assert T.same_run(stored, T.Config())
    assert not T.same_run(stored, replace(T.Config(), qa_position_weight=3.0))
    assert not T.same_run(stored, T.Config(seed=1))
    # a run from before the polish phase had none: it is the run with qa_polish_steps=0, not the default's
    del old["qa_polish_steps"], old["qa_polish_lr"], old["qa_polish_position_weight"]
    stored.write_text(json.dumps(old))
    assert T.Config().qa_polish_steps and not T.same_run(stored, T.Config())
    assert T.same_run(stored, replace(T.Config(), qa_polish_steps=0))
    # the command refuses it in one line, naming the way on only where that way is this run
    for sets, hint in (([], True), (["--set", "qa_lr=1e-3"], False)):
        p = subprocess.run([sys.executable, "-m", "training.train", "--out", str(tmp_path), *sets],
                           capture_output=True, text=True, cwd=Path(T.__file__).parents[1])
        assert p.returncode != 0 and p.stderr.strip().count("\n") == 0 and "another configuration" in p.stderr
        assert ("--set qa_polish_steps=0" in p.stderr) == hint, p.stderr
    assert json.loads(stored.read_text()) == old and sorted(f.name for f in tmp_path.iterdir()) == ["config.json"]
