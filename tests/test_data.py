import json

import numpy as np
import pytest
import torch
from PIL import Image

from baselines import data
from baselines.errors import FewstepError


def test_shapes_is_deterministic_and_splits_differ():
    a = data.ShapesDataset(split="train", seed=3)
    b = data.ShapesDataset(split="train", seed=3)
    h = data.ShapesDataset(split="heldout", seed=3)
    assert np.array_equal(a.sample(17)[0], b.sample(17)[0])
    assert a.sample(17)[1] == b.sample(17)[1]
    assert not np.array_equal(a.sample(17)[0], h.sample(17)[0])
    assert len(h) == data.HELDOUT_SIZE


def test_caption_names_every_attribute_and_background():
    ds = data.ShapesDataset()
    for i in range(50):
        item = ds[i]
        attrs = item["attributes"]
        assert item["caption"] == data.caption(attrs)
        assert f"on a {attrs['background']} background" in item["caption"]
        assert attrs["colour"] != attrs["background"]
        assert item["pixel_values"].shape == (3, 32, 32)
        assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1


def test_attributes_are_visible_in_the_pixels():
    ds = data.ShapesDataset(resolution=32)
    for i in range(20):
        image, attrs = ds.sample(i)
        cx, cy = int(attrs["cx"] * 32), int(attrs["cy"] * 32)
        centre = image[cy, cx].astype(int)
        assert np.abs(centre - np.array(data.COLOURS[attrs["colour"]])).max() <= 13
        corner = image[0, 0] if attrs["position"] != "top left" else image[-1, -1]
        assert np.abs(corner.astype(int) - np.array(data.COLOURS[attrs["background"]])).max() <= 13


def test_position_and_size_vary_continuously():
    ds = data.ShapesDataset()
    geoms = [ds.sample(i)[1] for i in range(200)]
    assert len({round(g["cx"], 4) for g in geoms}) > 150
    assert len({round(g["r"], 4) for g in geoms}) > 150
    assert {g["shape"] for g in geoms} == set(data.SHAPES)
    assert {g["colour"] for g in geoms} == set(data.COLOURS)


def test_resolution_is_a_parameter():
    assert data.ShapesDataset(resolution=64)[0]["pixel_values"].shape == (3, 64, 64)
    with pytest.raises(FewstepError):
        data.ShapesDataset(resolution=4)


def test_caption_folder_dataset(tmp_path):
    Image.new("L", (40, 30), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (33, 47), (255, 0, 0, 255)).save(tmp_path / "rgba.png")
    rows = [{"file_name": "grey.png", "text": "a grey image"}, {"file_name": "rgba.png", "text": "red"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = data.make_dataset(str(tmp_path), resolution=16)
    batch = ds.batch([0, 1])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["captions"] == ["a grey image", "red"]
    assert torch.allclose(batch["pixel_values"][1, 0], torch.ones(16, 16))


def test_bad_images_are_one_line_errors(tmp_path):
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(FewstepError, match="cannot read"):
        data.load_image(tmp_path / "not.png", 16)
    with pytest.raises(FewstepError, match="not found"):
        data.load_image(tmp_path / "missing.png", 16)
    with pytest.raises(FewstepError, match="metadata.jsonl"):
        data.CaptionFolderDataset(root=str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n{"file_name": "b.png",\n')
    with pytest.raises(FewstepError, match="metadata.jsonl line 2 is not JSON"):  # was a JSONDecodeError traceback
        data.CaptionFolderDataset(root=str(tmp_path))


def test_images_load_upright_and_16_bit_greyscale_keeps_its_level(tmp_path):
    """A phone photo's EXIF orientation is applied (it loaded on its side); a 16-bit grey PNG at 46% loaded white."""
    im = Image.new("RGB", (40, 20))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # stored: red left, blue right
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: red on top, blue below
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    x = data.load_image(tmp_path / "phone.jpg", 16)  # shorter side 20 -> 16, centre crop of the 20x40 portrait
    assert x[0, :4].mean() > 0.8 and x[2, :4].mean() < -0.8  # top rows red
    assert x[2, -4:].mean() > 0.8 and x[0, -4:].mean() < -0.8  # bottom rows blue
    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(tmp_path / "grey16.png")
    g = data.load_image(tmp_path / "grey16.png", 8)
    assert torch.allclose(g, torch.full_like(g, (30000 >> 8) / 127.5 - 1))


def test_the_heldout_split_is_a_fixed_set():
    ds = data.ShapesDataset(split="heldout", resolution=16)
    ds.caption_of(data.HELDOUT_SIZE - 1)
    for index in (data.HELDOUT_SIZE, -1):
        with pytest.raises(IndexError, match="heldout split has items"):
            ds[index]
