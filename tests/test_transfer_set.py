"""Tang et al.'s transfer set: copies that replay, Tang's rules and rates, the teacher run once per copy."""

import warnings

import pytest
import torch

from featkd.config import DataConfig
from featkd.data import DATASETS, build_data, make_loaders
from featkd.distiller import Distiller, Term
from featkd.errors import DataError
from featkd.models import build_model
from featkd.teacher_cache import TeacherCacheSettings
from featkd.text import WordTokenizer, TextSplit, generate_sentiment, text_bundle
from featkd.transfer_set import TransferSet, nltk_tagger, with_transfer_set

CLS, SEP, MASK = WordTokenizer.cls_id, WordTokenizer.sep_id, WordTokenizer.SPECIALS.index("[MASK]")


def sentiment(n=60, **args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no POS tagger here
        return build_data("augmented", {"train_size": n, "test_size": 8, "transfer_set": args})


def words_of(item):
    """The ids between [CLS] and the final [SEP] (a single text)."""
    ids = item[0]["input_ids"].tolist()
    assert ids[0] == CLS and ids[-1] == SEP and SEP not in ids[1:-1]
    return ids[1:-1]


def test_views_replay_exactly_differ_from_each_other_and_keep_the_original_first():
    bundle = sentiment(copies=4, seed=3)
    train, n = bundle.train, 60
    base = build_data("generated_sentiment", {"train_size": n, "test_size": 8}).train
    assert len(train) == n * 5 and train.replayable_views == 5 and train.views is None
    assert train.targets == base.targets and bundle.test is not None and bundle.val is None
    for sample in (0, 7, 59):
        original = train[sample]
        assert torch.equal(original[0]["input_ids"], base[sample][0]["input_ids"])
        assert int(original[1]) == base.targets[sample] and original[2] == {"index": sample, "view": 0}
        copies = [train[sample + v * n] for v in range(1, 5)]
        for v, copy in enumerate(copies, 1):
            assert int(copy[1]) == -100 and copy[2] == {"index": sample, "view": v}
            assert torch.equal(copy[0]["input_ids"], train[sample + v * n][0]["input_ids"])  # replayed
    texts = {tuple(train[s + v * n][0]["input_ids"].tolist()) for s in range(n) for v in range(5)}
    assert len(texts) > 3 * n  # copies differ from their original and from each other
    again = sentiment(copies=4, seed=3).train
    other = sentiment(copies=4, seed=4).train
    same = [torch.equal(again[i][0]["input_ids"], train[i][0]["input_ids"]) for i in range(len(train))]
    assert all(same)
    assert any(not torch.equal(other[i][0]["input_ids"], train[i][0]["input_ids"]) for i in range(n, 5 * n))
    with pytest.raises(IndexError):
        train[5 * n]


def test_masking_rate_is_p_mask_per_word_and_specials_stay():
    train = sentiment(200, copies=10, mask_probability=0.1, pos_probability=0.0, ngram_probability=0.0).train
    masked = total = 0
    for sample in range(200):
        original = words_of(train[sample])
        for v in range(1, 11):
            copy = words_of(train[sample + v * 200])
            assert len(copy) == len(original)
            assert all(c in (o, MASK) for c, o in zip(copy, original))
            masked += sum(c == MASK for c in copy)
            total += len(copy)
    assert total > 15_000 and abs(masked / total - 0.1) < 0.01


def test_ngrams_are_contiguous_runs_of_the_words_of_a_length_in_range():
    train = sentiment(100, copies=6, mask_probability=0.0, pos_probability=0.0, ngram_probability=1.0,
                      ngram_range=(2, 4)).train
    lengths = set()
    for sample in range(100):
        original = words_of(train[sample])
        for v in range(1, 7):
            copy = words_of(train[sample + v * 100])
            lengths.add(len(copy))
            assert 2 <= len(copy) <= 4
            assert any(original[s:s + len(copy)] == copy for s in range(len(original) - len(copy) + 1))
    assert lengths == {2, 3, 4}
    some = sentiment(100, copies=8, mask_probability=0.0, pos_probability=0.0, ngram_probability=0.25).train
    shortened = sum(len(words_of(some[i])) < len(words_of(some[i % 100])) for i in range(100, 900))
    assert 0.15 < shortened / 800 < 0.3  # p_ng = 0.25 (an n-gram of 5 words or more can be the whole text)


def test_per_epoch_schedule_visits_one_view_per_epoch():
    mixed, per_epoch = sentiment(copies=2).train, sentiment(copies=2, schedule="per_epoch").train
    assert len(per_epoch) == 60 and per_epoch.views == 3 and per_epoch.replayable_views == 3
    assert torch.equal(per_epoch[5 + 2 * 60][0]["input_ids"], mixed[5 + 2 * 60][0]["input_ids"])
    loader, _ = make_loaders(per_epoch, per_epoch.dataset, DataConfig(batch_size=20), seed=0)
    for epoch, view in [(1, 0), (2, 1), (3, 2), (4, 0)]:
        loader.sampler.set_epoch(epoch)
        assert {int(v) for _, _, extras in loader for v in extras["view"]} == {view}


def test_the_teacher_runs_once_per_sample_and_view_through_the_cache():
    bundle = sentiment(24, copies=3)  # 96 items: 6 full batches of 16
    teacher = build_model("transformer", 2, (32,), text=bundle.text, args={"layers": 1, "hidden": 16, "heads": 2})
    student = build_model("bilstm", 2, (32,), text=bundle.text, args={"embedding": 8, "hidden": 8, "fc_hidden": 8})
    example = bundle.train.collate([bundle.train[i] for i in range(4)])[0]
    distiller = Distiller(teacher, student, [Term("ce", 0.0), Term("logit_mse", 1.0)], example_input=example,
                          teacher_cache=TeacherCacheSettings("fp32"))
    loader, _ = make_loaders(distiller.prepare_data(bundle.train), bundle.test, DataConfig(batch_size=16), seed=0)
    forwarded = []
    teacher.register_forward_hook(lambda module, args, kwargs, out: forwarded.append(len(out)), with_kwargs=True)
    per_epoch, seen = [], set()
    for epoch in (1, 2):
        loader.sampler.set_epoch(epoch)
        before = sum(forwarded)
        for x, y, extras in loader:
            out = distiller(x, y, **extras)
            out.loss.backward()
            assert torch.isfinite(out.loss)
            seen.update(zip(extras["index"].tolist(), extras["view"].tolist()))
        per_epoch.append(sum(forwarded) - before)
    assert len(seen) == 96 and per_epoch == [96, 0]  # every (sample, view) through the teacher once


def test_pos_replacement_keeps_the_tag_with_a_tagger():
    texts, labels = generate_sentiment(80, seed=0)
    tokenizer = WordTokenizer.build(texts)
    bundle = text_bundle(TextSplit(texts, labels=labels), TextSplit(texts[:4], labels=labels[:4]), tokenizer,
                         max_length=32, class_names=["negative", "positive"])
    from featkd.text import NEGATIVE, NOUNS, POSITIVE

    kinds = {**dict.fromkeys(NOUNS, "NN"), **dict.fromkeys(POSITIVE + NEGATIVE, "JJ")}
    tagger = lambda words: [kinds.get(w, "X") for w in words]  # noqa: E731
    train = with_transfer_set(bundle, copies=3, mask_probability=0.0, pos_probability=1.0, ngram_probability=0.0,
                              tokenizer=tokenizer, tagger=tagger).train
    assert train.pos_note is None
    changed = 0
    for sample in range(80):
        original = [tokenizer.tokens[i] for i in words_of(train[sample])]
        for v in range(1, 4):
            copy = [tokenizer.tokens[i] for i in words_of(train[sample + v * 80])]
            assert [kinds.get(w, "X") for w in copy] == [kinds.get(w, "X") for w in original]
            changed += sum(a != b for a, b in zip(copy, original))
    assert changed > 0
    real = nltk_tagger()
    if real is None:
        return
    # nltk and its tagger data are installed: a replaced word has the tag its original had in its
    # sentence, somewhere among the training sentences (tags depend on the context)
    train = with_transfer_set(bundle, copies=3, mask_probability=0.0, pos_probability=1.0, ngram_probability=0.0,
                              tokenizer=tokenizer).train
    assert train.pos_note is None
    tagged = {}
    for sample in range(80):
        sentence = [tokenizer.tokens[i] for i in words_of(train[sample])]
        for word, tag in zip(sentence, real(sentence)):
            tagged.setdefault(tag, set()).add(word)
    for sample in range(80):
        original = [tokenizer.tokens[i] for i in words_of(train[sample])]
        for v in range(1, 4):
            copy = [tokenizer.tokens[i] for i in words_of(train[sample + v * 80])]
            assert all(new in tagged[tag] for new, tag in zip(copy, real(original)))


def test_generated_sentiment_brings_its_grammar_tagger_so_pos_replacement_runs_without_nltk():
    import dataclasses

    from featkd.text import grammar_tagger

    base = build_data("generated_sentiment", {"train_size": 40, "test_size": 8})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipped" warning
        train = with_transfer_set(base, copies=2, mask_probability=0.0, pos_probability=1.0,
                                  ngram_probability=0.0).train
    assert train.pos_note is None
    tokens, changed = base.tokenizer.tokens, 0
    for sample in range(40):
        original = [tokens[i] for i in words_of(train[sample])]
        for v in (1, 2):
            copy = [tokens[i] for i in words_of(train[sample + v * 40])]
            assert grammar_tagger(copy) == grammar_tagger(original)  # links, commas, fillers never move
            changed += sum(a != b for a, b in zip(copy, original))
    assert changed > 40  # every open-class word is replaced at p = 1 (by itself now and then)
    assert dataclasses.replace(base, tagger=None).tagger is None


def test_pos_replacement_is_skipped_with_a_note_without_a_tagger_or_words():
    import dataclasses

    base = build_data("generated_sentiment", {"train_size": 40, "test_size": 8})
    if nltk_tagger() is None:  # data without a tagger of its own, and none installed
        with pytest.warns(UserWarning, match="POS-guided word replacement is skipped"):
            train = with_transfer_set(dataclasses.replace(base, tagger=None), copies=2, mask_probability=0.0,
                                      pos_probability=1.0, ngram_probability=0.0).train
        assert "tagger is installed" in train.pos_note
        assert all(torch.equal(train[i][0]["input_ids"], train[i % 40][0]["input_ids"]) for i in range(120))
    speechless = dataclasses.replace(base, tokenizer=None)  # ids whose words nobody can spell
    with pytest.warns(UserWarning, match="POS-guided word replacement is skipped"):
        train = with_transfer_set(speechless, copies=2, mask_probability=0.0, pos_probability=1.0,
                                  ngram_probability=0.0).train
    assert "words' text is unknown" in train.pos_note
    assert all(torch.equal(train[i][0]["input_ids"], train[i % 40][0]["input_ids"]) for i in range(120))
    quiet = with_transfer_set(speechless, copies=2, pos_probability=0.0).train
    assert quiet.pos_note is None


def _hf_pairs(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "play", "film", "was", "good", "bad",
             "##ing", "##ed", "##s"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "src")).save_pretrained(str(tmp_path / "tok"))
    rows = ["sentence1\tsentence2\tlabel", "the playing was good\tthe films played\t1",
            "a film was bad\tthe playing was bad\t0", "the plays\ta film\t1", "good playing\tbad films\t0"]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n")
    return build_data("text_files", {"root": str(tmp_path), "tokenizer": str(tmp_path / "tok"),
                                     "text_column": "sentence1", "text_pair_column": "sentence2"})


