import json
import sys
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from featkd.data import DATASETS, WithIndex, build_data, collate_of
from featkd.errors import DataError
from featkd.text import (
    IGNORE_INDEX,
    CausalLMDataset,
    MaskedLMDataset,
    TextClassificationDataset,
    WordTokenizer,
    bag_of_words_accuracy,
    generate_sentiment,
    load_tokenizer,
    sentiment_label,
    text_files,
)


def ids_of(dataset):
    return [dataset[i][0]["input_ids"].tolist() for i in range(len(dataset))]


# ---------------------------------------------------------------- generated_sentiment


def test_generated_sentences_are_fixed_by_seed_balanced_and_labelled_by_the_rule():
    sentences, labels = generate_sentiment(400, seed=0)
    assert (sentences, labels) == generate_sentiment(400, seed=0)
    other, _ = generate_sentiment(400, seed=1)
    assert len(set(sentences) & set(other)) < 10
    assert Counter(labels) == {0: 200, 1: 200}
    assert labels == [sentiment_label(s) for s in sentences]
    shapes = Counter(next((w for w in ("but", "yet", "although", "though", "and") if w in s.split()), "single")
                     for s in sentences)
    assert set(shapes) == {"single", "but", "yet", "although", "though", "and"}
    assert any(" not " in s or " never " in s or " hardly " in s for s in sentences)


