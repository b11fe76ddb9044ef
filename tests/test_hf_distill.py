"""distill.py --teacher-hf: stages 1-3 from a HoVLE folder on LLaVA data, end to end.

A toy HoVLE (test_hf's format: two embedding-stack layers, two LLM layers, 56 px tiles, its
own special-token ids 38-42) with a word-level tokenizer.json, and a LLaVA JSON over a few
images written here. The run must take everything from the folder: the frozen teacher's
weights, the tokenizer, the internlm2-chat prompt, answers ending with its <|im_end|>, the
tile preprocessing, the stop id; write checkpoints that name the folder, which sample.py and
--resume read back; and refuse what it cannot distil in one line.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import distill
import evaluate
import hf
import test_hf
from test_hf import IMG_CTX, MAMBA, TEACHER, toy_config, toy_weights, write_folder
from util import InputError, load_checkpoint, model_from_checkpoint, read_image

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220)}
SIZES = ["small", "big"]
# every word of the prompts and answers has its own id: <unk> (id 0, our padding id) never
# stands for real text here
WORDS = (["<unk>", "<s>", "</s>", "system", "user", "assistant", "what", "color", "is", "it",
          "?", "how", "the", "shape"] + list(COLORS) + SIZES
         + [w for w, _ in __import__("tokenizers").pre_tokenizers.Whitespace()
            .pre_tokenize_str(hf.SYSTEM)])
STEPS = ["--steps1", "2", "--steps2", "2", "--steps3", "2", "--batch-size", "4",
         "--eval-samples", "4", "--save-every", "1", "--scan", "torch", "--device", "cpu"]


def toy_tokenizer(folder):
    test_hf.toy_tokenizer(folder, WORDS)          # with this file's words (the shapes world's)


def write_llava(root, n=12):
    """n records of one noisy colour image each, two turns: its colour, its size. Every 10th
    record (0, 10) is held out by data.llava_splits."""
    rng, records = np.random.default_rng(0), []
    os.makedirs(root / "images", exist_ok=True)
    for i in range(n):
        color, size = list(COLORS)[i % 3], SIZES[i % 2]
        rgb = np.clip(np.array(COLORS[color]) + rng.integers(-40, 40, (30 + i, 40, 3)), 0, 255)
        Image.fromarray(rgb.astype(np.uint8)).save(root / "images" / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is it ?"},
            {"from": "gpt", "value": color},
            {"from": "human", "value": "how big is the shape ?"},
            {"from": "gpt", "value": size}]})
    (root / "llava.json").write_text(json.dumps(records))
    return str(root / "llava.json"), str(root / "images")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Micro models run fastest on one thread; and evaluations repeated here then sum in the
    run's order, so their results are equal, not close."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hovle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("HoVLE")
    write_folder(folder, toy_config(), toy_weights(TEACHER, seed=5))
    toy_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return write_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def hf_run(hovle, llava, tmp_path_factory):
    """The whole --teacher-hf pipeline, once: stages 1-3, linear and hybrid."""
    out = tmp_path_factory.mktemp("out")
    distill.main(["--teacher-hf", str(hovle), "--data", llava[0], "--image-root", llava[1],
                  "--out-dir", str(out), *STEPS])
    return out


def test_batches_are_in_the_folders_format(hovle, llava):
    """make_batch with the folder's chat: the internlm2-chat prompt, the answer scored up to
    and with the folder's <|im_end|> (39, not our 5), the image as HoVLE's tile."""
    chat = hf.HFChat(str(hovle))
    train, _ = data.llava_splits(*llava)
    model, _ = hf.load_hf(str(hovle), torch.float32)
    tokens, targets, images = data.make_batch(train[:3], chat, model.cfg)
    v = {w: i for i, w in enumerate(WORDS)}
    for i, ex in enumerate(train[:3]):
        prompt = hf.prompt_ids(chat.tok, ex["question"], model.cfg.n_img_tokens)
        scored = targets[i][targets[i] != -1].tolist()
        assert scored == [v[ex["answer"]], 39] == chat.answer(ex["answer"])
        assert tokens[i, :len(prompt)].tolist() == prompt and prompt.count(IMG_CTX) == 4
        assert prompt[:2] == [38, v["system"]] and prompt[-2:] == [38, v["assistant"]]
        assert torch.equal(images[i], hf.tile(read_image(ex["path"]), chat.tok))
    assert chat.stop_id == 39 and set(chat.never) == {40, 41, 42}


def test_every_stage_from_the_folder(hf_run, hovle, llava):
    names = {"stage1_linear.pt": (1, "MMMM"), "stage2_linear.pt": (2, "MMMM"),
             "stage3_linear.pt": (3, "MMMM"), "stage3_hybrid.pt": (3, "AMMM")}
    assert sorted(os.listdir(hf_run)) == sorted([*names, "results.json", ".lock"])  # no stage 0
    teacher, _ = hf.load_hf(str(hovle), torch.float32)
    t_sd = teacher.state_dict()
    for name, (stage, layout) in names.items():
        ckpt = load_checkpoint(str(hf_run / name))
        assert (ckpt["stage"], ckpt["config"]["layout"] or "AAAA", ckpt["done"]) == (
            stage, layout, True), name
        assert ckpt["hf"] == os.path.abspath(hovle) and "tokenizer" not in ckpt
        assert ckpt["preset"] == "paper" and ckpt["data"] == llava[0]
        assert all(np.isfinite(ckpt["losses"])) and len(ckpt["losses"]) == 2
        model = model_from_checkpoint(ckpt)
        # everything outside the Mamba-2 mixers is the folder's teacher, frozen (Sec. 4.2-4.4)
        frozen = [k for k in t_sd if not (".mixer." in k and model.layers[int(k.split(".")[1])]
                                          .kind == "M")]
        assert len(frozen) > 20 and all(torch.equal(model.state_dict()[k], t_sd[k])
                                        for k in frozen), name


def test_results_rows_are_the_checkpoints_evaluated(hf_run, hovle, llava):
    records = json.loads((hf_run / "results.json").read_text())
    assert [(r["stage"], r["model"], r["layout"], r["stages"], r["preset"]) for r in records] == [
        (0, "teacher", "AAAA", None, "paper"), (1, "linear", "MMMM", "1", "paper"),
        (2, "linear", "MMMM", "1+2", "paper"), (3, "linear", "MMMM", "1+2+3", "paper"),
        (3, "hybrid", "AMMM", "1+2+3", "paper")]
    train, test = data.llava_splits(*llava)
    qa, captions, blind = evaluate.held_out(train, test, 4)
    assert {ex["question"] for ex in qa} == {"what color is it ?", "how big is the shape ?"}
    chat = hf.HFChat(str(hovle))
    teacher, _ = hf.load_hf(str(hovle), torch.float32)
    models = [teacher] + [model_from_checkpoint(load_checkpoint(str(hf_run / n))) for n in (
        "stage1_linear.pt", "stage2_linear.pt", "stage3_linear.pt", "stage3_hybrid.pt")]
    for r, model in zip(records, models):
        again = evaluate.evaluate(model, qa, captions, chat)
        assert (r["qa_accuracy"], r["caption_loss"]) == (again["qa_accuracy"],
                                                          again["caption_loss"])
        assert r["blind_qa_accuracy"] == blind and np.isfinite(r["caption_loss"])


def test_greedy_answers_use_the_folders_stop_and_tokenizer(hovle):
    """Batched evaluation == Model.generate with the folder's stop id and masked ids, decoded
    by its tokenizer: answers hold words of the toy vocabulary, not our BPE's bytes."""
    chat = hf.HFChat(str(hovle))
    model, _ = hf.load_hf(str(hovle), torch.float64)
    ex = {"path": str(hovle / "probe.png"), "question": "what color is it ?"}
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(ex["path"])
    tokens = torch.tensor([chat.prompt(ex["question"], model.cfg.n_img_tokens)])
    ids = list(model.generate(tokens, chat.image(ex)[None].double(), 6, stop_id=chat.stop_id,
                              never=chat.never))
    got = evaluate.greedy_answers(model, [ex], chat, max_new_tokens=6)[0]
    assert got == chat.decode(ids[:-1] if ids[-1] == chat.stop_id else ids)
    assert set(got.split()) <= set(WORDS)


