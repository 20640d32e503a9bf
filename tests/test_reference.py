"""The reference must be right before anything is compared with it: each part against an independent
float64 formula written out here, and generation against full no-cache forwards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, random_prompt

from flamingo_fast import masking
from flamingo_fast.config import from_name
from flamingo_fast.reference.media import PerceiverResampler, VisionTransformer
from flamingo_fast.reference.model import build_reference
from flamingo_fast.reference.xattn import GatedCrossAttentionBlock

TINY = from_name("tiny")


def layer_norm64(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()


def gelu64(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def feed_forward64(x, ff):
    h = layer_norm64(x, ff[0]) @ ff[1].weight.double().T
    return gelu64(h) @ ff[3].weight.double().T


def gated_block_formula(block, x, media, text_time, immediate: bool, pre_image_bug: bool):
    """Token by token: which latents it may see, softmax over them, gate, residual; then the gated FF."""
    attn = block.attn
    x, media = x.double(), None if media is None else media.double()
    b_size, t_size, _ = x.shape
    heads, dh = attn.heads, attn.dim_head
    wq, wkv, wo = attn.to_q.weight.double(), attn.to_kv.weight.double(), attn.to_out.weight.double()
    out = torch.zeros_like(x)
    for b in range(b_size):
        for i in range(t_size):
            t = int(text_time[b, i])
            n_img = 0 if media is None else media.shape[1]
            if immediate:
                images = [t - 1] if t > 0 else []
            else:
                images = list(range(t)) if t > 0 else (list(range(n_img)) if pre_image_bug else [])
            if not images:
                continue
            latents = torch.cat([media[b, j] for j in images])  # [n_keys, Dv]
            q = layer_norm64(x[b, i], attn.norm) @ wq.T
            kv = latents @ wkv.T
            k, v = kv[:, : heads * dh], kv[:, heads * dh :]
            head_outs = []
            for h in range(heads):
                qh, kh, vh = q[h * dh : (h + 1) * dh], k[:, h * dh : (h + 1) * dh], v[:, h * dh : (h + 1) * dh]
                if t == 0:  # the OpenFlamingo bug: all scores equal, so uniform weights
                    weights = torch.full((kh.shape[0],), 1.0 / kh.shape[0], dtype=torch.float64)
                else:
                    weights = torch.softmax(kh @ qh / math.sqrt(dh), dim=0)
                head_outs.append(weights @ vh)
            out[b, i] = torch.cat(head_outs) @ wo.T
    x = x + math.tanh(block.attn_gate.item()) * out
    return x + math.tanh(block.ff_gate.item()) * feed_forward64(x, block.ff)


def make_block(immediate: bool, bug: bool = False) -> GatedCrossAttentionBlock:
    config = TINY.replace(only_attend_immediate_media=immediate, openflamingo_pre_image_bug=bug)
    block = GatedCrossAttentionBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.4)
    return block


# (lang_x layout per row as a list of image-token positions, seq len, images in vision tensor)
LAYOUTS = {
    "no_images": ([[], []], 9, 0),
    "one_image_at_start": ([[0], [0]], 7, 1),
    "text_before_first_image": ([[3], [5, 6]], 11, 2),
    "several_images": ([[0, 4, 9], [2, 3, 10]], 13, 3),
}


@pytest.mark.parametrize("immediate", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gated_cross_attention_block_matches_formula(immediate, layout):
    positions, t_size, n_img = LAYOUTS[layout]
    block = make_block(immediate)
    b_size = len(positions)
    ids = torch.zeros(b_size, t_size, dtype=torch.long)
    for b, row in enumerate(positions):
        ids[b, row] = TINY.media_token_id
    text_time = masking.text_time(ids, TINY.media_token_id)
    x = torch.randn(b_size, t_size, TINY.lm.hidden_size)
    media = torch.randn(b_size, n_img, 64, TINY.vision_dim) if n_img else None
    expected = gated_block_formula(block, x, media, text_time, immediate, pre_image_bug=False)
    assert_close(block(x, media, text_time), expected.float(), dtype=torch.float32)


def test_openflamingo_pre_image_bug_is_opt_in():
    positions, t_size, n_img = LAYOUTS["text_before_first_image"]
    ids = torch.zeros(2, t_size, dtype=torch.long)
    for b, row in enumerate(positions):
        ids[b, row] = TINY.media_token_id
    text_time = masking.text_time(ids, TINY.media_token_id)
    x, media = torch.randn(2, t_size, TINY.lm.hidden_size), torch.randn(2, n_img, 64, TINY.vision_dim)
    buggy = make_block(immediate=False, bug=True)
    expected = gated_block_formula(buggy, x, media, text_time, immediate=False, pre_image_bug=True)
    assert_close(buggy(x, media, text_time), expected.float(), dtype=torch.float32)
    # Default: text before the first image gets exactly no cross-attention (only the FF branch).
    fixed = make_block(immediate=False)
    fixed.load_state_dict(buggy.state_dict())
    out_fixed, out_buggy = fixed(x, media, text_time), buggy(x, media, text_time)
    pre = text_time == 0
    assert not torch.allclose(out_fixed[pre], out_buggy[pre])
    assert torch.equal(out_fixed[~pre], out_buggy[~pre])


def test_feed_forward_branch_runs_on_every_token():
    """Tokens with no image (text-only prompt, padding) still get x + tanh(ff_gate) * FF(x)."""
    block = make_block(immediate=True)
    x = torch.randn(2, 5, TINY.lm.hidden_size)
    text_time = torch.zeros(2, 5, dtype=torch.long)
    expected = x.double() + math.tanh(block.ff_gate.item()) * feed_forward64(x.double(), block.ff)
    assert_close(block(x, None, text_time), expected.float(), dtype=torch.float32)
    assert not torch.allclose(block(x, None, text_time), x)


def test_perceiver_matches_formula():
    p = TINY.perceiver
    d = TINY.vision_dim
    resampler = PerceiverResampler(d, p.depth, p.dim_head, p.heads, p.num_latents, p.ff_mult)
    with torch.no_grad():
        for param in resampler.parameters():
            param.add_(0.1 * torch.randn_like(param))
    media = torch.randn(2, 3, 1, 11, d)  # B=2, T_img=3, F=1, 11 tokens
    got = resampler(media)
    assert got.shape == (2, 3, p.num_latents, d)

    x = media.double().reshape(6, 11, d)
    latents = resampler.latents.double().expand(6, -1, -1)
    for attn, ff in resampler.layers:
        xm, lat = layer_norm64(x, attn.norm_media), layer_norm64(latents, attn.norm_latents)
        q = lat @ attn.to_q.weight.double().T
        kv = torch.cat([xm, lat], dim=1) @ attn.to_kv.weight.double().T
        k, v = kv.chunk(2, dim=-1)
        update = torch.zeros(6, p.num_latents, p.heads * p.dim_head, dtype=torch.float64)
        for h in range(p.heads):
            s = slice(h * p.dim_head, (h + 1) * p.dim_head)
            w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(p.dim_head), dim=-1)
            update[..., s] = w @ v[..., s]
        latents = latents + update @ attn.to_out.weight.double().T
        latents = latents + feed_forward64(latents, ff)
    expected = layer_norm64(latents, resampler.norm).view(2, 3, p.num_latents, d)
    assert_close(got, expected.float(), dtype=torch.float32)


def test_vision_encoder_drops_class_token_and_matches_torch_mha():
    v = TINY.vision
    encoder = VisionTransformer(v)
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(0.05 * torch.randn_like(param))
    images = torch.randn(3, 3, v.image_size, v.image_size)
    out = encoder(images)
    assert out.shape == (3, v.num_patches, v.width)

    # Independent path: torch's own MultiheadAttention with the same weights, class token kept till the end.
    x = F.conv2d(images, encoder.conv1.weight, stride=v.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([encoder.class_embedding.expand(3, 1, -1), x], dim=1) + encoder.positional_embedding
    x = encoder.ln_pre(x)
    for block in encoder.transformer.resblocks:
        mha = torch.nn.MultiheadAttention(v.width, v.heads, batch_first=True)
        mha.load_state_dict(
            {
                "in_proj_weight": block.attn.in_proj_weight, "in_proj_bias": block.attn.in_proj_bias,
                "out_proj.weight": block.attn.out_proj.weight, "out_proj.bias": block.attn.out_proj.bias,
            }
        )
        h = block.ln_1(x)
        x = x + mha(h, h, h, need_weights=False)[0]
        x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x))))
    expected = encoder.ln_post(x)
    assert_close(out, expected[:, 1:], dtype=torch.float32)
    assert not torch.allclose(out[:, 0], expected[:, 0])  # the class token is really dropped, not a patch


# ---------------------------------------------------------------------------------------------- full model


@pytest.fixture(scope="module")
def tiny_model():
    return build_reference(TINY, seed=1)


def test_left_padding_does_not_change_a_row(tiny_model):
    config = tiny_model.config
    ids_a, mask_a = random_prompt(config, [0, 6], 12)
    ids_b, mask_b = random_prompt(config, [2], 8, pad_left=4)
    vision = torch.randn(2, 2, 1, 3, config.vision.image_size, config.vision.image_size)
    batch_logits = tiny_model(vision, torch.stack([ids_a, ids_b]), torch.stack([mask_a, mask_b]))
    alone = tiny_model(vision[1:, :1], ids_b[None, 4:])
    assert_close(batch_logits[1, 4:], alone[0], dtype=torch.float32)


@pytest.mark.parametrize("immediate", [True, False])
def test_cached_generation_equals_full_forward_each_step(immediate):
    config = TINY.replace(only_attend_immediate_media=immediate, cross_attn_every_n_layers=2)
    model = build_reference(config, seed=2)
    ids_a, mask_a = random_prompt(config, [0, 5, 9], 14)
    ids_b, mask_b = random_prompt(config, [1], 9, pad_left=5)
    lang_x, mask = torch.stack([ids_a, ids_b]), torch.stack([mask_a, mask_b])
    vision = torch.randn(2, 3, 1, 3, config.vision.image_size, config.vision.image_size)
    new = 8
    out, step_logits = model.generate(vision, lang_x, mask, max_new_tokens=new, eos_token_id=[], return_logits=True)
    assert out.shape == (2, 14 + new) and step_logits.shape == (2, new, config.lm.vocab_size)
    assert torch.equal(out[:, :14], lang_x)

    media = model.encode_vision(vision)
    last_image = masking.images_per_row(lang_x, config.media_token_id)
    for s in range(new):
        seq = out[:, : 14 + s]
        full_mask = torch.cat([mask, torch.ones(2, s, dtype=torch.long)], dim=1)
        text_time = masking.text_time(seq, config.media_token_id)
        text_time[:, 14:] = last_image[:, None]  # generated tokens belong to the prompt's last image
        logits = model.lang_encoder(seq, media, text_time, masking.positions_from_mask(full_mask), full_mask)
        assert_close(step_logits[:, s], logits[:, -1], dtype=torch.float32)
        assert torch.equal(out[:, 14 + s], step_logits[:, s].argmax(-1))


def test_generation_stops_per_row_and_pads(tiny_model):
    config = tiny_model.config
    ids_a, _ = random_prompt(config, [0], 6)
    ids_b, _ = random_prompt(config, [1], 6)
    lang_x = torch.stack([ids_a, ids_b])
    vision = torch.randn(2, 1, 1, 3, config.vision.image_size, config.vision.image_size)
    free = tiny_model.generate(vision, lang_x, max_new_tokens=6, eos_token_id=[])
    stop = int(free[0, 7])  # row 0's second new token becomes the stop token
    out = tiny_model.generate(vision, lang_x, max_new_tokens=6, eos_token_id=stop)
    for row in range(2):
        new_free, new_out = free[row, 6:], out[row, 6:]
        hits = (new_free == stop).nonzero().flatten().tolist()
        expected = new_free.clone()
        if hits:
            expected[hits[0] + 1 :] = config.pad_token_id
        assert torch.equal(new_out, expected[: len(new_out)])
    assert int(out[0, 7]) == stop and (out[0, 8:] == config.pad_token_id).all()
    # Generation ends once every row has stopped, and not before.
    stopped_at = [(free[r, 6:] == stop).nonzero().flatten().tolist() for r in range(2)]
    last = max(h[0] if h else 5 for h in stopped_at)
    assert out.shape[1] == 6 + last + 1


def test_sampling_is_reproducible_with_a_seeded_generator(tiny_model):
    config = tiny_model.config
    ids, _ = random_prompt(config, [0], 6)
    vision = torch.randn(1, 1, 1, 3, config.vision.image_size, config.vision.image_size)
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, eos_token_id=[])
    a = tiny_model.generate(vision, ids[None], generator=torch.Generator().manual_seed(7), **kwargs)
    b = tiny_model.generate(vision, ids[None], generator=torch.Generator().manual_seed(7), **kwargs)
    c = tiny_model.generate(vision, ids[None], generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_sampling_is_greedy(tiny_model):
    config = tiny_model.config
    ids, _ = random_prompt(config, [2], 7)
    vision = torch.randn(1, 1, 1, 3, config.vision.image_size, config.vision.image_size)
    greedy = tiny_model.generate(vision, ids[None], max_new_tokens=6, eos_token_id=[])
    sampled = tiny_model.generate(vision, ids[None], max_new_tokens=6, eos_token_id=[], do_sample=True, top_k=1)
    assert torch.equal(greedy, sampled)


# ---------------------------------------------------------------------------------------------- bad input


def _inputs(config, images=1, seq=6):
    ids, _ = random_prompt(config, [0], seq)
    return torch.randn(1, images, 1, 3, config.vision.image_size, config.vision.image_size), ids[None]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda v, i, m: (v, torch.cat([i, torch.full((1, 1), TINY.media_token_id)], 1), None),
         r"lang_x: row 0 has 2 <image> tokens but vision_x holds 1"),
        (lambda v, i, m: (v[0], i, m), r"vision_x: got shape \(1, 1, 3, 32, 32\); expected rank 6"),
        (lambda v, i, m: (v.to(torch.int64), i, m), r"vision_x: got dtype torch.int64"),
        (lambda v, i, m: (v[..., :16, :16], i, m), r"vision_x: got shape .*expected \[1, images, frames, 3, 32, 32\]"),
        (lambda v, i, m: (v, i[0], m), r"lang_x: got shape \(6,\); expected a rank-2"),
        (lambda v, i, m: (v, i.float(), m), r"lang_x: got dtype torch.float32"),
        (lambda v, i, m: (v, i + 1000, m), r"lang_x: token ids span .* expected ids in \[0, 99\)"),
        (lambda v, i, m: (v, i, torch.ones(1, 5, dtype=torch.long)), r"attention_mask: got shape \(1, 5\)"),
        (lambda v, i, m: (v, i, torch.full_like(i, 2)), r"attention_mask: expected only 0/1"),
    ],
)
def test_bad_input_names_argument_value_and_expectation(tiny_model, mutate, match):
    vision, ids = _inputs(tiny_model.config)
    vision, ids, mask = mutate(vision, ids, None)
    with pytest.raises(ValueError, match=match):
        tiny_model(vision, ids, mask)
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(vision, ids, mask, max_new_tokens=2)


def test_generate_rejects_overlong_requests_and_right_padding(tiny_model):
    vision, ids = _inputs(tiny_model.config, seq=10)
    with pytest.raises(ValueError, match=r"max_new_tokens=250: prompt length 10 \+ max_new_tokens = 260 exceeds.* 256"):
        tiny_model.generate(vision, ids, max_new_tokens=250)
    with pytest.raises(ValueError, match=r"max_new_tokens=-1: expected an integer >= 0"):
        tiny_model.generate(vision, ids, max_new_tokens=-1)
    right_padded = torch.ones_like(ids)
    right_padded[0, -2:] = 0
    with pytest.raises(ValueError, match=r"attention_mask: row 0 is right-padded"):
        tiny_model.generate(vision, ids, right_padded, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"temperature=0: expected a finite number > 0"):
        tiny_model.generate(vision, ids, max_new_tokens=2, do_sample=True, temperature=0)


def test_unknown_preset_is_a_clear_error():
    expected = (r"preset='nope': unknown; expected one of \['idefics-80b', 'idefics-9b', 'idefics-small', "
                r"'idefics-tiny', 'openflamingo-3b', 'openflamingo-4b', 'openflamingo-9b-v1', 'openflamingo-9b-v2', "
                r"'small', 'tiny'\]")
    with pytest.raises(ValueError, match=expected):
        from_name("nope")


def test_small_preset_has_the_documented_shape():
    c = from_name("small")
    assert (c.lm.hidden_size, c.lm.num_layers, c.lm.num_heads, c.lm.intermediate_size) == (512, 8, 8, 2048)
    assert c.lm.vocab_size == 32003 and c.xattn_layer_indices == tuple(range(8))
    assert (c.vision.width, c.vision.layers, c.vision.heads, c.vision.patch_size, c.vision.num_patches) == (
        256, 4, 4, 16, 196)
    assert (c.perceiver.depth, c.perceiver.heads, c.perceiver.dim_head, c.perceiver.num_latents) == (6, 8, 64, 64)
    big = from_name("openflamingo-9b-v1")
    assert big.xattn_layer_indices == (3, 7, 11, 15, 19, 23, 27, 31) and big.vision.num_patches == 256
