"""Three tasks on real text that ships inside a package: the one-line jokes of pyjokes.

pyjokes (``pip install pyjokes``, part of the ``minilm`` extra) holds about a thousand jokes in 13
languages, each either "neutral" or a Chuck Norris joke. Every joke is labelled for three tasks:

* ``language``: which of the 13 languages (classification; codes in :data:`LANGUAGES` order),
* ``chuck``: a Chuck Norris joke or not (binary classification),
* ``length``: log of the number of words, standardised on the training split (regression).

The texts are tokenized once with the tokenizer of a local model folder (``tokenizer_path``); the
batch input is ``{"input_ids", "attention_mask"}`` (what :class:`~mtl_lightning.models.TransformerEncoder` reads).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from mtl_lightning.data.datamodule import MultiTaskDataModule, TensorDictDataset
from mtl_lightning.extras import check_model_dir, require

LANGUAGES = ("cs", "de", "en", "es", "eu", "fr", "gl", "hu", "it", "lt", "pl", "ru", "sv")


def joke_corpus(languages: Sequence[str] = LANGUAGES) -> list[tuple[str, str, int]]:
    """(text, language, is_chuck) of every distinct joke of ``languages``, in a fixed order."""
    pyjokes = require("pyjokes.pyjokes", "minilm")
    seen, rows = set(), []
    for language in languages:
        if language not in pyjokes.all_jokes:
            raise ValueError(f"JokesDataModule: pyjokes has no language {language!r}; it has {sorted(pyjokes.all_jokes)}.")
        for category in ("neutral", "chuck"):
            for text in pyjokes.all_jokes[language].get(category, []):
                if text not in seen:
                    seen.add(text)
                    rows.append((text, language, int(category == "chuck")))
    return rows


class JokesDataModule(MultiTaskDataModule):
    """The pyjokes corpus, tokenized, split at random (``seed``) into train / val / test.

    Args:
        tokenizer_path: Local folder of a Hugging Face tokenizer (usually the encoder's model folder).
        max_length: Tokens per joke (padded / truncated).
        languages: Language codes to keep (the ``language`` task has one class per code, in this order).
        val_fraction / test_fraction: Shares of the jokes in the val and test splits.
        max_samples: Keep only this many jokes (after shuffling; for quick runs).
    """

    def __init__(self, tokenizer_path: str, max_length: int = 48, languages: Sequence[str] = LANGUAGES,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, max_samples: Optional[int] = None,
                 batch_size: int = 32, eval_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"JokesDataModule: val_fraction and test_fraction must be in (0, 1) with a sum below 1, "
                             f"got {val_fraction} and {test_fraction}.")
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length
        self.languages = list(languages)
        self.fractions = (val_fraction, test_fraction)
        self.max_samples = max_samples

    def build_datasets(self) -> dict[str, TensorDictDataset]:
        transformers = require("transformers", "hf")
        path = check_model_dir(self.tokenizer_path, "JokesDataModule", "tokenizer_path",
                               ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        rows = joke_corpus(self.languages)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed)).tolist()
        rows = [rows[i] for i in order][: self.max_samples]
        tokens = tokenizer([r[0] for r in rows], padding="max_length", truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        words = torch.tensor([math.log(len(r[0].split())) for r in rows])
        data = {
            "input": {"input_ids": tokens["input_ids"].long(), "attention_mask": tokens["attention_mask"].long()},
            "language": torch.tensor([self.languages.index(r[1]) for r in rows]),
            "chuck": torch.tensor([r[2] for r in rows]),
        }
        n = len(rows)
        n_val, n_test = int(n * self.fractions[0]), int(n * self.fractions[1])
        bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
        train = words[: bounds["train"][1]]
        data["length"] = (words - train.mean()) / train.std().clamp_min(1e-6)
        return {split: TensorDictDataset({k: _rows(v, a, b) for k, v in data.items()}) for split, (a, b) in bounds.items()}


def _rows(value: object, start: int, stop: int) -> object:
    if isinstance(value, dict):
        return {k: v[start:stop] for k, v in value.items()}
    return value[start:stop]  # type: ignore[index]
