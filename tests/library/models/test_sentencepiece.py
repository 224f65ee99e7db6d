"""Checkpoints whose tokenizer is only a SentencePiece tokenizer.model (Gemma's own release, older
Llama 2 / Mistral directories): `hf.Tokenizer.from_directory` converts it to a `tokenizers`
pipeline. Checked against sentencepiece itself (installed with the project: random texts, three
trainer settings) and against transformers through the golden fixtures of
tests/fixtures/sentencepiece_references.py (versions in versions.json under "sentencepiece")."""

import io
import json
import os
import random
import shutil

import pytest
import sentencepiece

from hyperlora_jax.models import hf
from tests.fixtures.sentencepiece_references import CORPUS, GEMMA_TRAINER, LLAMA2_TRAINER, VOCAB_SIZE

from tests.repo_paths import FIXTURES

GEMMA = os.path.join(FIXTURES, "hf_gemma_sentencepiece")
LLAMA2 = os.path.join(FIXTURES, "hf_llama2_sentencepiece")
# SentencePiece's defaults (T5 / ALBERT-era BPE models): NFKC through the model's precompiled
# character map, whitespace runs collapsed and stripped, the dummy prefix; no byte fallback.
NFKC_TRAINER = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


@pytest.fixture(scope="module")
def references():
  with open(os.path.join(FIXTURES, "sentencepiece_references.json"), encoding="utf-8") as f:
    return json.load(f)


def _train(directory, settings, model_type="bpe", vocab_size=VOCAB_SIZE) -> str:
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS),
    model_writer=model,
    model_type=model_type,
    vocab_size=vocab_size,
    hard_vocab_limit=False,
    num_threads=1,
    minloglevel=2,
    **settings,
  )
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.model")
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path


def _random_texts(seed: int, count: int) -> list[str]:
  """Texts a tokenizer's edge cases hide in: runs of spaces, tabs and newlines at either end,
  digits, characters outside the corpus (byte fallback or <unk>), NFKC-changed ones (full-width
  letters, ligatures, circled digits, the ideographic space), the "▁" character itself."""
  pieces = list("abcdefghijklmnopqrstuvwxyzABCT.,;:()!?") + [" ", "  ", "\t", "\n", "0", "7", "12"]
  pieces += ["é", "ß", "中", "😀", "ＡＢ", "①", "ﬁ", "\u3000", "▁", "def ", "return ", "the ", "server", "_"]
  rng = random.Random(seed)
  return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 24))) for _ in range(count)]


@pytest.mark.parametrize("settings", ["gemma", "llama2", "nfkc"])
def test_random_texts_get_sentencepieces_own_ids(settings, tmp_path):
  """600 random texts per model: the converted tokenizer's ids are sentencepiece's (<bos> first)
  and its decoding is sentencepiece's (where no piece is unknown). Catches merges ranked by id where the model's scores order
  them otherwise, a byte fallback or unknown piece mishandled, a dummy prefix added or dropped,
  whitespace collapsed where the model keeps it (or kept where it collapses), NFKC skipped."""
  trainer = {"gemma": GEMMA_TRAINER, "llama2": LLAMA2_TRAINER, "nfkc": NFKC_TRAINER}[settings]
  path = _train(str(tmp_path), trainer)
  processor = sentencepiece.SentencePieceProcessor(model_file=path)
  pad = {"gemma": "<pad>", "llama2": "<unk>", "nfkc": "<unk>"}[settings]
  tokenizer = hf.Tokenizer.from_directory(str(tmp_path), pad_token=pad)
  for text in _random_texts(seed=len(settings), count=600):
    ids = tokenizer.encode(text)
    assert ids == [processor.bos_id()] + processor.encode(text), (settings, text)
    if processor.unk_id() not in ids:  # <unk> is special (skipped); sentencepiece writes " ⁇ ".
      assert tokenizer.decode(ids) == processor.decode(ids[1:]), (settings, text)


