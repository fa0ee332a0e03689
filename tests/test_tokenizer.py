from transformers import CLIPTokenizer

from baselines import data, models
from baselines.tokenizer import build_clip_tokenizer


def test_every_caption_word_is_one_token():
    tok = build_clip_tokenizer()
    ds = data.ShapesDataset()
    for i in range(30):
        caption = ds[i]["caption"]
        words = caption.replace(",", " ,").split()
        assert len(tok(caption).input_ids) == len(words) + 2


def test_unknown_text_is_spelled_in_bytes_not_end_of_text():
    tok = build_clip_tokenizer()
    ids = tok("a zebra on the moon, 3D!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1]


def test_saved_tokenizer_loads_as_stock_clip_tokenizer(tmp_path):
    tok = build_clip_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a small red circle on a blue background, top left"
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.model_max_length == tok.model_max_length


def test_clip_text_config_uses_the_tokenizer_ids():
    tok = build_clip_tokenizer()
    clip = models.build_clip(models.get_preset("tiny"), tok)
    text = clip.config.text_config
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert text.eos_token_id != 2  # 2 would switch transformers to legacy argmax pooling
    assert text.max_position_embeddings == tok.model_max_length


def test_caption_word_ids_are_the_same_in_every_process():
    """The BPE trainer breaks frequency ties differently per process (seen: 'top' was id 540 in one
    process and 541 in another); every caption word, byte and special token must not move."""
    import json
    import subprocess
    import sys

    script = (
        "import json; from baselines.tokenizer import build_clip_tokenizer, caption_corpus\n"
        "words = {w + '</w>' for c in caption_corpus() for w in c.replace(',', ' ,').split()}\n"
        "v = build_clip_tokenizer().get_vocab()\n"
        "print(json.dumps({k: i for k, i in v.items() if k in words or len(k) == 1 or k.startswith('<|')}))"
    )
    from conftest import ROOT

    runs = [
        json.loads(subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True).stdout)
        for _ in range(4)
    ]
    assert all(r == runs[0] for r in runs[1:])
    assert runs[0]["top</w>"] == build_clip_tokenizer().get_vocab()["top</w>"]