def test_hugging_face_pieces_stay_with_their_word_and_pairs_keep_their_separators(tmp_path):
    bundle = _hf_pairs(tmp_path)
    train = with_transfer_set(bundle, copies=30, mask_probability=1.0, pos_probability=0.0,
                              ngram_probability=0.0).train
    assert train.special == {0, 1, 2, 3, 4} and train.mask_id == 4
    both = one = 0
    for sample in range(4):
        original = train[sample][0]
        a, b = [int((original["token_type_ids"] == t).sum()) for t in (0, 1)]
        for v in range(1, 31):
            copy = train[sample + v * 4][0]
            ids, types = copy["input_ids"].tolist(), copy["token_type_ids"].tolist()
            assert ids[0] == 2 and ids.count(3) == 2 and ids[-1] == 3  # [CLS] a [SEP] b [SEP]
            first, second = ids[1:ids.index(3)], ids[ids.index(3) + 1:-1]
            assert types == [0] * (len(first) + 2) + [1] * (len(second) + 1)
            masked = [all(t == 4 for t in part) for part in (first, second)]
            assert any(masked) and len(ids) <= len(original["input_ids"])
            both += all(masked)
            one += masked[0] != masked[1]
    assert both and one  # both sentences (1/3 of the copies) or one of them
    playing = train[0][0]["input_ids"].tolist()  # [CLS] the play ##ing was good [SEP] ...
    assert playing[1:6] == [5, 7, 12, 9, 10]
    copy = next(train[v * 4][0]["input_ids"].tolist() for v in range(1, 31)
                if 4 in train[v * 4][0]["input_ids"].tolist()[1:5])
    assert copy[1:6] == [4, 4, 4, 4, 3]  # "the playing was good": four words, four masks


