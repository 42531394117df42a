"""Text data: tokenizers, padded batches, masked and causal language modelling, two datasets.

Nothing here downloads. `generated_sentiment` is a procedurally generated sentiment task that
ships with the package (it needs word order, which a bag of words cannot see), and `text_files`
reads TSV, CSV or JSONL files the user already has. Text is tokenised by a word-level tokenizer
built from the training texts, or by a Hugging Face tokenizer saved in a local folder (the
optional `nlp` extra).

Batch conventions (models, losses and loaders rely on them):

* an item is `(inputs, label)`, or `(inputs, label, extras)` after `featkd.data.WithIndex`;
  `inputs` holds "input_ids" (1-D long, unpadded) and, for sentence pairs, "token_type_ids";
* a dataset's `collate` pads a list of items to the longest sequence and returns
  `(inputs, labels)` or `(inputs, labels, extras)`, with inputs "input_ids", "attention_mask"
  (1 at real tokens) and "token_type_ids" (if present), all (B, T) long; labels are (B,) for
  classification and (B, T) for language modelling, -100 where nothing is predicted.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from featkd.data import DATASETS, TEXT_TASKS, DataBundle, TextInfo, validation_indices
from featkd.errors import DataError, did_you_mean
from featkd.losses.base import IGNORE_INDEX


_INSTALL_NLP = 'pip install "featkd[nlp]" (or pip install -e ".[nlp]" from a checkout)'


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


class TextTokenizer:
    """What the datasets need of a tokenizer, whichever kind it is: encode a text (or a pair)
    with truncation to `max_length`, the vocabulary size, and the padding, mask and special ids."""

    #: "word" for a word tokenizer built from the training texts, else the folder it came from
    source: str = "word"

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        raise NotImplementedError

    @property
    def mask_id(self) -> int | None:
        raise NotImplementedError

    @property
    def special_ids(self) -> frozenset[int]:
        raise NotImplementedError

    @property
    def max_length_limit(self) -> int | None:
        """The longest sequence the tokenizer's model accepts, if it says (None: no limit)."""
        return None

    def encode(self, text: str, pair: str | None = None, max_length: int | None = None) -> dict[str, list[int]]:
        raise NotImplementedError

    def save(self, folder: str | Path) -> Path:
        """Write the tokenizer to `folder` so that `load_tokenizer(folder)` gives it back."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                     max_length: int | None = None) -> list[dict[str, list[int]]]:
        """Encode many texts at once (Hugging Face tokenizers are much faster this way)."""
        if pairs is None:
            return [self.encode(t, None, max_length) for t in texts]
        return [self.encode(t, p, max_length) for t, p in zip(texts, pairs)]


_WORD = re.compile(r"\w+|[^\w\s]")


class WordTokenizer(TextTokenizer):
    """A word-level tokenizer built from training texts: lowercased words and punctuation marks,
    one token each. It needs no dependency and no files, which suits small embedded tasks and
    quick runs on text files; its vocabulary is fixed by the training texts (ties in frequency
    broken alphabetically), so the same data always gives the same ids.

    Ids 0-4 are [PAD], [UNK], [CLS], [SEP] and [MASK]; an encoded text is
    `[CLS] a [SEP]`, or `[CLS] a [SEP] b [SEP]` for a pair (token type 0, then 1).
    """

    SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    #: file name of a saved vocabulary (`save` / `load`)
    FILE = "word_vocab.json"
    unk_id, cls_id, sep_id = 1, 2, 3

    def __init__(self, tokens: Sequence[str], source: str = "word") -> None:
        if tuple(tokens[: len(self.SPECIALS)]) != self.SPECIALS:
            raise DataError(f"a word vocabulary must start with {', '.join(self.SPECIALS)}.")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise DataError("a word vocabulary lists some token twice.")
        self.source = source

    @staticmethod
    def split(text: str) -> list[str]:
        """Lowercased words and punctuation marks."""
        return _WORD.findall(text.lower())

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> WordTokenizer:
        """A vocabulary of the words seen at least `min_count` times, most frequent first, at
        most `max_size` entries with the special tokens included; other words become [UNK]."""
        counts = Counter(w for text in texts for w in cls.split(text))
        words = sorted((w for w, c in counts.items() if c >= min_count and w not in cls.SPECIALS),
                       key=lambda w: (-counts[w], w))
        if max_size is not None:
            if max_size <= len(cls.SPECIALS):
                raise DataError(f"max_size must exceed the {len(cls.SPECIALS)} special tokens, got {max_size}.")
            words = words[: max_size - len(cls.SPECIALS)]
        return cls([*cls.SPECIALS, *words])

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def mask_id(self) -> int:
        return 4

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(range(len(self.SPECIALS)))

    def ids(self, text: str) -> list[int]:
        """The ids of a text's words, without special tokens."""
        return [self.index.get(w, self.unk_id) for w in self.split(text)]

    def encode(self, text: str, pair: str | None = None, max_length: int | None = None) -> dict[str, list[int]]:
        """`[CLS] text [SEP] (pair [SEP])`, at most `max_length` ids: the longer part loses its
        last words first, so both parts keep their start and the separators stay."""
        a = self.ids(text)
        b = self.ids(pair) if pair is not None else None
        if max_length is not None:
            budget = max_length - (3 if b is not None else 2)
            if budget < 0:
                raise DataError(f"max_length {max_length} leaves no room for the special tokens.")
            if b is None:
                a = a[:budget]
            else:
                while len(a) + len(b) > budget:
                    if len(a) >= len(b):
                        a.pop()
                    else:
                        b.pop()
        ids = [self.cls_id, *a, self.sep_id]
        if b is None:
            return {"input_ids": ids}
        return {"input_ids": ids + [*b, self.sep_id], "token_type_ids": [0] * len(ids) + [1] * (len(b) + 1)}

    def decode(self, ids: Iterable[int]) -> str:
        """The tokens of `ids`, space separated (for looking at data and predictions)."""
        return " ".join(self.tokens[int(i)] if 0 <= int(i) < len(self.tokens) else "[UNK]" for i in ids)

    def save(self, folder: str | Path) -> Path:
        """Write the vocabulary to `folder/word_vocab.json`, so that another run (a student
        trained on other data, say) can tokenise with the same ids: `tokenizer=folder`."""
        path = Path(folder) / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": "featkd.WordTokenizer", "tokens": self.tokens}, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> WordTokenizer:
        """The vocabulary that `save` wrote to `folder`."""
        path = Path(folder) / cls.FILE
        try:
            payload = json.loads(path.read_text())
            tokens = payload["tokens"]
        except FileNotFoundError:
            raise DataError(f"no word vocabulary at {str(path)!r}; write one with "
                            "WordTokenizer.save(folder).") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{str(path)!r} is not a word vocabulary written by WordTokenizer.save ({exc}).") from None
        return cls(tokens, source=str(folder))


