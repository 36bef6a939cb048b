"""Tokenization through Hugging Face `tokenizers` (notebook 00).

`Tokenizer` is a thin wrapper with the three things generation needs: encode,
decode and the end-of-sequence ids. `train_tokenizer` builds the embedded
byte-level BPE tokenizer from the training split.
"""
from __future__ import annotations

import json
from pathlib import Path

EOS = "<|endoftext|>"
# a checkpoint folder holds its tokenizer in at least one of these
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer_config.json")


class Tokenizer:
    """Text <-> token ids, from a `tokenizer.json` (or a `transformers` tokenizer)."""

    def __init__(self, backend, *, eos_token_id=None, bos_token_id=None, add_bos: bool = False,
                 name: str = "", folder: str | Path | None = None) -> None:
        self.backend = backend
        self.name = name
        self.folder = Path(folder) if folder is not None else None   # where it was loaded from, if anywhere
        self._chat = None                    # the transformers tokenizer that renders chat templates
        ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        self.eos_token_ids = [i for i in ids if i is not None]
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos and bos_token_id is not None

    @classmethod
    def from_folder(cls, folder: str | Path, eos_token_id=None, bos_token_id=None) -> "Tokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json`) from a checkpoint folder."""
        folder = Path(folder)
        if not any((folder / f).exists() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the "
                                    "tokenizer files from where the weights came from, or write them with "
                                    "llmopt.save_model(model, folder, tokenizer)")
        cfg_path = folder / "tokenizer_config.json"
        tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        if (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer
            backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError as e:  # pragma: no cover
                raise FileNotFoundError(f"{folder} has no tokenizer.json, and transformers "
                                        "(needed for other tokenizer formats) is missing") from e
            backend = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            if len(backend) == 0:
                raise FileNotFoundError(f"the tokenizer in {folder} has no vocabulary: its vocabulary file "
                                        "(tokenizer.json, tokenizer.model or vocab.json) is missing")

        def token_id(key):
            tok = tcfg.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if tok is None:
                return None
            return backend.token_to_id(tok) if hasattr(backend, "token_to_id") else \
                backend.convert_tokens_to_ids(tok)
        eos = eos_token_id if eos_token_id is not None else token_id("eos_token")
        bos = bos_token_id if bos_token_id is not None else token_id("bos_token")
        # a tokenizer.json's BOS comes from its post-processor (Llama 3's adds one), which `encode` applies: as
        # in transformers 5, which ignores tokenizer_config's add_bos_token there. Other formats load through
        # transformers, whose `encode` is asked for no special tokens: BOS is added here where it would add it.
        add_bos = not hasattr(backend, "get_vocab_size") and _adds_bos(backend, bos)
        return cls(backend, eos_token_id=eos, bos_token_id=bos, add_bos=add_bos, name=folder.name, folder=folder)

    @classmethod
    def from_transformers(cls, tok, eos_token_id=None) -> "Tokenizer":
        """Wrap a `transformers` tokenizer; BOS is added when its own `encode` adds one."""
        if isinstance(tok, cls):
            return tok
        if not (callable(getattr(tok, "encode", None)) and callable(getattr(tok, "decode", None))):
            raise TypeError(f"expected a transformers tokenizer, got {type(tok).__name__}")
        bos = tok.bos_token_id
        eos = eos_token_id if eos_token_id is not None else tok.eos_token_id
        return cls(tok, eos_token_id=eos, bos_token_id=bos, add_bos=_adds_bos(tok, bos),
                   name=getattr(tok, "name_or_path", "") or type(tok).__name__)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size() if hasattr(self.backend, "get_vocab_size") \
            else len(self.backend)

    def encode(self, text: str) -> list[int]:
        if hasattr(self.backend, "get_vocab_size"):
            ids = self.backend.encode(text).ids
        else:
            ids = self.backend.encode(text, add_special_tokens=False)
        if self.add_bos:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's chat template (Jinja), or None: a base model's tokenizer has none."""
        hf = self._transformers_tokenizer()
        return getattr(hf, "chat_template", None) if hf is not None else None

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            **kwargs) -> list[int]:
        """A conversation's prompt ids, laid out by the checkpoint's chat template (README, "Using the library").

        `messages`: [{"role": "system" | "user" | "assistant", "content": text}, ...]. `transformers`
        renders the template (what its own `apply_chat_template` gives, special tokens written once:
        the template's BOS is not added again); with `add_generation_prompt` the ids end where the
        assistant's reply begins. Pass them as the prompt of `generate`, `stream` or `Engine.submit`.
        Other keyword arguments go to the template (`tools=`, `documents=`, ...).
        """
        if not (isinstance(messages, (list, tuple)) and messages
                and all(isinstance(m, dict) and "role" in m for m in messages)):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, e.g. "
                             f"[{{'role': 'user', 'content': 'Hello'}}], got {messages!r:.80}")
        template = self.chat_template
        if not template:
            raise ValueError(f"the tokenizer {self.name or ''!r} has no chat template (a base model's has none): "
                             "give the prompt as text, or load an instruct checkpoint (its tokenizer_config.json "
                             "or chat_template.jinja holds the template)")
        ids = self._transformers_tokenizer().apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False,
            **kwargs)
        return [int(i) for i in ids]

    def _transformers_tokenizer(self):
        """This tokenizer as `transformers` loads it (for its chat template), or None where it cannot."""
        if hasattr(self.backend, "apply_chat_template"):
            return self.backend                  # a transformers tokenizer already
        if self._chat is None and self.folder is not None:
            from transformers import AutoTokenizer
            self._chat = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        return self._chat


class IncrementalDecoder:
    """Token ids in one at a time, their text out, in time that does not grow with the length (notebook 00).

    Decoding the whole sequence again for each new token costs more the longer it gets (here,
    `tiny`: 35 us a token over 500 tokens, 128 us over 2,000). As vLLM and TGI do, each token
    decodes a short window instead: the tokens since text was last released, after the ones
    released then (a decoder may treat a sequence's first token apart: SentencePiece drops its
    leading space; so the window starts one release back and only what it adds is new). Text
    waits while it ends inside a character: byte-level BPE may split one across tokens ("\ufffd").
    `tokenizer`: anything with `decode(ids)`.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._pieces: list[str] = []
        self._start = self._read = 0        # the window is ids[_start:]; ids[:_read] are released
        self._released = ""                 # decode(ids[_start:_read])

    def push(self, tok: int) -> str:
        """Add one token id; return the text it completes ("" while a character is still split)."""
        self.ids.append(int(tok))
        window = self.tokenizer.decode(self.ids[self._start:])
        if len(window) <= len(self._released) or window.endswith("\ufffd"):
            return ""
        new = window[len(self._released):]
        self._pieces.append(new)
        self._start, self._read = self._read, len(self.ids)
        self._released = self.tokenizer.decode(self.ids[self._start:])
        return new

    @property
    def text(self) -> str:
        """The text released so far."""
        return "".join(self._pieces)

    def rest(self) -> str:
        """The text of the tokens not released yet (a split character shows as "\ufffd")."""
        return self.tokenizer.decode(self.ids[self._start:])[len(self._released):]


def _adds_bos(tok, bos) -> bool:
    """Whether a transformers tokenizer's `encode` puts BOS first (what its special tokens add)."""
    plain, special = tok.encode("a", add_special_tokens=False), tok.encode("a", add_special_tokens=True)
    return bos is not None and special[:1] == [bos] and plain[:1] != [bos]


def with_bos(backend, bos: str):
    """A copy of the `tokenizers.Tokenizer` `backend` whose post-processor puts the token `bos` first, as
    Llama 3's tokenizer.json does (after the post-processor it had, if any)."""
    from tokenizers import Tokenizer as HFTokenizer, processors
    backend = HFTokenizer.from_str(backend.to_str())
    template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                             special_tokens=[(bos, backend.token_to_id(bos))])
    backend.post_processor = template if backend.post_processor is None else \
        processors.Sequence([backend.post_processor, template])
    return backend


def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    """Train a byte-level BPE tokenizer (GPT-2 style) on `texts`; returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, folder: str | Path) -> None:
    """Write the tokenizer so both llmopt and `transformers.AutoTokenizer` load it.

    `tok`: llmopt's `Tokenizer` (what `load_model` gives; its end-of-text and BOS tokens and
    whether it adds BOS are kept), a `transformers` tokenizer, or a `tokenizers.Tokenizer` with
    the embedded tokenizer's special token ("<|endoftext|>", what `train_tokenizer` makes)."""
    from transformers import PreTrainedTokenizerFast
    folder = Path(folder)
    if isinstance(tok, Tokenizer) and hasattr(tok.backend, "save_pretrained"):
        tok = tok.backend                    # a transformers tokenizer, wrapped
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(folder))
        return
    if isinstance(tok, Tokenizer):
        name = lambda i: tok.backend.id_to_token(i) if i is not None else None  # noqa: E731
        # BOS goes into tokenizer.json's post-processor, where transformers 5 reads it
        backend = with_bos(tok.backend, name(tok.bos_token_id)) if tok.add_bos else tok.backend
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=name(tok.eos_token_id),
                                       bos_token=name(tok.bos_token_id), unk_token=None,
                                       pad_token=name(tok.eos_token_id))
        fast.chat_template = tok.chat_template
        fast.save_pretrained(str(folder))
        return
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   unk_token=None, pad_token=EOS)
    fast.save_pretrained(str(folder))
