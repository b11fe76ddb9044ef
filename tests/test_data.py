"""The data: the shapes world is deterministic, its splits are disjoint and need vision;
LLaVA JSON loads; the tokenizer keeps the special ids; the loss mask covers the answer only."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
from mmmamba import IM_END_ID, IMAGE_ID, PAD_ID, SPECIAL_TOKENS, Config
from util import InputError

CFG = Config(img_size=16, img_patch=8, max_seq_len=96)


def pixels(ex):
    return np.asarray(data.draw_scene(ex["scene"]))


def test_shapes_world_is_deterministic():
    a, b = data.shapes_split("train", 30), data.shapes_split("train", 30)
    assert [(x["question"], x["answer"]) for x in a] == [(x["question"], x["answer"]) for x in b]
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a[::7], b[::7]))
    # and not constant: different seeds give different images and captions
    assert len({pixels(x).tobytes() for x in a[::7]}) == 30
    assert len({x["answer"] for x in a if x["kind"] == "caption"}) > 20


def test_splits_are_disjoint():
    seeds = {s: {ex["scene"]["seed"] for ex in data.shapes_split(s, 200)} for s in ("train", "val", "test")}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"]
    assert not seeds["val"] & seeds["test"]
    train = {pixels(ex).tobytes() for ex in data.shapes_split("train", 200)[::7]}
    assert not any(pixels(ex).tobytes() in train for ex in data.shapes_split("test", 200)[::7])


def test_answers_match_the_picture():
    """The colour in the answer is the colour drawn where the answer says the shape is."""
    for ex in data.shapes_split("test", 40):
        if ex["template"] != "color":
            continue
        obj = next(o for o in ex["scene"]["objects"] if o["color"] == ex["answer"])
        cell = pixels(ex)[(obj["cell"] // 2) * 32:(obj["cell"] // 2 + 1) * 32,
                          (obj["cell"] % 2) * 32:(obj["cell"] % 2 + 1) * 32].reshape(-1, 3)
        assert (np.abs(cell.astype(int) - data.COLORS[ex["answer"]]).sum(1) < 10).sum() > 10


def test_blind_baseline_is_far_below_a_seeing_model():
    train, test = data.shapes_split("train", 3000), data.shapes_split("test", 500)
    blind = data.blind_baseline(train, test)
    assert 0.2 < blind < 0.45, blind                # majority answers: yes/no and sizes near 50%
    # even a text-only guesser fitted to the test answers themselves stays far from a seeing model
    assert data.blind_baseline(test, test) < 0.45


def test_tokenizer_special_ids_and_round_trip():
    train = data.shapes_split("train", 300)
    tok = data.train_tokenizer(train, 512)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(6))
    text = data.prompt_text("What color is the circle?") + data.answer_text("red")
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids.count(IMAGE_ID) == 1 and ids[-1] == IM_END_ID


def test_loss_mask_covers_only_the_answer():
    train = data.shapes_split("train", 50)
    tok = data.train_tokenizer(train, 512)
    batch = [train[0], train[1], train[4]]          # a caption and two short answers: padding
    tokens, targets, images = data.make_batch(batch, tok, CFG)
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    for i, ex in enumerate(batch):
        scored = targets[i][targets[i] != -1].tolist()
        assert scored == tok.encode(data.answer_text(ex["answer"])).ids       # answer + <|im_end|>
        assert tok.decode(scored[:-1]) == ex["answer"] and scored[-1] == IM_END_ID
        first = (targets[i] != -1).nonzero()[0, 0]
        assert tokens[i, first + 1] == scored[0]    # the input is shifted by one against the target
        assert (tokens[i] == IMAGE_ID).sum() == CFG.n_img_tokens
    assert (tokens == PAD_ID).any() and (targets[tokens == PAD_ID] == -1).all()


def make_llava(tmp_path, n=12):
    (tmp_path / "imgs").mkdir()
    records = []
    for i in range(n):
        Image.new("RGB", (20 + i, 10), (10 * i, 200, 30)).save(tmp_path / "imgs" / f"{i}.png")
        records.append({"id": str(i), "image": f"imgs/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the colour?"}, {"from": "gpt", "value": f"green {i}"},
            {"from": "human", "value": "Is it wide?"}, {"from": "gpt", "value": "yes"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json"


def test_llava_json_loads(tmp_path):
    train, test = data.llava_splits(str(make_llava(tmp_path)), str(tmp_path))
    assert len(train) + len(test) == 24 and len(test) == 4                    # records 0 and 10 held out
    assert {ex["path"] for ex in test} == {str(tmp_path / "imgs" / "0.png"), str(tmp_path / "imgs" / "10.png")}
    assert train[0]["question"] == "What is the colour?" and train[0]["answer"] == "green 1"
    tok = data.train_tokenizer(train, 400)
    tokens, targets, images = data.make_batch(train[:4], tok, CFG)
    assert images.shape == (4, 3, 16, 16)
    assert abs(float(images[0, 1].mean()) - (200 / 127.5 - 1)) < 0.02         # green channel read back


def test_llava_errors_are_one_line(tmp_path):
    path = make_llava(tmp_path, n=3)
    with pytest.raises(InputError, match="not found"):
        data.llava_splits(str(path), str(tmp_path / "elsewhere"))
    (tmp_path / "bad.json").write_text('[{"image": "imgs/0.png"}]')
    with pytest.raises(InputError, match="conversations"):
        data.llava_splits(str(tmp_path / "bad.json"), str(tmp_path))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_any_image_mode_becomes_rgb_in_range(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 13, 3), dtype=np.uint8))
    if mode == "I;16":                              # 16-bit grayscale, values far above 255
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 200)
    else:
        img = rgb.convert(mode)
    assert img.mode == mode
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    x = data.load_image(str(path), 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert -1 <= x.min() < x.max() <= 1                                       # not constant