class HFTokenizer(TextTokenizer):
    """A Hugging Face tokenizer behind the interface the datasets use (ids as the tokenizer
    gives them, so that pretrained models and their distilled students agree)."""

    def __init__(self, tokenizer: Any, source: str) -> None:
        self.tokenizer = tokenizer
        self.source = source

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        """The padding token, else end-of-text (GPT-2 has no padding; the attention mask hides it)."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        return 0

    @property
    def mask_id(self) -> int | None:
        token_id = self.tokenizer.mask_token_id
        return None if token_id is None else int(token_id)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(int(i) for i in self.tokenizer.all_special_ids)

    @property
    def max_length_limit(self) -> int | None:
        limit = getattr(self.tokenizer, "model_max_length", None)
        return int(limit) if limit is not None and limit < 1_000_000_000 else None

    def save(self, folder: str | Path) -> Path:
        self.tokenizer.save_pretrained(str(folder))
        return Path(folder)

    def encode(self, text: str, pair: str | None = None, max_length: int | None = None) -> dict[str, list[int]]:
        return self.encode_batch([text], None if pair is None else [pair], max_length)[0]

    def encode_batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                     max_length: int | None = None) -> list[dict[str, list[int]]]:
        out: list[dict[str, list[int]]] = []
        for start in range(0, len(texts), 4096):  # bounded memory on large files
            chunk = list(texts[start:start + 4096])
            second = None if pairs is None else list(pairs[start:start + 4096])
            encoded = self.tokenizer(chunk, second, truncation=max_length is not None, max_length=max_length)
            for i, ids in enumerate(encoded["input_ids"]):
                item = {"input_ids": list(ids)}
                if second is not None and "token_type_ids" in encoded:
                    item["token_type_ids"] = list(encoded["token_type_ids"][i])
                out.append(item)
        return out


def load_tokenizer(path_or_word: str, texts: Iterable[str] | None = None, *, min_count: int = 1,
                   max_size: int | None = None) -> TextTokenizer:
    """The tokenizer a text dataset names: "word" builds a `WordTokenizer` from `texts` (the
    training texts); a folder holding `word_vocab.json` is a saved word vocabulary; any other
    folder is a Hugging Face tokenizer saved there with `tokenizer.save_pretrained(folder)`."""
    if path_or_word == "word":
        if texts is None:
            raise DataError('a "word" tokenizer is built from the training texts; pass them as `texts`.')
        return WordTokenizer.build(texts, min_count=min_count, max_size=max_size)
    folder = Path(path_or_word).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"tokenizer folder {path_or_word!r} does not exist. Put a Hugging Face tokenizer there, saved with "
            "`tokenizer.save_pretrained(folder)` on a machine that has it (featkd never downloads), or use "
            'tokenizer="word" to build a word vocabulary from the training texts.'
        )
    if (folder / WordTokenizer.FILE).is_file():
        return WordTokenizer.load(folder)
    try:
        import transformers
    except ImportError:
        raise DataError(f"Hugging Face tokenizers need the optional dependency transformers: {_INSTALL_NLP}.") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise DataError(
            f"cannot load a tokenizer from {path_or_word!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            f"The folder holds {found}; it needs the files `tokenizer.save_pretrained(folder)` writes "
            "(tokenizer_config.json with tokenizer.json or a vocabulary)."
        ) from None
    return HFTokenizer(tokenizer, source=str(path_or_word))


# --------------------------------------------------------------------------------------------
# Datasets and batching
# --------------------------------------------------------------------------------------------


def pad_collate(items: Sequence[tuple], pad_id: int) -> tuple:
    """Pad items `(inputs, label[, extras])` to the longest sequence among them (see the module
    docstring for the batch this gives). The attention mask comes from the lengths, not from
    comparing ids with `pad_id`, which may be a real token (GPT-2 pads with end-of-text)."""
    if not items:
        raise DataError("cannot collate an empty batch.")
    inputs = [item[0] for item in items]
    lengths = [len(x["input_ids"]) for x in inputs]
    batch, longest = len(items), max(lengths)
    ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    types = torch.zeros((batch, longest), dtype=torch.long) if "token_type_ids" in inputs[0] else None
    for row, (x, n) in enumerate(zip(inputs, lengths)):
        ids[row, :n] = torch.as_tensor(x["input_ids"])
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = torch.as_tensor(x["token_type_ids"])
    out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        out["token_type_ids"] = types
    labels = [torch.as_tensor(item[1]) for item in items]
    if labels[0].dim() == 0:
        y = torch.stack(labels).long()
    else:
        y = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        for row, label in enumerate(labels):
            y[row, : len(label)] = label
    if len(items[0]) > 2:
        return out, y, default_collate([item[2] for item in items])
    return out, y


def _as_inputs(sequence: Any) -> dict[str, torch.Tensor]:
    if isinstance(sequence, dict):
        return {k: torch.as_tensor(v, dtype=torch.long) for k, v in sequence.items()}
    return {"input_ids": torch.as_tensor(sequence, dtype=torch.long)}


class TokenDataset(Dataset):
    """Tokenised sequences (unpadded) that pad themselves per batch: `collate`."""

    #: batches are padded to their own longest sequence, so per-token outputs change shape
    pads_sequences = True

    def __init__(self, sequences: Sequence[Any], pad_id: int = 0) -> None:
        self.sequences = [_as_inputs(s) for s in sequences]
        self.pad_id = int(pad_id)

    def __len__(self) -> int:
        return len(self.sequences)

    def collate(self, items: Sequence[tuple]) -> tuple:
        """Pad a batch to its longest sequence (`featkd.data.collate_of` finds this)."""
        return pad_collate(items, self.pad_id)


class TextClassificationDataset(TokenDataset):
    """Tokenised texts with one class label each; `targets` serve stratified splits."""

    replayable_views = 1

    def __init__(self, sequences: Sequence[Any], labels: Sequence[int], pad_id: int = 0) -> None:
        super().__init__(sequences, pad_id)
        if len(labels) != len(self.sequences):
            raise DataError(f"{len(self.sequences)} texts but {len(labels)} labels")
        self.targets = [int(y) for y in labels]

    def __getitem__(self, index: int) -> tuple:
        return self.sequences[index], torch.tensor(self.targets[index])


class CausalLMDataset(TokenDataset):
    """Next-token prediction on tokenised texts.

    Convention (Hugging Face's for causal language models): a model's logits at position t
    predict the token at position t + 1 from the tokens up to t. Labels come shifted to match:
    an item's label at t is its token at t + 1, -100 at the last position (nothing follows
    it) and, after `collate`, at padding. Token-level losses then compare position t of
    student, teacher and labels with no shifting of their own.
    """

    replayable_views = 1
    #: labels, and a model's outputs, are per token (their length varies with the batch)
    per_token_outputs = True

    def __getitem__(self, index: int) -> tuple:
        inputs = self.sequences[index]
        labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
        labels[:-1] = inputs["input_ids"][1:]
        return inputs, labels


class MaskedLMDataset(TokenDataset):
    """BERT's masked language modelling (the task of DistilBERT's task-agnostic distillation).

    Each item chooses `probability` of its non-special tokens (stochastically rounded, at least
    one when there is any): 80% of the chosen become [MASK], 10% a random non-special token and
    10% stay as they are. Labels hold the original ids at chosen positions and -100 elsewhere.

    Without `seed` the masking is drawn afresh at every access from torch's global generator
    (dynamic masking, as RoBERTa does; seeding torch repeats a run), so views cannot be replayed
    (`replayable_views` is None). With `seed`, item i's masking is fixed by (seed, i): evaluation
    sets measure the same masked positions every time.
    """

    per_token_outputs = True

    def __init__(self, sequences: Sequence[Any], tokenizer: TextTokenizer, probability: float = 0.15,
                 seed: int | None = None) -> None:
        super().__init__(sequences, tokenizer.pad_id)
        if not 0 < probability < 1:
            raise DataError(f"mask_probability must be in (0, 1), got {probability}.")
        if tokenizer.mask_id is None:
            raise DataError(f"the tokenizer {tokenizer.source!r} has no mask token, so it cannot serve masked language "
                            'modelling; use task="causal_lm" or a tokenizer with a [MASK] token.')
        self.probability = probability
        self.mask_id = int(tokenizer.mask_id)
        self.seed = seed
        special = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
        special[[i for i in tokenizer.special_ids if 0 <= i < tokenizer.vocab_size]] = True
        self.special = special
        self.replacements = torch.nonzero(~special).flatten()
        if len(self.replacements) == 0:
            raise DataError("the vocabulary holds special tokens only; nothing can be masked.")

    @property
    def replayable_views(self) -> int | None:
        """1 when each item's masking is fixed by `seed`, else None (fresh masking each time)."""
        return None if self.seed is None else 1

    def __getitem__(self, index: int) -> tuple:
        inputs = self.sequences[index]
        ids = inputs["input_ids"]
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        masked, labels = self.mask(ids, generator)
        return {**inputs, "input_ids": masked}, labels

    def mask(self, ids: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked ids, labels) for one sequence."""
        candidates = torch.nonzero(~self.special[ids.clamp(0, len(self.special) - 1)]).flatten()
        labels = torch.full_like(ids, IGNORE_INDEX)
        masked = ids.clone()
        n = len(candidates)
        if n == 0:
            return masked, labels
        draws = torch.rand(1, generator=generator)
        count = max(1, int(self.probability * n + float(draws)))
        chosen = candidates[torch.randperm(n, generator=generator)[:count]]
        labels[chosen] = ids[chosen]
        kind = torch.rand(len(chosen), generator=generator)
        masked[chosen[kind < 0.8]] = self.mask_id
        randomised = chosen[(kind >= 0.8) & (kind < 0.9)]
        if len(randomised):
            pick = torch.randint(len(self.replacements), (len(randomised),), generator=generator)
            masked[randomised] = self.replacements[pick]
        return masked, labels


# --------------------------------------------------------------------------------------------
# From texts to a DataBundle
# --------------------------------------------------------------------------------------------


@dataclass
class TextSplit:
    """Raw texts of one split: texts, optional second texts of sentence pairs, optional labels
    (class indices; language-model tasks ignore them)."""

    texts: list[str]
    pairs: list[str] | None = None
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int]) -> TextSplit:
        return TextSplit([self.texts[i] for i in index],
                         None if self.pairs is None else [self.pairs[i] for i in index],
                         None if self.labels is None else [self.labels[i] for i in index])

    def all_texts(self) -> list[str]:
        """Texts and pair texts together (what a word vocabulary is built from)."""
        return self.texts + (self.pairs or [])


def _check_task(task: str) -> None:
    if task not in TEXT_TASKS:
        raise DataError(f"unknown text task {task!r}.{did_you_mean(task, TEXT_TASKS)} "
                        f"Use one of {', '.join(TEXT_TASKS)}.")


def text_bundle(train: TextSplit, test: TextSplit, tokenizer: TextTokenizer, *, task: str = "classification",
                max_length: int = 128, val: TextSplit | None = None, class_names: Sequence[str] = (),
                mask_probability: float = 0.15, seed: int = 0,
                tagger: Callable[[list[str]], list[str]] | None = None) -> DataBundle:
    """Tokenise the splits (truncating to `max_length`) and wrap them for `task`, so that every
    text dataset, embedded or read from files, gives the same kind of bundle.

    Classification gives `TextClassificationDataset`s; "masked_lm" gives a training set with
    fresh masking per access and validation/test sets with masking fixed by `seed`; "causal_lm"
    gives `CausalLMDataset`s. For the language-model tasks `num_classes` is the vocabulary size.
    """
    _check_task(task)
    if max_length < 4:
        raise DataError(f"max_length must be at least 4 (room for special tokens and text), got {max_length}.")
    limit = tokenizer.max_length_limit
    if limit is not None and max_length > limit:
        raise DataError(f"max_length {max_length} exceeds what the tokenizer {tokenizer.source!r} accepts "
                        f"(model_max_length {limit}); lower data.args.max_length to {limit} or less.")
    if task == "classification":
        if not class_names:
            raise DataError("text classification needs class names.")
        for name, split in (("training", train), ("test", test), ("validation", val)):
            if split is not None and split.labels is None:
                raise DataError(f"the {name} texts have no labels, which classification needs.")

    def build(split: TextSplit, role: str) -> Dataset:
        sequences = tokenizer.encode_batch(split.texts, split.pairs, max_length)
        if task == "classification":
            return TextClassificationDataset(sequences, split.labels or [], tokenizer.pad_id)
        if task == "causal_lm":
            return CausalLMDataset(sequences, tokenizer.pad_id)
        fixed = None if role == "train" else seed * 7 + (1 if role == "val" else 2)
        return MaskedLMDataset(sequences, tokenizer, mask_probability, seed=fixed)

    classification = task == "classification"
    return DataBundle(
        build(train, "train"),
        build(test, "test"),
        num_classes=len(class_names) if classification else tokenizer.vocab_size,
        input_shape=(max_length,),
        class_names=list(class_names) if classification else [],
        val=build(val, "val") if val is not None and len(val) else None,
        text=TextInfo(vocab_size=tokenizer.vocab_size, max_length=max_length, pad_id=tokenizer.pad_id, task=task,
                      tokenizer=tokenizer.source),
        tokenizer=tokenizer,
        tagger=tagger,
    )


def bag_of_words_accuracy(bundle: DataBundle) -> float:
    """Test accuracy of a logistic regression on token counts (a bag of words) fitted on the
    training set, its strength chosen by 5-fold cross-validation on the training set: what a
    model that ignores word order can reach. A text classifier that does not beat it has not
    learned anything order can tell."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    if bundle.text is None or bundle.text.task != "classification":
        raise DataError("bag_of_words_accuracy needs a text classification bundle.")

    def counts(dataset: Dataset) -> tuple[Any, np.ndarray]:
        """Sparse (samples, vocabulary) token counts: large vocabularies stay small in memory."""
        from scipy.sparse import csr_matrix

        rows, targets = [], []
        for i in range(len(dataset)):  # type: ignore[arg-type]
            inputs, label = dataset[i][:2]
            rows.append(inputs["input_ids"].numpy())
            targets.append(int(label))
        indptr = np.cumsum([0, *(len(r) for r in rows)])
        columns = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        x = csr_matrix((np.ones(len(columns), dtype=np.float32), columns, indptr),
                       shape=(len(rows), bundle.text.vocab_size))  # type: ignore[union-attr]
        x.sum_duplicates()
        return x, np.asarray(targets, dtype=np.int64)

    x_train, y_train = counts(bundle.train)
    x_test, y_test = counts(bundle.test)
    folds = min(5, int(np.unique(y_train, return_counts=True)[1].min()))
    best = 1.0
    if folds >= 2:
        best = max((0.01, 0.1, 1.0, 10.0, 100.0), key=lambda c: cross_val_score(
            LogisticRegression(C=c, max_iter=2000), x_train, y_train, cv=folds).mean())
    model = LogisticRegression(C=best, max_iter=2000).fit(x_train, y_train)
    return float((model.predict(x_test) == y_test).mean())