def test_sample_py_answers_with_the_stage3_checkpoint(hf_run, hovle, llava, capsys):
    """sample.py --ckpt on the run's stage-3 student: the folder's tokenizer, template, tile
    and stop id, read from the folder the checkpoint names."""
    import sample
    image = os.path.join(llava[1], "3.png")
    sample.main(["--ckpt", str(hf_run / "stage3_linear.pt"), "--image", image, "--prompt",
                 "what color is it ?", "--max-new-tokens", "5", "--device", "cpu"])
    out = capsys.readouterr()
    model = model_from_checkpoint(load_checkpoint(str(hf_run / "stage3_linear.pt"))).eval()
    expect = evaluate.greedy_answers(model, [{"path": image, "question": "what color is it ?"}],
                                     hf.HFChat(str(hovle)), max_new_tokens=5)[0]
    assert out.out == f"user: what color is it ?\nassistant: {expect}\n"
    assert f"the conversations in {llava[0]}" in out.err and "MMMM" in out.err


def test_resume_keeps_the_finished_run(hf_run, hovle, llava, capsys):
    before = (hf_run / "results.json").read_text()
    distill.main(["--teacher-hf", str(hovle), "--data", llava[0], "--image-root", llava[1],
                  "--out-dir", str(hf_run), "--resume", *STEPS])
    assert capsys.readouterr().out.count("finished already, kept") == 4
    assert (hf_run / "results.json").read_text() == before


