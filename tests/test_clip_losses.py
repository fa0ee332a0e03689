"""Exact tests of the CLIP training losses (contrastive + NegCLIP-style hard negatives)."""

import torch
import torch.nn.functional as F

from baselines import data
from baselines.guidance import tokenize
from baselines.models import build_clip, build_tokenizer, clip_embeds, get_preset
from baselines.teacher import attribute_variants, clip_contrastive_loss, clip_training_loss, hard_negative_loss


def _tiny_clip():
    torch.manual_seed(0)
    tok = build_tokenizer()
    return build_clip(get_preset("tiny"), tok).eval(), tok


def test_contrastive_loss_is_infonce_on_the_clip_forwards_logits():
    clip, tok = _tiny_clip()
    batch = data.ShapesDataset(split="heldout", resolution=16).batch(range(6))
    captions = batch["captions"][:5] + batch["captions"][:1]  # a repeated caption: two positives in a row
    ids = tokenize(tok, captions)
    with torch.no_grad():
        ours = clip_contrastive_loss(clip, batch["pixel_values"], ids, captions)
        logits = clip(input_ids=ids, pixel_values=batch["pixel_values"]).logits_per_image
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    targets = same / same.sum(1, keepdim=True)
    expected = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_attribute_variants_hold_the_true_caption_at_the_target():
    attrs = data.ShapesDataset(split="heldout").batch(range(4))["attributes"]
    for key, k in [("shape", len(data.SHAPES)), ("position", len(data.POSITIONS)), ("colour", len(data.COLOURS) - 1)]:
        candidates, targets = attribute_variants(attrs, key)
        assert len(candidates) == k * len(attrs)
        for i, (a, t) in enumerate(zip(attrs, targets)):
            group = candidates[i * k : (i + 1) * k]
            assert group[t] == data.caption(a) and len(set(group)) == k


def test_hard_negative_loss_is_cross_entropy_over_each_images_candidates():
    clip, tok = _tiny_clip()
    batch = data.ShapesDataset(split="heldout", resolution=16).batch(range(3))
    candidates, targets = attribute_variants(batch["attributes"], "shape")
    with torch.no_grad():
        image = clip_embeds(clip, pixel_values=batch["pixel_values"])
        text = clip_embeds(clip, input_ids=tokenize(tok, candidates)).view(3, len(data.SHAPES), -1)
        ours = hard_negative_loss(image, text, clip.logit_scale, targets)
        scale = clip.logit_scale.exp()
    expected = sum(-torch.log_softmax(scale * text[i] @ image[i], dim=0)[targets[i]] for i in range(3)) / 3
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_clip_training_loss_is_infonce_plus_the_mean_hard_negative_term():
    """The whole train_clip loss against an independent computation from the CLIP forward's logits:
    InfoNCE over the batch captions + weight x mean over attributes of each image's cross-entropy
    against its own caption with that attribute swapped through every value."""
    clip, tok = _tiny_clip()
    batch = data.ShapesDataset(split="heldout", resolution=16).batch(range(4))
    keys, weight = ["shape", "position"], 0.7
    with torch.no_grad():
        ours = clip_training_loss(clip, tok, batch, hard_negatives=keys, hard_negative_weight=weight)
        ids = tokenize(tok, batch["captions"])
        logits = clip(input_ids=ids, pixel_values=batch["pixel_values"]).logits_per_image
        infonce = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
        terms = []
        for key in keys:
            per_image = []
            for i, a in enumerate(batch["attributes"]):
                values = data.attribute_values(key, a)
                captions = [data.caption({**a, key: v}) for v in values]
                row = clip(input_ids=tokenize(tok, captions), pixel_values=batch["pixel_values"][i : i + 1])
                per_image.append(F.cross_entropy(row.logits_per_image, torch.tensor([values.index(a[key])])))
            terms.append(sum(per_image) / len(per_image))
    assert len(set(batch["captions"])) == 4  # distinct captions: plain InfoNCE targets
    torch.testing.assert_close(ours, infonce + weight * sum(terms) / len(terms), rtol=1e-5, atol=1e-6)


def test_caption_states_cached_and_per_batch_agree():
    """The teacher's frozen-text lookup: encoded once per distinct caption, or (over the memory budget)
    per batch; both give the pipeline's text states of ``captions[idx]``."""
    from baselines.guidance import encode_text
    from baselines.models import text_encoder_from_clip
    from baselines.teacher import caption_states

    clip, tok = _tiny_clip()
    encoder = text_encoder_from_clip(clip).eval()
    captions = data.ShapesDataset(split="heldout").batch(range(5))["captions"] * 2
    idx = torch.tensor([7, 0, 3, 3])
    expected = torch.cat([encode_text(tok, encoder, [captions[j]]) for j in idx.tolist()])  # one at a time
    rows = []  # the batch sizes the encoder sees
    encoder.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))  # called with the ids
    cached = caption_states(tok, encoder, captions)
    assert rows == [5]  # the 5 distinct captions, encoded once up front
    torch.testing.assert_close(cached(idx), expected, rtol=0, atol=1e-5)
    assert rows == [5]  # looked up, not encoded
    per_batch = caption_states(tok, encoder, captions, max_bytes=0)
    assert rows == [5]  # over the budget: nothing encoded up front
    torch.testing.assert_close(per_batch(idx), expected, rtol=0, atol=1e-5)
    assert rows == [5, 4]  # the batch's 4 rows, when drawn