# --------------------------------------------------------------------------------------------
# generated_sentiment: an embedded task that needs word order
# --------------------------------------------------------------------------------------------

POSITIVE = ("good", "great", "excellent", "wonderful", "superb", "brilliant", "delightful", "charming", "moving",
            "clever", "beautiful", "fantastic", "fun", "engaging", "gripping", "impressive", "lovely", "strong",
            "fresh", "memorable", "solid", "stunning", "enjoyable", "thrilling", "funny")
NEGATIVE = ("bad", "awful", "terrible", "dull", "boring", "weak", "poor", "dreadful", "clumsy", "bland", "tedious",
            "messy", "forgettable", "painful", "silly", "flat", "lifeless", "stale", "predictable", "annoying",
            "disappointing", "mediocre", "horrible", "shallow", "slow")
NEGATIONS = ("not", "never", "hardly")
NOUNS = ("film", "movie", "acting", "plot", "story", "script", "music", "soundtrack", "ending", "cast", "dialogue",
         "pacing", "direction", "cinematography", "humor", "lead", "villain", "score", "editing", "premise",
         "finale", "sequel", "performance", "photography", "setting", "twist", "opening", "atmosphere",
         "production", "design")
DETERMINERS = ("the", "this", "that")
VERBS = ("was", "is", "seemed", "felt", "looked", "sounded", "remained", "proved")
INTENSIFIERS = ("very", "really", "quite", "truly", "rather", "so", "extremely", "fairly", "pretty", "remarkably",
                "genuinely", "incredibly")