def test_another_teacher_is_refused(hf_run, hovle, llava, tmp_path):
    """This run's stage 2, or its stage 3 resumed, from another folder (same shapes, other
    weights could be in it): refused in one line, by the folder each checkpoint names."""
    other, out = tmp_path / "HoVLE-2", tmp_path / "out"
    shutil.copytree(hovle, other)
    out.mkdir()
    shutil.copy(hf_run / "stage2_linear.pt", out)
    args = ["--data", llava[0], "--image-root", llava[1], "--out-dir", str(out), *STEPS]
    for flags, message in ((["--stage", "3"], "stage2_linear.pt was distilled from"),
                           (["--stage", "1", "--resume"], f"teacher {hovle}, not stage 1")):
        shutil.copy(hf_run / "stage1_linear.pt", out)
        with pytest.raises(InputError, match=message) as e:
            distill.main(["--teacher-hf", str(other), *flags, *args])
        assert "\n" not in str(e.value) and str(other) in str(e.value)


def _student(folder):
    shutil.rmtree(folder)
    write_folder(folder, toy_config(*MAMBA), toy_weights("MAAM", seed=2))
    toy_tokenizer(folder)


BAD = {"an mmMamba student": (_student, [], "is an mmMamba student"),
       "no tokenizer": (lambda f: os.remove(f / "tokenizer.json"), [], "has no tokenizer"),
       "stage 0": (lambda f: None, ["--stage", "0"], "--stage 0 trains our own teacher")}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_teacher_in_one_line(hovle, llava, tmp_path, case, command):
    """In this process, through distill.py's own __main__ wrapper (the exit code and stderr a
    user sees; real distill.py processes: test_pipeline's Ctrl-C and torchrun tests)."""
    folder = tmp_path / "t"
    shutil.copytree(hovle, folder)
    breaker, flags, message = BAD[case]
    breaker(folder)
    argv = ["--teacher-hf", str(folder), "--data", llava[0], "--image-root", llava[1],
            "--out-dir", str(tmp_path / "out"), *STEPS, *flags]
    code, _, err = command("distill", *argv)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists() or not any(
        n.endswith(".pt") for n in os.listdir(tmp_path / "out"))


def test_stage3_counts_no_image_slot_of_the_folder(hovle, llava):
    """Stage 3's KL leaves out padding, the folder's <IMG_CONTEXT> slots (id 42, not our
    <image>) and the <img> before them: the positions whose next token is an image slot."""
    chat, (train, _) = hf.HFChat(str(hovle)), data.llava_splits(*llava)
    teacher, _ = hf.load_hf(str(hovle), torch.float32)
    tokens, _, images = data.make_batch(train[:3], chat, teacher.cfg)
    student = hf.load_hf(str(hovle), torch.float32)[0]
    with torch.no_grad():
        student.output.weight.mul_(1.5)                      # another distribution: KL > 0
        total, count = distill.kl_teacher_student(teacher, student, tokens, images)
    real = (tokens != 0).sum(1)
    assert count == (real - 4 - 1).sum() and total > 0
    assert ((tokens == IMG_CTX).sum(1) == 4).all()


def test_sample_py_without_the_recorded_folder(hf_run, tmp_path, llava):
    ckpt = load_checkpoint(str(hf_run / "stage3_linear.pt"))
    ckpt["hf"] = str(tmp_path / "moved")
    from util import save_checkpoint
    save_checkpoint(str(tmp_path / "s.pt"), ckpt)
    import sample
    with pytest.raises(InputError, match="moved, which is not there") as e:
        sample.main(["--ckpt", str(tmp_path / "s.pt"), "--image",
                     os.path.join(llava[1], "1.png"), "--device", "cpu"])
    assert "\n" not in str(e.value)


def test_fast_loop_distils_the_folder_as_the_plain_loop(hf_run, hovle, llava, tmp_path):
    """train_fast.main (eager on the CPU) on the folder's teacher and chat format: every stage's
    losses and weights as the plain loop's (hf_run), and the checkpoints name the folder."""
    import train_fast
    from test_train_fast import rel
    train_fast.main(["--teacher-hf", str(hovle), "--data", llava[0], "--image-root", llava[1],
                     "--out-dir", str(tmp_path), *STEPS])
    for name in ("stage1_linear", "stage2_linear", "stage3_linear", "stage3_hybrid"):
        a, b = (load_checkpoint(str(d / f"{name}.pt")) for d in (hf_run, tmp_path))
        assert b["done"] and b["hf"] == a["hf"] and "tokenizer" not in b, name
        assert max(abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"])) < 1e-4, name
        assert max(rel(b["model"][k], v) for k, v in a["model"].items()
                   if v.is_floating_point() and v.norm() > 0) < 1e-3, name
