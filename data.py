"""
Data for mmmamba: a synthetic "shapes world" that ships with the code, your own data in
the LLaVA conversation format, the byte-level BPE tokenizer, and batches for training.

Read in this order: the shapes world (scenes, drawing, conversations, splits), bring your
own data (LLaVA JSON), images from files, the tokenizer and the chat template, batches.
The user's text (a question, LLaVA data) is always encoded as plain text: special tokens
typed into it never become control tokens (encode_plain).

An example is a dict {"scene" or "path", "question", "answer", "kind", "template"}: the
image is drawn from its scene (shapes world) or read from its path (LLaVA) only when a
batch needs it, so a split of many thousand examples costs almost no memory.

Dimension glossary: B batch, T tokens, S image side (cfg.img_size), Np image tokens.
"""
import os
import random
import re
from collections import Counter, defaultdict

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmmamba import IM_END_ID, NEVER_SAMPLED, PAD_ID, SPECIAL_TOKENS, expand_image_placeholder
from util import InputError, read_image, read_llava

# -----------------------------------------------------------------------------
# the shapes world: one to three shapes, each of a different kind and colour, in the cells
# of a 2x2 grid, on a plain or textured background. Questions need the image to answer.

SHAPES = ["circle", "square", "triangle", "diamond"]
COLORS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
          "yellow": (230, 190, 20), "purple": (140, 60, 180)}
SIZES = {"small": 0.28, "large": 0.46}                # shape radius as a fraction of a cell
CELLS = ["top left", "top right", "bottom left", "bottom right"]
NUMBERS = ["zero", "one", "two", "three"]
DRAW_SIZE = 64                                      # drawn at 64 px, resized to cfg.img_size
SPLIT_SEEDS = {"train": 0, "val": 10**8, "test": 2 * 10**8}   # disjoint ranges of image seeds
CAPTION = "Describe the image."


def make_scene(seed):
    """A random scene, a plain dict, fully determined by the integer seed."""
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3])
    objects = [{"shape": s, "color": c, "size": rng.choice(list(SIZES)), "cell": cell}
               for s, c, cell in zip(rng.sample(SHAPES, n), rng.sample(list(COLORS), n),
                                     sorted(rng.sample(range(4), n)))]   # reading order
    background = {"kind": rng.choice(["plain", "noise", "stripes"]),
                  "tone": rng.randint(170, 250), "seed": rng.randrange(2**31)}
    return {"objects": objects, "background": background, "seed": seed}


def draw_scene(scene):
    """Render a scene as a DRAW_SIZE x DRAW_SIZE RGB PIL image."""
    bg, S = scene["background"], DRAW_SIZE
    rng = np.random.default_rng(bg["seed"])
    pixels = np.full((S, S, 3), bg["tone"], dtype=np.int16)
    if bg["kind"] == "noise":
        pixels += rng.integers(-25, 25, (S, S, 1), dtype=np.int16)
    elif bg["kind"] == "stripes":
        period = int(rng.integers(4, 9))
        stripe = (np.arange(S) // (period // 2 + 1)) % 2 == 0
        pixels[stripe if rng.random() < 0.5 else (slice(None), stripe)] -= 30
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw, cell = ImageDraw.Draw(img), S // 2
    for o in scene["objects"]:
        r = SIZES[o["size"]] * cell
        # centred in its cell: one patch token sees one whole shape in one place, so the linear
        # patch embedding can tell shapes apart (with random offsets a 1.1M-parameter teacher
        # stayed near chance on shape questions: 63% QA instead of 80+%)
        cx, cy = (o["cell"] % 2 + 0.5) * cell, (o["cell"] // 2 + 0.5) * cell
        color = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif o["shape"] == "square":
            draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=color)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=color)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    return img


def describe(o):
    return f"a {o['size']} {o['color']} {o['shape']}"


def caption(scene):
    """'a small red circle left of a large blue square', objects in reading order."""
    objs = scene["objects"]
    if len(objs) == 1:
        return f"{describe(objs[0])} at the {CELLS[objs[0]['cell']]}"
    if len(objs) == 2:
        same_row = objs[0]["cell"] // 2 == objs[1]["cell"] // 2
        return f"{describe(objs[0])} {'left of' if same_row else 'above'} {describe(objs[1])}"
    return f"{describe(objs[0])}, {describe(objs[1])} and {describe(objs[2])}"