FILLERS = ("honestly ,", "overall ,", "frankly ,", "to be fair ,", "in the end ,", "for me ,", "i think",
           "i felt that", "in my opinion ,", "admittedly ,", "clearly ,", "of course ,", "all in all ,")
#: how often a clause is negated (its adjective then says the opposite of the clause)
NEGATION_RATE = 0.25

_POSITIVE, _NEGATIVE, _NEGATIONS = frozenset(POSITIVE), frozenset(NEGATIVE), frozenset(NEGATIONS)
_LINKS = frozenset(("but", "yet", "although", "though", "and"))
#: sentence shapes and how often they occur; the comment names the clause that decides the label
_SHAPES = (
    ("single", 0.25),     # A .
    ("and", 0.10),        # A and B .          (A and B agree)
    ("but", 0.20),        # A , but B .        -> B
    ("yet", 0.10),        # A , yet B .        -> B
    ("although", 0.20),   # although A , B .   -> B   ("though A , B" as well)
    ("after", 0.15),      # A , although B .   -> A   ("A , though B" as well)
)


#: the grammar's word classes, Penn Treebank style; every other word (links, punctuation,
#: fillers) is a class of its own, so that POS-guided replacement keeps it
_GRAMMAR_TAGS = {**dict.fromkeys(NOUNS, "NN"), **dict.fromkeys(POSITIVE + NEGATIVE, "JJ"),
                 **dict.fromkeys(VERBS, "VB"), **dict.fromkeys(INTENSIFIERS + NEGATIONS, "RB"),
                 **dict.fromkeys(DETERMINERS, "DT")}


