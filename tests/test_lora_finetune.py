"""Tests of the LoRA demo (``python -m kfuse.demos.lora_finetune``): its data, its scoring, and the whole run on a
tiny configuration, where fine-tuning on kfuse must track PEFT's own fine-tuning step for step."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from kfuse.demos import lora_finetune as demo  # noqa: E402


def test_restaurant_names_of_the_test_split_are_unseen_but_their_words_are_not():
    train = demo.restaurants(3000, test=False, seed=0)
    test = demo.restaurants(500, test=True, seed=1)
    train_names, test_names = {m["name"] for m in train}, {m["name"] for m in test}
    assert len(train_names) == 80 and len(test_names) == 20 and not train_names & test_names
    words = {w for n in train_names for w in n.split()}
    assert all(w in words for n in test_names for w in n.split())
    for mr in train + test:  # name and eatType always; "near" names another restaurant
        assert list(mr)[:2] == ["name", "eatType"] and mr.get("near") != mr["name"]
        assert set(mr) <= {"name", "eatType", *demo.SLOTS}
    assert demo.restaurants(50, test=True, seed=3) == demo.restaurants(50, test=True, seed=3)


def test_templates_and_slot_recall():
    mr = {"name": "The Red Fork", "eatType": "pub", "food": "Italian", "priceRange": "expensive",
          "area": "riverside", "customerRating": "high", "familyFriendly": "no", "near": "The Old Mill"}
    assert demo.meaning({"name": "The Red Fork", "eatType": "pub"}) == "name[The Red Fork], eatType[pub]"
    text = demo.describe(mr)
    assert text == ("The Red Fork is an expensive Italian pub by the riverside near The Old Mill. "
                    "It is rated high and not family friendly.")
    assert demo.advertise(mr) == ("Looking for an expensive Italian pub by the riverside near The Old Mill? "
                                  "Try The Red Fork, rated high and not family friendly!")
    assert demo.describe({"name": "The Oak", "eatType": "restaurant"}) == "The Oak is a restaurant."
    assert demo.slot_recall(mr, text) == 1.0 and demo.slot_recall(mr, demo.advertise(mr)) == 1.0
    # one value missing or wrong out of 8 slots
    assert demo.slot_recall(mr, text.replace("Italian", "French")) == pytest.approx(7 / 8)
    assert demo.slot_recall(mr, text.replace("not family", "family")) == pytest.approx(7 / 8)
    yes = dict(mr, familyFriendly="yes")
    assert demo.slot_recall(yes, demo.describe(yes)) == 1.0 and demo.slot_recall(yes, text) == pytest.approx(7 / 8)
    assert demo.slot_recall(mr, "") == 0.0


def test_word_tokenizer_round_trips_every_task_text():
    tok = demo.WordTokenizer("the quick brown fox . the fox")
    assert tok.vocab[:4] == ["<pad>", "\n", "<unk>", " => "] and len(set(tok.vocab)) == len(tok)
    for mr in demo.restaurants(300, test=False, seed=0) + demo.restaurants(100, test=True, seed=1):
        for text in (demo.meaning(mr), demo.describe(mr), demo.advertise(mr)):
            ids = tok.encode(text)
            assert tok.unk not in ids and tok.decode(ids) == text
    assert tok.encode("quick zebra") == [tok.index["quick"], tok.unk]
    # the corpus's `size` most frequent tokens besides the tasks' words: zz here, quick, brown and fox above
    small = demo.WordTokenizer("zz zz yy", size=1)
    assert "zz" in small.index and "yy" not in small.index and len(small) == len(tok) - 2


def test_demo_runs_small_and_kfuse_trains_as_peft_does(tmp_path, capsys):
    """The whole demo at ``--small`` without dropout: the fused LoRA run's test loss matches PEFT's own run's
    (same initialisation, batches and optimizer: 10 steps through kfuse's forward and backward), the merged model's
    logits equal the adapted model's, and the mixed batch ran on kfuse (no fallback) with every row equal to its
    adapter alone."""
    out = tmp_path / "lora.json"
    res = demo.main(["--small", "--steps", "10", "--pretrain-steps", "10", "--dropout", "0", "--lr", "0.05",
                     "--threads", "2", "--json", str(out)])
    runs = {r.name: r for r in res["runs"]}
    assert list(runs) == ["full fine-tuning", "PEFT LoRA r=4", "kfuse LoRA r=4", "kfuse LoRA r=1", "kfuse LoRA r=16"]
    peft, fused = runs["PEFT LoRA r=4"], runs["kfuse LoRA r=4"]
    assert fused.trainable == peft.trainable
    assert runs["kfuse LoRA r=1"].trainable * 4 == peft.trainable == runs["kfuse LoRA r=16"].trainable // 4
    assert runs["full fine-tuning"].trainable > runs["kfuse LoRA r=16"].trainable
    # the adapters moved the loss (by 0.21 here), and kfuse's run moved it as PEFT's did: to 1e-3 of the change
    # (equal here; with dropout 0.1, masks drawn differently, the runs differed by 1.2 % of it)
    change = res["base_test_loss"] - peft.test_loss
    assert change > 0.1 and abs(fused.test_loss - peft.test_loss) < 1e-3 * change
    for r in runs.values():
        assert r.test_loss > 0 and 0 <= r.exact <= 1 and 0 <= r.slots <= 1 and r.ms_per_step > 0
    assert res["merge"]["max_abs_logit_diff"] < 1e-4
    serve = res["serve"]
    assert serve["fallbacks"] == [] and serve["equal_to_alone"] == serve["rows"] == 8
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["runs"]] == list(runs) and saved["serve"]["rows"] == 8
    text = capsys.readouterr().out
    assert "kfuse LoRA r=16" in text and "8/8 rows equal to their adapter alone" in text


def test_demo_refuses_bad_arguments_up_front(tmp_path):
    for args in (["--dropout", "1"], ["--dropout", "-0.1"], ["--steps", "0"], ["--lr", "0"], ["--threads", "0"],
                 ["--json", str(tmp_path / "missing" / "x.json")], ["--json", str(tmp_path)],
                 *([["--device", "cuda"]] if not torch.cuda.is_available() else [])):
        with pytest.raises(SystemExit):
            demo.main(args)