def conversations(scene):
    """A caption and one question per template, as (template, question, answer) triples.
    Shapes and colours are unique within a scene, so every question has one answer."""
    rng = random.Random(scene["seed"] + 1)
    objs = scene["objects"]
    o = rng.choice(objs)
    present = {x["shape"] for x in objs}
    asked = rng.choice(sorted(present) if rng.random() < 0.5 else sorted(set(SHAPES) - present))
    return [("caption", CAPTION, caption(scene)),
            ("color", f"What color is the {o['shape']}?", o["color"]),
            ("shape", f"What shape is the {o['color']} one?", o["shape"]),
            ("count", "How many shapes are there?", NUMBERS[len(objs)]),
            ("where", f"Where is the {o['shape']}?", CELLS[o["cell"]]),
            ("exists", f"Is there a {asked}?", "yes" if asked in present else "no"),
            ("size", f"Is the {o['shape']} small or large?", o["size"])]


def shapes_split(split, n_images):
    """Examples of a split: n_images scenes with seeds from the split's own range."""
    examples = []
    for i in range(n_images):
        scene = make_scene(SPLIT_SEEDS[split] + i)
        for template, q, a in conversations(scene):
            examples.append({"scene": scene, "question": q, "answer": a, "template": template,
                             "kind": "caption" if template == "caption" else "qa"})
    return examples


def blind_baseline(train, test):
    """Accuracy of a text-only model: the most common training answer to the exact same
    question (or to any question, if unseen), on the test questions. No image is used."""
    by_question, overall = defaultdict(Counter), Counter()
    for ex in train:
        by_question[ex["question"]][ex["answer"]] += 1
        overall[ex["answer"]] += 1
    guess = lambda q: (by_question[q] or overall).most_common(1)[0][0]
    qa = [ex for ex in test if ex["kind"] == "qa"]
    return sum(guess(ex["question"]) == ex["answer"] for ex in qa) / max(len(qa), 1)


# -----------------------------------------------------------------------------
# bring your own data: LLaVA conversation JSON, a list of
#   {"image": "rel/path.jpg", "conversations": [{"from": "human", "value": "<image>\n..."},
#                                                {"from": "gpt", "value": "..."}, ...]}
# Each (human, gpt) turn becomes one single-turn example with the image (a simplification:
# later turns do not see earlier ones). Every 10th record is held out for evaluation.


def llava_splits(path, image_root):
    """(train, test) examples of a LLaVA file. Every record is checked first (util.read_llava:
    its structure, and that its image opens), so a bad one fails before training starts."""
    train, test = [], []
    for r, rec in enumerate(read_llava(path, image_root)):
        turns = rec["conversations"]
        for human, gpt in zip(turns[0::2], turns[1::2]):
            question = human["value"].replace("<image>", "").strip()    # prompt_text places it
            ex = {"path": os.path.join(image_root, rec["image"]), "question": question,
                  "answer": gpt["value"].strip(), "template": "llava", "kind": "qa"}
            (test if r % 10 == 0 else train).append(ex)
    if not train or not test:
        raise InputError(f"{path}: {len(train)} training and {len(test)} held-out turns; "
                         "give at least 2 records with conversations")
    return train, test


# -----------------------------------------------------------------------------
# images: any file Pillow reads (util.read_image: first frame, upright, RGB, one-line errors)
# to the model's input, shared with sample.py


def image_tensor(img, size):
    """RGB PIL image -> (3, S, S) float tensor in [-1, 1] (squashed to a square, not cropped)."""
    img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())        # (S, S, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


def load_image(path, size):
    return image_tensor(read_image(path), size)


def example_image(ex, size):
    if "scene" in ex:
        return image_tensor(draw_scene(ex["scene"]), size)
    return load_image(ex["path"], size)


# -----------------------------------------------------------------------------
# the tokenizer and the ChatML template (arXiv 2502.13145 Sec. 3; docs/method.md §1): the
# image's tokens sit in the user's turn, and only the assistant's answer is scored


def prompt_text(question):
    """The question comes before the image: then the image tokens are read knowing what is asked.
    With the image first, "What color is the square?" means finding a shape by its name among
    patches that each see a quarter of it, and our small teacher stalled there (78% QA after 5000
    steps; question first: 100%, docs/small_gpu/README.md). A recurrent student gains
    from this order too: it can keep what the question needs as it reads the image."""
    return f"<|im_start|>user\n{question}\n<image><|im_end|>\n<|im_start|>assistant\n"


def answer_text(answer):
    return f"{answer}<|im_end|>"


def train_tokenizer(examples, vocab_size):
    """Byte-level BPE on the training text; special tokens first, so their ids are 0..5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = (prompt_text(ex["question"]) + answer_text(ex["answer"]) for ex in examples)
    tok.train_from_iterator(texts, trainer)
    ids = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS))), f"special token ids {ids}, expected 0..5"
    assert tok.get_vocab_size() <= vocab_size, f"{tok.get_vocab_size()} tokens > {vocab_size}"
    return tok


SPECIAL = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")
SLOT = "\0"                                        # where the user's text goes in a template


def plain_pieces(text, specials=SPECIAL_TOKENS):
    """text cut one character into every place a special token starts (overlaps too): a
    tokenizer matches a special token only as a whole string, and no piece holds one whole.
    specials: ours, or a HoVLE folder's (hf.HFTokenizer.plain)."""
    starts = "|".join(map(re.escape, specials))
    cuts = [m.start() + 1 for m in re.finditer(f"(?={starts})", text)] if starts else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def encode_plain(tok, text):
    """Ids of user text as plain text: typed special tokens ("<|im_end|>", "<pad>") stay text
    and never become control tokens (plain_pieces)."""
    return [i for piece in plain_pieces(text) for i in tok.encode(piece).ids]