def grammar_tagger(words: list[str]) -> list[str]:
    """Part-of-speech tags of the generated sentiment grammar's words (exact: the grammar
    knows each word's class). A negation is an adverb like an intensifier, as taggers tag it."""
    return [_GRAMMAR_TAGS.get(word, word) for word in words]


def _clause(rng: random.Random, noun: str, polarity: int) -> list[str]:
    negated = rng.random() < NEGATION_RATE
    adjective_polarity = polarity ^ int(negated)
    words = [rng.choice(DETERMINERS), noun, rng.choice(VERBS)]
    if negated:
        words.append(rng.choice(NEGATIONS))
    if rng.random() < 0.5:
        words.append(rng.choice(INTENSIFIERS))
    words.append(rng.choice(POSITIVE if adjective_polarity else NEGATIVE))
    return words


def _sentence(rng: random.Random, label: int) -> str:
    shape = rng.choices([s for s, _ in _SHAPES], weights=[w for _, w in _SHAPES])[0]
    first, second = rng.sample(NOUNS, 2)
    other = label if shape == "and" else rng.randrange(2)
    words = rng.choice(FILLERS).split() if rng.random() < 0.3 else []
    if shape == "single":
        words += _clause(rng, first, label)
    elif shape == "and":
        words += [*_clause(rng, first, label), "and", *_clause(rng, second, other)]
    elif shape in ("but", "yet"):
        words += [*_clause(rng, first, other), ",", shape, *_clause(rng, second, label)]
    elif shape == "although":
        words += [rng.choice(("although", "though")), *_clause(rng, first, other), ",", *_clause(rng, second, label)]
    else:
        words += [*_clause(rng, first, label), ",", rng.choice(("although", "though")), *_clause(rng, second, other)]
    return " ".join([*words, "."])


