"""The models each stage trains, as transformers builds them: the CLIP tower with its contrastive text side
(`Contrastive`), the language model's and the assembled LLaVA's configurations, the frozen tower's features
computed once (`tower_features`) and the rest of LLaVA's forward from them (`llava_logits`), and the
projector's whitened coordinates (`Whitening`)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llava_gguf.demo import shapes
from training.config import Config
from training.data import PATCH_CELLS, Data


def vision_config(cfg: Config):
    from transformers import CLIPVisionConfig  # heavy: seconds to import

    return CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * 4,
                            num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                            image_size=shapes.IMAGE_SIZE, patch_size=14, projection_dim=cfg.text_hidden,
                            hidden_act="quick_gelu")


def text_config(cfg: Config, vocab: int, pad_id: int):
    from transformers import LlamaConfig  # heavy: seconds to import

    return LlamaConfig(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_ff, num_hidden_layers=cfg.text_layers,
                       num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads, vocab_size=vocab,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=pad_id, tie_word_embeddings=False)


def grid_positions(side: int, dim: int, std: float) -> torch.Tensor:
    """Position embeddings for the class token and a side x side patch grid (row-major), as MAE's fixed 2-D
    sine/cosine table: half the channels a patch's row at several frequencies, half its column; the class
    token's row zeros; scaled to `std` over the patch rows. transformers initialises CLIP's positions at std
    0.02 against patch embeddings of ~0.5, and a contrastive objective that never needs a shape's place does
    not grow them (0.03 after the shipped run's stage a): the tower's features then hardly say where a patch is."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angle = coord[:, None] * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    table = torch.cat(parts, dim=1)
    table = torch.nn.functional.pad(table, (0, dim - table.shape[1]))
    table = table - table.mean(0)
    table = table * (std / table.std())
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


class Contrastive(torch.nn.Module):
    """CLIP: the vision tower and a small text encoder, each pooled and projected, InfoNCE both ways."""

    def __init__(self, cfg: Config, vocab: int) -> None:
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionModel  # heavy: seconds to import

        self.vision = CLIPVisionModel(vision_config(cfg))
        if cfg.vision_position_std:
            with torch.no_grad():
                side = shapes.IMAGE_SIZE // self.vision.config.patch_size
                table = grid_positions(side, cfg.vision_hidden, cfg.vision_position_std)
                self.vision.embeddings.position_embedding.weight.copy_(table)
        self.text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=64, hidden_act="quick_gelu",
                                                 bos_token_id=1, eos_token_id=2, pad_token_id=0))
        self.v_proj = torch.nn.Linear(cfg.vision_hidden, 128, bias=False)
        self.t_proj = torch.nn.Linear(128, 128, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.patch_weight = cfg.clip_patch_weight
        if self.patch_weight:
            self.p_proj = torch.nn.Linear(cfg.vision_hidden, 128, bias=False)
            self.place_weight = cfg.clip_place_weight
            if self.place_weight:
                self.q_proj = torch.nn.Linear(cfg.vision_hidden, 128, bias=False)

    def embed_text(self, ids, mask):
        h = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.normalize(self.t_proj(h[torch.arange(len(ids)), mask.sum(1) - 1]), dim=-1)  # end of text

    def forward(self, pixels, ids, mask, patches=None, phrase_ids=None, phrase_mask=None, place_ids=None,
                place_mask=None):
        """InfoNCE between images and captions; with `patches` (`patch_labels`), also each patch that shows
        a shape against the text embeddings of every colour-and-kind phrase: at the layer LLaVA reads, a
        patch should say what it shows itself. Without it the features at a patch say only in part which
        shape is there (a large shape spans 2x2 patches, each seeing a quarter of it: a linear probe on the
        mean of a cell's patches read the kind 80% of the time, with it 99.8%), and the language model cannot find the
        rows of the shape a question names. With `place_ids` (the 9 places' phrases), each such patch is also
        contrasted with the place of its grid cell, through a projection of its own: the features then say
        where a shape is as well, apart from what it is (`clip_place_weight`, off by default). Without it a
        linear probe on a shape's patch reads its cell 15% of the time (chance 11%), and the language model
        has only the order of the image rows to go by ("Where is ...?" 73% right, every other kind 98.8-100%);
        with it, stage 2 lost the shape lookup (weight 1: 67.6% on validation, shape questions 24%; weight
        0.2: 67.8% on the test split, shape 37.8%, position 71.0%)."""
        o = self.vision(pixel_values=pixels, output_hidden_states=patches is not None)
        v = F.normalize(self.v_proj(o.pooler_output), dim=-1)
        t = self.embed_text(ids, mask)
        scale = self.logit_scale.exp().clamp(max=100)
        logits = scale * v @ t.T
        target = torch.arange(len(ids))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        if patches is not None:
            rows = o.hidden_states[-2][:, 1:][patches >= 0]  # LLaVA's vision_feature_layer, class token dropped
            plog = scale * F.normalize(self.p_proj(rows), dim=-1) @ self.embed_text(phrase_ids, phrase_mask).T
            loss = loss + self.patch_weight * F.cross_entropy(plog, patches[patches >= 0])
            if place_ids is not None:
                qlog = scale * F.normalize(self.q_proj(rows), dim=-1) @ self.embed_text(place_ids, place_mask).T
                cells = PATCH_CELLS.expand_as(patches)[patches >= 0]
                loss = loss + self.place_weight * F.cross_entropy(qlog, cells)
        return loss, (logits.argmax(1) == target).float().mean()


def build_llava(cfg: Config, data: Data):
    from transformers import LlavaConfig, LlavaForConditionalGeneration  # heavy: seconds to import

    lc = LlavaConfig(vision_config=vision_config(cfg), text_config=text_config(cfg, len(data.tok), data.pad_id),
                     image_token_id=data.image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
                     projector_hidden_act="gelu", image_seq_length=data.n_image)
    return LlavaForConditionalGeneration(lc)

def tower_features(model, pixels: np.ndarray, chunk: int = 256) -> torch.Tensor:
    """What LLaVA feeds its projector for these images: the vision tower's hidden states at
    `vision_feature_layer`, class token dropped ("default" strategy). The tower is frozen in both LLaVA
    stages, so each stage computes them once instead of at every step."""
    layer = model.config.vision_feature_layer
    assert model.config.vision_feature_select_strategy == "default"
    out = []
    with torch.no_grad():
        for k in range(0, len(pixels), chunk):
            hs = model.model.vision_tower(pixel_values=Data.normalize(pixels[k:k + chunk]),
                                          output_hidden_states=True).hidden_states
            out.append(hs[layer][:, 1:].clone())
    return torch.cat(out)


def llava_logits(model, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LlavaForConditionalGeneration's forward from precomputed tower features: projector, image rows
    put in place of the image tokens, language model."""
    rows = model.model.multi_modal_projector(features)
    emb = model.model.language_model.embed_tokens(ids)
    emb = emb.masked_scatter((ids == model.config.image_token_id).unsqueeze(-1), rows.to(emb.dtype))
    out = model.model.language_model(inputs_embeds=emb, attention_mask=mask)
    return model.lm_head(out.last_hidden_state)


class Whitening:
    """PCA whitening of the tower features, folded into the projector's first layer while it trains.

    The tower's features are far from isotropic (one direction holds ~57% of the variance, the smallest
    ~0.002% each), and Adam moves every weight by about the same amount whatever the scale of its input,
    so a projector reading the raw features learns along the strong directions (colour, position) and
    barely along the weak ones, where the shape of an object is. With stage 2's questions of all kinds
    mixed, an earlier run never learnt to read shapes (27% on its test split, chance 20%). Training the
    projector in whitened coordinates instead (`linear_1` takes z with x - mean = A z, unit variance in
    every principal direction above a floor) learnt them (one-shape scenes, 400 steps: 93% against 23%). The function
    is the same at every step: the whitening is a reparametrisation of `linear_1`, absorbed before and
    removed after training, so the saved checkpoint is a plain LLaVA reading the tower's features."""

    def __init__(self, features: torch.Tensor, floor: float = 3e-3) -> None:
        flat = features.flatten(0, -2).double()
        self.mean = flat.mean(0)
        ev, u = torch.linalg.eigh(torch.cov(flat.T))
        ev = ev.clamp_min(floor * float(ev.mean()))  # near-empty directions: amplified at most ~1/sqrt(floor)
        self.basis = u * ev.sqrt()  # A
        self.inverse = (u / ev.sqrt()).T  # A^-1

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".partial")
        torch.save({"mean": self.mean, "basis": self.basis, "inverse": self.inverse}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Whitening:
        w = cls.__new__(cls)
        st = torch.load(path, weights_only=True)
        w.mean, w.basis, w.inverse = st["mean"], st["basis"], st["inverse"]
        return w

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.double() - self.mean) @ self.inverse.T).float()

    def absorb(self, model) -> None:
        """`linear_1` from reading x to reading z: W x + b = (W A) z + (b + W mean)."""
        lin = model.model.multi_modal_projector.linear_1
        with torch.no_grad():
            w = lin.weight.double()
            lin.bias.copy_((lin.bias.double() + w @ self.mean).float())
            lin.weight.copy_((w @ self.basis).float())

    def remove(self, model) -> None:
        """Back to reading x: W' z + b' = (W' A^-1) x + (b' - W' A^-1 mean)."""
        lin = model.model.multi_modal_projector.linear_1
        with torch.no_grad():
            w = lin.weight.double() @ self.inverse
            lin.weight.copy_(w.float())
            lin.bias.copy_((lin.bias.double() - w @ self.mean).float())