def test_generated_sentiment_bundle_is_deterministic_balanced_and_disjoint():
    a = build_data("generated_sentiment", {"train_size": 300, "test_size": 100, "validation_size": 50})
    b = build_data("generated_sentiment", {"train_size": 300, "test_size": 100, "validation_size": 50})
    c = build_data("generated_sentiment", {"train_size": 300, "test_size": 100, "seed": 1})
    assert ids_of(a.train) == ids_of(b.train) and ids_of(a.test) == ids_of(b.test)
    assert ids_of(a.train) != ids_of(c.train)
    for split, n in ((a.train, 300), (a.val, 50), (a.test, 100)):
        assert isinstance(split, TextClassificationDataset) and len(split) == n
        assert Counter(split.targets) == {0: n // 2, 1: n // 2}
    train = {tuple(x) for x in ids_of(a.train)}
    assert not train & {tuple(x) for x in ids_of(a.test)}
    assert a.num_classes == 2 and a.class_names == ["negative", "positive"] and a.input_shape == (32,)
    assert a.text.task == "classification" and a.text.tokenizer == "word" and a.text.pad_id == 0
    assert 100 <= a.text.vocab_size <= 200
    assert a.train.replayable_views == 1
    assert max(len(x) for x in ids_of(a.train)) <= 32


def test_a_train_subset_shares_the_full_draws_vocabulary_and_held_out_sentences():
    full = build_data("generated_sentiment", {"train_size": 400, "test_size": 60, "validation_size": 40})
    part = build_data("generated_sentiment", {"train_size": 400, "test_size": 60, "validation_size": 40,
                                              "train_subset": 50})
    assert ids_of(part.train) == ids_of(full.train)[:50] and len(part.train) == 50
    assert ids_of(part.test) == ids_of(full.test) and ids_of(part.val) == ids_of(full.val)
    assert part.tokenizer.tokens == full.tokenizer.tokens
    # a teacher of the full draw never saw a test sentence the subset's student is tested on
    assert not {tuple(x) for x in ids_of(full.train)} & {tuple(x) for x in ids_of(part.test)}
    for bad in (1, 401):
        with pytest.raises(DataError, match="train_subset must be between 2 and train_size"):
            build_data("generated_sentiment", {"train_size": 400, "train_subset": bad})


def test_labels_depend_on_word_order_and_negation():
    good, bad = "the film was really good", "the acting was bad"
    # same words, different order, different label
    assert sentiment_label(f"{good} , but {bad} .") == 0
    assert sentiment_label(f"{bad} , but {good} .") == 1
    assert sentiment_label(f"although {good} , {bad} .") == 0
    assert sentiment_label(f"{good} , although {bad} .") == 1
    assert sentiment_label(f"{good} , yet {bad} .") == 0
    # negation flips a clause, and only its own clause
    assert sentiment_label("the film was good .") == 1
    assert sentiment_label("the film was not good .") == 0
    assert sentiment_label("the film was hardly very bad .") == 1
    assert sentiment_label("the plot was not dull , but the cast was never great .") == 0
    assert Counter("the plot was not dull , but the cast was great .".split()) == \
        Counter("the plot was dull , but the cast was not great .".split())
    assert sentiment_label("the plot was not dull , but the cast was great .") == 1
    assert sentiment_label("the plot was dull , but the cast was not great .") == 0
    with pytest.raises(ValueError):
        sentiment_label("a sentence without any adjective of the grammar .")
    with pytest.raises(ValueError):
        sentiment_label("the film was good and the plot was bad .")


def test_a_bag_of_words_cannot_solve_generated_sentiment():
    bundle = build_data("generated_sentiment")
    assert Counter(bundle.train.targets) == {0: 1000, 1: 1000}
    accuracy = bag_of_words_accuracy(bundle)
    assert 0.55 < accuracy < 0.85


def test_generated_sentiment_as_language_model_corpus():
    mlm = build_data("generated_sentiment", {"train_size": 64, "test_size": 16, "task": "masked_lm"})
    assert mlm.num_classes == mlm.text.vocab_size and mlm.text.task == "masked_lm" and mlm.class_names == []
    assert isinstance(mlm.train, MaskedLMDataset) and mlm.train.replayable_views is None
    assert mlm.test.replayable_views == 1
    first = [mlm.test[i][1].tolist() for i in range(len(mlm.test))]
    assert first == [mlm.test[i][1].tolist() for i in range(len(mlm.test))]  # evaluation masks are fixed
    clm = build_data("generated_sentiment", {"train_size": 64, "test_size": 16, "task": "causal_lm"})
    assert isinstance(clm.train, CausalLMDataset) and clm.num_classes == clm.text.vocab_size
    with pytest.raises(DataError, match="causal_lm"):
        build_data("generated_sentiment", {"task": "causal"})


# ---------------------------------------------------------------- batching


def test_collate_pads_to_the_longest_and_marks_real_tokens():
    bundle = build_data("generated_sentiment", {"train_size": 40, "test_size": 8})
    dataset = bundle.train
    loader = DataLoader(dataset, batch_size=16, shuffle=False, collate_fn=collate_of(dataset))
    inputs, labels = next(iter(loader))
    lengths = [len(dataset[i][0]["input_ids"]) for i in range(16)]
    assert inputs["input_ids"].shape == (16, max(lengths)) and inputs["input_ids"].dtype == torch.long
    assert inputs["attention_mask"].sum(1).tolist() == lengths
    assert set(inputs) == {"input_ids", "attention_mask"}
    for row, n in enumerate(lengths):
        assert inputs["input_ids"][row, :n].tolist() == dataset[row][0]["input_ids"].tolist()
        assert (inputs["input_ids"][row, n:] == bundle.text.pad_id).all()
    assert labels.shape == (16,) and labels.tolist() == dataset.targets[:16]


def test_collate_takes_items_with_extras_through_with_index():
    dataset = WithIndex(build_data("generated_sentiment", {"train_size": 40, "test_size": 8}).train)
    assert dataset.targets and dataset.replayable_views == 1
    loader = DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0),
                        collate_fn=collate_of(dataset))
    inputs, labels, extras = next(iter(loader))
    assert extras["index"].dtype == torch.long and extras["index"].shape == (8,)
    assert labels.tolist() == [dataset.targets[i] for i in extras["index"].tolist()]
    assert inputs["input_ids"].shape[0] == 8