def sentiment_label(sentence: str) -> int:
    """The label (1 positive, 0 negative) of a sentence of the generated sentiment grammar.

    A clause's polarity is its adjective's, flipped by a negation ("not", "never", "hardly")
    earlier in the same clause. With "but" or "yet" the clause after it decides; "although A ,
    B" is decided by B and "A , although B" by A (likewise "though"); clauses joined by "and"
    agree; a single clause decides alone. Raises ValueError for sentences outside the grammar.
    """
    words = WordTokenizer.split(sentence)
    clauses: list[tuple[int, int]] = []  # (position of the adjective, polarity)
    start = 0
    for j, word in enumerate(words):
        if word in _LINKS or word == ",":
            start = j + 1
        elif word in _POSITIVE or word in _NEGATIVE:
            negated = any(w in _NEGATIONS for w in words[start:j])
            clauses.append((j, int(word in _POSITIVE) ^ int(negated)))
    links = [(j, w) for j, w in enumerate(words) if w in _LINKS]
    if not clauses or len(clauses) != len(links) + 1 or len(clauses) > 2:
        raise ValueError(f"not a sentence of the generated sentiment grammar: {sentence!r}")
    if not links:
        return clauses[0][1]
    where, link = links[0]
    if link in ("but", "yet"):
        return clauses[1][1]
    if link in ("although", "though"):
        return clauses[1][1] if where < clauses[0][0] else clauses[0][1]
    if clauses[0][1] != clauses[1][1]:
        raise ValueError(f"clauses joined by 'and' must agree: {sentence!r}")
    return clauses[0][1]


def generate_sentiment(n: int, seed: int = 0, split: str = "train",
                       exclude: Iterable[str] = ()) -> tuple[list[str], list[int]]:
    """`n` sentences and their labels, half of each class (one more negative when `n` is odd),
    in random order. The same (seed, split) always gives the same sentences; `exclude` lists
    sentences not to produce (the test set leaves out the training sentences)."""
    rng = random.Random(f"generated_sentiment:{seed}:{split}")
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    seen = set(exclude)
    sentences = []
    for label in labels:
        sentence = _sentence(rng, label)
        while sentence in seen:
            sentence = _sentence(rng, label)
        seen.add(sentence)
        sentences.append(sentence)
    return sentences, labels


