"""Tang et al.'s transfer set: a text classification training set grown by rule-based copies.

Tang et al. 2019 ("Distilling Task-Specific Knowledge from BERT into Simple Neural Networks",
section 3.3) distil on a transfer set: the training examples plus `n_iter` augmented copies
of each, which carry no label of their own: the teacher labels them through the distillation
loss. A copy is made by visiting the words of the example in order and drawing X ~ U[0, 1]
for each: X < p_mask replaces the word with [MASK]; p_mask <= X < p_mask + p_pos replaces it
with another word of the same part of speech (drawn from the training set's unigram
distribution of words with that tag); otherwise the word stays. Then, with probability p_ng,
the whole example is replaced by one of its n-grams (n uniform in {1, ..., 5}). The paper
fixes p_mask = p_pos = 0.1 and p_ng = 0.25 on every dataset and uses n_iter = 20 copies on
SST-2 (10 on the larger MNLI and QQP).

    bundle = with_transfer_set(build_data("generated_sentiment"), copies=20)

    data:                                   # in a config: the `augmented` dataset wraps another
      name: augmented
      args:
        dataset: generated_sentiment        # any text classification dataset...
        transfer_set: {copies: 20}          # ...the TransferSet's settings (Tang's by default)
        max_length: 32                      # ...and every other argument goes to that dataset

Only the training set grows; validation and test sets stay as they are.
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pydantic
import torch
from torch.utils.data import Dataset

from featkd.data import DATASETS, DataBundle
from featkd.errors import DataError, FeatkdError, did_you_mean
from featkd.losses.base import IGNORE_INDEX
from featkd.text import HFTokenizer, TextTokenizer, WordTokenizer, load_tokenizer, pad_collate

#: A part-of-speech tagger: one tag per word of a sentence.
Tagger = Callable[[list[str]], Sequence[str]]

#: How the loader visits the views (see `TransferSet`).
SCHEDULES = ("mixed", "per_epoch")

#: Probability that both sentences of a pair are augmented (else one of them, either with
#: probability 1/2), as in the authors' script for sentence pairs.
PAIR_BOTH = 1 / 3


def nltk_tagger() -> Tagger | None:
    """NLTK's averaged perceptron tagger, if nltk and the tagger's data are installed (it is
    never downloaded), else None."""
    try:
        import nltk
    except ImportError:
        return None
    for resource in ("taggers/averaged_perceptron_tagger_eng", "taggers/averaged_perceptron_tagger"):
        try:
            nltk.data.find(resource)
            break
        except LookupError:
            continue
    else:
        return None

    def tag(words: list[str]) -> list[str]:
        return [t for _, t in nltk.pos_tag(list(words))]

    try:  # the data found may be another version than this nltk reads
        tag(["a", "test"])
    except (LookupError, OSError, ValueError):
        return None
    return tag


class _Segment:
    """A run of words between special tokens (a sentence of a pair); a word is a tuple of ids."""

    __slots__ = ("words", "type_id")

    def __init__(self, type_id: int) -> None:
        self.words: list[tuple[int, ...]] = []
        self.type_id = type_id


class TransferSet(Dataset):
    """A text classification set with `copies` augmented copies of each example (Tang et al.).

    Item `i + v * n` (n = the base set's size) is view v of sample i, with extras
    `{"index": i, "view": v}`: view 0 is the original with its label, views 1..copies are
    augmented copies labelled -100 (no ground truth; the loss `ce` ignores them and logit
    losses take the teacher's outputs as their target). A copy is drawn from a generator
    seeded by (seed, sample, view), so it is the same whenever it is read again:
    `replayable_views` is copies + 1 and a teacher output cache (`teacher_cache: true`)
    runs the teacher once per copy.

    How a copy is made (Tang et al. section 3.3): words are visited in order, each with one
    draw X ~ U[0, 1]: X < mask_probability replaces it with the mask token,
    mask_probability <= X < mask_probability + pos_probability with a word of the same part
    of speech, drawn from the unigram distribution of the training set's words with that tag
    (so the two are exclusive); then, with ngram_probability, the words are replaced by one
    of their n-grams, n uniform in `ngram_range` (inclusive; all the words when n is not
    less than their number), its position uniform. Special tokens ([CLS], [SEP], ...) are
    never touched. Of a sentence pair, both sentences are augmented with probability 1/3,
    else one of them (as the authors' script for pairs did); each has its own n-gram draw.
    Unlike that script, a copy equal to its original is kept rather than dropped, so every
    example has exactly `copies` copies and the rates are exactly the probabilities given.

    Words: with a word tokenizer (or none given: its ids are assumed) a token is a word; with
    a Hugging Face tokenizer, pieces that continue a word (WordPiece's "##", or pieces
    without the word-start marker of byte-level BPE "Ġ" and SentencePiece "▁") stay with it,
    and a masked word becomes one mask token. A copy is never longer than its original (a
    longer replacement word drops words from the end). The teacher and the student see the
    same mask token (Tang's student read it as an unknown word).

    POS-guided replacement needs a tagger and the words' text: `tagger` (a function from a
    sentence's words to their tags; default: NLTK's tagger when nltk and its tagger data are
    installed, never downloaded; `with_transfer_set` passes the data's own tagger first) and
    a `tokenizer` that can spell its ids. Without either,
    the replacement is skipped (those words stay as they are), which is said once with a
    warning and kept in `pos_note`. (The authors' script tags with NLTK too.)

    `schedule` says how a training loader visits the views: "mixed" (the transfer set of the
    paper) makes the set n * (copies + 1) items long, so every epoch visits all of them,
    shuffled together; "per_epoch" keeps it n long with `views` = copies + 1, so that epoch e
    visits view (e - 1) mod (copies + 1) of every sample (as `ArrayDataset` does). A teacher
    trained on the same data learns from the originals only: with "per_epoch" it would see
    them only one epoch in copies + 1.
    """

    def __init__(self, dataset: Dataset, copies: int = 20, mask_probability: float = 0.1,
                 ngram_probability: float = 0.25, ngram_range: tuple[int, int] = (1, 5), pos_probability: float = 0.1,
                 seed: int = 0, *, tokenizer: TextTokenizer | None = None, tagger: Tagger | None = None,
                 schedule: str = "mixed") -> None:
        _check_settings(copies, mask_probability, ngram_probability, ngram_range, pos_probability, schedule)
        if getattr(dataset, "per_token_outputs", False) or isinstance(dataset, TransferSet):
            raise DataError("TransferSet augments a text classification training set (one label per text); "
                            f"got {type(dataset).__name__}.")
        self.dataset = dataset
        self.copies = int(copies)
        self.mask_probability = float(mask_probability)
        self.pos_probability = float(pos_probability)
        self.ngram_probability = float(ngram_probability)
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.seed = int(seed)
        self.schedule = schedule
        self.tokenizer = tokenizer
        self._n = len(dataset)  # type: ignore[arg-type]
        if self._n == 0:
            raise DataError("TransferSet: the dataset is empty.")
        self.pad_id = int(getattr(dataset, "pad_id", tokenizer.pad_id if tokenizer is not None else 0))
        if tokenizer is None:
            if self.pad_id != 0:
                raise DataError(f"TransferSet: the dataset pads with id {self.pad_id}, so it was not made by a word "
                                "tokenizer; pass its tokenizer (tokenizer=...) to say which ids are special and "
                                "which is the mask.")
            self.special = frozenset(range(len(WordTokenizer.SPECIALS)))
            self.mask_id: int | None = WordTokenizer.SPECIALS.index("[MASK]")
        else:
            self.special = frozenset(int(i) for i in tokenizer.special_ids) | {self.pad_id}
            self.mask_id = tokenizer.mask_id
        if self.mask_id is None and mask_probability > 0:
            source = tokenizer.source if tokenizer is not None else "word"
            raise DataError(f"TransferSet: the tokenizer {source!r} has no mask token; set mask_probability=0 or use "
                            "a tokenizer with one.")
        self._continues = _continuation_table(tokenizer)
        first = dataset[0]
        if not isinstance(first[0], dict) or "input_ids" not in first[0] or torch.as_tensor(first[1]).dim() != 0:
            raise DataError("TransferSet augments a text classification set: items (inputs with input_ids, one "
                            f"label); got an item of {type(first[0]).__name__} with label shape "
                            f"{tuple(torch.as_tensor(first[1]).shape)}.")
        targets = getattr(dataset, "targets", None)
        self.targets = [int(y) for y in targets] if targets is not None else \
            [int(dataset[i][1]) for i in range(self._n)]
        self.pos_note: str | None = None
        self._tags: list[list[list[str]]] | None = None
        self._pos_words: dict[str, list[tuple[int, ...]]] = {}
        if pos_probability > 0:
            self._prepare_pos(tagger)

    # -- the dataset interface --------------------------------------------------------------
    def __len__(self) -> int:
        return self._n if self.schedule == "per_epoch" else self._n * (self.copies + 1)

    @property
    def samples(self) -> int:
        """Distinct samples (each with `replayable_views` views): what a teacher cache is sized by."""
        return self._n

    @property
    def views(self) -> int | None:
        """Views a loader visits one per epoch ("per_epoch"), else None (all in every epoch)."""
        return self.copies + 1 if self.schedule == "per_epoch" else None

    #: a text set: batches padded to their own longest sequence
    pads_sequences = True

    @property
    def replayable_views(self) -> int | None:
        """copies + 1 fixed views per sample (None if the base set's own items are not fixed)."""
        return self.copies + 1 if getattr(self.dataset, "replayable_views", None) == 1 else None

    def collate(self, items: Sequence[tuple]) -> tuple:
        """Pad a batch as the base set does (`featkd.data.collate_of` finds this)."""
        collate = getattr(self.dataset, "collate", None)
        return collate(items) if collate is not None else pad_collate(items, self.pad_id)

    def __getitem__(self, index: int) -> tuple:
        index = int(index)
        if not 0 <= index < self._n * (self.copies + 1):
            raise IndexError(f"TransferSet index {index} out of range for {self._n} samples x "
                             f"{self.copies + 1} views.")
        sample, view = index % self._n, index // self._n
        inputs, label = self.dataset[sample][:2]
        extras = {"index": sample, "view": view}
        if view == 0:
            return inputs, label, extras
        return self.augment(inputs, sample, view), torch.tensor(IGNORE_INDEX), extras

    # -- augmentation -----------------------------------------------------------------------
    def augment(self, inputs: dict[str, torch.Tensor], sample: int, view: int) -> dict[str, torch.Tensor]:
        """Copy `view` of sample `sample` (inputs as the base set gives them)."""
        rng = random.Random((self.seed * 1_000_003 + sample) * 1_009 + view)
        ids = [int(i) for i in torch.as_tensor(inputs["input_ids"]).tolist()]
        types = [int(t) for t in torch.as_tensor(inputs["token_type_ids"]).tolist()] \
            if "token_type_ids" in inputs else None
        units = self._units(ids, types)
        segments = [u for u in units if isinstance(u, _Segment) and u.words]
        tags = self._tags[sample] if self._tags is not None else None
        chosen = range(len(segments))
        if len(segments) > 1 and rng.random() >= PAIR_BOTH:
            chosen = [rng.randrange(len(segments))]
        for k in chosen:
            segments[k].words = self._augment_words(segments[k].words, tags[k] if tags is not None else None, rng)
        self._fit(units, len(ids))
        new_ids: list[int] = []
        new_types: list[int] = []
        for unit in units:
            if isinstance(unit, _Segment):
                for word in unit.words:
                    new_ids += word
                    new_types += [unit.type_id] * len(word)
            else:
                new_ids.append(unit[0])
                new_types.append(unit[1])
        out = {**inputs, "input_ids": torch.tensor(new_ids, dtype=torch.long)}
        if types is not None:
            out["token_type_ids"] = torch.tensor(new_types, dtype=torch.long)
        return out

    def _augment_words(self, words: list[tuple[int, ...]], tags: list[str] | None,
                       rng: random.Random) -> list[tuple[int, ...]]:
        """One pass of Tang et al.'s rules over a sentence's words."""
        out = []
        p_mask, p_pos = self.mask_probability, self.mask_probability + self.pos_probability
        for j, word in enumerate(words):
            x = rng.random()
            if x < p_mask:
                word = (self.mask_id,)  # type: ignore[assignment]
            elif x < p_pos and tags is not None:
                word = rng.choice(self._pos_words[tags[j]])
            out.append(word)
        if rng.random() < self.ngram_probability:
            n = rng.randint(*self.ngram_range)
            if n < len(out):
                start = rng.randint(0, len(out) - n)
                out = out[start:start + n]
        return out

    def _units(self, ids: list[int], types: list[int] | None) -> list[Any]:
        """The sequence as special tokens `(id, type)` and `_Segment`s of words between them."""
        units: list[Any] = []
        for position, token in enumerate(ids):
            type_id = types[position] if types is not None else 0
            if token in self.special:
                units.append((token, type_id))
                continue
            if not units or not isinstance(units[-1], _Segment) or units[-1].type_id != type_id:
                units.append(_Segment(type_id))
            segment = units[-1]
            if segment.words and self._continues is not None and 0 <= token < len(self._continues) \
                    and self._continues[token]:
                segment.words[-1] = (*segment.words[-1], token)
            else:
                segment.words.append((token,))
        return units

    @staticmethod
    def _fit(units: list[Any], length: int) -> None:
        """Drop words from the end of the longest sentence until the copy is not longer than
        its original (only a replacement word of more pieces can make it longer)."""
        segments = [u for u in units if isinstance(u, _Segment)]

        def size() -> int:
            return sum(len(w) for s in segments for w in s.words) + sum(1 for u in units if not isinstance(u, _Segment))

        while size() > length:
            longest = max(segments, key=lambda s: sum(len(w) for w in s.words))
            if len(longest.words) <= 1:
                break
            longest.words.pop()

    # -- part-of-speech tags ----------------------------------------------------------------
    def _prepare_pos(self, tagger: Tagger | None) -> None:
        """Tag every sample's words and gather the words of each tag (with repeats: the unigram
        distribution); without a tagger or the words' text, note why POS replacement is off."""
        tagger = tagger if tagger is not None else nltk_tagger()
        spell = _speller(self.tokenizer)
        if tagger is None:
            self.pos_note = ("no part-of-speech tagger is installed (nltk with its averaged perceptron tagger data; "
                             "featkd never downloads it), or pass tagger=")
        elif spell is None:
            self.pos_note = ("the words' text is unknown: the word vocabulary built from the training texts is not "
                             "kept with the data; pass the tokenizer (tokenizer=) or load the data with a saved "
                             "vocabulary or a Hugging Face tokenizer folder")
        if self.pos_note is not None:
            self.pos_note = f"TransferSet: POS-guided word replacement is skipped: {self.pos_note}."
            warnings.warn(self.pos_note, stacklevel=3)
            return
        tags: list[list[list[str]]] = []
        for sample in range(self._n):
            inputs = self.dataset[sample][0]
            ids = [int(i) for i in torch.as_tensor(inputs["input_ids"]).tolist()]
            types = [int(t) for t in torch.as_tensor(inputs["token_type_ids"]).tolist()] \
                if "token_type_ids" in inputs else None
            per_segment = []
            for segment in (u for u in self._units(ids, types) if isinstance(u, _Segment) and u.words):
                words = [spell(w) for w in segment.words]  # type: ignore[misc]
                segment_tags = [str(t) for t in tagger(words)]  # type: ignore[misc]
                if len(segment_tags) != len(words):
                    raise DataError(f"TransferSet: the tagger gave {len(segment_tags)} tags for {len(words)} words.")
                for word, tag in zip(segment.words, segment_tags):
                    self._pos_words.setdefault(tag, []).append(word)
                per_segment.append(segment_tags)
            tags.append(per_segment)
        self._tags = tags


def _check_settings(copies: int, mask_probability: float, ngram_probability: float, ngram_range: Sequence[int],
                    pos_probability: float, schedule: str) -> None:
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise DataError(f"TransferSet: copies must be a whole number >= 0, got {copies!r}.")
    for name, p in (("mask_probability", mask_probability), ("pos_probability", pos_probability),
                    ("ngram_probability", ngram_probability)):
        if not 0 <= p <= 1:
            raise DataError(f"TransferSet: {name} must be in [0, 1], got {p}.")
    if mask_probability + pos_probability > 1:
        raise DataError(f"TransferSet: mask_probability + pos_probability is {mask_probability + pos_probability}; "
                        "a word is masked or replaced, not both, so they can add up to 1 at most.")
    if len(ngram_range) != 2 or not 1 <= ngram_range[0] <= ngram_range[1]:
        raise DataError(f"TransferSet: ngram_range must be (shortest, longest) with 1 <= shortest <= longest, "
                        f"got {tuple(ngram_range)}.")
    if schedule not in SCHEDULES:
        raise DataError(f"TransferSet: schedule {schedule!r} is not one of {', '.join(SCHEDULES)}."
                        f"{did_you_mean(schedule, SCHEDULES)}")


def _continuation_table(tokenizer: TextTokenizer | None) -> list[bool] | None:
    """Per token id, whether it continues the word before it (None: every token is a word)."""
    if not isinstance(tokenizer, HFTokenizer):
        return None
    tokens = [str(t) for t in tokenizer.tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))]
    if any(t.startswith("##") for t in tokens):
        return [t.startswith("##") for t in tokens]
    for marker in ("Ġ", "▁"):
        if sum(t.startswith(marker) for t in tokens) > len(tokens) // 10:
            return [not t.startswith(marker) for t in tokens]
    return None


def _speller(tokenizer: TextTokenizer | None) -> Callable[[tuple[int, ...]], str] | None:
    """A function giving a word's text from its ids, if the tokenizer can spell them."""
    if isinstance(tokenizer, WordTokenizer):
        return lambda word: " ".join(tokenizer.tokens[i] for i in word)
    if isinstance(tokenizer, HFTokenizer):
        return lambda word: str(tokenizer.tokenizer.decode(list(word))).strip()
    return None


def with_transfer_set(bundle: DataBundle, copies: int = 20, mask_probability: float = 0.1,
                      ngram_probability: float = 0.25, ngram_range: tuple[int, int] = (1, 5),
                      pos_probability: float = 0.1, seed: int = 0, *, tokenizer: TextTokenizer | None = None,
                      tagger: Tagger | None = None, schedule: str = "mixed") -> DataBundle:
    """`bundle` with its training set grown into Tang et al.'s transfer set (`TransferSet`);
    validation and test sets unchanged. Any text classification bundle will do; unless given,
    the tokenizer and the tagger are the bundle's own (generated_sentiment carries its
    grammar's tagger), the tokenizer otherwise loaded from the folder `bundle.text` names and
    the tagger NLTK's where it is installed."""
    if bundle.text is None or bundle.text.task != "classification":
        what = "not tokenised text" if bundle.text is None else f"text for task {bundle.text.task!r}"
        raise DataError(f"a transfer set grows a text classification training set; this data is {what}.")
    if tokenizer is None:
        tokenizer = bundle.tokenizer if bundle.tokenizer is not None or bundle.text.tokenizer == "word" \
            else load_tokenizer(bundle.text.tokenizer)
    train = TransferSet(bundle.train, copies, mask_probability, ngram_probability, ngram_range, pos_probability,
                        seed, tokenizer=tokenizer, tagger=tagger if tagger is not None else bundle.tagger,
                        schedule=schedule)
    return dataclasses.replace(bundle, train=train)


# -- the `augmented` dataset -------------------------------------------------------------------


def _known_dataset(name: str) -> str:
    if name == "augmented":
        raise DataError("augmented: `dataset` names the dataset to wrap, another than augmented itself.")
    try:
        DATASETS.get(name)
    except FeatkdError as exc:
        raise DataError(f"augmented: {exc}") from None
    return name


class TransferSetOptions(pydantic.BaseModel):
    """The `transfer_set` settings of the `augmented` dataset (see `TransferSet`)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    copies: pydantic.NonNegativeInt = 20
    mask_probability: float = pydantic.Field(default=0.1, ge=0, le=1)
    pos_probability: float = pydantic.Field(default=0.1, ge=0, le=1)
    ngram_probability: float = pydantic.Field(default=0.25, ge=0, le=1)
    ngram_range: tuple[pydantic.PositiveInt, pydantic.PositiveInt] = (1, 5)
    seed: int = 0
    schedule: str = "mixed"


def _transfer_options(value: dict[str, Any] | None) -> dict[str, Any]:
    """The `transfer_set` settings checked (names, types, ranges) and completed with defaults."""
    try:
        options = TransferSetOptions(**(value or {}))
        _check_settings(options.copies, options.mask_probability, options.ngram_probability, options.ngram_range,
                        options.pos_probability, options.schedule)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            known = list(TransferSetOptions.model_fields)
            raise DataError(f"augmented: transfer_set has no setting {where!r}.{did_you_mean(where, known)} "
                            f"Known: {', '.join(known)}.") from None
        raise DataError(f"augmented: transfer_set.{where}: {error['msg']}.") from None
    except DataError as exc:
        raise DataError(f"augmented: transfer_set: {str(exc).removeprefix('TransferSet: ')}") from None
    return options.model_dump()


@DATASETS.register("augmented")
def augmented(dataset: str = "generated_sentiment", transfer_set: dict[str, Any] | None = None,
              **dataset_args: Any) -> DataBundle:
    """A text classification dataset with Tang et al.'s transfer set as its training set.

    `dataset` names the dataset to build, and every argument other than `transfer_set` is
    that dataset's (so `data.args.train_size=128` reaches generated_sentiment).
    `transfer_set` holds the `TransferSet` settings: copies (default 20, Tang et al.'s for
    SST-2), mask_probability, pos_probability (0.1 each), ngram_probability (0.25),
    ngram_range ([1, 5]), seed, schedule ("mixed": every epoch visits the originals and all
    their copies, shuffled together). Copies are labelled -100: use `ce` (it ignores them)
    with a logit loss such as `logit_mse`, and `teacher_cache: true` to run the teacher once
    per copy. Validation and test sets are the wrapped dataset's.
    """
    options = _transfer_options(transfer_set)
    bundle = DATASETS.build(_known_dataset(dataset), **dataset_args)
    return with_transfer_set(bundle, **options)