def test_causal_lm_labels_are_the_next_tokens_with_nothing_after_the_last_and_padding():
    dataset = CausalLMDataset([[2, 7, 8, 9, 3], [2, 7, 3]], pad_id=0)
    inputs, labels = dataset.collate([dataset[0], dataset[1]])
    assert inputs["input_ids"].tolist() == [[2, 7, 8, 9, 3], [2, 7, 3, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert labels.tolist() == [[7, 8, 9, 3, -100], [7, 3, -100, -100, -100]]


# ---------------------------------------------------------------- masked language modelling


def _mlm_dataset(n=400, length=40, seed=None):
    tokenizer = WordTokenizer([*WordTokenizer.SPECIALS, *(f"w{i}" for i in range(50))])
    g = torch.Generator().manual_seed(0)
    sequences = [[tokenizer.cls_id, *torch.randint(5, 55, (length,), generator=g).tolist(), tokenizer.sep_id]
                 for _ in range(n)]
    return MaskedLMDataset(sequences, tokenizer, probability=0.15, seed=seed), tokenizer


def test_masking_follows_bert_proportions():
    dataset, tokenizer = _mlm_dataset()
    torch.manual_seed(0)
    chosen = masked = replaced = kept = candidates = 0
    for draw in range(3):
        for i in range(len(dataset)):
            inputs, labels = dataset[i]
            original = dataset.sequences[i]["input_ids"]
            ids = inputs["input_ids"]
            picked = labels != IGNORE_INDEX
            assert not picked[0] and not picked[-1]  # [CLS] and [SEP] are never chosen
            assert torch.equal(ids[~picked], original[~picked])
            assert torch.equal(labels[picked], original[picked])
            assert not any(int(t) in tokenizer.special_ids for t in ids[picked & (ids != tokenizer.mask_id)])
            candidates += len(original) - 2
            chosen += int(picked.sum())
            masked += int((ids[picked] == tokenizer.mask_id).sum())
            kept += int((ids[picked] == original[picked]).sum())
    replaced = chosen - masked - kept
    assert abs(chosen / candidates - 0.15) < 0.005
    assert abs(masked / chosen - 0.8) < 0.02
    assert abs(replaced / chosen - 0.1) < 0.015  # a random token can equal the original (1 in 50)
    assert abs(kept / chosen - 0.1) < 0.015


def test_masking_is_dynamic_seeded_and_chooses_at_least_one_token():
    dataset, tokenizer = _mlm_dataset(n=20)
    assert dataset.replayable_views is None
    torch.manual_seed(3)
    first = [dataset[i][1] for i in range(20)]
    again = [dataset[i][1] for i in range(20)]
    assert any(not torch.equal(a, b) for a, b in zip(first, again))  # fresh masking each access
    torch.manual_seed(3)
    assert all(torch.equal(a, dataset[i][1]) for i, a in enumerate(first))  # a seeded run repeats
    fixed, _ = _mlm_dataset(n=20, seed=5)
    assert fixed.replayable_views == 1
    assert all(torch.equal(fixed[i][1], fixed[i][1]) for i in range(20))
    short = MaskedLMDataset([[2, 9, 3]] * 50, tokenizer, probability=0.15)
    assert all(int((short[i][1] != IGNORE_INDEX).sum()) == 1 for i in range(50))
    inputs, labels = short.collate([short[0], _mlm_dataset(n=1, length=5)[0][0]])
    assert labels.shape == (2, 7) and (labels[0, 3:] == IGNORE_INDEX).all()
    with pytest.raises(DataError, match="mask_probability"):
        MaskedLMDataset([[2, 9, 3]], tokenizer, probability=1.5)


# ---------------------------------------------------------------- word tokenizer


def test_word_tokenizer_vocabulary_encoding_and_saving(tmp_path):
    tokenizer = WordTokenizer.build(["The film, the END.", "a film"], min_count=1)
    assert tokenizer.tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokenizer.tokens[5:] == ["film", "the", ",", ".", "a", "end"]  # by count, then alphabetically
    assert (tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id, tokenizer.sep_id) == (0, 4, 2, 3)
    assert tokenizer.special_ids == {0, 1, 2, 3, 4} and tokenizer.vocab_size == 11
    assert tokenizer.encode("The film!") == {"input_ids": [2, 6, 5, 1, 3]}
    pair = tokenizer.encode("the film the end", "a film a film a film", max_length=8)
    assert pair["input_ids"] == [2, 6, 5, 3, 9, 5, 9, 3]  # the longer part loses words first
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert tokenizer.encode("the film the end the", max_length=4)["input_ids"] == [2, 6, 5, 3]
    assert WordTokenizer.build(["a a b c"], min_count=2).tokens[5:] == ["a"]
    assert WordTokenizer.build(["a a b b c"], max_size=7).tokens[5:] == ["a", "b"]
    tokenizer.save(tmp_path / "vocab")
    loaded = load_tokenizer(str(tmp_path / "vocab"))
    assert isinstance(loaded, WordTokenizer) and loaded.tokens == tokenizer.tokens
    assert loaded.source == str(tmp_path / "vocab")


# ---------------------------------------------------------------- text_files


def _write_tsv(path, rows, header=("sentence", "label")):
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")


def _sst_like(tmp_path, n_train=20):
    train = [(f'a "quoted" good film number {i}' if i % 2 else f"a bad film number {i}", str(i % 2))
             for i in range(n_train)]
    _write_tsv(tmp_path / "train.tsv", train)
    _write_tsv(tmp_path / "dev.tsv", [("a good film", "1"), ("a bad unseen film", "0")])
    return train


def test_text_files_reads_glue_tsv(tmp_path):
    train = _sst_like(tmp_path)
    bundle = build_data("text_files", {"root": str(tmp_path), "max_length": 16})
    assert len(bundle.train) == 20 and len(bundle.test) == 2 and bundle.val is None
    assert bundle.class_names == ["0", "1"] and bundle.num_classes == 2 and bundle.input_shape == (16,)
    assert bundle.train.targets == [int(label) for _, label in train]
    tokenizer = WordTokenizer.build(t for t, _ in train)
    assert ids_of(bundle.train)[1] == tokenizer.encode(train[1][0])["input_ids"]  # quotes kept as tokens
    assert tokenizer.index['"'] in ids_of(bundle.train)[1]
    assert ids_of(bundle.test)[1] == tokenizer.encode("a bad unseen film")["input_ids"]
    assert tokenizer.unk_id in ids_of(bundle.test)[1]
    assert bundle.text.vocab_size == tokenizer.vocab_size
    inputs, labels = bundle.test.collate([bundle.test[0], bundle.test[1]])
    assert labels.tolist() == [1, 0] and inputs["attention_mask"].sum().item() == 5 + 6


def test_text_files_reads_csv_pairs_and_jsonl(tmp_path):
    rows = [("premise", "hypothesis", "label")] + [
        (f"the cat sat {i}", "a cat, sitting" if i % 3 else "no dog", ["entailment", "neutral", "contradiction"][i % 3])
        for i in range(12)]
    import csv

    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with open(tmp_path / "test.jsonl", "w") as f:
        f.write(json.dumps({"premise": "the cat sat", "hypothesis": "a cat", "label": "neutral"}) + "\n\n")
    bundle = text_files(root=str(tmp_path), train="train.csv", test="test.jsonl", text_column="premise",
                        text_pair_column="hypothesis", max_length=12)
    assert bundle.class_names == ["contradiction", "entailment", "neutral"]
    inputs, _ = bundle.train[1]
    assert set(inputs) == {"input_ids", "token_type_ids"}
    tokenizer = WordTokenizer.build([r[0] for r in rows[1:]] + [r[1] for r in rows[1:]])
    assert inputs["input_ids"].tolist() == tokenizer.encode("the cat sat 1", "a cat, sitting")["input_ids"]
    assert inputs["token_type_ids"].tolist() == [0] * 6 + [1] * 5
    batch, labels = bundle.train.collate([bundle.train[0], bundle.train[1]])
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and labels.tolist() == [1, 2]

    (tmp_path / "ints.jsonl").write_text("\n".join(json.dumps({"text": f"w{i}", "label": i % 3}) for i in range(9)))
    fixed = text_files(root=str(tmp_path), train="ints.jsonl", test="ints.jsonl", text_column="text",
                       labels=[2, 0, 1], max_samples=6)
    assert fixed.class_names == ["2", "0", "1"] and len(fixed.train) == 6 and len(fixed.test) == 6
    assert fixed.train.targets == [1, 2, 0, 1, 2, 0]


def test_text_files_validation_split_file_and_lm_corpus(tmp_path):
    _sst_like(tmp_path, n_train=40)
    split = text_files(root=str(tmp_path), validation_fraction=0.25)
    assert len(split.train) == 30 and len(split.val) == 10
    assert Counter(split.val.targets) == {0: 5, 1: 5}
    again = text_files(root=str(tmp_path), validation_fraction=0.25)
    assert ids_of(split.val) == ids_of(again.val)
    _write_tsv(tmp_path / "val.tsv", [("a good film", "1")])
    assert len(text_files(root=str(tmp_path), validation="val.tsv").val) == 1
    with pytest.raises(DataError, match="not both"):
        text_files(root=str(tmp_path), validation="val.tsv", validation_fraction=0.2)
    _write_tsv(tmp_path / "corpus.tsv", [("just text",), ("more text here",)], header=("sentence",))
    corpus = text_files(root=str(tmp_path), train="corpus.tsv", test="corpus.tsv", task="masked_lm")
    assert isinstance(corpus.train, MaskedLMDataset) and corpus.num_classes == corpus.text.vocab_size


def test_text_files_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist.*set data.args.root"):
        text_files(root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"train\.tsv' does not exist\. Put the training split there"):
        text_files(root=str(tmp_path))
    _sst_like(tmp_path)
    with pytest.raises(DataError, match=r"no column 'text'\. .*Its columns are: sentence, label\. "
                                        r"Set data\.args\.text_column"):
        text_files(root=str(tmp_path), text_column="text")
    with pytest.raises(DataError, match="Did you mean 'label'"):
        text_files(root=str(tmp_path), label_column="labels")
    _write_tsv(tmp_path / "odd.tsv", [("a good film", "2")])
    with pytest.raises(DataError, match=r"odd\.tsv' line 2 has label '2', which is not in the training file.*labels: "
                                        r"0, 1"):
        text_files(root=str(tmp_path), test="odd.tsv")
    with pytest.raises(DataError, match=r"not in labels=\['1', '0'\]"):
        text_files(root=str(tmp_path), test="odd.tsv", labels=["1", "0"])
    (tmp_path / "empty.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="holds no rows"):
        text_files(root=str(tmp_path), test="empty.tsv")
    (tmp_path / "dev.txt").write_text("x")
    with pytest.raises(DataError, match="format"):
        text_files(root=str(tmp_path), test="dev.txt")
    (tmp_path / "bad.jsonl").write_text('{"sentence": "x", "label": 1}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        text_files(root=str(tmp_path), test="bad.jsonl")
    with pytest.raises(DataError, match="max_length"):
        text_files(root=str(tmp_path), max_length=2)


def test_text_files_is_registered_with_checked_arguments():
    assert "text_files" in DATASETS and "generated_sentiment" in DATASETS
    assert "order" in DATASETS.describe("generated_sentiment")


# ---------------------------------------------------------------- Hugging Face tokenizers


def test_hugging_face_tokenizer_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    _sst_like(tmp_path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "number", '"', "quoted"]
    vocab = tmp_path / "vocab_src"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(vocab))
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(str(folder))
    bundle = text_files(root=str(tmp_path), tokenizer=str(folder), max_length=16)
    assert bundle.text.tokenizer == str(folder) and bundle.text.vocab_size == len(tokenizer)
    assert bundle.text.pad_id == tokenizer.pad_token_id
    assert ids_of(bundle.train)[3] == tokenizer('a "quoted" good film number 3')["input_ids"]
    assert ids_of(bundle.test)[1] == tokenizer("a bad unseen film")["input_ids"]
    wrapped = load_tokenizer(str(folder))
    assert wrapped.mask_id == 4 and wrapped.special_ids == {0, 1, 2, 3, 4}
    pair = wrapped.encode("a good film", "a bad film number", max_length=6)
    assert pair == {k: v for k, v in tokenizer("a good film", "a bad film number", truncation=True,
                                                   max_length=6).items() if k != "attention_mask"}
    mlm = text_files(root=str(tmp_path), tokenizer=str(folder), task="masked_lm")
    assert mlm.num_classes == len(tokenizer)

    short = transformers.BertTokenizerFast.from_pretrained(str(vocab), model_max_length=8)
    short.save_pretrained(str(tmp_path / "short"))
    with pytest.raises(DataError, match="model_max_length 8.*lower data.args.max_length"):
        text_files(root=str(tmp_path), tokenizer=str(tmp_path / "short"), max_length=16)


def test_tokenizer_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"does not exist.*save_pretrained\(folder\).*never downloads"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)
    message = r'pip install "featkd\[nlp\]" \(or pip install -e "\.\[nlp\]" from a checkout\)'
    with pytest.raises(DataError, match=message):
        load_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(DataError, match="training texts"):
        load_tokenizer("word")