@DATASETS.register("generated_sentiment")
def generated_sentiment(train_size: int = 2000, test_size: int = 500, validation_size: int = 0, seed: int = 0,
                        max_length: int = 32, task: str = "classification",
                        mask_probability: float = 0.15, train_subset: int | None = None) -> DataBundle:
    """Generated English-like movie-review sentences, positive or negative; label needs word order.

    Sentences have one or two clauses such as "the acting was not very good , but the score
    was superb ." (about 130 words: nouns, verbs, intensifiers, 25 positive and 25 negative
    adjectives, fillers). A clause's polarity is its adjective's, flipped by "not", "never" or
    "hardly" before it; with two clauses the link decides which counts: the clause after "but"
    or "yet", the main clause of "although A , B" (B) and of "A , although B" (A). See
    `sentiment_label`.

    A bag of words cannot solve it: negation flips polarity (an XOR, which no linear model of
    word counts represents), and "although A , B" and "A , although B" hold the same words
    but are decided by different clauses. `bag_of_words_accuracy` measures the ceiling of such
    a model: 69% on the defaults (63-69% over seeds 0-2), where a 2-layer transformer of width
    64 trained on the 2,000 sentences reaches about 93%.

    Everything is generated from `seed` (nothing downloaded): `train_size`, `validation_size`
    and `test_size` sentences, each split half positive, test sentences distinct from training
    ones. Ids come from a word vocabulary built from the training sentences. With task
    "masked_lm" or "causal_lm" the same sentences form a corpus for language modelling
    (`mask_probability` of the tokens masked for the former).

    `train_subset: n` trains on the first n of the `train_size` training sentences only; the
    vocabulary, validation and test sentences stay those of the full draw. A teacher trained
    on all of them and a student on the subset then share ids and test sentences, and the
    teacher has never seen a test sentence (a stand-in for a teacher that knows more than the
    student's labelled data, as a pretrained one does).

    The bundle carries a part-of-speech tagger of the grammar's words (`grammar_tagger`), so
    that Tang et al.'s POS-guided replacement works on it without a tagger installed.
    """
    _check_task(task)
    for name, size in (("train_size", train_size), ("test_size", test_size), ("validation_size", validation_size)):
        if size < (2 if name != "validation_size" else 0):
            raise DataError(f"generated_sentiment: {name} must be at least {2 if name != 'validation_size' else 0}, "
                            f"got {size}.")
    if train_subset is not None and not 2 <= train_subset <= train_size:
        raise DataError(f"generated_sentiment: train_subset must be between 2 and train_size ({train_size}), "
                        f"got {train_subset}.")
    train_texts, train_labels = generate_sentiment(train_size, seed, "train")
    val_texts, val_labels = generate_sentiment(validation_size, seed, "validation", exclude=train_texts)
    test_texts, test_labels = generate_sentiment(test_size, seed, "test", exclude=train_texts + val_texts)
    tokenizer = WordTokenizer.build(train_texts)
    if train_subset is not None:
        train_texts, train_labels = train_texts[:train_subset], train_labels[:train_subset]
    return text_bundle(TextSplit(train_texts, labels=train_labels), TextSplit(test_texts, labels=test_labels),
                       tokenizer, task=task, max_length=max_length, tagger=grammar_tagger,
                       val=TextSplit(val_texts, labels=val_labels) if validation_size else None,
                       class_names=["negative", "positive"], mask_probability=mask_probability, seed=seed)


# --------------------------------------------------------------------------------------------
# text_files: TSV, CSV or JSONL files the user has
# --------------------------------------------------------------------------------------------

_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


def _file_format(path: Path, format: str) -> str:
    if format != "auto":
        if format not in ("tsv", "csv", "jsonl"):
            raise DataError(f"text_files: format {format!r} is not one of auto, tsv, csv, jsonl.")
        return format
    if path.suffix.lower() not in _FORMATS:
        raise DataError(f"text_files: cannot tell the format of {str(path)!r} from its extension; name it .tsv, .csv "
                        "or .jsonl, or set data.args.format to tsv, csv or jsonl.")
    return _FORMATS[path.suffix.lower()]


def _read_rows(path: Path, fmt: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows as dicts (line number under "__line__") and the file's columns."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8", newline="") as handle:
        if fmt == "jsonl":
            columns: dict[str, None] = {}
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"text_files: {str(path)!r} line {number} is not JSON ({exc.msg}); a .jsonl file "
                                    "holds one JSON object per line.") from None
                if not isinstance(row, dict):
                    raise DataError(f"text_files: {str(path)!r} line {number} is not a JSON object.")
                columns.update(dict.fromkeys(row))
                rows.append({**row, "__line__": number})
            return rows, list(columns)
        if fmt == "tsv":  # GLUE's TSV files hold unescaped quotes
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(handle)
        header: list[str] | None = None
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = [cell.strip() for cell in record]
                continue
            if len(record) != len(header):
                raise DataError(f"text_files: {str(path)!r} line {reader.line_num} has {len(record)} fields but the "
                                f"header has {len(header)} ({', '.join(header)}).")
            rows.append({**dict(zip(header, record)), "__line__": reader.line_num})
    return rows, header or []


def _label_key(value: Any) -> str:
    return str(value).strip()


def _sorted_labels(keys: Iterable[str]) -> list[str]:
    unique = set(keys)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


@dataclass
class _Columns:
    text: str
    pair: str | None
    label: str | None


def _read_split(path: Path, what: str, arg: str, fmt: str, columns: _Columns,
                max_samples: int | None) -> tuple[list[str], list[str] | None, list[tuple[str, int]] | None]:
    """Texts, pair texts and (label, line) of one file, with an error for each kind of bad input."""
    if not path.is_file():
        needed = ", ".join(c for c in (columns.text, columns.pair, columns.label) if c)
        raise DataError(f"text_files: the {what} file {str(path)!r} does not exist. Put the {what} split there (a "
                        f"{fmt.upper()} file with columns {needed}), or set data.args.{arg} to the file's name.")
    rows, names = _read_rows(path, fmt)
    if not rows:
        raise DataError(f"text_files: the {what} file {str(path)!r} holds no rows"
                        f"{' below its header' if fmt != 'jsonl' else ''}; fill it or point data.args.{arg} elsewhere.")
    for column, setting in ((columns.text, "text_column"), (columns.pair, "text_pair_column"),
                            (columns.label, "label_column")):
        if column is not None and column not in names:
            raise DataError(f"text_files: {str(path)!r} has no column {column!r}.{did_you_mean(column, names)} "
                            f"Its columns are: {', '.join(names)}. Set data.args.{setting} to one of them.")
    if max_samples is not None:
        rows = rows[:max_samples]

    def field(row: dict[str, Any], column: str) -> Any:
        value = row.get(column)
        if value is None:
            raise DataError(f"text_files: {str(path)!r} line {row['__line__']} has no value in column {column!r}.")
        return value

    texts = [str(field(r, columns.text)) for r in rows]
    pairs = [str(field(r, columns.pair)) for r in rows] if columns.pair else None
    labels = [(_label_key(field(r, columns.label)), r["__line__"]) for r in rows] if columns.label else None
    return texts, pairs, labels