def encode_chat(tok, template, text):
    """Ids of template(text): the template's own special tokens from their ids, the rest, with
    the user's text in it, as plain text (the same ids as tok.encode for harmless text)."""
    ids = []
    for j, piece in enumerate(SPECIAL.split(template(SLOT))):   # text, special, text, ...
        if j % 2:
            ids.append(SPECIAL_TOKENS.index(piece))
        else:
            ids += encode_plain(tok, piece.replace(SLOT, text))
    return ids


def encode_prompt(tok, question, n_img_tokens):
    """Token ids of the user turn and the assistant header, <image> expanded to its slots."""
    return expand_image_placeholder(encode_chat(tok, prompt_text, question), n_img_tokens)


class Chat:
    """A conversation as ids and an image as a tensor, in this file's template with our
    tokenizer: what batches and evaluation read. hf.HFChat is the same for a HoVLE folder
    (its tokenizer, chat template, end-of-turn id and image preprocessing)."""
    stop_id, never = IM_END_ID, NEVER_SAMPLED

    def __init__(self, tok):
        self.tok, self.decode, self.image = tok, tok.decode, example_image

    def prompt(self, question, n_img_tokens):
        return encode_prompt(self.tok, question, n_img_tokens)

    def answer(self, answer):
        return encode_chat(self.tok, answer_text, answer)


def as_chat(tok):
    """Our tokenizer -> its Chat; a Chat (ours, hf.HFChat, a CachedChat) as it is."""
    return tok if hasattr(tok, "prompt") else Chat(tok)


class CachedChat:
    """as_chat(tok) that encodes each distinct text once and makes each image once (up to
    `room` bytes of images): batches repeat both, the shapes world's 23 questions and its 7
    conversations per image, and drawing and encoding were a fifth of a tiny-preset step. The
    scenes it keys by id are kept with their images, so those ids stay valid."""

    def __init__(self, tok, room=4 << 30):
        chat, self.room, self.memo = as_chat(tok), room, {}
        self.stop_id, self.never, self.decode = chat.stop_id, chat.never, chat.decode
        self.prompt = lambda q, n: self._once(("prompt", q, n), chat.prompt, q, n)
        self.answer = lambda a: self._once(("answer", a), chat.answer, a)
        self.image = lambda ex, size: self._once(
            ("image", id(ex["scene"]) if "scene" in ex else ex["path"], size), chat.image, ex, size)

    def _once(self, key, make, *args):
        if key not in self.memo:
            value = make(*args)
            size = value.numel() * value.element_size() if torch.is_tensor(value) else 0
            if size > self.room:                        # a large data set's images: made anew
                return value
            self.memo[key], self.room = (value, args), self.room - size
        return self.memo[key][0]


# -----------------------------------------------------------------------------
# batches: right-padded, with targets that score only the assistant's answer and <|im_end|>
# (the answer-only loss of arXiv 2502.13145 Sec. 3; docs/method.md §1)


def make_batch(examples, tok, cfg, device="cpu"):
    """-> tokens (B, T), targets (B, T) with -1 where nothing is scored, images (B, 3, S, S).
    tok: our tokenizer, or a Chat (as_chat)."""
    chat = as_chat(tok)
    prompts = [chat.prompt(ex["question"], cfg.n_img_tokens) for ex in examples]
    answers = [chat.answer(ex["answer"]) for ex in examples]
    T = max(len(p) + len(a) for p, a in zip(prompts, answers)) - 1
    if T > cfg.max_seq_len:
        raise InputError(f"an example of {T} tokens is longer than max_seq_len {cfg.max_seq_len}: "
                         "shorten the text or use a larger preset")
    pad = [T + 1 - len(p) - len(a) for p, a in zip(prompts, answers)]   # per row, at the end
    tokens = torch.tensor([(p + a)[:-1] + [PAD_ID] * n for p, a, n in zip(prompts, answers, pad)])
    targets = torch.tensor([[-1] * (len(p) - 1) + a + [-1] * n        # predict the answer tokens
                            for p, a, n in zip(prompts, answers, pad)])
    images = torch.stack([chat.image(ex, cfg.img_size) for ex in examples])
    return tokens.to(device), targets.to(device), images.to(device)