@pytest.mark.parametrize("directory", [GEMMA, LLAMA2])
def test_the_fixtures_texts_get_sentencepieces_and_transformers_ids(directory, references):
  """The fixture's own model files: ids as sentencepiece gives them on every text without a
  control piece, as transformers' `AutoTokenizer` gives them on every text where it agrees with
  sentencepiece (control pieces written in the text included: "<bos>" is one special token for
  transformers, five characters for sentencepiece), and transformers' decoding. Where transformers
  differs from sentencepiece (Llama 2-style: several leading spaces) the project follows
  sentencepiece; the fixture lists those texts and the test checks the list is what was found."""
  record = references[os.path.basename(directory)]
  tokenizer = hf.Tokenizer.from_directory(directory)
  differs = record["transformers_differs_from_sentencepiece"]
  for i, text in enumerate(record["texts"]):
    ids = tokenizer.encode(text)
    if "<bos>" not in text and "<eos>" not in text:
      assert ids == record["sentencepiece_ids"][i], text
    if text not in differs:
      assert ids == record["transformers_ids"][i], text
      assert tokenizer.decode(ids) == record["transformers_decoded"][i], text
  expected = (
    ["<bos>control pieces<eos> written in the text"]
    if directory == GEMMA
    else ["  two  spaces\tand a tab\n\nand newlines ", " "]
  )
  assert differs == expected


def test_gemmas_chat_template_tokenizes_as_transformers(references):
  """Gemma's chat template rendered and tokenized: "<bos>", "<start_of_turn>", "<end_of_turn>" are
  one token each (control and user-defined pieces as added tokens), the ids transformers'
  `apply_chat_template(..., tokenize=True)` gives. Catches user-defined pieces left to the BPE
  (split into characters) and a second <bos> from the post-processor."""
  record = references["hf_gemma_sentencepiece"]
  tokenizer = hf.Tokenizer.from_directory(GEMMA)
  text = tokenizer.apply_chat_template(record["chat"], add_generation_prompt=True)
  assert text == record["chat_text"]
  assert tokenizer.encode(text, add_special_tokens=False) == record["chat_ids"]
  turns = [tokenizer.encode(t, add_special_tokens=False) for t in ("<start_of_turn>", "<end_of_turn>", "<bos>")]
  assert all(len(ids) == 1 for ids in turns)


def test_merges_are_ranked_by_the_merged_pieces_score_by_hand():
  """Scores, not ids, decide: "ab" (score -1) before "bc" (-2) though its id is later, so "abc"
  becomes "ab" + "c"; a piece with two splits lists both, by their parts' ids."""
  pieces = [("a", 0.0), ("b", 0.0), ("c", 0.0), ("bc", -2.0), ("ab", -1.0), ("abc", -3.0)]
  assert hf.sentencepiece_merges(pieces) == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]


def test_bos_and_eos_follow_tokenizer_config(tmp_path):
  """`add_bos_token: false` and `add_eos_token: true` in tokenizer_config.json (Gemma's defaults
  are true / false): no <bos>, an <eos> after the text."""
  directory = tmp_path / "eos"
  shutil.copytree(GEMMA, directory)
  config = json.loads((directory / "tokenizer_config.json").read_text())
  (directory / "tokenizer_config.json").write_text(
    json.dumps({**config, "add_bos_token": False, "add_eos_token": True})
  )
  plain = hf.Tokenizer.from_directory(GEMMA).encode("Hello world")
  changed = hf.Tokenizer.from_directory(str(directory))
  assert plain[0] == changed.bos_id == 2
  assert changed.encode("Hello world") == plain[1:] + [changed.eos_id]


def test_a_unigram_or_unreadable_model_is_refused_and_tokenizer_json_wins(tmp_path):
  """A unigram model (T5-style) and bytes that are not a model are refused naming the file; a
  directory with both files reads tokenizer.json (the checkpoint's own conversion)."""
  _train(str(tmp_path / "unigram"), NFKC_TRAINER, model_type="unigram", vocab_size=120)
  with pytest.raises(hf.CheckpointError, match="unigram.*tokenizer.model|tokenizer.model.*unigram"):
    hf.Tokenizer.from_directory(str(tmp_path / "unigram"), pad_token="<unk>")
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "tokenizer.model").write_bytes(b"\xff\xfenot a model")
  with pytest.raises(hf.CheckpointError, match="broken/tokenizer.model: not a SentencePiece model"):
    hf.Tokenizer.from_directory(str(tmp_path / "broken"))
  both = tmp_path / "both"
  shutil.copytree(GEMMA, both)
  shutil.copy(os.path.join(FIXTURES, "hf_gemma2", "tokenizer.json"), both / "tokenizer.json")
  read = hf.Tokenizer.from_directory(str(both), pad_token="<|pad|>")
  json_ids = hf.Tokenizer.from_directory(os.path.join(FIXTURES, "hf_gemma2")).encode("the server")
  assert read.encode("the server") == json_ids != hf.Tokenizer.from_directory(GEMMA).encode("the server")