@DATASETS.register("text_files")
def text_files(root: str = "data", train: str = "train.tsv", test: str = "dev.tsv", validation: str | None = None,
               validation_fraction: float = 0.0, text_column: str = "sentence", text_pair_column: str | None = None,
               label_column: str = "label", tokenizer: str = "word", max_length: int = 128,
               labels: list[str | int] | None = None, task: str = "classification", max_samples: int | None = None,
               format: str = "auto", min_count: int = 1, max_vocab: int | None = None, seed: int = 0) -> DataBundle:
    """Text classification (or a language-model corpus) from local TSV, CSV or JSONL files.

    Reads `root/train` and `root/test` (GLUE's train.tsv and dev.tsv by default; the format
    comes from the extension unless `format` says), each with a header row (or JSON keys)
    naming `text_column`, optionally `text_pair_column` for sentence pairs, and `label_column`.
    A validation set is a file of its own (`validation`) or a stratified `validation_fraction`
    of the training file (fixed by `seed`). Class ids follow `labels` if given, else the sorted
    labels of the training file (numerically when all are integers).

    `tokenizer` is "word" (a word vocabulary of the training texts: `min_count`, `max_vocab`
    entries at most), a folder saved by `WordTokenizer.save`, or a folder holding a Hugging
    Face tokenizer (`save_pretrained`; needs the `nlp` extra). Texts are truncated to
    `max_length` tokens. task "masked_lm" or "causal_lm" turns the texts into a language-model
    corpus and ignores labels. `max_samples` keeps the first N rows of each file (quick runs).
    """
    _check_task(task)
    if not 0 <= validation_fraction < 1:
        raise DataError(f"text_files: validation_fraction must be in [0, 1), got {validation_fraction}.")
    if validation is not None and validation_fraction > 0:
        raise DataError("text_files: give a validation file or a validation_fraction, not both.")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"text_files: max_samples must be at least 1, got {max_samples}.")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataError(f"text_files: the folder {root!r} does not exist. Put the data files there ({train} and "
                        f"{test}, with a header row) and set data.args.root to it. featkd does not download data.")
    classification = task == "classification"
    columns = _Columns(text_column, text_pair_column, label_column if classification else None)
    files = {"train": (folder / train, "training", "train"), "test": (folder / test, "test", "test")}
    if validation is not None:
        files["val"] = (folder / validation, "validation", "validation")
    read = {}
    for key, (path, what, arg) in files.items():
        read[key] = _read_split(path, what, arg, _file_format(path, format), columns, max_samples)

    class_names: list[str] = []
    if classification:
        train_keys = [k for k, _ in read["train"][2]]  # type: ignore[union-attr]
        if labels is not None:
            class_names = [_label_key(label) for label in labels]
            if len(set(class_names)) != len(class_names):
                raise DataError(f"text_files: labels lists a label twice: {labels}.")
        else:
            class_names = _sorted_labels(train_keys)
        index = {name: i for i, name in enumerate(class_names)}
        if labels is None and len(class_names) < 2:
            raise DataError(f"text_files: the training file {str(files['train'][0])!r} has only one label "
                            f"({class_names[0]!r}); classification needs two or more.")

    splits: dict[str, TextSplit] = {}
    for key, (texts, pairs, keyed) in read.items():
        ids = None
        if classification:
            ids = []
            for label, line in keyed:  # type: ignore[union-attr]
                if label not in index:
                    source = f"labels={list(class_names)}" if labels is not None else \
                        f"the training file {str(files['train'][0])!r} (labels: {', '.join(class_names)})"
                    raise DataError(f"text_files: {str(files[key][0])!r} line {line} has label {label!r}, which is "
                                    f"not in {source}. Fix the file, or list every label in data.args.labels.")
                ids.append(index[label])
        splits[key] = TextSplit(texts, pairs, ids)

    train_split = splits["train"]
    val_split = splits.get("val")
    if validation_fraction > 0:
        strata = train_split.labels if classification else [0] * len(train_split)
        try:
            keep, held = validation_indices(strata, validation_fraction, seed)  # type: ignore[arg-type]
        except ValueError as exc:
            raise DataError(f"text_files: cannot hold out validation_fraction={validation_fraction} of "
                            f"{len(train_split)} training rows with every class in both parts ({exc}); use a "
                            "smaller fraction or more rows.") from None
        train_split, val_split = train_split.subset(keep.tolist()), train_split.subset(held.tolist())
    tok = load_tokenizer(tokenizer, train_split.all_texts(), min_count=min_count, max_size=max_vocab)
    return text_bundle(train_split, splits["test"], tok, task=task, max_length=max_length, val=val_split,
                       class_names=class_names, seed=seed)
