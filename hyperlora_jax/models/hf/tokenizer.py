"""A checkpoint's tokenizer without transformers: `Tokenizer` reads tokenizer.json (or a
SentencePiece tokenizer.model, as Gemma's and Llama 2's checkpoints carry it, or OpenAI CLIP's
vocab.json + merges.txt) with the `tokenizers` library, tokenizer_config.json's special tokens,
and the chat template (chat_template.jinja or tokenizer_config.json's), rendered as transformers'
`apply_chat_template` renders it."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from hyperlora_jax.models.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"


def clip_bpe_tokenizer(vocab_file: str, merges_file: str):
  """A `tokenizers.Tokenizer` of OpenAI CLIP's BPE from its vocab.json and merges.txt, the
  pipeline transformers' CLIPTokenizerFast builds from them: NFC, whitespace runs to one space,
  lower case; split into letters / digits / punctuation runs; byte-level symbols, '</w>' at word
  ends; <|startoftext|> ... <|endoftext|> around each text.

  Args:
    vocab_file: vocab.json; merges_file: merges.txt.
  Returns:
    A `tokenizers.Tokenizer`.
  """
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

  with open(vocab_file, encoding="utf-8") as f:
    vocab = json.load(f)
  with open(merges_file, encoding="utf-8") as f:
    merges = [
      (pair[0], pair[1])
      for pair in (line.split() for line in f.read().split("\n") if line and not line.startswith("#version"))
      if len(pair) == 2
    ]
  tokenizer = Tokenizer(
    models.BPE(
      vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token="<|endoftext|>"
    )
  )
  tokenizer.normalizer = normalizers.Sequence(
    [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
  )
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(
        Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True
      ),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.RobertaProcessing(  # (sep, cls): positional in every version.
    ("<|endoftext|>", vocab["<|endoftext|>"]),
    ("<|startoftext|>", vocab["<|startoftext|>"]),
    trim_offsets=False,
    add_prefix_space=False,
  )
  return tokenizer


# SentencePiece's piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPM_BPE = 2  # TrainerSpec.ModelType.


def _read_sentencepiece(model_file: str):
  """The `ModelProto` of a SentencePiece model file (sentencepiece's own schema)."""
  from google.protobuf.message import DecodeError
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # Generated code.
  with open(model_file, "rb") as f:
    try:
      proto.ParseFromString(f.read())
    except DecodeError as e:
      raise CheckpointError(f"{model_file}: not a SentencePiece model ({e})") from e
  if not proto.pieces:
    raise CheckpointError(f"{model_file}: not a SentencePiece model (no pieces)")
  return proto


def sentencepiece_merges(pieces: list[tuple[str, float]]) -> list[tuple[str, str]]:
  """The BPE merges a SentencePiece BPE vocabulary implies: every split (left, right) of a piece
  into two pieces of the vocabulary, ranked by the merged piece's score, highest first (the order
  SentencePiece merges in), ties by id; splits of one piece by their parts' ids.

  Args:
    pieces: the mergeable pieces (text, score), in id order.
  Returns:
    The merges, best first.
  """
  ids = {piece: i for i, (piece, _) in enumerate(pieces)}
  ranked: list[tuple[float, int, str, str]] = []
  for merged, score in pieces:
    splits = [(merged[:k], merged[k:]) for k in range(1, len(merged))]
    by_ids = sorted((ids[left], ids[right], left, right) for left, right in splits if left in ids and right in ids)
    ranked += [(-score, ids[merged], left, right) for _, _, left, right in by_ids]
  return [(left, right) for _, _, left, right in sorted(ranked, key=lambda m: m[:2])]


def sentencepiece_tokenizer(model_file: str, add_bos: bool = True, add_eos: bool = False):
  """A `tokenizers.Tokenizer` that tokenizes as a SentencePiece BPE model (a checkpoint's
  tokenizer.model: Gemma, Gemma 2 / 3, Llama 2, Mistral v0.1), built as transformers converts it:
  the vocabulary with the merges it implies (`sentencepiece_merges`), byte fallback, the model's
  normalizer (its precompiled character map, extra whitespace removed, the dummy "▁" prefix, spaces
  as "▁"), control and user-defined pieces as added tokens matched in the text ("<bos>" and
  "<start_of_turn>" written by a chat template are one token each; control pieces are special,
  left out when decoding), and <bos> / <eos> around each text as `add_bos` / `add_eos` say
  (tokenizer_config.json's `add_bos_token`, `add_eos_token`). On plain text the ids are
  sentencepiece's own; control pieces written in the text are where they differ, as transformers'.

  Args:
    model_file: the SentencePiece model (tokenizer.model).
    add_bos: put the model's <bos> piece before each text.
    add_eos: put its <eos> piece after each text.
  Returns:
    A `tokenizers.Tokenizer`.
  Raises:
    CheckpointError: not a SentencePiece model, or a unigram one (T5-style; not read here).
  """
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

  proto = _read_sentencepiece(model_file)
  if proto.trainer_spec.model_type != _SPM_BPE:
    raise CheckpointError(
      f"{model_file}: a SentencePiece model of type {proto.trainer_spec.model_type} (1 = unigram), not BPE; "
      "only BPE models (Gemma, Llama 2, Mistral) are read here: give the checkpoint's tokenizer.json"
    )
  vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
  mergeable = [(p.piece, p.score) for p in proto.pieces if p.type in (_NORMAL, _UNUSED)]
  unk = next((p.piece for p in proto.pieces if p.type == _UNKNOWN), None)
  tokenizer = Tokenizer(
    models.BPE(
      vocab,
      sentencepiece_merges(mergeable),
      unk_token=unk,
      fuse_unk=True,
      byte_fallback=proto.trainer_spec.byte_fallback,
    )
  )
  spec = proto.normalizer_spec
  steps: list[normalizers.Normalizer] = []
  if spec.precompiled_charsmap:
    steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
  if spec.remove_extra_whitespaces:
    steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
  if spec.add_dummy_prefix:
    steps.append(normalizers.Prepend("▁"))
  steps.append(normalizers.Replace(" ", "▁"))
  tokenizer.normalizer = normalizers.Sequence(steps)
  decoding = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  tokenizer.decoder = decoders.Sequence(decoding + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []))
  tokenizer.add_tokens(
    [AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces if p.type == _USER_DEFINED]
  )
  tokenizer.add_special_tokens(
    [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)]
  )
  bos, eos = proto.trainer_spec.bos_id, proto.trainer_spec.eos_id
  before = [proto.pieces[bos].piece] if add_bos and bos >= 0 else []
  after = [proto.pieces[eos].piece] if add_eos and eos >= 0 else []
  if before or after:
    tokenizer.post_processor = processors.TemplateProcessing(
      single=" ".join(before + ["$A"] + after),
      pair=" ".join(before + ["$A"] + after + [f"{t}:1" for t in before] + ["$B:1"] + [f"{t}:1" for t in after]),
      special_tokens=[(piece, vocab[piece]) for piece in dict.fromkeys(before + after)],
    )
  return tokenizer