def test_bad_settings_and_data_are_refused():
    base = build_data("generated_sentiment", {"train_size": 10, "test_size": 4})
    with pytest.raises(DataError, match="pos_probability is 1.2"):
        TransferSet(base.train, 2, mask_probability=0.6, pos_probability=0.6)
    with pytest.raises(DataError, match="ngram_range"):
        TransferSet(base.train, 2, ngram_range=(0, 3))
    with pytest.raises(DataError, match="copies"):
        TransferSet(base.train, -1)
    lm = build_data("generated_sentiment", {"train_size": 10, "test_size": 4, "task": "masked_lm"})
    with pytest.raises(DataError, match="text classification"):
        with_transfer_set(lm)
    with pytest.raises(DataError, match="text classification"):
        TransferSet(lm.train)
    with pytest.raises(DataError, match="not tokenised text"):
        with_transfer_set(build_data("synthetic"))
    with pytest.raises(DataError, match="transfer_set has no setting 'copis'"):
        build_data("augmented", {"transfer_set": {"copis": 3}})
    with pytest.raises(DataError, match="Did you mean 'generated_sentiment'"):
        build_data("augmented", {"dataset": "generated_sentimnt"})
    assert "augmented" in DATASETS


def test_the_nltk_tagger_is_used_only_when_its_data_is_installed(monkeypatch):
    import sys
    import types

    found = {"taggers/averaged_perceptron_tagger_eng"}

    def find(resource):
        if resource not in found:
            raise LookupError(resource)
        return resource

    fake = types.SimpleNamespace(data=types.SimpleNamespace(find=find),
                                 pos_tag=lambda words: [(w, "NN" if w == "test" else "DT") for w in words],
                                 download=lambda *a, **k: pytest.fail("nltk.download must never be called"))
    monkeypatch.setitem(sys.modules, "nltk", fake)
    assert nltk_tagger()(["a", "test"]) == ["DT", "NN"]
    found.clear()
    assert nltk_tagger() is None
    monkeypatch.setitem(sys.modules, "nltk", None)  # not installed
    assert nltk_tagger() is None