def _special_token(value) -> str | None:
  """A tokenizer_config.json special token: a string, or {"content": ...} in older files."""
  return value.get("content") if isinstance(value, dict) else value


def render_chat_template(
  template: str, messages: list[dict], add_generation_prompt: bool = False, **special_tokens
) -> str:
  """A checkpoint's Jinja chat template rendered as transformers' `apply_chat_template` renders
  it (a sandbox with trim_blocks, lstrip_blocks and loop controls; `raise_exception`,
  `strftime_now` and a `tojson` filter; `bos_token`, `eos_token`, ... as variables).

  Args:
    template: the Jinja template.
    messages: [{"role", "content"}, ...].
    add_generation_prompt: end with the assistant's turn opening.
    special_tokens: bos_token, eos_token, ... as template variables.
  Returns:
    The rendered text.
  """
  import datetime

  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
    x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
  )
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template).render(
    messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
  )


class Tokenizer:
  """A checkpoint's tokenizer (its `tokenizer.json`, read by the `tokenizers` library, no
  transformers): `tokenizer(texts, max_len)` -> int32 [len(texts), max_len], with the special
  tokens its post-processor adds (CLIP: start and end of text; Llama 3: begin of text),
  truncated to `max_len` (the special tokens kept) and padded with `pad_id`.

  `encode` / `decode` work on one text; `bos_id` / `eos_id` are tokenizer_config.json's tokens
  (None where it names none); `apply_chat_template` renders the checkpoint's chat template
  (chat_template.jinja, or tokenizer_config.json's `chat_template`).
  """

  def __init__(self, tokenizer, pad_id: int, special_tokens: dict | None = None, chat_template: str | None = None):
    self._tokenizer = tokenizer
    self.pad_id = pad_id
    self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v}  # {"bos_token": "<s>", ...}
    self.chat_template = chat_template
    self.bos_id = self._id(self.special_tokens.get("bos_token"))
    self.eos_id = self._id(self.special_tokens.get("eos_token"))

  def _id(self, token: str | None) -> int | None:
    return None if token is None else self._tokenizer.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_directory(cls, directory: str, pad_token: str | None = None) -> Tokenizer:
    """The tokenizer of `directory`; pads with `pad_token`, else tokenizer_config.json's
    `pad_token`, else its `eos_token` (Llama checkpoints name no pad token), else the
    end-of-text token (OpenAI CLIP's padding).

    Args:
      directory: a checkpoint directory with tokenizer.json (or a SentencePiece tokenizer.model,
        or CLIP's vocab.json and merges.txt); tokenizer.json is read where both are.
      pad_token: the padding token, overriding the directory's.
    Returns:
      The `Tokenizer`.
    Raises:
      CheckpointError: no readable tokenizer, or a pad token outside the vocabulary.
    """
    import tokenizers

    config_path = os.path.join(directory, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
      with open(config_path) as f:
        config = json.load(f)
    path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.isfile(path):
      try:
        tokenizer = tokenizers.Tokenizer.from_file(path)
      except Exception as e:  # The tokenizers library raises a bare Exception for unreadable files.
        raise CheckpointError(f"{path}: not a tokenizer.json the tokenizers library reads ({e})") from e
    elif os.path.isfile(os.path.join(directory, SENTENCEPIECE_FILE)):
      path = os.path.join(directory, SENTENCEPIECE_FILE)
      tokenizer = sentencepiece_tokenizer(
        path, add_bos=config.get("add_bos_token", True), add_eos=config.get("add_eos_token", False)
      )
    elif all(os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt")):
      tokenizer = clip_bpe_tokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
    else:
      raise CheckpointError(
        f"{directory}: no {TOKENIZER_FILE}, nor a SentencePiece {SENTENCEPIECE_FILE}, nor CLIP's vocab.json and merges.txt"
      )
    special = {k: _special_token(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    pad_token = pad_token or special["pad_token"] or special["eos_token"] or "<|endoftext|>"
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
      raise CheckpointError(f"{path}: no pad token {pad_token!r} in the vocabulary")
    template_path = os.path.join(directory, "chat_template.jinja")  # transformers 5 writes it apart.
    template = config.get("chat_template")
    if os.path.isfile(template_path):
      with open(template_path, encoding="utf-8") as f:
        template = f.read()
    if isinstance(template, list):  # Named templates: [{"name": "default", "template": ...}, ...].
      template = {t["name"]: t["template"] for t in template}.get("default")
    return cls(tokenizer, pad_id, special, template)

  def __call__(self, texts, max_len: int) -> np.ndarray:
    self._tokenizer.enable_truncation(max_len)
    self._tokenizer.no_padding()
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for i, encoding in enumerate(self._tokenizer.encode_batch(list(texts))):
      out[i, : len(encoding.ids)] = encoding.ids
    return out

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """The ids of one text, untruncated (with the post-processor's special tokens unless
    `add_special_tokens=False`).

    Args:
      text: one text.
      add_special_tokens: add the post-processor's tokens.
    Returns:
      The ids.
    """
    self._tokenizer.no_truncation()
    return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, offsets) of one text, untruncated: offsets[i] = (start, end) is the character span
    of `text` token i covers ((0, 0) for a special token the post-processor added).

    Args:
      text: one text.
      add_special_tokens: add the post-processor's tokens.
    """
    self._tokenizer.no_truncation()
    encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return encoding.ids, [tuple(span) for span in encoding.offsets]

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    """The text of token `ids`.

    Args:
      ids: token ids (any ints).
      skip_special_tokens: leave out special tokens.
    Returns:
      The text.
    """
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def fingerprint(self) -> str:
    """A hash of everything that decides this tokenizer's ids and texts: its tokenizer.json
    (vocabulary, merges, normalizer, pre- and post-processor), pad id, special tokens and chat
    template (a cache of tokenized data is keyed by it).

    Returns:
      40 hex characters (sha1).
    """
    state = json.loads(self._tokenizer.to_str())
    state.pop("truncation", None), state.pop("padding", None)  # Set per call (`__call__`, `encode`).
    parts = [
      json.dumps(state, sort_keys=True),
      str(self.pad_id),
      json.dumps(self.special_tokens, sort_keys=True),
      self.chat_template or "",
    ]
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages` [{"role", "content"}, ...] (transformers'
    `apply_chat_template(..., tokenize=False)`); tokenize it with `encode(text, False)`, as the
    template writes its own begin-of-text.

    Args:
      messages: [{"role", "content"}, ...].
      add_generation_prompt: end with the assistant's turn opening.
    Returns:
      The rendered text.
    Raises:
      ValueError: the tokenizer has no chat template.
    """
    if self.chat_template is None:
      raise ValueError(
        "this tokenizer has no chat template (chat_template.jinja or tokenizer_config.json's "
        "chat_template); use a prompt template instead (hyperlora_jax.text)"
      )
    return render_chat_template(self.chat_template, messages, add_generation_prompt, **self.special_tokens)


def has_tokenizer(directory: str) -> bool:
  """Whether `directory` holds a tokenizer `Tokenizer.from_directory` reads (tokenizer.json, a
  SentencePiece tokenizer.model, or CLIP's vocab.json and merges.txt).

  Args:
    directory: a checkpoint directory.
  Returns:
    A bool.
  """
  return any(os.path.isfile(os.path.join(directory, f)) for f in (TOKENIZER_FILE, SENTENCEPIECE_FILE)) or all(
    os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt")
  )
